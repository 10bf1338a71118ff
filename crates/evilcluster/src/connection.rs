//! One connection between two processes, shared by every address between
//! them and multiplexed by request id. Either side may send requests.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Requests a connection works on at once before it stops reading more.
const MAX_IN_FLIGHT: usize = 4096;
const READ_BUFFER: usize = 64 * 1024;
const WRITE_BUFFER: usize = 64 * 1024;

pub(crate) type ReplySender = oneshot::Sender<Result<Bytes, WireError>>;
/// A request's id and where its reply will arrive.
pub(crate) type ReplyWaiter = (u64, oneshot::Receiver<Result<Bytes, WireError>>);

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
    pending: Mutex<FxHashMap<u64, ReplySender>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
}

impl Link {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn closed_error(&self) -> LinkError {
        let reason = self.close_reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
        LinkError::Closed(reason.unwrap_or_else(|| "connection closed".to_owned()))
    }

    /// Queues a request. With `reply`, returns the id and where the reply will arrive.
    pub fn request(
        &self,
        actor: &str,
        tag: &str,
        incarnation: u64,
        payload: &[u8],
        reply: bool,
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
            reply,
            payload,
        });
        with_scratch(|body| {
            frame.encode_into(body).expect("a request frame always encodes");
            if body.len() > self.max_frame {
                return Err(LinkError::TooLarge { size: body.len() });
            }
            let waiter = reply.then(|| {
                let (tx, rx) = oneshot::channel();
                self.lock_pending().insert(id, tx);
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

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, FxHashMap<u64, ReplySender>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn complete(&self, id: u64, result: Result<Bytes, WireError>) {
        match self.lock_pending().remove(&id) {
            Some(waiter) => {
                let _ = waiter.send(result);
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
/// on the current runtime.
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
        next_id: AtomicU64::new(1),
        closed: AtomicBool::new(false),
        close_reason: Mutex::new(None),
    });
    let write_task = tokio::spawn(write_loop(link.clone(), write_half));
    tokio::spawn({
        let link = link.clone();
        async move {
            let reason = read_loop(&node, &link, reader).await;
            write_task.abort();
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
            Some((id, result)) = in_flight.next(), if !in_flight.is_empty() => link.reply(id, result),
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
                            match node.dispatch(&request) {
                                Ok(None) => {}
                                Ok(Some(pending)) => in_flight.push(async move { (id, pending.await) }),
                                Err(error) => {
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
