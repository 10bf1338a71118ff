//! Speaking the wire protocol by hand, as a peer (or an intruder) would.
use std::time::Duration;

use bytes::Bytes;
use evilcluster_wire::handshake::{self, NONCE_LEN};
use evilcluster_wire::{codec, Cookie, Frame, Identity, Request, WireError};
use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

pub type Conn = Framed<UnixStream, LengthDelimitedCodec>;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Connects to `socket` and authenticates (with the cookie) as `path`.
pub async fn claim(socket: &str, cookie: &str, path: &str, incarnation: u64) -> (Conn, Identity) {
    let stream = UnixStream::connect(socket).await.expect("connect");
    let mut framed = Framed::new(stream, codec(evilcluster_wire::DEFAULT_MAX_FRAME_LENGTH));
    let me = Identity {
        cluster: "fixture".into(),
        path: path.into(),
        incarnation,
    };
    let peer = handshake::connect(&mut framed, &me, &Cookie::new(cookie), [5; NONCE_LEN])
        .await
        .expect("the cookie is welcomed");
    (framed, peer)
}

/// Sends a request and waits for its reply.
pub async fn ask(
    conn: &mut Conn,
    id: u64,
    actor: &str,
    tag: &str,
    incarnation: u64,
    payload: &[u8],
) -> Result<Vec<u8>, WireError> {
    let frame = Frame::Request(Request {
        id,
        actor,
        tag,
        incarnation,
        reply: true,
        payload,
    });
    conn.send(Bytes::from(frame.encode().unwrap())).await.unwrap();
    loop {
        let body = tokio::time::timeout(Duration::from_secs(20), conn.next())
            .await
            .expect("a reply within 20 s")
            .expect("open")
            .unwrap();
        if let Frame::Reply(reply) = Frame::decode(&body).unwrap() {
            if reply.id == id {
                return reply.result.map(|p| p.0.to_vec());
            }
        }
    }
}
