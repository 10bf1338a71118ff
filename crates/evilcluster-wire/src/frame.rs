use bytes::BufMut;
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

/// The names of the last request a reader handed on, as the receiving
/// process's own strings (its actor's name and the message's tag): a
/// request that names them again is decoded by comparing bytes, without
/// checking its names' UTF-8 a second time (see
/// [`Frame::decode_recalling`]). The decoded frame is the same either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recalled {
    /// The actor the last request was for.
    pub actor: &'static str,
    /// The last request's tag.
    pub tag: &'static str,
}

impl<'a> Frame<'a> {
    /// Decodes a frame body.
    pub fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        Self::decode_recalling(body, &Recalled::default())
    }

    /// Decodes a frame body, taking a request's names from `recalled`
    /// when they are the same bytes: the usual traffic, many requests to
    /// one actor with few tags, skips a UTF-8 check per name (about 100
    /// instructions each for a short name).
    pub fn decode_recalling(body: &'a [u8], recalled: &Recalled) -> Result<Self, DecodeError> {
        match decode_traffic(body, recalled) {
            Some(frame) => Ok(frame),
            None => Self::decode_general(body),
        }
    }

    /// Decodes any frame through serde; [`decode`](Self::decode) gives the
    /// same result, faster for the frames of the actors' traffic.
    pub fn decode_general(body: &'a [u8]) -> Result<Self, DecodeError> {
        Ok(rmp_serde::from_slice(body)?)
    }

    /// Encodes the frame body (without its length prefix).
    pub fn encode(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Encodes the frame body into `out` (a `Vec<u8>`, a `BytesMut`...),
    /// after what it already holds.
    pub fn encode_into<B: BufMut>(&self, out: &mut B) -> Result<(), rmp_serde::encode::Error> {
        if !encode_traffic(self, out) {
            self.encode_general_into(out)?;
        }
        Ok(())
    }

    /// Encodes any frame through serde; [`encode_into`](Self::encode_into)
    /// writes the same bytes, faster for the frames of the actors' traffic.
    pub fn encode_general_into<B: BufMut>(&self, out: &mut B) -> Result<(), rmp_serde::encode::Error> {
        rmp_serde::encode::write(&mut out.writer(), self)
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

/// Decodes the two frames that carry the actors' traffic — a request and
/// a successful reply — straight from their MessagePack bytes (the layout
/// serde gives them: `{"Request": [id, actor, tag, incarnation, reply,
/// payload]}` and `{"Reply": [id, {"Ok": payload}]}`). Serde's generic
/// path validates variant names as text and walks every value through a
/// visitor; this costs a fraction of that per message. `None` for anything
/// else, or anything unusual: the caller decodes it through serde, so the
/// result is always what serde would give.
fn decode_traffic<'a>(body: &'a [u8], recalled: &Recalled) -> Option<Frame<'a>> {
    // Whole heads compared at once: what `encode_traffic` writes, and what
    // any MessagePack encoder writes for these values (each in its
    // shortest form). Another encoding of the same frame goes to serde.
    if let Some(rest) = body.strip_prefix(REPLY_HEAD) {
        let mut rd = Cursor(rest);
        let id = rd.uint()?;
        rd.0 = rd.0.strip_prefix(OK_HEAD)?;
        let payload = rd.bin()?;
        return Some(Frame::Reply(Reply {
            id,
            result: Ok(ReplyPayload(payload)),
        }));
    }
    let mut rd = Cursor(body.strip_prefix(REQUEST_HEAD)?);
    let id = rd.uint()?;
    let actor = text(rd.str_bytes()?, recalled.actor)?;
    let tag = text(rd.str_bytes()?, recalled.tag)?;
    let incarnation = rd.uint()?;
    let reply = rd.bool()?;
    let payload = rd.bin()?;
    Some(Frame::Request(Request {
        id,
        actor,
        tag,
        incarnation,
        reply,
        payload,
    }))
}

/// `bytes` as text: `recalled` when they are its bytes (known to be
/// UTF-8), otherwise checked.
fn text<'a>(bytes: &'a [u8], recalled: &'static str) -> Option<&'a str> {
    if bytes == recalled.as_bytes() {
        Some(recalled)
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

/// `{"Request": [` — a map of one entry, its key, an array of six.
const REQUEST_HEAD: &[u8] = b"\x81\xa7Request\x96";
/// `{"Reply": [` — a map of one entry, its key, an array of two.
const REPLY_HEAD: &[u8] = b"\x81\xa5Reply\x92";
/// `{"Ok": ` — a successful result.
const OK_HEAD: &[u8] = b"\x81\xa2Ok";

/// Reads the few MessagePack values [`decode_traffic`] needs, borrowing
/// from the frame. `rmp`'s readers do the same through a generic error
/// plumbing that costs several times more per value on this path; any
/// marker this does not know makes the frame go to serde.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(taken)
    }

    fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// An unsigned integer, in any of the encodings serde accepts for a
    /// `u64` (a non-negative signed one too).
    fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            m @ 0x00..=0x7f => Some(u64::from(m)),
            0xcc => Some(u64::from(self.byte()?)),
            0xcd => Some(u64::from(u16::from_be_bytes(self.be()?))),
            0xce => Some(u64::from(u32::from_be_bytes(self.be()?))),
            0xcf => Some(u64::from_be_bytes(self.be()?)),
            0xd0 => u64::try_from(i8::from_be_bytes(self.be()?)).ok(),
            0xd1 => u64::try_from(i16::from_be_bytes(self.be()?)).ok(),
            0xd2 => u64::try_from(i32::from_be_bytes(self.be()?)).ok(),
            0xd3 => u64::try_from(i64::from_be_bytes(self.be()?)).ok(),
            _ => None,
        }
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0xc2 => Some(false),
            0xc3 => Some(true),
            _ => None,
        }
    }

    fn str_bytes(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => usize::from(self.byte()?),
            0xda => usize::from(u16::from_be_bytes(self.be()?)),
            0xdb => usize::try_from(u32::from_be_bytes(self.be()?)).ok()?,
            _ => return None,
        };
        self.take(len)
    }

    fn bin(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            0xc4 => usize::from(self.byte()?),
            0xc5 => usize::from(u16::from_be_bytes(self.be()?)),
            0xc6 => usize::try_from(u32::from_be_bytes(self.be()?)).ok()?,
            _ => return None,
        };
        self.take(len)
    }
}

/// Writes a request or a successful reply straight into `out`, byte for
/// byte what serde writes (see [`decode_traffic`] for the layout; the
/// tests and the fuzz target compare the two). `false` for other frames,
/// which go through serde.
fn encode_traffic<B: BufMut>(frame: &Frame<'_>, out: &mut B) -> bool {
    let fits = |len: usize| u32::try_from(len).is_ok();
    match frame {
        Frame::Request(request)
            if fits(request.payload.len()) && fits(request.actor.len()) && fits(request.tag.len()) =>
        {
            // {"Request": [
            out.put_slice(REQUEST_HEAD);
            put_uint(out, request.id);
            put_str(out, request.actor);
            put_str(out, request.tag);
            put_uint(out, request.incarnation);
            out.put_u8(if request.reply { 0xc3 } else { 0xc2 });
            put_bin(out, request.payload);
            true
        }
        Frame::Reply(Reply {
            id,
            result: Ok(ReplyPayload(payload)),
        }) if fits(payload.len()) => {
            // {"Reply": [id, {"Ok": payload}]}
            out.put_slice(REPLY_HEAD);
            put_uint(out, *id);
            out.put_slice(OK_HEAD);
            put_bin(out, payload);
            true
        }
        _ => false,
    }
}

/// An unsigned integer in its shortest MessagePack form, as `rmp` writes it.
fn put_uint<B: BufMut>(out: &mut B, value: u64) {
    if value < 0x80 {
        out.put_u8(value as u8);
    } else if let Ok(value) = u8::try_from(value) {
        out.put_slice(&[0xcc, value]);
    } else if let Ok(value) = u16::try_from(value) {
        out.put_u8(0xcd);
        out.put_u16(value);
    } else if let Ok(value) = u32::try_from(value) {
        out.put_u8(0xce);
        out.put_u32(value);
    } else {
        out.put_u8(0xcf);
        out.put_u64(value);
    }
}

fn put_str<B: BufMut>(out: &mut B, text: &str) {
    let len = text.len();
    if len < 32 {
        out.put_u8(0xa0 | len as u8);
    } else if let Ok(len) = u8::try_from(len) {
        out.put_slice(&[0xd9, len]);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(0xda);
        out.put_u16(len);
    } else {
        out.put_u8(0xdb);
        out.put_u32(len as u32);
    }
    out.put_slice(text.as_bytes());
}

fn put_bin<B: BufMut>(out: &mut B, bytes: &[u8]) {
    let len = bytes.len();
    if let Ok(len) = u8::try_from(len) {
        out.put_slice(&[0xc4, len]);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(0xc5);
        out.put_u16(len);
    } else {
        out.put_u8(0xc6);
        out.put_u32(len as u32);
    }
    out.put_slice(bytes);
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

    /// The fast path gives exactly what serde gives, for the frames it
    /// takes and for near misses it must leave to serde.
    #[test]
    fn traffic_frames_decode_as_serde_decodes_them() {
        let frames = [
            Frame::Request(Request {
                id: u64::MAX,
                actor: "inMemoryDatastore",
                tag: "get",
                incarnation: 7,
                reply: true,
                payload: b"\x91\xa1k",
            }),
            Frame::Request(Request {
                id: 0,
                actor: "an.actor.whose.name.is.longer.than.thirty.one",
                tag: "",
                incarnation: 0,
                reply: false,
                payload: b"",
            }),
            Frame::Reply(Reply {
                id: 300,
                result: Ok(ReplyPayload(&[7; 70_000])),
            }),
        ];
        for frame in &frames {
            let bytes = frame.encode().unwrap();
            let mut general = Vec::new();
            frame.encode_general_into(&mut general).unwrap();
            assert_eq!(bytes, general, "the fast encoder writes what serde writes");
            assert_eq!(decode_traffic(&bytes, &Recalled::default()).as_ref(), Some(frame));
            assert_eq!(Frame::decode_general(&bytes).unwrap(), *frame);
            // Every truncation: the fast path never takes what serde refuses.
            for end in 0..bytes.len() {
                let cut = &bytes[..end];
                if let Some(fast) = decode_traffic(cut, &Recalled::default()) {
                    assert_eq!(Frame::decode_general(cut).ok(), Some(fast));
                }
            }
        }
        let error = Frame::Reply(Reply {
            id: 1,
            result: Err(WireError::UnknownActor { actor: "a".into() }),
        });
        assert_eq!(
            decode_traffic(&error.encode().unwrap(), &Recalled::default()),
            None,
            "left to serde"
        );
        // Invalid UTF-8 in a name is refused, as serde refuses it.
        let mut bad = frames[0].encode().unwrap();
        let at = bad.windows(3).position(|w| w == b"get").unwrap();
        bad[at] = 0xff;
        assert_eq!(decode_traffic(&bad, &Recalled::default()), None);
        assert!(Frame::decode(&bad).is_err());
        // The same frames in longer encodings that serde also reads (a
        // 16-bit map, an 8-bit string, a 16-bit array): not the head the
        // fast path compares, so serde decodes them, to the same frame.
        for (frame, short, long) in [
            (
                &frames[0],
                REQUEST_HEAD,
                &b"\xde\x00\x01\xd9\x07Request\xdc\x00\x06"[..],
            ),
            (&frames[2], REPLY_HEAD, &b"\xde\x00\x01\xd9\x05Reply\xdc\x00\x02"[..]),
        ] {
            let mut longer = long.to_vec();
            longer.extend_from_slice(&frame.encode().unwrap()[short.len()..]);
            assert_eq!(decode_traffic(&longer, &Recalled::default()), None, "left to serde");
            assert_eq!(Frame::decode(&longer).unwrap(), *frame);
        }
    }

    /// Names recalled from the last request give the same frame, taken
    /// from the recalled strings; other bytes are still checked.
    #[test]
    fn recalled_names_decode_to_the_same_frame() {
        let recalled = Recalled {
            actor: "inMemoryDatastore",
            tag: "get",
        };
        let request = Frame::Request(Request {
            id: 9,
            actor: "inMemoryDatastore",
            tag: "get",
            incarnation: 3,
            reply: true,
            payload: b"\x91\xa1k",
        });
        let bytes = request.encode().unwrap();
        let decoded = Frame::decode_recalling(&bytes, &recalled).unwrap();
        assert_eq!(decoded, request);
        let Frame::Request(decoded) = decoded else {
            unreachable!()
        };
        assert!(
            std::ptr::eq(decoded.actor, recalled.actor),
            "taken from the recalled name"
        );
        assert!(std::ptr::eq(decoded.tag, recalled.tag));
        // Another tag, and a name that differs in one byte (invalid UTF-8):
        // checked as without a recalled name.
        let other = Frame::Request(Request {
            tag: "put",
            ..match &request {
                Frame::Request(r) => r.clone(),
                _ => unreachable!(),
            }
        });
        assert_eq!(
            Frame::decode_recalling(&other.encode().unwrap(), &recalled).unwrap(),
            other
        );
        let mut bad = bytes.clone();
        let at = bad.windows(3).position(|w| w == b"get").unwrap();
        bad[at + 2] = 0xff;
        assert_eq!(decode_traffic(&bad, &recalled), None);
        assert!(Frame::decode_recalling(&bad, &recalled).is_err());
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
