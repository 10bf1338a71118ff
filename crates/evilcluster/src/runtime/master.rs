//! The master's runtime: starting and supervising the tree, the handle
//! to a running cluster, and the logged tree.

use super::*;

impl Cluster {
    /// Starts the tree, unless `interrupt` resolves first: then whatever was
    /// started is stopped and the result is [`Error::Interrupted`].
    pub(super) async fn start_unless(self, interrupt: impl Future<Output = ()>) -> Result<ClusterHandle> {
        self.validate()?;
        if let Some(env) = ChildEnv::from_env()? {
            return Err(Error::NotMaster(env.role.to_string()));
        }
        #[cfg(not(feature = "nats"))]
        refuse_nats_without_feature(std::env::var_os("EVILCLUSTER_NATS_URL"))?;
        publish_options(None, &self.workers);
        raise_descriptor_limit();
        let run_dir = RunDir::claim(&self.name)?;
        let cookie = match self.cookie.clone() {
            Some(secret) => Cookie::new(secret),
            None => Cookie::new(crate::supervision::process::random_bytes::<32>().to_vec()),
        };
        let incarnation = crate::supervision::process::random_incarnation();
        // Named like every other process's, so that its member says where it is.
        let master_socket = socket_path(&run_dir.sockets, incarnation)
            .to_string_lossy()
            .into_owned();
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
        #[cfg(feature = "nats")]
        crate::nats::start(&node, true, NATS_HOOKS).await?;
        let _ = registry
            .send(Register {
                owner: None,
                member: Member {
                    path: Name::from(&self.name),
                    role: RoleKind::Master,
                    fork: None,
                    pid: std::process::id(),
                    incarnation,
                    restarts: 0,
                    hosting: Hosting {
                        worker: Name::interned(&self.name),
                        order: 0,
                        actor: Some(Name::interned(REGISTRY)),
                        actor_type: None,
                        socket_dir: Some(Name::interned(&run_dir.sockets.to_string_lossy())),
                        listen: None,
                    }
                    .shared(),
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
            replicas: false,
            // The master's turn is now.
            gate: None,
        };
        actix_rt::spawn(crate::observe::control::track_restarts());
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
        crate::observe::control::render(&self.name, &self.declared, &self.node.directory.members())
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
        crate::observe::control::render(&self.name, &self.declared, &self.node.directory.members())
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
        // Other hosts stop sending here first.
        #[cfg(feature = "nats")]
        crate::nats::leave().await;
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
            crate::observe::control::render(&cluster, &declared, &members)
        );
    }
}

/// Raises the soft limit on open descriptors to the hard limit: every
/// connection costs one, and the usual soft limit (1,024) is far below what
/// the system allows, which made a flood of connections starve the master.
/// The children inherit the raised limit.
pub(super) fn raise_descriptor_limit() {
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
pub(super) fn install_services(node: &Arc<Node>) {
    node.add_service(
        crate::node::stats::STATS,
        Arc::new(crate::observe::control::StatsService(Arc::downgrade(node))),
    );
    node.add_service(
        crate::api::events::EVENTS,
        Arc::new(crate::api::events::EventService(Arc::downgrade(node))),
    );
    node.add_service(
        crate::registry::DIRECTORY,
        Arc::new(crate::registry::DirectoryService::new(node.directory.clone())),
    );
}

/// A program asked to join other hosts (`EVILCLUSTER_NATS_URL`) by a build
/// that cannot would run alone, and the other hosts would never see it:
/// it does not start.
#[cfg(not(feature = "nats"))]
fn refuse_nats_without_feature(url: Option<std::ffi::OsString>) -> Result<()> {
    match url {
        Some(url) if !url.is_empty() => Err(Error::Environment(
            "EVILCLUSTER_NATS_URL is set, but this program was built without evilcluster's `nats` feature, \
             so it cannot join other hosts: build it with the feature (`--features nats`), or unset the variable"
                .to_owned(),
        )),
        _ => Ok(()),
    }
}

#[cfg(all(test, not(feature = "nats")))]
mod tests {
    use super::*;

    #[test]
    fn a_nats_url_needs_the_nats_feature() {
        let refused = refuse_nats_without_feature(Some("nats://127.0.0.1:4222".into())).unwrap_err();
        assert!(
            matches!(&refused, Error::Environment(why) if why.contains("`nats` feature")),
            "{refused}"
        );
        assert!(refuse_nats_without_feature(None).is_ok());
        assert!(refuse_nats_without_feature(Some("".into())).is_ok());
    }
}
