//! One connection between two processes, shared by every address between
//! them and multiplexed by request id. Either side may send requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use evilcluster_wire::handshake::{self, NONCE_LEN};
use evilcluster_wire::{codec, Frame, HandshakeError, Identity, Reply, Request, WireError};
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use interprocess::local_socket::tokio::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Framed, FramedRead, FramedWrite, LengthDelimitedCodec};
use tracing::{debug, warn};

use crate::node::Node;
use crate::transport::SharedStream;

/// Requests a connection works on at once before it stops reading more.
const MAX_IN_FLIGHT: usize = 4096;
/// Frames the writer takes off its queue per write.
const WRITE_BATCH: usize = 512;
const READ_BUFFER: usize = 64 * 1024;

pub(crate) type ReplySender = oneshot::Sender<Result<Bytes, WireError>>;
/// A request's id and where its reply will arrive.
pub(crate) type ReplyWaiter = (u64, oneshot::Receiver<Result<Bytes, WireError>>);

/// Why a frame could not be queued.
#[derive(Debug)]
pub(crate) enum LinkError {
    TooLarge { size: usize },
    Closed(String),
}

/// The sending side of a connection, shared by every caller.
pub(crate) struct Link {
    pub peer: Identity,
    pub max_frame: usize,
    writer: mpsc::UnboundedSender<Bytes>,
    pending: Mutex<HashMap<u64, ReplySender>>,
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
        let body = frame.encode().expect("a request frame always encodes");
        if body.len() > self.max_frame {
            return Err(LinkError::TooLarge { size: body.len() });
        }
        let waiter = if reply {
            let (tx, rx) = oneshot::channel();
            self.lock_pending().insert(id, tx);
            Some((id, rx))
        } else {
            None
        };
        if self.writer.send(Bytes::from(body)).is_err() {
            self.cancel(id);
            return Err(self.closed_error());
        }
        Ok(waiter)
    }

    /// Forgets a request whose caller stopped waiting.
    pub fn cancel(&self, id: u64) {
        self.lock_pending().remove(&id);
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ReplySender>> {
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
        let encode = |result: Result<&[u8], WireError>| {
            Frame::Reply(Reply {
                id,
                result: result.map(evilcluster_wire::ReplyPayload),
            })
            .encode()
            .expect("a reply frame always encodes")
        };
        let mut body = encode(result.as_deref().map_err(Clone::clone));
        if body.len() > self.max_frame {
            let size = body.len();
            warn!(peer = %self.peer.path, size, "reply over the maximum frame length; sending an error instead");
            body = encode(Err(WireError::ReplyTooLarge {
                size,
                max: self.max_frame,
            }));
        }
        let _ = self.writer.send(Bytes::from(body));
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
    let stream = Arc::new(stream);
    let max_frame = node.config.max_frame_length;
    let mut framed = Framed::new(SharedStream(stream.clone()), codec(max_frame));
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
    let mut reader = FramedRead::with_capacity(parts.io, codec(max_frame), READ_BUFFER);
    reader.read_buffer_mut().extend_from_slice(&parts.read_buf);
    let writer_io = FramedWrite::new(SharedStream(stream), codec(max_frame));

    let (writer, queue) = mpsc::unbounded_channel();
    let link = Arc::new(Link {
        peer,
        max_frame,
        writer,
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        closed: AtomicBool::new(false),
        close_reason: Mutex::new(None),
    });
    let write_task = tokio::spawn(write_loop(writer_io, queue));
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

async fn write_loop(
    mut io: FramedWrite<SharedStream, LengthDelimitedCodec>,
    mut queue: mpsc::UnboundedReceiver<Bytes>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while queue.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        for frame in batch.drain(..) {
            if io.feed(frame).await.is_err() {
                return;
            }
        }
        if SinkExt::<Bytes>::flush(&mut io).await.is_err() {
            return;
        }
    }
}

/// Reads frames until the connection ends; returns why it ended.
async fn read_loop(node: &Node, link: &Link, mut frames: FramedRead<SharedStream, LengthDelimitedCodec>) -> String {
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
