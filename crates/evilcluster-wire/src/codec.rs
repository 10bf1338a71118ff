use tokio_util::codec::LengthDelimitedCodec;

/// The largest frame a peer accepts unless configured otherwise: 16 MiB.
pub const DEFAULT_MAX_FRAME_LENGTH: usize = 16 * 1024 * 1024;

/// The framing codec: a 4-byte big-endian length, then the body.
///
/// A frame longer than `max_frame_length` is refused while its header is
/// read, before anything is allocated for its body.
pub fn codec(max_frame_length: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(max_frame_length)
        .new_codec()
}

/// The header [`codec`] writes before a body of `len` bytes: its length,
/// 4 bytes big-endian. For a writer that sends a frame's parts without
/// copying them together first; the reading side is always [`codec`].
pub fn frame_header(len: u32) -> [u8; 4] {
    len.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use tokio_util::codec::Encoder;

    use super::*;

    #[test]
    fn the_header_is_the_codecs() {
        let mut out = BytesMut::new();
        codec(1 << 20).encode(Bytes::from_static(b"hello"), &mut out).unwrap();
        assert_eq!(out[..4], frame_header(5));
        assert_eq!(&out[4..], b"hello");
    }
}
