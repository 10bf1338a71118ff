use std::time::Duration;

use evilcluster_wire::{HandshakeError, WireError};

/// What went wrong starting, running or stopping a cluster or one of its processes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What evilcluster was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The `EVILCLUSTER_*` environment of a child process is missing or malformed.
    /// Child processes are started by evilcluster itself; do not start them by hand.
    #[error("bad evilcluster environment: {0}")]
    Environment(String),
    /// The tree names a worker twice, or a worker is otherwise misdeclared.
    #[error("invalid cluster declaration: {0}")]
    Declaration(String),
    /// This call is only valid in the master process.
    #[error("this can only be done in the master process (this process is {0})")]
    NotMaster(String),
    /// A cluster is already running in this process.
    #[error("a cluster is already running in this process")]
    AlreadyRunning,
    /// Another live master already runs a cluster of this name for this user.
    #[error("a cluster named `{cluster}` is already running (master pid {}); stop it or choose another name", pid.map_or_else(|| "unknown: still starting".to_owned(), |p| p.to_string()))]
    NameTaken {
        /// The cluster's name.
        cluster: String,
        /// The other master's pid, once it has written it.
        pid: Option<u32>,
    },
    /// The directory where masters advertise themselves (or a file in it)
    /// could have been planted or changed by another user: the master
    /// refuses to start rather than trust it.
    #[error("refusing to start: {0}")]
    Untrusted(#[from] evilcluster_wire::control::Untrusted),
    /// A connection to another process of the cluster could not be set up.
    #[error("handshake with {peer} failed: {source}")]
    Handshake {
        /// The process or socket at the other end.
        peer: String,
        /// Why it failed.
        #[source]
        source: HandshakeError,
    },
    /// A supervisor's child exited more often than its intensity allows:
    /// the supervisor stopped its children and failed (the master then
    /// stopped the whole tree).
    #[error("{child} exited more than {max_restarts} times within {within:?}; {supervisor} gave up and stopped its children")]
    GaveUp {
        /// The supervisor's path (the cluster's name for the master).
        supervisor: String,
        /// The child whose exits used up the limit.
        child: String,
        /// The limit: at most this many restarts...
        max_restarts: u32,
        /// ...within this period.
        within: Duration,
    },
    /// A rolling restart ([`restart_worker`](crate::restart_worker)) did not complete.
    #[error("restarting worker `{worker}` failed: {reason}")]
    RestartFailed {
        /// The worker.
        worker: String,
        /// Why.
        reason: String,
    },
    /// The actor hosted by this process stopped abnormally (a handler panicked).
    #[error("actor `{actor}` failed: {reason}")]
    ActorFailed {
        /// The actor's name.
        actor: String,
        /// What happened.
        reason: String,
    },
    /// A request the runtime itself needed failed.
    #[error(transparent)]
    Send(#[from] SendError),
    /// A task worker returned an error.
    #[error("task `{name}` failed: {reason}")]
    Task {
        /// The worker's name.
        name: String,
        /// The error the task returned, as text.
        reason: String,
    },
    /// The cluster uses NATS (`Cluster::nats` or `EVILCLUSTER_NATS_URL`) and
    /// this process could not join it: the server is down or unreachable,
    /// or refused the credentials.
    #[error("cannot join the cluster through NATS at {url}: {reason} (is nats-server running there, and are the credentials right?)")]
    Nats {
        /// The server(s) tried.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// SIGINT, SIGTERM or a control client's stop request reached the master before `run_with`'s function finished;
    /// the cluster was shut down cleanly.
    #[error("interrupted by a shutdown signal; the cluster was stopped")]
    Interrupted,
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Why a message to a remote actor got no answer.
///
/// Delivery is *at most once*. Whether the handler ran splits the variants
/// in two ([`SendError::handler_may_have_run`]):
/// - **the handler did not run**: [`NotInCluster`](Self::NotInCluster),
///   [`NotDeclared`](Self::NotDeclared), [`NotRegistered`](Self::NotRegistered),
///   [`Full`](Self::Full), [`MailboxClosed`](Self::MailboxClosed),
///   [`UnknownActor`](Self::UnknownActor), [`UnknownMessage`](Self::UnknownMessage),
///   [`Encode`](Self::Encode), [`Decode`](Self::Decode), [`TooLarge`](Self::TooLarge),
///   [`Rejected`](Self::Rejected), [`Unreachable`](Self::Unreachable);
/// - **the handler may have run** (its effects may have happened; only the
///   answer is missing): [`Disconnected`](Self::Disconnected),
///   [`Timeout`](Self::Timeout), [`Stopped`](Self::Stopped);
/// - **the handler ran**, and its result was lost on the way back:
///   [`ReplyEncode`](Self::ReplyEncode), [`ReplyTooLarge`](Self::ReplyTooLarge),
///   [`ReplyDecode`](Self::ReplyDecode).
///
/// A `send` refused before any handler saw it (the instance it reached was
/// leaving or restarted) is sent again to another live instance within the
/// call's deadline, so those refusals rarely reach the caller; a message
/// declared [idempotent](crate::RemoteMessage::IDEMPOTENT) is also sent
/// again after `Disconnected` or `Stopped`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// This process is not part of a running cluster (`Cluster::run` has not started it).
    #[error("this process is not part of a running evilcluster (call it from inside `Cluster::run`)")]
    NotInCluster,
    /// No worker of the running cluster declares this actor: no process
    /// will ever host it, so the send fails at once.
    #[error("no worker of this cluster declares actor `{actor}`; add a `Worker::actor` for it to the cluster")]
    NotDeclared {
        /// The actor's name.
        actor: &'static str,
    },
    /// The connection to the hosting process has no room (its byte budget or
    /// its window of messages in flight is used up) and the caller asked not
    /// to wait (`try_send`, `try_do_send`). The message was not sent.
    #[error("the connection to {path} (hosting `{actor}`) is full; the receiver is behind")]
    Full {
        /// The actor's name.
        actor: &'static str,
        /// The hosting process's path.
        path: String,
    },
    /// No live process hosts the actor (or that fork of it) after waiting the resolve timeout.
    #[error("no live process hosts actor `{actor}`{} after waiting {waited:?}; is its worker declared, enabled and started?", fork.map(|k| format!(" fork {k}")).unwrap_or_default())]
    NotRegistered {
        /// The actor's name.
        actor: &'static str,
        /// The fork asked for, with `addr_of_fork`.
        fork: Option<u32>,
        /// How long the lookup waited.
        waited: Duration,
    },
    /// The connection to the hosting process failed or was lost; the handler may
    /// or may not have run.
    #[error("connection to {path} (hosting `{actor}`) lost: {reason}")]
    Disconnected {
        /// The actor's name.
        actor: &'static str,
        /// The hosting process's path.
        path: String,
        /// What happened.
        reason: String,
    },
    /// The call's deadline passed first (while resolving, connecting,
    /// waiting for room or waiting for the reply); the handler may or may
    /// not have run.
    #[error("no reply from `{actor}` to `{tag}` within {after:?}")]
    Timeout {
        /// The actor's name.
        actor: &'static str,
        /// The message tag.
        tag: &'static str,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The actor had stopped when the message arrived: it was not queued,
    /// and its handler did not run.
    #[error("the mailbox of `{actor}` is closed (the actor stopped)")]
    MailboxClosed {
        /// The actor's name.
        actor: &'static str,
    },
    /// The actor stopped after the message was queued, before it answered:
    /// its handler may have started (an asynchronous handler cancelled by
    /// the stop) or not run at all.
    #[error("actor `{actor}` stopped before it answered")]
    Stopped {
        /// The actor's name.
        actor: &'static str,
    },
    /// The process reached does not host that actor.
    #[error("the process reached does not host actor `{actor}`")]
    UnknownActor {
        /// The actor's name.
        actor: &'static str,
    },
    /// The receiving process's actor does not list the message in its
    /// `RemoteActor::Messages`. Within one build the compiler rules this
    /// out; it happens when two builds of the program disagree.
    #[error("actor `{actor}` has no route for `{tag}` in the receiving process (is it running another build? list the message in its `RemoteActor::Messages`)")]
    UnknownMessage {
        /// The actor's name.
        actor: &'static str,
        /// The message tag.
        tag: &'static str,
    },
    /// The message did not encode (it was not sent).
    #[error("`{tag}` did not encode: {detail}")]
    Encode {
        /// The message tag.
        tag: &'static str,
        /// The encoder's words.
        detail: String,
    },
    /// The receiver could not decode the message (the two ends disagree on
    /// its type); the handler did not run.
    #[error("`{tag}` did not decode: {detail}")]
    Decode {
        /// The message tag.
        tag: &'static str,
        /// The decoder's words.
        detail: String,
    },
    /// The encoded message is larger than the maximum frame length; it was
    /// refused while being encoded, and not sent.
    #[error("`{tag}` encodes to at least {size} bytes, over the maximum frame of {max} bytes")]
    TooLarge {
        /// The message tag.
        tag: &'static str,
        /// The encoded size (at least this; encoding stopped at the limit).
        size: usize,
        /// The maximum frame length.
        max: usize,
    },
    /// The handler ran, but its result did not encode in the receiving process.
    #[error("the handler of `{tag}` ran, but its result did not encode: {detail}")]
    ReplyEncode {
        /// The message tag.
        tag: &'static str,
        /// The encoder's words.
        detail: String,
    },
    /// The handler ran, but its encoded result is over the maximum frame length.
    #[error("the handler of `{tag}` ran, but its result of {size} bytes is over the maximum frame of {max} bytes")]
    ReplyTooLarge {
        /// The message tag.
        tag: &'static str,
        /// The encoded size of the result.
        size: usize,
        /// The maximum frame length.
        max: usize,
    },
    /// The handler ran, but its result did not decode here (the two ends
    /// disagree on the result type).
    #[error("the handler of `{tag}` ran, but its result did not decode: {detail}")]
    ReplyDecode {
        /// The message tag.
        tag: &'static str,
        /// The decoder's words.
        detail: String,
    },
    /// The actor runs only on other hosts, and this process cannot reach the
    /// cluster's NATS server(s) before the call's deadline: the message was
    /// not sent, and no handler ran.
    #[error(
        "cannot reach `{actor}` on another host: NATS at {url} is unreachable ({reason}); is nats-server running?"
    )]
    Unreachable {
        /// The actor's name.
        actor: &'static str,
        /// The NATS server(s).
        url: String,
        /// What happened.
        reason: String,
    },
    /// The receiving process refused the request for another reason.
    #[error("`{actor}` refused `{tag}`: {reason}")]
    Rejected {
        /// The actor's name.
        actor: &'static str,
        /// The message tag.
        tag: &'static str,
        /// The receiver's words.
        reason: String,
    },
}

impl SendError {
    /// Whether the handler may have run (its effects may have happened)
    /// although the call failed: `false` means it provably did not run, so
    /// the message can be sent again safely.
    pub fn handler_may_have_run(&self) -> bool {
        matches!(
            self,
            SendError::Disconnected { .. }
                | SendError::Timeout { .. }
                | SendError::Stopped { .. }
                | SendError::ReplyEncode { .. }
                | SendError::ReplyTooLarge { .. }
                | SendError::ReplyDecode { .. }
        )
    }

    pub(crate) fn from_wire(actor: &'static str, tag: &'static str, error: WireError) -> Self {
        match error {
            WireError::UnknownActor { .. } => SendError::UnknownActor { actor },
            WireError::UnknownMessage { .. } => SendError::UnknownMessage { actor, tag },
            WireError::Decode { detail, .. } => SendError::Decode { tag, detail },
            WireError::Encode { detail, .. } => SendError::ReplyEncode { tag, detail },
            WireError::MailboxClosed { .. } => SendError::MailboxClosed { actor },
            WireError::Stopped { .. } => SendError::Stopped { actor },
            WireError::ReplyTooLarge { size, max } => SendError::ReplyTooLarge { tag, size, max },
            other @ (WireError::StaleIncarnation { .. } | WireError::Impersonation { .. }) => SendError::Rejected {
                actor,
                tag,
                reason: other.to_string(),
            },
        }
    }
}

/// Result of starting or running a cluster.
pub type Result<T, E = Error> = std::result::Result<T, E>;
