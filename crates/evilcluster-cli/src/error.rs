//! What can go wrong, in words a person can act on.

use std::path::PathBuf;
use std::time::Duration;

use evilcluster_wire::{DecodeError, HandshakeError, WireError};

/// Why a cluster is considered not running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRunning {
    /// No endpoint file: no master of that name advertises itself.
    NoEndpointFile {
        /// The file looked for.
        file: PathBuf,
    },
    /// The endpoint file names a master pid that is gone (a stale file).
    MasterGone {
        /// The endpoint file.
        file: PathBuf,
        /// The pid it names.
        pid: u32,
    },
    /// Nothing accepts connections on the master's socket any more.
    SocketRefused {
        /// The master socket.
        socket: PathBuf,
        /// What the operating system said.
        detail: String,
    },
}

impl std::fmt::Display for NotRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotRunning::NoEndpointFile { file } => write!(f, "no {}", file.display()),
            NotRunning::MasterGone { file, pid } => write!(
                f,
                "its master, pid {pid}, has exited; {} is stale and can be removed",
                file.display()
            ),
            NotRunning::SocketRefused { socket, detail } => {
                write!(
                    f,
                    "its master socket {} refuses connections: {detail}",
                    socket.display()
                )
            }
        }
    }
}

/// Every error of the `evilcluster` command.
///
/// [`exit_code`](CliError::exit_code) is 1 when the cluster is not running,
/// 2 for everything else.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The named cluster is not running.
    #[error("no cluster named {cluster:?} is running ({reason})")]
    NotRunning {
        /// The cluster asked for.
        cluster: String,
        /// How we know.
        reason: NotRunning,
    },
    /// The discovery directory or one of its files is not private to this
    /// user: another user could have planted or read it.
    #[error("not trusting the discovery files: {0}")]
    Untrusted(#[from] evilcluster_wire::control::Untrusted),
    /// The name cannot be a cluster's name.
    #[error("{cluster:?} is not a valid cluster name: it must be non-empty and contain no '/'")]
    InvalidName {
        /// The name given.
        cluster: String,
    },
    /// A discovery file exists but cannot be read.
    #[error("cannot read {}: {source}", file.display())]
    ReadFile {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A discovery file does not hold what the control protocol says it holds.
    #[error("{} is malformed: {detail}", file.display())]
    MalformedFile {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Connecting to the master socket failed for another reason than a refusal.
    #[error("cannot connect to the master of cluster {cluster:?} at {}: {source}", socket.display())]
    Connect {
        /// The cluster.
        cluster: String,
        /// The master socket.
        socket: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The handshake with the master failed.
    #[error(
        "the master of cluster {cluster:?} did not accept us: {source}{}",
        handshake_hint(source)
    )]
    Handshake {
        /// The cluster.
        cluster: String,
        /// Why.
        #[source]
        source: HandshakeError,
    },
    /// A step did not finish in time.
    #[error("the master of cluster {cluster:?} did not answer within {}s while {step}", after.as_secs_f64())]
    Timeout {
        /// The cluster.
        cluster: String,
        /// What we were doing.
        step: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The connection failed or closed before the reply came.
    #[error("lost the connection to the master of cluster {cluster:?} while {step}: {detail}")]
    ConnectionLost {
        /// The cluster.
        cluster: String,
        /// What we were doing.
        step: &'static str,
        /// What happened.
        detail: String,
    },
    /// The master sent a frame that does not decode.
    #[error("the master of cluster {cluster:?} sent a malformed frame: {source}")]
    Malformed {
        /// The cluster.
        cluster: String,
        /// The decoder's words.
        #[source]
        source: DecodeError,
    },
    /// The master answered with an error instead of a result.
    #[error("the master of cluster {cluster:?} refused `{tag}`: {source}{}", remote_hint(source))]
    Remote {
        /// The cluster.
        cluster: String,
        /// The control request's tag.
        tag: &'static str,
        /// The error it reported.
        #[source]
        source: WireError,
    },
    /// The reply's payload is not what the control protocol says.
    #[error("the master of cluster {cluster:?} answered `{tag}` with something that does not decode: {detail} (is it a different evilcluster version?)")]
    BadReply {
        /// The cluster.
        cluster: String,
        /// The control request's tag.
        tag: &'static str,
        /// The decoder's words.
        detail: String,
    },
    /// The request could not be encoded (a bug of this tool).
    #[error("cannot encode the `{tag}` request: {detail}")]
    Encode {
        /// The control request's tag.
        tag: &'static str,
        /// The encoder's words.
        detail: String,
    },
    /// The master could not restart the worker (unknown, disabled, down, or a
    /// process that did not come back).
    #[error("cluster {cluster:?} could not restart worker `{worker}`: {reason}")]
    RestartFailed {
        /// The cluster.
        cluster: String,
        /// The worker asked for.
        worker: String,
        /// The master's reason.
        reason: String,
    },
    /// `stop` was accepted but the master is still there after the deadline.
    #[error("cluster {cluster:?} was asked to stop, but its master (pid {pid}) is still running after {}s; it may still be stopping its workers (try a longer --timeout, or `kill -TERM {pid}`)", after.as_secs_f64())]
    StopTimedOut {
        /// The cluster.
        cluster: String,
        /// The master pid.
        pid: u32,
        /// How long we waited.
        after: Duration,
    },
    /// No randomness for the handshake's nonce.
    #[error("cannot get random bytes for the handshake: {0}")]
    Random(String),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
}

fn handshake_hint(error: &HandshakeError) -> &'static str {
    match error {
        HandshakeError::BadProof => " (the cookie file does not match the running master; was it overwritten?)",
        HandshakeError::Version { .. } => " (use the evilcluster command of the same version as the cluster)",
        _ => "",
    }
}

fn remote_hint(error: &WireError) -> &'static str {
    match error {
        WireError::UnknownActor { .. } | WireError::UnknownMessage { .. } => {
            " (the cluster runs an evilcluster version without this control command)"
        }
        _ => "",
    }
}

impl CliError {
    /// The process exit code for this error: 1 if the cluster is not
    /// running, 2 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::NotRunning { .. } => 1,
            _ => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_running_names_the_cluster_and_the_file() {
        let error = CliError::NotRunning {
            cluster: "myapp".into(),
            reason: NotRunning::NoEndpointFile {
                file: "/tmp/evilcluster-0/myapp.endpoint".into(),
            },
        };
        assert_eq!(
            error.to_string(),
            "no cluster named \"myapp\" is running (no /tmp/evilcluster-0/myapp.endpoint)"
        );
        assert_eq!(error.exit_code(), 1);
    }

    #[test]
    fn other_errors_exit_with_2() {
        let error = CliError::Timeout {
            cluster: "myapp".into(),
            step: "waiting for the status",
            after: Duration::from_secs(10),
        };
        assert_eq!(
            error.to_string(),
            "the master of cluster \"myapp\" did not answer within 10s while waiting for the status"
        );
        assert_eq!(error.exit_code(), 2);
    }
}
