//! The reading side's framing: the wire's length-delimited codec, with a
//! buffer of its own for each large frame.
//!
//! Left to itself, the codec reads a frame larger than its buffer by
//! growing that buffer, and the frame handed out shares the allocation
//! with what stays behind to read the next one. A large frame's bytes are
//! usually still held (by the actor handling it, or the caller it answers)
//! when the next read starts, so every large frame then took a fresh
//! allocation — for a megabyte, a fresh `mmap` whose every page faulted in
//! while the kernel copied into it, then an `munmap` — which cost more than
//! the copy itself. Here a large frame is read into a buffer of exactly its
//! length (no read spills past it), the small buffer goes on with the frames
//! after it, and once the frame's last holder lets go its buffer takes the
//! next large frame: its pages are already there.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

/// The codec's length prefix: 4 bytes, big-endian.
const HEAD: usize = 4;

/// Frames at least this long that do not fit in the read buffer get a
/// buffer of their own; shorter ones grow the read buffer as the codec
/// would (by at most this much).
pub(crate) const OWN_BUFFER_FROM: usize = 64 * 1024;

/// Unread bytes moved back to the read buffer's start at most (see
/// [`FrameDecoder::rewinding_below`]): a copy this short costs less than
/// a page touched.
const REWIND_MOST: usize = 1024;

/// A [`Decoder`] of the wire's frames (see [`evilcluster_wire::codec`])
/// that reads each large frame into a buffer of its own, reused by the
/// next large frame once the previous one has been dropped.
///
/// Memory stays bounded: a frame longer than the codec's maximum is refused
/// from its length alone, before anything is allocated for it; at most one
/// large buffer is kept besides those still held by their frames, and
/// [`release`](Self::release) gives it back.
pub(crate) struct FrameDecoder {
    inner: LengthDelimitedCodec,
    /// See [`rewinding_below`](Self::rewinding_below); 0: never.
    rewind_below: usize,
    /// The codec has taken the current frame's length and waits for its
    /// bytes (so the read buffer no longer starts with a length).
    in_frame: bool,
    /// The small read buffer, set aside while a large frame is read into a
    /// buffer of its own.
    small: Option<BytesMut>,
    /// An empty handle on the last large frame's buffer, from its start:
    /// once nothing else holds the buffer, it takes the next large frame.
    spare: Option<BytesMut>,
}

impl FrameDecoder {
    /// Wraps `inner` (the wire's codec, with its maximum frame length).
    pub(crate) fn new(inner: LengthDelimitedCodec) -> Self {
        FrameDecoder {
            inner,
            rewind_below: 0,
            in_frame: false,
            small: None,
            spare: None,
        }
    }

    /// Frames are taken off the read buffer's front and reads go on after
    /// the bytes left, so the reads move through the whole buffer and,
    /// in time, touch all its pages, which then stay with the process for
    /// every connection. With this, once the room after the unread bytes
    /// falls below `room` and they are few, they move back to the
    /// buffer's start, if nothing else holds the buffer any more (a frame
    /// still held keeps it where it is; nothing is allocated either way):
    /// the reads keep to the pages they touched first.
    pub(crate) fn rewinding_below(mut self, room: usize) -> Self {
        self.rewind_below = room;
        self
    }

    /// Moves a few unread bytes back to the start of `src`; see
    /// [`rewinding_below`](Self::rewinding_below).
    fn rewind(&self, src: &mut BytesMut) {
        if src.len() <= REWIND_MOST && src.capacity() - src.len() < self.rewind_below && self.small.is_none() {
            // Not reclaimed: a frame still holds the buffer; the reads go
            // on where they are, as they would without this.
            let _ = src.try_reclaim(self.rewind_below);
        }
    }

    /// Whether a large frame's buffer is kept for the next one.
    #[cfg(test)]
    pub(crate) fn holds_spare(&self) -> bool {
        self.spare.is_some()
    }

    /// Gives the kept large buffer back (its memory is freed once the
    /// frame that used it is dropped too).
    pub(crate) fn release(&mut self) {
        self.spare = None;
    }

    /// Whether `buffer` (the read buffer) holds the next frame whole, so
    /// that decoding it reads nothing more. Not while a frame is half read:
    /// the buffer then starts in the middle of that frame, not with a
    /// length.
    pub(crate) fn whole_frame_in(&self, buffer: &[u8]) -> bool {
        !self.in_frame
            && buffer
                .first_chunk::<HEAD>()
                .is_some_and(|head| buffer.len() - HEAD >= u32::from_be_bytes(*head) as usize)
    }

    /// A buffer with room for exactly `len` bytes: the spare one when
    /// nothing else holds it any more and it is large enough, else a fresh
    /// one. Either way the spare becomes a handle on the buffer returned.
    fn own_buffer(&mut self, len: usize) -> BytesMut {
        let mut own = match self.spare.take() {
            Some(spare) => reclaim(spare, len),
            None => BytesMut::with_capacity(len),
        };
        let rest = own.split_off(len);
        drop(rest);
        self.spare = Some(own.split_to(0));
        own
    }

    /// Before the codec sees a new frame's length: moves a large frame that
    /// will not fit in `src` to a buffer of its own.
    fn prepare(&mut self, src: &mut BytesMut) {
        let Some(head) = src.first_chunk::<HEAD>() else {
            return;
        };
        let body = u32::from_be_bytes(*head) as usize;
        // An oversized frame is the codec's to refuse, before any allocation.
        if body > self.inner.max_frame_length() || body < OWN_BUFFER_FROM || HEAD + body <= src.capacity() {
            return;
        }
        // `src` holds only the start of this frame (the whole of it would
        // have fit), so that is all there is to move.
        let mut own = self.own_buffer(HEAD + body);
        own.extend_from_slice(src);
        let mut small = std::mem::replace(src, own);
        small.clear();
        self.small = Some(small);
    }

    /// After a large frame was split off its own buffer: the small buffer
    /// reads on (with anything read past the frame, though a buffer of the
    /// frame's exact length leaves nothing).
    fn finish_own(&mut self, src: &mut BytesMut) {
        if let Some(mut small) = self.small.take() {
            small.extend_from_slice(src);
            // Dropping the rest of the large buffer leaves the frame as its
            // only holder besides the spare handle: the buffer comes back
            // once the frame goes.
            drop(std::mem::replace(src, small));
        }
    }
}

/// `spare` with room for exactly `len` bytes if nothing else holds its
/// buffer and that is large enough (no allocation, no copy: it is empty);
/// else a fresh buffer.
fn reclaim(mut spare: BytesMut, len: usize) -> BytesMut {
    if spare.try_reclaim(len) {
        spare
    } else {
        BytesMut::with_capacity(len)
    }
}

impl Decoder for FrameDecoder {
    type Item = Bytes;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Bytes>> {
        self.rewind(src);
        let had_head = self.in_frame || src.len() >= HEAD;
        if !self.in_frame {
            self.prepare(src);
        }
        match self.inner.decode(src)? {
            Some(frame) => {
                self.in_frame = false;
                self.finish_own(src);
                Ok(Some(frame.freeze()))
            }
            None => {
                self.in_frame = had_head;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evilcluster_wire::{codec, frame_header};

    const MAX: usize = 1 << 20;

    fn decoder() -> FrameDecoder {
        FrameDecoder::new(codec(MAX))
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut bytes = frame_header(len as u32).to_vec();
        bytes.resize(HEAD + len, fill);
        bytes
    }

    /// Feeds `wire` to `decoder` through a read buffer of `READ` bytes the
    /// way `FramedRead` does: reads at most the buffer's spare room (and at
    /// most `step` bytes), decoding after each read.
    fn read_all(decoder: &mut FrameDecoder, wire: &[u8], step: usize) -> Vec<Bytes> {
        const READ: usize = 64 * 1024;
        let mut src = BytesMut::with_capacity(READ);
        let mut frames = Vec::new();
        let mut at = 0;
        loop {
            while let Some(frame) = decoder.decode(&mut src).expect("valid frames") {
                frames.push(frame);
            }
            if at == wire.len() {
                assert!(src.is_empty(), "bytes left over");
                return frames;
            }
            if src.len() == src.capacity() {
                src.reserve(1);
            }
            let n = step.min(src.capacity() - src.len()).min(wire.len() - at);
            src.extend_from_slice(&wire[at..at + n]);
            at += n;
        }
    }

    /// Small frames read one after another, each dropped before the next
    /// read (a connection's requests, answered in turn): the reads keep to
    /// the first pages of the buffer. A frame still held keeps the buffer
    /// where it is; every frame comes out whole either way.
    #[test]
    fn reads_move_back_to_the_buffer_s_start_once_its_frames_are_gone() {
        const BUFFER: usize = 16 * 1024;
        const AFTER: usize = 4 * 1024;
        let mut decoder = decoder().rewinding_below(BUFFER - AFTER);
        let mut src = BytesMut::with_capacity(BUFFER);
        let start = src.as_ptr() as usize;
        let mut farthest = 0;
        for i in 0..1_000u32 {
            let wire = frame(56, i as u8);
            // Half a frame, then the rest, as reads may bring them.
            src.extend_from_slice(&wire[..30]);
            assert!(decoder.decode(&mut src).unwrap().is_none());
            src.extend_from_slice(&wire[30..]);
            let got = decoder.decode(&mut src).unwrap().expect("a whole frame");
            assert_eq!(got[..], wire[HEAD..], "frame {i}");
            farthest = farthest.max(got.as_ptr() as usize + got.len() - start);
            drop(got);
        }
        assert!(
            farthest <= AFTER + 2 * 60,
            "reads went {farthest} bytes into the buffer"
        );

        // Held frames: nothing moves under them, and the reads go on past
        // the point where they would have moved back.
        let held: Vec<Bytes> = (0..100u32)
            .map(|i| {
                let wire = frame(56, i as u8);
                src.extend_from_slice(&wire);
                let got = decoder.decode(&mut src).unwrap().expect("a whole frame");
                assert_eq!(got[..], wire[HEAD..], "held frame {i}");
                got
            })
            .collect();
        for (i, got) in held.iter().enumerate() {
            assert!(got.iter().all(|&b| b == i as u8), "held frame {i} overwritten");
        }
        let last = held.last().unwrap();
        assert!(
            last.as_ptr() as usize - start > AFTER,
            "reads went on while frames were held"
        );
    }

    #[test]
    fn a_whole_frame_is_seen_only_where_a_frame_starts() {
        let mut decoder = decoder();
        let mut src = BytesMut::from(&frame(3, 9)[..]);
        assert!(decoder.whole_frame_in(&src));
        src.truncate(HEAD + 2);
        assert!(!decoder.whole_frame_in(&src), "two bytes of three");
        // Half of a 100-byte frame whose body starts like a short length:
        // the codec has taken the length, so the buffer does not start one.
        let mut body = frame(100, 0);
        body[HEAD..HEAD + HEAD].copy_from_slice(&frame_header(2));
        let mut src = BytesMut::from(&body[..HEAD + 50]);
        assert!(decoder.decode(&mut src).expect("valid").is_none());
        assert!(!decoder.whole_frame_in(&src), "{src:?} is the middle of a frame");
        src.extend_from_slice(&body[HEAD + 50..]);
        assert_eq!(decoder.decode(&mut src).expect("valid").map(|f| f.len()), Some(100));
        assert!(!decoder.whole_frame_in(&src), "nothing left");
    }

    #[test]
    fn frames_split_across_reads_come_out_whole_and_in_order() {
        let sizes = [10, OWN_BUFFER_FROM - 1, 200_000, 3, OWN_BUFFER_FROM, 700_000, 1];
        let mut wire = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            wire.extend(frame(len, i as u8));
        }
        for step in [1, 7, 4096, 65_536, 219_264, wire.len()] {
            let mut decoder = decoder();
            let frames = read_all(&mut decoder, &wire, step);
            assert_eq!(frames.len(), sizes.len(), "step {step}");
            for (i, (frame, &len)) in frames.iter().zip(&sizes).enumerate() {
                assert_eq!(frame.len(), len, "frame {i}, step {step}");
                assert!(frame.iter().all(|&b| b == i as u8), "frame {i}'s bytes, step {step}");
            }
        }
    }

    #[test]
    fn a_large_frame_gets_a_buffer_of_exactly_its_length() {
        let mut decoder = decoder();
        let wire = frame(300_000, 9);
        let mut src = BytesMut::with_capacity(64 * 1024);
        src.extend_from_slice(&wire[..64 * 1024]);
        assert!(decoder.decode(&mut src).unwrap().is_none());
        // The codec took the length; the rest of the frame fits exactly, so
        // no read can take bytes of the frame after it.
        assert_eq!(src.capacity() - src.len(), wire.len() - 64 * 1024);
        src.extend_from_slice(&wire[64 * 1024..]);
        let frame = decoder.decode(&mut src).unwrap().expect("a whole frame");
        assert_eq!(frame.len(), 300_000);
        // The small buffer reads on.
        assert!(
            src.capacity() >= 64 * 1024 && src.capacity() < 300_000,
            "{}",
            src.capacity()
        );
        assert!(decoder.holds_spare());
    }

    #[test]
    fn a_dropped_large_frame_s_buffer_takes_the_next_one() {
        let mut decoder = decoder();
        let first = read_all(&mut decoder, &frame(500_000, 1), 219_264).pop().unwrap();
        let first_at = first.as_ptr();
        drop(first);
        let second = read_all(&mut decoder, &frame(400_000, 2), 219_264).pop().unwrap();
        assert_eq!(second.len(), 400_000);
        assert!(second.iter().all(|&b| b == 2));
        // Same allocation: the frame starts right after its length, as before.
        assert_eq!(second.as_ptr(), first_at);
    }

    #[test]
    fn a_held_large_frame_is_never_overwritten() {
        let mut decoder = decoder();
        let first = read_all(&mut decoder, &frame(500_000, 1), 219_264).pop().unwrap();
        let second = read_all(&mut decoder, &frame(500_000, 2), 219_264).pop().unwrap();
        assert_ne!(first.as_ptr(), second.as_ptr());
        assert!(first.iter().all(|&b| b == 1), "the held frame is intact");
        assert!(second.iter().all(|&b| b == 2));
    }

    #[test]
    fn a_spare_too_small_is_replaced() {
        let mut decoder = decoder();
        drop(read_all(&mut decoder, &frame(100_000, 1), 65_536));
        let larger = read_all(&mut decoder, &frame(800_000, 2), 65_536).pop().unwrap();
        assert_eq!(larger.len(), 800_000);
        assert!(larger.iter().all(|&b| b == 2));
    }

    #[test]
    fn a_frame_exactly_at_the_limit_is_read() {
        let mut decoder = decoder();
        let frames = read_all(&mut decoder, &frame(MAX, 7), 219_264);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), MAX);
    }

    #[test]
    fn an_oversized_frame_is_refused_without_allocating_it() {
        let mut decoder = decoder();
        let mut src = BytesMut::with_capacity(64 * 1024);
        src.extend_from_slice(&frame_header((MAX + 1) as u32));
        src.extend_from_slice(&[0; 100]);
        let error = decoder.decode(&mut src).expect_err("over the limit");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(src.capacity() < MAX, "nothing was reserved for it: {}", src.capacity());
        assert!(!decoder.holds_spare());
    }

    #[test]
    fn released_buffers_are_not_reused() {
        let mut decoder = decoder();
        let first = read_all(&mut decoder, &frame(500_000, 1), 219_264).pop().unwrap();
        decoder.release();
        assert!(!decoder.holds_spare());
        // The frame alone holds its buffer now: dropping it frees it.
        assert!(first.is_unique());
    }
}
