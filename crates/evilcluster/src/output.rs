//! A child's plain output, prefixed with its path and pid, as `pm2 logs`
//! does: `myapp/webserverApi/2[4242] | the line`.
//!
//! The child points its own standard output and error at pipes and relays
//! each complete line, prefix included, with one write to where they
//! pointed before. One write per line keeps lines from several processes
//! whole (a pipe write of up to `PIPE_BUF` bytes is atomic), and it covers
//! everything: `println!`, the user's `tracing` output, evilcluster's own.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Mutex;
use std::thread::JoinHandle;

use rustix::event::{PollFd, PollFlags};

struct Relay {
    /// Where standard output and error pointed before the relay.
    originals: [OwnedFd; 2],
    /// One thread for both streams: each thread costs a process its stack,
    /// its signal stack and its malloc arena (about 20 KiB of memory, and
    /// time to start it), and a fork of a large tree has little to say.
    thread: JoinHandle<()>,
}

static RELAY: Mutex<Option<Relay>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Relay>> {
    RELAY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts relaying this process's standard output and error with `prefix`.
pub(crate) fn relay(prefix: &str) -> io::Result<()> {
    let mut relay = lock();
    if relay.is_some() {
        return Ok(());
    }
    let mut originals = Vec::new();
    let mut streams = Vec::new();
    for stream in [Stream::Out, Stream::Err] {
        let original = rustix::io::fcntl_dupfd_cloexec(stream.fd(), 0)?;
        let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        stream.point_at(&writer)?;
        drop(writer);
        streams.push(Forwarded {
            from: Some(reader),
            to: std::fs::File::from(original.try_clone()?),
            partial: Vec::with_capacity(256),
        });
        originals.push(original);
    }
    let prefix = format!("{prefix} | ");
    let Ok(streams) = <[Forwarded; 2]>::try_from(streams) else {
        unreachable!("two streams")
    };
    let thread = std::thread::Builder::new()
        .name("evilcluster-output".into())
        .spawn(move || forward(streams, &prefix))?;
    let [out, err]: [OwnedFd; 2] = originals.try_into().expect("two streams");
    *relay = Some(Relay {
        originals: [out, err],
        thread,
    });
    Ok(())
}

/// A line longer than this is passed on in pieces of this size, each
/// prefixed: a process that writes without ever ending a line does not
/// make its relay hold all of it.
const LONGEST_LINE: usize = 16 * 1024;

/// One relayed stream: the pipe it is read from (until its end), where
/// its lines go, and the start of a line not yet ended.
struct Forwarded {
    from: Option<OwnedFd>,
    to: std::fs::File,
    partial: Vec<u8>,
}

impl Forwarded {
    /// Reads what the pipe holds and passes complete lines on; stops
    /// reading at the pipe's end, or once the destination takes no more.
    fn take_in(&mut self, chunk: &mut [u8], prefix: &str, out: &mut Vec<u8>) {
        let Some(from) = &self.from else { return };
        let ended = match rustix::io::read(from, &mut *chunk) {
            Ok(0) => true,
            Ok(n) => {
                self.partial.extend_from_slice(&chunk[..n]);
                false
            }
            Err(rustix::io::Errno::INTR) => false,
            Err(_) => true,
        };
        if !self.pass_on(prefix, out, ended) || ended {
            self.from = None;
        }
    }

    /// Passes every complete line in `partial` on, each prefixed, with one
    /// write (a line longer than [`LONGEST_LINE`] in pieces); at the end of
    /// the stream, the rest too (ended by a newline).
    /// `false` once the destination refuses to take more.
    fn pass_on(&mut self, prefix: &str, out: &mut Vec<u8>, at_end: bool) -> bool {
        let mut start = 0;
        while start < self.partial.len() {
            let rest = &self.partial[start..];
            let end = match rest.iter().take(LONGEST_LINE).position(|&b| b == b'\n') {
                Some(at) => start + at + 1,
                None if rest.len() >= LONGEST_LINE => start + LONGEST_LINE,
                None if at_end => self.partial.len(),
                None => break,
            };
            out.clear();
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(&self.partial[start..end]);
            if !out.ends_with(b"\n") {
                out.push(b'\n');
            }
            if self.to.write_all(out).is_err() {
                return false;
            }
            start = end;
        }
        self.partial.drain(..start);
        true
    }
}

/// Relays both streams until each has ended: waits until either has
/// something, reads what is there, passes complete lines on.
fn forward(mut streams: [Forwarded; 2], prefix: &str) {
    let mut chunk = [0u8; 8192];
    let mut out = Vec::with_capacity(512);
    loop {
        let ready: Vec<usize> = {
            let (open, mut fds): (Vec<usize>, Vec<PollFd<'_>>) = streams
                .iter()
                .enumerate()
                .filter_map(|(i, stream)| Some((i, PollFd::new(stream.from.as_ref()?, PollFlags::IN))))
                .unzip();
            if open.is_empty() {
                return;
            }
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => open
                    .into_iter()
                    .zip(&fds)
                    .filter(|(_, fd)| !fd.revents().is_empty())
                    .map(|(i, _)| i)
                    .collect(),
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return,
            }
        };
        for i in ready {
            streams[i].take_in(&mut chunk, prefix, &mut out);
        }
    }
}

/// Stops relaying: flushes what was written, points the streams back where
/// they were, and waits until every line has been passed on.
pub(crate) fn finish() {
    let Some(relay) = lock().take() else { return };
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    for (stream, original) in [Stream::Out, Stream::Err].into_iter().zip(&relay.originals) {
        // Replacing the pipe's last write end lets its reader see the end.
        let _ = stream.point_at(original);
    }
    let _ = relay.thread.join();
}

/// Where a process this one starts should write: the streams from before
/// the relay, so that its lines are not prefixed twice.
pub(crate) fn for_child() -> (Stdio, Stdio) {
    let relay = lock();
    let original = |index: usize| {
        relay
            .as_ref()
            .and_then(|relay| relay.originals[index].try_clone().ok())
            .map_or_else(Stdio::inherit, Stdio::from)
    };
    (original(0), original(1))
}

#[derive(Clone, Copy)]
enum Stream {
    Out,
    Err,
}

impl Stream {
    fn fd(self) -> std::os::fd::BorrowedFd<'static> {
        match self {
            Stream::Out => rustix::stdio::stdout(),
            Stream::Err => rustix::stdio::stderr(),
        }
    }

    fn point_at(self, fd: impl std::os::fd::AsFd) -> io::Result<()> {
        match self {
            Stream::Out => rustix::stdio::dup2_stdout(fd)?,
            Stream::Err => rustix::stdio::dup2_stderr(fd)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A stream relayed into a pipe, and what came out of the pipe.
    fn relayed(chunks: &[&[u8]], at_end: bool) -> (Vec<u8>, Vec<u8>) {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        let mut stream = Forwarded {
            from: None,
            to: std::fs::File::from(writer),
            partial: Vec::new(),
        };
        let mut out = Vec::new();
        for chunk in chunks {
            stream.partial.extend_from_slice(chunk);
            assert!(stream.pass_on("p | ", &mut out, false));
        }
        if at_end {
            assert!(stream.pass_on("p | ", &mut out, true));
        }
        let left = std::mem::take(&mut stream.partial);
        drop(stream);
        let mut passed = Vec::new();
        std::fs::File::from(reader).read_to_end(&mut passed).unwrap();
        (passed, left)
    }

    #[test]
    fn complete_lines_go_on_prefixed_and_a_started_one_waits() {
        let (passed, left) = relayed(&[b"one\ntw", b"o\nthr"], false);
        assert_eq!(passed, b"p | one\np | two\n");
        assert_eq!(left, b"thr");
        // At the end of the stream the rest goes too, ended.
        let (passed, left) = relayed(&[b"one\nthr"], true);
        assert_eq!(passed, b"p | one\np | thr\n");
        assert!(left.is_empty());
    }

    #[test]
    fn a_line_that_never_ends_goes_on_in_pieces() {
        let long = vec![b'x'; 2 * LONGEST_LINE + 10];
        let (passed, left) = relayed(&[&long], false);
        let piece = [&b"p | "[..], &vec![b'x'; LONGEST_LINE], b"\n"].concat();
        assert_eq!(passed, [piece.clone(), piece].concat());
        assert_eq!(left.len(), 10, "the rest waits for its end");
    }
}
