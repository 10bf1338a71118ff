//! A Unix stream socket registered with the reactor for readability only.
//!
//! Tokio's `UnixStream` asks epoll for readability and writability at once,
//! edge-triggered. On a Unix socket the writer's side is told "writable"
//! every time the reader takes data (the kernel frees the sender's buffer
//! and wakes everyone polling it), so a process that sent one reply and
//! went to sleep is woken a second time, for nothing, when the peer reads
//! that reply: two wake-ups per request instead of one. On a machine where
//! waking a process is the dominant cost (a request to one of hundreds of
//! idle forks), that is most of the time of a broadcast.
//!
//! So the socket stays registered for reading only, and a writer that finds
//! the socket full registers a duplicate of the descriptor for writability
//! for as long as it is held back (rare: the outbox is the queue; a full
//! socket means a slow reader), and drops it once a write goes through.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Reads offered up to this much go through a buffer of the thread's,
/// cleared once, and what came is copied into the caller's buffer. A read
/// straight into the caller's buffer needs the room it offers initialized
/// (cleared) first: a 54-byte request cleared 2 KiB that way, while the
/// copy costs only what came, and every connection on the thread reads
/// through the same cache lines. Past this, the reads go straight into the
/// caller's buffer, where clearing the offer costs about what the read
/// brings (an offer grows only after a read that filled it). Kept small:
/// the pages cleared stay with the process, and every process reads.
const THROUGH_SCRATCH: usize = 4 * 1024;

/// The first offer, and the least. Each read is offered about what the
/// last ones brought: four times more after a read that filled its offer,
/// a quarter less (no less than what came) after a short one. The scratch
/// buffer is cleared only as far as reads are offered through it, and most
/// processes read only small frames (16 KiB cleared up front cost each fork
/// 10–16 KiB of PSS).
const LEAST_OFFER: usize = 2 * 1024;

thread_local! {
    /// Cleared as far as the largest read offered through it, once.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Reads from `socket` into `buf`, offering `offered` bytes: through the
/// thread's scratch buffer when that is enough, else straight into `buf`.
fn read_into(socket: &UnixStream, buf: &mut ReadBuf<'_>, offered: usize) -> io::Result<usize> {
    if offered > THROUGH_SCRATCH {
        let n = receive(socket, buf.initialize_unfilled_to(offered))?;
        buf.advance(n);
        return Ok(n);
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < offered {
            scratch.resize(offered, 0);
        }
        let n = receive(socket, &mut scratch[..offered])?;
        buf.put_slice(&scratch[..n]);
        Ok(n)
    })
}

// Reads and writes are system calls made directly (rustix), not through
// the C library: glibc makes each `read` and `send` a thread-cancellation
// point, two updates of the thread's state around every call, which a
// runtime that never cancels threads pays on every message for nothing.

/// What the socket holds, up to `buf`'s length, without waiting.
fn receive(socket: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    rustix::io::read(socket, buf).map_err(io::Error::from)
}

/// What the socket takes of `bytes` now. With `MSG_NOSIGNAL`: a peer gone
/// is an error, never a SIGPIPE.
fn send(socket: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    rustix::net::send(socket, bytes, rustix::net::SendFlags::NOSIGNAL).map_err(io::Error::from)
}

/// Registers `socket` with the current runtime's reactor for `interest`.
///
/// Tokio 1.54 deprecated its safe constructor because an arbitrary
/// `AsRawFd` could close or change its descriptor while registered; the
/// replacement is `unsafe` (this crate forbids it). The two types registered
/// here own their descriptor for their whole life and always report the
/// same one — the condition the replacement asks its caller to uphold.
#[allow(deprecated)]
fn register<T: AsRawFd + AsFd>(socket: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    AsyncFd::with_interest(socket, interest)
}

/// A connected stream, before it is split (the handshake reads and writes it).
pub(crate) struct Io {
    read: ReadHalf,
    write: WriteHalf,
}

impl Io {
    /// Registers `stream` (non-blocking) with the current runtime's reactor.
    pub(crate) fn new(stream: UnixStream) -> io::Result<Io> {
        stream.set_nonblocking(true)?;
        let socket = Arc::new(register(stream, Interest::READABLE)?);
        Ok(Io {
            read: ReadHalf {
                socket: socket.clone(),
                offer: LEAST_OFFER,
            },
            write: WriteHalf {
                socket,
                held_back: None,
            },
        })
    }

    pub(crate) fn split(self) -> (ReadHalf, WriteHalf) {
        (self.read, self.write)
    }
}

/// The reading half: the only registration the socket keeps.
pub(crate) struct ReadHalf {
    socket: Arc<AsyncFd<UnixStream>>,
    /// How much free room the next read initializes and offers.
    offer: usize,
}

/// The writing half. Dropping it shuts the socket down for writing, as
/// tokio's owned halves do: the peer reads the end of the stream even while
/// this side's reader still holds the socket.
pub(crate) struct WriteHalf {
    socket: Arc<AsyncFd<UnixStream>>,
    /// A duplicate of the socket registered for writability, only while a
    /// write is held back by a full socket.
    held_back: Option<AsyncFd<OwnedFd>>,
}

impl WriteHalf {
    /// A handle that writes to the socket without waiting, from any thread.
    pub(crate) fn direct(&self) -> DirectWriter {
        DirectWriter(self.socket.clone())
    }
}

/// Writes to a connection's socket without going through its writing half
/// (sharing its registration: no second descriptor):
/// what it takes now, or `WouldBlock`. Whoever uses it must keep its bytes
/// from interleaving with the writing half's.
pub(crate) struct DirectWriter(Arc<AsyncFd<UnixStream>>);

impl DirectWriter {
    pub(crate) fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        send(self.0.get_ref(), bytes)
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut ready = ready!(this.socket.poll_read_ready(cx))?;
            let offered = buf.remaining().min(this.offer);
            let read = ready.try_io(|socket| read_into(socket.get_ref(), buf, offered));
            match read {
                Ok(Ok(n)) => {
                    // A short read drained the socket: the next one would
                    // only find it empty (tokio's own streams do the same).
                    if n > 0 && n < offered {
                        ready.clear_ready();
                    }
                    this.offer = if n > 0 && n == offered {
                        offered.saturating_mul(4)
                    } else {
                        (this.offer / 4).max(n.next_power_of_two()).max(LEAST_OFFER)
                    };
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => {}
            }
        }
    }
}

impl WriteHalf {
    /// Runs `write` until the socket takes some bytes, waiting for room
    /// through the held-back registration when it is full.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        wanted: usize,
        mut write: impl FnMut(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.socket.get_ref()) {
                Ok(n) => {
                    if n == wanted {
                        self.held_back = None;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
            if self.held_back.is_none() {
                let duplicate = self.socket.get_ref().as_fd().try_clone_to_owned()?;
                self.held_back = Some(register(duplicate, Interest::WRITABLE)?);
            }
            let held_back = self.held_back.as_ref().expect("registered above");
            // Registering reports a socket that has room already, so room
            // made between the failed write and here is not missed.
            ready!(held_back.poll_write_ready(cx))?.clear_ready();
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, buf.len(), |socket| send(socket, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let wanted = bufs.iter().map(|b| b.len()).sum();
        // `sendmsg` rather than `writev`: a peer gone raises an error, not
        // SIGPIPE, in a program that does not ignore the signal.
        self.get_mut().poll_write_with(cx, wanted, |socket| {
            let mut no_control = rustix::net::SendAncillaryBuffer::default();
            rustix::net::sendmsg(socket, bufs, &mut no_control, rustix::net::SendFlags::NOSIGNAL)
                .map_err(io::Error::from)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(Shutdown::Write))
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        let _ = self.socket.get_ref().shutdown(Shutdown::Write);
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// A writer far ahead of its reader waits for room through the
    /// held-back registration, loses nothing, and drops the registration
    /// once a write goes through whole.
    #[test]
    fn a_full_socket_holds_the_writer_back_until_there_is_room() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let sent = pattern(4 << 20);
        let reader = std::thread::spawn(move || {
            let mut received = Vec::new();
            let mut chunk = vec![0; 7000];
            loop {
                match theirs.read(&mut chunk).unwrap() {
                    0 => return received,
                    n => received.extend_from_slice(&chunk[..n]),
                }
                // Slower than the writer: the socket fills up.
                std::thread::yield_now();
            }
        });
        let held_back_at_the_end = runtime().block_on(async {
            let (_read, mut write) = Io::new(ours).unwrap().split();
            write.write_all(&sent).await.unwrap();
            write.write_all(b"end").await.unwrap();
            let held_back = write.held_back.is_some();
            drop(write);
            held_back
        });
        let received = reader.join().unwrap();
        assert_eq!(received.len(), sent.len() + 3);
        assert!(received[..sent.len()] == sent[..] && received.ends_with(b"end"));
        assert!(!held_back_at_the_end, "a whole write drops the registration");
    }

    /// How far this thread's scratch buffer has been cleared.
    fn scratch_cleared() -> usize {
        SCRATCH.with(|scratch| scratch.borrow().len())
    }

    /// Reads offer about what came last: small after small reads, growing
    /// when a read fills its offer, and every byte arrives in order. The
    /// thread's scratch buffer is cleared only as far as reads were
    /// offered through it.
    #[test]
    fn reads_offer_about_what_the_last_ones_brought() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        runtime().block_on(async {
            let (mut read, _write) = Io::new(ours).unwrap().split();
            let mut buffer = vec![0; 64 * 1024];

            for _ in 0..3 {
                theirs.write_all(b"small").unwrap();
                assert_eq!(read.read(&mut buffer).await.unwrap(), 5);
                assert_eq!(read.offer, LEAST_OFFER);
            }
            assert_eq!(
                scratch_cleared(),
                LEAST_OFFER,
                "small reads clear no more than the least offer"
            );

            let burst = pattern(80 * 1024);
            theirs.write_all(&burst).unwrap();
            let mut sizes = Vec::new();
            let mut received = Vec::new();
            while received.len() < burst.len() {
                let n = read.read(&mut buffer).await.unwrap();
                sizes.push(n);
                received.extend_from_slice(&buffer[..n]);
            }
            assert_eq!(received, burst);
            // Each offer taken whole, four times the last: the first
            // through the scratch buffer, the next ones, past its size,
            // straight into the caller's buffer.
            assert_eq!(
                sizes[..3],
                [LEAST_OFFER, 4 * LEAST_OFFER, 16 * LEAST_OFFER],
                "{sizes:?}"
            );
            const { assert!(LEAST_OFFER <= THROUGH_SCRATCH && 4 * LEAST_OFFER > THROUGH_SCRATCH) };
            assert_eq!(
                scratch_cleared(),
                LEAST_OFFER,
                "reads past the scratch's size do not clear it"
            );

            theirs.write_all(b"small again").unwrap();
            assert_eq!(read.read(&mut buffer).await.unwrap(), 11);
            assert!(
                read.offer < 16 * THROUGH_SCRATCH,
                "a short read lowers the offer: {}",
                read.offer
            );

            // A caller's buffer smaller than what came gets what fits; the
            // rest stays in the socket for the next read.
            while read.offer > THROUGH_SCRATCH {
                theirs.write_all(b"x").unwrap();
                assert_eq!(read.read(&mut buffer).await.unwrap(), 1);
            }
            theirs.write_all(b"abcdefgh").unwrap();
            let mut small = [0; 3];
            assert_eq!(read.read(&mut small).await.unwrap(), 3);
            assert_eq!(&small, b"abc");
            assert_eq!(read.read(&mut buffer).await.unwrap(), 5);
            assert_eq!(&buffer[..5], b"defgh");
        });
    }

    /// Dropping the writing half ends the stream for the peer even while
    /// the reading half is still open, as with tokio's owned halves.
    #[test]
    fn dropping_the_writer_ends_the_peers_stream() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        runtime().block_on(async {
            let (mut read, mut write) = Io::new(ours).unwrap().split();
            write.write_all(b"last").await.unwrap();
            drop(write);
            let mut received = Vec::new();
            theirs.read_to_end(&mut received).unwrap();
            assert_eq!(received, b"last");
            theirs.write_all(b"still read").unwrap();
            drop(theirs);
            let mut rest = Vec::new();
            read.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"still read");
        });
    }
}
