//! The handshake that opens every connection.
//!
//! ```text
//! caller                                   listener
//!   Hello { version, cluster, path,
//!           incarnation, client nonce }  ──▶
//!                                        ◀──  Challenge { path, incarnation, server nonce,
//!                                                         server proof }
//!   Proof { client proof }               ──▶
//!                                        ◀──  Welcome  (or Refused { reason })
//! ```
//!
//! Each proof is an HMAC-SHA256 keyed by the cluster cookie over both nonces,
//! the cluster id and both paths, with a different label per direction, so
//! neither side can replay the other's proof and the cookie never travels.
//! Both sides prove they know the cookie: the caller checks the listener's
//! proof before sending its own.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::{HandshakeError, PROTOCOL_VERSION};

type HmacSha256 = Hmac<Sha256>;

/// Length of a nonce, in bytes.
pub const NONCE_LEN: usize = 32;

/// The largest frame either side accepts during the handshake: its
/// messages are a few hundred bytes. A peer that has not proved the cookie
/// must not make the other side hold (or reserve) more than this; the full
/// frame limit applies only once the handshake has succeeded.
pub const MAX_HANDSHAKE_FRAME: usize = 4 * 1024;

/// The cluster's shared secret. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Cookie(Vec<u8>);

impl Cookie {
    /// A cookie from raw secret bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Cookie(secret.into())
    }

    /// The secret bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Cookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cookie(<redacted>)")
    }
}

/// Who a process is, as told in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The cluster id (the name given to `Cluster::new`).
    pub cluster: String,
    /// The process's path in the tree, e.g. `myapp/webserverApi/2`.
    pub path: String,
    /// Which start of that path this process is; a restart gets a new one.
    pub incarnation: u64,
}

/// One handshake message. Public for tools and tests that speak the
/// protocol by hand; [`connect`] and [`accept`] drive the exchange.
#[derive(Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Message {
    /// Caller → listener, first.
    Hello {
        version: u16,
        cluster: String,
        path: String,
        incarnation: u64,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
    },
    /// Listener → caller: its identity, nonce and proof.
    Challenge {
        path: String,
        incarnation: u64,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// Caller → listener: the caller's proof.
    Proof {
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// Listener → caller: accepted.
    Welcome,
    /// Either way: refused, and why.
    Refused { reason: String },
}

const SERVER_LABEL: &[u8] = b"evilcluster/1 listener proof";
const CLIENT_LABEL: &[u8] = b"evilcluster/1 caller proof";

struct Transcript<'a> {
    cluster: &'a str,
    client_path: &'a str,
    server_path: &'a str,
    client_nonce: &'a [u8],
    server_nonce: &'a [u8],
}

impl Transcript<'_> {
    fn mac(&self, cookie: &Cookie, label: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(cookie.as_bytes()).expect("HMAC takes any key length");
        for part in [
            label,
            self.cluster.as_bytes(),
            self.client_path.as_bytes(),
            self.server_path.as_bytes(),
            self.client_nonce,
            self.server_nonce,
        ] {
            // Length-prefix each part so that no two transcripts collide.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    fn prove(&self, cookie: &Cookie, label: &[u8]) -> Vec<u8> {
        self.mac(cookie, label).finalize().into_bytes().to_vec()
    }

    fn verify(&self, cookie: &Cookie, label: &[u8], proof: &[u8]) -> Result<(), HandshakeError> {
        // Constant-time comparison.
        self.mac(cookie, label)
            .verify_slice(proof)
            .map_err(|_| HandshakeError::BadProof)
    }
}

/// Sends one handshake message.
pub async fn send<T: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
    message: &Message,
) -> Result<(), HandshakeError> {
    let body = rmp_serde::to_vec(message).map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    framed.send(Bytes::from(body)).await?;
    Ok(())
}

/// Receives one handshake message.
pub async fn receive<T: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
) -> Result<Message, HandshakeError> {
    let frame = framed.next().await.ok_or(HandshakeError::Closed)??;
    rmp_serde::from_slice(&frame).map_err(|e| HandshakeError::Malformed(clip(e.to_string())))
}

/// Runs the caller's side of the handshake on a fresh connection.
///
/// `nonce` must be fresh random bytes ([`NONCE_LEN`] of them). Returns the
/// listener's identity once both sides have proved the cookie.
pub async fn connect<T: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
    me: &Identity,
    cookie: &Cookie,
    nonce: [u8; NONCE_LEN],
) -> Result<Identity, HandshakeError> {
    send(
        framed,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            cluster: me.cluster.clone(),
            path: me.path.clone(),
            incarnation: me.incarnation,
            nonce: nonce.to_vec(),
        },
    )
    .await?;
    let (peer_path, peer_incarnation, server_nonce, server_proof) = match receive(framed).await? {
        Message::Challenge {
            path,
            incarnation,
            nonce,
            proof,
        } => (path, incarnation, nonce, proof),
        Message::Refused { reason } => return Err(HandshakeError::Refused(reason)),
        other => return Err(unexpected(&other)),
    };
    let transcript = Transcript {
        cluster: &me.cluster,
        client_path: &me.path,
        server_path: &peer_path,
        client_nonce: &nonce,
        server_nonce: &server_nonce,
    };
    transcript.verify(cookie, SERVER_LABEL, &server_proof)?;
    let proof = transcript.prove(cookie, CLIENT_LABEL);
    send(framed, &Message::Proof { proof }).await?;
    match receive(framed).await? {
        Message::Welcome => Ok(Identity {
            cluster: me.cluster.clone(),
            path: peer_path,
            incarnation: peer_incarnation,
        }),
        Message::Refused { reason } => Err(HandshakeError::Refused(reason)),
        other => Err(unexpected(&other)),
    }
}

/// Runs the listener's side of the handshake on an accepted connection.
///
/// `nonce` must be fresh random bytes. Returns the caller's identity. On any
/// failure the caller is told why (when it can still be told) before the
/// error is returned; the connection should then be dropped.
pub async fn accept<T: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
    me: &Identity,
    cookie: &Cookie,
    nonce: [u8; NONCE_LEN],
) -> Result<Identity, HandshakeError> {
    let result = accept_inner(framed, me, cookie, nonce).await;
    if let Err(error) = &result {
        if matches!(
            error,
            HandshakeError::Version { .. }
                | HandshakeError::Cluster { .. }
                | HandshakeError::BadProof
                | HandshakeError::Malformed(_)
        ) {
            // Best effort: the peer may already be gone.
            let _ = send(
                framed,
                &Message::Refused {
                    reason: error.to_string(),
                },
            )
            .await;
        }
    }
    result
}

async fn accept_inner<T: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
    me: &Identity,
    cookie: &Cookie,
    nonce: [u8; NONCE_LEN],
) -> Result<Identity, HandshakeError> {
    let (version, cluster, path, incarnation, client_nonce) = match receive(framed).await? {
        Message::Hello {
            version,
            cluster,
            path,
            incarnation,
            nonce,
        } => (version, cluster, path, incarnation, nonce),
        other => return Err(unexpected(&other)),
    };
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    if cluster != me.cluster {
        return Err(HandshakeError::Cluster {
            ours: me.cluster.clone(),
            theirs: clip(cluster),
        });
    }
    if client_nonce.len() != NONCE_LEN {
        return Err(HandshakeError::Malformed(format!(
            "nonce of {} bytes, expected {NONCE_LEN}",
            client_nonce.len()
        )));
    }
    let transcript = Transcript {
        cluster: &me.cluster,
        client_path: &path,
        server_path: &me.path,
        client_nonce: &client_nonce,
        server_nonce: &nonce,
    };
    let proof = transcript.prove(cookie, SERVER_LABEL);
    send(
        framed,
        &Message::Challenge {
            path: me.path.clone(),
            incarnation: me.incarnation,
            nonce: nonce.to_vec(),
            proof,
        },
    )
    .await?;
    match receive(framed).await? {
        Message::Proof { proof } => transcript.verify(cookie, CLIENT_LABEL, &proof)?,
        other => return Err(unexpected(&other)),
    }
    send(framed, &Message::Welcome).await?;
    Ok(Identity {
        cluster,
        path,
        incarnation,
    })
}

/// Characters of a peer's string kept in an error: errors are logged and
/// echoed in the refusal, and a stranger must not choose their size.
const CLIP: usize = 128;

fn clip(text: String) -> String {
    match text.char_indices().nth(CLIP) {
        None => text,
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
    }
}

fn unexpected(message: &Message) -> HandshakeError {
    let name = match message {
        Message::Hello { .. } => "Hello",
        Message::Challenge { .. } => "Challenge",
        Message::Proof { .. } => "Proof",
        Message::Welcome => "Welcome",
        Message::Refused { .. } => "Refused",
    };
    HandshakeError::Malformed(format!("unexpected handshake message {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    fn identity(path: &str) -> Identity {
        Identity {
            cluster: "test".into(),
            path: path.into(),
            incarnation: 1,
        }
    }

    async fn run(
        client_cookie: &Cookie,
        server_cookie: &Cookie,
    ) -> (Result<Identity, HandshakeError>, Result<Identity, HandshakeError>) {
        let (a, b) = tokio::io::duplex(4096);
        // Each side owns its end, so a side that gives up closes it and the
        // other side sees the connection end instead of waiting forever.
        let client = async move {
            let mut framed = Framed::new(a, codec(1024));
            connect(&mut framed, &identity("test/caller"), client_cookie, [1; NONCE_LEN]).await
        };
        let server = async move {
            let mut framed = Framed::new(b, codec(1024));
            accept(&mut framed, &identity("test/listener"), server_cookie, [2; NONCE_LEN]).await
        };
        tokio::join!(client, server)
    }

    #[tokio::test]
    async fn same_cookie_is_welcomed() {
        let cookie = Cookie::new(*b"secret");
        let (client, server) = run(&cookie, &cookie).await;
        assert_eq!(client.unwrap().path, "test/listener");
        assert_eq!(server.unwrap().path, "test/caller");
    }

    #[tokio::test]
    async fn wrong_cookie_fails_on_both_sides() {
        let (client, server) = run(&Cookie::new(*b"one"), &Cookie::new(*b"two")).await;
        // The caller checks the listener's proof first and walks away.
        assert!(matches!(client, Err(HandshakeError::BadProof)), "{client:?}");
        assert!(server.is_err());
    }

    #[test]
    fn a_peers_long_strings_are_clipped() {
        let clipped = clip("é".repeat(1000));
        assert!(clipped.starts_with(&"é".repeat(CLIP)) && clipped.ends_with("… (2000 bytes)"));
        assert_eq!(clip("short".into()), "short");
    }

    #[test]
    fn cookie_debug_is_redacted() {
        assert_eq!(format!("{:?}", Cookie::new(*b"secret")), "Cookie(<redacted>)");
    }
}
