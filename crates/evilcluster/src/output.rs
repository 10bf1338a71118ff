//! A child's plain output, prefixed with its path and pid, as `pm2 logs`
//! does: `myapp/webserverApi/2[4242] | the line`.
//!
//! The child points its own standard output and error at pipes and relays
//! each complete line, prefix included, with one write to where they
//! pointed before. One write per line keeps lines from several processes
//! whole (a pipe write of up to `PIPE_BUF` bytes is atomic), and it covers
//! everything: `println!`, the user's `tracing` output, evilcluster's own.

use std::io::{self, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::process::Stdio;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec};

struct Relay {
    /// Where standard output and error pointed before the relay.
    originals: [OwnedFd; 2],
    /// One thread for both streams and the inlet: each thread costs a process its stack,
    /// its signal stack and its malloc arena (about 20 KiB of memory, and
    /// time to start it), and a fork of a large tree has little to say.
    thread: JoinHandle<()>,
}

static RELAY: Mutex<Option<Relay>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Relay>> {
    RELAY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pipe the relay's thread reads too, beside the output streams: a
/// child's control pipe, so that the child keeps one thread for both
/// (a thread costs a process about 20 KiB).
pub(crate) trait Inlet: Send + 'static {
    /// The pipe.
    fn fd(&self) -> BorrowedFd<'_>;
    /// What was read from the pipe; empty at its end (then never again).
    fn heard(&mut self, bytes: &[u8]);
    /// When this process must end, if it must.
    fn deadline(&self) -> Option<Instant>;
    /// The deadline passed: the line to leave. The relay passes on what was
    /// written until then, then this line, and exits with status 1.
    fn overdue(&mut self) -> &'static str;
}

/// Starts relaying this process's standard output and error with `prefix`,
/// reading `inlet` on the same thread; gives `inlet` back if it cannot.
pub(crate) fn relay<I: Inlet>(prefix: &str, inlet: I) -> Result<(), (io::Error, I)> {
    let mut relay = lock();
    if relay.is_some() {
        return Err((io::Error::other("the output is relayed already"), inlet));
    }
    let (streams, originals) = match open_streams() {
        Ok(opened) => opened,
        Err(error) => return Err((error, inlet)),
    };
    let prefix = format!("{prefix} | ");
    // The inlet goes to the thread once it runs: if it cannot start, the
    // caller gets the inlet back to read it some other way.
    let (handover, handed) = std::sync::mpsc::sync_channel::<I>(1);
    let spawned = std::thread::Builder::new()
        .name("evilcluster-output".into())
        .spawn(move || {
            forward(streams, &prefix, handed.recv().ok());
        });
    match spawned {
        Ok(thread) => {
            handover.send(inlet).expect("the relay thread waits for it");
            *relay = Some(Relay { originals, thread });
            Ok(())
        }
        Err(error) => {
            point_back(&originals);
            Err((error, inlet))
        }
    }
}

/// Points standard output and error at fresh pipes: the streams to relay,
/// and where they pointed before.
fn open_streams() -> io::Result<([Forwarded; 2], [OwnedFd; 2])> {
    let (out, out_original) = Stream::Out.redirect()?;
    let (err, err_original) = match Stream::Err.redirect() {
        Ok(redirected) => redirected,
        Err(error) => {
            let _ = Stream::Out.point_at(&out_original);
            return Err(error);
        }
    };
    Ok(([out, err], [out_original, err_original]))
}

/// Points standard output and error back where they were.
fn point_back(originals: &[OwnedFd; 2]) {
    for (stream, original) in [Stream::Out, Stream::Err].into_iter().zip(originals) {
        // Replacing the pipe's last write end lets its reader see the end.
        let _ = stream.point_at(original);
    }
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

    /// Passes on everything the pipe holds now, the start of a line too:
    /// the process is about to end.
    fn drain(&mut self, chunk: &mut [u8], prefix: &str, out: &mut Vec<u8>) {
        let now = Timespec { tv_sec: 0, tv_nsec: 0 };
        // Bounded: other threads may still be writing.
        for _ in 0..64 {
            let Some(from) = &self.from else { break };
            let mut fds = [PollFd::new(from, PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&now)) {
                Ok(n) if n > 0 => self.take_in(chunk, prefix, out),
                _ => break,
            }
        }
        self.pass_on(prefix, out, true);
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
/// something, reads what is there, passes complete lines on. Reads `inlet`
/// too, until its end, and ends the process at its deadline.
fn forward<I: Inlet>(mut streams: [Forwarded; 2], prefix: &str, mut inlet: Option<I>) {
    let mut chunk = [0u8; 8192];
    let mut out = Vec::with_capacity(512);
    let mut inlet_open = inlet.is_some();
    loop {
        let deadline = inlet.as_ref().and_then(Inlet::deadline);
        // A wait too long to say is as good as none.
        let timeout = deadline.and_then(|at| Timespec::try_from(at.saturating_duration_since(Instant::now())).ok());
        let (ready, inlet_ready) = {
            let (open, mut fds): (Vec<usize>, Vec<PollFd<'_>>) = streams
                .iter()
                .enumerate()
                .filter_map(|(i, stream)| Some((i, PollFd::new(stream.from.as_ref()?, PollFlags::IN))))
                .unzip();
            if open.is_empty() {
                return;
            }
            let watched = inlet.as_ref().filter(|_| inlet_open);
            if let Some(inlet) = watched {
                fds.push(PollFd::from_borrowed_fd(inlet.fd(), PollFlags::IN));
            }
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) => {
                    let inlet_ready = watched.is_some() && fds.last().is_some_and(|fd| !fd.revents().is_empty());
                    let ready: Vec<usize> = open
                        .into_iter()
                        .zip(&fds)
                        .filter(|(_, fd)| !fd.revents().is_empty())
                        .map(|(i, _)| i)
                        .collect();
                    (ready, inlet_ready)
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return,
            }
        };
        for i in ready {
            streams[i].take_in(&mut chunk, prefix, &mut out);
        }
        if let Some(inlet) = inlet.as_mut() {
            if inlet_ready {
                inlet_open = hear(inlet, &mut chunk);
            }
            if deadline.is_some_and(|at| Instant::now() >= at) {
                let last_words = inlet.overdue();
                for stream in &mut streams {
                    stream.drain(&mut chunk, prefix, &mut out);
                }
                out.clear();
                out.extend_from_slice(format!("{prefix}{last_words}\n").as_bytes());
                let _ = streams[1].to.write_all(&out);
                std::process::exit(1);
            }
        }
    }
}

/// Reads what `inlet`'s pipe holds into the inlet; `false` at its end.
fn hear(inlet: &mut impl Inlet, chunk: &mut [u8]) -> bool {
    match rustix::io::read(inlet.fd(), &mut *chunk) {
        Ok(0) => {
            inlet.heard(&[]);
            false
        }
        Ok(n) => {
            inlet.heard(&chunk[..n]);
            true
        }
        Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => true,
        Err(_) => {
            inlet.heard(&[]);
            false
        }
    }
}

/// Stops relaying: flushes what was written, points the streams back where
/// they were, and waits until every line has been passed on.
pub(crate) fn finish() {
    let Some(relay) = lock().take() else { return };
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    point_back(&relay.originals);
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

    /// Points the stream at a fresh pipe: the pipe's end to relay from, and
    /// where the stream pointed before.
    fn redirect(self) -> io::Result<(Forwarded, OwnedFd)> {
        let original = rustix::io::fcntl_dupfd_cloexec(self.fd(), 0)?;
        let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let relayed = Forwarded {
            from: Some(reader),
            to: std::fs::File::from(original.try_clone()?),
            partial: Vec::with_capacity(256),
        };
        self.point_at(&writer)?;
        Ok((relayed, original))
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
