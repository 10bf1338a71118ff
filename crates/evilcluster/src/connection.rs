//! One connection between two processes, shared by every address between
//! them and multiplexed by request id. Either side may send requests.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use evilcluster_wire::handshake::{self, NONCE_LEN};
use evilcluster_wire::{codec, Frame, HandshakeError, Identity, Reply, ReplyPayload, Request, WireError};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use interprocess::local_socket::tokio::Stream;
use rustc_hash::FxHashMap;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, Notify};
use tokio_util::codec::{Encoder, Framed, FramedRead, LengthDelimitedCodec};
use tracing::{debug, warn};

use crate::node::Node;
use crate::transport::{self, ReadHalf, WriteHalf};

/// Names of the runtime's own services start with this.
const SYSTEM_PREFIX: &str = "evilcluster.";

/// Requests a connection works on at once before it stops reading more.
const MAX_IN_FLIGHT: usize = 4096;
const READ_BUFFER: usize = 64 * 1024;
const WRITE_BUFFER: usize = 64 * 1024;

/// Why a request got no result.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The receiving process answered with an error.
    Wire(WireError),
    /// The deadline passed first.
    TimedOut,
}

type Outcome = Result<Bytes, Failure>;
/// A request's id and where its reply will arrive.
pub(crate) type ReplyWaiter = (u64, oneshot::Receiver<Outcome>);

/// A request waiting for its reply.
struct Pending {
    reply: oneshot::Sender<Outcome>,
    /// On the connection's clock (see [`TICK`]).
    expires: u64,
}

/// Resolution of request deadlines. Each connection keeps a coarse clock
/// and sweeps expired requests once a tick while any are waiting: far
/// cheaper than a runtime timer per request, at the price of deadlines
/// being up to two ticks late.
const TICK: Duration = Duration::from_millis(5);

/// Why a frame could not be queued.
#[derive(Debug)]
pub(crate) enum LinkError {
    TooLarge { size: usize },
    Closed(String),
}

/// Frames waiting for the writer task, already length-prefixed by the codec.
///
/// Callers append under the lock, in call order — which is what keeps one
/// sender's messages in order — and the writer takes the whole buffer at
/// once: a burst of frames costs one write and no allocation per frame.
struct Outbox {
    codec: LengthDelimitedCodec,
    frames: BytesMut,
}

/// The sending side of a connection, shared by every caller.
pub(crate) struct Link {
    pub peer: Identity,
    pub max_frame: usize,
    outbox: Mutex<Outbox>,
    /// Wakes the writer when the outbox goes from empty to not empty.
    queued: Notify,
    pending: Mutex<FxHashMap<u64, Pending>>,
    /// Ticks since the connection opened, advanced by its sweeper.
    clock: AtomicU64,
    /// Whether the sweeper sleeps (no request has waited for a while).
    sweeper_asleep: AtomicBool,
    /// Wakes a sleeping sweeper when a request starts waiting.
    waiting: Notify,
    next_id: AtomicU64,
    /// Requests from the peer being handled, as the reader last counted.
    serving: AtomicUsize,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
}

impl Link {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// No request from the peer is being handled and nothing waits to be written.
    pub fn is_idle(&self) -> bool {
        self.serving.load(Ordering::Relaxed) == 0
            && self.outbox.lock().unwrap_or_else(|e| e.into_inner()).frames.is_empty()
    }

    fn closed_error(&self) -> LinkError {
        let reason = self.close_reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
        LinkError::Closed(reason.unwrap_or_else(|| "connection closed".to_owned()))
    }

    /// Queues a request. With `reply_within`, the caller waits that long for
    /// a reply: returns the id and where the reply (or the timeout) arrives.
    pub fn request(
        &self,
        actor: &str,
        tag: &str,
        incarnation: u64,
        payload: &[u8],
        reply_within: Option<Duration>,
    ) -> Result<Option<ReplyWaiter>, LinkError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::Request(Request {
            id,
            actor,
            tag,
            incarnation,
            reply: reply_within.is_some(),
            payload,
        });
        with_scratch(|body| {
            frame.encode_into(body).expect("a request frame always encodes");
            if body.len() > self.max_frame {
                return Err(LinkError::TooLarge { size: body.len() });
            }
            let waiter = reply_within.map(|timeout| {
                let (reply, rx) = oneshot::channel();
                // Whole ticks, plus one for the tick already under way.
                let ticks = timeout.as_nanos().div_ceil(TICK.as_nanos()) as u64 + 1;
                let expires = self.clock.load(Ordering::Relaxed).saturating_add(ticks);
                self.lock_pending().insert(id, Pending { reply, expires });
                if self.sweeper_asleep.load(Ordering::SeqCst) {
                    self.waiting.notify_one();
                }
                (id, rx)
            });
            self.queue(body);
            Ok(waiter)
        })
    }

    /// Appends one frame body to the outbox.
    fn queue(&self, body: &[u8]) {
        let was_empty = {
            let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            let Outbox { codec, frames } = &mut *outbox;
            let was_empty = frames.is_empty();
            codec
                .encode(body, frames)
                .expect("frames are checked against the maximum length first");
            was_empty
        };
        if was_empty {
            self.queued.notify_one();
        }
    }

    /// Forgets a request whose caller stopped waiting.
    pub fn cancel(&self, id: u64) {
        self.lock_pending().remove(&id);
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, FxHashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn complete(&self, id: u64, result: Result<Bytes, WireError>) {
        let waiter = self.lock_pending().remove(&id);
        match waiter {
            Some(waiter) => {
                let _ = waiter.reply.send(result.map_err(Failure::Wire));
            }
            None => debug!(peer = %self.peer.path, id, "reply for a request nobody waits for (timed out?)"),
        }
    }

    fn reply(&self, id: u64, result: Result<Vec<u8>, WireError>) {
        let encode = |body: &mut Vec<u8>, result: Result<&[u8], WireError>| {
            body.clear();
            Frame::Reply(Reply {
                id,
                result: result.map(ReplyPayload),
            })
            .encode_into(body)
            .expect("a reply frame always encodes")
        };
        with_scratch(|body| {
            encode(body, result.as_deref().map_err(Clone::clone));
            if body.len() > self.max_frame {
                let size = body.len();
                warn!(peer = %self.peer.path, size, "reply over the maximum frame length; sending an error instead");
                let too_large = WireError::ReplyTooLarge {
                    size,
                    max: self.max_frame,
                };
                encode(body, Err(too_large));
            }
            self.queue(body);
        })
    }

    /// Marks the link dead and fails every request waiting on it: their
    /// callers get `Disconnected` at once rather than at their timeout.
    fn close(&self, reason: String) {
        *self.close_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.closed.store(true, Ordering::Release);
        self.lock_pending().clear();
    }
}

/// Which side of the handshake this process plays.
pub(crate) enum Side {
    Caller,
    Listener,
}

/// Runs the handshake on a fresh stream, then starts the connection's tasks
/// on the current actix arbiter.
pub(crate) async fn establish(node: Arc<Node>, stream: Stream, side: Side) -> Result<Arc<Link>, HandshakeError> {
    let max_frame = node.config.max_frame_length;
    let mut framed = Framed::new(transport::into_io(stream), codec(max_frame));
    let nonce = random_nonce();
    let handshake = async {
        match side {
            Side::Caller => handshake::connect(&mut framed, &node.identity, &node.cookie, nonce).await,
            Side::Listener => handshake::accept(&mut framed, &node.identity, &node.cookie, nonce).await,
        }
    };
    let peer = tokio::time::timeout(node.config.handshake_timeout, handshake)
        .await
        .map_err(|_| HandshakeError::TimedOut)??;

    let parts = framed.into_parts();
    let (read_half, write_half) = transport::split(parts.io);
    let mut reader = FramedRead::with_capacity(read_half, codec(max_frame), READ_BUFFER);
    reader.read_buffer_mut().extend_from_slice(&parts.read_buf);

    let link = Arc::new(Link {
        peer,
        max_frame,
        outbox: Mutex::new(Outbox {
            codec: codec(max_frame),
            frames: BytesMut::with_capacity(WRITE_BUFFER),
        }),
        queued: Notify::new(),
        pending: Mutex::new(FxHashMap::default()),
        clock: AtomicU64::new(0),
        sweeper_asleep: AtomicBool::new(false),
        waiting: Notify::new(),
        next_id: AtomicU64::new(1),
        serving: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        close_reason: Mutex::new(None),
    });
    // On the actix arbiter's local task set, like the actors they serve:
    // waking across that boundary would cost the runtime a syscall.
    let write_task = actix_rt::spawn(write_loop(link.clone(), write_half));
    let sweep_task = actix_rt::spawn(sweep_loop(link.clone()));
    actix_rt::spawn({
        let link = link.clone();
        async move {
            let reason = read_loop(&node, &link, reader).await;
            write_task.abort();
            sweep_task.abort();
            debug!(peer = %link.peer.path, %reason, "connection closed");
            link.close(reason);
            node.link_closed(&link);
        }
    });
    Ok(link)
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0; NONCE_LEN];
    getrandom::fill(&mut nonce).expect("the operating system's random source failed");
    nonce
}

/// Runs `f` on this thread's scratch buffer (cleared), so that encoding a
/// frame allocates nothing once the buffer has grown.
fn with_scratch<T>(f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
    }
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut body) => {
            body.clear();
            f(&mut body)
        }
        Err(_) => f(&mut Vec::new()),
    })
}

/// Advances the connection's clock while requests wait, and fails those
/// whose deadline has passed.
async fn sweep_loop(link: Arc<Link>) {
    /// Idle ticks before the sweeper sleeps: steady traffic never wakes it.
    const IDLE_TICKS: u32 = 200;
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle = IDLE_TICKS;
    loop {
        if idle >= IDLE_TICKS {
            // Announce the sleep before the last look: a request queued
            // after that look sees the flag and wakes us.
            link.sweeper_asleep.store(true, Ordering::SeqCst);
            if link.lock_pending().is_empty() {
                link.waiting.notified().await;
                ticks.reset();
            }
            link.sweeper_asleep.store(false, Ordering::SeqCst);
            idle = 0;
        }
        ticks.tick().await;
        let now = link.clock.fetch_add(1, Ordering::Relaxed) + 1;
        let expired: Vec<Pending> = {
            let mut pending = link.lock_pending();
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, waiting)| waiting.expires <= now)
                .map(|(&id, _)| id)
                .collect();
            ids.into_iter().filter_map(|id| pending.remove(&id)).collect()
        };
        for waiting in expired {
            let _ = waiting.reply.send(Err(Failure::TimedOut));
        }
        idle = if link.lock_pending().is_empty() { idle + 1 } else { 0 };
    }
}

/// Writes whatever the outbox holds, one write per batch.
async fn write_loop(link: Arc<Link>, mut io: WriteHalf) {
    let mut batch = BytesMut::with_capacity(WRITE_BUFFER);
    loop {
        {
            let mut outbox = link.outbox.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut outbox.frames, &mut batch);
        }
        if batch.is_empty() {
            link.queued.notified().await;
            continue;
        }
        if io.write_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
    }
}

/// Reads frames until the connection ends; returns why it ended.
async fn read_loop(node: &Node, link: &Link, mut frames: FramedRead<ReadHalf, LengthDelimitedCodec>) -> String {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some((id, counted, started, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let result: Result<Vec<u8>, WireError> = result;
                if counted {
                    node.stats.handled(started, result.is_err());
                }
                link.reply(id, result);
                link.serving.store(in_flight.len(), Ordering::Relaxed);
            }
            frame = frames.next(), if in_flight.len() < MAX_IN_FLIGHT => match frame {
                None => return "closed by the peer".to_owned(),
                Some(Err(error)) if is_disconnect(&error) => return format!("connection lost: {error}"),
                Some(Err(error)) => {
                    warn!(peer = %link.peer.path, %error, "dropping the connection: unreadable frame");
                    return format!("unreadable frame: {error}");
                }
                Some(Ok(body)) => {
                    let body = body.freeze();
                    match Frame::decode(&body) {
                        Err(error) => warn!(peer = %link.peer.path, %error, "ignored a malformed frame"),
                        Ok(Frame::Reply(reply)) => link.complete(reply.id, reply.result.map(|p| body.slice_ref(p.0))),
                        Ok(Frame::Request(request)) => {
                            let id = request.id;
                            // The runtime's own traffic is not the actors' work.
                            let counted = !request.actor.starts_with(SYSTEM_PREFIX);
                            let started = if counted { node.stats.received() } else { None };
                            match node.dispatch(&request) {
                                Ok(None) => {}
                                Ok(Some(pending)) => {
                                    in_flight.push(async move { (id, counted, started, pending.await) });
                                    link.serving.store(in_flight.len(), Ordering::Relaxed);
                                }
                                Err(error) => {
                                    if counted {
                                        node.stats.failed();
                                    }
                                    warn!(peer = %link.peer.path, actor = request.actor, tag = request.tag, %error, "refused a request");
                                    if request.reply {
                                        link.reply(id, Err(error));
                                    }
                                }
                            }
                        }
                    }
                }
            },
        }
    }
}

/// A peer that went away, as opposed to one that sent something wrong.
fn is_disconnect(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

/// How long a connection may take to prove itself.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
