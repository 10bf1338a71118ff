//! Who is on the other hosts: each master's heartbeats carry its host's
//! members; every process keeps the other hosts' from them, and forgets a
//! host whose heartbeats stop for the host timeout (NATS's request/reply
//! and subjects are the mechanism; there is no gossip and no consensus:
//! each host speaks only for itself).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Mesh;
use crate::node::directory::Member;
use crate::node::Node;
use crate::Error;

/// One host's heartbeat.
#[derive(Debug, Serialize, Deserialize)]
struct Beat {
    /// The host's node name.
    node: String,
    /// Its master's incarnation: a restarted host is a new one.
    host: u64,
    /// The host is stopping: forget it now.
    leaving: bool,
    /// Its live processes (the master's directory).
    members: Vec<Member>,
}

/// Another host, as the last heartbeat described it.
pub(crate) struct Host {
    pub node: String,
    last: Instant,
    pub members: Vec<Arc<Member>>,
    /// Cancelled when the host is gone: calls in flight to it end at once.
    pub lost: CancellationToken,
}

/// The other hosts of the cluster, as this process sees them.
pub(crate) struct View {
    hosts: RwLock<FxHashMap<u64, Host>>,
    version: watch::Sender<u64>,
    /// Round robin over the other hosts' instances.
    pub(crate) next: AtomicUsize,
    /// Hosts sharing this host's node name already warned about.
    warned: AtomicU64,
    /// How long calls in flight to a host that left cleanly may still end
    /// with their reply.
    grace: Duration,
}

impl View {
    pub fn new(grace: Duration) -> Self {
        View {
            grace,
            hosts: RwLock::new(FxHashMap::default()),
            version: watch::Sender::new(0),
            next: AtomicUsize::new(0),
            warned: AtomicU64::new(0),
        }
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Sees every change of the view.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Runs `f` over the other hosts.
    pub fn with_hosts<T>(&self, f: impl FnOnce(&FxHashMap<u64, Host>) -> T) -> T {
        f(&self.hosts.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The other hosts' node names.
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.with_hosts(|hosts| hosts.values().map(|h| h.node.clone()).collect());
        nodes.sort();
        nodes
    }

    /// Applies a heartbeat: `Some((node, members, up))` when a host came or went.
    fn apply(&self, beat: Beat) -> Option<(String, Vec<Member>, bool)> {
        let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
        if beat.leaving {
            let gone = hosts.remove(&beat.host)?;
            // No new calls go there; those in flight get the host's stop
            // (it answers what it accepted) before they end as lost.
            let lost = gone.lost.clone();
            let grace = self.grace;
            actix_rt::spawn(async move {
                tokio::time::sleep(grace).await;
                lost.cancel();
            });
            drop(hosts);
            info!(node = %gone.node, "host left the cluster");
            self.changed();
            return Some((
                gone.node,
                gone.members.iter().map(|m| Member::clone(m)).collect(),
                false,
            ));
        }
        let members: Vec<Arc<Member>> = beat.members.into_iter().map(Arc::new).collect();
        match hosts.get_mut(&beat.host) {
            Some(host) => {
                host.last = Instant::now();
                if host.members != members {
                    host.members = members;
                    drop(hosts);
                    self.changed();
                }
                None
            }
            None => {
                info!(node = %beat.node, "host joined the cluster");
                let joined = (
                    beat.node.clone(),
                    members.iter().map(|m| Member::clone(m)).collect(),
                    true,
                );
                hosts.insert(
                    beat.host,
                    Host {
                        node: beat.node,
                        last: Instant::now(),
                        members,
                        lost: CancellationToken::new(),
                    },
                );
                drop(hosts);
                self.changed();
                Some(joined)
            }
        }
    }

    /// Forgets hosts silent for longer than `timeout`.
    fn expire(&self, timeout: Duration) -> Vec<(String, Vec<Member>)> {
        let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
        let silent: Vec<u64> = hosts
            .iter()
            .filter(|(_, h)| h.last.elapsed() > timeout)
            .map(|(id, _)| *id)
            .collect();
        let mut gone = Vec::new();
        for id in silent {
            if let Some(host) = hosts.remove(&id) {
                host.lost.cancel();
                warn!(node = %host.node, "host lost: no heartbeat for {timeout:?}");
                gone.push((host.node, host.members.iter().map(|m| Member::clone(m)).collect()));
            }
        }
        drop(hosts);
        if !gone.is_empty() {
            self.changed();
        }
        gone
    }

    /// Counts every host as just heard from (after this process's own
    /// connection to NATS came back: their silence was ours).
    fn refresh(&self) {
        let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
        for host in hosts.values_mut() {
            host.last = Instant::now();
        }
    }
}

/// Every process: follows the other hosts' heartbeats. The master: also
/// publishes its own host's.
pub(super) async fn start(mesh: &Arc<Mesh>, node: &Arc<Node>, master: bool) -> Result<(), Error> {
    let subject = format!("{}.hb", mesh.base);
    let mut beats = super::Subscription::subscribe(mesh, subject.clone()).await?;
    let own_host = node.identity.incarnation;
    {
        let mesh = mesh.clone();
        actix_rt::spawn(async move {
            while let Some(message) = beats.next().await {
                let Ok(beat) = rmp_serde::from_slice::<Beat>(&message.payload) else {
                    continue;
                };
                if beat.node == mesh.node_name {
                    if master
                        && beat.host != own_host
                        && mesh.view.warned.swap(beat.host, Ordering::Relaxed) != beat.host
                    {
                        warn!(node = %beat.node, "another host uses this host's node name; ignoring it (give each host its own EVILCLUSTER_NODE)");
                    }
                    continue;
                }
                if let Some((node, members, up)) = mesh.view.apply(beat) {
                    (mesh.hooks.members)(&node, &members, up, if up { "node joined" } else { "node left" });
                }
            }
        });
    }
    {
        // The failure detector: a host silent for the host timeout is gone,
        // unless the silence is this process's own (disconnected from NATS).
        let mesh = mesh.clone();
        actix_rt::spawn(async move {
            let timeout = mesh.options.host_timeout;
            let mut tick = tokio::time::interval((mesh.options.heartbeat / 2).max(Duration::from_millis(20)));
            let mut was_connected = true;
            loop {
                tick.tick().await;
                let connected = mesh.connected();
                if connected && !was_connected {
                    mesh.view.refresh();
                }
                was_connected = connected;
                if connected {
                    for (node, members) in mesh.view.expire(timeout) {
                        (mesh.hooks.members)(&node, &members, false, "node lost");
                    }
                }
            }
        });
    }
    if master {
        let mesh = mesh.clone();
        let node = node.clone();
        actix_rt::spawn(async move {
            let mut changes = node.directory.changes();
            let mut tick = tokio::time::interval(mesh.options.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !mesh.leaving.load(Ordering::Acquire) {
                let beat = Beat {
                    node: mesh.node_name.clone(),
                    host: own_host,
                    leaving: false,
                    members: node.directory.members(),
                };
                if let Ok(bytes) = rmp_serde::to_vec(&beat) {
                    let _ = mesh.client.publish(subject.clone(), bytes.into()).await;
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = changes.changed() => {}
                }
            }
        });
    }
    *OWN_HOST.write().unwrap_or_else(|e| e.into_inner()) = Some(own_host);
    Ok(())
}

static OWN_HOST: RwLock<Option<u64>> = RwLock::new(None);

/// The master, as it stops: tells the other hosts at once.
pub(super) async fn leave(mesh: &Mesh) {
    let Some(host) = *OWN_HOST.read().unwrap_or_else(|e| e.into_inner()) else {
        return;
    };
    let beat = Beat {
        node: mesh.node_name.clone(),
        host,
        leaving: true,
        members: Vec::new(),
    };
    if let Ok(bytes) = rmp_serde::to_vec(&beat) {
        let _ = mesh.client.publish(format!("{}.hb", mesh.base), bytes.into()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), mesh.client.flush()).await;
    }
}

/// The other hosts' members, by node name (empty without NATS).
pub(crate) fn remote_members() -> Vec<(String, Vec<Member>)> {
    let Some(mesh) = super::mesh() else {
        return Vec::new();
    };
    let mut hosts = mesh.view.with_hosts(|hosts| {
        hosts
            .values()
            .map(|h| (h.node.clone(), h.members.iter().map(|m| Member::clone(m)).collect()))
            .collect::<Vec<_>>()
    });
    hosts.sort_by(|a, b| a.0.cmp(&b.0));
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;
    use evilcluster_wire::control::RoleKind;

    fn member(path: &str, incarnation: u64) -> Member {
        Member {
            path: path.into(),
            role: RoleKind::Spawn,
            fork: None,
            incarnation,
            ..crate::node::directory::test_fork(1)
        }
    }

    fn beat(host: u64, leaving: bool, members: Vec<Member>) -> Beat {
        Beat {
            node: format!("n{host}"),
            host,
            leaving,
            members,
        }
    }

    #[test]
    fn a_host_joins_changes_and_is_forgotten_after_its_silence() {
        let view = View::new(Duration::from_secs(1));
        let (node, members, up) = view.apply(beat(1, false, vec![member("app/w", 7)])).expect("joined");
        assert_eq!((node.as_str(), members.len(), up), ("n1", 1, true));
        // Same members again: no news.
        assert!(view.apply(beat(1, false, vec![member("app/w", 7)])).is_none());
        assert_eq!(view.nodes(), ["n1"]);
        let lost = view.with_hosts(|hosts| hosts[&1].lost.clone());
        assert!(view.expire(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(20));
        let gone = view.expire(Duration::from_millis(10));
        assert_eq!(gone.len(), 1);
        assert!(lost.is_cancelled(), "calls in flight to a lost host end at once");
        assert!(view.nodes().is_empty());
    }

    #[test]
    fn a_refreshed_view_forgets_nobody() {
        let view = View::new(Duration::from_secs(1));
        view.apply(beat(2, false, vec![]));
        std::thread::sleep(Duration::from_millis(20));
        view.refresh();
        assert!(view.expire(Duration::from_millis(15)).is_empty());
    }
}
