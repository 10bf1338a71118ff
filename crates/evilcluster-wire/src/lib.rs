//! The evilcluster wire protocol, kept apart from the runtime so it can be
//! fuzzed, tested and reused on its own.
//!
//! A connection between two evilcluster processes carries length-prefixed
//! frames ([`codec`]) whose bodies are MessagePack. The first frames on a
//! connection are the [`handshake`]: protocol version, cluster id, the
//! caller's path and incarnation, and a mutual HMAC challenge/response over
//! the cluster cookie (the cookie itself never crosses the wire). After it,
//! every frame is a [`Frame`]: a request to a named actor, or the reply to
//! one.
//!
//! ```
//! use evilcluster_wire::{Frame, Request};
//!
//! let request = Frame::Request(Request {
//!     id: 7,
//!     actor: "inMemoryDatastore",
//!     tag: "datastore.get",
//!     incarnation: 1,
//!     reply: true,
//!     payload: b"\x91\xa3key",
//! });
//! let bytes = request.encode().unwrap();
//! assert_eq!(Frame::decode(&bytes).unwrap(), request);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod codec;
pub mod control;
mod error;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
mod tree;

pub use codec::{codec, frame_header, DEFAULT_MAX_FRAME_LENGTH};
pub use error::{DecodeError, HandshakeError, WireError};
pub use frame::{Credit, Frame, Recalled, Reply, ReplyPayload, Request, PROTOCOL_VERSION};
pub use handshake::{Cookie, Identity};
