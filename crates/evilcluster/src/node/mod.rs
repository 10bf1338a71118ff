//! This process's membership in the cluster: who it is, what it hosts, and
//! its connections to the other processes.
//!
//! The node layer: it owns the identity, listener, connections, local
//! directory, counters and the one internal request path (`rpc`). May use:
//! the wire crate and `error` only; the services above install themselves.

pub(crate) mod connection;
pub(crate) mod deadline;
pub(crate) mod directory;
pub(crate) mod frame_reader;
pub(crate) mod name;
pub(crate) mod rpc;
pub(crate) mod service;
pub(crate) mod stats;
pub(crate) mod throttle;
pub(crate) mod transport;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use std::time::Duration;

use evilcluster_wire::{Cookie, Identity, Request, WireError, DEFAULT_MAX_FRAME_LENGTH};
use interprocess::local_socket::tokio::Listener;
use rustc_hash::FxHashMap;
use tokio::sync::{Notify, OnceCell};
use tracing::{debug, warn};

use crate::node::directory::{Directory, Member, Name, Pick};
use crate::node::stats::Stats;
use crate::Error;
use connection::{Link, Payload, Responder, Side, DEFAULT_HANDSHAKE_TIMEOUT};
use futures_util::future::BoxFuture;
pub(crate) use service::HostedCache;
use service::{Hosted, Inbox, Service};
use throttle::{clip, Throttle};

/// How many nodes of this process wait in [`Node::drain`], and what wakes
/// them: a change that may let one finish (a peer's acknowledgement, the
/// last request answered or byte written, a connection closed). Draining
/// used to look every 2 ms: when a tree of 256 forks stopped, each fork
/// woke 500 times a second until its peers answered, and on 2 CPUs those
/// wake-ups took most of the stop's CPU (327–940 ms for the tree, 236–285
/// ms since).
static DRAINING: AtomicUsize = AtomicUsize::new(0);
static DRAIN_PROGRESS: Notify = Notify::const_new();

/// How long a draining node waits without news before it looks anyway:
/// a backstop, should a change not be signalled.
const DRAIN_BACKSTOP: Duration = Duration::from_millis(20);

/// Something [`Node::drain`] waits for may have changed. One load when
/// nothing drains, so it may sit on every request's path.
pub(crate) fn drain_progress() {
    if DRAINING.load(Ordering::SeqCst) > 0 {
        DRAIN_PROGRESS.notify_waiters();
    }
}

/// Counts a drain in [`DRAINING`] while it lasts, however it ends.
struct Draining;

impl Draining {
    fn start() -> Draining {
        DRAINING.fetch_add(1, Ordering::SeqCst);
        Draining
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        DRAINING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One-way messages being passed on to another instance at once (see
/// [`Node::refused`]); past it, such messages are refused like any other.
const MAX_FORWARDING: usize = connection::WINDOW;

/// Bytes of user messages a connection holds unwritten before senders wait.
pub(crate) const DEFAULT_OUTBOX_BUDGET: usize = 8 * 1024 * 1024;

/// Tunables shared by every process of a cluster.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub max_frame_length: usize,
    pub outbox_budget: usize,
    pub call_timeout: Duration,
    pub resolve_timeout: Duration,
    pub handshake_timeout: Duration,
    pub start_timeout: Duration,
    pub shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_length: DEFAULT_MAX_FRAME_LENGTH,
            outbox_budget: DEFAULT_OUTBOX_BUDGET,
            call_timeout: Duration::from_secs(5),
            resolve_timeout: Duration::from_secs(10),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            start_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

struct Slot {
    incarnation: u64,
    link: Arc<OnceCell<Arc<Link>>>,
}

impl Slot {
    fn holding(link: &Arc<Link>) -> Slot {
        Slot {
            incarnation: link.peer.incarnation,
            link: Arc::new(OnceCell::new_with(Some(link.clone()))),
        }
    }
}

/// What the master's registry is told when a connection closes.
pub(crate) type LinkClosedHook = Box<dyn Fn(std::sync::Weak<Link>) + Send + Sync>;

pub(crate) struct Node {
    pub identity: Identity,
    pub cookie: Cookie,
    pub config: Config,
    pub directory: Arc<Directory>,
    /// Where this process listens, when it hosts something.
    pub socket: Option<String>,
    pub socket_dir: PathBuf,
    /// The master's path and socket (the master itself: its own).
    pub master: (String, String),
    services: RwLock<FxHashMap<String, Hosted>>,
    /// Changed with every change of `services` (under its write lock), so
    /// that a connection's [`HostedCache`] knows it is stale.
    services_changed: AtomicU64,
    links: Mutex<FxHashMap<String, Slot>>,
    /// The actix arbiter (thread) that carries this node's connections.
    arbiter: actix_rt::ArbiterHandle,
    accept_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Fires when a child loses its connection to the master.
    pub master_lost: Notify,
    /// The connection this child opened to its master.
    master_link: Mutex<std::sync::Weak<Link>>,
    /// Warnings not tied to one connection, rate-limited.
    warnings: Mutex<Throttle>,
    /// In the master: tells the registry that a connection closed (the
    /// registry forgets what that very connection registered).
    registry_hook: OnceLock<LinkClosedHook>,
    pub stats: Stats,
    /// One-way messages being passed on to another instance (see
    /// [`Node::refused`]); a drain waits for them.
    forwarding: AtomicUsize,
    /// Set when this process starts stopping: every connection, including
    /// ones opened from now on, is told to go away.
    stopping: std::sync::atomic::AtomicBool,
}

static CURRENT: RwLock<Option<Arc<Node>>> = RwLock::new(None);

/// The node of this process, while a cluster runs in it.
pub(crate) fn current() -> Option<Arc<Node>> {
    CURRENT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

pub(crate) struct NodeSpec {
    pub identity: Identity,
    pub cookie: Cookie,
    pub config: Config,
    pub socket: Option<String>,
    pub socket_dir: PathBuf,
    pub master: (String, String),
}

/// Members a thread sent to lately, with their connections.
const RECENT_LINK_COUNT: usize = 8;

/// Held weakly: a member that left, or a connection that closed, is not
/// kept alive by a thread that once sent to it.
#[derive(Default)]
struct RecentLinks {
    slots: [Option<(std::sync::Weak<Member>, std::sync::Weak<Link>)>; RECENT_LINK_COUNT],
    next: usize,
}

thread_local! {
    static RECENT_LINKS: std::cell::RefCell<RecentLinks> = std::cell::RefCell::new(RecentLinks::default());
    static SOLE_ROUTE: std::cell::RefCell<Option<SoleRoute>> = const { std::cell::RefCell::new(None) };
}

/// The connection a thread last sent on to the only instance a pick could
/// give, while the directory stays in the state it was looked up in.
struct SoleRoute {
    state: u64,
    actor: &'static str,
    pick: Pick,
    link: std::sync::Weak<Link>,
    incarnation: u64,
}

impl Node {
    /// Creates this process's node and, if it hosts anything, binds its socket.
    /// Must run inside the runtime that will carry its connections.
    pub fn start(spec: NodeSpec) -> Result<Arc<Node>, Error> {
        let mut current = CURRENT.write().unwrap_or_else(|e| e.into_inner());
        if current.is_some() {
            return Err(Error::AlreadyRunning);
        }
        let listener = match &spec.socket {
            Some(path) => Some(transport::listen(path).map_err(|e| Error::io(format!("cannot listen on {path}"), e))?),
            None => None,
        };
        let node = Arc::new(Node {
            identity: spec.identity,
            cookie: spec.cookie,
            config: spec.config,
            directory: Arc::new(Directory::new()),
            socket: spec.socket,
            socket_dir: spec.socket_dir,
            master: spec.master,
            services: RwLock::new(FxHashMap::default()),
            services_changed: AtomicU64::new(0),
            links: Mutex::new(FxHashMap::default()),
            arbiter: actix_rt::Arbiter::current(),
            accept_task: Mutex::new(None),
            master_lost: Notify::new(),
            master_link: Mutex::new(std::sync::Weak::new()),
            warnings: Mutex::new(Throttle::default()),
            registry_hook: OnceLock::new(),
            stats: Stats::new(),
            forwarding: AtomicUsize::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
        });
        if let Some(listener) = listener {
            let task = actix_rt::spawn(accept_loop(node.clone(), listener));
            *node.accept_task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        *current = Some(node.clone());
        Ok(node)
    }

    /// Stops listening, removes the socket file and forgets the node.
    pub fn stop(&self) {
        if let Some(task) = self.accept_task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        if let Some(path) = &self.socket {
            // The listener removes its file when dropped; the abort above
            // drops it only when the task is next polled, so remove it now.
            let _ = std::fs::remove_file(path);
        }
        let mut current = CURRENT.write().unwrap_or_else(|e| e.into_inner());
        if current
            .as_ref()
            .is_some_and(|node| std::ptr::eq(Arc::as_ptr(node), self))
        {
            *current = None;
        }
    }

    /// Stops routing requests to `name`: they are refused as unknown.
    pub fn remove_service(&self, name: &str) {
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        services.remove(name);
        self.services_changed.fetch_add(1, Ordering::AcqRel);
    }

    fn open_links(&self) -> Vec<Arc<Link>> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.values().filter_map(|slot| slot.link.get().cloned()).collect()
    }

    /// Runs `task` on this node's runtime thread (its actix arbiter), for
    /// callers outside any async runtime.
    pub(crate) fn spawn_on_runtime(&self, task: futures_util::future::BoxFuture<'static, ()>) {
        self.arbiter.spawn(task);
    }

    /// Tells every peer this process is stopping: they send it no new
    /// requests (sending them to other instances instead), and each says
    /// when nothing more will come on its connection.
    pub fn go_away(&self) {
        self.stopping.store(true, Ordering::Release);
        for link in self.open_links() {
            link.go_away();
        }
    }

    /// Waits (at most `limit`) until nothing this process accepted can be
    /// lost by its exit: every peer has acknowledged [`go_away`](Self::go_away)
    /// (nothing more is on its way), every request received has been
    /// answered, every one-way message passed on, and every byte written.
    pub async fn drain(&self, limit: Duration) {
        self.go_away();
        let _draining = Draining::start();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Listening before looking: a change made after the look wakes it.
            let progress = DRAIN_PROGRESS.notified();
            let mut progress = std::pin::pin!(progress);
            progress.as_mut().enable();
            let links = self.open_links();
            let forwarding = self.forwarding.load(Ordering::SeqCst) > 0;
            let quiet = links.iter().all(|link| link.is_quiet());
            if !forwarding && quiet && links.iter().all(|link| link.is_closed() || link.is_idle()) {
                return;
            }
            drop(links);
            let now = tokio::time::Instant::now();
            if now >= deadline {
                warn!(
                    forwarding,
                    quiet, "messages still in flight after {limit:?}; stopping anyway"
                );
                return;
            }
            tokio::select! {
                () = progress => {}
                () = tokio::time::sleep_until(deadline.min(now + DRAIN_BACKSTOP)) => {}
            }
        }
    }

    pub fn add_service(&self, name: &str, service: Arc<dyn Service>) {
        self.host(name, Hosted::Service(service));
    }

    /// Routes requests for `name` into an actor's inbox.
    pub fn add_actor(&self, name: &str, inbox: Arc<dyn Inbox>) {
        self.host(name, Hosted::Actor(inbox));
    }

    fn host(&self, name: &str, hosted: Hosted) {
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        services.insert(name.to_owned(), hosted);
        self.services_changed.fetch_add(1, Ordering::AcqRel);
    }

    /// The runtime service hosted under `name`, if any.
    pub fn service(&self, name: &str) -> Option<Arc<dyn Service>> {
        match self.services.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            Some(Hosted::Service(service)) => Some(service.clone()),
            _ => None,
        }
    }

    /// Hands a request from `caller` (`None`: not from a connection, e.g.
    /// from another host through NATS) to what this process hosts under its
    /// name. `Ok(Some(future))`: a runtime service's answer, which the
    /// caller drives; `Ok(None)`: taken (an actor answers it itself, or
    /// nothing was to be answered). A refusal gives the responder back.
    // The responder comes back by value (see `Inbox::deliver`).
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    pub fn dispatch(
        &self,
        caller: Option<&Arc<Link>>,
        request: &Request<'_>,
        payload: Payload,
        mut responder: Responder,
        cache: &mut HostedCache,
    ) -> Result<Option<BoxFuture<'static, ()>>, (Responder, WireError)> {
        if request.incarnation != self.identity.incarnation {
            let stale = WireError::StaleIncarnation {
                requested: request.incarnation,
                current: self.identity.incarnation,
            };
            return Err((responder, stale));
        }
        let generation = self.services_changed.load(Ordering::Acquire);
        let lookup = || {
            self.services
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(request.actor)
                .cloned()
        };
        // Read before `resolve` borrows the cache; a hint, checked where used.
        let last = cache.taken();
        let service = match cache.resolve(generation, request.actor, lookup) {
            None => {
                let unknown = WireError::UnknownActor {
                    actor: request.actor.to_owned(),
                };
                return Err((responder, unknown));
            }
            Some(Hosted::Actor(inbox)) => {
                let taken = inbox.deliver(last, request.tag, payload, responder)?;
                cache.took(taken);
                return Ok(None);
            }
            Some(Hosted::Service(service)) => service.clone(),
        };
        responder.for_actor("the runtime's service");
        match service.dispatch(caller, request.tag, &payload, request.reply) {
            Err(error) => Err((responder, error)),
            Ok(None) => {
                responder.answer(Ok(Vec::new()));
                Ok(None)
            }
            Ok(Some(answer)) => Ok(Some(Box::pin(async move { responder.answer(answer.await) }))),
        }
    }

    /// A request this process refused before dispatching it. A one-way
    /// message for an actor this process no longer hosts (it is leaving,
    /// or was restarted) was provably not delivered, and its sender cannot
    /// learn of the refusal: it is passed on to another live instance of
    /// the same actor, so that a rolling restart loses no `do_send`.
    pub(crate) fn refused(self: &Arc<Self>, link: &Link, request: &Request<'_>, error: &WireError) {
        let undelivered = matches!(
            error,
            WireError::UnknownActor { .. } | WireError::StaleIncarnation { .. } | WireError::MailboxClosed { .. }
        );
        // Bounded: a peer sending one-way messages to an actor that is
        // nowhere must not make this process hold them all.
        let room = self.forwarding.load(Ordering::Acquire) < MAX_FORWARDING;
        if !request.reply && undelivered && room && connection::takes_slot(request.actor) {
            debug!(peer = %link.peer.path, actor = request.actor, tag = request.tag, %error, "passing a one-way message on");
            self.forward(
                request.actor.to_owned(),
                request.tag.to_owned(),
                request.payload.to_vec(),
            );
            return;
        }
        // Rate-limited per connection: a peer sending millions of bad
        // messages gets a few lines and a count, not millions of lines.
        if link.warn_allowed() {
            warn!(
                peer = %clip(&link.peer.path),
                actor = %clip(request.actor),
                tag = %clip(request.tag),
                error = %clip(&error.to_string()),
                "refused a request"
            );
        }
    }

    /// Sends a one-way message that reached the wrong process to another
    /// instance of its actor, waiting for one up to the resolve timeout.
    fn forward(self: &Arc<Self>, actor: String, tag: String, payload: Vec<u8>) {
        self.forwarding.fetch_add(1, Ordering::AcqRel);
        let node = self.clone();
        actix_rt::spawn(async move {
            let deadline = tokio::time::Instant::now() + node.config.resolve_timeout;
            let own = node.identity.path.clone();
            let sent = tokio::time::timeout_at(deadline, async {
                // Instances that could not take it (stopping too, or gone).
                let mut refused: Vec<(Name, u64)> = Vec::new();
                loop {
                    let elsewhere = node
                        .directory
                        .wait_pick(&actor, Pick::Any, |member| {
                            member.path != own
                                && !refused
                                    .iter()
                                    .any(|(path, inc)| *path == member.path && *inc == member.incarnation)
                        })
                        .await;
                    let queued = match node.link_to(&elsewhere).await {
                        Ok(link) => match link.admit(connection::frame_size(&actor, &tag, payload.len())).await {
                            Ok(admission) => link
                                .request(&actor, &tag, elsewhere.incarnation, &payload, false, Some(admission))
                                .is_ok(),
                            Err(_) => false,
                        },
                        Err(_) => false,
                    };
                    if queued {
                        return;
                    }
                    refused.push((elsewhere.path.clone(), elsewhere.incarnation));
                }
            })
            .await;
            let loud = || {
                node.warnings
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .allow("forwarding")
            };
            if sent.is_err() && loud() {
                warn!(
                    actor = %clip(&actor),
                    tag = %clip(&tag),
                    "dropped a one-way message: no other instance of its actor came up in time"
                );
            }
            if node.forwarding.fetch_sub(1, Ordering::SeqCst) == 1 {
                drain_progress();
            }
        });
    }

    /// The connection to `member`'s process, opened on first use.
    pub async fn link_to(self: &Arc<Self>, member: &Member) -> Result<Arc<Link>, String> {
        let cell = {
            let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
            let existing = match links.get(member.path.as_str()) {
                Some(slot) if slot.incarnation == member.incarnation => match slot.link.get() {
                    Some(link) if !link.is_closed() => return Ok(link.clone()),
                    Some(_closed) => None,
                    None => Some(slot.link.clone()),
                },
                _ => None,
            };
            existing.unwrap_or_else(|| {
                let link = Arc::new(OnceCell::new());
                links.insert(
                    member.path.to_string(),
                    Slot {
                        incarnation: member.incarnation,
                        link: link.clone(),
                    },
                );
                link
            })
        };
        let socket = member
            .socket()
            .ok_or_else(|| format!("{} does not listen", member.path))?;
        let link = cell
            .get_or_try_init(|| {
                let node = self.clone();
                let path = member.path.clone();
                async move {
                    // Connections live on the node's own thread (its actix
                    // arbiter), whichever thread asks.
                    let (done, connected) = tokio::sync::oneshot::channel();
                    let arbiter = node.arbiter.clone();
                    arbiter.spawn(async move {
                        let connecting = async {
                            let stream = transport::connect(&socket)
                                .await
                                .map_err(|e| format!("cannot connect to {path} at {socket}: {e}"))?;
                            connection::establish(node, stream, Side::Caller)
                                .await
                                .map_err(|e| format!("handshake with {path} failed: {e}"))
                        };
                        let _ = done.send(connecting.await);
                    });
                    connected
                        .await
                        .map_err(|_| "the connecting task was dropped".to_owned())?
                }
            })
            .await?;
        if link.is_closed() {
            return Err(format!("connection to {} closed", member.path));
        }
        if self.stopping.load(Ordering::Acquire) {
            link.go_away();
        }
        Ok(link.clone())
    }

    /// The open connection to `member`'s process, if there is one already.
    pub fn open_link(&self, member: &Member) -> Option<Arc<Link>> {
        self.link_for(&member.path, member.incarnation)
    }

    /// [`open_link`](Self::open_link) for a member as the directory holds
    /// it, remembered by this thread for the next call to the same member:
    /// a pointer comparison instead of a lock and a lookup by path. A
    /// member is one incarnation, and its connection is the one it had
    /// until that connection closes, so the remembered one serves while it
    /// is open.
    pub fn open_link_to(&self, member: &Arc<Member>) -> Option<Arc<Link>> {
        let remembered = RECENT_LINKS.with(|recent| {
            let recent = recent.borrow();
            recent
                .slots
                .iter()
                .flatten()
                .find(|(known, _)| std::ptr::eq(known.as_ptr(), Arc::as_ptr(member)))
                .and_then(|(_, link)| link.upgrade())
                .filter(|link| !link.is_closed())
        });
        if remembered.is_some() {
            return remembered;
        }
        let link = self.open_link(member)?;
        RECENT_LINKS.with(|recent| {
            let mut recent = recent.borrow_mut();
            let at = recent.next;
            recent.slots[at] = Some((Arc::downgrade(member), Arc::downgrade(&link)));
            recent.next = (at + 1) % RECENT_LINK_COUNT;
        });
        Some(link)
    }

    /// The open connection to the only instance `pick` gives for `actor`,
    /// and that instance's incarnation, as this thread last found it
    /// ([`remember_sole`](Self::remember_sole)) if the directory is still
    /// in `state` (its [`state`](Directory::state) now): no lock, lookup or
    /// shared count per call.
    pub fn sole_link(&self, state: u64, actor: &'static str, pick: Pick) -> Option<(Arc<Link>, u64)> {
        SOLE_ROUTE.with(|sole| {
            let sole = sole.borrow();
            let sole = sole.as_ref()?;
            // The same name is usually the very same string (`A::NAME`).
            let same_actor = std::ptr::eq(sole.actor, actor) || sole.actor == actor;
            if sole.state != state || sole.pick != pick || !same_actor {
                return None;
            }
            let link = sole.link.upgrade().filter(|link| !link.is_closed())?;
            Some((link, sole.incarnation))
        })
    }

    /// Remembers, for [`sole_link`](Self::sole_link), the connection to
    /// the only instance `pick` gave for `actor` in directory state `state`
    /// (read before the lookup).
    pub fn remember_sole(&self, state: u64, actor: &'static str, pick: Pick, link: &Arc<Link>, incarnation: u64) {
        SOLE_ROUTE.with(|sole| {
            *sole.borrow_mut() = Some(SoleRoute {
                state,
                actor,
                pick,
                link: Arc::downgrade(link),
                incarnation,
            });
        });
    }

    /// Adopts a connection a peer opened, so traffic back to it reuses it.
    pub(crate) fn adopt(&self, link: &Arc<Link>) {
        if link.is_closed() {
            return;
        }
        if self.stopping.load(Ordering::Acquire) {
            link.go_away();
        }
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        // An open connection keeps its place, whatever a newer one claims:
        // a second connection claiming the same path (a duplicate, or an
        // impostor holding the cookie) displaces nothing. The registry
        // installs the connection a process registered through
        // ([`install`](Self::install)).
        let keep = links.get(&link.peer.path).is_some_and(|slot| match slot.link.get() {
            Some(existing) => !existing.is_closed(),
            // Being connected: by us, to that same process.
            None => slot.incarnation == link.peer.incarnation,
        });
        if !keep {
            links.insert(link.peer.path.clone(), Slot::holding(link));
        }
    }

    /// Makes `link` the connection to its peer's path: the registry calls it
    /// for the connection a process registered through.
    pub(crate) fn install(&self, link: &Arc<Link>) {
        if link.is_closed() {
            return;
        }
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let current = links.get(&link.peer.path).and_then(|slot| slot.link.get());
        if !current.is_some_and(|current| Arc::ptr_eq(current, link)) {
            links.insert(link.peer.path.clone(), Slot::holding(link));
        }
    }

    /// Records `link` as the connection this child opened to its master.
    pub(crate) fn set_master_link(&self, link: &Arc<Link>) {
        link.mark_master();
        *self.master_link.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(link);
        self.install(link);
    }

    /// This child's connection to the master (the one it opened).
    pub fn master_link(&self) -> Option<Arc<Link>> {
        let link = self.master_link.lock().unwrap_or_else(|e| e.into_inner()).upgrade()?;
        (!link.is_closed()).then_some(link)
    }

    /// The connection to an already connected peer, by path.
    pub fn link_for(&self, path: &str, incarnation: u64) -> Option<Arc<Link>> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let slot = links.get(path).filter(|slot| slot.incarnation == incarnation)?;
        slot.link.get().filter(|link| !link.is_closed()).cloned()
    }

    /// Makes this node the master's: `hook` learns of every connection that
    /// closes, for the registry.
    pub(crate) fn host_registry(&self, hook: LinkClosedHook) {
        let _ = self.registry_hook.set(hook);
    }

    /// Whether this process hosts the registry (it is the master).
    pub(crate) fn hosts_registry(&self) -> bool {
        self.registry_hook.get().is_some()
    }

    pub(crate) fn link_closed(&self, link: &Arc<Link>) {
        {
            let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
            let same = links
                .get(&link.peer.path)
                .and_then(|slot| slot.link.get())
                .is_some_and(|l| Arc::ptr_eq(l, link));
            if same {
                links.remove(&link.peer.path);
            }
        }
        if let Some(hook) = self.registry_hook.get() {
            hook(Arc::downgrade(link));
        } else if link.is_master() {
            // Only the loss of the connection this process opened counts:
            // another one claiming the master's path stops nothing.
            warn!("lost the connection to the master; stopping");
            self.master_lost.notify_one();
        }
    }
}

/// Connections that may be in their handshake at once. A peer that has not
/// proved the cookie costs a descriptor and a task until its handshake
/// ends (at most the handshake timeout); past this many, the oldest is
/// dropped for the newest, so a flood of idle connections cannot keep a
/// real process (a restarted fork) from getting in.
pub(crate) const MAX_STRANGERS: usize = 64;

/// The connections in their handshake, oldest first.
#[derive(Default)]
struct Strangers {
    next: u64,
    waiting: std::collections::VecDeque<(u64, tokio::task::JoinHandle<()>)>,
}

impl Strangers {
    fn done(&mut self, id: u64) {
        self.waiting.retain(|(waiting, _)| *waiting != id);
    }
}

async fn accept_loop(node: Arc<Node>, listener: Listener) {
    let strangers = Arc::new(Mutex::new(Strangers::default()));
    let throttle = Arc::new(Mutex::new(Throttle::default()));
    let warn_allowed = |throttle: &Mutex<Throttle>| throttle.lock().unwrap_or_else(|e| e.into_inner()).allow("accept");
    loop {
        let stream = match transport::accept(&listener).await {
            Ok(stream) => stream,
            Err(error) => {
                // Out of descriptors (EMFILE/ENFILE) or the like: wait for
                // some to be freed rather than spin; established
                // connections are not affected.
                if warn_allowed(&throttle) {
                    warn!(%error, "accepting a connection failed; retrying in 50 ms");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let node = node.clone();
        let oldest = {
            let mut waiting = strangers.lock().unwrap_or_else(|e| e.into_inner());
            waiting.next += 1;
            let id = waiting.next;
            let strangers = strangers.clone();
            let throttle = throttle.clone();
            // Spawned and listed under the lock: the task (on this thread)
            // cannot finish, and unlist itself, before it is listed.
            let task = actix_rt::spawn(async move {
                let outcome = connection::establish(node.clone(), stream, Side::Listener).await;
                strangers.lock().unwrap_or_else(|e| e.into_inner()).done(id);
                match outcome {
                    Ok(link) => {
                        tracing::debug!(peer = %clip(&link.peer.path), incarnation = link.peer.incarnation, "accepted a connection");
                        node.adopt(&link);
                    }
                    Err(error) if warn_allowed(&throttle) => {
                        warn!(error = %clip(&error.to_string()), "refused a connection")
                    }
                    Err(_) => {}
                }
            });
            waiting.waiting.push_back((id, task));
            (waiting.waiting.len() > MAX_STRANGERS)
                .then(|| waiting.waiting.pop_front())
                .flatten()
        };
        if let Some((_, oldest)) = oldest {
            // Closed before the next accept: the bound holds at every instant.
            oldest.abort();
            let _ = oldest.await;
            if warn_allowed(&throttle) {
                warn!("dropped a connection still in its handshake: {MAX_STRANGERS} newer ones are waiting");
            }
        }
    }
}
