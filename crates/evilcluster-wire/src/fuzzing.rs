//! Fuzz targets as plain functions, shared by the `cargo fuzz` targets in
//! `fuzz/` and by the test that replays the committed corpus on stable Rust
//! (`tests/fuzz_corpus.rs`), so both always run the same code.
//!
//! Each function takes arbitrary bytes and panics only on a bug: bad input
//! must end in a typed error. Not part of the crate's stable API.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::codec::{Decoder, Framed};

use crate::control::{self, Status};
use crate::handshake::{self, Cookie, Identity, NONCE_LEN};
use crate::{codec, Frame, HandshakeError, Reply, ReplyPayload, Request, WireError};

/// The fuzz targets, by the name of their corpus directory under `fuzz/corpus/`.
pub const TARGETS: [&str; 4] = ["frame", "handshake_accept", "handshake_connect", "control"];

/// The maximum frame length the targets decode with: small, so that the
/// fuzzer reaches the "frame too long" path easily.
pub const MAX_FRAME: usize = 1024;

/// How long one handshake may take before the target calls it a hang. The
/// peer is in memory and has sent everything it will send, so a handshake
/// that is still running after this is stuck.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster cookie both fuzzed handshakes use.
pub const COOKIE: &[u8] = b"fuzz-cookie";
/// The nonce of the caller side (`handshake_connect`).
pub const CALLER_NONCE: [u8; NONCE_LEN] = [1; NONCE_LEN];
/// The nonce of the listener side (`handshake_accept`).
pub const LISTENER_NONCE: [u8; NONCE_LEN] = [2; NONCE_LEN];

/// The identity of the caller side.
pub fn caller() -> Identity {
    Identity {
        cluster: "fuzz".into(),
        path: "fuzz/caller".into(),
        incarnation: 1,
    }
}

/// The identity of the listener side.
pub fn listener() -> Identity {
    Identity {
        cluster: "fuzz".into(),
        path: "fuzz/listener".into(),
        incarnation: 2,
    }
}

/// Runs the target called `name` (one of [`TARGETS`]) on `data`.
///
/// # Panics
/// On an unknown name, and wherever the target itself panics.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "frame" => frame(data),
        "handshake_accept" => {
            let _ = handshake_accept(data);
        }
        "handshake_connect" => {
            let _ = handshake_connect(data);
        }
        "control" => control(data),
        other => panic!("no fuzz target named {other:?}"),
    }
}

/// `data` is a byte stream from a peer: split it into frames with the codec
/// (maximum [`MAX_FRAME`]) and decode each body as a [`Frame`]. A frame that
/// decodes must encode again to a body that decodes to the same frame.
pub fn frame(data: &[u8]) {
    let mut codec = codec(MAX_FRAME);
    let mut buffer = BytesMut::from(data);
    loop {
        match codec.decode(&mut buffer) {
            Ok(Some(body)) => check_frame(&body),
            // Not enough bytes for another frame: the stream ends here.
            Ok(None) => break,
            // A bad header (too long): a real connection is dropped.
            Err(_) => return,
        }
    }
    // The leftover is an incomplete frame at the end of the stream.
    let _ = codec.decode_eof(&mut buffer);
}

fn check_frame(body: &[u8]) {
    let decoded = Frame::decode(body);
    // The fast path for the actors' traffic agrees with serde, always.
    assert_eq!(
        decoded.as_ref().ok(),
        Frame::decode_general(body).as_ref().ok(),
        "the two decoders disagree"
    );
    // Names recalled from an earlier request change nothing but the speed
    // (short names, which the fuzzer finds easily).
    let recalled = crate::Recalled { actor: "a", tag: "t" };
    assert_eq!(
        decoded.as_ref().ok(),
        Frame::decode_recalling(body, &recalled).as_ref().ok(),
        "recalled names changed the frame"
    );
    let Ok(frame) = decoded else {
        return;
    };
    let encoded = frame.encode().expect("a decoded frame encodes");
    let mut general = Vec::new();
    frame
        .encode_general_into(&mut general)
        .expect("a decoded frame encodes");
    assert_eq!(encoded, general, "the two encoders disagree");
    let again = Frame::decode(&encoded).expect("an encoded frame decodes");
    assert_eq!(again, frame, "frame changed through encode/decode");
}

/// `data` is a reply or request body of the control protocol, or an
/// endpoint file: decode it as each of them, and render any decoded
/// [`Status`] as a tree.
pub fn control(data: &[u8]) {
    // As a whole frame addressed to the control service.
    if let Ok(frame) = Frame::decode(data) {
        match frame {
            Frame::Request(request) => control_request(request.tag, request.payload),
            Frame::Reply(Reply {
                result: Ok(ReplyPayload(payload)),
                ..
            }) => control_replies(payload),
            Frame::Reply(_) | Frame::Credit(_) | Frame::GoAway | Frame::GoAwayAck => {}
        }
    }
    // As a bare payload: each request and each reply.
    for tag in [control::STATUS_TAG, control::STOP_TAG, control::RESTART_TAG] {
        control_request(tag, data);
    }
    control_replies(data);
    // As an endpoint file.
    if let Ok((socket, pid)) = control::parse_endpoint(&String::from_utf8_lossy(data)) {
        assert!(pid > 0, "parse_endpoint accepted pid 0");
        let text = control::endpoint_text(&socket.to_string_lossy(), pid);
        if !socket.to_string_lossy().contains(['\n', '\r']) && !socket.as_os_str().is_empty() {
            // What a master writes, a tool reads back unchanged (modulo
            // the trailing whitespace parse_endpoint trims).
            let (again, again_pid) = control::parse_endpoint(&text).expect("endpoint text parses");
            assert_eq!(again_pid, pid);
            assert_eq!(again, socket);
        }
    }
}

fn control_request(tag: &str, payload: &[u8]) {
    match tag {
        control::STATUS_TAG | control::STOP_TAG => {
            let _ = rmp_serde::from_slice::<()>(payload);
        }
        control::RESTART_TAG => {
            let _ = rmp_serde::from_slice::<String>(payload);
        }
        _ => {}
    }
}

fn control_replies(payload: &[u8]) {
    if let Ok(status) = rmp_serde::from_slice::<Status>(payload) {
        let lines = control::tree_lines(&status);
        // Every process appears exactly once, after the root line.
        let shown = lines.iter().filter(|line| line.process.is_some()).count();
        assert_eq!(shown, status.processes.len(), "tree lost or repeated a process");
        let _ = control::render_tree(&status);
        let encoded = rmp_serde::to_vec_named(&status).expect("a decoded status encodes");
        let again: Status = rmp_serde::from_slice(&encoded).expect("an encoded status decodes");
        assert_eq!(again, status);
    }
    let _ = rmp_serde::from_slice::<()>(payload);
    let _ = rmp_serde::from_slice::<Result<u32, String>>(payload);
}

/// `data` is everything a caller sends: run the listener's side of the
/// handshake ([`handshake::accept`]) against it. Returns the outcome and the
/// bytes the listener sent.
///
/// # Panics
/// If the handshake panics, or has not ended after [`HANDSHAKE_TIMEOUT`].
pub fn handshake_accept(data: &[u8]) -> (Result<Identity, HandshakeError>, Vec<u8>) {
    let (result, sent) = against_peer(data, |framed| {
        Box::pin(async move { handshake::accept(framed, &listener(), &Cookie::new(COOKIE), LISTENER_NONCE).await })
    });
    if let Ok(caller) = &result {
        assert_eq!(
            caller.cluster,
            listener().cluster,
            "accepted a caller of another cluster"
        );
    }
    (result, sent)
}

/// `data` is everything a listener sends: run the caller's side of the
/// handshake ([`handshake::connect`]) against it. Returns the outcome and
/// the bytes the caller sent.
///
/// # Panics
/// If the handshake panics, or has not ended after [`HANDSHAKE_TIMEOUT`].
pub fn handshake_connect(data: &[u8]) -> (Result<Identity, HandshakeError>, Vec<u8>) {
    against_peer(data, |framed| {
        Box::pin(async move { handshake::connect(framed, &caller(), &Cookie::new(COOKIE), CALLER_NONCE).await })
    })
}

type Side = Framed<tokio::io::DuplexStream, tokio_util::codec::LengthDelimitedCodec>;
type HandshakeFuture<'a> = Pin<Box<dyn std::future::Future<Output = Result<Identity, HandshakeError>> + 'a>>;

/// Runs one side of the handshake on an in-memory connection whose peer
/// sends `data`, then closes its sending half, and reads all it is sent.
fn against_peer(
    data: &[u8],
    side: impl for<'a> FnOnce(&'a mut Side) -> HandshakeFuture<'a>,
) -> (Result<Identity, HandshakeError>, Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async move {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let ours = async move {
            let mut framed = Framed::new(ours, codec(MAX_FRAME));
            let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, side(&mut framed)).await;
            // Dropping our end lets the peer's read end.
            drop(framed);
            outcome
        };
        let peer = async move {
            let (mut read, mut write) = tokio::io::split(theirs);
            let send = async move {
                let _ = write.write_all(data).await;
                let _ = write.shutdown().await;
            };
            let receive = async move {
                let mut received = Vec::new();
                let _ = read.read_to_end(&mut received).await;
                received
            };
            tokio::join!(send, receive).1
        };
        let (outcome, received) = tokio::join!(ours, peer);
        let result = outcome.unwrap_or_else(|_| panic!("handshake still running after {HANDSHAKE_TIMEOUT:?}"));
        (result, received)
    })
}

/// Valid inputs for target `name`, to seed its corpus so coverage starts
/// deep: well-formed frames, and the transcript of a real successful
/// handshake between the two fuzzed sides. Each is `(file name, bytes)`.
pub fn seeds(name: &str) -> Vec<(String, Vec<u8>)> {
    match name {
        "frame" => frame_seeds(),
        "handshake_accept" => vec![("seed-welcome".into(), real_transcript().0)],
        "handshake_connect" => vec![("seed-welcome".into(), real_transcript().1)],
        "control" => control_seeds(),
        other => panic!("no fuzz target named {other:?}"),
    }
}

fn sample_frames() -> Vec<(&'static str, Frame<'static>)> {
    let reply = |id, result| Frame::Reply(Reply { id, result });
    vec![
        (
            "request",
            Frame::Request(Request {
                id: 7,
                actor: "inMemoryDatastore",
                tag: "datastore.get",
                incarnation: 1,
                reply: true,
                payload: b"\x91\xa3key",
            }),
        ),
        ("reply-ok", reply(7, Ok(ReplyPayload(b"\xc0")))),
        ("credit", Frame::Credit(crate::Credit { count: 256 })),
        ("go-away", Frame::GoAway),
        ("go-away-ack", Frame::GoAwayAck),
        (
            "reply-stopped",
            reply(11, Err(WireError::Stopped { actor: "a".into() })),
        ),
        (
            "reply-unknown-actor",
            reply(8, Err(WireError::UnknownActor { actor: "a".into() })),
        ),
        (
            "reply-unknown-message",
            reply(
                9,
                Err(WireError::UnknownMessage {
                    actor: "a".into(),
                    tag: "t".into(),
                }),
            ),
        ),
        (
            "reply-decode",
            reply(
                10,
                Err(WireError::Decode {
                    tag: "t".into(),
                    detail: "d".into(),
                }),
            ),
        ),
        (
            "reply-encode",
            reply(
                11,
                Err(WireError::Encode {
                    tag: "t".into(),
                    detail: "d".into(),
                }),
            ),
        ),
        (
            "reply-mailbox-closed",
            reply(12, Err(WireError::MailboxClosed { actor: "a".into() })),
        ),
        (
            "reply-stale-incarnation",
            reply(
                13,
                Err(WireError::StaleIncarnation {
                    requested: 1,
                    current: 2,
                }),
            ),
        ),
        (
            "reply-too-large",
            reply(14, Err(WireError::ReplyTooLarge { size: 2048, max: 1024 })),
        ),
    ]
}

fn length_prefixed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn frame_seeds() -> Vec<(String, Vec<u8>)> {
    let frames = sample_frames();
    let mut seeds: Vec<(String, Vec<u8>)> = frames
        .iter()
        .map(|(name, frame)| (format!("seed-{name}"), length_prefixed(&frame.encode().unwrap())))
        .collect();
    // Several frames in one stream.
    let stream = frames
        .iter()
        .flat_map(|(_, frame)| length_prefixed(&frame.encode().unwrap()))
        .collect();
    seeds.push(("seed-stream".into(), stream));
    seeds
}

/// A status like a small cluster's: a master, a spawn with two forks, a
/// disabled worker.
pub fn sample_status() -> Status {
    use control::{ProcessState, RoleKind};
    let process = |path: &str, role: RoleKind, state: ProcessState, pid: Option<u32>| control::ProcessStatus {
        path: path.into(),
        role,
        state,
        pid,
        actor: Some("actor".into()),
        actor_type: Some("Actor".into()),
        uptime_ms: pid.map(|_| 1000),
        restarts: 1,
        messages_in: 2,
        messages_out: 3,
        errors: 0,
        rss_bytes: Some(4096),
        pss_bytes: Some(2048),
        latency_us: vec![0, 1, 2],
    };
    Status {
        cluster: "myapp".into(),
        processes: vec![
            process("myapp", RoleKind::Master, ProcessState::Up, Some(100)),
            process("myapp/web", RoleKind::Spawn, ProcessState::Up, Some(101)),
            process("myapp/web/1", RoleKind::Fork, ProcessState::Up, Some(102)),
            process("myapp/web/2", RoleKind::Fork, ProcessState::Down, None),
            process("myapp/ghost", RoleKind::Spawn, ProcessState::Disabled, None),
        ],
    }
}

fn control_seeds() -> Vec<(String, Vec<u8>)> {
    let request = |tag: &'static str, payload: &'static [u8]| {
        Frame::Request(Request {
            id: 1,
            actor: control::CONTROL,
            tag,
            incarnation: 1,
            reply: true,
            payload,
        })
        .encode()
        .unwrap()
    };
    let status = sample_status();
    let status_named = rmp_serde::to_vec_named(&status).unwrap();
    let status_reply = Frame::Reply(Reply {
        id: 1,
        result: Ok(ReplyPayload(&status_named)),
    })
    .encode()
    .unwrap();
    vec![
        ("seed-status-request".into(), request(control::STATUS_TAG, b"\xc0")),
        ("seed-stop-request".into(), request(control::STOP_TAG, b"\xc0")),
        ("seed-restart-request".into(), request(control::RESTART_TAG, b"\xa3web")),
        ("seed-status-reply".into(), status_reply),
        ("seed-status-named".into(), status_named),
        ("seed-status-compact".into(), rmp_serde::to_vec(&status).unwrap()),
        (
            "seed-restart-ok".into(),
            rmp_serde::to_vec(&Ok::<u32, String>(2)).unwrap(),
        ),
        (
            "seed-restart-err".into(),
            rmp_serde::to_vec(&Err::<u32, String>("no worker".into())).unwrap(),
        ),
        (
            "seed-endpoint".into(),
            control::endpoint_text("/tmp/evilcluster-0/myapp.sock", 1234).into_bytes(),
        ),
    ]
}

/// Runs a real handshake between the two fuzzed sides and returns what the
/// caller sent and what the listener sent.
///
/// # Panics
/// If the handshake fails.
pub fn real_transcript() -> (Vec<u8>, Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = async move {
            let mut framed = Framed::new(Recorder::new(a), codec(MAX_FRAME));
            let result = handshake::connect(&mut framed, &caller(), &Cookie::new(COOKIE), CALLER_NONCE).await;
            result.expect("the caller is welcomed");
            framed.into_inner().written
        };
        let server = async move {
            let mut framed = Framed::new(Recorder::new(b), codec(MAX_FRAME));
            let result = handshake::accept(&mut framed, &listener(), &Cookie::new(COOKIE), LISTENER_NONCE).await;
            result.expect("the listener welcomes");
            framed.into_inner().written
        };
        tokio::join!(client, server)
    })
}

/// A stream that keeps a copy of everything written to it.
struct Recorder<T> {
    inner: T,
    written: Vec<u8>,
}

impl<T> Recorder<T> {
    fn new(inner: T) -> Self {
        Recorder {
            inner,
            written: Vec::new(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Recorder<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Recorder<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.written.extend_from_slice(&buf[..n]);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
