//! The master's registry of live processes, and the directory service every
//! process runs to receive the registry's pushed snapshots.

use std::sync::{Arc, Weak};

use actix::{Actor, Context, Handler, Message};
use evilcluster_wire::WireError;
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::directory::{Directory, Member, Snapshot};
use crate::node::Node;
use crate::remote::{decode_payload, Dispatch, RemoteActor, RemoteMessage, Routes, Service};

/// Name of the master's registry actor.
pub(crate) const REGISTRY: &str = "evilcluster.registry";
/// Name of the directory service in every process.
pub(crate) const DIRECTORY: &str = "evilcluster.directory";
const SNAPSHOT_TAG: &str = "directory.snapshot";

/// Receives the registry's snapshots.
pub(crate) struct DirectoryService(pub Arc<Directory>);

impl Service for DirectoryService {
    fn dispatch(&self, tag: &str, payload: &[u8], _reply: bool) -> Result<Dispatch, WireError> {
        if tag != SNAPSHOT_TAG {
            return Err(WireError::UnknownMessage {
                actor: DIRECTORY.to_owned(),
                tag: tag.to_owned(),
            });
        }
        let snapshot: Snapshot = decode_payload(tag, payload)?;
        self.0.apply(snapshot);
        Ok(None)
    }
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

/// A process's connection to the master closed: it is gone (local only).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct PeerGone {
    pub path: String,
    pub incarnation: u64,
}

/// The master's table of live processes: name → endpoints, pushed to all.
pub(crate) struct Registry {
    node: Weak<Node>,
    members: Vec<Member>,
    version: u64,
    subscribers: Vec<(String, u64)>,
    /// The master has started the whole tree.
    ready: bool,
}

impl Registry {
    pub fn new(node: &Arc<Node>) -> Self {
        Registry {
            node: Arc::downgrade(node),
            members: Vec::new(),
            version: 0,
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

    fn changed(&mut self) {
        self.version += 1;
        let Some(node) = self.node.upgrade() else { return };
        let snapshot = self.snapshot();
        let payload = rmp_serde::to_vec(&snapshot).expect("a snapshot always encodes");
        node.directory.apply(snapshot);
        self.subscribers
            .retain(|(path, incarnation)| match node.link_for(path, *incarnation) {
                Some(link) => link
                    .request(DIRECTORY, SNAPSHOT_TAG, *incarnation, &payload, false, None)
                    .is_ok(),
                None => false,
            });
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

impl RemoteActor for Registry {
    const NAME: &'static str = REGISTRY;

    fn routes(routes: &mut Routes<Self>) {
        routes.handle::<Announce>().handle::<Subscribe>().handle::<Leave>();
    }
}

impl Handler<Announce> for Registry {
    type Result = ();

    fn handle(&mut self, Announce(member): Announce, _: &mut Context<Self>) {
        debug!(path = %member.path, pid = member.pid, actor = ?member.actor, "registered");
        self.members.retain(|m| m.path != member.path);
        self.members.push(member);
        self.members
            .sort_by(|a, b| (a.order, a.fork, &a.path).cmp(&(b.order, b.fork, &b.path)));
        self.changed();
    }
}

impl Handler<Subscribe> for Registry {
    type Result = actix::MessageResult<Subscribe>;

    fn handle(&mut self, subscribe: Subscribe, _: &mut Context<Self>) -> Self::Result {
        self.subscribers.retain(|(path, _)| *path != subscribe.path);
        self.subscribers.push((subscribe.path, subscribe.incarnation));
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

    fn handle(&mut self, _: MarkReady, _: &mut Context<Self>) {
        if !self.ready {
            self.ready = true;
            self.changed();
        }
    }
}

impl Handler<Leave> for Registry {
    type Result = ();

    fn handle(&mut self, leave: Leave, _: &mut Context<Self>) {
        let before = self.members.len();
        self.members
            .retain(|m| !(m.path == leave.path && m.incarnation == leave.incarnation));
        if self.members.len() != before {
            debug!(path = %leave.path, "leaving");
            self.changed();
        }
    }
}

impl Handler<PeerGone> for Registry {
    type Result = ();

    fn handle(&mut self, gone: PeerGone, _: &mut Context<Self>) {
        self.subscribers
            .retain(|(path, incarnation)| !(*path == gone.path && *incarnation == gone.incarnation));
        let before = self.members.len();
        self.members
            .retain(|m| !(m.path == gone.path && m.incarnation == gone.incarnation));
        if self.members.len() != before {
            debug!(path = %gone.path, "unregistered");
            self.changed();
        }
    }
}
