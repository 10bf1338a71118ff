//! A child's plain output, prefixed with its path and pid, as `pm2 logs`
//! does: `myapp/webserverApi/2[4242] | the line`.
//!
//! The child points its own standard output and error at pipes and relays
//! each complete line, prefix included, with one write to where they
//! pointed before. One write per line keeps lines from several processes
//! whole (a pipe write of up to `PIPE_BUF` bytes is atomic), and it covers
//! everything: `println!`, the user's `tracing` output, evilcluster's own.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Mutex;
use std::thread::JoinHandle;

struct Relay {
    /// Where standard output and error pointed before the relay.
    originals: [OwnedFd; 2],
    threads: Vec<JoinHandle<()>>,
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
    let mut threads = Vec::new();
    for stream in [Stream::Out, Stream::Err] {
        let original = rustix::io::fcntl_dupfd_cloexec(stream.fd(), 0)?;
        let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        stream.point_at(&writer)?;
        drop(writer);
        let sink = std::fs::File::from(original.try_clone()?);
        let prefix = format!("{prefix} | ");
        threads.push(
            std::thread::Builder::new()
                .name("evilcluster-output".into())
                .spawn(move || forward(BufReader::new(std::fs::File::from(reader)), sink, &prefix))?,
        );
        originals.push(original);
    }
    let [out, err]: [OwnedFd; 2] = originals.try_into().expect("two streams");
    *relay = Some(Relay {
        originals: [out, err],
        threads,
    });
    Ok(())
}

fn forward(mut from: impl BufRead, mut to: std::fs::File, prefix: &str) {
    let mut line = Vec::with_capacity(256);
    let mut out = Vec::with_capacity(512);
    loop {
        line.clear();
        match from.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        out.clear();
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(&line);
        if !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        if to.write_all(&out).is_err() {
            return;
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
    for thread in relay.threads {
        let _ = thread.join();
    }
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
