//! Typed publish/subscribe across the cluster, with the original's four
//! routes: everyone, the master, a worker (its spawn and every fork), one fork.
//!
//! A published event goes to the master, which fans it out over the
//! connections it holds to every process. One sender's events therefore reach
//! each receiver in the order they were published. The master sends what was
//! published meanwhile together, once the publishing task yields: a burst is
//! one frame per process, written by every connection from one buffer.

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

use crate::node::connection::{Link, Outgoing};
use crate::node::directory::Member;
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

/// One event of a delivery from the master (a delivery is an array of
/// them, in the order they were published); read in place in the frame.
#[derive(Serialize, Deserialize)]
struct Arrival<'a> {
    tag: &'a str,
    from: &'a str,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
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
    crate::node::rpc::push(
        &master,
        EVENTS,
        PUBLISH_TAG,
        master.peer.incarnation,
        Outgoing::Borrowed(&body),
    )
    .map_err(|_| SendError::Disconnected {
        actor: EVENTS,
        path: master.peer.path.clone(),
        reason: "the connection to the master closed".into(),
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
        deliver(E::TAG, &node.identity.path, || Bytes::from(payload));
    }
}

/// In the master: a publication taken in and not yet fanned out.
struct Queued {
    to: To,
    /// The publication as one entry of a delivery (see [`Arrival`]).
    encoded: Bytes,
}

/// In the master: publications taken in and not fanned out yet, oldest
/// first. They go out once the task that published the first of them
/// yields, together: a burst (the lifecycle events of a tree's forks) is
/// one frame to each process rather than one per event, and processes that
/// get the same events share one encoding of them. Before, each event was
/// copied into every connection's outbox: at 256 forks, 34 KiB in each of
/// the master's 256 connections.
///
/// Kept by the thread: the task that sends them is spawned on it, so two
/// masters in one process (each on a runtime of its own) keep theirs apart.
fn with_queued<T>(f: impl FnOnce(&mut Vec<Queued>) -> T) -> T {
    thread_local! {
        static QUEUED: std::cell::RefCell<Vec<Queued>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    QUEUED.with(|queued| f(&mut queued.borrow_mut()))
}

/// A delivery holds events up to about this many bytes (more go in the
/// next): about half a connection's read buffer, so a burst of events
/// never grows it. A reader's buffer grown for a large frame is given back, but
/// the pages it touched stay with the process: with deliveries of up to
/// 256 KiB, the lifecycle events of a tree of 256 forks cost each fork
/// 35–40 KiB of PSS for good.
const DELIVERY_BYTES: usize = 8 * 1024;

/// In the master: delivers a publication to every process of this host its
/// route names, with the others taken in before the publishing task yields.
fn fan_out_here(node: &Arc<Node>, publication: Publication) {
    let Publication { to, tag, from, payload } = publication;
    let entry = Arrival {
        tag: &tag,
        from: &from,
        payload: &payload,
    };
    let encoded = match rmp_serde::to_vec(&entry) {
        Ok(encoded) => Bytes::from(encoded),
        Err(error) => return warn!(%error, "cannot encode an event"),
    };
    // This process's own subscribers have it at once, in the order
    // published: a master about to stop has nothing left to send them.
    if matches!(to, To::All | To::Master) {
        deliver(&tag, &from, || Bytes::from(payload));
    }
    if to == To::Master {
        return;
    }
    let first = with_queued(|queued| {
        queued.push(Queued { to, encoded });
        queued.len() == 1
    });
    if !first {
        return;
    }
    if actix_rt::Arbiter::try_current().is_none() {
        // Published from a thread of the program's own, with no arbiter
        // to send the batch later: sent now.
        return fan_out_queued(node);
    }
    let node = Arc::downgrade(node);
    actix_rt::spawn(async move {
        // After the tasks that are ready now: what they publish joins.
        tokio::task::yield_now().await;
        if let Some(node) = node.upgrade() {
            fan_out_queued(&node);
        }
    });
}

/// In the master: sends every queued publication to the other processes
/// it is for, in the order taken in.
fn fan_out_queued(node: &Node) {
    let batch = with_queued(std::mem::take);
    if batch.is_empty() {
        return;
    }
    let cluster = &node.identity.cluster;
    let fork_paths: Vec<Option<String>> = batch
        .iter()
        .map(|queued| match &queued.to {
            To::Fork(worker, fork) => Some(format!("{cluster}/{worker}/{fork}")),
            _ => None,
        })
        .collect();
    let reaches = |index: usize, m: &Member| match &batch[index].to {
        To::All => true,
        To::Master => false,
        To::Worker(worker) => m.worker() == worker,
        To::Fork(..) => fork_paths[index].as_ref().is_some_and(|path| m.path == *path),
    };
    // The members are looked at in place (no copy of the list); the
    // connections are gathered first, and pushed to after the directory's
    // lock is released.
    let mut sends = Vec::new();
    node.directory.with_members(|members| {
        for member in members.iter().filter(|m| m.path != *cluster) {
            let picked: Vec<u32> = (0..batch.len())
                .filter(|&index| reaches(index, member))
                .map(|index| index as u32)
                .collect();
            if picked.is_empty() {
                continue;
            }
            match node.link_for(&member.path, member.incarnation) {
                Some(link) => sends.push((link, member.incarnation, picked)),
                None => debug!(path = %member.path, "events not delivered: no connection"),
            }
        }
    });
    let mut encodings: FxHashMap<Vec<u32>, Vec<Bytes>> = FxHashMap::default();
    for (link, incarnation, picked) in sends {
        let deliveries = encodings
            .entry(picked)
            .or_insert_with_key(|picked| deliveries(&batch, picked));
        for delivery in deliveries.iter() {
            let delivery = Outgoing::Shared(delivery.clone());
            if crate::node::rpc::push(&link, EVENTS, DELIVER_TAG, incarnation, delivery).is_err() {
                break;
            }
        }
    }
}

/// The deliveries that carry the `picked` publications of `batch`, in
/// order: each an array of [`Arrival`]s (encoded once, when taken in) of
/// about [`DELIVERY_BYTES`] at most (a larger event goes alone).
fn deliveries(batch: &[Queued], picked: &[u32]) -> Vec<Bytes> {
    let encoded = |index: u32| &batch[index as usize].encoded;
    let mut deliveries = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (at, &index) in picked.iter().enumerate() {
        let len = encoded(index).len();
        if at > start && size + len > DELIVERY_BYTES {
            deliveries.push(delivery(picked[start..at].iter().map(|&i| encoded(i)), size));
            (start, size) = (at, 0);
        }
        size += len;
    }
    if start < picked.len() {
        deliveries.push(delivery(picked[start..].iter().map(|&i| encoded(i)), size));
    }
    deliveries
}

/// One delivery: an array of the `events` (already encoded, `size` bytes).
fn delivery<'a>(events: impl ExactSizeIterator<Item = &'a Bytes>, size: usize) -> Bytes {
    let mut out = Vec::with_capacity(size + 5);
    let count = u32::try_from(events.len()).expect("fewer than 2^32 events in one delivery");
    rmp::encode::write_array_len(&mut out, count).expect("a Vec takes any length");
    for event in events {
        out.extend_from_slice(event);
    }
    Bytes::from(out)
}

/// Hands an arrived event to this process's subscribers; `payload` is
/// called only if there are any.
fn deliver(tag: &str, from: &str, payload: impl FnOnce() -> Bytes) {
    let mut subscribers = subscribers().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(list) = subscribers.get_mut(tag) {
        let payload = payload();
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
                let arrivals: Vec<Arrival<'_>> = decode_payload(tag, payload)?;
                for arrival in arrivals {
                    deliver(arrival.tag, arrival.from, || Bytes::copy_from_slice(arrival.payload));
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(n: usize, size: usize) -> Queued {
        let payload = vec![n as u8; size];
        let entry = Arrival {
            tag: "t",
            from: "c/w",
            payload: &payload,
        };
        Queued {
            to: To::All,
            encoded: Bytes::from(rmp_serde::to_vec(&entry).unwrap()),
        }
    }

    /// The picked events arrive whole, in order, in deliveries of at most
    /// `DELIVERY_BYTES` of events each; one larger event goes alone.
    #[test]
    fn deliveries_carry_the_picked_events_in_order_within_their_size() {
        const D: usize = DELIVERY_BYTES;
        let sizes = [10, D * 2 / 5, D * 4 / 5, 5, D + 10, 7, D * 2 / 5, D * 2 / 5, D * 2 / 5];
        let batch: Vec<Queued> = sizes.iter().enumerate().map(|(n, &size)| queued(n, size)).collect();
        let picked: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 6, 7, 8];
        let all = deliveries(&batch, &picked);
        let mut seen = Vec::new();
        for delivery in &all {
            let arrivals: Vec<Arrival<'_>> = rmp_serde::from_slice(delivery).unwrap();
            assert!(
                delivery.len() <= DELIVERY_BYTES + 5 || arrivals.len() == 1,
                "a delivery of {} bytes holds {} events",
                delivery.len(),
                arrivals.len()
            );
            seen.extend(arrivals.iter().map(|a| (a.payload.len(), a.payload.first().copied())));
        }
        let expected: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(n, &size)| (size, Some(n as u8)))
            .collect();
        assert_eq!(seen, expected);
        // 10 + 2/5; 4/5 + 5; the large one; 7 + 2 × 2/5; 2/5.
        assert_eq!(all.len(), 5);

        let some = deliveries(&batch, &[3, 0]);
        let arrivals: Vec<Arrival<'_>> = rmp_serde::from_slice(&some[0]).unwrap();
        let firsts: Vec<_> = arrivals.iter().map(|a| a.payload[0]).collect();
        assert_eq!((some.len(), firsts), (1, vec![3, 0]));
    }

    /// The lifecycle events of a large tree starting (a `Forked` and a
    /// `Ready` for each of 256 forks, taken in together) go to each
    /// process in deliveries that fit well within a connection's read
    /// buffer: a larger frame would grow that buffer, and the pages it
    /// touched would stay with every process of the tree.
    #[test]
    fn a_burst_of_lifecycle_events_never_outgrows_a_read_buffer() {
        let batch: Vec<Queued> = (1..=256u32)
            .flat_map(|fork| {
                let path = format!("myapp/webserverApi/{fork}");
                [
                    crate::Lifecycle::Forked {
                        path: path.clone(),
                        pid: 100_000 + fork,
                        incarnation: u64::from(fork),
                    },
                    crate::Lifecycle::Ready {
                        path,
                        pid: 100_000 + fork,
                        incarnation: u64::from(fork),
                        restarts: 0,
                    },
                ]
            })
            .map(|event| {
                let payload = rmp_serde::to_vec(&event).unwrap();
                let entry = Arrival {
                    tag: <crate::Lifecycle as Event>::TAG,
                    from: "myapp",
                    payload: &payload,
                };
                Queued {
                    to: To::All,
                    encoded: Bytes::from(rmp_serde::to_vec(&entry).unwrap()),
                }
            })
            .collect();
        let picked: Vec<u32> = (0..batch.len() as u32).collect();
        let all = deliveries(&batch, &picked);
        let carried: usize = all
            .iter()
            .map(|delivery| rmp_serde::from_slice::<Vec<Arrival<'_>>>(delivery).unwrap().len())
            .sum();
        assert_eq!(carried, batch.len());
        let largest = all.iter().map(Bytes::len).max().unwrap();
        let read_buffer = crate::node::connection::READ_BUFFER;
        // About half of it (the array's header on top of the events).
        assert!(
            largest < read_buffer * 3 / 4,
            "a delivery of {largest} bytes against a read buffer of {read_buffer}"
        );
    }
}
