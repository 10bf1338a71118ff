//! Bad input reaching a hosting process is refused, typed and logged, and the
//! process keeps serving everyone else. These tests speak the wire protocol
//! by hand from the test process to a real cluster.

mod support;

use std::time::Duration;

use bytes::Bytes;
use evilcluster_wire::handshake::{self, Message, NONCE_LEN};
use evilcluster_wire::{codec, Cookie, HandshakeError, Identity, WireError};
use futures_util::SinkExt;
use support::wire;
use support::{Fixture, Member};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const COOKIE: &str = "a-fixed-test-cookie";
const IO_DEADLINE: Duration = Duration::from_secs(20);

fn store(members: &[Member]) -> Member {
    members
        .iter()
        .find(|m| m.path == "fixture/store")
        .cloned()
        .expect("store is listed")
}

fn me(cluster: &str) -> Identity {
    Identity {
        cluster: cluster.into(),
        path: "fixture/intruder".into(),
        incarnation: 7,
    }
}

async fn open(member: &Member) -> Framed<UnixStream, LengthDelimitedCodec> {
    let stream = UnixStream::connect(member.socket.as_deref().expect("store listens"))
        .await
        .expect("connect");
    Framed::new(stream, codec(evilcluster_wire::DEFAULT_MAX_FRAME_LENGTH))
}

/// Reads until the peer closes the connection; panics if it stays open.
async fn closed_by_peer(mut stream: UnixStream) {
    let mut sink = Vec::new();
    tokio::time::timeout(IO_DEADLINE, stream.read_to_end(&mut sink))
        .await
        .expect("the peer should close the connection")
        .ok();
}

/// The cluster still answers real traffic.
fn still_serving(fixture: &mut Fixture) {
    fixture.command("check");
    fixture.expect_line("checked ok");
}

#[test]
fn wrong_cookie_wrong_cluster_and_garbage_are_refused() {
    let mut fixture = Fixture::start(&["serve", "--cookie", COOKIE]);
    let store = store(&fixture.members());
    wire::runtime().block_on(async {
        // A caller with the wrong cookie sees that the listener's proof does not match.
        let mut framed = open(&store).await;
        let outcome = handshake::connect(&mut framed, &me("fixture"), &Cookie::new("wrong"), [1; NONCE_LEN]).await;
        assert!(matches!(outcome, Err(HandshakeError::BadProof)), "{outcome:?}");

        // A caller that ignores that and sends a made-up proof is refused by the listener.
        let mut framed = open(&store).await;
        handshake::send(
            &mut framed,
            &Message::Hello {
                version: evilcluster_wire::PROTOCOL_VERSION,
                cluster: "fixture".into(),
                path: "fixture/intruder".into(),
                incarnation: 7,
                nonce: vec![3; NONCE_LEN],
            },
        )
        .await
        .unwrap();
        assert!(matches!(
            handshake::receive(&mut framed).await,
            Ok(Message::Challenge { .. })
        ));
        handshake::send(&mut framed, &Message::Proof { proof: vec![0; 32] })
            .await
            .unwrap();
        match handshake::receive(&mut framed).await {
            Ok(Message::Refused { reason }) => assert!(reason.contains("cookie"), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        closed_by_peer(framed.into_inner()).await;

        // Right cookie, wrong cluster id.
        let mut framed = open(&store).await;
        let outcome = handshake::connect(&mut framed, &me("other"), &Cookie::new(COOKIE), [1; NONCE_LEN]).await;
        assert!(
            matches!(outcome, Err(HandshakeError::Refused(ref r)) if r.contains("cluster")),
            "{outcome:?}"
        );

        // Bytes that are not the protocol at all.
        let mut stream = UnixStream::connect(store.socket.as_deref().unwrap()).await.unwrap();
        stream.write_all(b"\x00\x00\x00\x08GET / HT").await.unwrap();
        closed_by_peer(stream).await;
    });
    still_serving(&mut fixture);
}

async fn authenticated(member: &Member) -> Framed<UnixStream, LengthDelimitedCodec> {
    let mut framed = open(member).await;
    let peer = handshake::connect(&mut framed, &me("fixture"), &Cookie::new(COOKIE), [9; NONCE_LEN])
        .await
        .expect("the right cookie is welcomed");
    assert_eq!(peer.path, member.path);
    assert_eq!(peer.incarnation, member.incarnation);
    framed
}

#[test]
fn bad_requests_get_typed_errors_and_the_connection_survives() {
    let mut fixture = Fixture::start(&["serve", "--cookie", COOKIE]);
    let store = store(&fixture.members());
    let inc = store.incarnation;
    wire::runtime().block_on(async {
        let mut framed = authenticated(&store).await;
        let get_k = rmp_serde_encode_get("k");

        let unknown_actor = wire::ask(&mut framed, 1, "nobody", "store.get", inc, &get_k).await;
        assert_eq!(unknown_actor, Err(WireError::UnknownActor { actor: "nobody".into() }));

        let unknown_tag = wire::ask(&mut framed, 2, "store", "store.nope", inc, &get_k).await;
        assert!(
            matches!(unknown_tag, Err(WireError::UnknownMessage { .. })),
            "{unknown_tag:?}"
        );

        let undecodable = wire::ask(&mut framed, 3, "store", "store.get", inc, b"\xc1\xc1").await;
        assert!(matches!(undecodable, Err(WireError::Decode { .. })), "{undecodable:?}");

        let stale = wire::ask(&mut framed, 4, "store", "store.get", inc.wrapping_add(1), &get_k).await;
        assert!(matches!(stale, Err(WireError::StaleIncarnation { .. })), "{stale:?}");

        // A well-framed body that is not a frame is dropped; the connection goes on.
        framed.send(Bytes::from_static(b"\xff\xfe garbage")).await.unwrap();
        let fine = wire::ask(&mut framed, 5, "store", "store.get", inc, &get_k).await;
        assert!(fine.is_ok(), "{fine:?}");
    });
    still_serving(&mut fixture);
}

#[test]
fn an_oversized_frame_drops_only_that_connection() {
    let mut fixture = Fixture::start(&["serve", "--cookie", COOKIE]);
    let store = store(&fixture.members());
    wire::runtime().block_on(async {
        let framed = authenticated(&store).await;
        let mut stream = framed.into_inner();
        // Announce a 1 GiB frame: refused on its header, nothing allocated.
        stream.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        // The peer may have hung up already: then this write fails, which is fine.
        let _ = stream.write_all(&[0; 64]).await;
        closed_by_peer(stream).await;
    });
    still_serving(&mut fixture);
}

/// `Get("k")` as the store expects it: a newtype struct is encoded as its
/// field, here a short MessagePack string.
fn rmp_serde_encode_get(key: &str) -> Vec<u8> {
    let mut out = vec![0xa0 | key.len() as u8];
    out.extend_from_slice(key.as_bytes());
    out
}
