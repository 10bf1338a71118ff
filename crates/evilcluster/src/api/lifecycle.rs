//! What happens to the processes of the tree, as events any process can
//! subscribe to.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::events::{subscribe, Event, Subscription};

/// The exit code of a child process that panicked — in a task, in an actor's
/// handler, anywhere — the same code Rust gives a program whose `main`
/// panics. Its [`ExitReason`] is [`Failed`](ExitReason::Failed) with the
/// panic message.
pub const PANIC_EXIT_CODE: i32 = 101;

/// The most of a child's last words kept in an [`ExitReason`], in bytes.
const LAST_WORDS_LIMIT: u64 = 4096;

/// How a process of the tree ended.
///
/// Exit code 0 is a normal exit — that includes a child that stopped
/// gracefully after SIGTERM or a stop request. Any other code, death by a
/// signal, or failing to become ready is abnormal.
///
/// A child that ends abnormally says why before it exits: a panic's message
/// and location (exit code [`PANIC_EXIT_CODE`]), or the error that ended it
/// (a task's `Err`, a spawn giving up; exit code 1). Its supervisor reports
/// that as [`Failed`](Self::Failed); [`Code`](Self::Code) is a non-zero exit
/// that left no such words (`std::process::exit(n)`, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ExitReason {
    /// Exit code 0.
    Normal,
    /// A non-zero exit code.
    Code(i32),
    /// Killed by this signal (9 is SIGKILL).
    Signal(i32),
    /// It did not become ready: it exited first, or its start timeout ran out.
    StartFailed(String),
    /// A non-zero exit code, and why, in the child's own words: a panic
    /// (`code` is [`PANIC_EXIT_CODE`]; `message` is the panic's message and
    /// location) or the error that ended it (`code` 1).
    Failed {
        /// The exit code.
        code: i32,
        /// Why, as the child said it.
        message: String,
    },
    /// It ran on another host, which left the cluster or was lost (its
    /// heartbeats stopped, or NATS cut it off): whether the process itself
    /// still runs is unknown here.
    NodeLost(String),
}

impl ExitReason {
    /// Exit code 0.
    pub fn is_normal(&self) -> bool {
        matches!(self, ExitReason::Normal)
    }

    /// The exit code, for an exit by code (0 for a normal exit).
    pub fn code(&self) -> Option<i32> {
        match self {
            ExitReason::Normal => Some(0),
            ExitReason::Code(code) | ExitReason::Failed { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Attaches what the child said about its end to a non-zero exit code;
    /// other reasons keep their own meaning.
    pub(crate) fn with_last_words(self, words: Option<String>) -> ExitReason {
        match (self, words) {
            (ExitReason::Code(code), Some(message)) => ExitReason::Failed { code, message },
            (reason, _) => reason,
        }
    }

    pub(crate) fn from_status(status: std::io::Result<std::process::ExitStatus>) -> ExitReason {
        let status = match status {
            Ok(status) => status,
            Err(error) => return ExitReason::StartFailed(format!("could not be waited for: {error}")),
        };
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(signal) = status.signal() {
                return ExitReason::Signal(signal);
            }
        }
        match status.code() {
            Some(0) => ExitReason::Normal,
            Some(code) => ExitReason::Code(code),
            None => ExitReason::StartFailed(format!("unknown exit status {status}")),
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Normal => f.write_str("exited normally"),
            ExitReason::Code(code) => write!(f, "exit code {code}"),
            ExitReason::Signal(signal) => match signal_name(*signal) {
                Some(name) => write!(f, "killed by signal {signal} ({name})"),
                None => write!(f, "killed by signal {signal}"),
            },
            ExitReason::StartFailed(why) => write!(f, "failed to start: {why}"),
            ExitReason::Failed { code, message } => write!(f, "exit code {code}: {message}"),
            ExitReason::NodeLost(why) => write!(f, "{why}"),
        }
    }
}

/// Where the child with `pid` leaves its last words, in the cluster's
/// private socket directory (only the owner can enter it).
fn last_words_path(socket_dir: &Path, pid: u32) -> PathBuf {
    socket_dir.join(format!("{pid}.exit"))
}

/// In a child: records why it is about to end abnormally, unless it has
/// already (the first reason, a panic say, is the cause; later ones are
/// its consequences). Best effort: a child that cannot write still exits.
pub(crate) fn leave_last_words(socket_dir: &Path, words: &str) {
    use std::io::Write;
    let path = last_words_path(socket_dir, std::process::id());
    if let Ok(mut file) = std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
        let _ = file.write_all(words.as_bytes());
    }
}

/// In a parent: reads and removes the last words of its child `pid`, if
/// it left any.
pub(crate) fn take_last_words(socket_dir: &Path, pid: u32) -> Option<String> {
    use std::io::Read;
    let path = last_words_path(socket_dir, pid);
    let file = std::fs::File::open(&path).ok()?;
    let mut words = String::new();
    let read = file.take(LAST_WORDS_LIMIT).read_to_string(&mut words);
    let _ = std::fs::remove_file(&path);
    read.ok()?;
    let words = words.trim();
    (!words.is_empty()).then(|| words.to_owned())
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// One thing that happened to a process of the tree, published by its
/// supervisor (the master for spawns, a spawn for its forks) to every
/// process. Subscribe with [`lifecycle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Lifecycle {
    /// The master started a spawn's process; it is not ready yet.
    Spawned {
        /// The spawn's path.
        path: String,
        /// Its process id.
        pid: u32,
        /// Which start of this path it is.
        incarnation: u64,
    },
    /// A spawn started one of its forks; it is not ready yet.
    Forked {
        /// The fork's path.
        path: String,
        /// Its process id.
        pid: u32,
        /// Which start of this path it is.
        incarnation: u64,
    },
    /// The process is ready: its actor started and registered (or its task began).
    Ready {
        /// Its path.
        path: String,
        /// Its process id.
        pid: u32,
        /// Which start of this path it is.
        incarnation: u64,
        /// How many times this path was restarted before.
        restarts: u32,
    },
    /// The process exited, normally or with an error.
    Exited {
        /// Its path.
        path: String,
        /// Its process id (0 if it never started).
        pid: u32,
        /// Which start of this path it was.
        incarnation: u64,
        /// How it ended.
        reason: ExitReason,
    },
    /// Its supervisor will start it again after `delay` (the backoff).
    Restarting {
        /// Its path.
        path: String,
        /// This restart's number (1 for the first).
        restarts: u32,
        /// How long the supervisor waits first.
        delay: Duration,
    },
    /// A restarted process is ready again, as a new incarnation.
    Restarted {
        /// Its path.
        path: String,
        /// Its new process id.
        pid: u32,
        /// Its new incarnation.
        incarnation: u64,
        /// How many times this path was restarted.
        restarts: u32,
    },
    /// Every child of this supervisor has exited and none is to be restarted.
    AllExited {
        /// The supervisor's path: the cluster's name, or a spawn's path.
        supervisor: String,
    },
    /// A child exited more often than its own limit allows
    /// ([`Worker::fork_max_restarts`](crate::Worker::fork_max_restarts)): it
    /// stays down while its siblings go on; the supervisor does not give up.
    StaysDown {
        /// Its path.
        path: String,
        /// Its limit: at most this many restarts...
        max_restarts: u32,
        /// ...within this period.
        within: Duration,
    },
    /// A child was restarted more often than the supervisor's intensity
    /// allows: the supervisor stopped its children and failed upward.
    GaveUp {
        /// The supervisor's path.
        supervisor: String,
        /// The child whose exits used up the limit.
        child: String,
        /// The limit: at most this many restarts...
        max_restarts: u32,
        /// ...within this period.
        within: Duration,
    },
}

impl Lifecycle {
    /// The path of the process the event is about (the supervisor's, for
    /// [`AllExited`](Self::AllExited) and [`GaveUp`](Self::GaveUp)).
    pub fn path(&self) -> &str {
        match self {
            Lifecycle::Spawned { path, .. }
            | Lifecycle::Forked { path, .. }
            | Lifecycle::Ready { path, .. }
            | Lifecycle::Exited { path, .. }
            | Lifecycle::Restarting { path, .. }
            | Lifecycle::Restarted { path, .. }
            | Lifecycle::StaysDown { path, .. } => path,
            Lifecycle::AllExited { supervisor } | Lifecycle::GaveUp { supervisor, .. } => supervisor,
        }
    }
}

#[cfg(feature = "nats")]
impl Lifecycle {
    /// Prefixes the path with the host it happened on (`node:path`).
    pub(crate) fn qualify(&mut self, node: &str) {
        let path = match self {
            Lifecycle::Spawned { path, .. }
            | Lifecycle::Forked { path, .. }
            | Lifecycle::Ready { path, .. }
            | Lifecycle::Exited { path, .. }
            | Lifecycle::Restarting { path, .. }
            | Lifecycle::Restarted { path, .. }
            | Lifecycle::StaysDown { path, .. } => path,
            Lifecycle::AllExited { supervisor } | Lifecycle::GaveUp { supervisor, .. } => supervisor,
        };
        *path = format!("{node}:{path}");
    }
}

impl Event for Lifecycle {
    const TAG: &'static str = "evilcluster.lifecycle";
}

/// Resolves once the master has started the whole tree — every worker
/// declared (and not disabled) ready, each spawn's forks included — as the
/// original's `clusterReady` event. Works in any process, the master
/// included; in a process started after that (a restarted fork, say) it
/// resolves at once. Fails only outside a running cluster.
///
/// ```no_run
/// # async fn example() -> Result<(), evilcluster::SendError> {
/// evilcluster::cluster_ready().await?;
/// // Every worker is up: warm caches, send the first requests...
/// # Ok(())
/// # }
/// ```
pub async fn cluster_ready() -> Result<(), crate::SendError> {
    let node = crate::node::current().ok_or(crate::SendError::NotInCluster)?;
    node.directory.wait_ready().await;
    Ok(())
}

/// The lifecycle events of the whole tree, from now on, as they reach this
/// process. The master receives every one; so does any other process (they
/// travel like [`publish`](crate::publish)ed events to everyone).
///
/// ```no_run
/// # async fn example() {
/// use evilcluster::Lifecycle;
/// use futures_util::StreamExt;
///
/// let mut events = evilcluster::lifecycle();
/// while let Some(delivery) = events.next().await {
///     if let Lifecycle::Exited { path, reason, .. } = delivery.event {
///         println!("{path}: {reason}");
///     }
/// }
/// # }
/// ```
pub fn lifecycle() -> Subscription<Lifecycle> {
    subscribe::<Lifecycle>()
}

/// In every process: another host's members appeared (`up`) or are gone,
/// as this process's view of the other hosts says; its lifecycle
/// subscribers see them as `Ready` / `Exited` with paths `node:path`.
#[cfg(feature = "nats")]
pub(crate) fn other_host(node: &str, members: &[crate::Member], up: bool, reason: &str) {
    for member in members
        .iter()
        .filter(|m| m.actor().is_some() && m.role != crate::RoleKind::Master)
    {
        let path = format!("{node}:{}", member.path);
        let event = if up {
            Lifecycle::Ready {
                path,
                pid: member.pid,
                incarnation: member.incarnation,
                restarts: member.restarts,
            }
        } else {
            Lifecycle::Exited {
                path,
                pid: member.pid,
                incarnation: member.incarnation,
                reason: ExitReason::NodeLost(format!("{reason}: node `{node}`")),
            }
        };
        crate::api::events::deliver_here(&event);
    }
}
