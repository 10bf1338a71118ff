//! The cluster: its declaration (the `Cluster` builder, here) and the entry
//! points every process calls (`run`, `run_with`, `start`), which hand over
//! to the runtime of the role this process plays:
//!
//! - `master`: starting and supervising the tree, `ClusterHandle`,
//!   `RunningCluster`, the logged tree;
//! - `child`: joining the master, hosting an actor or running a task, the
//!   graceful stop;
//! - `signals`: SIGINT and SIGTERM.
//!
//! May use: every layer below (node, API, registry, supervision,
//! observability); nothing uses it but the crate root.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use evilcluster_wire::control::CONTROL;
use evilcluster_wire::{Cookie, Identity};
use futures_util::FutureExt as _;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, error, error_span, info, warn};

use crate::api::remote::RemoteMessage;
use crate::api::role::ChildEnv;
use crate::node::connection::{self, Link, Side};
use crate::node::directory::{socket_path, Hosting, Member, Name};
use crate::node::rpc::{call, encode};
use crate::node::transport;
use crate::node::{Config, Node, NodeSpec};
use crate::observe::control::{ControlService, SupervisorService, SUPERVISOR};
use crate::observe::tree::Declared;
use crate::registry::{Announce, Leave, MarkReady, PeerGone, Register, Registry, RegistryService, REGISTRY};
use crate::runtime::rundir::RunDir;
use crate::supervision::policy::{AutoShutdown, Intensity, Restart, Strategy};
use crate::supervision::process::{Gate, StopReason};
use crate::supervision::supervisor::{self, Plan, SupervisorHandle};
use crate::supervision::worker::{publish_options, Body, Hosted, Worker};
use crate::{Error, Result, Role};
use evilcluster_wire::control::RoleKind;

/// A tree of workers, declared the same way in every process.
///
/// ```no_run
/// use evilcluster::prelude::*;
///
/// #[derive(Default)]
/// struct Datastore;
/// impl Actor for Datastore { type Context = Context<Self>; }
/// impl RemoteActor for Datastore {
///     const NAME: &'static str = "datastore";
///     type Messages = evilcluster::messages![];
/// }
///
/// fn main() -> evilcluster::Result<()> {
///     Cluster::new("myapp")
///         .spawn(Worker::actor::<Datastore>())
///         .run()
/// }
/// ```
pub struct Cluster {
    name: String,
    workers: Vec<Worker>,
    config: Config,
    cookie: Option<Vec<u8>>,
    strategy: Strategy,
    intensity: Intensity,
    auto_shutdown: AutoShutdown,
}

impl Cluster {
    /// A cluster named `name`: the id every process checks in the handshake
    /// and the root of every path (`name/worker/fork`).
    pub fn new(name: impl Into<String>) -> Self {
        Cluster {
            name: name.into(),
            workers: Vec::new(),
            config: Config::default(),
            cookie: None,
            strategy: Strategy::default(),
            intensity: Intensity::default(),
            auto_shutdown: AutoShutdown::default(),
        }
    }

    /// Which spawns the master restarts when one of them is to be restarted
    /// (default [`Strategy::OneForOne`]). Each worker's own
    /// [`restart`](Worker::restart) type says whether it is.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// How many spawn restarts the master allows within `within` before it
    /// gives up: it stops the whole tree and [`run`](Self::run) returns
    /// [`Error::GaveUp`] naming the child (default 10 within 60 s).
    pub fn intensity(mut self, max_restarts: u32, within: Duration) -> Self {
        self.intensity = Intensity { max_restarts, within };
        self
    }

    /// When the master ends the whole tree by itself, as the spawns marked
    /// [`Worker::significant`] end (OTP's `auto_shutdown`): then it stops the
    /// other workers and [`run`](Self::run) returns `Ok` (a
    /// [`ClusterHandle`] reports it with [`ClusterHandle::finished`]; with
    /// [`run_with`](Self::run_with), the function decides when to end).
    /// Default: [`AutoShutdown::Never`]: the tree runs until stopped.
    pub fn auto_shutdown(mut self, auto_shutdown: AutoShutdown) -> Self {
        self.auto_shutdown = auto_shutdown;
        self
    }

    /// Adds a worker. Workers start in the order they are added, each ready
    /// before the next, and stop in reverse order.
    pub fn spawn(mut self, worker: Worker) -> Self {
        self.workers.push(worker);
        self
    }

    /// Uses a fixed cookie instead of a fresh random one per run (useful when
    /// outside tools must authenticate to the cluster's sockets).
    pub fn cookie(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.cookie = Some(secret.into());
        self
    }

    /// How long a `send` waits for its reply unless told otherwise (default 5 s).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = timeout;
        self
    }

    /// How long a send waits for an unregistered name (default 10 s).
    pub fn resolve_timeout(mut self, timeout: Duration) -> Self {
        self.config.resolve_timeout = timeout;
        self
    }

    /// How long a child may take to become ready (default 30 s); running out
    /// counts as a failed start. [`Worker::start_timeout`] overrides it.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.config.start_timeout = timeout;
        self
    }

    /// How long a child may take to stop gracefully before it is killed
    /// (default 5 s). [`Worker::shutdown_timeout`] overrides it. A spawn with
    /// forks gets its forks' timeouts on top of its own: it stops them first.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// The largest frame a connection accepts, in bytes (default 16 MiB).
    pub fn max_frame_length(mut self, bytes: usize) -> Self {
        self.config.max_frame_length = bytes;
        self
    }

    /// How many bytes of messages one connection may hold waiting to be
    /// written (default 8 MiB). Past it, `send` and `do_send` wait for the
    /// writer to catch up (the `try_` variants fail with
    /// [`SendError::Full`](crate::SendError::Full) instead): a peer that
    /// stops reading cannot make its callers' memory grow. Replies do not
    /// count, so two processes calling each other never deadlock.
    pub fn outbox_budget(mut self, bytes: usize) -> Self {
        self.config.outbox_budget = bytes;
        self
    }

    /// Joins the hosts that run this cluster (same name) through NATS at
    /// `options` (a URL, or [`NatsOptions`](crate::NatsOptions) with
    /// credentials, TLS and the node name). Without it, the
    /// `EVILCLUSTER_NATS_URL` environment variable does the same. Local
    /// traffic stays on local sockets; see the README's "Beyond one machine".
    #[cfg(feature = "nats")]
    pub fn nats(self, options: impl Into<crate::NatsOptions>) -> Self {
        crate::nats::configure(options.into());
        self
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.contains('/') {
            return Err(Error::Declaration(format!(
                "cluster name {:?} must be non-empty, without '/'",
                self.name
            )));
        }
        for (index, worker) in self.workers.iter().enumerate() {
            if worker.name.is_empty() || worker.name.contains('/') {
                return Err(Error::Declaration(format!(
                    "worker name {:?} must be non-empty, without '/'",
                    worker.name
                )));
            }
            if self.workers[..index].iter().any(|w| w.name == worker.name) {
                return Err(Error::Declaration(format!(
                    "worker `{}` is declared twice",
                    worker.name
                )));
            }
            let supervision = &worker.supervision;
            // OTP refuses these too: a permanent child is always restarted,
            // so it never ends for good and could never end its supervisor.
            if supervision.restart == Restart::Permanent
                && (supervision.significant || supervision.fork_auto_shutdown != AutoShutdown::Never)
            {
                return Err(Error::Declaration(format!(
                    "worker `{}` is significant (`significant(true)` or `fork_auto_shutdown`) but Restart::Permanent, \
                     so it would never end for good; give it `.restart(Restart::Transient)` or `Restart::Temporary`",
                    worker.name
                )));
            }
            if supervision.fork_auto_shutdown != AutoShutdown::Never && worker.forks == 0 {
                return Err(Error::Declaration(format!(
                    "worker `{}` has `fork_auto_shutdown` but no forks; add `.forks(n)` or use `significant(true)` \
                     with `Cluster::auto_shutdown`",
                    worker.name
                )));
            }
        }
        if self.auto_shutdown != AutoShutdown::Never
            && !self.workers.iter().any(|w| !w.disabled && w.supervision.significant)
        {
            return Err(Error::Declaration(format!(
                "the cluster's auto_shutdown is {:?} but no enabled worker is `significant(true)`, so it would never apply",
                self.auto_shutdown
            )));
        }
        Ok(())
    }

    /// Runs this process's part: in the master, starts the tree and serves
    /// until SIGINT, SIGTERM or `evilcluster stop`, then stops it cleanly
    /// and returns. A child never returns from this call: it runs its actor
    /// or task until told to stop, then exits (code 0, or 1 after logging
    /// why), so code after `run` runs in the master only.
    pub fn run(self) -> Result<()> {
        self.validate()?;
        init_tracing();
        match ChildEnv::from_env()? {
            Some(env) => self.run_child_and_exit(env),
            None => {
                let span = error_span!("master", cluster = %self.name, pid = std::process::id());
                let _entered = span.enter();
                run_system(async move {
                    let mut signal = std::pin::pin!(listen_for_shutdown());
                    let cluster = match self.start_unless(&mut signal).await {
                        Err(Error::Interrupted) => return Ok(()),
                        started => started?,
                    };
                    tokio::select! {
                        () = signal => info!("shutdown signal received"),
                        () = cluster.stop_requested() => {}
                        () = cluster.finished() => info!("the significant workers have ended (auto-shutdown)"),
                        gave_up = cluster.gave_up() => {
                            cluster.shutdown().await?;
                            return Err(gave_up);
                        }
                    }
                    cluster.shutdown().await
                })
            }
        }
    }

    /// Like [`run`](Self::run), but the master runs `main` once the tree is
    /// ready, then stops the tree and returns what `main` returned. A child
    /// never returns from this call: it exits when its part is done.
    ///
    /// A SIGINT or SIGTERM before `main` finishes stops the tree and returns
    /// [`Error::Interrupted`]; the master's supervisor giving up stops it and
    /// returns [`Error::GaveUp`].
    pub fn run_with<F, Fut, T>(self, main: F) -> Result<T>
    where
        F: FnOnce(RunningCluster) -> Fut,
        Fut: Future<Output = T> + 'static,
        T: 'static,
    {
        self.validate()?;
        init_tracing();
        if let Some(env) = ChildEnv::from_env()? {
            self.run_child_and_exit(env);
        }
        let span = error_span!("master", cluster = %self.name, pid = std::process::id());
        let _entered = span.enter();
        actix_rt::System::new().block_on(async move {
            let mut signal = Box::pin(listen_for_shutdown());
            let cluster = Rc::new(self.start_unless(&mut signal).await?);
            let running = main(cluster.running());
            // The rest in a task of its own, as a child's work is (see
            // `run_system`): it waits on two join handles, polled only
            // when one of them ends, not on every wake-up of the system.
            in_a_task(async move {
                // `main`, and what else ends the run, each in a task of its
                // own: waiting on both in one future would poll the signal
                // and the supervisor every time `main` is woken.
                let mut main = actix_rt::spawn(running);
                let watched = Rc::clone(&cluster);
                let mut stopping = actix_rt::spawn(async move {
                    tokio::select! {
                        gave_up = watched.gave_up() => Err(gave_up),
                        () = signal => Err(Error::Interrupted),
                        () = watched.stop_requested() => Err(Error::Interrupted),
                    }
                });
                // Whichever ends first, the other is over (or cancelled, and
                // dropped once awaited) before the tree stops: `main` may
                // still be using it, and the watching task holds the cluster.
                let outcome = tokio::select! {
                    value = &mut main => {
                        stopping.abort();
                        let _ = stopping.await;
                        match value {
                            Ok(value) => Ok(value),
                            Err(failed) => std::panic::resume_unwind(failed.into_panic()),
                        }
                    }
                    stopped = &mut stopping => {
                        main.abort();
                        let _ = main.await;
                        match stopped {
                            Ok(reason) => reason,
                            Err(failed) => std::panic::resume_unwind(failed.into_panic()),
                        }
                    }
                };
                let cluster = Rc::into_inner(cluster).expect("the watching task has ended");
                cluster.shutdown().await?;
                outcome
            })
            .await
        })
    }

    /// Starts the tree from the master inside an already running actix
    /// system, and returns once every worker is ready. Call
    /// [`ClusterHandle::shutdown`] to stop it. Children must still call
    /// [`run`](Self::run) (check [`is_master`](crate::is_master) first).
    pub async fn start(self) -> Result<ClusterHandle> {
        self.start_unless(std::future::pending()).await
    }
}

/// Runs `root` to its end on a fresh actix system, as a task of its own
/// (see [`in_a_task`]).
pub(crate) fn run_system<F>(root: F) -> F::Output
where
    F: Future + 'static,
    F::Output: 'static,
{
    actix_rt::System::new().block_on(in_a_task(root))
}

/// Runs `work` as a task of its own and waits for its outcome (a panic is
/// resumed here).
///
/// The system polls its root future again whenever any of its tasks is
/// woken (tokio's `LocalSet::run_until`): a root that waits on several
/// things (signals, stop requests, the supervisor) would be polled on every
/// message this process handles. A task is polled only when one of its own
/// wakers fires, and the root left waits on a oneshot channel: polling it
/// again and again costs less than a join handle (the root's polls, per
/// request in a worker: 126 instructions with a join handle, 73 now).
async fn in_a_task<F>(work: F) -> F::Output
where
    F: Future + 'static,
    F::Output: 'static,
{
    let (done, finished) = tokio::sync::oneshot::channel();
    // Boxed first: passed by value through the spawn's layers, a large
    // future would be copied down the stack at each (measured: 20 KiB
    // more stack per process).
    let work = std::panic::AssertUnwindSafe(Box::pin(work)).catch_unwind();
    drop(actix_rt::spawn(async move {
        let _ = done.send(work.await);
    }));
    match finished.await {
        Ok(Ok(output)) => output,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        // Nothing aborts the task, and the system outlives it.
        Err(_) => unreachable!("the task ended without an outcome"),
    }
}

/// What the cross-host layer tells the API about other hosts.
#[cfg(feature = "nats")]
const NATS_HOOKS: crate::nats::Hooks = crate::nats::Hooks {
    event: crate::api::events::from_other_host,
    members: crate::api::lifecycle::other_host,
};

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The user's own subscriber, if they installed one, wins.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

mod child;
mod master;
pub(crate) mod rundir;
mod signals;

pub use master::{ClusterHandle, RunningCluster};
use signals::listen_for_shutdown;
pub use signals::shutdown_signal;
