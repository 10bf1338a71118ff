//! Supervision: starting children in order, restarting them by strategy,
//! restart type, intensity and backoff, and stopping them in reverse.
//!
//! The master supervises its spawns and each spawn its forks, with the same
//! code: a [`Supervisor`] task owns its children's processes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use evilcluster_wire::Cookie;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::api::events::{publish, To};
use crate::api::lifecycle::{ExitReason, Lifecycle};
use crate::node::Node;
use crate::supervision::policy::{AutoShutdown, Backoff, Intensity, Restart, RestartWindow, Strategy};
use crate::supervision::process::{self, ChildProcess, Launch};
use crate::{Error, Role};

/// One child of a supervisor, as declared.
pub(crate) struct ChildSpec {
    pub role: Role,
    pub path: String,
    pub restart: Restart,
    pub backoff: Backoff,
    pub start_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Whether its ending for good counts for the supervisor's [`AutoShutdown`].
    pub significant: bool,
    /// Its own restart limit: past it, this child stays down while its
    /// siblings go on (and the supervisor does not give up because of it).
    pub max_restarts: Option<Intensity>,
}

/// Everything a supervisor needs to run its children.
pub(crate) struct Plan {
    /// The supervisor's own path.
    pub path: String,
    pub strategy: Strategy,
    pub intensity: Intensity,
    pub auto_shutdown: AutoShutdown,
    pub children: Vec<ChildSpec>,
    pub master_socket: String,
    pub socket_dir: PathBuf,
    pub cookie: Cookie,
    /// Where children fetch their worker's shared listener.
    pub listener: Option<PathBuf>,
    /// The children are replicas (a worker's forks): those due start
    /// together, each waited for in parallel, and a shutdown stops them all
    /// at once. Otherwise (the master's spawns) each starts only once the
    /// one before it is ready, and they stop last first.
    pub replicas: bool,
    /// Until this turns true, children are launched (their processes boot
    /// and join) but none is let go: a spawn's forks wait for the spawn's
    /// own turn ([`Gate`](crate::supervision::process::Gate)). None: open.
    pub gate: Option<watch::Receiver<bool>>,
}

/// Why a supervisor gave up.
#[derive(Debug, Clone)]
pub(crate) struct GaveUp {
    pub child: String,
    pub intensity: Intensity,
}

#[derive(Debug, Clone)]
enum Phase {
    Starting,
    Running,
    Failed(GaveUp),
    /// Ended by itself: its significant children ended ([`AutoShutdown`]).
    Finished,
    Stopped,
}

/// What a supervisor can be asked to do.
enum Command {
    /// Stop every child, last first, and end.
    Shutdown(oneshot::Sender<()>),
    /// Restart every running child (or only the one at `path`), one at a
    /// time in declaration order, each ready before the next stops.
    Restart {
        path: Option<String>,
        reply: oneshot::Sender<Result<u32, String>>,
    },
}

/// Asks a supervisor for rolling restarts; cheap to clone.
#[derive(Clone)]
pub(crate) struct Restarter(mpsc::UnboundedSender<Command>);

impl Restarter {
    /// Restarts every running child (or the one at `path`) one at a time;
    /// returns how many were restarted.
    pub async fn restart(&self, path: Option<String>) -> Result<u32, String> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Command::Restart { path, reply })
            .map_err(|_| "the supervisor has stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "the supervisor stopped during the restart".to_owned())?
    }
}

/// Controls a running supervisor task.
pub(crate) struct SupervisorHandle {
    path: String,
    commands: mpsc::UnboundedSender<Command>,
    phase: watch::Receiver<Phase>,
}

impl SupervisorHandle {
    /// Resolves once every child has been started (each ready before the
    /// next), or with the supervisor's failure.
    pub async fn started(&self) -> Result<(), Error> {
        let mut phase = self.phase.clone();
        let reached = phase
            .wait_for(|p| !matches!(p, Phase::Starting))
            .await
            .map(|p| p.clone());
        match reached {
            Ok(Phase::Failed(gave_up)) => Err(self.error(gave_up)),
            _ => Ok(()),
        }
    }

    /// Resolves when the supervisor gives up (never, if it does not).
    pub async fn gave_up(&self) -> Error {
        let mut phase = self.phase.clone();
        let failed = phase
            .wait_for(|p| matches!(p, Phase::Failed(_)))
            .await
            .map(|p| p.clone());
        match failed {
            Ok(Phase::Failed(gave_up)) => self.error(gave_up),
            _ => std::future::pending().await,
        }
    }

    fn error(&self, gave_up: GaveUp) -> Error {
        Error::GaveUp {
            supervisor: self.path.clone(),
            child: gave_up.child,
            max_restarts: gave_up.intensity.max_restarts,
            within: gave_up.intensity.within,
        }
    }

    /// Resolves when the supervisor ends by itself because its significant
    /// children ended ([`AutoShutdown`]); every child has stopped by then.
    /// Never resolves otherwise.
    pub async fn finished(&self) {
        let mut phase = self.phase.clone();
        if phase.wait_for(|p| matches!(p, Phase::Finished)).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Asks for rolling restarts of this supervisor's children.
    pub fn restarter(&self) -> Restarter {
        Restarter(self.commands.clone())
    }

    /// Stops every child in reverse order and waits until they have exited.
    pub async fn shutdown(&self) {
        let (done, stopped) = oneshot::channel();
        if self.commands.send(Command::Shutdown(done)).is_ok() {
            let _ = stopped.await;
        }
        // A supervisor that had given up has stopped already.
        let mut phase = self.phase.clone();
        let _ = phase
            .wait_for(|p| matches!(p, Phase::Stopped | Phase::Failed(_) | Phase::Finished))
            .await;
    }
}

/// Starts a supervisor task for `plan` on the current arbiter.
pub(crate) fn supervise(node: Arc<Node>, plan: Plan) -> SupervisorHandle {
    let (commands, command_requests) = mpsc::unbounded_channel();
    let (phase_tx, phase) = watch::channel(Phase::Starting);
    let (exits_tx, exits) = mpsc::unbounded_channel();
    let handle = SupervisorHandle {
        path: plan.path.clone(),
        commands,
        phase,
    };
    let now = Instant::now();
    let supervisor = Supervisor {
        node,
        slots: plan
            .children
            .iter()
            .map(|_| Slot {
                state: State::Pending { at: now },
                restarts: 0,
                delay: None,
                window: RestartWindow::default(),
            })
            .collect(),
        plan,
        restarts: RestartWindow::default(),
        exits_tx,
        exits,
        next_generation: 0,
        phase: phase_tx,
    };
    actix_rt::spawn(supervisor.run(command_requests));
    handle
}

struct Supervisor {
    node: Arc<Node>,
    plan: Plan,
    slots: Vec<Slot>,
    /// When recent restarts happened, for the intensity limit.
    restarts: RestartWindow,
    exits_tx: mpsc::UnboundedSender<ChildExit>,
    exits: mpsc::UnboundedReceiver<ChildExit>,
    next_generation: u64,
    phase: watch::Sender<Phase>,
}

struct Slot {
    state: State,
    restarts: u32,
    /// The last backoff delay, if the child has not run stably since.
    delay: Option<Duration>,
    /// This child's own recent restarts, for its own limit.
    window: RestartWindow,
}

enum State {
    /// To be started once `at` has passed (and every earlier child is up).
    Pending {
        at: Instant,
    },
    Running(Running),
    /// Exited and not to be restarted, or stopped for good.
    Down,
}

struct Running {
    child: Supervised,
    generation: u64,
    since: Instant,
}

/// A child's exit, as its watcher reports it.
struct ChildExit {
    index: usize,
    generation: u64,
    pid: u32,
    incarnation: u64,
    reason: ExitReason,
}

enum Rolled {
    Done(Result<u32, String>),
    GaveUp,
    ShutdownRequested(Option<oneshot::Sender<()>>),
}

enum Started {
    Ready,
    Failed {
        pid: u32,
        incarnation: u64,
        reason: ExitReason,
    },
    ShutdownRequested(Option<oneshot::Sender<()>>),
}

/// How waiting for released children to be ready ended.
enum Waited {
    /// Each is ready (and running), or failed to start (listed here).
    Done(Vec<FailedStart>),
    ShutdownRequested(Option<oneshot::Sender<()>>),
}

/// How starting several children together ended.
enum StartedAll {
    /// Each child is ready, or failed to start (listed in index order).
    Done(Vec<FailedStart>),
    ShutdownRequested(Option<oneshot::Sender<()>>),
}

struct FailedStart {
    index: usize,
    pid: u32,
    incarnation: u64,
    reason: ExitReason,
}

/// A child launched and not known to be ready yet.
struct Launched {
    index: usize,
    pid: u32,
    incarnation: u64,
    restarts: u32,
    generation: u64,
    deadline: Instant,
    child: Supervised,
    /// Let go ([`Supervisor::release`]).
    released: bool,
    /// It had exited before it was let go: whatever its exit code, it did
    /// not start.
    exited_unreleased: bool,
}

impl Supervisor {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            let mut wake_at = None;
            let pending = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(index, slot)| match slot.state {
                    State::Pending { at } => Some((index, at)),
                    _ => None,
                });
            let pending: Vec<(usize, Instant)> = pending.collect();
            if !pending.is_empty() {
                let now = Instant::now();
                // Replicas start together. Spawns start one at a time, in
                // order: those due from the first waiting one on are
                // launched together, and let go one by one.
                let due: Vec<usize> = if self.plan.replicas {
                    pending.iter().filter(|(_, at)| *at <= now).map(|(i, _)| *i).collect()
                } else {
                    pending
                        .iter()
                        .take_while(|(_, at)| *at <= now)
                        .map(|(i, _)| *i)
                        .collect()
                };
                if !due.is_empty() {
                    match self.start_all(&due, &mut commands).await {
                        StartedAll::Done(failures) => {
                            for failed in failures {
                                if !self
                                    .exited(failed.index, failed.pid, failed.incarnation, failed.reason, None)
                                    .await
                                {
                                    return;
                                }
                            }
                        }
                        StartedAll::ShutdownRequested(reply) => return self.stop(reply).await,
                    }
                    continue;
                }
                wake_at = if self.plan.replicas {
                    pending.iter().map(|(_, at)| *at).min()
                } else {
                    pending.first().map(|(_, at)| *at)
                };
            } else if matches!(*self.phase.borrow(), Phase::Starting) {
                self.phase.send_replace(Phase::Running);
            }
            tokio::select! {
                Some(exit) = self.exits.recv() => {
                    let since = match &self.slots[exit.index].state {
                        State::Running(running) if running.generation == exit.generation => running.since,
                        // Stopped by this supervisor, or a failed start: handled there.
                        _ => continue,
                    };
                    if !self.exited(exit.index, exit.pid, exit.incarnation, exit.reason, Some(since)).await {
                        return;
                    }
                }
                () = sleep_until(wake_at) => {}
                command = commands.recv() => match command {
                    None => return self.stop(None).await,
                    Some(Command::Shutdown(reply)) => return self.stop(Some(reply)).await,
                    Some(Command::Restart { path, reply }) => {
                        match self.roll(path, &mut commands).await {
                            Rolled::Done(outcome) => {
                                let _ = reply.send(outcome);
                            }
                            Rolled::GaveUp => {
                                let _ = reply.send(Err("the supervisor has ended (it gave up, or auto-shutdown)".into()));
                                return;
                            }
                            Rolled::ShutdownRequested(shutdown) => {
                                let _ = reply.send(Err("the supervisor is shutting down".into()));
                                return self.stop(shutdown).await;
                            }
                        }
                    }
                },
            }
        }
    }

    /// Starts child `index` and waits until it is ready, exits, or its start
    /// timeout passes.
    async fn start(&mut self, index: usize, commands: &mut mpsc::UnboundedReceiver<Command>) -> Started {
        match self.start_all(&[index], commands).await {
            StartedAll::ShutdownRequested(reply) => Started::ShutdownRequested(reply),
            StartedAll::Done(mut failures) => match failures.pop() {
                None => Started::Ready,
                Some(failed) => Started::Failed {
                    pid: failed.pid,
                    incarnation: failed.incarnation,
                    reason: failed.reason,
                },
            },
        }
    }

    /// Starts the children at `indexes` and waits until each is ready, has
    /// exited, or has passed its start timeout. Every process is launched at
    /// once, so their start-ups (loading, joining the master) overlap; each
    /// is then let go ([`Gate`](crate::supervision::process::Gate)) once
    /// the plan's gate is open: replicas all together, spawns one at a time
    /// in order, each once the one before it is ready. After a spawn that
    /// failed to start, the later ones are stopped unreleased: they start
    /// again after it.
    async fn start_all(&mut self, indexes: &[usize], commands: &mut mpsc::UnboundedReceiver<Command>) -> StartedAll {
        let mut failures = Vec::new();
        let mut launched = Vec::with_capacity(indexes.len());
        for &index in indexes {
            match self.launch(index).await {
                Ok(mut child) => {
                    // The first spawn's turn is now: it goes on booting
                    // while the others are launched (each launch holds this
                    // thread until the new process has exec'd).
                    if launched.is_empty() && !self.plan.replicas && self.gate_open() {
                        self.release(&mut child).await;
                    }
                    launched.push(child);
                }
                Err(failed) => {
                    failures.push(failed);
                    // The ones after it wait for it to be started again.
                    if !self.plan.replicas {
                        break;
                    }
                }
            }
        }
        if let Some(reply) = self.wait_for_gate(commands).await {
            self.discard(launched).await;
            return StartedAll::ShutdownRequested(reply);
        }
        if self.plan.replicas {
            for l in &mut launched {
                self.release(l).await;
            }
            return match self.wait_ready(launched, commands).await {
                Waited::Done(done) => {
                    failures.extend(done);
                    failures.sort_by_key(|f| f.index);
                    StartedAll::Done(failures)
                }
                Waited::ShutdownRequested(reply) => StartedAll::ShutdownRequested(reply),
            };
        }
        // A launch failure is reported only once the spawns before it are
        // ready: it is their turn first.
        let launch_failure = failures.pop();
        let mut queue = launched.into_iter();
        while let Some(mut next) = queue.next() {
            if !next.released {
                self.release(&mut next).await;
            }
            match self.wait_ready(vec![next], commands).await {
                Waited::Done(done) if done.is_empty() => {}
                Waited::Done(done) => {
                    self.discard(queue.collect()).await;
                    return StartedAll::Done(done);
                }
                Waited::ShutdownRequested(reply) => {
                    self.discard(queue.collect()).await;
                    return StartedAll::ShutdownRequested(reply);
                }
            }
        }
        StartedAll::Done(launch_failure.into_iter().collect())
    }

    /// Whether the plan's gate is open now.
    fn gate_open(&self) -> bool {
        self.plan.gate.as_ref().is_none_or(|gate| *gate.borrow())
    }

    /// Waits until the plan's gate is open. Some(reply): a shutdown was
    /// asked meanwhile.
    async fn wait_for_gate(
        &self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Option<Option<oneshot::Sender<()>>> {
        let mut gate = self.plan.gate.clone()?;
        let opened = async move {
            // Its sender gone unopened: the spawn is ending; a shutdown follows.
            if gate.wait_for(|open| *open).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let mut opened = std::pin::pin!(opened);
        loop {
            tokio::select! {
                () = &mut opened => return None,
                command = commands.recv() => match command {
                    Some(Command::Restart { reply, .. }) => {
                        let _ = reply.send(Err("a child is starting; try again once the tree is up".into()));
                    }
                    Some(Command::Shutdown(reply)) => return Some(Some(reply)),
                    None => return Some(None),
                },
            }
        }
    }

    /// Lets a launched child go: it starts its actor or task now, and must
    /// be ready within its start timeout.
    async fn release(&self, l: &mut Launched) {
        let spec = &self.plan.children[l.index];
        l.released = true;
        l.exited_unreleased = l.child.has_exited();
        l.child.release();
        l.deadline = Instant::now() + spec.start_timeout;
        info!(path = %spec.path, pid = l.pid, "started");
        self.announce(match spec.role {
            Role::Fork { .. } => Lifecycle::Forked {
                path: spec.path.clone(),
                pid: l.pid,
                incarnation: l.incarnation,
            },
            _ => Lifecycle::Spawned {
                path: spec.path.clone(),
                pid: l.pid,
                incarnation: l.incarnation,
            },
        })
        .await;
    }

    /// Stops children launched but never let go, without a word: for the
    /// tree they never started (their slots still wait to start).
    async fn discard(&self, launched: Vec<Launched>) {
        futures_util::future::join_all(launched.iter().map(|l| l.child.stop())).await;
    }

    /// Waits until each released child is ready, has exited, or has passed
    /// its start timeout; those ready run from now on. One look at the
    /// directory per change serves every child waited for.
    async fn wait_ready(&mut self, launched: Vec<Launched>, commands: &mut mpsc::UnboundedReceiver<Command>) -> Waited {
        let mut failures = Vec::new();
        // None: still waiting; Some(None): ready; Some(Some(why)): failed.
        let mut outcome: Vec<Option<Option<ExitReason>>> = vec![None; launched.len()];
        {
            let waiting: rustc_hash::FxHashMap<&str, usize> = launched
                .iter()
                .enumerate()
                .map(|(at, l)| (self.plan.children[l.index].path.as_str(), at))
                .collect();
            let mut changes = self.node.directory.changes();
            let mut exits: futures_util::stream::FuturesUnordered<_> = launched
                .iter()
                .enumerate()
                .map(|(at, l)| async move { (at, l.child.exited().await) })
                .collect();
            loop {
                changes.mark_unchanged();
                self.node.directory.with_members(|members| {
                    for member in members {
                        if let Some(&at) = waiting.get(member.path.as_str()) {
                            if outcome[at].is_none() && member.incarnation == launched[at].incarnation {
                                outcome[at] = Some(None);
                            }
                        }
                    }
                });
                let now = Instant::now();
                for (at, l) in launched.iter().enumerate() {
                    if outcome[at].is_none() && l.deadline <= now {
                        l.child.stop().await;
                        let timeout = self.plan.children[l.index].start_timeout;
                        outcome[at] = Some(Some(ExitReason::StartFailed(format!("not ready within {timeout:?}"))));
                    }
                }
                let next_deadline = launched
                    .iter()
                    .zip(&outcome)
                    .filter(|(_, o)| o.is_none())
                    .map(|(l, _)| l.deadline)
                    .min();
                let Some(next_deadline) = next_deadline else { break };
                tokio::select! {
                    // The directory lives as long as the node: never an error.
                    _ = changes.changed() => {}
                    () = tokio::time::sleep_until(next_deadline) => {}
                    Some((at, reason)) = futures_util::StreamExt::next(&mut exits) => {
                        if outcome[at].is_none() {
                            // A child that finished its work and exited 0
                            // before its registration reached this supervisor
                            // (a short task) did start: its exit is handled as
                            // a normal one, so a Transient child is not restarted.
                            outcome[at] = Some(if reason == ExitReason::Normal && !launched[at].exited_unreleased {
                                None
                            } else {
                                Some(ExitReason::StartFailed(format!("exited before it was ready ({reason})")))
                            });
                        }
                    }
                    command = commands.recv() => {
                        let reply = match command {
                            Some(Command::Restart { reply, .. }) => {
                                let _ = reply.send(Err("a child is starting; try again once the tree is up".into()));
                                continue;
                            }
                            Some(Command::Shutdown(reply)) => Some(reply),
                            None => None,
                        };
                        drop(exits);
                        // Whatever was launched is stopped with the rest.
                        for l in launched {
                            self.slots[l.index].state = State::Running(Running {
                                child: l.child,
                                generation: l.generation,
                                since: Instant::now(),
                            });
                        }
                        return Waited::ShutdownRequested(reply);
                    }
                }
            }
        }
        for (l, outcome) in launched.into_iter().zip(outcome) {
            let path = self.plan.children[l.index].path.clone();
            if let Some(Some(reason)) = outcome {
                warn!(%path, pid = l.pid, "{reason}");
                failures.push(FailedStart {
                    index: l.index,
                    pid: l.pid,
                    incarnation: l.incarnation,
                    reason,
                });
                continue;
            }
            self.slots[l.index].state = State::Running(Running {
                child: l.child,
                generation: l.generation,
                since: Instant::now(),
            });
            self.announce(Lifecycle::Ready {
                path: path.clone(),
                pid: l.pid,
                incarnation: l.incarnation,
                restarts: l.restarts,
            })
            .await;
            if l.restarts > 0 {
                info!(%path, pid = l.pid, restarts = l.restarts, "restarted");
                self.announce(Lifecycle::Restarted {
                    path,
                    pid: l.pid,
                    incarnation: l.incarnation,
                    restarts: l.restarts,
                })
                .await;
            }
        }
        Waited::Done(failures)
    }

    /// Launches child `index` and starts watching it: its process boots and
    /// joins, then waits at its gate until [`release`](Self::release).
    async fn launch(&mut self, index: usize) -> Result<Launched, FailedStart> {
        let spec = &self.plan.children[index];
        let incarnation = crate::supervision::process::random_incarnation();
        let restarts = self.slots[index].restarts;
        let launched = process::launch(Launch {
            role: &spec.role,
            path: &spec.path,
            incarnation,
            restarts,
            master_socket: &self.plan.master_socket,
            socket_dir: &self.plan.socket_dir,
            cookie: &self.plan.cookie,
            listener: self.plan.listener.as_deref(),
        })
        .await;
        let child = match launched {
            Ok(child) => child,
            Err(error) => {
                error!(path = %spec.path, "{error}");
                return Err(FailedStart {
                    index,
                    pid: 0,
                    incarnation,
                    reason: ExitReason::StartFailed(error.to_string()),
                });
            }
        };
        let pid = child.pid;
        debug!(path = %spec.path, pid, "launched");
        // Set again when it is let go.
        let deadline = Instant::now() + spec.start_timeout;
        let generation = self.next_generation;
        self.next_generation += 1;
        let child = watch_child(child, spec.shutdown_timeout, self.plan.socket_dir.clone(), {
            let exits = self.exits_tx.clone();
            move |reason| {
                let _ = exits.send(ChildExit {
                    index,
                    generation,
                    pid,
                    incarnation,
                    reason,
                });
            }
        });
        Ok(Launched {
            index,
            pid,
            incarnation,
            restarts,
            generation,
            deadline,
            child,
            released: false,
            exited_unreleased: false,
        })
    }

    /// Child `index` exited (or failed to start) on its own. Returns false
    /// once the supervisor has ended: it gave up, or its auto-shutdown
    /// stopped it.
    async fn exited(
        &mut self,
        index: usize,
        pid: u32,
        incarnation: u64,
        reason: ExitReason,
        running_since: Option<Instant>,
    ) -> bool {
        let spec = &self.plan.children[index];
        let path = spec.path.clone();
        match &reason {
            ExitReason::Normal => info!(%path, pid, "exited normally"),
            reason => warn!(%path, pid, "exited with error: {reason}"),
        }
        self.slots[index].state = State::Down;
        let restart = spec.restart;
        let backoff = spec.backoff;
        self.announce(Lifecycle::Exited {
            path: path.clone(),
            pid,
            incarnation,
            reason: reason.clone(),
        })
        .await;
        if !restart.applies_to(&reason) {
            info!(%path, "not restarted ({restart:?} child)");
            self.announce_if_all_exited().await;
            let significant = spec.significant;
            let all_significant_down = self
                .plan
                .children
                .iter()
                .zip(&self.slots)
                .all(|(child, slot)| !child.significant || matches!(slot.state, State::Down));
            if self.plan.auto_shutdown.ends(significant, all_significant_down) {
                info!(
                    supervisor = %self.plan.path,
                    "{path} ended and auto-shutdown is {:?}: stopping every child",
                    self.plan.auto_shutdown
                );
                self.stop_children().await;
                self.phase.send_replace(Phase::Finished);
                return false;
            }
            return true;
        }

        let now = Instant::now();
        if let Some(limit) = spec.max_restarts {
            if self.slots[index].window.exceeded(now, limit) {
                warn!(
                    %path,
                    "{path} exited ({reason}) more than {} times within {:?}: it stays down; its siblings go on",
                    limit.max_restarts,
                    limit.within
                );
                self.announce(Lifecycle::StaysDown {
                    path,
                    max_restarts: limit.max_restarts,
                    within: limit.within,
                })
                .await;
                self.announce_if_all_exited().await;
                return true;
            }
        }
        let intensity = self.plan.intensity;
        // A child with a limit of its own is bounded by it: the supervisor
        // never gives up on its account.
        if spec.max_restarts.is_none() && self.restarts.exceeded(now, intensity) {
            error!(
                supervisor = %self.plan.path,
                child = %path,
                "{path} exited ({reason}) more than {} times within {:?}: giving up, stopping every child",
                intensity.max_restarts,
                intensity.within
            );
            self.stop_children().await;
            self.announce(Lifecycle::GaveUp {
                supervisor: self.plan.path.clone(),
                child: path.clone(),
                max_restarts: intensity.max_restarts,
                within: intensity.within,
            })
            .await;
            self.phase
                .send_replace(Phase::Failed(GaveUp { child: path, intensity }));
            return false;
        }

        let slot = &mut self.slots[index];
        let delay = backoff.after(slot.delay, running_since.map(|since| now.duration_since(since)));
        slot.delay = Some(delay);
        let at = now + delay;

        let affected = self.plan.strategy.affected(index, self.slots.len());
        // Siblings stop in reverse order; each restarts unless temporary.
        for sibling in affected.rev().filter(|&i| i != index) {
            let why = format!("{:?}, after {path} exited", self.plan.strategy);
            if self.stop_child(sibling, &why).await && self.plan.children[sibling].restart != Restart::Temporary {
                self.schedule(sibling, at, delay).await;
            }
        }
        info!(%path, ?delay, "restarting");
        self.schedule(index, at, delay).await;
        true
    }

    /// A rolling restart: each running child (or only `path`) is stopped
    /// gracefully and started again, ready before the next one stops.
    async fn roll(&mut self, path: Option<String>, commands: &mut mpsc::UnboundedReceiver<Command>) -> Rolled {
        let targets: Vec<usize> = (0..self.slots.len())
            .filter(|&i| path.as_deref().is_none_or(|p| self.plan.children[i].path == p))
            .filter(|&i| matches!(self.slots[i].state, State::Running(_)))
            .collect();
        if targets.is_empty() {
            return Rolled::Done(Err(match path {
                Some(path) => format!("{path} is not running"),
                None => format!("{} has no running child", self.plan.path),
            }));
        }
        let mut restarted = 0;
        for index in targets {
            if !self.stop_child(index, "rolling restart").await {
                continue; // It exited meanwhile; the restart logic has it.
            }
            let child_path = self.plan.children[index].path.clone();
            self.schedule(index, Instant::now(), Duration::ZERO).await;
            match self.start(index, commands).await {
                Started::Ready => restarted += 1,
                Started::Failed {
                    pid,
                    incarnation,
                    reason,
                } => {
                    let why = format!("{child_path} did not come back: {reason}");
                    if !self.exited(index, pid, incarnation, reason, None).await {
                        return Rolled::GaveUp;
                    }
                    return Rolled::Done(Err(why));
                }
                Started::ShutdownRequested(reply) => return Rolled::ShutdownRequested(reply),
            }
        }
        Rolled::Done(Ok(restarted))
    }

    async fn schedule(&mut self, index: usize, at: Instant, delay: Duration) {
        let slot = &mut self.slots[index];
        slot.restarts += 1;
        slot.state = State::Pending { at };
        let event = Lifecycle::Restarting {
            path: self.plan.children[index].path.clone(),
            restarts: slot.restarts,
            delay,
        };
        self.announce(event).await;
    }

    /// Stops every running child, last declared first (replicas all at
    /// once, each within its own shutdown timeout); nothing restarts.
    async fn stop_children(&mut self) {
        if self.plan.replicas {
            let running: Vec<(usize, Running)> = (0..self.slots.len())
                .rev()
                .filter_map(
                    |index| match std::mem::replace(&mut self.slots[index].state, State::Down) {
                        State::Running(running) => Some((index, running)),
                        _ => None,
                    },
                )
                .collect();
            let reasons = futures_util::future::join_all(running.iter().map(|(_, running)| async move {
                running.child.stop().await;
                running.child.exited().await
            }))
            .await;
            for ((index, running), reason) in running.into_iter().zip(reasons) {
                self.stopped(index, &running, reason, "stopping every child").await;
            }
        }
        for index in (0..self.slots.len()).rev() {
            self.stop_child(index, "stopping every child").await;
            self.slots[index].state = State::Down;
        }
        self.announce_if_all_exited().await;
    }

    /// Stops child `index` if it runs (gracefully, then killed after its
    /// shutdown timeout) and announces its exit; it is left down. Returns
    /// whether it was running (a child waiting to start stays so).
    async fn stop_child(&mut self, index: usize, why: &str) -> bool {
        if !matches!(self.slots[index].state, State::Running(_)) {
            return false;
        }
        let State::Running(running) = std::mem::replace(&mut self.slots[index].state, State::Down) else {
            unreachable!("checked above")
        };
        running.child.stop().await;
        let reason = running.child.exited().await;
        self.stopped(index, &running, reason, why).await;
        true
    }

    /// Logs and announces that a child this supervisor stopped has exited.
    async fn stopped(&self, index: usize, running: &Running, reason: ExitReason, why: &str) {
        let path = self.plan.children[index].path.clone();
        let pid = running.child.pid;
        match &reason {
            ExitReason::Normal => info!(%path, pid, "stopped ({why})"),
            reason => warn!(%path, pid, "stopped ({why}): {reason}"),
        }
        self.announce(Lifecycle::Exited {
            path,
            pid,
            incarnation: running.child.incarnation,
            reason,
        })
        .await;
    }

    async fn stop(mut self, reply: Option<oneshot::Sender<()>>) {
        self.stop_children().await;
        self.phase.send_replace(Phase::Stopped);
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
    }

    async fn announce_if_all_exited(&self) {
        if self.slots.iter().all(|s| matches!(s.state, State::Down)) {
            self.announce(Lifecycle::AllExited {
                supervisor: self.plan.path.clone(),
            })
            .await;
        }
    }

    async fn announce(&self, event: Lifecycle) {
        // Nobody listening (or the master gone) is not the supervisor's problem.
        let _ = publish(To::All, &event).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A running child, watched by a task of its own.
struct Supervised {
    pid: u32,
    incarnation: u64,
    control: mpsc::UnboundedSender<Control>,
    exited: watch::Receiver<Option<ExitReason>>,
}

/// What a child's watcher is asked to do.
enum Control {
    /// Open the child's gate.
    Release,
    /// Stop the child, then answer.
    Stop(oneshot::Sender<()>),
}

impl Supervised {
    /// Lets the child start its actor or task (see [`Gate`](process::Gate)).
    fn release(&self) {
        let _ = self.control.send(Control::Release);
    }

    /// Whether the child has exited already.
    fn has_exited(&self) -> bool {
        self.exited.borrow().is_some()
    }

    /// Stops the child (graceful, then killed after its shutdown timeout)
    /// and waits for it.
    async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.control.send(Control::Stop(done)).is_ok() {
            let _ = stopped.await;
        }
    }

    /// Resolves once the child has exited, with how.
    async fn exited(&self) -> ExitReason {
        let mut exited = self.exited.clone();
        let exit = exited.wait_for(Option::is_some).await;
        match exit {
            Ok(exit) => exit.clone().expect("waited for Some"),
            Err(_) => ExitReason::StartFailed("its watcher ended".into()),
        }
    }
}

/// Watches `child` until it exits, or stops it when asked (or when the
/// handle is dropped); then reports how it ended to `on_exit`.
fn watch_child(
    mut child: ChildProcess,
    grace: Duration,
    socket_dir: PathBuf,
    on_exit: impl FnOnce(ExitReason) + 'static,
) -> Supervised {
    let (control, mut requests) = mpsc::unbounded_channel::<Control>();
    let (exit_tx, exited) = watch::channel(None);
    let supervised = Supervised {
        pid: child.pid,
        incarnation: child.incarnation,
        control,
        exited,
    };
    actix_rt::spawn(async move {
        let (status, requested) = loop {
            tokio::select! {
                status = child.wait() => break (status, None),
                request = requests.recv() => match request {
                    Some(Control::Release) => child.release().await,
                    Some(Control::Stop(done)) => break (child.stop(grace).await, Some(done)),
                    // The handle dropped: stopped as if asked.
                    None => break (child.stop(grace).await, None),
                },
            }
        };
        // What the child said about its end (a panic message, an error),
        // read and removed whatever the status, so none is left behind.
        let last_words = crate::api::lifecycle::take_last_words(&socket_dir, child.pid);
        let reason = ExitReason::from_status(status).with_last_words(last_words);
        exit_tx.send_replace(Some(reason.clone()));
        on_exit(reason);
        if let Some(done) = requested {
            let _ = done.send(());
        }
    });
    supervised
}
