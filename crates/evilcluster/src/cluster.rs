//! The cluster: its declaration, the master's start and shutdown, and what
//! each child runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use evilcluster_wire::control::CONTROL;
use evilcluster_wire::{Cookie, Identity};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, error_span, info, warn};

use crate::control::{ControlService, SupervisorService, SUPERVISOR};
use crate::directory::{Member, Snapshot};
use crate::node::connection::{self, Link, Side};
use crate::node::rpc::{call, decode, encode};
use crate::node::transport;
use crate::node::{Config, Node, NodeSpec};
use crate::process::StopReason;
use crate::registry::{Announce, Leave, MarkReady, PeerGone, Register, Registry, RegistryService, Subscribe, REGISTRY};
use crate::remote::RemoteMessage;
use crate::role::ChildEnv;
use crate::rundir::RunDir;
use crate::supervisor::{self, AutoShutdown, Intensity, Plan, Restart, Strategy, SupervisorHandle};
use crate::tree::Declared;
use crate::worker::{publish_options, Body, Hosted, Worker};
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
                actix_rt::System::new().block_on(async move {
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
            let mut signal = std::pin::pin!(listen_for_shutdown());
            let cluster = self.start_unless(&mut signal).await?;
            // A task rather than part of the root future: waking the root
            // costs the runtime a syscall per wake-up.
            let mut main = actix_rt::spawn(main(cluster.running()));
            let outcome = tokio::select! {
                gave_up = cluster.gave_up() => {
                    main.abort();
                    Err(gave_up)
                }
                value = &mut main => match value {
                    Ok(value) => Ok(value),
                    Err(failed) => std::panic::resume_unwind(failed.into_panic()),
                },
                () = signal => {
                    main.abort();
                    Err(Error::Interrupted)
                }
                () = cluster.stop_requested() => {
                    main.abort();
                    Err(Error::Interrupted)
                }
            };
            cluster.shutdown().await?;
            outcome
        })
    }

    /// Starts the tree from the master inside an already running actix
    /// system, and returns once every worker is ready. Call
    /// [`ClusterHandle::shutdown`] to stop it. Children must still call
    /// [`run`](Self::run) (check [`is_master`](crate::is_master) first).
    pub async fn start(self) -> Result<ClusterHandle> {
        self.start_unless(std::future::pending()).await
    }

    /// Starts the tree, unless `interrupt` resolves first: then whatever was
    /// started is stopped and the result is [`Error::Interrupted`].
    async fn start_unless(self, interrupt: impl Future<Output = ()>) -> Result<ClusterHandle> {
        self.validate()?;
        if let Some(env) = ChildEnv::from_env()? {
            return Err(Error::NotMaster(env.role.to_string()));
        }
        publish_options(None, &self.workers);
        raise_descriptor_limit();
        let run_dir = RunDir::claim(&self.name)?;
        let cookie = match self.cookie.clone() {
            Some(secret) => Cookie::new(secret),
            None => Cookie::new(crate::process::random_bytes::<32>().to_vec()),
        };
        let master_socket = run_dir.sockets.join("master.sock").to_string_lossy().into_owned();
        let incarnation = crate::process::random_incarnation();
        run_dir.publish(&master_socket, &cookie)?;
        let node = Node::start(NodeSpec {
            identity: Identity {
                cluster: self.name.clone(),
                path: self.name.clone(),
                incarnation,
            },
            cookie: cookie.clone(),
            config: self.config.clone(),
            socket: Some(master_socket.clone()),
            socket_dir: run_dir.sockets.clone(),
            master: (self.name.clone(), master_socket.clone()),
        })?;
        install_services(&node);
        let registry = actix::Actor::start(Registry::new(&node));
        node.host_registry({
            let registry = registry.clone();
            Box::new(move |link| registry.do_send(PeerGone { link }))
        });
        node.add_service(REGISTRY, Arc::new(RegistryService(registry.clone())));
        let _ = registry
            .send(Register {
                owner: None,
                member: Member {
                    path: self.name.clone(),
                    role: RoleKind::Master,
                    worker: self.name.clone(),
                    order: 0,
                    fork: None,
                    pid: std::process::id(),
                    incarnation,
                    actor: Some(REGISTRY.into()),
                    actor_type: None,
                    socket: Some(master_socket.clone()),
                    restarts: 0,
                    listen: None,
                },
            })
            .await;

        let declared: Vec<Declared> = self
            .workers
            .iter()
            .map(|w| Declared {
                name: w.name.clone(),
                forks: w.forks,
                disabled: w.disabled,
                actor: w.actor_name(),
                type_name: w.type_name(),
            })
            .collect();
        let stop = Arc::new(Notify::new());
        let plan = Plan {
            path: self.name.clone(),
            strategy: self.strategy,
            intensity: self.intensity,
            auto_shutdown: self.auto_shutdown,
            children: self
                .workers
                .iter()
                .filter(|w| !w.disabled)
                .map(|worker| {
                    worker.supervision.child(
                        Role::Spawn {
                            name: worker.name.clone(),
                        },
                        format!("{}/{}", self.name, worker.name),
                        worker.forks,
                        &self.config,
                    )
                })
                .collect(),
            master_socket: master_socket.clone(),
            socket_dir: node.socket_dir.clone(),
            cookie: cookie.clone(),
            listener: None,
        };
        actix_rt::spawn(crate::control::track_restarts());
        let supervisor = supervisor::supervise(node.clone(), plan);
        node.add_service(
            CONTROL,
            Arc::new(ControlService {
                node: Arc::downgrade(&node),
                cluster: self.name.clone(),
                declared: declared.clone(),
                stop: stop.clone(),
                restarter: supervisor.restarter(),
            }),
        );
        let handle = ClusterHandle {
            name: self.name.clone(),
            stop,
            node: node.clone(),
            supervisor,
            declared,
            run_dir: Some(run_dir),
            tree_logger: None,
        };
        let started = tokio::select! {
            started = handle.supervisor.started() => Some(started),
            () = interrupt => None,
        };
        let Some(started) = started else {
            info!("shutdown signal received while starting");
            handle.shutdown().await?;
            return Err(Error::Interrupted);
        };
        if let Err(error) = started {
            error!("{error}; stopping the cluster");
            let _ = handle.shutdown().await;
            return Err(error);
        }
        let mut handle = handle;
        // Workers waiting in `cluster_ready` go on.
        let _ = registry.send(MarkReady).await;
        info!("cluster ready\n{}", handle.tree());
        handle.tree_logger = Some(actix_rt::spawn(log_tree_changes(
            node.clone(),
            self.name.clone(),
            handle.declared.clone(),
        )));
        Ok(handle)
    }

    fn run_child_and_exit(self, env: ChildEnv) -> ! {
        let socket_dir = env.socket_dir.clone();
        // A panic that unwinds this far (a task's) ends the process like
        // one that ended its actor: the same code, the output flushed.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_child(env)));
        let code = match &outcome {
            Ok(Ok(())) => 0,
            Err(_) => crate::lifecycle::PANIC_EXIT_CODE,
            Ok(Err(error)) => {
                error!("{error}");
                // The parent reports it in the exit's reason; a panic's own
                // message, left first, wins.
                crate::lifecycle::leave_last_words(&socket_dir, &error.to_string());
                if PANICKED.load(std::sync::atomic::Ordering::SeqCst) {
                    crate::lifecycle::PANIC_EXIT_CODE
                } else {
                    1
                }
            }
        };
        // Every line written so far reaches the terminal before the exit.
        crate::output::finish();
        std::process::exit(code)
    }

    fn run_child(mut self, env: ChildEnv) -> Result<()> {
        let name = env.role.worker().expect("a child has a worker").to_owned();
        let index = self
            .workers
            .iter()
            .position(|w| w.name == name)
            .ok_or_else(|| Error::Environment(format!("worker `{name}` is not declared in this program")))?;
        let worker = &self.workers[index];
        // The whole of this process's budget (its forks' included, for a
        // spawn): its parent waits that long before killing it.
        let budget = worker
            .supervision
            .shutdown_budget(&env.role, worker.forks, &self.config);
        let (cookie, stop_requests) = crate::process::attach_to_parent(&env, budget.saturating_mul(2))?;
        publish_options(Some(&name), &self.workers);
        record_panics(env.socket_dir.clone());
        let worker = self.workers.swap_remove(index);
        // Every line this process writes, logs included, carries its path
        // and pid: from the output relay, or failing that from a span (at
        // error level, so it is enabled whatever RUST_LOG filters).
        let span = match crate::output::relay(&format!("{}[{}]", env.path, std::process::id())) {
            Ok(()) => tracing::Span::none(),
            Err(error) => {
                warn!(%error, "cannot prefix this process's output; logging with a span instead");
                error_span!("proc", path = %env.path, pid = std::process::id())
            }
        };
        let _entered = span.enter();
        let child = Child {
            cluster: self.name,
            config: self.config,
            env,
            cookie,
            order: index as u32 + 1,
        };
        actix_rt::System::new().block_on(child.run(worker, stop_requests))
    }
}

/// A started cluster, seen from the master.
pub struct ClusterHandle {
    name: String,
    /// Fired by a control client's stop request.
    stop: Arc<Notify>,
    node: Arc<Node>,
    supervisor: SupervisorHandle,
    declared: Vec<Declared>,
    /// The name's lock, discovery files and socket directory.
    run_dir: Option<RunDir>,
    tree_logger: Option<tokio::task::JoinHandle<()>>,
}

/// What [`Cluster::run_with`]'s function gets: a view of the running
/// cluster. Cheap to clone; it does not own the cluster (the master stops
/// the tree when the function returns).
#[derive(Clone)]
pub struct RunningCluster {
    name: String,
    node: Arc<Node>,
    declared: Arc<Vec<Declared>>,
    stop: Arc<Notify>,
}

impl std::fmt::Debug for RunningCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningCluster").field("name", &self.name).finish()
    }
}

impl RunningCluster {
    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The live processes of the cluster, as the master's registry knows them.
    pub fn members(&self) -> Vec<Member> {
        self.node.directory.members()
    }

    /// The tree as it is now, rendered as text.
    pub fn tree(&self) -> String {
        crate::control::render(&self.name, &self.declared, &self.node.directory.members())
    }

    /// Asks the master to stop the whole tree, as `evilcluster stop` does:
    /// `run_with` then returns [`Error::Interrupted`].
    pub fn stop(&self) {
        self.stop.notify_one();
    }
}

impl ClusterHandle {
    /// A cheap, clonable view of the running cluster.
    pub fn running(&self) -> RunningCluster {
        RunningCluster {
            name: self.name.clone(),
            node: self.node.clone(),
            declared: Arc::new(self.declared.clone()),
            stop: self.stop.clone(),
        }
    }

    /// The tree as it is now, rendered as text.
    pub fn tree(&self) -> String {
        crate::control::render(&self.name, &self.declared, &self.node.directory.members())
    }

    /// Resolves when a control client (`evilcluster stop`) asks the cluster
    /// to stop; [`Cluster::run`] then stops it as it does on SIGTERM.
    pub async fn stop_requested(&self) {
        self.stop.notified().await
    }

    /// Resolves if the master's supervisor gives up (a spawn restarted more
    /// often than [`Cluster::intensity`] allows): every worker has been
    /// stopped by then, and the error names the spawn. Never resolves
    /// otherwise.
    pub async fn gave_up(&self) -> Error {
        self.supervisor.gave_up().await
    }

    /// Resolves when the tree ended by itself: the spawns marked
    /// [`Worker::significant`] ended as [`Cluster::auto_shutdown`] says, and
    /// the master stopped the rest. Never resolves otherwise. Call
    /// [`shutdown`](Self::shutdown) after it to remove the cluster's sockets.
    pub async fn finished(&self) {
        self.supervisor.finished().await
    }

    /// Stops every worker in reverse start order (graceful, then killed after
    /// the shutdown timeout), and removes the cluster's sockets.
    pub async fn shutdown(mut self) -> Result<()> {
        // Processes leaving one by one during a shutdown are not news.
        if let Some(logger) = self.tree_logger.take() {
            logger.abort();
        }
        self.supervisor.shutdown().await;
        self.node.stop();
        if let Some(run_dir) = self.run_dir.take() {
            run_dir.close()?;
        }
        info!("cluster stopped");
        Ok(())
    }
}

/// Logs the tree again after every change of membership (a process exited,
/// or came back), once things settle.
async fn log_tree_changes(node: Arc<Node>, cluster: String, declared: Vec<Declared>) {
    let mut changes = node.directory.changes();
    changes.mark_unchanged();
    while changes.changed().await.is_ok() {
        // Several processes often change together (a spawn and its forks).
        tokio::time::sleep(Duration::from_millis(50)).await;
        changes.mark_unchanged();
        let members = node.directory.members();
        info!(
            "cluster changed\n{}",
            crate::control::render(&cluster, &declared, &members)
        );
    }
}

/// The process-local part of a child.
struct Child {
    cluster: String,
    config: Config,
    env: ChildEnv,
    cookie: Cookie,
    order: u32,
}

impl Child {
    async fn run(self, worker: Worker, mut stop_requests: mpsc::UnboundedReceiver<StopReason>) -> Result<()> {
        let supervises_forks = matches!(self.env.role, Role::Spawn { .. }) && worker.forks > 0;
        let hosted = match (&worker.body, supervises_forks) {
            (Body::Actor { name, type_name, .. }, false) => Some((*name, *type_name)),
            _ => None,
        };
        let socket = hosted.map(|_| {
            self.env
                .socket_dir
                // Named by incarnation (random), not pid: a pid is reused,
                // and a killed process leaves its socket file behind.
                .join(format!("{:016x}.sock", self.env.incarnation))
                .to_string_lossy()
                .into_owned()
        });
        let node = Node::start(NodeSpec {
            identity: Identity {
                cluster: self.cluster.clone(),
                path: self.env.path.clone(),
                incarnation: self.env.incarnation,
            },
            cookie: self.cookie.clone(),
            config: self.config.clone(),
            socket: socket.clone(),
            socket_dir: self.env.socket_dir.clone(),
            master: (self.cluster.clone(), self.env.master_socket.clone()),
        })?;
        install_services(&node);
        let outcome = self
            .serve(&node, worker, socket, hosted, supervises_forks, &mut stop_requests)
            .await;
        // Replies to requests handled, and messages sent just before the
        // end (a task's last do_send), leave before the process does.
        node.drain(self.config.shutdown_timeout).await;
        node.stop();
        outcome
    }

    async fn serve(
        &self,
        node: &Arc<Node>,
        worker: Worker,
        socket: Option<String>,
        hosted: Option<(&'static str, &'static str)>,
        supervises_forks: bool,
        stop_requests: &mut mpsc::UnboundedReceiver<StopReason>,
    ) -> Result<()> {
        let master = join(node).await?;
        // The worker's shared listener ([`Worker::listen`]): a spawn binds
        // it (and serves it to its forks), a fork fetches it from its spawn.
        let shared = match &worker.listen {
            Some(address) => Some(crate::listener::share(
                address,
                self.env.listener.as_deref(),
                supervises_forks.then(|| {
                    self.env
                        .socket_dir
                        .join(format!("{:016x}.listener", self.env.incarnation))
                }),
            )?),
            None => None,
        };
        let member = Member {
            path: self.env.path.clone(),
            role: self.env.role.kind(),
            worker: worker.name.clone(),
            order: self.order,
            fork: match self.env.role {
                Role::Fork { number, .. } => Some(number),
                _ => None,
            },
            pid: std::process::id(),
            incarnation: self.env.incarnation,
            actor: hosted.map(|(name, _)| name.to_owned()),
            actor_type: hosted.map(|(_, type_name)| type_name.to_owned()),
            socket,
            restarts: self.env.restarts,
            listen: shared.as_ref().map(|s| s.address.clone()),
        };
        if supervises_forks {
            let mut plan = self.fork_plan(&worker);
            plan.listener = shared.as_ref().and_then(|s| s.handoff.as_ref()).map(|h| h.path.clone());
            let forks = supervisor::supervise(node.clone(), plan);
            node.add_service(SUPERVISOR, Arc::new(SupervisorService(forks.restarter())));
            let work = async {
                forks.started().await?;
                announce(&master, member).await?;
                tokio::select! {
                    gave_up = forks.gave_up() => Err(gave_up),
                    // Its forks ended as `fork_auto_shutdown` says: the
                    // spawn's work is done, a normal exit.
                    () = forks.finished() => {
                        info!("the forks have ended (auto-shutdown); exiting");
                        Ok(())
                    }
                }
            };
            let outcome = tokio::select! {
                outcome = work => outcome,
                () = wait_for_stop(node, stop_requests) => Ok(()),
            };
            // Whatever happened, the forks stop before their spawn does.
            forks.shutdown().await;
            return outcome;
        }
        match worker.body {
            Body::Actor { name, host, .. } => {
                let Hosted { service, stop, stopped } = host();
                let mut stopped = std::pin::pin!(stopped);
                node.add_service(name, service);
                let path = member.path.clone();
                announce(&master, member).await?;
                tokio::select! {
                    () = wait_for_stop(node, stop_requests) => {}
                    _ = &mut stopped => return actor_ended(name),
                }
                // New requests go to other instances from now on; the actor
                // handles what it has already received, then stops.
                leave(node, &master, path).await;
                // Peers send new requests elsewhere; what is already on its
                // way is still handled here, or passed on.
                node.go_away();
                node.remove_service(name);
                let _ = stop.send(());
                let _ = stopped.await;
                Ok(())
            }
            Body::Task(task) => {
                announce(&master, member).await?;
                tokio::select! {
                    result = task() => result.map_err(|e| Error::Task { name: worker.name.clone(), reason: e.to_string() }),
                    _ = wait_for_stop(node, stop_requests) => Ok(()),
                }
            }
        }
    }

    /// How this spawn supervises its forks.
    fn fork_plan(&self, worker: &Worker) -> Plan {
        let supervision = &worker.supervision;
        Plan {
            path: self.env.path.clone(),
            strategy: supervision.fork_strategy,
            intensity: supervision.fork_intensity,
            auto_shutdown: supervision.fork_auto_shutdown,
            children: (1..=worker.forks)
                .map(|number| {
                    supervision.child(
                        Role::Fork {
                            name: worker.name.clone(),
                            number,
                            of: worker.forks,
                        },
                        format!("{}/{number}", self.env.path),
                        worker.forks,
                        &self.config,
                    )
                })
                .collect(),
            master_socket: self.env.master_socket.clone(),
            socket_dir: self.env.socket_dir.clone(),
            cookie: self.cookie.clone(),
            listener: None,
        }
    }
}

/// The hosted actor stopped by itself: the process ends with it, abnormally
/// if a handler panicked.
fn actor_ended(name: &str) -> Result<()> {
    if PANICKED.load(std::sync::atomic::Ordering::SeqCst) {
        Err(Error::ActorFailed {
            actor: name.to_owned(),
            reason: "a handler panicked".into(),
        })
    } else {
        info!(actor = name, "the actor stopped; exiting");
        Ok(())
    }
}

static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Remembers that a panic happened (after the usual report), so that an
/// actor ended by a panic ends its process abnormally, with
/// [`PANIC_EXIT_CODE`](crate::lifecycle::PANIC_EXIT_CODE) as a panicking
/// task does; and leaves the panic's message for the parent to report in
/// the exit's reason.
fn record_panics(socket_dir: std::path::PathBuf) {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("Box<dyn Any>");
        let words = match info.location() {
            Some(at) => format!("panicked at {at}: {message}"),
            None => format!("panicked: {message}"),
        };
        crate::lifecycle::leave_last_words(&socket_dir, &words);
        report(info);
    }));
}

/// Tells the registry this process is leaving, so that callers stop
/// choosing it before it stops.
async fn leave(node: &Node, master: &Link, path: String) {
    let leave = Leave {
        path,
        incarnation: node.identity.incarnation,
    };
    let Ok(payload) = encode(Leave::TAG, &leave) else {
        return;
    };
    if let Err(error) = call(
        master,
        REGISTRY,
        Leave::TAG,
        master.peer.incarnation,
        &payload,
        Duration::from_secs(1),
    )
    .await
    {
        debug!(%error, "could not tell the registry this process is leaving");
    }
}

/// Connects a child to the master and loads the directory.
async fn join(node: &Arc<Node>) -> Result<Arc<Link>> {
    let (master_path, master_socket) = &node.master;
    let stream = transport::connect(master_socket)
        .await
        .map_err(|e| Error::io(format!("cannot connect to the master at {master_socket}"), e))?;
    let link = connection::establish(node.clone(), stream, Side::Caller)
        .await
        .map_err(|source| Error::Handshake {
            peer: master_path.clone(),
            source,
        })?;
    node.set_master_link(&link);
    let subscribe = Subscribe {
        path: node.identity.path.clone(),
        incarnation: node.identity.incarnation,
    };
    let reply = call(
        &link,
        REGISTRY,
        Subscribe::TAG,
        link.peer.incarnation,
        &encode(Subscribe::TAG, &subscribe)?,
        node.config.call_timeout,
    )
    .await?;
    let snapshot: Snapshot = decode(Subscribe::TAG, &reply)?;
    node.directory.apply(snapshot);
    Ok(link)
}

async fn announce(master: &Link, member: Member) -> Result<()> {
    let payload = encode(Announce::TAG, &Announce(member))?;
    call(
        master,
        REGISTRY,
        Announce::TAG,
        master.peer.incarnation,
        &payload,
        Duration::from_secs(30),
    )
    .await?;
    info!("ready");
    Ok(())
}

/// Resolves when this child should stop: its control pipe closed, SIGTERM,
/// or the master's connection lost.
async fn wait_for_stop(node: &Node, stop_requests: &mut mpsc::UnboundedReceiver<StopReason>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).ok();
        // A terminal's Ctrl-C reaches every process of the group; the master
        // drives the shutdown, so children let it.
        let mut interrupt = signal(SignalKind::interrupt()).ok();
        loop {
            tokio::select! {
                _ = stop_requests.recv() => return,
                _ = node.master_lost.notified() => return,
                Some(()) = async { terminate.as_mut()?.recv().await } => {
                    info!("SIGTERM received; stopping");
                    return;
                }
                Some(()) = async { interrupt.as_mut()?.recv().await } => {}
            }
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = stop_requests.recv() => {}
        _ = node.master_lost.notified() => {}
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    listen_for_shutdown().await
}

/// Starts listening for SIGINT and SIGTERM now (from then on they no longer
/// kill the process), and resolves when one arrives.
fn listen_for_shutdown() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind| {
            signal(kind)
                .map_err(|error| warn!(%error, "cannot listen for signal {}", kind.as_raw_value()))
                .ok()
        };
        let (mut interrupt, mut terminate) = (listen(SignalKind::interrupt()), listen(SignalKind::terminate()));
        async move {
            tokio::select! {
                Some(()) = async { interrupt.as_mut()?.recv().await } => {}
                Some(()) = async { terminate.as_mut()?.recv().await } => {}
                else => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

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

/// Raises the soft limit on open descriptors to the hard limit: every
/// connection costs one, and the usual soft limit (1,024) is far below what
/// the system allows, which made a flood of connections starve the master.
/// The children inherit the raised limit.
fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            debug!(%error, "could not raise the descriptor limit");
        }
    }
}

/// The runtime's own services every process hosts: its counters, event
/// deliveries and directory pushes (the master adds the registry).
fn install_services(node: &Arc<Node>) {
    node.add_service(
        crate::stats::STATS,
        Arc::new(crate::control::StatsService(Arc::downgrade(node))),
    );
    node.add_service(
        crate::events::EVENTS,
        Arc::new(crate::events::EventService(Arc::downgrade(node))),
    );
    node.add_service(
        crate::registry::DIRECTORY,
        Arc::new(crate::registry::DirectoryService(node.directory.clone())),
    );
}
