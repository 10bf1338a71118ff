//! Starting children, and a child's ties to its parent.
//!
//! A child is this same executable started again, with the user's own
//! arguments and `EVILCLUSTER_*` variables saying what it is. Its standard
//! input is a pipe from the parent (the control pipe): the first line carries
//! the cluster cookie, so the secret never sits in the environment; a
//! [`GO`] line later lets the child start its actor or task (its turn in the
//! start order, see [`Gate`]); end of file means the parent is gone or wants
//! it to stop.

use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use evilcluster_wire::Cookie;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::api::role::{env, ChildEnv};
use crate::{Error, Role};

/// What a parent tells a new child.
pub(crate) struct Launch<'a> {
    pub role: &'a Role,
    pub path: &'a str,
    pub incarnation: u64,
    /// How many times this path was restarted before this start.
    pub restarts: u32,
    pub master_socket: &'a str,
    pub socket_dir: &'a std::path::Path,
    pub cookie: &'a Cookie,
    /// Where the child fetches its worker's shared listener.
    pub listener: Option<&'a std::path::Path>,
}

/// A running child and the write end of its control pipe.
pub(crate) struct ChildProcess {
    pub path: String,
    pub pid: u32,
    pub incarnation: u64,
    child: Child,
    control: Option<ChildStdin>,
    /// A fork served the worker's listener (see [`crate::listener`]).
    forked: bool,
}

/// glibc's allocator raises its mmap threshold each time a large block is
/// freed, after which large blocks come from the heap and stay with the
/// process: one 4 MiB message left a worker 4-12 MiB larger for good. A fixed
/// threshold (1 MiB) keeps large message buffers in their own mappings,
/// returned to the system when freed. Applied to the children the runtime
/// starts, unless the user set glibc's malloc tunables themselves.
const MALLOC_TUNABLE: &str = "glibc.malloc.mmap_threshold=1048576";

fn allocator_tunables() -> Option<String> {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return None;
    }
    match std::env::var("GLIBC_TUNABLES") {
        Ok(existing) if existing.contains("glibc.malloc.") => None,
        Ok(existing) if !existing.is_empty() => Some(format!("{existing}:{MALLOC_TUNABLE}")),
        _ => Some(MALLOC_TUNABLE.to_owned()),
    }
}

/// Starts a child. Call it from the thread that outlives the child (the
/// runtime's own thread): Linux ties the child's parent-death signal to
/// the thread that forked it.
pub(crate) async fn launch(launch: Launch<'_>) -> Result<ChildProcess, Error> {
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot find the current executable", e))?;
    let mut command = Command::new(exe);
    // A spawn relays its own output with its prefix; its forks write where
    // the spawn's output went before, and prefix their own lines.
    let (stdout, stderr) = crate::output::for_child();
    command
        .args(std::env::args_os().skip(1))
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    for name in env::ALL {
        command.env_remove(name);
    }
    let (kind, worker, fork) = match launch.role {
        Role::Master => unreachable!("the master is never launched"),
        Role::Spawn { name } => ("spawn", name, None),
        Role::Fork { name, number, of } => ("fork", name, Some((number, of))),
    };
    command
        .env(env::ROLE, kind)
        .env(env::WORKER, worker)
        .env(env::PATH, launch.path)
        .env(env::INCARNATION, launch.incarnation.to_string())
        .env(env::RESTARTS, launch.restarts.to_string())
        .env(env::MASTER, launch.master_socket)
        .env(env::SOCKET_DIR, launch.socket_dir)
        .env(env::PARENT, std::process::id().to_string());
    if let Some(listener) = launch.listener {
        command.env(env::LISTENER, listener);
    }
    if let Some(tunables) = allocator_tunables() {
        command.env("GLIBC_TUNABLES", tunables);
    }
    if let Some((number, of)) = fork {
        command
            .env(env::FORK, number.to_string())
            .env(env::FORKS, of.to_string());
    }
    let mut child = command
        .spawn()
        .map_err(|e| Error::io(format!("cannot start {}", launch.path), e))?;
    let pid = child.id().unwrap_or_default();
    let forked = matches!(launch.role, Role::Fork { .. }) && launch.listener.is_some();
    if forked {
        // Before the cookie is written: the fork cannot reach the handoff sooner.
        crate::listener::fork_started(pid);
    }
    let mut control = child.stdin.take().expect("stdin is piped");
    let line = format!("{}\n", hex::encode(launch.cookie.as_bytes()));
    if let Err(error) = control.write_all(line.as_bytes()).await {
        // The child died at once; its exit status tells the supervisor why.
        warn!(path = launch.path, %error, "could not hand the cookie to the child");
    }
    Ok(ChildProcess {
        path: launch.path.to_owned(),
        pid,
        incarnation: launch.incarnation,
        child,
        control: Some(control),
        forked,
    })
}

/// The control pipe's line that opens a child's [`Gate`].
const GO: &str = "go";

impl ChildProcess {
    /// Lets the child start its actor or task: opens its [`Gate`]. A child
    /// already gone is no error here: its exit tells the supervisor why.
    pub async fn release(&mut self) {
        let Some(control) = self.control.as_mut() else { return };
        if let Err(error) = control.write_all(format!("{GO}\n").as_bytes()).await {
            warn!(path = %self.path, %error, "could not release the child");
        }
    }

    /// Waits for the child to exit on its own.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await;
        self.exited();
        status
    }

    /// Once it exited (its pid may be reused): no more listener for it.
    fn exited(&self) {
        if self.forked {
            crate::listener::fork_exited(self.pid);
        }
    }

    /// Asks the child to stop (end of file on its control pipe), then kills
    /// it if it is still running after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        self.control.take();
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                warn!(path = %self.path, pid = self.pid, ?grace, "did not stop in time; killing it");
                self.child.kill().await?;
                self.child.wait().await
            }
        };
        self.exited();
        status
    }
}

/// Why a child stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The control pipe closed: the parent asked, or the parent is gone.
    ControlClosed,
}

/// Where a child waits for its turn: its process is up, joined to the
/// master and ready to go, but its actor or task does not start (nor
/// register, nor start its forks' actors) until its parent says [`GO`] on the
/// control pipe. The master starts every spawn's process at once and lets
/// each through once the one declared before it is ready, so spawns become
/// ready in declaration order while their start-ups overlap.
pub(crate) struct Gate(watch::Receiver<bool>);

impl Gate {
    /// Resolves once the parent has let this child go; never, if the
    /// control pipe ends first (the child is then told to stop instead).
    pub async fn opened(&mut self) {
        if self.0.wait_for(|open| *open).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A child's first steps: die with the parent, and read the cookie.
///
/// Returns the cookie, the child's [`Gate`], a channel that yields once
/// the control pipe closes, and the rest of the control pipe, to be read
/// by the output relay's thread ([`ControlPipe::watch_alone`] if there is
/// none).
pub(crate) fn attach_to_parent(
    env: &ChildEnv,
    grace: Duration,
) -> Result<(Cookie, Gate, mpsc::UnboundedReceiver<StopReason>, ControlPipe), Error> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
            .map_err(|e| Error::io("cannot set the parent-death signal", e.into()))?;
        // The parent may have died before the line above: then we were
        // re-parented already and the signal will never come.
        let parent = rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32);
        if parent != Some(env.parent) {
            return Err(Error::Environment(format!(
                "parent process {} is gone (parent is now {parent:?})",
                env.parent
            )));
        }
    }
    let (line, after) = read_first_line().map_err(|e| Error::io("cannot read the control pipe", e))?;
    let cookie = std::str::from_utf8(&line)
        .ok()
        .and_then(|line| hex::decode(line.trim()).ok())
        .ok_or_else(|| Error::Environment("the control pipe did not start with a cookie".into()))?;
    let (mut control, gate, stopped) = ControlPipe::new(grace);
    // A `go` may have come with the cookie.
    if !after.is_empty() {
        control.heard(&after);
    }
    Ok((Cookie::new(cookie), gate, stopped, control))
}

/// The longest control line a child keeps (the cookie's is the longest).
const LONGEST_CONTROL_LINE: usize = 4096;

/// Reads the control pipe's first line, without its newline, and whatever
/// came after it in the same reads. Unbuffered: the rest of the pipe is
/// read elsewhere, from the descriptor.
fn read_first_line() -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut got = Vec::with_capacity(128);
    let mut chunk = [0u8; 128];
    loop {
        if let Some(end) = got.iter().position(|&b| b == b'\n') {
            let after = got.split_off(end + 1);
            got.truncate(end);
            return Ok((got, after));
        }
        if got.len() > LONGEST_CONTROL_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the first line is too long",
            ));
        }
        match read_control(&mut chunk) {
            Ok(0) => return Ok((got, Vec::new())),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

/// One read of the control pipe (this process's standard input).
fn read_control(chunk: &mut [u8]) -> std::io::Result<usize> {
    #[cfg(unix)]
    return Ok(rustix::io::read(rustix::stdio::stdin(), chunk)?);
    #[cfg(not(unix))]
    return std::io::Read::read(&mut std::io::stdin(), chunk);
}

/// A child's control pipe after its cookie: [`GO`] opens the child's
/// [`Gate`]; its end asks the child to stop, and ends the process if it
/// has not stopped within its grace.
pub(crate) struct ControlPipe {
    /// The start of a line not yet ended.
    partial: Vec<u8>,
    open: watch::Sender<bool>,
    stop: mpsc::UnboundedSender<StopReason>,
    grace: Duration,
    ended: bool,
    /// Once the pipe ended: when the process must be gone (`None` for a
    /// grace too long to count).
    deadline: Option<Instant>,
}

/// Words a process leaves when it outlived its grace.
const OVERDUE: &str = "parent gone and the graceful stop did not finish in time; exiting";

impl ControlPipe {
    fn new(grace: Duration) -> (ControlPipe, Gate, mpsc::UnboundedReceiver<StopReason>) {
        let (stop, stopped) = mpsc::unbounded_channel();
        let (open, gate) = watch::channel(false);
        let control = ControlPipe {
            partial: Vec::new(),
            open,
            stop,
            grace,
            ended: false,
            deadline: None,
        };
        (control, Gate(gate), stopped)
    }

    /// Takes what was read from the pipe; empty at its end.
    fn heard(&mut self, bytes: &[u8]) {
        if self.ended {
            return;
        }
        if bytes.is_empty() {
            self.ended = true;
            let _ = self.stop.send(StopReason::ControlClosed);
            // The graceful path has `grace` to finish; after that, go anyway
            // rather than outlive the parent.
            self.deadline = Instant::now().checked_add(self.grace);
            return;
        }
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            // After the cookie, only `go` is ever written.
            if &self.partial[..end] == GO.as_bytes() {
                self.open.send_replace(true);
            }
            self.partial.drain(..=end);
        }
        if self.partial.len() > LONGEST_CONTROL_LINE {
            self.partial.clear();
        }
    }

    /// Reads the pipe on a thread of its own: where there is no output
    /// relay to read it.
    pub fn watch_alone(mut self) -> Result<(), Error> {
        std::thread::Builder::new()
            .name("evilcluster-control".into())
            .spawn(move || {
                let mut chunk = [0u8; 64];
                while !self.ended {
                    match read_control(&mut chunk) {
                        Ok(n) => self.heard(&chunk[..n]),
                        Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => self.heard(&[]),
                    }
                }
                let Some(deadline) = self.deadline else { return };
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                warn!("{OVERDUE}");
                std::process::exit(1);
            })
            .map(drop)
            .map_err(|e| Error::io("cannot start the control thread", e))
    }
}

#[cfg(unix)]
impl crate::output::Inlet for ControlPipe {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        rustix::stdio::stdin()
    }

    fn heard(&mut self, bytes: &[u8]) {
        ControlPipe::heard(self, bytes);
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn overdue(&mut self) -> &'static str {
        OVERDUE
    }
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    bytes
}

/// Incarnations are random: a restarted process, even under a restarted
/// parent, never reuses its predecessor's.
pub(crate) fn random_incarnation() -> u64 {
    u64::from_ne_bytes(random_bytes::<8>()).max(1)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::sync::mpsc as std_mpsc;

    #[test]
    fn go_lines_open_the_gate_and_the_end_asks_to_stop() {
        let (mut control, gate, mut stopped) = ControlPipe::new(Duration::from_secs(5));
        control.heard(b"g");
        assert!(!*gate.0.borrow(), "half a line is no `go`");
        control.heard(b"o\nsomething else\ngo");
        assert!(*gate.0.borrow());
        assert!(stopped.try_recv().is_err());
        assert!(control.deadline.is_none());
        control.heard(&[]);
        assert_eq!(stopped.try_recv().ok(), Some(StopReason::ControlClosed));
        let deadline = control.deadline.expect("a deadline once the pipe ended");
        assert!(deadline > Instant::now() + Duration::from_secs(4));
        // Once ended, nothing more is taken.
        control.heard(&[]);
        assert!(stopped.try_recv().is_err());
        // A grace too long to count: no deadline, no panic.
        let (mut forever, _gate, _stopped) = ControlPipe::new(Duration::MAX);
        forever.heard(&[]);
        assert!(forever.deadline.is_none());
    }

    /// Set in the process [`the_relay_thread_reads_the_control_pipe`]
    /// starts: this test binary, playing a child.
    const PLAY_CHILD: &str = "EVILCLUSTER_TEST_PLAY_CONTROLLED_CHILD";

    /// The child's side: relays its output and reads its control pipe on
    /// one thread, says what it heard, then never finishes stopping.
    fn play_child() {
        let (control, mut gate, mut stopped) = ControlPipe::new(Duration::from_millis(300));
        if let Err((error, _)) = crate::output::relay("child", control) {
            panic!("cannot relay: {error}");
        }
        println!("relaying");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(gate.opened());
        println!("opened");
        assert_eq!(stopped.blocking_recv(), Some(StopReason::ControlClosed));
        println!("asked to stop");
        print!("an unfinished line");
        std::io::stdout().flush().unwrap();
        // A graceful stop that never ends: the relay ends the process.
        loop {
            std::thread::park();
        }
    }

    /// Kills the child if the test ends before it did.
    struct Reaped(std::process::Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn the_relay_thread_reads_the_control_pipe() {
        if std::env::var_os(PLAY_CHILD).is_some() {
            return play_child();
        }
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "supervision::process::tests::the_relay_thread_reads_the_control_pipe",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(PLAY_CHILD, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = Reaped(child);
        let (lines, heard) = std_mpsc::channel();
        for stream in [
            Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.0.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = lines.send(line);
                }
            });
        }
        drop(lines);
        let mut seen = Vec::new();
        let mut wait_for = |wanted: &str| {
            let deadline = Instant::now() + Duration::from_secs(20);
            // The test harness starts a line of its own before the child's first.
            while !seen.iter().any(|line: &String| line.ends_with(wanted)) {
                let left = deadline.saturating_duration_since(Instant::now());
                match heard.recv_timeout(left) {
                    Ok(line) => seen.push(line),
                    Err(_) => panic!("no line `{wanted}` from the child; it said {seen:?}"),
                }
            }
        };
        wait_for("child | relaying");
        let mut control = child.0.stdin.take().unwrap();
        control.write_all(b"g").unwrap();
        control.flush().unwrap();
        control.write_all(b"o\n").unwrap();
        wait_for("child | opened");
        drop(control);
        let closed = Instant::now();
        wait_for("child | asked to stop");
        // Past its grace, the relay passes on what was written, the start of
        // a line too, leaves its last words and exits.
        wait_for("child | an unfinished line");
        wait_for(&format!("child | {OVERDUE}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the child outlived its grace");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(1));
        assert!(
            closed.elapsed() >= Duration::from_millis(300),
            "it waited out its grace"
        );
    }
}
