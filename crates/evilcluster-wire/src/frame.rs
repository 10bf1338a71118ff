use serde::{Deserialize, Serialize};

use crate::{DecodeError, WireError};

/// The protocol version spoken by this crate; both ends of a connection must agree.
pub const PROTOCOL_VERSION: u16 = 2;

/// A frame after the handshake. Borrows its strings and payload from the
/// received buffer, so forwarding a payload never copies or re-encodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// A message for an actor hosted by the receiving process.
    #[serde(borrow)]
    Request(Request<'a>),
    /// The answer to an earlier request of the receiving process.
    #[serde(borrow)]
    Reply(Reply<'a>),
    /// The receiver finished this many one-way messages (requests that
    /// wanted no reply): the sender may put as many more in flight.
    Credit(Credit),
    /// The sender is stopping: send it no new requests on this connection
    /// (those already sent are still answered). Answered with
    /// [`Frame::GoAwayAck`] once nothing more will follow.
    GoAway,
    /// Nothing follows this frame on the connection but replies and
    /// credits: the receiver, which sent [`Frame::GoAway`], may finish.
    GoAwayAck,
}

/// Flow control for one-way messages: how many the sender of this frame
/// has finished handling since its last credit.
///
/// Each side lets at most a window of user messages wait on its peer; a
/// request's reply gives its place back, and one-way messages, which have
/// no reply, give theirs back in batches through this frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// One-way messages finished.
    pub count: u32,
}

/// A message for a named actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request<'a> {
    /// Chosen by the sender, unique among its requests in flight on this connection.
    pub id: u64,
    /// The target actor's stable name.
    pub actor: &'a str,
    /// The message's stable tag.
    pub tag: &'a str,
    /// The incarnation of the receiving process the sender addressed.
    pub incarnation: u64,
    /// Whether the sender waits for a reply (`send`) or not (`do_send`).
    pub reply: bool,
    /// The message, MessagePack-encoded.
    #[serde(with = "serde_bytes")]
    pub payload: &'a [u8],
}

/// The outcome of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply<'a> {
    /// The id of the request answered.
    pub id: u64,
    /// The handler's result, MessagePack-encoded, or why there is none.
    #[serde(borrow)]
    pub result: Result<ReplyPayload<'a>, WireError>,
}

/// A reply's encoded result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReplyPayload<'a>(#[serde(with = "serde_bytes")] pub &'a [u8]);

impl<'a> Frame<'a> {
    /// Decodes a frame body.
    pub fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        Ok(rmp_serde::from_slice(body)?)
    }

    /// Encodes the frame body (without its length prefix).
    pub fn encode(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        rmp_serde::encode::write(&mut out, self)?;
        Ok(out)
    }

    /// Encodes the frame body into `out`, after what it already holds.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), rmp_serde::encode::Error> {
        rmp_serde::encode::write(out, self)
    }

    /// Encodes the frame body into `out` except the payload's own bytes,
    /// and returns them: `out` followed by the returned bytes is exactly
    /// what [`encode_into`](Self::encode_into) writes. A payload comes last
    /// in every frame that has one (a request's, a successful reply's), so
    /// a sender can hand a large payload to the socket as it is instead of
    /// copying it into the frame. Frames without a payload are written
    /// whole and return no bytes.
    pub fn encode_head_into(&self, out: &mut Vec<u8>) -> Result<&'a [u8], rmp_serde::encode::Error> {
        let (frame, payload) = match self {
            Frame::Request(request) => (
                Frame::Request(Request {
                    payload: &[],
                    ..request.clone()
                }),
                request.payload,
            ),
            Frame::Reply(Reply {
                id,
                result: Ok(ReplyPayload(payload)),
            }) => (
                Frame::Reply(Reply {
                    id: *id,
                    result: Ok(ReplyPayload(&[])),
                }),
                *payload,
            ),
            other => {
                other.encode_into(out)?;
                return Ok(&[]);
            }
        };
        frame.encode_into(out)?;
        // The empty payload was written last, as an empty MessagePack bin
        // (`c4 00`): put the header of the real length in its place.
        let empty_bin = out.len().checked_sub(2).filter(|&at| out[at..] == [0xc4, 0x00]);
        let Some(at) = empty_bin else {
            return Err(rmp_serde::encode::Error::Syntax(
                "a frame's payload is not its last field".into(),
            ));
        };
        out.truncate(at);
        let len = payload.len();
        if let Ok(len) = u8::try_from(len) {
            out.extend_from_slice(&[0xc4, len]);
        } else if let Ok(len) = u16::try_from(len) {
            out.push(0xc5);
            out.extend_from_slice(&len.to_be_bytes());
        } else if let Ok(len) = u32::try_from(len) {
            out.push(0xc6);
            out.extend_from_slice(&len.to_be_bytes());
        } else {
            return Err(rmp_serde::encode::Error::Syntax("a payload over 4 GiB".into()));
        }
        Ok(payload)
    }

    fn encoded_len_hint(&self) -> usize {
        32 + match self {
            Frame::Request(r) => r.actor.len() + r.tag.len() + r.payload.len(),
            Frame::Reply(r) => r.result.as_ref().map_or(64, |p| p.0.len()),
            Frame::Credit(_) | Frame::GoAway | Frame::GoAwayAck => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_round_trips_both_outcomes() {
        let ok = Frame::Reply(Reply {
            id: 1,
            result: Ok(ReplyPayload(b"\xc0")),
        });
        assert_eq!(Frame::decode(&ok.encode().unwrap()).unwrap(), ok);
        let err = Frame::Reply(Reply {
            id: 2,
            result: Err(WireError::UnknownMessage {
                actor: "a".into(),
                tag: "t".into(),
            }),
        });
        assert_eq!(Frame::decode(&err.encode().unwrap()).unwrap(), err);
    }

    /// The head and the payload, one after the other, are the frame.
    #[test]
    fn a_head_and_its_payload_are_the_whole_frame() {
        for len in [0usize, 1, 255, 256, 65_535, 65_536, 300_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let frames = [
                Frame::Request(Request {
                    id: u64::MAX - len as u64,
                    actor: "some.actor",
                    tag: "some.tag",
                    incarnation: 7,
                    reply: len % 2 == 0,
                    payload: &payload,
                }),
                Frame::Reply(Reply {
                    id: len as u64,
                    result: Ok(ReplyPayload(&payload)),
                }),
            ];
            for frame in frames {
                let mut head = Vec::new();
                let rest = frame.encode_head_into(&mut head).unwrap();
                assert_eq!(rest, &payload[..]);
                head.extend_from_slice(rest);
                assert_eq!(head, frame.encode().unwrap(), "{len} bytes");
            }
        }
        let mut whole = Vec::new();
        assert!(Frame::GoAway.encode_head_into(&mut whole).unwrap().is_empty());
        assert_eq!(whole, Frame::GoAway.encode().unwrap());
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(Frame::decode(b"\xff\x00garbage").is_err());
        assert!(Frame::decode(b"").is_err());
    }
}
