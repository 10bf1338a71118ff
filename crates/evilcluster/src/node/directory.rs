use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use evilcluster_wire::control::RoleKind;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::node::name::Interner;
pub use crate::node::name::Name;

/// One live process of the cluster, as the registry knows it.
///
/// Every process holds one of these for every process of the cluster, so
/// it is kept small: what a process runs and where it is reached
/// ([`Hosting`]) is the same for every fork of a worker, and they share one
/// copy; names clone by pointer ([`Name`]); the socket is derived from the
/// incarnation ([`Member::socket`]) rather than stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its path in the tree, e.g. `myapp/webserverApi/2`.
    #[serde(deserialize_with = "Name::deserialize_unshared")]
    pub path: Name,
    /// What it is in the tree.
    pub role: RoleKind,
    /// The fork number, for a fork.
    pub fork: Option<u32>,
    /// Operating-system process id.
    pub pid: u32,
    /// Which start of this path the process is.
    pub incarnation: u64,
    /// How many times its supervisor restarted this path before this process.
    pub restarts: u32,
    /// What it runs and where it is reached: shared with the other
    /// processes of its worker that run the same.
    #[serde(serialize_with = "Hosting::serialize_shared")]
    #[serde(deserialize_with = "Hosting::deserialize_shared")]
    pub hosting: Arc<Hosting>,
}

/// What a process runs and where it is reached: the same for every fork of
/// a worker, so one copy serves them all in every process
/// ([`Hosting::shared`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hosting {
    /// The worker's name (the cluster's name for the master).
    pub worker: Name,
    /// Declaration index of the worker (0 for the master), for ordering the tree.
    pub order: u32,
    /// The remote actor it hosts, by `RemoteActor::NAME`.
    pub actor: Option<Name>,
    /// The Rust type of that actor, for display.
    pub actor_type: Option<Name>,
    /// The directory of the local socket it listens on, when it hosts
    /// something (the cluster's socket directory): see [`Member::socket`].
    pub socket_dir: Option<Name>,
    /// The TCP address its worker's processes share ([`Worker::listen`](crate::Worker::listen)).
    #[serde(default)]
    pub listen: Option<Name>,
}

/// What the members this process knows of run, one copy of each.
static HOSTINGS: Interner<Hosting> = Interner::new();

impl Hosting {
    /// The one copy of this that the process shares among the members
    /// that have it (made if there is none).
    pub fn shared(self) -> Arc<Hosting> {
        HOSTINGS.intern(self)
    }

    fn serialize_shared<S: serde::Serializer>(hosting: &Arc<Hosting>, serializer: S) -> Result<S::Ok, S::Error> {
        Hosting::serialize(hosting, serializer)
    }

    fn deserialize_shared<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Arc<Hosting>, D::Error> {
        Hosting::deserialize(deserializer).map(Hosting::shared)
    }
}

impl Member {
    /// The local socket it listens on, when it hosts something: named by
    /// its incarnation in [`Hosting::socket_dir`].
    pub fn socket(&self) -> Option<String> {
        let dir = self.hosting.socket_dir.as_ref()?;
        Some(
            socket_path(Path::new(dir.as_str()), self.incarnation)
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// The worker's name (the cluster's name for the master).
    pub fn worker(&self) -> &str {
        &self.hosting.worker
    }

    /// The remote actor it hosts, by `RemoteActor::NAME`.
    pub fn actor(&self) -> Option<&str> {
        self.hosting.actor.as_deref()
    }
}

/// The socket a process of `incarnation` listens on, in the cluster's
/// socket directory `dir`. Named by incarnation (random), not pid: a pid is
/// reused, and a killed process leaves its socket file behind.
pub(crate) fn socket_path(dir: &Path, incarnation: u64) -> PathBuf {
    dir.join(format!("{incarnation:016x}.sock"))
}

/// The registry's state, as sent to a process when it subscribes (and
/// again if it ever misses a [`Delta`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub version: u64,
    #[serde(with = "hostings_once::members")]
    pub members: Vec<Member>,
    /// The master has started the whole tree (it stays true from then on).
    #[serde(default)]
    pub ready: bool,
}

/// One change of the registry's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// A process registered (or registered again: it replaces whatever had its path).
    Joined(Member),
    /// The process at `path` with `incarnation` left (a no-op for any other incarnation).
    Left { path: Name, incarnation: u64 },
    /// The master has started the whole tree.
    Ready,
}

/// The changes that took the registry from version `base` to `version`,
/// pushed to every process instead of the whole membership.
///
/// Each change is an upsert by path, a removal of one incarnation, or the
/// ready flag, so applying a batch again over a state that already holds a
/// prefix of it gives the same result: a directory at any version from
/// `base` to `version` may apply it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Delta {
    pub base: u64,
    pub version: u64,
    #[serde(with = "hostings_once::changes")]
    pub changes: Vec<Change>,
}

/// On the wire, the members of one snapshot or delta send what they run
/// once: the distinct [`Hosting`]s first, then each member with the index
/// of its own. The forks of a worker share one, so a snapshot of N forks
/// is about N paths and numbers, not N copies of the names and socket
/// directory: the master writes one to every process, and every process
/// reads one.
mod hostings_once {
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize)]
    struct RowOut<'a> {
        path: &'a str,
        role: RoleKind,
        fork: Option<u32>,
        pid: u32,
        incarnation: u64,
        restarts: u32,
        hosting: u32,
    }

    #[derive(Deserialize)]
    struct RowIn {
        #[serde(deserialize_with = "Name::deserialize_unshared")]
        path: Name,
        role: RoleKind,
        fork: Option<u32>,
        pid: u32,
        incarnation: u64,
        restarts: u32,
        hosting: u32,
    }

    #[derive(Serialize)]
    enum ChangeOut<'a> {
        Joined(RowOut<'a>),
        Left { path: &'a str, incarnation: u64 },
        Ready,
    }

    #[derive(Deserialize)]
    enum ChangeIn {
        Joined(RowIn),
        Left {
            #[serde(deserialize_with = "Name::deserialize_unshared")]
            path: Name,
            incarnation: u64,
        },
        Ready,
    }

    /// The distinct hostings of one message, in order of first use.
    #[derive(Default)]
    struct Table<'a> {
        hostings: Vec<&'a Hosting>,
        index: FxHashMap<*const Hosting, u32>,
    }

    impl<'a> Table<'a> {
        fn row(&mut self, member: &'a Member) -> RowOut<'a> {
            let hostings = &mut self.hostings;
            let hosting = *self.index.entry(Arc::as_ptr(&member.hosting)).or_insert_with(|| {
                hostings.push(&member.hosting);
                (hostings.len() - 1) as u32
            });
            RowOut {
                path: &member.path,
                role: member.role,
                fork: member.fork,
                pid: member.pid,
                incarnation: member.incarnation,
                restarts: member.restarts,
                hosting,
            }
        }
    }

    fn member<E: serde::de::Error>(row: RowIn, hostings: &[Arc<Hosting>]) -> Result<Member, E> {
        let hosting = hostings
            .get(row.hosting as usize)
            .ok_or_else(|| E::custom(format!("no hosting {} in the message", row.hosting)))?;
        Ok(Member {
            path: row.path,
            role: row.role,
            fork: row.fork,
            pid: row.pid,
            incarnation: row.incarnation,
            restarts: row.restarts,
            hosting: hosting.clone(),
        })
    }

    fn shared(hostings: Vec<Hosting>) -> Vec<Arc<Hosting>> {
        hostings.into_iter().map(Hosting::shared).collect()
    }

    pub mod members {
        use super::*;

        pub fn serialize<S: Serializer>(members: &[Member], serializer: S) -> Result<S::Ok, S::Error> {
            let mut table = Table::default();
            let rows: Vec<RowOut<'_>> = members.iter().map(|m| table.row(m)).collect();
            (table.hostings, rows).serialize(serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Member>, D::Error> {
            let (hostings, rows): (Vec<Hosting>, Vec<RowIn>) = Deserialize::deserialize(deserializer)?;
            let hostings = shared(hostings);
            rows.into_iter().map(|row| member(row, &hostings)).collect()
        }
    }

    pub mod changes {
        use super::*;

        pub fn serialize<S: Serializer>(changes: &[Change], serializer: S) -> Result<S::Ok, S::Error> {
            let mut table = Table::default();
            let rows: Vec<ChangeOut<'_>> = changes
                .iter()
                .map(|change| match change {
                    Change::Joined(m) => ChangeOut::Joined(table.row(m)),
                    Change::Left { path, incarnation } => ChangeOut::Left {
                        path,
                        incarnation: *incarnation,
                    },
                    Change::Ready => ChangeOut::Ready,
                })
                .collect();
            (table.hostings, rows).serialize(serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Change>, D::Error> {
            let (hostings, rows): (Vec<Hosting>, Vec<ChangeIn>) = Deserialize::deserialize(deserializer)?;
            let hostings = shared(hostings);
            rows.into_iter()
                .map(|row| {
                    Ok(match row {
                        ChangeIn::Joined(row) => Change::Joined(member(row, &hostings)?),
                        ChangeIn::Left { path, incarnation } => Change::Left { path, incarnation },
                        ChangeIn::Ready => Change::Ready,
                    })
                })
                .collect()
        }
    }
}

/// What [`Directory::apply_delta`] did with a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Applied: the directory is at the delta's version.
    Applied,
    /// Older than what the directory has: ignored.
    Stale,
    /// Changes between the directory's version and the delta's base are
    /// missing: kept aside; the caller should ask the registry for a fresh
    /// snapshot, which fills the gap.
    Gap,
    /// No snapshot has arrived yet (the subscription's reply and the first
    /// pushes can cross): kept aside until it does.
    Kept,
}

/// At most this many deltas wait for a gap to be filled.
const MAX_AHEAD: usize = 64;

/// The members' order in the tree: the registry's and every directory's.
fn tree_order(member: &Member) -> (u32, Option<u32>, &str) {
    (member.hosting.order, member.fork, &member.path)
}

/// The local view, indexed for lookups on the message path and changed in
/// place by deltas. Members sit behind `Arc`s so that a lookup clones a
/// pointer, not a member.
#[derive(Default)]
struct Indexed {
    version: u64,
    /// A snapshot has arrived (deltas mean nothing before one).
    loaded: bool,
    ready: bool,
    /// In tree order.
    members: Vec<Arc<Member>>,
    by_actor: FxHashMap<Name, ActorEntry>,
    /// Deltas that arrived ahead of a gap, until a snapshot fills it.
    ahead: Vec<Delta>,
}

struct ActorEntry {
    /// The live instances that listen, forks in number order.
    hosts: Vec<Arc<Member>>,
    next: AtomicUsize,
}

impl Indexed {
    fn load(&mut self, snapshot: Snapshot) {
        let mut members: Vec<Arc<Member>> = snapshot.members.into_iter().map(Arc::new).collect();
        members.sort_by(|a, b| tree_order(a).cmp(&tree_order(b)));
        let mut by_actor: FxHashMap<Name, ActorEntry> = FxHashMap::default();
        for member in &members {
            if let (Some(actor), Some(_)) = (&member.hosting.actor, &member.hosting.socket_dir) {
                by_actor
                    .entry(actor.clone())
                    .or_insert_with(|| ActorEntry {
                        hosts: Vec::new(),
                        next: AtomicUsize::new(0),
                    })
                    .hosts
                    .push(member.clone());
            }
        }
        for entry in by_actor.values_mut() {
            entry.hosts.sort_by_key(|m| m.fork);
        }
        self.version = snapshot.version;
        self.loaded = true;
        self.ready = snapshot.ready;
        self.members = members;
        self.by_actor = by_actor;
    }

    fn change(&mut self, change: Change) {
        match change {
            Change::Ready => self.ready = true,
            Change::Joined(member) => {
                let member = Arc::new(member);
                // A path always has the same place in the tree: whatever had
                // it sits where the new one goes (no scan of the members).
                let at = self.members.partition_point(|m| tree_order(m) < tree_order(&member));
                if self.members.get(at).is_some_and(|m| m.path == member.path) {
                    self.remove_at(at);
                } else {
                    self.remove(|m| m.path == member.path);
                }
                let at = self.members.partition_point(|m| tree_order(m) < tree_order(&member));
                self.members.insert(at, member.clone());
                if let (Some(actor), Some(_)) = (&member.hosting.actor, &member.hosting.socket_dir) {
                    let hosts = &mut self
                        .by_actor
                        .entry(actor.clone())
                        .or_insert_with(|| ActorEntry {
                            hosts: Vec::new(),
                            next: AtomicUsize::new(0),
                        })
                        .hosts;
                    let at = hosts.partition_point(|m| m.fork <= member.fork);
                    hosts.insert(at, member);
                }
            }
            Change::Left { path, incarnation } => self.remove(|m| m.path == path && m.incarnation == incarnation),
        }
    }

    fn remove(&mut self, matches: impl Fn(&Member) -> bool) {
        if let Some(at) = self.members.iter().position(|m| matches(m)) {
            self.remove_at(at);
        }
    }

    fn remove_at(&mut self, at: usize) {
        let gone = self.members.remove(at);
        if let Some(actor) = &gone.hosting.actor {
            if let Some(entry) = self.by_actor.get_mut(actor) {
                entry.hosts.retain(|m| !Arc::ptr_eq(m, &gone));
                if entry.hosts.is_empty() {
                    self.by_actor.remove(actor);
                }
            }
        }
    }

    /// Applies `delta` if it follows on from this version (see [`Delta`]).
    fn delta(&mut self, delta: Delta) -> Outcome {
        if self.loaded && delta.version <= self.version {
            return Outcome::Stale;
        }
        if !self.loaded || delta.base > self.version {
            self.ahead.retain(|d| d.version != delta.version);
            if self.ahead.len() >= MAX_AHEAD {
                // The snapshot this waits for fills the gap anyway.
                self.ahead.remove(0);
            }
            self.ahead.push(delta);
            return if self.loaded { Outcome::Gap } else { Outcome::Kept };
        }
        self.version = delta.version;
        for change in delta.changes {
            self.change(change);
        }
        Outcome::Applied
    }

    /// After a snapshot: applies the deltas kept aside that now follow on
    /// (those still ahead of a gap stay aside).
    fn catch_up(&mut self) {
        let mut ahead = std::mem::take(&mut self.ahead);
        ahead.sort_by_key(|d| d.base);
        for delta in ahead {
            self.delta(delta);
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
    current: RwLock<Indexed>,
    version: watch::Sender<u64>,
    /// Changes with every change of this directory, to a number no other
    /// state of any directory in this process had (see [`state`](Self::state)).
    state: AtomicU64,
}

/// Where directory states are numbered from: one count for every directory
/// of the process, so that a number names one state of one directory.
static STATES: AtomicU64 = AtomicU64::new(1);

impl Directory {
    pub fn new() -> Self {
        Directory {
            current: RwLock::new(Indexed::default()),
            version: watch::Sender::new(0),
            state: AtomicU64::new(STATES.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// A number for the directory's current state: read before a lookup,
    /// it is another number once anything the lookup saw has changed
    /// (and never that of another directory), so an answer remembered with
    /// it holds while it stays the same.
    pub fn state(&self) -> u64 {
        self.state.load(Ordering::Acquire)
    }

    /// Marks a change (after it is made, so a number read before a lookup
    /// is never newer than what the lookup saw).
    fn changed(&self) {
        self.state
            .store(STATES.fetch_add(1, Ordering::Relaxed), Ordering::Release);
    }

    /// Applies a snapshot unless a newer state is already here (pushes and
    /// replies can cross on the wire), then any deltas kept aside that
    /// follow on from it. Returns whether it was applied.
    pub fn apply(&self, snapshot: Snapshot) -> bool {
        let mut current = self.write();
        if current.loaded && snapshot.version <= current.version && current.version != 0 {
            return false;
        }
        current.load(snapshot);
        current.catch_up();
        let version = current.version;
        drop(current);
        self.changed();
        self.version.send_replace(version);
        true
    }

    /// Applies a pushed delta (see [`Outcome`]).
    pub fn apply_delta(&self, delta: Delta) -> Outcome {
        let mut current = self.write();
        let applied = current.delta(delta);
        let version = current.version;
        drop(current);
        // Kept aside or ignored, a delta changes no pick.
        if applied == Outcome::Applied {
            self.changed();
            self.version.send_replace(version);
        }
        applied
    }

    /// Whether deltas are kept aside for a gap no snapshot has filled:
    /// the registry should be asked for a fresh one.
    pub fn gapped(&self) -> bool {
        let current = self.read();
        current.loaded && !current.ahead.is_empty()
    }

    /// The version of the registry's state this directory holds.
    pub fn version(&self) -> u64 {
        self.read().version
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

    /// A copy of every member, in tree order.
    pub fn members(&self) -> Vec<Member> {
        self.read().members.iter().map(|m| Member::clone(m)).collect()
    }

    /// Runs `f` over the members, in tree order, without copying them.
    pub fn with_members<T>(&self, f: impl FnOnce(&[Arc<Member>]) -> T) -> T {
        f(&self.read().members)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Indexed> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Indexed> {
        self.current.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The instance of `actor` to send to now, if one is registered.
    #[cfg(test)]
    pub fn pick(&self, actor: &str, pick: Pick) -> Option<Arc<Member>> {
        self.pick_noting_sole(actor, pick).map(|(member, _)| member)
    }

    /// The instance of `actor` to send to now, if one is registered, and
    /// whether it is the only one `pick` could give (so that every pick
    /// gives it until the directory changes).
    pub fn pick_noting_sole(&self, actor: &str, pick: Pick) -> Option<(Arc<Member>, bool)> {
        self.pick_counted(actor, pick, |_| true)
            .map(|(member, count)| (member, count == 1))
    }

    /// Like [`pick_noting_sole`](Self::pick_noting_sole), skipping
    /// instances that `accept` turns down (one that just refused a
    /// request, say).
    pub fn pick_where(&self, actor: &str, pick: Pick, accept: impl Fn(&Member) -> bool) -> Option<Arc<Member>> {
        self.pick_counted(actor, pick, accept).map(|(member, _)| member)
    }

    /// The first instance `accept` takes among those `pick` may give, in
    /// the order to try them (round robin for any instance), and how many
    /// `pick` chose from.
    fn pick_counted(&self, actor: &str, pick: Pick, accept: impl Fn(&Member) -> bool) -> Option<(Arc<Member>, usize)> {
        let current = self.read();
        let entry = current.by_actor.get(actor)?;
        let hosts = &entry.hosts;
        let (candidates, first) = match pick {
            Pick::Any => (&hosts[..], entry.next.fetch_add(1, Ordering::Relaxed)),
            // Forks in number order: the ones asked for are found by halving.
            Pick::Fork(number) => {
                let from = hosts.partition_point(|m| m.fork < Some(number));
                let to = hosts.partition_point(|m| m.fork <= Some(number));
                (&hosts[from..to], 0)
            }
        };
        let count = candidates.len();
        (0..count)
            .map(|step| &candidates[(first + step) % count])
            .find(|m| accept(m))
            .map(|member| (member.clone(), count))
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

/// Fork `number` of worker `w` in app `app`, for the tests of the
/// directory and of the registry that feeds it.
#[cfg(test)]
pub(crate) fn test_fork(number: u32) -> Member {
    Member {
        path: format!("app/w/{number}").into(),
        role: RoleKind::Fork,
        fork: Some(number),
        pid: 100 + number,
        incarnation: 1,
        restarts: 0,
        hosting: Hosting {
            worker: "w".into(),
            order: 1,
            actor: Some("w".into()),
            actor_type: None,
            socket_dir: Some("/tmp".into()),
            listen: None,
        }
        .shared(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fork(number: u32) -> Member {
        test_fork(number)
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

    /// A pick is sole when no other instance could be given; the state
    /// number moves with every change, never back to one seen before.
    #[test]
    fn sole_picks_and_state_numbers() {
        let directory = Directory::new();
        let empty = directory.state();
        assert!(directory.pick_noting_sole("w", Pick::Any).is_none());
        directory.apply(Snapshot {
            version: 1,
            members: vec![fork(1)],
            ready: false,
        });
        let one = directory.state();
        assert_ne!(one, empty);
        assert_eq!(
            directory
                .pick_noting_sole("w", Pick::Any)
                .map(|(m, sole)| (m.fork, sole)),
            Some((Some(1), true))
        );
        directory.apply(Snapshot {
            version: 2,
            members: vec![fork(1), fork(2)],
            ready: false,
        });
        let two = directory.state();
        assert!(two != one && two != empty);
        assert!(
            !directory.pick_noting_sole("w", Pick::Any).unwrap().1,
            "round robin over two"
        );
        assert_eq!(
            directory
                .pick_noting_sole("w", Pick::Fork(2))
                .map(|(m, sole)| (m.fork, sole)),
            Some((Some(2), true))
        );
        // Another directory never shares a number with this one.
        assert!(![empty, one, two].contains(&Directory::new().state()));
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

    fn delta(base: u64, changes: Vec<Change>) -> Delta {
        Delta {
            base,
            version: base + changes.len() as u64,
            changes,
        }
    }

    fn view(directory: &Directory) -> (u64, bool, Vec<Member>, Vec<Option<u32>>) {
        let current = directory.read();
        let hosts = current
            .by_actor
            .get("w")
            .map(|e| e.hosts.iter().map(|m| m.fork).collect())
            .unwrap_or_default();
        (current.version, current.ready, directory.members(), hosts)
    }

    /// A history of joins, leaves, restarts (a path registered again with a
    /// new incarnation) and the ready flag, one change per version.
    fn history() -> Vec<Change> {
        let mut restarted = fork(2);
        restarted.incarnation = 2;
        restarted.pid = 999;
        vec![
            Change::Joined(fork(3)),
            Change::Joined(fork(1)),
            Change::Joined(fork(2)),
            Change::Left {
                path: "app/w/1".into(),
                incarnation: 1,
            },
            Change::Joined(restarted),
            // An old incarnation leaving changes nothing.
            Change::Left {
                path: "app/w/2".into(),
                incarnation: 1,
            },
            Change::Ready,
            Change::Joined(fork(4)),
        ]
    }

    /// The registry's own bookkeeping: the membership after `changes`.
    fn snapshot_after(changes: &[Change]) -> Snapshot {
        let mut members: Vec<Member> = Vec::new();
        let mut ready = false;
        for change in changes {
            match change {
                Change::Joined(m) => {
                    members.retain(|x| x.path != m.path);
                    members.push(m.clone());
                }
                Change::Left { path, incarnation } => {
                    members.retain(|x| !(x.path == *path && x.incarnation == *incarnation))
                }
                Change::Ready => ready = true,
            }
        }
        members.sort_by(|a, b| tree_order(a).cmp(&tree_order(b)));
        Snapshot {
            version: changes.len() as u64,
            members,
            ready,
        }
    }

    #[test]
    fn a_stream_of_deltas_gives_the_same_directory_as_a_snapshot() {
        let history = history();
        let by_deltas = Directory::new();
        by_deltas.apply(Snapshot::default());
        for (version, change) in history.iter().enumerate() {
            assert_eq!(
                by_deltas.apply_delta(delta(version as u64, vec![change.clone()])),
                Outcome::Applied
            );
        }
        let by_snapshot = Directory::new();
        by_snapshot.apply(snapshot_after(&history));
        assert_eq!(view(&by_deltas), view(&by_snapshot));
        assert_eq!(view(&by_deltas).3, [Some(2), Some(3), Some(4)]);
        assert_eq!(by_deltas.pick("w", Pick::Fork(2)).unwrap().incarnation, 2);

        // Batched the way the registry pushes them, from every starting point.
        for split in 0..history.len() {
            let batched = Directory::new();
            batched.apply(snapshot_after(&history[..split]));
            // The batch starts earlier than the snapshot: it repeats changes.
            let from = split / 2;
            assert_eq!(
                batched.apply_delta(delta(from as u64, history[from..].to_vec())),
                Outcome::Applied
            );
            assert_eq!(
                view(&batched),
                view(&by_snapshot),
                "snapshot at {split}, batch from {from}"
            );
        }
    }

    #[test]
    fn a_gap_in_versions_is_reported_and_a_snapshot_fills_it() {
        let history = history();
        let directory = Directory::new();
        directory.apply(snapshot_after(&history[..2]));
        // Version 3 is lost: 3→4 cannot apply.
        assert_eq!(directory.apply_delta(delta(3, vec![history[3].clone()])), Outcome::Gap);
        assert!(directory.gapped());
        assert_eq!(directory.version(), 2);
        // Stale pushes are ignored.
        assert_eq!(
            directory.apply_delta(delta(0, vec![history[0].clone()])),
            Outcome::Stale
        );
        // The fresh snapshot the directory asks for (at 3), then what was kept aside (3→4).
        assert!(directory.apply(snapshot_after(&history[..3])));
        assert!(!directory.gapped());
        assert_eq!(directory.version(), 4);
        let expected = Directory::new();
        expected.apply(snapshot_after(&history[..4]));
        assert_eq!(view(&directory), view(&expected));
    }

    #[test]
    fn deltas_before_the_first_snapshot_wait_for_it() {
        let history = history();
        let directory = Directory::new();
        // The subscription's reply (at 5) arrives after the pushes 4→6 and 6→8.
        assert_eq!(directory.apply_delta(delta(4, history[4..6].to_vec())), Outcome::Kept);
        assert_eq!(directory.apply_delta(delta(6, history[6..].to_vec())), Outcome::Kept);
        assert!(!directory.gapped());
        assert!(directory.apply(snapshot_after(&history[..5])));
        assert!(!directory.gapped());
        let expected = Directory::new();
        expected.apply(snapshot_after(&history));
        assert_eq!(view(&directory), view(&expected));
    }

    /// Members decoded from the registry's pushes share what they run and
    /// its names; workers that come and go (a host joining and leaving
    /// through NATS brings workers of its own) leave nothing behind.
    #[test]
    fn members_share_what_they_run_and_leave_nothing_behind() {
        let directory = Directory::new();
        directory.apply(Snapshot::default());
        let mut version = 0;
        let mut push = |changes: Vec<Change>| {
            // As received: encoded by the registry, decoded here.
            let delta = Delta {
                base: version,
                version: version + 1,
                changes,
            };
            version += 1;
            let received: Delta = rmp_serde::from_slice(&rmp_serde::to_vec(&delta).unwrap()).unwrap();
            assert_eq!(directory.apply_delta(received), Outcome::Applied);
        };
        let mut most = 0;
        for cycle in 0..200u64 {
            let forks: Vec<Member> = (1..=20)
                .map(|number| {
                    let mut member = fork(number);
                    member.incarnation = cycle;
                    let mut hosting = Hosting::clone(&member.hosting);
                    hosting.worker = format!("w{cycle}").into();
                    member.hosting = Arc::new(hosting);
                    member
                })
                .collect();
            push(forks.iter().cloned().map(Change::Joined).collect());
            let members = directory.members();
            assert_eq!(members.len(), 20);
            assert!(
                members.iter().all(|m| Arc::ptr_eq(&m.hosting, &members[0].hosting)),
                "one copy of what the forks run"
            );
            assert_eq!(members[0].worker(), format!("w{cycle}"));
            most = most.max(HOSTINGS.len());
            push(
                forks
                    .iter()
                    .map(|m| Change::Left {
                        path: m.path.clone(),
                        incarnation: cycle,
                    })
                    .collect(),
            );
            assert!(directory.members().is_empty());
        }
        // Swept once the table doubles (other tests intern a few of their
        // own meanwhile): far below one per cycle.
        assert!(most < 100, "{most} held at most");
    }

    /// A snapshot and a delta come back as they were sent, and what the
    /// members run is on the wire once per message, not once per member.
    #[test]
    fn what_members_run_is_sent_once_per_message() {
        let mut forks: Vec<Member> = (1..=100).map(fork).collect();
        let mut master = fork(0);
        master.hosting = Hosting {
            worker: "app".into(),
            order: 0,
            actor: None,
            actor_type: None,
            socket_dir: None,
            listen: None,
        }
        .shared();
        forks.push(master);
        let snapshot = Snapshot {
            version: 7,
            members: forks.clone(),
            ready: true,
        };
        let sent = rmp_serde::to_vec(&snapshot).unwrap();
        let received: Snapshot = rmp_serde::from_slice(&sent).unwrap();
        assert_eq!(received.members, forks);
        assert!(Arc::ptr_eq(&received.members[0].hosting, &received.members[99].hosting));
        let one_by_one: usize = forks.iter().map(|m| rmp_serde::to_vec(m).unwrap().len()).sum();
        assert!(
            sent.len() * 3 < one_by_one * 2,
            "{} bytes, against {one_by_one} for the members one by one",
            sent.len()
        );

        let mut changes: Vec<Change> = forks.iter().cloned().map(Change::Joined).collect();
        changes.insert(3, Change::Ready);
        changes.push(Change::Left {
            path: "app/w/1".into(),
            incarnation: 1,
        });
        let delta = Delta {
            base: 1,
            version: 2,
            changes,
        };
        let received: Delta = rmp_serde::from_slice(&rmp_serde::to_vec(&delta).unwrap()).unwrap();
        assert_eq!(received.changes, delta.changes);

        // A member pointing past the table is refused, not guessed at.
        let row = |hosting: u32| {
            let hostings = vec![Hosting::clone(&forks[0].hosting)];
            let rows = vec![("app/w/1", RoleKind::Fork, Some(1u32), 1u32, 1u64, 0u32, hosting)];
            rmp_serde::to_vec(&(7u64, (hostings, rows), false)).unwrap()
        };
        assert!(rmp_serde::from_slice::<Snapshot>(&row(0)).is_ok());
        let error = rmp_serde::from_slice::<Snapshot>(&row(1)).unwrap_err();
        assert!(error.to_string().contains("no hosting 1"), "{error}");
    }
}
