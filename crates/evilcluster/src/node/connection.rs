//! One connection between two processes, shared by every address between
//! them and multiplexed by request id. Either side may send requests.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use evilcluster_wire::handshake::{self, NONCE_LEN};
use evilcluster_wire::{
    codec, frame_header, Credit, Frame, HandshakeError, Identity, Reply, ReplyPayload, Request, WireError,
};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use interprocess::local_socket::tokio::Stream;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, Semaphore};
use tokio_util::codec::{Framed, FramedRead};
use tracing::{debug, warn};

use crate::node::frame_reader::{FrameDecoder, OWN_BUFFER_FROM};
use crate::node::throttle::clip;
use crate::node::transport::{self, ReadHalf, WriteHalf};
use crate::node::{HostedCache, Node};

/// Names of the runtime's own services start with this.
const SYSTEM_PREFIX: &str = "evilcluster.";

/// User messages (requests and one-way messages alike) that one side lets
/// wait on its peer at once: the flow-control window. A request's reply
/// gives its place back; one-way messages give theirs back through
/// [`Credit`] frames. The receiver never has more than this many of one
/// peer's messages queued or being handled, so its mailbox and memory are
/// bounded per connection, and it never has to stop reading — which is
/// what lets replies through when two processes call each other at full
/// speed.
pub(crate) const WINDOW: usize = 4096;
/// One-way messages finished before their places are given back in one
/// [`Credit`] frame (sooner when the receiver runs out of work).
const CREDIT_BATCH: usize = WINDOW / 16;
/// The runtime's own messages do not take places in the window; a peer
/// that has this many messages in flight is misbehaving, and the reader
/// stops reading from it until they are done.
const MAX_IN_FLIGHT: usize = 2 * WINDOW;
/// A connection's read buffer: the pages a connection's reads have
/// touched stay with the process, and every process has a connection to
/// the master (and the master one to every process). Small frames rarely
/// come more than this many bytes at a time; a larger frame grows it.
pub(crate) const READ_BUFFER: usize = 16 * 1024;
/// Once reads have moved this far through the read buffer, what is left
/// unread moves back to its start when it can (see
/// [`FrameDecoder::rewinding_below`]): a connection that reads only small
/// frames touches the buffer's first page or two, not all of it.
const REWIND_AFTER: usize = 4 * 1024;
/// The outbox buffers' first size. Only the pages written are paid for,
/// and starting smaller costs more: growing leaves the smaller buffers
/// behind, touched (measured: the master of 256 forks, 13.7 → 19 MiB).
const WRITE_BUFFER: usize = 64 * 1024;
/// A buffer that grew past this for one large message is given back to
/// the allocator afterwards rather than kept for the process's lifetime.
pub(crate) const KEEP_BUFFER: usize = 256 * 1024;
/// A payload this large is not copied into the outbox: when its encoder
/// hands it over as [`Bytes`], the writer gives it to the kernel from
/// there, in one vectored write with the frames around it.
pub(crate) const LARGE_PAYLOAD: usize = 64 * 1024;
/// Buffers handed to one vectored write at most (Linux's `IOV_MAX` is 1,024).
const MAX_SLICES: usize = 64;
/// A payload handed over as [`Outgoing::Shared`] at least this large is
/// written from where it is, not copied into the outbox: the outbox's
/// pages, once written, stay with the connection, and the master has a
/// connection to every process. What it pushes to all of them (a
/// membership delta, a batch of events) would otherwise leave a copy's
/// pages behind in every outbox. (Replies keep [`LARGE_PAYLOAD`]: with
/// 4 KiB, 256 KiB echoes run right after 16 KiB ones measured 0.5–0.6× raw
/// instead of 0.9×, for a reason not yet found.)
pub(crate) const WRITTEN_IN_PLACE: usize = 4 * 1024;

/// A message's encoded bytes, as a caller hands them to a connection.
pub(crate) enum Outgoing<'a> {
    /// Copied into the outbox (small, or not the caller's to give).
    Borrowed(&'a [u8]),
    /// Handed over; written from where it is unless it is small (see
    /// [`WRITTEN_IN_PLACE`]): a payload pushed to many connections is
    /// encoded once and shared by all of them.
    Shared(Bytes),
}

impl Outgoing<'_> {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Outgoing::Borrowed(bytes) => bytes,
            Outgoing::Shared(bytes) => bytes,
        }
    }
}

/// The size a request frame of `payload` bytes will have, near enough to
/// refuse an oversized one, and to reserve its room, before building it.
pub(crate) fn frame_size(actor: &str, tag: &str, payload: usize) -> usize {
    payload + actor.len() + tag.len() + 32
}

/// Whether messages to `actor` take a place in the window (user actors do;
/// the runtime's own services, reached from synchronous code, do not).
pub(crate) fn takes_slot(actor: &str) -> bool {
    !actor.starts_with(SYSTEM_PREFIX)
}

/// Why a request got no result.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The receiving process answered with an error.
    Wire(WireError),
    /// The connection closed first.
    Closed(String),
}

type Outcome = Result<Payload, Failure>;
/// A queued request's id, to collect its reply with
/// [`Link::poll_reply`] (and to [`cancel`](Link::cancel) it).
pub(crate) type ReplyWaiter = u64;

/// A request waiting for its reply.
struct Pending {
    reply: Awaited,
    /// Whether it holds a place in the window (given back with its reply).
    slotted: bool,
}

/// Where a request's reply stands. Kept in the connection's table rather
/// than in a channel per request: a call then allocates nothing for its
/// reply, and the reader hands it over under the lock it takes anyway.
enum Awaited {
    /// No reply yet; the caller's waker, once it has been polled.
    Waiting(Option<Waker>),
    /// The reply (or the connection's end), for the caller to take.
    Arrived(Outcome),
    /// The caller stopped waiting; the entry stays until the reply gives
    /// the request's place in the window back.
    Abandoned,
}

/// The requests waiting for their replies, by id. An id is a slot of a
/// slab (its low 32 bits) and the request's sequence number on the
/// connection (its high 32 bits): finding a request is an index, not a
/// hash, and a late reply for a slot that a newer request took since finds
/// another id there and is ignored.
#[derive(Default)]
struct PendingTable {
    slots: slab::Slab<(u64, Pending)>,
}

impl PendingTable {
    /// The id the next [`insert`](Self::insert) takes, for request number
    /// `sequence`.
    fn next_id(&self, sequence: u64) -> u64 {
        let slot = u32::try_from(self.slots.vacant_key()).expect("fewer than 2^32 requests wait on one connection");
        (sequence << 32) | u64::from(slot)
    }

    /// Adds the request whose id [`next_id`](Self::next_id) just gave.
    fn insert(&mut self, id: u64, pending: Pending) {
        let slot = self.slots.insert((id, pending));
        debug_assert_eq!(slot, slot_of(id), "inserted where next_id said");
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Pending> {
        match self.slots.get_mut(slot_of(id)) {
            Some((stored, pending)) if *stored == id => Some(pending),
            _ => None,
        }
    }

    fn remove(&mut self, id: u64) -> Option<Pending> {
        self.get_mut(id)?;
        Some(self.slots.remove(slot_of(id)).1)
    }

    /// Whether no request waits for its reply (nor for its place back).
    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn retain(&mut self, mut keep: impl FnMut(&Pending) -> bool) {
        self.slots.retain(|_, (_, pending)| keep(pending));
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Pending> {
        self.slots.iter_mut().map(|(_, (_, pending))| pending)
    }
}

fn slot_of(id: u64) -> usize {
    (id & u64::from(u32::MAX)) as usize
}

/// The requests waiting on a connection, and whether it is closed: one
/// lock, so that a request is either admitted before the connection
/// closes (and then failed by the close) or refused — never left waiting.
struct Calls {
    pending: PendingTable,
    closed: Option<String>,
    /// The peer is stopping ([`Frame::GoAway`]): no new requests to it.
    gone_away: bool,
}

/// Why a frame could not be queued.
#[derive(Debug)]
pub(crate) enum LinkError {
    TooLarge {
        size: usize,
    },
    /// No room right now, and the caller asked not to wait.
    Full,
    /// The peer is stopping and takes no new requests; nothing was sent,
    /// so the message may go to another instance.
    GoingAway,
    Closed(String),
}

/// Frames waiting for the writer task, already length-prefixed as the
/// codec would ([`frame_header`]).
///
/// Callers append under the lock, in call order — which is what keeps one
/// sender's messages in order — and the writer takes the whole buffer at
/// once: a burst of frames costs one write and no allocation per frame.
/// A large payload is not copied in: the bytes queued before it and the
/// payload itself go to `chunks`, and the writer writes `chunks` then
/// `frames` in one vectored write.
struct Outbox {
    /// Written before `frames`, in this order.
    chunks: VecDeque<Bytes>,
    frames: BytesMut,
    /// Bytes of the frames here that hold room in the byte budget.
    budgeted: usize,
    /// The writer task took a batch and has not finished writing it:
    /// nothing else may write to the socket meanwhile.
    writing: bool,
}

/// What follows queuing a frame in the outbox.
#[derive(Clone, Copy)]
enum Then {
    /// The writer task writes it (woken if the outbox was empty).
    WakeWriter,
    /// Written from here at once, under the same hold of the outbox's lock
    /// (see [`Link::write_now`]): the last reply in hand.
    WriteNow,
    /// Left for the caller, who writes it with [`Link::write_now`] once it
    /// may: a lone call, once its reply can be taken.
    Wait,
}

/// What a write made under the outbox's lock leaves to do once the lock is
/// let go.
struct Written {
    /// The count of unwritten bytes went to zero: a drain may be over.
    emptied: bool,
    /// Room in the byte budget to give back.
    budgeted: usize,
    /// Bytes the socket did not take: the writer's now.
    rest: bool,
}

/// A place in the peer's window, held by a caller that has not queued its
/// message yet; dropping it gives the place back.
pub(crate) struct Slot<'a> {
    link: &'a Link,
}

impl<'a> Slot<'a> {
    /// Adds room for a frame of `size` bytes, if the budget has it now.
    pub fn try_room(self, size: usize) -> Result<Admission<'a>, Slot<'a>> {
        let bytes = self.link.budget_share(size);
        match self.link.room.try_acquire_many(bytes) {
            Ok(room) => {
                room.forget();
                Ok(self.into_admission(bytes))
            }
            Err(_) => Err(self),
        }
    }

    /// Waits for room for a frame of `size` bytes. Waiters are served in
    /// turn; the caller bounds the wait with its deadline.
    pub async fn room(self, size: usize) -> Result<Admission<'a>, LinkError> {
        let bytes = self.link.budget_share(size);
        let room = self
            .link
            .room
            .acquire_many(bytes)
            .await
            .map_err(|_| self.link.closed_error())?;
        room.forget();
        Ok(self.into_admission(bytes))
    }

    fn into_admission(self, bytes: u32) -> Admission<'a> {
        let link = self.link;
        std::mem::forget(self);
        Admission {
            link,
            bytes,
            used: false,
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.link.slots.add_permits(1);
    }
}

/// What a caller holds once it may queue: a place in the window and room
/// for its frame in the outbox. Queue the frame with it, or drop it to
/// give both back.
pub(crate) struct Admission<'a> {
    link: &'a Link,
    bytes: u32,
    used: bool,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.link.slots.add_permits(1);
            self.link.room.add_permits(self.bytes as usize);
        }
    }
}

/// The sending side of a connection, shared by every caller.
pub(crate) struct Link {
    pub peer: Identity,
    pub max_frame: usize,
    outbox: Mutex<Outbox>,
    /// Wakes the writer when the outbox goes from empty to not empty.
    queued: Notify,
    /// Writes the last reply of a burst without waking the writer (see
    /// [`Link::write_now`]); none on a detached link, or where the platform
    /// has none.
    direct: Option<transport::DirectWriter>,
    /// The reader holds whole frames it has not handed on yet: a reply
    /// made now would soon have company in the outbox.
    more_coming: AtomicBool,
    calls: Mutex<Calls>,
    /// Mirrors `calls.closed` for lock-free checks on the fast path.
    closed: AtomicBool,
    next_id: AtomicU64,
    /// Places in the peer's window still free (see [`WINDOW`]).
    slots: Semaphore,
    /// Bytes of user frames the outbox may still take (the byte budget).
    room: Semaphore,
    budget: usize,
    /// Bytes queued or being written: zero only once the writer has
    /// handed the last byte to the kernel.
    unwritten: AtomicUsize,
    /// Requests from the peer taken in and not answered yet.
    serving: AtomicUsize,
    /// Signalled when `serving` drops below [`MAX_IN_FLIGHT`] again.
    served: Notify,
    /// The peer's one-way messages finished and not yet credited back.
    credit_due: AtomicUsize,
    /// One-way messages sent and not yet credited back by the peer.
    uncredited: AtomicUsize,
    /// This process told the peer it is stopping.
    asked_to_go: AtomicBool,
    /// The peer acknowledged that: nothing but replies and credits follows.
    quiet: AtomicBool,
    /// This is the connection this process opened to its master (the only
    /// one whose loss stops it, and the only one its master speaks on).
    master: AtomicBool,
    /// Warnings this connection's peer caused, rate-limited.
    pub(crate) warnings: Mutex<crate::node::throttle::Throttle>,
}

impl Link {
    fn new(peer: Identity, max_frame: usize, budget: usize, direct: Option<transport::DirectWriter>) -> Link {
        let budget = budget.clamp(1, Semaphore::MAX_PERMITS);
        Link {
            peer,
            max_frame,
            outbox: Mutex::new(Outbox {
                chunks: VecDeque::new(),
                frames: BytesMut::with_capacity(WRITE_BUFFER),
                budgeted: 0,
                writing: false,
            }),
            queued: Notify::new(),
            direct,
            more_coming: AtomicBool::new(false),
            calls: Mutex::new(Calls {
                pending: PendingTable::default(),
                closed: None,
                gone_away: false,
            }),
            asked_to_go: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            master: AtomicBool::new(false),
            warnings: Mutex::new(crate::node::throttle::Throttle::default()),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            slots: Semaphore::new(WINDOW),
            room: Semaphore::new(budget),
            budget,
            unwritten: AtomicUsize::new(0),
            serving: AtomicUsize::new(0),
            served: Notify::new(),
            credit_due: AtomicUsize::new(0),
            uncredited: AtomicUsize::new(0),
        }
    }

    /// Marks this as the connection this process opened to its master.
    pub fn mark_master(&self) {
        self.master.store(true, Ordering::Release);
    }

    /// Whether this is the connection this process opened to its master.
    pub fn is_master(&self) -> bool {
        self.master.load(Ordering::Acquire)
    }

    /// Whether one more warning caused by this peer may be logged now (at
    /// most [`PER_WINDOW`](crate::node::throttle::PER_WINDOW) a second; the rest
    /// are counted and reported later in one line).
    pub fn warn_allowed(&self) -> bool {
        let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
        warnings.allow(&self.peer.path)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// No request from the peer is being handled and every byte queued has
    /// been written.
    pub fn is_idle(&self) -> bool {
        self.serving.load(Ordering::Acquire) == 0 && self.unwritten.load(Ordering::Acquire) == 0
    }

    fn closed_error(&self) -> LinkError {
        let reason = self.lock_calls().closed.clone();
        LinkError::Closed(reason.unwrap_or_else(|| "connection closed".to_owned()))
    }

    /// The bytes a frame of `size` takes from the budget: a frame larger
    /// than the whole budget takes all of it, and so goes alone.
    fn budget_share(&self, size: usize) -> u32 {
        size.min(self.budget).min(u32::MAX as usize) as u32
    }

    /// Takes a place in the window now, if one is free.
    pub fn try_slot(&self) -> Result<Slot<'_>, LinkError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let permit = self.slots.try_acquire().map_err(|_| LinkError::Full)?;
        permit.forget();
        Ok(Slot { link: self })
    }

    /// Waits for a place in the window. Waiters are served in turn, so one
    /// sender's messages keep their order; the caller bounds the wait with
    /// its deadline.
    pub async fn slot(&self) -> Result<Slot<'_>, LinkError> {
        let permit = self.slots.acquire().await.map_err(|_| self.closed_error())?;
        permit.forget();
        Ok(Slot { link: self })
    }

    /// Takes a place in the window and room for a frame of `size` bytes at
    /// once, or says why not.
    pub fn try_admit(&self, size: usize) -> Result<Admission<'_>, LinkError> {
        self.try_slot()?.try_room(size).map_err(|_| LinkError::Full)
    }

    /// Waits for a place in the window and room for a frame of `size` bytes.
    pub async fn admit(&self, size: usize) -> Result<Admission<'_>, LinkError> {
        self.slot().await?.room(size).await
    }

    /// Queues a request. For a user actor, `admission` is what
    /// [`admit`](Self::admit) gave; the runtime's own services pass `None`.
    /// With `reply`, returns the id and where the reply will arrive.
    pub fn request(
        &self,
        actor: &str,
        tag: &str,
        incarnation: u64,
        payload: &[u8],
        reply: bool,
        admission: Option<Admission<'_>>,
    ) -> Result<Option<ReplyWaiter>, LinkError> {
        self.request_payload(actor, tag, incarnation, Outgoing::Borrowed(payload), reply, admission)
    }

    /// [`request`](Self::request), with a payload the caller may hand
    /// over: a large one is written from where it is, never copied.
    pub fn request_payload(
        &self,
        actor: &str,
        tag: &str,
        incarnation: u64,
        payload: Outgoing<'_>,
        reply: bool,
        admission: Option<Admission<'_>>,
    ) -> Result<Option<ReplyWaiter>, LinkError> {
        let slotted = admission.is_some();
        debug_assert_eq!(slotted, takes_slot(actor), "user messages take a place in the window");
        let sequence = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Encoded, checked and queued under the lock that `close` and a
        // peer's `GoAway` take: a request is either refused (and its
        // admission, dropped, gives its room back), or queued before the
        // close fails it / before the `GoAwayAck` that promises the peer
        // nothing more. Its id is its place in the table of pending calls.
        let mut calls = self.lock_calls();
        let id = if reply {
            calls.pending.next_id(sequence)
        } else {
            sequence
        };
        match &calls.closed {
            Some(reason) => return Err(LinkError::Closed(reason.clone())),
            None if calls.gone_away && slotted => return Err(LinkError::GoingAway),
            None => {}
        }
        let request = Request {
            id,
            actor,
            tag,
            incarnation,
            reply,
            payload: &[],
        };
        let budgeted = admission.as_ref().map_or(0, |admission| admission.bytes as usize);
        // Whether the frame is written from here: see the second arm.
        let direct = match payload {
            // A payload handed over stays where it is unless it is small:
            // only the head is encoded here; the writer's vectored writes
            // send it.
            Outgoing::Shared(payload) if payload.len() >= WRITTEN_IN_PLACE => {
                let frame = Frame::Request(Request {
                    payload: &payload,
                    ..request
                });
                self.queue_in_place(&frame, &payload, budgeted)
                    .map_err(|size| LinkError::TooLarge { size })?;
                false
            }
            // Anything else is encoded whole, in one pass, straight into
            // the outbox. A call with no other waiting on this connection
            // (a lone call, one instance of a round robin or a broadcast)
            // is written from here, as the last reply in hand is (see
            // `write_now`); the calls of a pipeline, and one-way messages,
            // wake the writer, which writes them in batches.
            payload => {
                let direct = reply && calls.pending.is_empty();
                let frame = Frame::Request(Request {
                    payload: payload.as_slice(),
                    ..request
                });
                self.encode_frame(
                    &frame,
                    budgeted,
                    self.max_frame,
                    if direct { Then::Wait } else { Then::WakeWriter },
                )
                .map_err(|size| LinkError::TooLarge { size })?;
                direct
            }
        };
        if let Some(mut admission) = admission {
            admission.used = true;
        }
        let waiter = reply.then(|| {
            calls.pending.insert(
                id,
                Pending {
                    reply: Awaited::Waiting(None),
                    slotted,
                },
            );
            id
        });
        if slotted && !reply {
            self.uncredited.fetch_add(1, Ordering::AcqRel);
        }
        // Its reply may now be taken by the reader, which needs the lock.
        drop(calls);
        if direct {
            self.write_now();
        }
        Ok(waiter)
    }

    /// Queues `frame`, whose last field is `payload`, without copying the
    /// payload: its head is copied into the outbox and the
    /// payload written from where it is (after what was queued before it,
    /// before what is queued after). Queues nothing, and gives the frame's
    /// size, when it is over the maximum frame length.
    fn queue_in_place(&self, frame: &Frame<'_>, payload: &Bytes, budgeted: usize) -> Result<(), usize> {
        with_scratch(|head| {
            let rest = frame.encode_head_into(head).expect("a frame always encodes");
            debug_assert_eq!(rest.len(), payload.len(), "the payload is the frame's last field");
            let len = head.len() + rest.len();
            let header = match u32::try_from(len) {
                Ok(header) if len <= self.max_frame => frame_header(header),
                _ => return Err(len),
            };
            let was_empty = {
                let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
                let Outbox { chunks, frames, .. } = &mut *outbox;
                let was_empty = frames.is_empty() && chunks.is_empty();
                frames.extend_from_slice(&header);
                frames.extend_from_slice(head);
                chunks.push_back(frames.split().freeze());
                chunks.push_back(payload.clone());
                self.unwritten.fetch_add(header.len() + len, Ordering::AcqRel);
                outbox.budgeted += budgeted;
                was_empty
            };
            if was_empty {
                self.queued.notify_one();
            }
            Ok(())
        })
    }

    /// Encodes `frame` straight into the outbox, after its length: a small
    /// frame is written once, where the writer takes it from. Queues
    /// nothing, and gives the frame's size, when it is over `max` bytes.
    fn queue_frame(&self, frame: &Frame<'_>, budgeted: usize, max: usize) -> Result<(), usize> {
        self.encode_frame(frame, budgeted, max, Then::WakeWriter)
    }

    /// [`queue_frame`](Self::queue_frame), followed by what `then` says:
    /// waking the writer, writing at once, or nothing (the caller writes).
    fn encode_frame(&self, frame: &Frame<'_>, budgeted: usize, max: usize, then: Then) -> Result<(), usize> {
        let (was_empty, written) = {
            let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            let Outbox { chunks, frames, .. } = &mut *outbox;
            let was_empty = frames.is_empty() && chunks.is_empty();
            let start = frames.len();
            frames.put_slice(&frame_header(0));
            frame.encode_into(frames).expect("a frame always encodes");
            let len = frames.len() - start - 4;
            let header = match u32::try_from(len) {
                Ok(header) if len <= max => frame_header(header),
                _ => {
                    frames.truncate(start);
                    return Err(len);
                }
            };
            frames[start..start + 4].copy_from_slice(&header);
            outbox.budgeted += budgeted;
            let written = match then {
                Then::WriteNow => Some(self.write_locked(&mut outbox, 4 + len)),
                Then::WakeWriter | Then::Wait => {
                    self.unwritten.fetch_add(4 + len, Ordering::AcqRel);
                    None
                }
            };
            (was_empty, written)
        };
        match written {
            Some(written) => self.after_writing(written),
            None if was_empty && matches!(then, Then::WakeWriter) => self.queued.notify_one(),
            None => {}
        }
        Ok(())
    }

    /// Writes what the outbox holds, `queued` bytes of it just added and
    /// not yet counted as unwritten, as far as the socket takes it without
    /// waiting (see [`write_now`](Self::write_now)). Counts under the lock,
    /// as the writer counts what it takes under it, so the count never dips
    /// below what the outbox holds; and a frame written as it was queued
    /// leaves the count where it was, untouched.
    fn write_locked(&self, outbox: &mut Outbox, queued: usize) -> Written {
        let free = !outbox.writing && outbox.chunks.is_empty() && !self.is_closed();
        // Full, or failed: the writer finds out and acts on it.
        let written = match &self.direct {
            Some(direct) if free => direct.try_write(&outbox.frames).unwrap_or(0),
            _ => 0,
        };
        let (budgeted, rest) = if written == outbox.frames.len() {
            outbox.frames.clear();
            // A batch's budget goes back once all of it is written.
            (std::mem::take(&mut outbox.budgeted), false)
        } else {
            outbox.frames.advance(written);
            (0, true)
        };
        let emptied = match queued.cmp(&written) {
            std::cmp::Ordering::Less => {
                let gone = written - queued;
                self.unwritten.fetch_sub(gone, Ordering::SeqCst) == gone
            }
            std::cmp::Ordering::Greater => {
                self.unwritten.fetch_add(queued - written, Ordering::AcqRel);
                false
            }
            std::cmp::Ordering::Equal => false,
        };
        Written {
            emptied,
            budgeted,
            rest,
        }
    }

    /// What follows a write made under the outbox's lock, once it is let go.
    fn after_writing(&self, written: Written) {
        if written.emptied {
            super::drain_progress();
        }
        if written.budgeted > 0 {
            self.room.add_permits(written.budgeted);
        }
        if written.rest {
            self.queued.notify_one();
        }
    }

    /// Writes what the outbox holds from this thread, now, as far as the
    /// socket takes it without waiting; leaves the rest to the writer task
    /// (woken). Only while the writer is not writing a batch of its own
    /// (which keeps the bytes in order) and no large payload waits (those
    /// go out with vectored writes, by the writer).
    ///
    /// Waking the writer task costs a request about as much as the write
    /// itself, so the last reply of a burst, and a call with no other
    /// waiting on the connection, are written from where they were made:
    /// one task wake-up fewer per request on each side of a connection
    /// that carries one call at a time, and nothing changes for a burst or
    /// a pipeline, whose other frames wake the writer as before.
    fn write_now(&self) {
        let written = {
            let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            if outbox.frames.is_empty() {
                return;
            }
            self.write_locked(&mut outbox, 0)
        };
        self.after_writing(written);
    }

    /// The reply to request `id`, once it arrived (or the connection
    /// ended); until then, `cx` is woken when it does.
    pub fn poll_reply(&self, id: u64, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut calls = self.lock_calls();
        let Some(pending) = calls.pending.get_mut(id) else {
            // Taken or cancelled already: a caller polled after it ended.
            return Poll::Ready(Err(Failure::Closed("the request has ended".to_owned())));
        };
        match &mut pending.reply {
            Awaited::Waiting(waker) => {
                match waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Awaited::Arrived(_) => {
                let Some(Pending {
                    reply: Awaited::Arrived(outcome),
                    ..
                }) = calls.pending.remove(id)
                else {
                    unreachable!("matched just above")
                };
                Poll::Ready(outcome)
            }
            Awaited::Abandoned => Poll::Ready(Err(Failure::Closed("the request was cancelled".to_owned()))),
        }
    }

    /// Forgets a request whose caller stopped waiting. Its place in the
    /// window stays taken until the reply comes: the peer is still on it.
    pub fn cancel(&self, id: u64) {
        let mut calls = self.lock_calls();
        match calls.pending.get_mut(id) {
            Some(pending) if pending.slotted && matches!(pending.reply, Awaited::Waiting(_)) => {
                // Keep the entry, without its caller: the late reply gives
                // the place back (at most a window of these per peer).
                pending.reply = Awaited::Abandoned;
            }
            Some(_) => {
                calls.pending.remove(id);
            }
            None => {}
        }
    }

    fn lock_calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a reply to its caller. Returns whether it frees a place in
    /// the window: the reader gives places back in batches
    /// ([`free_slots`](Self::free_slots)), not one lock per reply.
    #[must_use]
    fn complete(&self, id: u64, result: Result<Payload, WireError>) -> bool {
        let mut calls = self.lock_calls();
        let Some(pending) = calls.pending.get_mut(id) else {
            drop(calls);
            debug!(peer = %self.peer.path, id, "reply for a request nobody waits for");
            return false;
        };
        let slotted = pending.slotted;
        let waker = match std::mem::replace(&mut pending.reply, Awaited::Arrived(result.map_err(Failure::Wire))) {
            Awaited::Waiting(waker) => waker,
            Awaited::Abandoned | Awaited::Arrived(_) => {
                calls.pending.remove(id);
                None
            }
        };
        drop(calls);
        if let Some(waker) = waker {
            waker.wake();
        }
        slotted
    }

    /// Gives `count` places in the window back.
    fn free_slots(&self, count: usize) {
        if count > 0 {
            self.slots.add_permits(count);
        }
    }

    /// The peer finished `count` one-way messages: their places are free.
    fn credited(&self, count: u32) {
        // A peer cannot give back more than it was sent: a bogus credit
        // must not lift the bound.
        let mut given = 0;
        let _ = self
            .uncredited
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |uncredited| {
                given = uncredited.min(count as usize);
                Some(uncredited - given)
            });
        self.slots.add_permits(given);
    }

    fn reply(&self, id: u64, result: Result<Vec<u8>, WireError>) {
        // The answer to the only request in hand, with none waiting in the
        // reader: written from here (see `write_now`).
        let direct = self.serving.load(Ordering::Acquire) == 1 && !self.more_coming.load(Ordering::Acquire);
        let then = if direct { Then::WriteNow } else { Then::WakeWriter };
        // Replies take no room from the budget: they must never wait
        // behind requests (two processes calling each other would
        // deadlock), and the window already bounds them.
        let size = match result {
            // Handed over as it is: a large one is not copied again.
            Ok(payload) if payload.len() >= LARGE_PAYLOAD => {
                let payload = Bytes::from(payload);
                let frame = Frame::Reply(Reply {
                    id,
                    result: Ok(ReplyPayload(&payload)),
                });
                let queued = self.queue_in_place(&frame, &payload, 0);
                if direct {
                    self.write_now();
                }
                queued
            }
            // Encoded into the outbox; its buffer serves the next reply.
            Ok(payload) => {
                let frame = Frame::Reply(Reply {
                    id,
                    result: Ok(ReplyPayload(&payload)),
                });
                let queued = self.encode_frame(&frame, 0, self.max_frame, then);
                recycle_small(payload);
                queued
            }
            Err(error) => {
                let frame = Frame::Reply(Reply { id, result: Err(error) });
                self.encode_frame(&frame, 0, self.max_frame, then)
            }
        };
        if let Err(size) = size {
            warn!(peer = %self.peer.path, size, "reply over the maximum frame length; sending an error instead");
            let too_large = WireError::ReplyTooLarge {
                size,
                max: self.max_frame,
            };
            let frame = Frame::Reply(Reply {
                id,
                result: Err(too_large),
            });
            self.encode_frame(&frame, 0, usize::MAX, then)
                .expect("nothing is over usize::MAX bytes");
        }
    }

    /// Gives the places of finished one-way messages back to the peer.
    fn flush_credit(&self) {
        let count = self.credit_due.swap(0, Ordering::AcqRel);
        if count > 0 && !self.is_closed() {
            self.queue_control(&Frame::Credit(Credit { count: count as u32 }));
        }
    }

    /// Tells the peer this process is stopping: it sends no new requests
    /// here, and acknowledges once nothing more will follow.
    pub fn go_away(&self) {
        if self.asked_to_go.swap(true, Ordering::AcqRel) || self.is_closed() {
            return;
        }
        self.queue_control(&Frame::GoAway);
    }

    /// Whether the peer can send nothing more here but replies and credits
    /// (it acknowledged [`go_away`](Self::go_away)), or the link is closed.
    pub fn is_quiet(&self) -> bool {
        self.is_closed() || self.quiet.load(Ordering::Acquire)
    }

    /// The peer is stopping: refuse new requests to it from now on, and
    /// acknowledge after everything already queued.
    fn peer_going_away(&self) {
        let mut calls = self.lock_calls();
        calls.gone_away = true;
        self.queue_control(&Frame::GoAwayAck);
    }

    /// Queues one of the runtime's few-byte control frames.
    fn queue_control(&self, frame: &Frame<'_>) {
        // A few bytes: not held to the frame limit.
        self.queue_frame(frame, 0, usize::MAX)
            .expect("nothing is over usize::MAX bytes");
    }

    /// Marks the link dead and fails every request waiting on it: their
    /// callers get `Disconnected` at once rather than at their deadline.
    fn close(&self, reason: String) {
        let wakers: Vec<Waker> = {
            let mut calls = self.lock_calls();
            if calls.closed.is_some() {
                return;
            }
            calls.closed = Some(reason.clone());
            self.closed.store(true, Ordering::Release);
            // Nobody will take what abandoned requests get; replies that
            // arrived stay for their callers.
            calls
                .pending
                .retain(|pending| !matches!(pending.reply, Awaited::Abandoned));
            calls
                .pending
                .values_mut()
                .filter(|pending| matches!(pending.reply, Awaited::Waiting(_)))
                .filter_map(|pending| {
                    let closed = Awaited::Arrived(Err(Failure::Closed(reason.clone())));
                    match std::mem::replace(&mut pending.reply, closed) {
                        Awaited::Waiting(waker) => waker,
                        _ => None,
                    }
                })
                .collect()
        };
        // Callers waiting for room get `Closed` too.
        self.slots.close();
        self.room.close();
        for waker in wakers {
            waker.wake();
        }
        // A drain waiting for this connection need not any more.
        super::drain_progress();
    }
}

/// Answers one request, from whichever thread handles it: replies, or
/// gives a one-way message's place in the window back, and counts the
/// request as done. Every request taken in gets one; dropping it unanswered
/// answers that the actor stopped.
pub(crate) struct Responder {
    to: AnswerTo,
    reply: bool,
    /// For the answer of a responder dropped unanswered.
    actor: &'static str,
    answered: bool,
}

/// Where a [`Responder`]'s answer goes.
enum AnswerTo {
    /// The peer of a connection, as a reply frame (or a credit).
    Peer {
        node: Arc<Node>,
        link: Arc<Link>,
        id: u64,
        slotted: bool,
        started: Option<std::time::Instant>,
    },
    /// A task of this process that relays it (a request from another host).
    Channel(Option<tokio::sync::oneshot::Sender<Result<Vec<u8>, WireError>>>),
}

/// What a [`Responder::channel`] hands its answer to.
pub(crate) type Answered = tokio::sync::oneshot::Receiver<Result<Vec<u8>, WireError>>;

impl Responder {
    /// A responder whose answer (or its absence) is received from the
    /// returned channel rather than sent to a connection's peer.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub fn channel(reply: bool) -> (Responder, Answered) {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let responder = Responder {
            to: AnswerTo::Channel(Some(sender)),
            reply,
            actor: "(a service)",
            answered: false,
        };
        (responder, receiver)
    }

    /// Whether the caller waits for a reply (a one-way message's result is
    /// not encoded).
    pub fn wants_reply(&self) -> bool {
        self.reply
    }

    /// Names the actor that will answer, for the error sent if it never does.
    pub fn for_actor(&mut self, actor: &'static str) {
        self.actor = actor;
    }

    /// Sends the answer (when one is wanted) and frees the request's place.
    pub fn answer(mut self, result: Result<Vec<u8>, WireError>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<Vec<u8>, WireError>) {
        self.answered = true;
        let (node, link, id, slotted, started) = match &mut self.to {
            AnswerTo::Peer {
                node,
                link,
                id,
                slotted,
                started,
            } => (node, &**link, *id, *slotted, *started),
            AnswerTo::Channel(sender) => {
                if let Some(sender) = sender.take() {
                    let _ = sender.send(result);
                }
                return;
            }
        };
        if slotted {
            node.stats.handled(started, result.is_err());
        }
        if self.reply {
            link.reply(id, result);
        } else if slotted {
            let due = link.credit_due.fetch_add(1, Ordering::AcqRel) + 1;
            if due >= CREDIT_BATCH {
                link.flush_credit();
            }
        }
        let before = link.serving.fetch_sub(1, Ordering::SeqCst);
        if before == 1 {
            // Out of work: whatever is due goes back now.
            link.flush_credit();
            super::drain_progress();
        } else if before == MAX_IN_FLIGHT {
            link.served.notify_one();
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered {
            let actor = self.actor.to_owned();
            self.finish(Err(WireError::Stopped { actor }));
        }
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
    // Small frames until the peer has proved the cookie: a stranger cannot
    // make this process reserve the full frame limit.
    let io = transport::into_io(stream).map_err(HandshakeError::Io)?;
    let mut framed = Framed::new(io, codec(handshake::MAX_HANDSHAKE_FRAME));
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
    let decoder = FrameDecoder::new(codec(max_frame)).rewinding_below(READ_BUFFER - REWIND_AFTER);
    let mut reader = FramedRead::with_capacity(read_half, decoder, READ_BUFFER);
    reader.read_buffer_mut().extend_from_slice(&parts.read_buf);

    let direct = transport::direct(&write_half);
    let link = Arc::new(Link::new(peer, max_frame, node.config.outbox_budget, direct));
    // On the actix arbiter's local task set, like the actors they serve:
    // waking across that boundary would cost the runtime a syscall.
    let write_task = actix_rt::spawn(write_loop(link.clone(), write_half));
    actix_rt::spawn({
        let link = link.clone();
        async move {
            let reason = read_loop(&node, &link, reader).await;
            write_task.abort();
            // The count of warnings held back is never lost.
            link.warnings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .flush(&link.peer.path);
            debug!(peer = %link.peer.path, %reason, "connection closed");
            link.close(reason);
            // Nothing more will be written: a drain must not wait for it.
            link.unwritten.store(0, Ordering::SeqCst);
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
            let result = f(&mut body);
            shrink(&mut body);
            result
        }
        Err(_) => f(&mut Vec::new()),
    })
}

thread_local! {
    /// A small reply's buffer, copied into its frame and kept for the next
    /// small reply encoded on this thread (one allocation fewer per reply).
    static SMALL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Small replies are encoded into buffers of about this size.
const SMALL_BUFFER: usize = 256;

/// An empty buffer for a small reply: this thread's spare one, if any.
pub(crate) fn small_buffer() -> Vec<u8> {
    let spare = SMALL.try_with(|small| small.take()).unwrap_or_default();
    if spare.capacity() == 0 {
        Vec::with_capacity(SMALL_BUFFER)
    } else {
        spare
    }
}

/// Keeps a small reply's buffer, once copied, for the next one (not one
/// that grew large: its memory goes back).
fn recycle_small(mut buffer: Vec<u8>) {
    if buffer.capacity() <= 4 * SMALL_BUFFER {
        buffer.clear();
        let _ = SMALL.try_with(|small| small.replace(buffer));
    }
}

thread_local! {
    /// A large payload's buffer, written and kept for the next large
    /// payload encoded on this thread: its pages are already there, where a
    /// fresh buffer would fault each one in. Dropped by the writer that kept
    /// it once [`KEEP_SPARE`] passed since its last large write.
    static SPARE: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// How long a written large payload's buffer is kept for the next one.
const KEEP_SPARE: Duration = Duration::from_millis(200);

/// An empty buffer for encoding a payload of `size` bytes: the spare one of
/// this thread if it is large enough, else a fresh one of exactly `size`.
pub(crate) fn large_buffer(size: usize) -> Vec<u8> {
    let spare = SPARE.with(|spare| spare.borrow_mut().take_if(|buffer| buffer.capacity() >= size));
    match spare {
        Some(mut buffer) => {
            buffer.clear();
            buffer
        }
        None => Vec::with_capacity(size),
    }
}

/// Keeps a written payload's buffer as this thread's spare (when nothing
/// else holds it). Whether this thread has a spare now.
fn recycle(written: Bytes) -> bool {
    debug_assert!(written.is_empty(), "only written chunks are recycled");
    if written.is_unique() {
        // Fully written, so nothing is copied: the allocation comes back.
        let buffer = Vec::from(written);
        if buffer.capacity() >= LARGE_PAYLOAD {
            SPARE.with(|spare| *spare.borrow_mut() = Some(buffer));
        }
    }
    SPARE.with(|spare| spare.borrow().is_some())
}

fn drop_spare() {
    // Not while the thread's locals are being destroyed: nothing to give back then.
    let _ = SPARE.try_with(|spare| spare.borrow_mut().take());
}

/// Drops this thread's spare buffer when a writer ends (a connection that
/// closes must not leave one behind).
struct DropSpare;

impl Drop for DropSpare {
    fn drop(&mut self) {
        drop_spare();
    }
}

thread_local! {
    /// The received frame being decoded on this thread, so that bytes in
    /// it decode as slices of it instead of copies (`SharedBytes`).
    static DECODING: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Frames shorter than this are decoded without sharing: copying their few
/// bytes costs less than setting the frame aside for slicing.
const SHARE_FROM: usize = 4096;

/// Runs `f` (which decodes from `frame`) with `frame` as the frame being
/// decoded on this thread, when it is large enough to be worth slicing.
pub(crate) fn decoding<T>(frame: &Bytes, f: impl FnOnce() -> T) -> T {
    if frame.len() < SHARE_FROM {
        return f();
    }
    /// Puts back what was there, even if `f` panics.
    struct Restore(Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            let _ = DECODING.try_with(|decoding| *decoding.borrow_mut() = previous);
        }
    }
    let _restore = Restore(DECODING.with(|decoding| decoding.replace(Some(frame.clone()))));
    f()
}

/// `bytes` as a slice of the frame being decoded on this thread, when
/// they lie in it (no copy); `None` otherwise.
pub(crate) fn frame_slice(bytes: &[u8]) -> Option<Bytes> {
    DECODING.with(|decoding| {
        let decoding = decoding.borrow();
        let frame = decoding.as_ref()?;
        let inside = frame.as_ptr_range();
        let within = inside.start <= bytes.as_ptr() && bytes.as_ptr_range().end <= inside.end;
        within.then(|| frame.slice_ref(bytes))
    })
}

/// Gives back a scratch buffer that one large message made large.
pub(crate) fn shrink(buffer: &mut Vec<u8>) {
    if buffer.capacity() > KEEP_BUFFER {
        *buffer = Vec::with_capacity(1024);
    }
}

/// Writes whatever the outbox holds, one write per batch, and gives the
/// batch's bytes back to the budget once the kernel has them.
async fn write_loop(link: Arc<Link>, mut io: WriteHalf) {
    let mut batch = BytesMut::with_capacity(WRITE_BUFFER);
    let mut chunks = VecDeque::new();
    // Until when this thread's spare large buffer is kept (see `SPARE`).
    let mut spare_until: Option<tokio::time::Instant> = None;
    let _drop_spare = DropSpare;
    loop {
        let budgeted = {
            let mut outbox = link.outbox.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut outbox.frames, &mut batch);
            std::mem::swap(&mut outbox.chunks, &mut chunks);
            outbox.writing = !(batch.is_empty() && chunks.is_empty());
            std::mem::take(&mut outbox.budgeted)
        };
        if batch.is_empty() && chunks.is_empty() {
            match spare_until {
                Some(until) => tokio::select! {
                    () = link.queued.notified() => {}
                    () = tokio::time::sleep_until(until) => {
                        drop_spare();
                        spare_until = None;
                    }
                },
                None => link.queued.notified().await,
            }
            continue;
        }
        let bytes = batch.len() + chunks.iter().map(Bytes::len).sum::<usize>();
        let mut kept = false;
        let written = if chunks.is_empty() {
            io.write_all(&batch).await
        } else {
            write_chunks(&mut io, &mut chunks, &batch, &mut kept).await
        };
        if let Err(error) = written {
            link.close(format!("write failed: {error}"));
            link.unwritten.store(0, Ordering::SeqCst);
            return;
        }
        if link.unwritten.fetch_sub(bytes, Ordering::SeqCst) == bytes {
            super::drain_progress();
        }
        link.room.add_permits(budgeted);
        // Kept for a while after the last large write, even while small
        // frames keep the writer busy.
        if kept {
            spare_until = Some(tokio::time::Instant::now() + KEEP_SPARE);
        } else if spare_until.is_some_and(|until| tokio::time::Instant::now() >= until) {
            drop_spare();
            spare_until = None;
        }
        if batch.capacity() > KEEP_BUFFER {
            batch = BytesMut::with_capacity(WRITE_BUFFER);
        } else {
            batch.clear();
        }
    }
}

/// Writes `chunks`, then `tail`, with vectored writes: a large payload goes
/// to the kernel from the buffer it was encoded into. Empties `chunks` (so
/// a large payload's memory is given back as soon as it is written).
/// A large payload's buffer, once written, is kept as this thread's spare
/// (`spare` says whether one is kept).
async fn write_chunks(
    io: &mut WriteHalf,
    chunks: &mut VecDeque<Bytes>,
    mut tail: &[u8],
    spare: &mut bool,
) -> std::io::Result<()> {
    loop {
        while chunks.front().is_some_and(Bytes::is_empty) {
            chunks.pop_front();
        }
        if chunks.is_empty() {
            return io.write_all(tail).await;
        }
        let mut written = {
            let mut slices: Vec<IoSlice<'_>> = chunks.iter().take(MAX_SLICES).map(|c| IoSlice::new(c)).collect();
            if chunks.len() < MAX_SLICES && !tail.is_empty() {
                slices.push(IoSlice::new(tail));
            }
            io.write_vectored(&slices).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            match chunks.front_mut() {
                Some(front) => {
                    let step = written.min(front.len());
                    front.advance(step);
                    written -= step;
                    if front.is_empty() {
                        if let Some(written) = chunks.pop_front() {
                            *spare = recycle(written);
                        }
                    }
                }
                None => {
                    tail = &tail[written..];
                    written = 0;
                }
            }
        }
    }
}

/// Reads frames until the connection ends; returns why it ended.
///
/// It keeps reading while the actors work: the peer's window bounds what
/// it may have in flight here, so replies to this process's own requests
/// are never stuck behind requests it has no room for.
async fn read_loop(node: &Arc<Node>, link: &Arc<Link>, mut frames: FramedRead<ReadHalf, FrameDecoder>) -> String {
    // Answers of the runtime's own services that are not ready at once;
    // actors answer from their own threads through their `Responder`s.
    let mut in_flight = FuturesUnordered::new();
    let mut hosted = HostedCache::default();
    // Places in the window that replies freed, given back once no complete
    // frame is left to read (or enough of them gathered).
    let mut freed = 0;
    // A large frame's buffer (see `FrameDecoder`) is kept while large
    // frames keep coming (the next one reuses it: no fresh pages to fault
    // in), and given back once none came for `KEEP_LARGE_READ_BUFFER`.
    let give_back = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(give_back);
    let mut holding_large = false;
    loop {
        if freed >= CREDIT_BATCH || (freed > 0 && !frames.decoder().whole_frame_in(frames.read_buffer())) {
            link.free_slots(std::mem::take(&mut freed));
        }
        let room = link.serving.load(Ordering::Acquire) < MAX_IN_FLIGHT;
        // A frame already read is taken without the select's bookkeeping,
        // which costs as much as handling a small frame; the other branches
        // get their turn when the buffer runs dry, after at most one
        // buffer's worth of frames.
        let whole = room && frames.decoder().whole_frame_in(frames.read_buffer());
        // Read by whoever answers a request taken in before this one.
        link.more_coming.store(whole, Ordering::Release);
        let ready = if whole {
            futures_util::FutureExt::now_or_never(frames.next())
        } else {
            None
        };
        let next = if ready.is_some() {
            ready
        } else {
            tokio::select! {
                biased;
                () = &mut give_back, if holding_large => {
                    holding_large = false;
                    release_read_buffer(&mut frames);
                    None
                }
                Some(()) = in_flight.next(), if !in_flight.is_empty() => None,
                () = link.served.notified(), if !room => None,
                frame = frames.next(), if room => Some(frame),
            }
        };
        let Some(frame) = next else {
            continue;
        };
        match frame {
            None => return "closed by the peer".to_owned(),
            Some(Err(error)) if is_disconnect(&error) => return format!("connection lost: {error}"),
            Some(Err(error)) => {
                warn!(peer = %clip(&link.peer.path), %error, "dropping the connection: unreadable frame");
                return format!("unreadable frame: {error}");
            }
            Some(Ok(body)) => {
                // Large frames only: small ones flowing meanwhile must not
                // keep a large buffer alive.
                let large = body.len() >= OWN_BUFFER_FROM;
                match Frame::decode_recalling(&body, hosted.recalled()) {
                    Err(error) => {
                        if link.warn_allowed() {
                            warn!(peer = %clip(&link.peer.path), %error, "ignored a malformed frame");
                        }
                    }
                    Ok(Frame::Reply(reply)) => {
                        let result = reply.result.map(|p| Payload::detach(&body, p.0));
                        freed += usize::from(link.complete(reply.id, result));
                    }
                    Ok(Frame::Credit(credit)) => link.credited(credit.count),
                    Ok(Frame::GoAway) => link.peer_going_away(),
                    Ok(Frame::GoAwayAck) => {
                        link.quiet.store(true, Ordering::SeqCst);
                        super::drain_progress();
                    }
                    Ok(Frame::Request(request)) => {
                        let slotted = takes_slot(request.actor);
                        // The runtime's own traffic is not the actors' work.
                        let started = if slotted { node.stats.received() } else { None };
                        link.serving.fetch_add(1, Ordering::AcqRel);
                        let responder = Responder {
                            to: AnswerTo::Peer {
                                node: node.clone(),
                                link: link.clone(),
                                id: request.id,
                                slotted,
                                started,
                            },
                            reply: request.reply,
                            actor: "(a service)",
                            answered: false,
                        };
                        match node.dispatch(
                            Some(link),
                            &request,
                            Payload::detach(&body, request.payload),
                            responder,
                            &mut hosted,
                        ) {
                            Ok(Some(later)) => in_flight.push(later),
                            Ok(None) => {}
                            Err((responder, error)) => {
                                node.refused(link, &request, &error);
                                responder.answer(Err(error));
                            }
                        }
                    }
                }
                if large {
                    holding_large = true;
                    give_back
                        .as_mut()
                        .reset(tokio::time::Instant::now() + KEEP_LARGE_READ_BUFFER);
                }
            }
        }
    }
}

/// A part of a frame that outlives the reader's turn (a request's payload
/// on its way to the actor, a reply on its way to its caller).
///
/// A small one is copied out, inline, with no allocation: a slice would
/// keep the whole read buffer shared, and the next read would then
/// allocate a fresh buffer and copy what is left into it. A large one has
/// its own allocation anyway and is shared, not copied.
pub(crate) enum Payload {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Bytes),
}

/// Parts of frames up to this size are copied inline.
const INLINE: usize = 62;

impl Payload {
    /// `part` of `body`, for as long as it is needed.
    pub(crate) fn detach(body: &Bytes, part: &[u8]) -> Payload {
        match u8::try_from(part.len()) {
            Ok(len) if part.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..part.len()].copy_from_slice(part);
                Payload::Inline { len, bytes }
            }
            _ => Payload::Shared(body.slice_ref(part)),
        }
    }
}

impl Payload {
    /// Runs `decode` on these bytes; bytes in a large one decode as slices
    /// of it rather than copies (`SharedBytes`).
    pub(crate) fn decode<T>(&self, decode: impl FnOnce(&[u8]) -> T) -> T {
        match self {
            Payload::Inline { .. } => decode(self),
            Payload::Shared(frame) => decoding(frame, || decode(frame)),
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Payload::Shared(bytes) => bytes,
        }
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

/// How long a read buffer grown for a large frame is kept for the next one.
const KEEP_LARGE_READ_BUFFER: Duration = Duration::from_millis(200);

/// After large frames, gives their kept buffer back, and moves what is
/// left of the read buffer to a fresh small one: an allocation sized for
/// the largest of them would otherwise stay with the connection for its
/// lifetime.
fn release_read_buffer(frames: &mut FramedRead<ReadHalf, FrameDecoder>) {
    frames.decoder_mut().release();
    let buffer = frames.read_buffer_mut();
    let mut fresh = BytesMut::with_capacity(READ_BUFFER.max(buffer.len()));
    fresh.extend_from_slice(buffer);
    *buffer = fresh;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply for a request whose slot a newer request took finds the
    /// newer id there, and is ignored; ids index the table directly.
    #[test]
    fn a_stale_id_never_reaches_a_newer_request() {
        let waiting = || Pending {
            reply: Awaited::Waiting(None),
            slotted: false,
        };
        let mut table = PendingTable::default();
        let first = table.next_id(7);
        table.insert(first, waiting());
        assert_eq!(slot_of(first), 0);
        assert!(table.remove(first).is_some());
        let second = table.next_id(8);
        table.insert(second, waiting());
        assert_eq!(slot_of(second), slot_of(first), "the slot is reused");
        assert_ne!(first, second);
        assert!(table.get_mut(first).is_none(), "the old id is gone");
        assert!(table.remove(first).is_none());
        assert!(table.get_mut(second).is_some());
        let third = table.next_id(9);
        table.insert(third, waiting());
        assert_eq!(slot_of(third), 1);
        table.retain(|_| false);
        assert!(table.get_mut(second).is_none() && table.get_mut(third).is_none());
    }

    fn detached(budget: usize) -> Link {
        let peer = Identity {
            cluster: "test".into(),
            path: "test/peer".into(),
            incarnation: 1,
        };
        Link::new(peer, 1 << 20, budget, None)
    }

    /// Many threads call while the connection closes under them: every call
    /// is either refused at once or completed by the close — none is left
    /// waiting for a reply that can no longer come.
    #[test]
    fn closing_while_many_threads_call_leaves_no_caller_waiting() {
        const THREADS: usize = 8;
        const CALLS: usize = 300;
        for round in 0..200 {
            let link = Arc::new(detached(usize::MAX));
            let barrier = Arc::new(std::sync::Barrier::new(THREADS + 1));
            let callers: Vec<_> = (0..THREADS)
                .map(|_| {
                    let link = link.clone();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        let mut waiters = Vec::new();
                        for _ in 0..CALLS {
                            match link.request("evilcluster.test", "t", 1, b"\xc0", true, None) {
                                Ok(Some(waiter)) => waiters.push(waiter),
                                Ok(None) => unreachable!("a reply was asked for"),
                                Err(LinkError::Closed(_)) => {}
                                Err(other) => panic!("unexpected {other:?}"),
                            }
                        }
                        waiters
                    })
                })
                .collect();
            barrier.wait();
            // Let the callers get going, then close in the middle of them.
            std::thread::yield_now();
            link.close(format!("closed in round {round}"));
            for caller in callers {
                let waker = futures_util::task::noop_waker();
                let mut cx = Context::from_waker(&waker);
                for waiter in caller.join().unwrap() {
                    match link.poll_reply(waiter, &mut cx) {
                        Poll::Ready(Err(Failure::Closed(reason))) if reason == format!("closed in round {round}") => {}
                        other => panic!("round {round}: a caller was left with {other:?}"),
                    }
                }
            }
        }
    }

    /// The window admits exactly [`WINDOW`] user messages; replies and
    /// credits give places back, and a bogus credit cannot lift the bound.
    #[test]
    fn the_window_bounds_messages_in_flight() {
        let link = detached(usize::MAX);
        let mut ids = Vec::new();
        for _ in 0..WINDOW {
            let admission = link.try_admit(100).expect("room in the window");
            let id = link
                .request("user", "t", 1, b"\xc0", true, Some(admission))
                .unwrap()
                .unwrap();
            ids.push(id);
        }
        assert!(matches!(link.try_admit(100), Err(LinkError::Full)));
        assert!(link.complete(ids[0], Ok(Payload::Shared(Bytes::new()))));
        link.free_slots(1);
        let admission = link.try_admit(100).expect("a reply gives its place back");
        link.request("user", "t", 1, b"\xc0", false, Some(admission)).unwrap();
        assert!(matches!(link.try_admit(100), Err(LinkError::Full)));
        link.credited(u32::MAX);
        assert_eq!(
            link.slots.available_permits(),
            1,
            "a credit gives back at most what is missing"
        );
        // A caller that gave up keeps its place until the reply comes.
        link.cancel(ids[1]);
        assert_eq!(link.slots.available_permits(), 1);
        assert!(link.complete(ids[1], Ok(Payload::Shared(Bytes::new()))));
        link.free_slots(1);
        assert_eq!(link.slots.available_permits(), 2);
    }

    /// Past the byte budget a sender gets no room until the writer has
    /// written; replies are queued whatever the budget.
    #[test]
    fn the_byte_budget_bounds_unwritten_frames() {
        let link = detached(1000);
        let admission = link.try_admit(600).unwrap();
        link.request("user", "t", 1, &[0; 500], false, Some(admission)).unwrap();
        assert!(matches!(link.try_admit(600), Err(LinkError::Full)));
        link.reply(7, Ok(vec![0; 5000]));
        assert!(link.unwritten.load(Ordering::Acquire) > 5000);
        // A frame larger than the whole budget waits for all of it.
        assert_eq!(link.budget_share(1 << 30), 1000);
    }

    /// A large payload is written from where it was encoded, between the
    /// frames queued before and after it: the reader sees every frame
    /// whole, in the order queued, and the byte count is exact.
    #[cfg(unix)]
    #[test]
    fn large_payloads_are_written_in_order_between_small_frames() {
        let link = detached(usize::MAX);
        let large: Vec<u8> = (0..3 * LARGE_PAYLOAD + 5).map(|i| (i % 251) as u8).collect();
        let sent: Vec<Vec<u8>> = vec![
            b"\x01".to_vec(),
            large.clone(),
            b"\x02".to_vec(),
            large.clone(),
            b"\x03".to_vec(),
        ];
        for (i, payload) in sent.iter().enumerate() {
            let payload = if i % 2 == 1 {
                Outgoing::Shared(Bytes::from(payload.clone()))
            } else {
                Outgoing::Borrowed(payload)
            };
            link.request_payload("evilcluster.test", "t", 1, payload, false, None)
                .unwrap();
        }
        link.reply(9, Ok(large.clone()));
        let queued = link.unwritten.load(Ordering::Acquire);
        let (mut chunks, frames) = {
            let mut outbox = link.outbox.lock().unwrap();
            (std::mem::take(&mut outbox.chunks), std::mem::take(&mut outbox.frames))
        };
        assert_eq!(
            chunks.len(),
            6,
            "both large requests and the large reply are chunks of their own"
        );
        assert_eq!(queued, chunks.iter().map(Bytes::len).sum::<usize>() + frames.len());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let (_, mut write) = transport::Io::new(ours).unwrap().split();
            theirs.set_nonblocking(true).unwrap();
            let theirs = tokio::net::UnixStream::from_std(theirs).unwrap();
            let writer = tokio::spawn(async move { write_chunks(&mut write, &mut chunks, &frames, &mut false).await });
            let mut reader = FramedRead::new(theirs, codec(1 << 20));
            for expected in &sent {
                let body = reader.next().await.unwrap().unwrap();
                match Frame::decode(&body).unwrap() {
                    Frame::Request(request) => assert_eq!(request.payload, &expected[..]),
                    other => panic!("{other:?}"),
                }
            }
            let body = reader.next().await.unwrap().unwrap();
            match Frame::decode(&body).unwrap() {
                Frame::Reply(reply) => assert_eq!(reply.result.unwrap().0, &large[..]),
                other => panic!("{other:?}"),
            }
            writer.await.unwrap().unwrap();
        });
    }

    /// Reads `count` reply frames from `socket` (blocking): each reply's
    /// id and payload.
    #[cfg(unix)]
    fn read_replies(mut socket: std::os::unix::net::UnixStream, count: usize) -> Vec<(u64, Vec<u8>)> {
        use std::io::Read;
        // Bytes out of order would leave this waiting for a frame's end.
        socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut replies = Vec::with_capacity(count);
        while replies.len() < count {
            let mut header = [0; 4];
            socket.read_exact(&mut header).unwrap();
            let mut body = vec![0; u32::from_be_bytes(header) as usize];
            socket.read_exact(&mut body).unwrap();
            match Frame::decode(&body).unwrap() {
                Frame::Reply(Reply {
                    id,
                    result: Ok(payload),
                }) => replies.push((id, payload.0.to_vec())),
                other => panic!("not a reply: {other:?}"),
            }
        }
        replies
    }

    /// A link over one end of a socket pair, with no writer task: what is
    /// written reaches the other end only by a direct write (or a writer
    /// the test runs on `write`, under the runtime returned).
    #[cfg(unix)]
    fn link_without_writer() -> (
        tokio::runtime::Runtime,
        Link,
        transport::WriteHalf,
        std::os::unix::net::UnixStream,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let write = runtime.block_on(async { transport::Io::new(ours).unwrap().split().1 });
        let peer = Identity {
            cluster: "test".into(),
            path: "test/peer".into(),
            incarnation: 1,
        };
        let link = Link::new(peer, 1 << 20, usize::MAX, transport::direct(&write));
        (runtime, link, write, theirs)
    }

    /// The last reply in hand is written from where it is made, with no
    /// writer task at all; replies made on several threads at once, some
    /// written that way and some by the writer task, through a socket that
    /// fills up, all arrive whole, once, and in the order each thread made
    /// them.
    #[cfg(unix)]
    #[test]
    fn replies_written_directly_or_by_the_writer_arrive_whole_and_in_order() {
        const THREADS: u64 = 4;
        const REPLIES: u64 = 5000;
        let payload_of = |id: u64| -> Vec<u8> { (0..200).map(|i| (id as u8).wrapping_add(i)).collect() };
        let (runtime, link, write, theirs) = link_without_writer();
        let link = Arc::new(link);

        // One request in hand at a time, and no writer task: only direct
        // writes can deliver these.
        for id in 0..10 {
            link.serving.fetch_add(1, Ordering::AcqRel);
            link.reply(id, Ok(payload_of(id)));
            link.serving.fetch_sub(1, Ordering::AcqRel);
        }
        assert_eq!(link.unwritten.load(Ordering::Acquire), 0, "written without a writer");
        let first = read_replies(theirs.try_clone().unwrap(), 10);
        assert_eq!(first, (0..10).map(|id| (id, payload_of(id))).collect::<Vec<_>>());

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let writer = std::thread::spawn({
            let link = link.clone();
            move || {
                runtime.block_on(async move {
                    tokio::select! {
                        () = write_loop(link, write) => panic!("the writer ended"),
                        _ = stopped => {}
                    }
                })
            }
        });
        let reader = std::thread::spawn(move || read_replies(theirs, (THREADS * REPLIES) as usize));
        let makers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let link = link.clone();
                std::thread::spawn(move || {
                    for seq in 0..REPLIES {
                        let id = thread << 32 | seq;
                        link.serving.fetch_add(1, Ordering::AcqRel);
                        link.reply(id, Ok(payload_of(id)));
                        link.serving.fetch_sub(1, Ordering::AcqRel);
                    }
                })
            })
            .collect();
        for maker in makers {
            maker.join().unwrap();
        }
        let replies = reader.join().unwrap();
        // Everything arrived: every byte counted as unwritten, by a direct
        // write or by the writer, has been counted off.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while link.unwritten.load(Ordering::Acquire) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} bytes still counted as unwritten",
                link.unwritten.load(Ordering::Acquire)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = stop.send(());
        writer.join().unwrap();
        let mut next = [0u64; THREADS as usize];
        for (id, payload) in replies {
            assert_eq!(payload, payload_of(id), "reply {id:#x} arrived whole");
            let (thread, seq) = ((id >> 32) as usize, id & 0xffff_ffff);
            assert_eq!(seq, next[thread], "thread {thread}'s replies in the order made");
            next[thread] += 1;
        }
        assert_eq!(next, [REPLIES; THREADS as usize]);
    }

    /// A call with no other waiting on its connection is written from
    /// where it is made (no writer task here at all); a call made while
    /// another waits is left to the writer, which batches a pipeline's.
    #[cfg(unix)]
    #[test]
    fn a_lone_call_is_written_where_it_is_made() {
        use std::io::Read;
        let (_runtime, link, write, mut theirs) = link_without_writer();
        let actor = format!("{SYSTEM_PREFIX}test");
        let request = |payload: &[u8]| link.request(&actor, "test.tag", 1, payload, true, None).unwrap();

        let first = request(b"first").expect("a call waits for its reply");
        assert_eq!(link.unwritten.load(Ordering::Acquire), 0, "written without a writer");
        theirs.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut header = [0; 4];
        theirs.read_exact(&mut header).unwrap();
        let mut body = vec![0; u32::from_be_bytes(header) as usize];
        theirs.read_exact(&mut body).unwrap();
        match Frame::decode(&body).unwrap() {
            Frame::Request(got) => assert_eq!((got.id, got.payload), (first, &b"first"[..])),
            other => panic!("not a request: {other:?}"),
        }

        // The first still waits for its reply: the second is the writer's.
        request(b"second").expect("a call waits for its reply");
        assert!(link.unwritten.load(Ordering::Acquire) > 0, "left for the writer");
        drop(write);
    }

    /// A large payload's buffer, once written, is the next large payload's
    /// (no fresh pages), and a writer that ends drops it.
    #[cfg(unix)]
    #[test]
    fn a_written_large_buffer_is_reused_then_given_back() {
        let payload = vec![7u8; 2 * LARGE_PAYLOAD];
        let address = payload.as_ptr();
        let mut chunks = VecDeque::from([Bytes::from(payload)]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (kept, _theirs) = runtime.block_on(async {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let (_, mut write) = transport::Io::new(ours).unwrap().split();
            theirs.set_nonblocking(true).unwrap();
            let theirs = tokio::net::UnixStream::from_std(theirs).unwrap();
            let mut kept = false;
            write_chunks(&mut write, &mut chunks, b"tail", &mut kept).await.unwrap();
            (kept, theirs)
        });
        assert!(kept && chunks.is_empty());
        let reused = large_buffer(LARGE_PAYLOAD);
        assert_eq!(reused.as_ptr(), address, "the written buffer is reused");
        assert!(reused.is_empty() && reused.capacity() >= 2 * LARGE_PAYLOAD);
        assert!(!recycle(Bytes::new()), "taken: no spare left");
        SPARE.with(|spare| *spare.borrow_mut() = Some(reused));
        drop(DropSpare);
        assert!(
            SPARE.with(|spare| spare.borrow().is_none()),
            "a writer that ends drops the spare"
        );
    }

    #[test]
    fn scratch_buffers_do_not_keep_a_large_message() {
        let big = with_scratch(|body| {
            body.resize(4 << 20, 1);
            body.capacity()
        });
        assert!(big >= 4 << 20);
        let after = with_scratch(|body| body.capacity());
        assert!(after <= KEEP_BUFFER, "scratch kept {after} bytes");
    }
}
