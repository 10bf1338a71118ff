//! A child's runtime: joining the master, hosting an actor or running a
//! task, and stopping gracefully.

use super::master::install_services;
use super::*;

impl Cluster {
    pub(super) fn run_child_and_exit(self, env: ChildEnv) -> ! {
        let socket_dir = env.socket_dir.clone();
        // A panic that unwinds this far (a task's) ends the process like
        // one that ended its actor: the same code, the output flushed.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_child(env)));
        let code = match &outcome {
            Ok(Ok(())) => 0,
            Err(_) => crate::api::lifecycle::PANIC_EXIT_CODE,
            Ok(Err(error)) => {
                error!("{error}");
                // The parent reports it in the exit's reason; a panic's own
                // message, left first, wins.
                crate::api::lifecycle::leave_last_words(&socket_dir, &error.to_string());
                if PANICKED.load(std::sync::atomic::Ordering::SeqCst) {
                    crate::api::lifecycle::PANIC_EXIT_CODE
                } else {
                    1
                }
            }
        };
        // Every line written so far reaches the terminal before the exit.
        crate::output::finish();
        std::process::exit(code)
    }

    pub(super) fn run_child(mut self, env: ChildEnv) -> Result<()> {
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
        let (cookie, gate, stop_requests, control) =
            crate::supervision::process::attach_to_parent(&env, budget.saturating_mul(2))?;
        publish_options(Some(&name), &self.workers);
        record_panics(env.socket_dir.clone());
        let worker = self.workers.swap_remove(index);
        // Every line this process writes, logs included, carries its path
        // and pid: from the output relay, or failing that from a span (at
        // error level, so it is enabled whatever RUST_LOG filters).
        // The relay's thread reads the control pipe too.
        let span = match crate::output::relay(&format!("{}[{}]", env.path, std::process::id()), control) {
            Ok(()) => tracing::Span::none(),
            Err((error, control)) => {
                control.watch_alone()?;
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
        super::run_system(child.run(worker, gate, stop_requests))
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
    async fn run(
        self,
        worker: Worker,
        gate: Gate,
        mut stop_requests: mpsc::UnboundedReceiver<StopReason>,
    ) -> Result<()> {
        let hosted = match (&worker.body, self.supervises_forks(&worker)) {
            (Body::Actor { name, type_name, .. }, false) => Some((*name, *type_name)),
            _ => None,
        };
        let socket = hosted.map(|_| {
            socket_path(&self.env.socket_dir, self.env.incarnation)
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
        #[cfg(feature = "nats")]
        crate::nats::start(&node, false, NATS_HOOKS).await?;
        let outcome = self
            .serve(&node, worker, socket, hosted, gate, &mut stop_requests)
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
        mut gate: Gate,
        stop_requests: &mut mpsc::UnboundedReceiver<StopReason>,
    ) -> Result<()> {
        let supervises_forks = self.supervises_forks(&worker);
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
        // A spawn launches its forks at once: they boot and join the master
        // while it does, then wait until it is let go itself.
        let forks = supervises_forks.then(|| {
            let (open, gate) = watch::channel(false);
            let mut plan = self.fork_plan(&worker);
            plan.listener = shared.as_ref().and_then(|s| s.handoff.as_ref()).map(|h| h.path.clone());
            plan.gate = Some(gate);
            let forks = supervisor::supervise(node.clone(), plan);
            node.add_service(SUPERVISOR, Arc::new(SupervisorService(forks.restarter())));
            (forks, open)
        });
        let master = match join_then_wait_turn(node, &mut gate, stop_requests).await {
            Ok(Some(master)) => master,
            stopped_or_failed => {
                if let Some((forks, _)) = &forks {
                    forks.shutdown().await;
                }
                return stopped_or_failed.map(|_| ());
            }
        };
        let member = Member {
            path: Name::from(&self.env.path),
            role: self.env.role.kind(),
            fork: match self.env.role {
                Role::Fork { number, .. } => Some(number),
                _ => None,
            },
            pid: std::process::id(),
            incarnation: self.env.incarnation,
            restarts: self.env.restarts,
            hosting: Hosting {
                worker: Name::interned(&worker.name),
                order: self.order,
                actor: hosted.map(|(name, _)| Name::interned(name)),
                actor_type: hosted.map(|(_, type_name)| Name::interned(type_name)),
                socket_dir: socket
                    .as_ref()
                    .map(|_| Name::interned(&self.env.socket_dir.to_string_lossy())),
                listen: shared.as_ref().map(|s| Name::interned(&s.address)),
            }
            .shared(),
        };
        if let Some((forks, open)) = forks {
            // The forks start their actors now, together.
            open.send_replace(true);
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
                let Hosted {
                    inbox,
                    stop,
                    stopped,
                    started,
                } = host();
                let mut stopped = std::pin::pin!(stopped);
                node.add_actor(name, inbox);
                let path = member.path.clone();
                // Ready means its actor has started: announced once its
                // `started` has run, so that whatever `started` does is
                // done before the spawn declared next is let go (the
                // announcement is written the moment it is made). An actor
                // that stopped in `started` is announced too, and its end
                // seen below, as before.
                let _ = started.await;
                announce(&master, member).await?;
                tokio::select! {
                    () = wait_for_stop(node, stop_requests) => {}
                    _ = &mut stopped => return actor_ended(name),
                }
                // New requests go to other instances from now on; the actor
                // handles what it has already received, then stops.
                leave(node, &master, path.into()).await;
                // Peers send new requests elsewhere; what is already on its
                // way is still handled here, or passed on.
                node.go_away();
                node.remove_service(name);
                stop();
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

    /// Whether this process is a spawn with forks: it supervises them and
    /// hosts nothing itself.
    fn supervises_forks(&self, worker: &Worker) -> bool {
        matches!(self.env.role, Role::Spawn { .. }) && worker.forks > 0
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
            replicas: true,
            gate: None,
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
/// [`PANIC_EXIT_CODE`](crate::api::lifecycle::PANIC_EXIT_CODE) as a panicking
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
        crate::api::lifecycle::leave_last_words(&socket_dir, &words);
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
    let snapshot = crate::registry::subscribe(node, &link).await?;
    node.directory.apply(snapshot);
    Ok(link)
}

/// Joins the master, then waits for this child's turn in the start order
/// (its [`Gate`]): the spawn declared before it is ready. None: told to stop
/// first.
async fn join_then_wait_turn(
    node: &Arc<Node>,
    gate: &mut Gate,
    stop_requests: &mut mpsc::UnboundedReceiver<StopReason>,
) -> Result<Option<Arc<Link>>> {
    let master = join(node).await?;
    debug!("joined; waiting for its turn");
    tokio::select! {
        () = gate.opened() => Ok(Some(master)),
        () = wait_for_stop(node, stop_requests) => Ok(None),
    }
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
