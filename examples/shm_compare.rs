//! Would a shared-memory path beat the socket for large payloads?
//!
//! Two processes (this executable and itself started again) echo payloads
//! of 256 KiB to 16 MiB two ways, in the same run:
//!
//! - **socket**: the bytes through a Unix stream socket (the runtime's
//!   path): the sender writes them from its buffer, the receiver reads them
//!   into a reused buffer — two copies, through the kernel;
//! - **memfd**: the sender puts the bytes in a fresh `memfd` (one copy,
//!   `pwrite`), seals it against writing, growing and shrinking, and passes
//!   the descriptor over the same socket (`SCM_RIGHTS`); the receiver
//!   checks the seals and maps it read-only — no copy on its side.
//!
//! Both receivers then read every byte once (what decoding a message does),
//! and the echo goes back the same way. Blocking sockets and plain threads:
//! this measures the mechanisms, not a runtime.
//!
//! ```text
//! cargo build --release --example shm_compare
//! taskset -c 1 target/release/examples/shm_compare   # both processes on one CPU
//! target/release/examples/shm_compare                # both CPUs
//! ```
//!
//! The one `unsafe` (mapping the sealed memfd) is in the `sealed` module
//! below, with its argument.

#![deny(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{memfd_create, MemfdFlags, SealFlags};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

const SIZES: [usize; 4] = [256 << 10, 1 << 20, 4 << 20, 16 << 20];
/// Bytes each way per size and round.
const BYTES: usize = 128 << 20;
const ROUNDS: usize = 3;
const CHILD_ENV: &str = "EVILCLUSTER_SHM_COMPARE_SOCKET";

const SOCKET: u8 = 0;
const MEMFD: u8 = 1;
const STOP: u8 = 2;

fn main() -> ExitCode {
    let outcome = match std::env::var_os(CHILD_ENV) {
        Some(path) => UnixStream::connect(path).and_then(echo),
        None => compare(),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shm_compare: {error}");
            ExitCode::FAILURE
        }
    }
}

fn compare() -> io::Result<()> {
    let dir = tempfile::Builder::new().prefix("evilcluster-shm-").tempdir()?;
    let path = dir.path().join("echo.sock");
    let listener = UnixListener::bind(&path)?;
    let mut child = Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, &path)
        .stdin(Stdio::null())
        .spawn()?;
    let (mut socket, _) = listener.accept()?;
    let mut buffer = Vec::new();
    let mut results = vec![(Vec::new(), Vec::new()); SIZES.len()];
    for round in 0..=ROUNDS {
        for (i, &size) in SIZES.iter().enumerate() {
            let payload: Vec<u8> = (0..size).map(|b| (b % 251) as u8).collect();
            // Round 0 warms up, with few echoes.
            let n = if round == 0 { 2 } else { (BYTES / size).max(4) };
            let socket_time = timed(n, || round_trip(&mut socket, SOCKET, &payload, &mut buffer))?;
            let memfd_time = timed(n, || round_trip(&mut socket, MEMFD, &payload, &mut buffer))?;
            if round > 0 {
                let gigabytes = (size * n) as f64 / 1e9;
                results[i].0.push(gigabytes / socket_time.as_secs_f64());
                results[i].1.push(gigabytes / memfd_time.as_secs_f64());
            }
        }
    }
    send(&mut socket, STOP, &[])?;
    child.wait()?;
    println!(
        "socket vs sealed memfd, sequential echoes (median of {ROUNDS} rounds, {} MiB each way per size and round)",
        BYTES >> 20
    );
    println!(
        "{:<8} {:>16} {:>16} {:>13} {:>13}",
        "size", "socket GB/s", "memfd GB/s", "memfd/socket", "memfd us/echo"
    );
    for (i, &size) in SIZES.iter().enumerate() {
        let socket = median(&results[i].0);
        let memfd = median(&results[i].1);
        let label = if size >= 1 << 20 {
            format!("{} MiB", size >> 20)
        } else {
            format!("{} KiB", size >> 10)
        };
        println!(
            "{label:<8} {socket:>16.2} {memfd:>16.2} {:>12.2}x {:>13.0}",
            memfd / socket,
            size as f64 / (memfd * 1e9) * 1e6
        );
    }
    Ok(())
}

fn timed(n: usize, mut f: impl FnMut() -> io::Result<()>) -> io::Result<Duration> {
    let start = Instant::now();
    for _ in 0..n {
        f()?;
    }
    Ok(start.elapsed())
}

/// Sends `payload` one way, receives the echo, and reads it.
fn round_trip(socket: &mut UnixStream, mode: u8, payload: &[u8], buffer: &mut Vec<u8>) -> io::Result<()> {
    send(socket, mode, payload)?;
    let sum = receive(socket, buffer, |bytes| Ok(checksum(bytes)))?.ok_or(io::ErrorKind::UnexpectedEof)?;
    if sum != checksum(payload) {
        return Err(io::Error::other("the echo differs"));
    }
    Ok(())
}

/// The child: echoes every payload back the way it came (`receive` sends
/// it back from where it landed: the read buffer or the mapping).
fn echo(mut socket: UnixStream) -> io::Result<()> {
    let mut buffer = Vec::new();
    // Read once, as decoding would.
    while receive(&mut socket, &mut buffer, |bytes| {
        Ok(std::hint::black_box(checksum(bytes)))
    })?
    .is_some()
    {}
    Ok(())
}

/// Reads every byte once (fast: eight at a time), as decoding would.
fn checksum(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail = words
        .remainder()
        .iter()
        .fold(0u64, |a, b| a.rotate_left(8) ^ u64::from(*b));
    words
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .fold(tail, u64::wrapping_add)
}

/// Sends one message: a 9-byte header (mode, length), then the bytes on
/// the socket, or a sealed memfd holding them.
fn send(socket: &mut UnixStream, mode: u8, payload: &[u8]) -> io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = mode;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    match mode {
        MEMFD => {
            let memfd = sealed_memfd(payload)?;
            let fds = [memfd.as_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            let sent = sendmsg(&*socket, &[IoSlice::new(&header)], &mut control, SendFlags::empty())?;
            socket.write_all(&header[sent..])
        }
        _ => {
            socket.write_all(&header)?;
            socket.write_all(payload)
        }
    }
}

/// A fresh memfd holding `payload`, sealed: nobody can write, grow or
/// shrink it, nor change its seals.
fn sealed_memfd(payload: &[u8]) -> io::Result<OwnedFd> {
    let fd = memfd_create("evilcluster-payload", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, payload.len() as u64)?;
    let mut written = 0;
    while written < payload.len() {
        written += rustix::io::pwrite(&fd, &payload[written..], written as u64)?;
    }
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(fd)
}

/// Receives one message and hands its bytes to `f` (from the read buffer
/// or from the mapping); in the child, sends them back the same way.
/// `None` at the end.
fn receive<T>(
    socket: &mut UnixStream,
    buffer: &mut Vec<u8>,
    f: impl FnOnce(&[u8]) -> io::Result<T>,
) -> io::Result<Option<T>> {
    let mut header = [0u8; 9];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        &*socket,
        &mut [IoSliceMut::new(&mut header)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if got.bytes == 0 {
        return Ok(None);
    }
    socket.read_exact(&mut header[got.bytes..])?;
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            fd = fds.into_iter().next();
        }
    }
    let len = u64::from_le_bytes(header[1..].try_into().expect("8 bytes")) as usize;
    let is_child = std::env::var_os(CHILD_ENV).is_some();
    match header[0] {
        STOP => Ok(None),
        MEMFD => {
            let fd = fd.ok_or_else(|| io::Error::other("no descriptor came with a memfd message"))?;
            let map = sealed::SealedMap::new(&fd, len)?;
            let value = f(map.bytes())?;
            if is_child {
                send(socket, MEMFD, map.bytes())?;
            }
            Ok(Some(value))
        }
        _ => {
            buffer.resize(len, 0);
            socket.read_exact(buffer)?;
            let value = f(buffer)?;
            if is_child {
                send(socket, SOCKET, buffer)?;
            }
            Ok(Some(value))
        }
    }
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Read-only views of sealed memfds: the only `unsafe` of this program.
#[allow(unsafe_code)]
mod sealed {
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::fs::SealFlags;
    use rustix::mm::{MapFlags, ProtFlags};

    /// A read-only mapping of the first `len` bytes of a memfd that is
    /// sealed against writing and shrinking.
    pub struct SealedMap {
        ptr: *mut std::ffi::c_void,
        len: usize,
    }

    impl SealedMap {
        /// Maps `fd`, after checking that nobody can change or shrink the
        /// bytes under the mapping: the seals include `WRITE` and `SHRINK`,
        /// and the file holds at least `len` bytes.
        pub fn new(fd: &OwnedFd, len: usize) -> io::Result<Self> {
            let seals = rustix::fs::fcntl_get_seals(fd)?;
            if !seals.contains(SealFlags::WRITE | SealFlags::SHRINK) {
                return Err(io::Error::other(
                    "the memfd is not sealed against writing and shrinking",
                ));
            }
            let size = rustix::fs::fstat(fd)?.st_size;
            if u64::try_from(size).map_or(true, |size| size < len as u64) {
                return Err(io::Error::other("the memfd is shorter than its message"));
            }
            if len == 0 {
                return Ok(SealedMap {
                    ptr: std::ptr::null_mut(),
                    len: 0,
                });
            }
            // SAFETY: a fresh read-only shared mapping at an address the
            // kernel picks (null hint), so it aliases no Rust object. The
            // file is sealed against writes (no process can map it writable
            // or write(2) to it: F_SEAL_WRITE) and against shrinking
            // (F_SEAL_SHRINK), and holds at least `len` bytes (checked above),
            // so every byte of the mapping stays valid and unchanged until
            // `drop` unmaps it.
            let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, ProtFlags::READ, MapFlags::SHARED, fd, 0)? };
            Ok(SealedMap { ptr, len })
        }

        pub fn bytes(&self) -> &[u8] {
            if self.len == 0 {
                return &[];
            }
            // SAFETY: `ptr` is a live mapping of `len` readable bytes that
            // nobody can modify (see `new`); the slice borrows `self`, so it
            // cannot outlive the mapping.
            unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
        }
    }

    impl Drop for SealedMap {
        fn drop(&mut self) {
            if self.len > 0 {
                // SAFETY: `ptr`/`len` are exactly the mapping `new` made, and
                // no slice of it outlives `self`.
                let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
            }
        }
    }
}
