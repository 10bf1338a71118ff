use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use evilcluster_wire::control::RoleKind;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One live process of the cluster, as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its path in the tree, e.g. `myapp/webserverApi/2`.
    pub path: String,
    /// What it is in the tree.
    pub role: RoleKind,
    /// The worker's name (the cluster's name for the master).
    pub worker: String,
    /// Declaration index of the worker (0 for the master), for ordering the tree.
    pub order: u32,
    /// The fork number, for a fork.
    pub fork: Option<u32>,
    /// Operating-system process id.
    pub pid: u32,
    /// Which start of this path the process is.
    pub incarnation: u64,
    /// The remote actor it hosts, by `RemoteActor::NAME`.
    pub actor: Option<String>,
    /// The Rust type of that actor, for display.
    pub actor_type: Option<String>,
    /// The local socket it listens on, when it hosts something.
    pub socket: Option<String>,
    /// How many times its supervisor restarted this path before this process.
    #[serde(default)]
    pub restarts: u32,
    /// The TCP address its worker's processes share ([`Worker::listen`](crate::Worker::listen)).
    #[serde(default)]
    pub listen: Option<String>,
}

/// The registry's state, as pushed to every process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub version: u64,
    pub members: Vec<Member>,
    /// The master has started the whole tree (it stays true from then on).
    #[serde(default)]
    pub ready: bool,
}

/// A snapshot indexed for lookups on the message path. Members sit behind
/// `Arc`s so that a lookup clones a pointer, not six strings.
struct Indexed {
    version: u64,
    ready: bool,
    members: Vec<Arc<Member>>,
    by_actor: FxHashMap<String, ActorEntry>,
}

struct ActorEntry {
    /// Indexes into `snapshot.members`, forks in number order.
    hosts: Vec<usize>,
    next: AtomicUsize,
}

impl Indexed {
    fn new(snapshot: Snapshot) -> Self {
        let members: Vec<Arc<Member>> = snapshot.members.into_iter().map(Arc::new).collect();
        let mut by_actor: FxHashMap<String, ActorEntry> = FxHashMap::default();
        for (index, member) in members.iter().enumerate() {
            if let (Some(actor), Some(_)) = (&member.actor, &member.socket) {
                by_actor
                    .entry(actor.clone())
                    .or_insert_with(|| ActorEntry {
                        hosts: Vec::new(),
                        next: AtomicUsize::new(0),
                    })
                    .hosts
                    .push(index);
            }
        }
        for entry in by_actor.values_mut() {
            entry.hosts.sort_by_key(|&i| members[i].fork);
        }
        Indexed {
            version: snapshot.version,
            ready: snapshot.ready,
            members,
            by_actor,
        }
    }
}

/// Which instance of an actor a send goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pick {
    /// The next live instance, round robin.
    Any,
    /// One fork, by number.
    Fork(u32),
}

/// This process's local view of the registry: lookups never leave the process.
pub(crate) struct Directory {
    current: RwLock<Arc<Indexed>>,
    version: watch::Sender<u64>,
}

impl Directory {
    pub fn new() -> Self {
        Directory {
            current: RwLock::new(Arc::new(Indexed::new(Snapshot::default()))),
            version: watch::Sender::new(0),
        }
    }

    /// Applies a pushed snapshot unless a newer one is already here (pushes
    /// and replies can cross on the wire).
    pub fn apply(&self, snapshot: Snapshot) -> bool {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if snapshot.version <= current.version && current.version != 0 {
            return false;
        }
        let version = snapshot.version;
        *current = Arc::new(Indexed::new(snapshot));
        drop(current);
        self.version.send_replace(version);
        true
    }

    /// Sees every change of the directory (its version).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Whether the master has started the whole tree.
    pub fn is_ready(&self) -> bool {
        self.read().ready
    }

    /// Waits until the master has started the whole tree.
    pub async fn wait_ready(&self) {
        let mut changes = self.version.subscribe();
        loop {
            changes.mark_unchanged();
            if self.is_ready() {
                return;
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    pub fn members(&self) -> Vec<Member> {
        self.read().members.iter().map(|m| Member::clone(m)).collect()
    }

    fn read(&self) -> Arc<Indexed> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The instance of `actor` to send to now, if one is registered.
    pub fn pick(&self, actor: &str, pick: Pick) -> Option<Arc<Member>> {
        self.pick_where(actor, pick, |_| true)
    }

    /// Like [`pick`](Self::pick), skipping instances that `accept` turns
    /// down (one that just refused a request, say).
    pub fn pick_where(&self, actor: &str, pick: Pick, accept: impl Fn(&Member) -> bool) -> Option<Arc<Member>> {
        let current = self.read();
        let entry = current.by_actor.get(actor)?;
        let index = match pick {
            Pick::Any => {
                let turn = entry.next.fetch_add(1, Ordering::Relaxed);
                let count = entry.hosts.len();
                (0..count)
                    .map(|step| entry.hosts[(turn + step) % count])
                    .find(|&i| accept(&current.members[i]))?
            }
            Pick::Fork(number) => *entry
                .hosts
                .iter()
                .find(|&&i| current.members[i].fork == Some(number) && accept(&current.members[i]))?,
        };
        Some(current.members[index].clone())
    }

    /// Waits until an instance of `actor` that `accept` takes is registered.
    /// The caller bounds the wait with its deadline.
    pub async fn wait_pick(&self, actor: &str, pick: Pick, accept: impl Fn(&Member) -> bool) -> Arc<Member> {
        let mut changes = self.version.subscribe();
        loop {
            changes.mark_unchanged();
            if let Some(found) = self.pick_where(actor, pick, &accept) {
                return found;
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until `condition` holds for the members, or `timeout` passes.
    pub async fn wait_for(&self, timeout: Duration, mut condition: impl FnMut(&[Arc<Member>]) -> bool) -> bool {
        let mut changes = self.version.subscribe();
        let wait = async {
            loop {
                if condition(&self.read().members) {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// Every declared worker and its fork count, as every process knows them:
/// those of the cluster started last in this process (a later cluster
/// replaces an earlier one's, never mixes with it).
static DECLARED: RwLock<Option<Declared>> = RwLock::new(None);

/// Worker names and their fork counts.
type Declared = Arc<Vec<(String, u32)>>;

pub(crate) fn declare(workers: impl IntoIterator<Item = (String, u32)>) {
    *DECLARED.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(workers.into_iter().collect()));
}

fn declared() -> Option<Declared> {
    DECLARED.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Whether the running cluster's workers are known here.
pub(crate) fn declared_any() -> bool {
    declared().is_some()
}

/// How many forks the worker named `worker` declares, if it is declared.
pub(crate) fn declared_forks(worker: &str) -> Option<u32> {
    let declared = declared()?;
    declared
        .iter()
        .find(|(name, _)| name == worker)
        .map(|(_, forks)| *forks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fork(number: u32) -> Member {
        Member {
            path: format!("app/w/{number}"),
            role: RoleKind::Fork,
            worker: "w".into(),
            order: 1,
            fork: Some(number),
            pid: 100 + number,
            incarnation: 1,
            actor: Some("w".into()),
            actor_type: None,
            socket: Some(format!("/tmp/{number}.sock")),
            restarts: 0,
            listen: None,
        }
    }

    #[test]
    fn round_robin_visits_every_fork_in_turn() {
        let directory = Directory::new();
        directory.apply(Snapshot {
            version: 1,
            members: vec![fork(2), fork(1), fork(3)],
            ready: false,
        });
        let picked: Vec<_> = (0..6)
            .map(|_| directory.pick("w", Pick::Any).unwrap().fork.unwrap())
            .collect();
        assert_eq!(picked, [1, 2, 3, 1, 2, 3]);
        assert_eq!(directory.pick("w", Pick::Fork(3)).unwrap().fork, Some(3));
        assert!(directory.pick("w", Pick::Fork(4)).is_none());
        assert!(directory.pick("other", Pick::Any).is_none());
    }

    #[test]
    fn older_snapshots_are_ignored() {
        let directory = Directory::new();
        assert!(directory.apply(Snapshot {
            version: 5,
            members: vec![fork(1)],
            ready: false,
        }));
        assert!(!directory.apply(Snapshot {
            version: 4,
            members: vec![],
            ready: false,
        }));
        assert_eq!(directory.members().len(), 1);
    }
}
