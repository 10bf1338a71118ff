//! What happens to the processes of the tree, as events any process can
//! subscribe to.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::events::{subscribe, Event, Subscription};

/// How a process of the tree ended.
///
/// Exit code 0 is a normal exit — that includes a child that stopped
/// gracefully after SIGTERM or a stop request. Any other code, death by a
/// signal, or failing to become ready is abnormal.
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
}

impl ExitReason {
    /// Exit code 0.
    pub fn is_normal(&self) -> bool {
        matches!(self, ExitReason::Normal)
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
        }
    }
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
            | Lifecycle::Restarted { path, .. } => path,
            Lifecycle::AllExited { supervisor } | Lifecycle::GaveUp { supervisor, .. } => supervisor,
        }
    }
}

impl Event for Lifecycle {
    const TAG: &'static str = "evilcluster.lifecycle";
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
