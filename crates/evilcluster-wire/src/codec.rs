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
