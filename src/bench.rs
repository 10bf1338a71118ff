//! Transport benchmark support, shared by the criterion benchmark
//! (`benches/transport.rs`) and the comparison program
//! (`examples/transport_compare.rs`).
//!
//! Two things are measured the same way:
//!
//! - **raw**: a length-framed echo over a plain tokio Unix socket to a
//!   separate process ([`RawEchoServer`], [`RawClient`]), with the same
//!   framing codec as the runtime and frames as long as an evilcluster
//!   `Ping` request ([`raw_frame_len`]). It is the floor: one process
//!   boundary, one socket, no serialisation, no actor.
//! - **evilcluster**: the [`Echo`] actor in a worker process, reached with
//!   [`addr_of`] ([`ClusterClient`]).
//!
//! Each measurement is an `async fn` returning the elapsed time of the
//! measured part only, so it serves both criterion's `iter_custom` and a
//! plain program.
//!
//! A binary using this module must call [`serve_raw_echo_if_requested`]
//! first thing in `main`: the raw echo server is that same binary started
//! again with [`RAW_ECHO_ENV`] set.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message, MessageResult};
use bytes::{Bytes, BytesMut};
use evilcluster::{addr_of, Cluster, RemoteActor, RemoteAddr, RemoteMessage, SendError, SharedBytes, Worker};
use evilcluster_wire::{codec, Frame, Request, DEFAULT_MAX_FRAME_LENGTH};
use futures_util::stream::{self, StreamExt};
use futures_util::{FutureExt, SinkExt};
use serde::{Deserialize, Serialize};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{Framed, FramedRead, FramedWrite, LengthDelimitedCodec};

/// Set (to the socket path) in the environment of the raw echo server
/// process; a benchmark binary that sees it runs only that server.
pub const RAW_ECHO_ENV: &str = "EVILCLUSTER_BENCH_RAW_ECHO";

/// The pid of the process that started the raw echo server, which the
/// server checks it is still the child of.
const RAW_PARENT_ENV: &str = "EVILCLUSTER_BENCH_RAW_PARENT";

/// What the raw echo server prints on stdout once it listens.
const READY: &str = "raw-echo-ready";

/// How long the raw echo server waits for its one client.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Read buffer of both raw ends: the runtime's connections use the same.
const READ_BUFFER: usize = 64 * 1024;

// ------------------------------------------------------------------ the actor

/// The benchmarked actor: echoes [`Ping`] and [`Blob`], sums [`Count`],
/// reports [`Total`].
#[derive(Debug, Default)]
pub struct Echo {
    total: u64,
}

impl Actor for Echo {
    type Context = Context<Self>;
}

/// Asks [`Echo`] to return the number it carries.
#[derive(Debug, Clone, Copy, Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
pub struct Ping(pub u64);

/// Adds its number to [`Echo`]'s total; meant for `do_send`.
#[derive(Debug, Clone, Copy, Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct Count(pub u64);

/// Asks [`Echo`] for the sum of every [`Count`] it has handled.
#[derive(Debug, Clone, Copy, Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
pub struct Total;

/// Asks [`Echo`] to send its bytes back: a large request with an equally
/// large reply.
#[derive(Debug, Clone, Message, Serialize, Deserialize)]
#[rtype(result = "serde_bytes::ByteBuf")]
pub struct Blob(pub serde_bytes::ByteBuf);

/// [`Blob`] with [`SharedBytes`]: received bytes are slices of the frame
/// they came in, not copies.
#[derive(Debug, Clone, Message, Serialize, Deserialize)]
#[rtype(result = "SharedBytes")]
pub struct SharedBlob(pub SharedBytes);

evilcluster::remote_messages! {
    Ping => "bench.ping",
    Count => "bench.count",
    Total => "bench.total",
    Blob => "bench.blob",
    SharedBlob => "bench.shared_blob",
}

impl Handler<Ping> for Echo {
    type Result = MessageResult<Ping>;
    fn handle(&mut self, Ping(n): Ping, _: &mut Context<Self>) -> Self::Result {
        MessageResult(n)
    }
}

impl Handler<Count> for Echo {
    type Result = ();
    fn handle(&mut self, Count(n): Count, _: &mut Context<Self>) {
        self.total = self.total.wrapping_add(n);
    }
}

impl Handler<Blob> for Echo {
    type Result = MessageResult<Blob>;
    fn handle(&mut self, Blob(bytes): Blob, _: &mut Context<Self>) -> Self::Result {
        MessageResult(bytes)
    }
}

impl Handler<SharedBlob> for Echo {
    type Result = MessageResult<SharedBlob>;
    fn handle(&mut self, SharedBlob(bytes): SharedBlob, _: &mut Context<Self>) -> Self::Result {
        MessageResult(bytes)
    }
}

impl Handler<Total> for Echo {
    type Result = MessageResult<Total>;
    fn handle(&mut self, _: Total, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.total)
    }
}

impl RemoteActor for Echo {
    const NAME: &'static str = "bench.echo";
    type Messages = evilcluster::messages![Ping, Count, Total, Blob, SharedBlob];
}

/// The benchmark's cluster: one worker process hosting [`Echo`]. Every
/// process of a benchmark binary builds it the same way.
pub fn cluster() -> Cluster {
    Cluster::new("bench").spawn(Worker::actor::<Echo>())
}

// ------------------------------------------------------------------ errors

/// Why a measurement failed.
#[derive(Debug)]
pub enum BenchError {
    /// The raw socket failed.
    Io(io::Error),
    /// An evilcluster send failed.
    Send(SendError),
    /// The raw server closed the connection before every reply came.
    Closed,
    /// A reply was not the expected one.
    Mismatch {
        /// What should have come back.
        expected: u64,
        /// What came back.
        got: u64,
    },
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Io(error) => write!(f, "raw socket: {error}"),
            BenchError::Send(error) => write!(f, "evilcluster: {error}"),
            BenchError::Closed => f.write_str("the raw echo server closed the connection"),
            BenchError::Mismatch { expected, got } => write!(f, "wrong reply: expected {expected}, got {got}"),
        }
    }
}

impl std::error::Error for BenchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BenchError::Io(error) => Some(error),
            BenchError::Send(error) => Some(error),
            _ => None,
        }
    }
}

impl From<io::Error> for BenchError {
    fn from(error: io::Error) -> Self {
        BenchError::Io(error)
    }
}

impl From<SendError> for BenchError {
    fn from(error: SendError) -> Self {
        BenchError::Send(error)
    }
}

fn expect(expected: u64, got: u64) -> Result<(), BenchError> {
    if expected == got {
        Ok(())
    } else {
        Err(BenchError::Mismatch { expected, got })
    }
}

// ------------------------------------------------------------------ evilcluster side

/// Measures the [`Echo`] actor through the runtime. Copy it freely.
#[derive(Debug, Clone, Copy)]
pub struct ClusterClient {
    echo: RemoteAddr<Echo>,
}

impl Default for ClusterClient {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterClient {
    /// A client of the running cluster's [`Echo`] (use it in the master,
    /// on the runtime that started the cluster).
    pub fn new() -> Self {
        ClusterClient {
            echo: addr_of::<Echo>(),
        }
    }

    /// Resolves the name and opens the connection, so that no measurement
    /// pays for them.
    pub async fn warm_up(&self) -> Result<(), BenchError> {
        expect(7, self.echo.send(Ping(7)).await?)
    }

    /// `n` sequential `send(Ping)`s, each awaited before the next.
    pub async fn round_trips(&self, n: u64) -> Result<Duration, BenchError> {
        let start = Instant::now();
        for i in 0..n {
            expect(i, self.echo.send(Ping(i)).await?)?;
        }
        Ok(start.elapsed())
    }

    /// `n` `send(Ping)`s with up to `window` awaited at once.
    pub async fn pipelined(&self, n: u64, window: usize) -> Result<Duration, BenchError> {
        let echo = self.echo;
        let start = Instant::now();
        let mut replies = stream::iter(0..n)
            .map(|i| async move { (i, echo.send(Ping(i)).await) })
            .buffer_unordered(window.max(1));
        while let Some((i, reply)) = replies.next().await {
            expect(i, reply?)?;
        }
        Ok(start.elapsed())
    }

    /// `n` echoes through one [`send_all`](evilcluster::RemoteAddr::send_all)
    /// with up to `window` in flight: the same traffic as
    /// [`pipelined`](Self::pipelined), without a future per call.
    pub async fn pipelined_send_all(&self, n: u64, window: usize) -> Result<Duration, BenchError> {
        let start = Instant::now();
        let mut replies = self.echo.send_all((0..n).map(Ping), window);
        let mut i = 0;
        while let Some(reply) = replies.next().await {
            expect(i, reply?)?;
            i += 1;
        }
        // As many replies as requests.
        expect(n, i)?;
        Ok(start.elapsed())
    }

    /// `n` sequential echoes of a [`Blob`] of `size` bytes (the request
    /// carries `size` bytes, and so does the reply). Making each message
    /// is timed, as [`RawClient::blobs`] times making each frame.
    pub async fn blobs(&self, size: usize, n: u64) -> Result<Duration, BenchError> {
        let start = Instant::now();
        for i in 0..n {
            let back = self.echo.send(Blob(blob(i, size))).await?;
            check_blob(&back, i, size)?;
        }
        Ok(start.elapsed())
    }

    /// [`blobs`](Self::blobs) with [`SharedBlob`]: no copy where the bytes
    /// are received.
    pub async fn shared_blobs(&self, size: usize, n: u64) -> Result<Duration, BenchError> {
        let start = Instant::now();
        for i in 0..n {
            let blob = SharedBytes::from(blob(i, size).into_vec());
            let back = self.echo.send(SharedBlob(blob)).await?;
            check_blob(&back, i, size)?;
        }
        Ok(start.elapsed())
    }

    /// `n` `do_send(Count(1))`s, then one `send(Total)` to wait until the
    /// actor has handled all of them (messages from one process to one actor
    /// arrive in order). The time includes that last round trip.
    pub async fn do_send(&self, n: u64) -> Result<Duration, BenchError> {
        let before = self.echo.send(Total).await?;
        let start = Instant::now();
        for _ in 0..n {
            self.echo.do_send(Count(1)).await?;
        }
        let after = self.echo.send(Total).await?;
        let elapsed = start.elapsed();
        expect(before.wrapping_add(n), after)?;
        Ok(elapsed)
    }
}

// ------------------------------------------------------------------ raw side

/// The body length of the raw echo's frames: that of a typical
/// evilcluster `Ping` request frame, so both sides move the same bytes.
pub fn raw_frame_len() -> usize {
    // A `Ping(n)` payload for n < 2^32 is a MessagePack u32: 5 bytes.
    let payload = [0xce, 0, 1, 0, 0];
    let request = Frame::Request(Request {
        id: 1 << 20,
        actor: Echo::NAME,
        tag: Ping::TAG,
        incarnation: u64::MAX / 3,
        reply: true,
        payload: &payload,
    });
    request.encode().map_or(48, |body| body.len()).max(8)
}

/// A raw echo server in its own process, listening in a private temporary
/// directory. Dropping it stops the process (and waits for it) and removes
/// the directory.
pub struct RawEchoServer {
    child: Child,
    socket: PathBuf,
    // Declared last: removed after the child is gone.
    _dir: tempfile::TempDir,
}

impl fmt::Debug for RawEchoServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawEchoServer")
            .field("pid", &self.child.id())
            .field("socket", &self.socket)
            .finish()
    }
}

impl RawEchoServer {
    /// Starts this executable again as a raw echo server and waits until it
    /// listens. Blocking; call it outside any async runtime.
    pub fn start() -> io::Result<Self> {
        let mut servers = Self::start_many(1)?;
        Ok(servers.pop().expect("one server was started"))
    }

    /// Starts `n` raw echo servers at once, then waits until every one
    /// listens: the machine's own cost of starting that many processes of
    /// this executable. Blocking; call it outside any async runtime, or
    /// where blocking the thread is fine.
    pub fn start_many(n: usize) -> io::Result<Vec<Self>> {
        let exe = std::env::current_exe()?;
        let mut servers = Vec::with_capacity(n);
        for _ in 0..n {
            let dir = tempfile::Builder::new().prefix("evilcluster-bench-raw-").tempdir()?;
            let socket = dir.path().join("echo.sock");
            let child = Command::new(&exe)
                .env(RAW_ECHO_ENV, &socket)
                .env(RAW_PARENT_ENV, std::process::id().to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            // From here on, every path (errors included) kills and reaps it.
            servers.push(RawEchoServer {
                child,
                socket,
                _dir: dir,
            });
        }
        for server in &mut servers {
            let stdout = server.child.stdout.take().expect("stdout is piped");
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            if line.trim_end() != READY {
                return Err(io::Error::other(format!(
                    "the raw echo server did not start (it said {line:?})"
                )));
            }
        }
        Ok(servers)
    }

    /// The server's socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects the server's one client (call it inside a tokio runtime).
    pub async fn connect(&self) -> io::Result<RawClient> {
        RawClient::connect(&self.socket).await
    }
}

/// Stops every server in `servers` together, as a tree's stop would: each
/// is told first (end of file on its stdin), then each is waited for.
/// Returns how long until the last one was gone. Blocking.
pub fn stop_all(mut servers: Vec<RawEchoServer>) -> Duration {
    let start = Instant::now();
    for server in &mut servers {
        drop(server.child.stdin.take());
    }
    for server in &mut servers {
        let _ = server.child.wait();
    }
    start.elapsed()
}

impl Drop for RawEchoServer {
    fn drop(&mut self) {
        // End of file on its stdin stops it on its own; then make sure.
        drop(self.child.stdin.take());
        for _ in 0..50 {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client of a [`RawEchoServer`]: one Unix socket, length-framed.
pub struct RawClient {
    reader: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    writer: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    frame_len: usize,
}

impl fmt::Debug for RawClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawClient").field("frame_len", &self.frame_len).finish()
    }
}

impl RawClient {
    /// Connects to a raw echo server at `path`.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let (read, write) = UnixStream::connect(path).await?.into_split();
        Ok(RawClient {
            reader: FramedRead::with_capacity(read, codec(DEFAULT_MAX_FRAME_LENGTH), READ_BUFFER),
            writer: FramedWrite::new(write, codec(DEFAULT_MAX_FRAME_LENGTH)),
            frame_len: raw_frame_len(),
        })
    }

    /// `n` sequential echoes, each awaited before the next.
    pub async fn round_trips(&mut self, n: u64) -> Result<Duration, BenchError> {
        let start = Instant::now();
        for i in 0..n {
            self.writer.send(raw_frame(i, self.frame_len)).await?;
            check_echo(&mut self.reader, i, self.frame_len).await?;
        }
        Ok(start.elapsed())
    }

    /// Sends one request frame numbered `seq` and returns without waiting
    /// for its echo ([`RawClient::receive`] takes it): a broadcast over
    /// many clients sends to each before reading any.
    pub async fn send(&mut self, seq: u64) -> Result<(), BenchError> {
        self.writer.send(raw_frame(seq, self.frame_len)).await?;
        Ok(())
    }

    /// Reads the echo of the frame [`RawClient::send`] sent as `seq`.
    pub async fn receive(&mut self, seq: u64) -> Result<(), BenchError> {
        check_echo(&mut self.reader, seq, self.frame_len).await
    }

    /// `n` sequential echoes of a frame of `size` bytes.
    pub async fn blobs(&mut self, size: usize, n: u64) -> Result<Duration, BenchError> {
        let start = Instant::now();
        for i in 0..n {
            self.writer.send(raw_frame(i, size)).await?;
            check_echo(&mut self.reader, i, size).await?;
        }
        Ok(start.elapsed())
    }

    /// `n` echoes with up to `window` in flight, one future per call, made
    /// and awaited as [`ClusterClient::pipelined`] makes and awaits its
    /// calls: each call queues its frame for a writer task and waits for its
    /// echo on a channel of its own, which a reader task completes. The
    /// least a client with a future per call costs over this socket (the
    /// echoes come back in order, so the reader needs no table, only a
    /// queue), against which evilcluster's own future per call is measured.
    pub async fn pipelined_futures(&mut self, n: u64, window: usize) -> Result<Duration, BenchError> {
        let frame_len = self.frame_len;
        let RawClient { reader, writer, .. } = self;
        let waiting = std::cell::RefCell::new(std::collections::VecDeque::new());
        let (outbox, mut queued) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let start = Instant::now();
        let calls = async {
            let mut replies = stream::iter(0..n)
                .map(|i| {
                    let (answer, answered) = tokio::sync::oneshot::channel::<()>();
                    waiting.borrow_mut().push_back((i, answer));
                    let sent = outbox.send(raw_frame(i, frame_len));
                    async move {
                        sent.map_err(|_| BenchError::Closed)?;
                        answered.await.map_err(|_| BenchError::Closed)
                    }
                })
                .buffer_unordered(window.max(1));
            while let Some(reply) = replies.next().await {
                reply?;
            }
            drop(replies);
            drop(outbox);
            Ok::<_, BenchError>(())
        };
        let write = async {
            while let Some(frame) = queued.recv().await {
                writer.feed(frame).await?;
                while let Ok(frame) = queued.try_recv() {
                    writer.feed(frame).await?;
                }
                SinkExt::<Bytes>::flush(writer).await?;
            }
            Ok::<_, BenchError>(())
        };
        let read = async {
            for _ in 0..n {
                let echo = reader.next().await.ok_or(BenchError::Closed)??;
                // Its call was queued before its frame was written.
                let (i, answer) = waiting.borrow_mut().pop_front().ok_or(BenchError::Closed)?;
                check_blob(&echo, i, frame_len)?;
                let _ = answer.send(());
            }
            Ok::<_, BenchError>(())
        };
        let (called, written, read) = tokio::join!(calls, write, read);
        called?;
        written?;
        read?;
        Ok(start.elapsed())
    }

    /// `n` echoes with up to `window` in flight: frames are written in
    /// batches (one flush whenever the window is full or nothing is left to
    /// send) while replies are read concurrently.
    pub async fn pipelined(&mut self, n: u64, window: usize) -> Result<Duration, BenchError> {
        let credit = Semaphore::new(window.max(1));
        let frame_len = self.frame_len;
        let RawClient { reader, writer, .. } = self;
        let start = Instant::now();
        let write = async {
            for i in 0..n {
                match credit.try_acquire() {
                    Ok(permit) => permit.forget(),
                    Err(_) => {
                        SinkExt::<Bytes>::flush(writer).await?;
                        credit.acquire().await.expect("never closed").forget();
                    }
                }
                writer.feed(raw_frame(i, frame_len)).await?;
            }
            SinkExt::<Bytes>::flush(writer).await?;
            Ok::<_, BenchError>(())
        };
        let read = async {
            for i in 0..n {
                check_echo(reader, i, frame_len).await?;
                credit.add_permits(1);
            }
            Ok::<_, BenchError>(())
        };
        let (written, read) = tokio::join!(write, read);
        written?;
        read?;
        Ok(start.elapsed())
    }
}

/// A raw frame body: `seq` (little endian), then zeros up to `len`.
fn raw_frame(seq: u64, len: usize) -> Bytes {
    let mut body = BytesMut::zeroed(len.max(8));
    body[..8].copy_from_slice(&seq.to_le_bytes());
    body.freeze()
}

/// A [`Blob`]'s bytes: `seq` (little endian), then zeros up to `len`.
fn blob(seq: u64, len: usize) -> serde_bytes::ByteBuf {
    let mut bytes = vec![0; len.max(8)];
    bytes[..8].copy_from_slice(&seq.to_le_bytes());
    serde_bytes::ByteBuf::from(bytes)
}

/// Checks echoed bytes (a [`blob`] or a [`raw_frame`]): `seq`, at `len`.
fn check_blob(bytes: &[u8], seq: u64, len: usize) -> Result<(), BenchError> {
    let got = bytes
        .get(..8)
        .map_or(u64::MAX, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    expect(seq, got)?;
    if bytes.len() != len.max(8) {
        return Err(BenchError::Io(io::Error::other("echoed bytes of the wrong length")));
    }
    Ok(())
}

/// Reads the next echoed frame and checks it is [`raw_frame`]`(seq, len)`'s.
async fn check_echo(
    reader: &mut FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    seq: u64,
    len: usize,
) -> Result<(), BenchError> {
    let body = reader.next().await.ok_or(BenchError::Closed)??;
    check_blob(&body, seq, len)
}

// ------------------------------------------------------------------ the C floor

/// A blocking ping-pong over a `socketpair` between two processes, in C:
/// the floor under any runtime (no event loop, no framing).
const C_SOCKETPAIR: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Reads or writes exactly len bytes; non-zero on end of file or error. */
static int whole(int fd, char *buf, size_t len, int writing) {
    while (len > 0) {
        ssize_t n = writing ? write(fd, buf, len) : read(fd, buf, len);
        if (n <= 0) return 1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    long n = atol(argv[1]);
    size_t len = (size_t)atol(argv[2]);
    char *buf = calloc(len, 1);
    int sv[2];
    if (buf == NULL || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return 1;
    pid_t child = fork();
    if (child < 0) return 1;
    if (child == 0) {
        close(sv[0]);
        for (;;) {
            if (whole(sv[1], buf, len, 0) || whole(sv[1], buf, len, 1)) _exit(0);
        }
    }
    close(sv[1]);
    for (long i = 0; i < n / 10; i++) {
        if (whole(sv[0], buf, len, 1) || whole(sv[0], buf, len, 0)) return 1;
    }
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < n; i++) {
        if (whole(sv[0], buf, len, 1) || whole(sv[0], buf, len, 0)) return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    close(sv[0]);
    waitpid(child, NULL, 0);
    double ns = (end.tv_sec - start.tv_sec) * 1e9 + (end.tv_nsec - start.tv_nsec);
    printf("%.1f\n", ns / (double)n);
    return 0;
}
"#;

/// A C socketpair ping-pong, built with the system's C compiler (`cc`, or
/// `$CC`) and run as two processes of its own.
pub struct CSocketpair {
    program: PathBuf,
    _dir: tempfile::TempDir,
}

impl fmt::Debug for CSocketpair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CSocketpair").field("program", &self.program).finish()
    }
}

impl CSocketpair {
    /// Builds the program; an error when there is no working C compiler.
    pub fn build() -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("evilcluster-bench-c-").tempdir()?;
        let source = dir.path().join("socketpair.c");
        let program = dir.path().join("socketpair");
        std::fs::write(&source, C_SOCKETPAIR)?;
        let compiler = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
        let status = Command::new(compiler)
            .args(["-O2", "-o"])
            .arg(&program)
            .arg(&source)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!("the C compiler failed ({status})")));
        }
        Ok(CSocketpair { program, _dir: dir })
    }

    /// The mean round trip of `n` ping-pongs of `len` bytes each way.
    /// Blocking: it waits for the program.
    pub fn round_trip(&self, n: u64, len: usize) -> io::Result<Duration> {
        let output = Command::new(&self.program)
            .arg(n.to_string())
            .arg(len.to_string())
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!("the C ping-pong failed ({})", output.status)));
        }
        let nanos: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| io::Error::other("the C ping-pong printed no number"))?;
        Ok(Duration::from_secs_f64(nanos / 1e9))
    }
}

// ------------------------------------------------------------------ the server process

/// In the raw echo server process (when [`RAW_ECHO_ENV`] is set), runs the
/// server and exits the process; elsewhere returns at once. Call it first
/// thing in `main`.
pub fn serve_raw_echo_if_requested() {
    let Some(socket) = std::env::var_os(RAW_ECHO_ENV) else {
        return;
    };
    let code = match serve_raw_echo(Path::new(&socket)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("raw echo server: {error}");
            1
        }
    };
    std::process::exit(code);
}

fn serve_raw_echo(socket: &Path) -> io::Result<()> {
    die_with_parent()?;
    // The parent holds our stdin: end of file means it is gone or done.
    std::thread::Builder::new().name("raw-echo-parent".into()).spawn(|| {
        let _ = io::stdin().lock().read_to_end(&mut Vec::new());
        std::process::exit(0);
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = UnixListener::bind(socket)?;
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{READY}")?;
        stdout.flush()?;
        drop(stdout);
        let (stream, _) = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no client connected"))??;
        drop(listener);
        match echo(stream).await {
            Err(error) if matches!(error.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => Ok(()),
            outcome => outcome,
        }
    })
}

/// Echoes every frame back; writes are batched: whatever already arrived
/// is echoed before one flush. Returns when the client disconnects.
async fn echo(stream: UnixStream) -> io::Result<()> {
    let mut framed = Framed::with_capacity(stream, codec(DEFAULT_MAX_FRAME_LENGTH), READ_BUFFER);
    loop {
        let Some(frame) = framed.next().await else {
            return Ok(());
        };
        framed.feed(frame?.freeze()).await?;
        loop {
            match framed.next().now_or_never() {
                Some(Some(frame)) => framed.feed(frame?.freeze()).await?,
                Some(None) => {
                    let _ = SinkExt::<Bytes>::flush(&mut framed).await;
                    return Ok(());
                }
                None => break,
            }
        }
        SinkExt::<Bytes>::flush(&mut framed).await?;
    }
}

/// On Linux, asks for SIGKILL when the parent dies, and checks it has not
/// died already.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn die_with_parent() -> io::Result<()> {
    use rustix::process::{getppid, set_parent_process_death_signal, Signal};
    set_parent_process_death_signal(Some(Signal::KILL))?;
    let expected = std::env::var(RAW_PARENT_ENV)
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok());
    let parent = getppid().and_then(|pid| u32::try_from(pid.as_raw_nonzero().get()).ok());
    if expected.is_some() && parent != expected {
        return Err(io::Error::other("the parent process is gone"));
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn die_with_parent() -> io::Result<()> {
    Ok(())
}
