//! The master's registry of live processes, and the directory service every
//! process runs to receive the registry's pushed changes.
//!
//! A process gets the whole membership once, when it subscribes; from then
//! on the registry pushes only what changed ([`Delta`]s, versioned and
//! batched: the changes one turn of the registry made go out in one push).
//! A directory that sees a gap in the versions asks for the whole
//! membership again.
//!
//! May use: the node and the API layer (message declarations).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message};
use bytes::Bytes;
use evilcluster_wire::WireError;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::api::remote::RemoteMessage;
use crate::node::connection::{Link, Outgoing};
use crate::node::directory::{Change, Delta, Directory, Member, Name, Outcome, Snapshot};
use crate::node::service::{check_identity, check_master, decode_payload, encode_reply, Dispatch, Service};
use crate::node::Node;

/// Name of the master's registry actor.
pub(crate) const REGISTRY: &str = "evilcluster.registry";
/// Name of the directory service in every process.
pub(crate) const DIRECTORY: &str = "evilcluster.directory";
const SNAPSHOT_TAG: &str = "directory.snapshot";
const DELTA_TAG: &str = "directory.delta";

/// Receives the registry's pushes into this process's directory.
pub(crate) struct DirectoryService {
    directory: Arc<Directory>,
    /// A fresh snapshot has been asked for and has not arrived yet.
    resyncing: Arc<AtomicBool>,
}

impl DirectoryService {
    pub fn new(directory: Arc<Directory>) -> Self {
        DirectoryService {
            directory,
            resyncing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A delta did not follow on from what this directory holds: asks the
    /// registry for the whole membership again (once at a time).
    fn resync(&self) {
        if self.resyncing.swap(true, Ordering::SeqCst) {
            return;
        }
        let resyncing = self.resyncing.clone();
        let directory = self.directory.clone();
        actix_rt::spawn(async move {
            let fetched = async {
                let node = crate::node::current()?;
                let link = node.master_link()?;
                subscribe(&node, &link).await.ok()
            };
            match fetched.await {
                Some(snapshot) => {
                    debug!(version = snapshot.version, "directory fetched again");
                    directory.apply(snapshot);
                }
                None => warn!("the directory missed changes and could not fetch them again"),
            }
            resyncing.store(false, Ordering::SeqCst);
        });
    }
}

impl Service for DirectoryService {
    fn dispatch(
        &self,
        caller: Option<&Arc<Link>>,
        tag: &str,
        payload: &[u8],
        _reply: bool,
    ) -> Result<Dispatch, WireError> {
        // Only this process's master says who is where.
        check_master(caller)?;
        match tag {
            DELTA_TAG => {
                let delta: Delta = decode_payload(tag, payload)?;
                if self.directory.apply_delta(delta) == Outcome::Gap {
                    debug!(
                        version = self.directory.version(),
                        "the directory missed a change; asking again"
                    );
                    self.resync();
                }
            }
            SNAPSHOT_TAG => {
                let snapshot: Snapshot = decode_payload(tag, payload)?;
                self.directory.apply(snapshot);
                if self.directory.gapped() {
                    self.resync();
                }
            }
            _ => {
                return Err(WireError::UnknownMessage {
                    actor: DIRECTORY.to_owned(),
                    tag: tag.to_owned(),
                })
            }
        }
        Ok(None)
    }
}

/// Subscribes this process's directory to the registry's changes through
/// `link` (the master's connection): returns the whole membership now;
/// the changes after it follow as pushes.
pub(crate) async fn subscribe(node: &Node, link: &Link) -> Result<Snapshot, crate::SendError> {
    use crate::node::rpc::{call, decode, encode};
    let subscribe = Subscribe {
        path: node.identity.path.clone(),
        incarnation: node.identity.incarnation,
    };
    let reply = call(
        link,
        REGISTRY,
        Subscribe::TAG,
        link.peer.incarnation,
        &encode(Subscribe::TAG, &subscribe)?,
        node.config.call_timeout,
    )
    .await?;
    decode(Subscribe::TAG, &reply)
}

/// A process tells the registry it is ready (and what it hosts).
#[derive(Debug, Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub(crate) struct Announce(pub Member);

/// A process asks for the current snapshot and for every later one.
#[derive(Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Snapshot")]
pub(crate) struct Subscribe {
    pub path: String,
    pub incarnation: u64,
}

impl RemoteMessage for Announce {
    const TAG: &'static str = "registry.announce";
}

/// A process is about to stop: callers should stop choosing it.
#[derive(Debug, Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub(crate) struct Leave {
    pub path: String,
    pub incarnation: u64,
}

impl RemoteMessage for Leave {
    const TAG: &'static str = "registry.leave";
}

impl RemoteMessage for Subscribe {
    const TAG: &'static str = "registry.subscribe";
}

/// Registers a member; `owner` is the connection it registered through
/// (`None`: the master itself). Only that connection may unregister it.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Register {
    pub member: Member,
    pub owner: Option<Weak<Link>>,
}

/// A verified [`Leave`], through the connection that registered the member.
#[derive(Message)]
#[rtype(result = "()")]
struct Unregister {
    path: String,
    incarnation: u64,
    owner: Weak<Link>,
}

/// A verified [`Subscribe`]: snapshots go to `link`.
#[derive(Message)]
#[rtype(result = "Snapshot")]
struct Follow {
    incarnation: u64,
    link: Weak<Link>,
}

/// A connection to the master closed: whatever it registered is gone (local only).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct PeerGone {
    pub link: Weak<Link>,
}

/// The master's table of live processes: name → endpoints, pushed to all.
pub(crate) struct Registry {
    node: Weak<Node>,
    members: Vec<Member>,
    /// The connection each registered path came through.
    owners: FxHashMap<Name, Weak<Link>>,
    /// Counts changes: one per change, whether pushed yet or not.
    version: u64,
    /// The version subscribers have been sent (or given in a snapshot).
    pushed: u64,
    /// Changes since `pushed`, to go out in one delta.
    pending: Vec<Change>,
    /// Where deltas go: each subscriber's own connection.
    subscribers: Vec<(Weak<Link>, u64)>,
    /// The master has started the whole tree.
    ready: bool,
}

/// Pushes the changes made so far to every subscriber (local only; sent by
/// the registry to itself, so that it runs after the messages already
/// waiting in its mailbox: a burst of registrations goes out as one delta).
#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Registry {
    pub fn new(node: &Arc<Node>) -> Self {
        // The master's own directory follows the registry change by change,
        // from the empty membership of version 0.
        node.directory.apply(Snapshot::default());
        Registry {
            node: Arc::downgrade(node),
            members: Vec::new(),
            owners: FxHashMap::default(),
            version: 0,
            pushed: 0,
            pending: Vec::new(),
            subscribers: Vec::new(),
            ready: false,
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: self.version,
            members: self.members.clone(),
            ready: self.ready,
        }
    }

    /// Records one change: the master's directory has it at once, the
    /// other processes with the next [`Flush`].
    fn changed(&mut self, change: Change, ctx: &mut Context<Self>) {
        self.version += 1;
        if let Some(node) = self.node.upgrade() {
            node.directory.apply_delta(Delta {
                base: self.version - 1,
                version: self.version,
                changes: vec![change.clone()],
            });
        }
        if self.pending.is_empty() {
            ctx.notify(Flush);
        }
        self.pending.push(change);
    }
}

impl Handler<Flush> for Registry {
    type Result = ();

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) {
        if self.pending.is_empty() {
            return;
        }
        let delta = Delta {
            base: self.pushed,
            version: self.version,
            changes: std::mem::take(&mut self.pending),
        };
        self.pushed = self.version;
        // Encoded once; every subscriber's connection writes it from this
        // one buffer (a burst of joins makes it one entry per member).
        let payload = Bytes::from(rmp_serde::to_vec(&delta).expect("a delta always encodes"));
        self.subscribers.retain(|(link, incarnation)| match link.upgrade() {
            Some(link) => {
                let payload = Outgoing::Shared(payload.clone());
                crate::node::rpc::push(&link, DIRECTORY, DELTA_TAG, *incarnation, payload).is_ok()
            }
            None => false,
        });
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

impl Handler<Register> for Registry {
    type Result = ();

    fn handle(&mut self, Register { member, owner }: Register, ctx: &mut Context<Self>) {
        debug!(path = %member.path, pid = member.pid, actor = ?member.actor(), "registered");
        if let (Some(node), Some(link)) = (self.node.upgrade(), owner.as_ref().and_then(Weak::upgrade)) {
            // Traffic to this path now goes through the connection it
            // registered on, whatever else claimed the path.
            node.install(&link);
        }
        match owner {
            Some(owner) => self.owners.insert(member.path.clone(), owner),
            None => self.owners.remove(member.path.as_str()),
        };
        self.members.retain(|m| m.path != member.path);
        self.members.push(member.clone());
        self.members
            .sort_by(|a, b| (a.hosting.order, a.fork, &a.path).cmp(&(b.hosting.order, b.fork, &b.path)));
        self.changed(Change::Joined(member), ctx);
    }
}

impl Handler<Follow> for Registry {
    type Result = actix::MessageResult<Follow>;

    fn handle(&mut self, follow: Follow, _: &mut Context<Self>) -> Self::Result {
        self.subscribers.retain(|(link, _)| !link.ptr_eq(&follow.link));
        self.subscribers.push((follow.link, follow.incarnation));
        // Everything up to now, pending changes included: the next delta
        // may repeat some of them, which a directory takes (see `Delta`).
        actix::MessageResult(self.snapshot())
    }
}

/// The master has started the whole tree (local only). Pushed with the
/// snapshots, so a process that joins later learns it when it joins, and
/// one that joined before learns it with the next push: none misses it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct MarkReady;

impl Handler<MarkReady> for Registry {
    type Result = ();

    fn handle(&mut self, _: MarkReady, ctx: &mut Context<Self>) {
        if !self.ready {
            self.ready = true;
            self.changed(Change::Ready, ctx);
        }
    }
}

impl Handler<Unregister> for Registry {
    type Result = ();

    fn handle(&mut self, leave: Unregister, ctx: &mut Context<Self>) {
        if !self
            .owners
            .get(leave.path.as_str())
            .is_some_and(|owner| owner.ptr_eq(&leave.owner))
        {
            return;
        }
        let before = self.members.len();
        self.members
            .retain(|m| !(m.path == leave.path && m.incarnation == leave.incarnation));
        if self.members.len() != before {
            self.owners.remove(leave.path.as_str());
            debug!(path = %leave.path, "leaving");
            self.changed(
                Change::Left {
                    path: leave.path.into(),
                    incarnation: leave.incarnation,
                },
                ctx,
            );
        }
    }
}

impl Handler<PeerGone> for Registry {
    type Result = ();

    fn handle(&mut self, gone: PeerGone, ctx: &mut Context<Self>) {
        self.subscribers.retain(|(link, _)| !link.ptr_eq(&gone.link));
        let owners = &mut self.owners;
        let mut left = Vec::new();
        self.members.retain(|m| {
            let registered_by_it = owners
                .get(m.path.as_str())
                .is_some_and(|owner| owner.ptr_eq(&gone.link));
            if registered_by_it {
                owners.remove(m.path.as_str());
                debug!(path = %m.path, "unregistered");
                left.push(Change::Left {
                    path: m.path.clone(),
                    incarnation: m.incarnation,
                });
            }
            !registered_by_it
        });
        for change in left {
            self.changed(change, ctx);
        }
    }
}

/// The registry as other processes reach it: each request is checked
/// against the identity its connection authenticated as before the
/// registry sees it.
pub(crate) struct RegistryService(pub Addr<Registry>);

impl Service for RegistryService {
    fn dispatch(
        &self,
        caller: Option<&Arc<Link>>,
        tag: &str,
        payload: &[u8],
        _reply: bool,
    ) -> Result<Dispatch, WireError> {
        let Some(caller) = caller else {
            return Err(WireError::UnknownActor {
                actor: REGISTRY.to_owned(),
            });
        };
        let owner = Arc::downgrade(caller);
        let registry = self.0.clone();
        let stopped = || WireError::Stopped {
            actor: REGISTRY.to_owned(),
        };
        match tag {
            Announce::TAG => {
                let Announce(member) = decode_payload(tag, payload)?;
                check_identity(Some(caller), &member.path, Some(member.incarnation))?;
                Ok(Some(Box::pin(async move {
                    registry
                        .send(Register {
                            member,
                            owner: Some(owner),
                        })
                        .await
                        .map_err(|_| stopped())?;
                    encode_reply(Announce::TAG, &())
                })))
            }
            Leave::TAG => {
                let leave: Leave = decode_payload(tag, payload)?;
                check_identity(Some(caller), &leave.path, Some(leave.incarnation))?;
                Ok(Some(Box::pin(async move {
                    registry
                        .send(Unregister {
                            path: leave.path,
                            incarnation: leave.incarnation,
                            owner,
                        })
                        .await
                        .map_err(|_| stopped())?;
                    encode_reply(Leave::TAG, &())
                })))
            }
            Subscribe::TAG => {
                let subscribe: Subscribe = decode_payload(tag, payload)?;
                check_identity(Some(caller), &subscribe.path, Some(subscribe.incarnation))?;
                Ok(Some(Box::pin(async move {
                    let snapshot = registry
                        .send(Follow {
                            incarnation: subscribe.incarnation,
                            link: owner,
                        })
                        .await
                        .map_err(|_| stopped())?;
                    encode_reply(Subscribe::TAG, &snapshot)
                })))
            }
            _ => Err(WireError::UnknownMessage {
                actor: REGISTRY.to_owned(),
                tag: tag.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::directory::{Change, Delta};

    fn fork(number: u32) -> Member {
        crate::node::directory::test_fork(number)
    }

    fn push(service: &DirectoryService, tag: &str, body: &impl Serialize) {
        let payload = rmp_serde::to_vec(body).unwrap();
        assert!(service.dispatch(None, tag, &payload, false).unwrap().is_none());
    }

    /// A delta after a gap makes the directory service ask for a fresh
    /// snapshot (here there is no master to ask: the attempt ends, and the
    /// next snapshot pushed fills the gap).
    #[test]
    fn a_gap_in_pushed_deltas_asks_for_a_snapshot_and_a_snapshot_fills_it() {
        actix_rt::System::new().block_on(async {
            let directory = Arc::new(Directory::new());
            let service = DirectoryService::new(directory.clone());
            push(
                &service,
                SNAPSHOT_TAG,
                &Snapshot {
                    version: 1,
                    members: vec![fork(1)],
                    ready: false,
                },
            );
            // 2 → 3 arrives, 1 → 2 never did.
            push(
                &service,
                DELTA_TAG,
                &Delta {
                    base: 2,
                    version: 3,
                    changes: vec![Change::Joined(fork(3))],
                },
            );
            assert!(directory.gapped());
            assert!(
                service.resyncing.load(Ordering::SeqCst),
                "a fresh snapshot was asked for"
            );
            // The attempt ends (no master in this test) and may be made again.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while service.resyncing.load(Ordering::SeqCst) {
                assert!(std::time::Instant::now() < deadline, "the resync attempt never ended");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert_eq!(directory.version(), 1);
            // The snapshot at 2, then the delta kept aside.
            push(
                &service,
                SNAPSHOT_TAG,
                &Snapshot {
                    version: 2,
                    members: vec![fork(1), fork(2)],
                    ready: false,
                },
            );
            assert!(!directory.gapped());
            assert_eq!(directory.version(), 3);
            let forks: Vec<_> = directory.members().iter().map(|m| m.fork).collect();
            assert_eq!(forks, [Some(1), Some(2), Some(3)]);
        });
    }
}
