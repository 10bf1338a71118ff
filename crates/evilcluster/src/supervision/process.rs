//! Starting children, and a child's ties to its parent.
//!
//! A child is this same executable started again, with the user's own
//! arguments and `EVILCLUSTER_*` variables saying what it is. Its standard
//! input is a pipe from the parent (the control pipe): the first line carries
//! the cluster cookie, so the secret never sits in the environment; a
//! [`GO`] line later lets the child start its actor or task (its turn in the
//! start order, see [`Gate`]); end of file means the parent is gone or wants
//! it to stop.

use std::io::BufRead;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

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
/// Returns the cookie, the child's [`Gate`], and a channel that yields once
/// the control pipe closes.
pub(crate) fn attach_to_parent(
    env: &ChildEnv,
    grace: Duration,
) -> Result<(Cookie, Gate, mpsc::UnboundedReceiver<StopReason>), Error> {
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
    let mut input = std::io::stdin().lock();
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| Error::io("cannot read the control pipe", e))?;
    let cookie = hex::decode(line.trim())
        .map_err(|_| Error::Environment("the control pipe did not start with a cookie".into()))?;
    drop(input);
    let (stop, stopped) = mpsc::unbounded_channel();
    let (open, gate) = watch::channel(false);
    std::thread::Builder::new()
        .name("evilcluster-control".into())
        .spawn(move || {
            // After the cookie, only `go` is ever written; reading ends at
            // end of file. (Stdin is buffered once for the process: a `go`
            // that came with the cookie is read here.)
            for line in std::io::stdin().lock().lines() {
                match line {
                    Ok(line) if line == GO => {
                        open.send_replace(true);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = stop.send(StopReason::ControlClosed);
            // The graceful path has `grace` to finish; after that, go anyway
            // rather than outlive the parent.
            std::thread::sleep(grace);
            warn!("parent gone and the graceful stop did not finish in time; exiting");
            std::process::exit(1);
        })
        .map_err(|e| Error::io("cannot start the control thread", e))?;
    Ok((Cookie::new(cookie), Gate(gate), stopped))
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
