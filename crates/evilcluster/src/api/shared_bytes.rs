//! [`SharedBytes`]: bytes a message carries that are not copied when it
//! arrives.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde::{Serialize, Serializer};

use crate::node::connection::frame_slice;

/// Bytes in a message (or a reply) that are not copied when it arrives:
/// they decode as a slice of the received frame, which stays in memory as
/// long as they do (in a frame under 4 KiB they are copied: that is
/// cheaper). Use it for large payloads; `serde_bytes::ByteBuf` copies them
/// into an allocation of its own.
///
/// On the wire it is a MessagePack byte string, exactly like a `ByteBuf`
/// or `#[serde(with = "serde_bytes")] Vec<u8>`: the two are interchangeable
/// between builds. Decoded anywhere but from a frame the runtime received
/// (`rmp_serde::from_slice` of your own), the bytes are copied.
///
/// ```
/// use evilcluster::SharedBytes;
/// let blob = SharedBytes::from(vec![1, 2, 3]);
/// let encoded = rmp_serde::to_vec(&blob).unwrap();
/// let bytes: serde_bytes::ByteBuf = rmp_serde::from_slice(&encoded).unwrap();
/// assert_eq!(&bytes[..], &blob[..]);
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedBytes(pub Bytes);

impl SharedBytes {
    /// The bytes, as a [`Bytes`] (cheap to clone and to slice).
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.0.len())
    }
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Bytes> for SharedBytes {
    fn from(bytes: Bytes) -> Self {
        SharedBytes(bytes)
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(bytes: Vec<u8>) -> Self {
        SharedBytes(Bytes::from(bytes))
    }
}

impl From<SharedBytes> for Bytes {
    fn from(bytes: SharedBytes) -> Self {
        bytes.0
    }
}

impl Serialize for SharedBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SharedBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(SharedBytesVisitor)
    }
}

struct SharedBytesVisitor;

impl<'de> Visitor<'de> for SharedBytesVisitor {
    type Value = SharedBytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, bytes: &'de [u8]) -> Result<SharedBytes, E> {
        // In a frame the runtime received: a slice of it, no copy.
        Ok(SharedBytes(
            frame_slice(bytes).unwrap_or_else(|| Bytes::copy_from_slice(bytes)),
        ))
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<SharedBytes, E> {
        Ok(SharedBytes(Bytes::copy_from_slice(bytes)))
    }

    fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<SharedBytes, E> {
        Ok(SharedBytes(Bytes::from(bytes)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SharedBytes, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(byte) = seq.next_element()? {
            bytes.push(byte);
        }
        Ok(SharedBytes(Bytes::from(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::connection::decoding;

    #[test]
    fn decodes_as_a_slice_of_the_frame_it_came_in() {
        let blob = SharedBytes::from(vec![7u8; 100_000]);
        let frame = Bytes::from(rmp_serde::to_vec(&(1u8, &blob)).unwrap());
        let (_, decoded): (u8, SharedBytes) = decoding(&frame, || rmp_serde::from_slice(&frame)).unwrap();
        assert_eq!(decoded, blob);
        let inside = frame.as_ptr_range();
        assert!(inside.contains(&decoded.as_ptr()), "not copied: a slice of the frame");
        // Outside a received frame: copied, and equal.
        let (_, copied): (u8, SharedBytes) = rmp_serde::from_slice(&frame).unwrap();
        assert_eq!(copied, blob);
        assert!(!inside.contains(&copied.as_ptr()));
        // The same bytes on the wire as a ByteBuf.
        let bytebuf = serde_bytes::ByteBuf::from(vec![7u8; 100_000]);
        assert_eq!(rmp_serde::to_vec(&bytebuf).unwrap(), rmp_serde::to_vec(&blob).unwrap());
    }
}
