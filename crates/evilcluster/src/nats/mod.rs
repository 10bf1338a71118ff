//! Beyond one machine: hosts (each a master with its tree) form one cluster
//! through NATS (feature `nats`).
//!
//! Local traffic stays on local sockets; NATS carries only what crosses
//! hosts. Every subject starts with `evilcluster.<cluster>.v<protocol>`, so
//! clusters of other names or protocol versions never mix:
//!
//! - `….hb`: each master publishes its host's members (a heartbeat) every
//!   [`NatsOptions::heartbeat`] and on every change; every process keeps the
//!   other hosts' members from them. A host whose heartbeats stop for the
//!   host timeout (or that says it leaves) is gone: its instances leave the
//!   view and calls in flight to it end at once.
//! - `….i.<incarnation>`: each hosting process's requests, by NATS
//!   request/reply; the payload is the same `Request`/`Reply` frame body as
//!   on a local socket.
//! - `….ev`: events published to subscribers on other hosts.
//!
//! The layer sits between the node (which it uses: the directory, the
//! hosted services) and the API (which calls it when no local instance
//! exists). May use: the wire crate, `error` and `node` only.

mod call;
mod membership;
mod serve;

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use tracing::{info, warn};

use crate::node::Node;
use crate::Error;

pub(crate) use call::{call, instances, resolve, Resolved};
pub(crate) use membership::remote_members;

/// The environment variable that turns NATS on without changing the program.
pub const URL_ENV: &str = "EVILCLUSTER_NATS_URL";
/// The environment variable naming this host in the cluster (default: the host name).
pub const NODE_ENV: &str = "EVILCLUSTER_NODE";

/// How a cluster reaches NATS: the server(s), this host's node name, the
/// credentials and TLS settings, and the membership timings.
///
/// ```no_run
/// # use evilcluster::prelude::*;
/// let options = evilcluster::NatsOptions::new("nats://10.0.0.5:4222")
///     .node("host-a")
///     .credentials_file("/etc/myapp/nats.creds");
/// # let _ = Cluster::new("myapp").nats(options);
/// ```
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub(crate) url: String,
    pub(crate) node: Option<String>,
    pub(crate) user: Option<(String, String)>,
    pub(crate) token: Option<String>,
    pub(crate) nkey: Option<String>,
    pub(crate) credentials: Option<std::path::PathBuf>,
    pub(crate) root_certificates: Option<std::path::PathBuf>,
    pub(crate) client_certificate: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub(crate) require_tls: bool,
    pub(crate) heartbeat: Duration,
    pub(crate) host_timeout: Duration,
}

impl NatsOptions {
    /// NATS at `url` (one or more servers, comma-separated:
    /// `nats://a:4222,nats://b:4222`).
    pub fn new(url: impl Into<String>) -> Self {
        NatsOptions {
            url: url.into(),
            node: None,
            user: None,
            token: None,
            nkey: None,
            credentials: None,
            root_certificates: None,
            client_certificate: None,
            require_tls: false,
            heartbeat: Duration::from_millis(250),
            host_timeout: Duration::from_secs(2),
        }
    }

    /// Options from the environment: `EVILCLUSTER_NATS_URL` (required),
    /// `EVILCLUSTER_NODE`, `EVILCLUSTER_NATS_USER` and
    /// `EVILCLUSTER_NATS_PASSWORD`, `EVILCLUSTER_NATS_TOKEN`,
    /// `EVILCLUSTER_NATS_NKEY` (a seed), `EVILCLUSTER_NATS_CREDS` (a file),
    /// `EVILCLUSTER_NATS_CA`, `EVILCLUSTER_NATS_CERT` and
    /// `EVILCLUSTER_NATS_KEY` (files), `EVILCLUSTER_NATS_TLS=1`.
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut options = NatsOptions::new(var(URL_ENV)?);
        options.node = var(NODE_ENV);
        if let (Some(user), Some(password)) = (var("EVILCLUSTER_NATS_USER"), var("EVILCLUSTER_NATS_PASSWORD")) {
            options.user = Some((user, password));
        }
        options.token = var("EVILCLUSTER_NATS_TOKEN");
        options.nkey = var("EVILCLUSTER_NATS_NKEY");
        options.credentials = var("EVILCLUSTER_NATS_CREDS").map(Into::into);
        options.root_certificates = var("EVILCLUSTER_NATS_CA").map(Into::into);
        if let (Some(cert), Some(key)) = (var("EVILCLUSTER_NATS_CERT"), var("EVILCLUSTER_NATS_KEY")) {
            options.client_certificate = Some((cert.into(), key.into()));
        }
        options.require_tls = var("EVILCLUSTER_NATS_TLS").is_some_and(|v| v != "0");
        Some(options)
    }

    /// This host's node name in the cluster (default: `EVILCLUSTER_NODE`,
    /// else the host name). Two hosts of one cluster must not share one.
    pub fn node(mut self, name: impl Into<String>) -> Self {
        self.node = Some(name.into());
        self
    }

    /// Authenticates with a user name and password.
    pub fn user_and_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Authenticates with an nkey seed (`SU…`).
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.nkey = Some(seed.into());
        self
    }

    /// Authenticates with a credentials file (a user JWT and its nkey seed).
    pub fn credentials_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.credentials = Some(path.into());
        self
    }

    /// Trusts the certificate authorities in this PEM file for the server's
    /// TLS certificate (and requires TLS).
    pub fn root_certificates(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.root_certificates = Some(path.into());
        self.require_tls = true;
        self
    }

    /// Presents this client certificate and key (PEM files) to the server.
    pub fn client_certificate(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// Refuses to talk to the server without TLS.
    pub fn require_tls(mut self, required: bool) -> Self {
        self.require_tls = required;
        self
    }

    /// How often each master publishes its host's members (default 250 ms),
    /// and after how long without one a host is gone (default 2 s; at least
    /// four heartbeats).
    pub fn heartbeat(mut self, interval: Duration, host_timeout: Duration) -> Self {
        self.heartbeat = interval.max(Duration::from_millis(10));
        self.host_timeout = host_timeout.max(self.heartbeat * 4);
        self
    }

    fn node_name(&self) -> String {
        if let Some(node) = &self.node {
            return node.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".to_owned())
    }

    async fn connect(&self, cluster: &str, node: &str, path: &str) -> Result<async_nats::Client, Error> {
        let failed = |reason: String| Error::Nats {
            url: self.url.clone(),
            reason,
        };
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("evilcluster {cluster} {node} {path}"))
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .request_timeout(None)
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| Duration::from_millis((50 * attempts as u64).min(500)))
            .require_tls(self.require_tls);
        if let Some((user, password)) = &self.user {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &self.nkey {
            options = options.nkey(seed.clone());
        }
        if let Some(path) = &self.credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| failed(format!("cannot read the credentials file {}: {e}", path.display())))?;
        }
        if let Some(path) = &self.root_certificates {
            options = options.add_root_certificates(path.clone());
        }
        if let Some((cert, key)) = &self.client_certificate {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let state = STATE.get_or_init(Default::default).clone();
        options = options.event_callback(move |event| {
            let state = state.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        warn!("lost the connection to NATS; reconnecting");
                        state.set_connected(false);
                    }
                    async_nats::Event::Connected => {
                        info!("connected to NATS");
                        state.set_connected(true);
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        warn!("NATS dropped messages for a slow subscription of this process")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
        let servers: Vec<String> = self.url.split(',').map(|s| s.trim().to_owned()).collect();
        let addrs: Vec<async_nats::ServerAddr> = servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<_, _>>()
            .map_err(|e| failed(format!("bad server address: {e}")))?;
        // `nats://user:password@host`: the URL's credentials, unless given apart.
        if self.user.is_none() {
            if let Some(addr) = addrs.iter().find(|a| a.has_user_pass()) {
                if let (Some(user), Some(password)) = (addr.username(), addr.password()) {
                    options = options.user_and_password(user.to_owned(), password.to_owned());
                }
            }
        }
        options.connect(addrs).await.map_err(|e| failed(e.to_string()))
    }
}

impl From<&str> for NatsOptions {
    fn from(url: &str) -> Self {
        NatsOptions::new(url)
    }
}

impl From<String> for NatsOptions {
    fn from(url: String) -> Self {
        NatsOptions::new(url)
    }
}

/// The version in every subject: bumped when what crosses NATS changes.
pub(crate) const PROTOCOL: u16 = evilcluster_wire::PROTOCOL_VERSION;

/// Options given by the program (`Cluster::nats`), which win over the environment.
static CONFIGURED: RwLock<Option<NatsOptions>> = RwLock::new(None);

/// Records the program's NATS options (called by `Cluster::nats`, in every
/// process: the same `main` runs everywhere).
pub(crate) fn configure(options: NatsOptions) {
    *CONFIGURED.write().unwrap_or_else(|e| e.into_inner()) = Some(options);
}

fn options() -> Option<NatsOptions> {
    CONFIGURED
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .or_else(NatsOptions::from_env)
}

/// The connection state shared with the client's event callback.
#[derive(Default)]
struct State {
    connected: tokio::sync::watch::Sender<bool>,
    /// Cancelled when the connection to NATS drops: the replies of calls in
    /// flight on it cannot be counted on, so those calls end at once.
    dropped: std::sync::Mutex<tokio_util::sync::CancellationToken>,
}

impl State {
    fn set_connected(&self, up: bool) {
        self.connected.send_replace(up);
        if !up {
            let mut dropped = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
            dropped.cancel();
            *dropped = tokio_util::sync::CancellationToken::new();
        }
    }
}

static STATE: OnceLock<Arc<State>> = OnceLock::new();

/// This process's link to the other hosts.
pub(crate) struct Mesh {
    pub client: async_nats::Client,
    /// `evilcluster.<cluster>.v<protocol>`.
    pub base: String,
    pub node_name: String,
    /// The largest message the server takes (read once: servers of one
    /// NATS cluster share it).
    pub max_payload: usize,
    pub options: NatsOptions,
    pub view: membership::View,
    state: Arc<State>,
    hooks: Hooks,
    /// Events for the other hosts, published in order by one task.
    events: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    /// Set as the host leaves: its heartbeats stop.
    pub leaving: std::sync::atomic::AtomicBool,
}

static MESH: RwLock<Option<Arc<Mesh>>> = RwLock::new(None);

/// The cross-host layer of this process, when the cluster uses NATS.
pub(crate) fn mesh() -> Option<Arc<Mesh>> {
    MESH.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Mesh {
    /// Whether the client is connected to a NATS server now.
    pub fn connected(&self) -> bool {
        *self.state.connected.borrow()
    }

    /// Cancelled when the current connection to NATS drops.
    pub fn connection_dropped(&self) -> tokio_util::sync::CancellationToken {
        self.state.dropped.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the client is connected, up to `deadline`.
    pub async fn wait_connected(&self, deadline: std::time::Instant) -> bool {
        let mut changes = self.state.connected.subscribe();
        tokio::time::timeout_at(deadline.into(), changes.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// What the layers above want to hear from other hosts (the runtime wires
/// them: this layer knows nothing above the node).
#[derive(Clone, Copy)]
pub(crate) struct Hooks {
    /// In the master: an event published on another host (node, body).
    pub event: fn(&str, &[u8]),
    /// Another host's members came up (`true`) or went down, and why.
    pub members: fn(&str, &[crate::node::directory::Member], bool, &str),
}

/// Joins the other hosts when the cluster uses NATS (`Cluster::nats` or
/// `EVILCLUSTER_NATS_URL`); does nothing otherwise. `master`: this process
/// publishes its host's members.
pub(crate) async fn start(node: &Arc<Node>, master: bool, hooks: Hooks) -> Result<(), Error> {
    let Some(options) = options() else {
        return Ok(());
    };
    let cluster = node.identity.cluster.clone();
    for (what, name) in [("cluster", &cluster)] {
        if name.is_empty() || name.contains(['.', '*', '>', ' ', '\t']) {
            return Err(Error::Declaration(format!(
                "the {what} name {name:?} cannot be used in NATS subjects (no '.', '*', '>' or spaces)"
            )));
        }
    }
    let node_name = options.node_name();
    let state = STATE.get_or_init(Default::default).clone();
    let client = options.connect(&cluster, &node_name, &node.identity.path).await?;
    state.set_connected(true);
    let base = format!("evilcluster.{cluster}.v{PROTOCOL}");
    let (events, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let max_payload = client.server_info().max_payload;
    let mesh = Arc::new(Mesh {
        client,
        base,
        node_name,
        max_payload,
        // A host that leaves cleanly drains within its shutdown timeout.
        view: membership::View::new(node.config.shutdown_timeout + options.host_timeout),
        options,
        state,
        leaving: Default::default(),
        hooks,
        events,
    });
    *MESH.write().unwrap_or_else(|e| e.into_inner()) = Some(mesh.clone());
    membership::start(&mesh, node, master).await?;
    if master {
        let mesh_out = mesh.clone();
        actix_rt::spawn(async move {
            let subject = format!("{}.ev", mesh_out.base);
            while let Some(body) = outgoing.recv().await {
                let envelope = EventEnvelope {
                    node: mesh_out.node_name.clone(),
                    body,
                };
                if let Ok(bytes) = rmp_serde::to_vec(&envelope) {
                    let _ = mesh_out.client.publish(subject.clone(), bytes.into()).await;
                }
            }
        });
        let mut incoming = Subscription::subscribe(&mesh, format!("{}.ev", mesh.base)).await?;
        let mesh_in = mesh.clone();
        actix_rt::spawn(async move {
            while let Some(message) = incoming.next().await {
                let Ok(envelope) = rmp_serde::from_slice::<EventEnvelope>(&message.payload) else {
                    continue;
                };
                if envelope.node != mesh_in.node_name {
                    (mesh_in.hooks.event)(&envelope.node, &envelope.body);
                }
            }
        });
    }
    serve::start(&mesh, node).await?;
    if master {
        info!(node = %mesh.node_name, url = %mesh.options.url, "joined the cluster's other hosts through NATS");
    }
    Ok(())
}

/// Tells the other hosts this one leaves (the master, as it stops), so they
/// drop its instances at once rather than after the host timeout.
pub(crate) async fn leave() {
    if let Some(mesh) = mesh() {
        mesh.leaving.store(true, std::sync::atomic::Ordering::Release);
        membership::leave(&mesh).await;
    }
}

/// Node names of the hosts this process sees, this one first.
pub fn nodes() -> Vec<String> {
    match mesh() {
        None => Vec::new(),
        Some(mesh) => {
            let mut nodes = vec![mesh.node_name.clone()];
            nodes.extend(mesh.view.nodes());
            nodes
        }
    }
}

/// A node name kept for the life of the process (addresses are `Copy`).
pub(crate) fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = names.iter().find(|known| **known == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(leaked);
    leaked
}

/// An event crossing hosts: the publishing host and the publication.
#[derive(serde::Serialize, serde::Deserialize)]
struct EventEnvelope {
    node: String,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

/// In the master: sends a publication to the other hosts' masters (in order).
pub(crate) fn publish_event(body: Vec<u8>) {
    if let Some(mesh) = mesh() {
        let _ = mesh.events.send(body);
    }
}

/// A NATS subscription that may be dropped as the process's runtime shuts
/// down: the client's own drop spawns a task (to unsubscribe), which panics
/// without a runtime, so then it is left to the process's exit instead.
pub(crate) struct Subscription(Option<async_nats::Subscriber>);

impl Subscription {
    pub(crate) async fn subscribe(mesh: &Mesh, subject: String) -> Result<Subscription, Error> {
        mesh.client
            .subscribe(subject.clone())
            .await
            .map(|s| Subscription(Some(s)))
            .map_err(|e| Error::Nats {
                url: mesh.options.url.clone(),
                reason: format!("cannot subscribe to {subject}: {e}"),
            })
    }

    /// The next message; `None` once the subscription ended.
    pub(crate) async fn next(&mut self) -> Option<async_nats::Message> {
        use futures_util::StreamExt;
        self.0.as_mut()?.next().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_err() {
            std::mem::forget(self.0.take());
        }
    }
}
