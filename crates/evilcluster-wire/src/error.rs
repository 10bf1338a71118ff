use serde::{Deserialize, Serialize};

/// An error the receiving process reports back in a reply, instead of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WireError {
    /// No actor of that name is hosted by the process the request reached.
    #[error("no actor named `{actor}` is hosted by the receiving process")]
    UnknownActor {
        /// The name the request asked for.
        actor: String,
    },
    /// The actor is hosted there but does not list that message in its routes.
    #[error("actor `{actor}` has no route for message `{tag}`; list it in `RemoteActor::Messages`")]
    UnknownMessage {
        /// The target actor.
        actor: String,
        /// The message tag it does not know.
        tag: String,
    },
    /// The payload did not decode as the message type the tag names.
    #[error("payload of `{tag}` did not decode: {detail}")]
    Decode {
        /// The message tag.
        tag: String,
        /// The decoder's own words.
        detail: String,
    },
    /// The handler's result could not be encoded.
    #[error("result of `{tag}` did not encode: {detail}")]
    Encode {
        /// The message tag.
        tag: String,
        /// The encoder's own words.
        detail: String,
    },
    /// The actor's mailbox was already closed when the request arrived: it
    /// was not queued, so its handler did not run.
    #[error("the mailbox of actor `{actor}` is closed")]
    MailboxClosed {
        /// The target actor.
        actor: String,
    },
    /// The actor stopped after the request was queued and before it
    /// answered: its handler may have started (an asynchronous handler
    /// cancelled by the stop) or not run at all.
    #[error("actor `{actor}` stopped before it answered")]
    Stopped {
        /// The target actor.
        actor: String,
    },
    /// The request named an earlier incarnation of the receiving process.
    #[error("request for incarnation {requested} reached incarnation {current}")]
    StaleIncarnation {
        /// The incarnation the sender addressed.
        requested: u64,
        /// The incarnation that received it.
        current: u64,
    },
    /// The encoded reply is larger than the connection's maximum frame size.
    #[error("reply of {size} bytes exceeds the maximum frame of {max} bytes")]
    ReplyTooLarge {
        /// Encoded size of the reply.
        size: usize,
        /// The maximum frame length.
        max: usize,
    },
    /// The request spoke for another process than the one its connection
    /// authenticated as (or than the connection registered for it): a peer
    /// acts only as itself, and only through its own registered connection.
    #[error("refused: a connection authenticated as `{authenticated}` spoke for `{claimed}`")]
    Impersonation {
        /// Who the request claimed to be (or speak for).
        claimed: String,
        /// Who the connection authenticated as.
        authenticated: String,
    },
}

/// A frame body that is not a valid frame.
#[derive(Debug, thiserror::Error)]
#[error("malformed frame: {0}")]
pub struct DecodeError(#[from] pub rmp_serde::decode::Error);

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The connection failed or closed during the handshake.
    #[error("connection lost during handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before finishing the handshake.
    #[error("peer closed the connection during the handshake")]
    Closed,
    /// The peer sent something that is not a handshake message.
    #[error("peer sent a malformed handshake message: {0}")]
    Malformed(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    Version {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peer belongs to another cluster.
    #[error("cluster mismatch: we are `{ours}`, the peer is `{theirs}`")]
    Cluster {
        /// Our cluster id.
        ours: String,
        /// The peer's cluster id.
        theirs: String,
    },
    /// The peer's proof does not match our cookie.
    #[error("the peer's cookie proof is wrong (different cluster cookie)")]
    BadProof,
    /// The peer refused us, and said why.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    TimedOut,
}
