//! The master's control service for tools (`evilcluster ps`, `tree`,
//! `stop`), and the files through which tools find a cluster by name.

use std::sync::{Arc, Weak};
use std::time::Duration;

use evilcluster_wire::control::{
    ProcessState, ProcessStatus, RoleKind, Status, CONTROL, RESTART_TAG, STATUS_TAG, STOP_TAG,
};
use evilcluster_wire::WireError;
use futures_util::future::join_all;
use tokio::sync::Notify;

use crate::node::connection::Link;
use crate::node::directory::Member;
use crate::node::rpc::{call, decode, encode};
use crate::node::service::{decode_payload, encode_reply, Dispatch, Service};
use crate::node::stats::{ProcessStats, STATS, STATS_TAG};
use crate::node::Node;
use crate::observe::tree::Declared;
use crate::supervision::supervisor::Restarter;
use crate::Error;

/// The restart count of every path, as the master last heard it from a
/// supervisor: what `ps` shows for a process that is down.
static LAST_RESTARTS: std::sync::Mutex<Option<rustc_hash::FxHashMap<String, u32>>> = std::sync::Mutex::new(None);

fn last_restarts(path: &str) -> u32 {
    let counts = LAST_RESTARTS.lock().unwrap_or_else(|e| e.into_inner());
    counts.as_ref().and_then(|c| c.get(path).copied()).unwrap_or(0)
}

/// In the master: keeps [`LAST_RESTARTS`] up to date from the lifecycle events.
pub(crate) async fn track_restarts() {
    use futures_util::StreamExt;
    let mut events = crate::api::lifecycle::lifecycle();
    while let Some(delivery) = events.next().await {
        if let crate::Lifecycle::Restarting { path, restarts, .. } = delivery.event {
            let mut counts = LAST_RESTARTS.lock().unwrap_or_else(|e| e.into_inner());
            counts.get_or_insert_with(Default::default).insert(path, restarts);
        }
    }
}

/// How long the status waits for one process's counters.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct ControlService {
    pub node: Weak<Node>,
    pub cluster: String,
    pub declared: Vec<Declared>,
    pub stop: Arc<Notify>,
    /// The master's supervisor, for restarts of spawns without forks.
    pub restarter: Restarter,
}

/// The service a spawn with forks hosts: rolling restarts of its forks.
pub(crate) const SUPERVISOR: &str = "evilcluster.supervisor";

pub(crate) struct SupervisorService(pub Restarter);

impl Service for SupervisorService {
    fn dispatch(
        &self,
        _caller: Option<&Arc<Link>>,
        tag: &str,
        _payload: &[u8],
        _reply: bool,
    ) -> Result<Dispatch, WireError> {
        if tag != RESTART_TAG {
            return Err(WireError::UnknownMessage {
                actor: SUPERVISOR.to_owned(),
                tag: tag.to_owned(),
            });
        }
        let restarter = self.0.clone();
        Ok(Some(Box::pin(async move {
            encode_reply(RESTART_TAG, &restarter.restart(None).await)
        })))
    }
}

/// Restarts worker `worker` one process at a time; how many were restarted.
async fn restart(
    node: &Arc<Node>,
    cluster: &str,
    declared: &[Declared],
    restarter: &Restarter,
    worker: &str,
) -> Result<u32, String> {
    let found = declared
        .iter()
        .find(|d| d.name == worker)
        .ok_or_else(|| format!("no worker named `{worker}` is declared"))?;
    if found.disabled {
        return Err(format!("worker `{worker}` is disabled"));
    }
    let path = format!("{cluster}/{worker}");
    if found.forks == 0 {
        return restarter.restart(Some(path)).await;
    }
    // Its forks are the spawn's to restart.
    let spawn = node
        .directory
        .members()
        .into_iter()
        .find(|m| m.path == path)
        .ok_or_else(|| format!("{path} is not running"))?;
    let link = node
        .link_for(&spawn.path, spawn.incarnation)
        .ok_or_else(|| format!("no connection to {path}"))?;
    let budget = (node.config.start_timeout + node.config.shutdown_timeout) * (found.forks + 1);
    let reply = call(&link, SUPERVISOR, RESTART_TAG, spawn.incarnation, &[0xc0], budget)
        .await
        .map_err(|e| e.to_string())?;
    decode::<Result<u32, String>>(RESTART_TAG, &reply).map_err(|e| e.to_string())?
}

/// Restarts the processes of worker `worker` one at a time, each ready again
/// before the next one stops — pm2's `reload`: with forks, the worker keeps
/// serving throughout. Returns how many processes were restarted. Callable
/// from any process of a running cluster.
pub async fn restart_worker(worker: &str) -> Result<u32, Error> {
    let node = crate::node::current().ok_or(crate::SendError::NotInCluster)?;
    let payload = encode(RESTART_TAG, &worker)?;
    let failed = |reason: String| Error::RestartFailed {
        worker: worker.to_owned(),
        reason,
    };
    let reply = if node.hosts_registry() {
        let control = node
            .service(CONTROL)
            .ok_or_else(|| failed("the cluster is not started".into()))?;
        let pending = control
            .dispatch(None, RESTART_TAG, &payload, true)
            .map_err(|e| failed(e.to_string()))?
            .ok_or_else(|| failed("no reply".into()))?;
        pending.await.map_err(|e| failed(e.to_string()))?
    } else {
        let master = node
            .master_link()
            .ok_or_else(|| failed("not connected to the master".into()))?;
        // A generous bound: every fork of the largest worker stopping and starting.
        let budget = (node.config.start_timeout + node.config.shutdown_timeout) * 64;
        call(&master, CONTROL, RESTART_TAG, master.peer.incarnation, &payload, budget)
            .await?
            .to_vec()
    };
    let outcome: Result<u32, String> = decode(RESTART_TAG, &reply)?;
    outcome.map_err(failed)
}

impl Service for ControlService {
    fn dispatch(
        &self,
        _caller: Option<&Arc<Link>>,
        tag: &str,
        payload: &[u8],
        _reply: bool,
    ) -> Result<Dispatch, WireError> {
        match tag {
            STATUS_TAG => {
                let node = self.node.upgrade().ok_or_else(|| WireError::MailboxClosed {
                    actor: CONTROL.to_owned(),
                })?;
                let (cluster, declared) = (self.cluster.clone(), self.declared.clone());
                let tag = tag.to_owned();
                Ok(Some(Box::pin(async move {
                    encode_reply(&tag, &status(&node, cluster, &declared).await)
                })))
            }
            RESTART_TAG => {
                let worker: String = decode_payload(tag, payload)?;
                let node = self.node.upgrade().ok_or_else(|| WireError::MailboxClosed {
                    actor: CONTROL.to_owned(),
                })?;
                let (cluster, declared, restarter) =
                    (self.cluster.clone(), self.declared.clone(), self.restarter.clone());
                Ok(Some(Box::pin(async move {
                    tracing::info!(%worker, "rolling restart requested");
                    let outcome = restart(&node, &cluster, &declared, &restarter, &worker).await;
                    match &outcome {
                        Ok(count) => tracing::info!(%worker, count, "rolling restart done"),
                        Err(reason) => tracing::warn!(%worker, "rolling restart failed: {reason}"),
                    }
                    encode_reply(RESTART_TAG, &outcome)
                })))
            }
            STOP_TAG => {
                tracing::info!("stop requested by a control client");
                self.stop.notify_one();
                Ok(Some(Box::pin(std::future::ready(encode_reply(tag, &())))))
            }
            _ => Err(WireError::UnknownMessage {
                actor: CONTROL.to_owned(),
                tag: tag.to_owned(),
            }),
        }
    }
}

/// The live tree: declared processes in tree order, with each live one's counters.
async fn status(node: &Arc<Node>, cluster: String, declared: &[Declared]) -> Status {
    let members = node.directory.members();
    let rows = rows(&cluster, declared, &members);
    let counters = join_all(rows.iter().map(|row| async move {
        match (row.member, row.role) {
            (Some(_), RoleKind::Master) => Some(node.stats.snapshot()),
            (Some(member), _) => fetch(node, member).await,
            (None, _) => None,
        }
    }))
    .await;
    #[allow(unused_mut)]
    let mut processes: Vec<ProcessStatus> = rows.into_iter().zip(counters).map(|(row, c)| row.status(c)).collect();
    #[cfg(feature = "nats")]
    processes.extend(other_hosts());
    Status { cluster, processes }
}

/// The other hosts' processes (when the cluster spans hosts through NATS),
/// each host's tree below its master, with paths `node:path`: as their
/// last heartbeats described them (no counters: those stay on each host).
#[cfg(feature = "nats")]
fn other_hosts() -> Vec<ProcessStatus> {
    let mut processes = Vec::new();
    for (node, mut members) in crate::nats::remote_members() {
        members.sort_by_key(|m| (m.role != RoleKind::Master, m.hosting.order, m.fork));
        for member in members {
            let hosts = member.role != RoleKind::Master;
            processes.push(ProcessStatus {
                path: format!("{node}:{}", member.path),
                role: member.role,
                state: ProcessState::Up,
                pid: Some(member.pid),
                actor: member.actor().filter(|_| hosts).map(str::to_owned),
                actor_type: member
                    .hosting
                    .actor_type
                    .as_deref()
                    .filter(|_| hosts)
                    .map(str::to_owned),
                uptime_ms: None,
                restarts: member.restarts,
                messages_in: 0,
                messages_out: 0,
                errors: 0,
                rss_bytes: None,
                pss_bytes: None,
                latency_us: Vec::new(),
            });
        }
    }
    processes
}

/// The declared processes as the directory knows them, without counters:
/// what the master's logged tree shows.
pub(crate) fn declared_status(cluster: &str, declared: &[Declared], members: &[Member]) -> Status {
    Status {
        cluster: cluster.to_owned(),
        processes: rows(cluster, declared, members)
            .into_iter()
            .map(|row| row.status(None))
            .collect(),
    }
}

/// The master, then each worker followed by its forks.
fn rows<'a>(cluster: &str, declared: &[Declared], members: &'a [Member]) -> Vec<Row<'a>> {
    let find = |path: &str| members.iter().find(|m| m.path == path);
    let mut rows = vec![Row {
        path: cluster.to_owned(),
        role: RoleKind::Master,
        member: find(cluster),
        disabled: false,
        hosts: None,
    }];
    for worker in declared {
        let path = format!("{cluster}/{}", worker.name);
        // A spawn with forks hosts nothing itself; each fork hosts the actor.
        let hosts = worker.actor.zip(worker.type_name);
        rows.push(Row {
            path: path.clone(),
            role: RoleKind::Spawn,
            member: find(&path),
            disabled: worker.disabled,
            hosts: hosts.filter(|_| worker.forks == 0),
        });
        if !worker.disabled {
            for number in 1..=worker.forks {
                let fork = format!("{path}/{number}");
                rows.push(Row {
                    member: find(&fork),
                    path: fork,
                    role: RoleKind::Fork,
                    disabled: false,
                    hosts,
                });
            }
        }
    }
    rows
}

/// One declared process, in tree order.
struct Row<'a> {
    path: String,
    role: RoleKind,
    member: Option<&'a Member>,
    disabled: bool,
    /// The actor it hosts (or would host): `NAME` and Rust type.
    hosts: Option<(&'static str, &'static str)>,
}

impl Row<'_> {
    fn status(self, counters: Option<ProcessStats>) -> ProcessStatus {
        let counters = counters.unwrap_or_default();
        let up = self.member.is_some();
        let restarts = match self.member {
            Some(member) => member.restarts,
            // Down (waiting for its restart, or for good): the last count seen.
            None => last_restarts(&self.path),
        };
        ProcessStatus {
            path: self.path,
            role: self.role,
            state: match (self.disabled, up) {
                (true, _) => ProcessState::Disabled,
                (false, true) => ProcessState::Up,
                (false, false) => ProcessState::Down,
            },
            pid: self.member.map(|m| m.pid),
            actor: self.hosts.map(|(name, _)| name.to_owned()),
            actor_type: self.hosts.map(|(_, type_name)| type_name.to_owned()),
            uptime_ms: up.then_some(counters.uptime_ms),
            restarts,
            messages_in: counters.messages_in,
            messages_out: counters.messages_out,
            errors: counters.errors,
            rss_bytes: counters.rss_bytes,
            pss_bytes: counters.pss_bytes,
            latency_us: counters.latency_us,
        }
    }
}

/// One live process's counters, over its connection with the master.
async fn fetch(node: &Arc<Node>, member: &Member) -> Option<ProcessStats> {
    let link = match &member.hosting.socket_dir {
        Some(_) => node.link_to(member).await.ok()?,
        // It hosts nothing, so it does not listen: use the connection it opened to us.
        None => node.link_for(&member.path, member.incarnation)?,
    };
    let reply = call(&link, STATS, STATS_TAG, member.incarnation, &[0xc0], STATS_TIMEOUT)
        .await
        .ok()?;
    rmp_serde::from_slice(&reply).ok()
}

/// Answers [`STATS_TAG`] with this process's [`ProcessStats`].
pub(crate) struct StatsService(pub std::sync::Weak<crate::node::Node>);

impl Service for StatsService {
    fn dispatch(
        &self,
        _caller: Option<&std::sync::Arc<crate::node::connection::Link>>,
        tag: &str,
        _payload: &[u8],
        _reply: bool,
    ) -> Result<Dispatch, WireError> {
        if tag != STATS_TAG {
            return Err(WireError::UnknownMessage {
                actor: STATS.to_owned(),
                tag: tag.to_owned(),
            });
        }
        let stats = self.0.upgrade().map(|node| node.stats.snapshot()).unwrap_or_default();
        Ok(Some(Box::pin(std::future::ready(encode_reply(tag, &stats)))))
    }
}

/// Renders the declared tree with the live members:
///
/// ```text
/// myapp (master, pid 100)
/// ├── webserverApi (spawn, pid 101)
/// │   ├── 1 (fork, pid 104) WebserverApi up
/// │   └── 2 (fork, pid 105) WebserverApi up
/// └── backgroundTaskManager (spawn, pid 103) up
/// ```
///
/// The same text as `evilcluster tree` prints: both render with
/// [`evilcluster_wire::control::render_tree`].
pub(crate) fn render(cluster: &str, workers: &[Declared], members: &[Member]) -> String {
    evilcluster_wire::control::render_tree(&declared_status(cluster, workers, members))
}
