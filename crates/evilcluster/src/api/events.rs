//! Typed publish/subscribe across the cluster, with the original's four
//! routes: everyone, the master, a worker (its spawn and every fork), one fork.
//!
//! A published event goes to the master, which fans it out over the
//! connections it holds to every process. One sender's events therefore reach
//! each receiver in the order they were published.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use evilcluster_wire::WireError;
use futures_util::Stream;
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::node::connection::Link;
use crate::node::service::{check_identity, check_master, decode_payload, Dispatch, Service};
use crate::node::{self, Node};
use crate::SendError;

/// Name of the event service every process hosts.
pub(crate) const EVENTS: &str = "evilcluster.events";
const PUBLISH_TAG: &str = "events.publish";
const DELIVER_TAG: &str = "events.deliver";

/// A message that can be published to many processes.
///
/// `TAG` names it on the wire, like [`RemoteMessage::TAG`](crate::RemoteMessage::TAG).
///
/// ```
/// use evilcluster::prelude::*;
///
/// #[derive(Clone, Serialize, Deserialize)]
/// struct ConfigChanged { version: u64 }
///
/// impl evilcluster::Event for ConfigChanged {
///     const TAG: &'static str = "config.changed";
/// }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + 'static {
    /// The event's stable name on the wire.
    const TAG: &'static str;
}

/// Where an event goes: the original's `x`, `master:x`, `<worker>:x` and `<worker>#k:x`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum To {
    /// Every process, the master and the sender included.
    All,
    /// The master only.
    Master,
    /// A worker: its spawn and every one of its forks.
    Worker(String),
    /// One fork of a worker, by number (1-based).
    Fork(String, u32),
}

/// Why an event could not be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// No worker of that name is declared in this program.
    #[error("no worker named `{0}` is declared; check the name given to `To::Worker` / `To::Fork`")]
    UnknownWorker(String),
    /// The worker is declared with fewer forks.
    #[error("worker `{worker}` has {forks} forks; there is no fork {fork}")]
    UnknownFork {
        /// The worker's name.
        worker: String,
        /// The fork asked for.
        fork: u32,
        /// How many forks it has.
        forks: u32,
    },
    /// The event could not be sent to the master.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// An event as a subscriber receives it.
#[derive(Debug, Clone)]
pub struct Delivery<E> {
    /// The path of the process that published it.
    pub from: String,
    /// The event.
    pub event: E,
}

impl<E: Event> actix::Message for Delivery<E> {
    type Result = ();
}

#[derive(Serialize, Deserialize)]
struct Publication {
    to: To,
    tag: String,
    from: String,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Arrival {
    tag: String,
    from: String,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

type Subscribers = FxHashMap<&'static str, Vec<mpsc::UnboundedSender<(String, Bytes)>>>;

fn subscribers() -> &'static Mutex<Subscribers> {
    static SUBSCRIBERS: OnceLock<Mutex<Subscribers>> = OnceLock::new();
    SUBSCRIBERS.get_or_init(Default::default)
}

/// Publishes `event` to the processes `to` names. Returns once it is on its
/// way to the master, which delivers it; an event nobody subscribed to is
/// dropped silently, a worker or fork that is not declared is an error.
pub async fn publish<E: Event>(to: To, event: &E) -> Result<(), PublishError> {
    if let To::Worker(worker) | To::Fork(worker, _) = &to {
        let forks = crate::node::directory::declared_forks(worker)
            .ok_or_else(|| PublishError::UnknownWorker(worker.clone()))?;
        if let To::Fork(_, fork) = to {
            if fork == 0 || fork > forks {
                return Err(PublishError::UnknownFork {
                    worker: worker.clone(),
                    fork,
                    forks,
                });
            }
        }
    }
    let node = node::current().ok_or(SendError::NotInCluster)?;
    let payload = crate::node::rpc::encode(E::TAG, event)?;
    let publication = Publication {
        to,
        tag: E::TAG.to_owned(),
        from: node.identity.path.clone(),
        payload,
    };
    if node.hosts_registry() {
        fan_out(&node, publication);
        return Ok(());
    }
    let master = node.master_link().ok_or_else(|| SendError::Disconnected {
        actor: EVENTS,
        path: node.master.0.clone(),
        reason: "not connected to the master".into(),
    })?;
    let body = crate::node::rpc::encode(PUBLISH_TAG, &publication)?;
    crate::node::rpc::push(&master, EVENTS, PUBLISH_TAG, master.peer.incarnation, &body).map_err(|_| {
        SendError::Disconnected {
            actor: EVENTS,
            path: master.peer.path.clone(),
            reason: "the connection to the master closed".into(),
        }
    })?;
    Ok(())
}

/// In the master: delivers a publication to every process its route names
/// (and, when the cluster spans hosts, to the other hosts' masters).
fn fan_out(node: &Arc<Node>, publication: Publication) {
    #[cfg(feature = "nats")]
    if publication.to != To::Master {
        if let Ok(body) = rmp_serde::to_vec(&publication) {
            crate::nats::publish_event(body);
        }
    }
    fan_out_here(node, publication);
}

/// In the master: an event published on another host (`node`), for the
/// processes of this one. A lifecycle event's path becomes `node:path`.
#[cfg(feature = "nats")]
pub(crate) fn from_other_host(node_name: &str, body: &[u8]) {
    let Some(node) = node::current().filter(|node| node.hosts_registry()) else {
        return;
    };
    let Ok(mut publication) = rmp_serde::from_slice::<Publication>(body) else {
        return;
    };
    publication.from = format!("{node_name}:{}", publication.from);
    if publication.tag == <crate::Lifecycle as Event>::TAG {
        if let Ok(mut event) = rmp_serde::from_slice::<crate::Lifecycle>(&publication.payload) {
            event.qualify(node_name);
            match rmp_serde::to_vec(&event) {
                Ok(payload) => publication.payload = payload,
                Err(_) => return,
            }
        }
    }
    fan_out_here(&node, publication);
}

/// Hands `event` to this process's own subscribers only.
#[cfg(feature = "nats")]
pub(crate) fn deliver_here<E: Event>(event: &E) {
    if let (Some(node), Ok(payload)) = (node::current(), rmp_serde::to_vec(event)) {
        deliver(E::TAG, &node.identity.path, Bytes::from(payload));
    }
}

/// In the master: delivers a publication to every process of this host its route names.
fn fan_out_here(node: &Arc<Node>, publication: Publication) {
    let cluster = &node.identity.cluster;
    let fork_path = match &publication.to {
        To::Fork(worker, fork) => Some(format!("{cluster}/{worker}/{fork}")),
        _ => None,
    };
    let arrival = Arrival {
        tag: publication.tag,
        from: publication.from,
        payload: publication.payload,
    };
    let body = match rmp_serde::to_vec(&arrival) {
        Ok(body) => body,
        Err(error) => return warn!(%error, "cannot encode an event"),
    };
    // The members are looked at in place (no copy of the list per event);
    // the connections are gathered first, and pushed to after the
    // directory's lock is released.
    let mut links = Vec::new();
    let mut to_master = false;
    node.directory.with_members(|members| {
        for member in members.iter().filter(|m| match &publication.to {
            To::All => true,
            To::Master => m.path == *cluster,
            To::Worker(worker) => m.worker() == worker && m.path != *cluster,
            To::Fork(..) => fork_path.as_ref().is_some_and(|path| m.path == *path),
        }) {
            if member.path == *cluster {
                to_master = true;
                continue;
            }
            match node.link_for(&member.path, member.incarnation) {
                Some(link) => links.push((link, member.incarnation)),
                None => debug!(path = %member.path, "event not delivered: no connection"),
            }
        }
    });
    if to_master {
        deliver(
            arrival.tag.as_str(),
            &arrival.from,
            Bytes::copy_from_slice(&arrival.payload),
        );
    }
    for (link, incarnation) in links {
        let _ = crate::node::rpc::push(&link, EVENTS, DELIVER_TAG, incarnation, &body);
    }
}

/// Hands an arrived event to this process's subscribers.
fn deliver(tag: &str, from: &str, payload: Bytes) {
    let mut subscribers = subscribers().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(list) = subscribers.get_mut(tag) {
        list.retain(|subscriber| subscriber.send((from.to_owned(), payload.clone())).is_ok());
    }
}

/// Receives publications (in the master) and deliveries (everywhere).
pub(crate) struct EventService(pub std::sync::Weak<Node>);

impl Service for EventService {
    fn dispatch(
        &self,
        caller: Option<&Arc<Link>>,
        tag: &str,
        payload: &[u8],
        _reply: bool,
    ) -> Result<Dispatch, WireError> {
        match tag {
            DELIVER_TAG => {
                // Only the master fans events out.
                check_master(caller)?;
                let arrival: Arrival = decode_payload(tag, payload)?;
                deliver(&arrival.tag, &arrival.from, Bytes::from(arrival.payload));
                Ok(None)
            }
            PUBLISH_TAG => {
                let publication: Publication = decode_payload(tag, payload)?;
                // Subscribers trust `from`: it must be the publisher's own path.
                check_identity(caller, &publication.from, None)?;
                if let Some(node) = self.0.upgrade().filter(|node| node.hosts_registry()) {
                    fan_out(&node, publication);
                }
                Ok(None)
            }
            _ => Err(WireError::UnknownMessage {
                actor: EVENTS.to_owned(),
                tag: tag.to_owned(),
            }),
        }
    }
}

/// Subscribes this process to events of type `E`, from any route that
/// reaches it. Use the stream directly, or hand it to an actor with
/// `ctx.add_stream(evilcluster::subscribe::<E>())` and a
/// `StreamHandler<Delivery<E>>`.
pub fn subscribe<E: Event>() -> Subscription<E> {
    let (sender, receiver) = mpsc::unbounded_channel();
    subscribers()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(E::TAG)
        .or_default()
        .push(sender);
    Subscription {
        receiver,
        event: PhantomData,
    }
}

/// A stream of the events of one type that reach this process.
pub struct Subscription<E> {
    receiver: mpsc::UnboundedReceiver<(String, Bytes)>,
    event: PhantomData<fn() -> E>,
}

impl<E: Event> Stream for Subscription<E> {
    type Item = Delivery<E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let Some((from, payload)) = std::task::ready!(self.receiver.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            match rmp_serde::from_slice(&payload) {
                Ok(event) => return Poll::Ready(Some(Delivery { from, event })),
                // Another build's idea of this tag: skip it, loudly.
                Err(error) => warn!(tag = E::TAG, %from, %error, "dropped an event that did not decode"),
            }
        }
    }
}
