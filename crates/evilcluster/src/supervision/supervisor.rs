//! Supervision: starting children in order, restarting them by strategy,
//! restart type, intensity and backoff, and stopping them in reverse.
//!
//! The master supervises its spawns and each spawn its forks, with the same
//! code: a [`Supervisor`] task owns its children's processes.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use evilcluster_wire::Cookie;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::api::events::{publish, To};
use crate::api::lifecycle::{ExitReason, Lifecycle};
use crate::node::directory::Member;
use crate::node::Node;
use crate::supervision::process::{self, ChildProcess, Launch};
use crate::{Error, Role};

/// Which children a supervisor restarts when one of them is to be restarted
/// (OTP's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Only the child that exited.
    #[default]
    OneForOne,
    /// Every child: the others are stopped (in reverse order), then all are
    /// started again in declaration order.
    OneForAll,
    /// The child that exited and every child declared after it: those are
    /// stopped (in reverse order), then started again in declaration order.
    RestForOne,
}

impl Strategy {
    /// Which children (by declaration index) are restarted when child
    /// `index` of `len` is to be restarted: the child itself and, by
    /// strategy, its siblings. Pure, so the policy is unit tested apart
    /// from the processes.
    pub(crate) fn affected(self, index: usize, len: usize) -> std::ops::Range<usize> {
        match self {
            Strategy::OneForOne => index..index + 1,
            Strategy::OneForAll => 0..len,
            Strategy::RestForOne => index..len,
        }
    }
}

/// When a supervisor ends by itself, normally, because its *significant*
/// children have ended (OTP's `auto_shutdown`).
///
/// A significant child ends for good when its restart type says it is not
/// restarted: a [`Restart::Transient`] child after exit code 0, a
/// [`Restart::Temporary`] child after any exit. A [`Restart::Permanent`]
/// child is always restarted, so it cannot be significant (the declaration
/// is refused).
///
/// - For a spawn's forks ([`Worker::fork_auto_shutdown`](crate::Worker::fork_auto_shutdown)):
///   the forks are the significant children; when the spawn's supervisor
///   ends, the spawn stops its other forks and exits with code 0.
/// - For the master ([`Cluster::auto_shutdown`](crate::Cluster::auto_shutdown)):
///   spawns marked [`Worker::significant`](crate::Worker::significant); the
///   master stops the rest of the tree and [`Cluster::run`](crate::Cluster::run)
///   returns `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoShutdown {
    /// Never: the supervisor runs until it is stopped or gives up, even
    /// with no child left running (OTP's default).
    #[default]
    Never,
    /// As soon as any significant child has ended for good.
    AnySignificant,
    /// Once every significant child has ended for good.
    AllSignificant,
}

impl AutoShutdown {
    /// Whether the supervisor ends now. `ended_significant`: the child that
    /// just exited is significant and is not restarted; `all_significant_down`:
    /// no significant child is running or waiting to restart any more.
    pub(crate) fn ends(self, ended_significant: bool, all_significant_down: bool) -> bool {
        match self {
            AutoShutdown::Never => false,
            AutoShutdown::AnySignificant => ended_significant,
            AutoShutdown::AllSignificant => ended_significant && all_significant_down,
        }
    }
}

/// When a child is restarted after it exits (OTP's restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Restart {
    /// Always.
    #[default]
    Permanent,
    /// Only after an abnormal exit (non-zero code, a signal, a failed start).
    Transient,
    /// Never.
    Temporary,
}

impl Restart {
    /// Whether a child of this type is restarted after exiting for `reason`.
    pub fn applies_to(self, reason: &ExitReason) -> bool {
        match self {
            Restart::Permanent => true,
            Restart::Transient => !reason.is_normal(),
            Restart::Temporary => false,
        }
    }
}

/// The delay before each restart of a child: capped exponential, reset once
/// the child has run for a while (pm2's `exp_backoff_restart_delay`).
///
/// The first restart waits `initial`, each following one `factor` times
/// longer, never more than `max`. A child that ran `reset_after` or longer
/// before exiting starts over from `initial`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    factor: f64,
    reset_after: Duration,
}

impl Backoff {
    /// Starts at `initial`, grows 1.5 times per restart up to `max`, resets
    /// after 30 s of running.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            factor: 1.5,
            reset_after: Duration::from_secs(30),
        }
    }

    /// No delay: restart at once (OTP's behaviour).
    pub fn none() -> Self {
        Backoff::exponential(Duration::ZERO, Duration::ZERO)
    }

    /// Growth per restart (at least 1).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = if factor.is_finite() { factor.max(1.0) } else { 1.0 };
        self
    }

    /// How long a child must run before its next restart waits `initial` again.
    pub fn reset_after(mut self, stable: Duration) -> Self {
        self.reset_after = stable;
        self
    }

    /// The delay after `previous` (None: the first restart, or after a reset).
    pub fn next(&self, previous: Option<Duration>) -> Duration {
        match previous {
            None => self.initial,
            Some(previous) => previous.mul_f64(self.factor).clamp(self.initial, self.max),
        }
    }

    /// The delay before the next restart of a child whose last delay was
    /// `previous` and that ran for `ran_for` (None: it never became ready)
    /// before exiting: it starts over from `initial` once it ran stably.
    pub(crate) fn after(&self, previous: Option<Duration>, ran_for: Option<Duration>) -> Duration {
        let stable = ran_for.is_some_and(|ran| ran >= self.reset_after);
        self.next(previous.filter(|_| !stable))
    }
}

impl Default for Backoff {
    /// 100 ms, growing 1.5 times per restart up to 15 s, reset after 30 s of running.
    fn default() -> Self {
        Backoff::exponential(Duration::from_millis(100), Duration::from_secs(15))
    }
}

/// How many restarts a supervisor allows in a period before it gives up:
/// stops its children and fails upward (OTP's intensity and period).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    /// At most this many restarts...
    pub max_restarts: u32,
    /// ...within this period.
    pub within: Duration,
}

/// When recent restarts happened, to tell when a limit ([`Intensity`]) is
/// passed: more than `max_restarts` within any period of `within`.
#[derive(Debug, Default)]
pub(crate) struct RestartWindow(VecDeque<Instant>);

impl RestartWindow {
    /// Records a restart at `now` and says whether it makes more than
    /// `limit.max_restarts` restarts within `limit.within`.
    pub fn exceeded(&mut self, now: Instant, limit: Intensity) -> bool {
        self.0.push_back(now);
        while self.0.front().is_some_and(|&at| now.duration_since(at) > limit.within) {
            self.0.pop_front();
        }
        self.0.len() > limit.max_restarts as usize
    }
}

impl Default for Intensity {
    /// 10 restarts within 60 s.
    fn default() -> Self {
        Intensity {
            max_restarts: 10,
            within: Duration::from_secs(60),
        }
    }
}

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

impl Supervisor {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            let mut wake_at = None;
            if let Some(index) = self.slots.iter().position(|s| matches!(s.state, State::Pending { .. })) {
                let State::Pending { at } = self.slots[index].state else {
                    unreachable!()
                };
                if at <= Instant::now() {
                    match self.start(index, &mut commands).await {
                        Started::Ready => {}
                        Started::Failed {
                            pid,
                            incarnation,
                            reason,
                        } => {
                            if !self.exited(index, pid, incarnation, reason, None).await {
                                return;
                            }
                        }
                        Started::ShutdownRequested(reply) => return self.stop(reply).await,
                    }
                    continue;
                }
                wake_at = Some(at);
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
                return Started::Failed {
                    pid: 0,
                    incarnation,
                    reason: ExitReason::StartFailed(error.to_string()),
                };
            }
        };
        let pid = child.pid;
        info!(path = %spec.path, pid, "started");
        self.announce(match spec.role {
            Role::Fork { .. } => Lifecycle::Forked {
                path: spec.path.clone(),
                pid,
                incarnation,
            },
            _ => Lifecycle::Spawned {
                path: spec.path.clone(),
                pid,
                incarnation,
            },
        })
        .await;
        let generation = self.next_generation;
        self.next_generation += 1;
        let supervised = watch_child(child, spec.shutdown_timeout, self.plan.socket_dir.clone(), {
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
        let path = spec.path.clone();
        let is_it = |m: &Arc<Member>| m.path == path && m.incarnation == incarnation;
        let start_timeout = spec.start_timeout;
        let ready = self
            .node
            .directory
            .wait_for(start_timeout, |members| members.iter().any(is_it));
        let mut ready = std::pin::pin!(ready);
        let failure = loop {
            tokio::select! {
                ready = &mut ready => {
                    if ready {
                        break None;
                    }
                    supervised.stop().await;
                    break Some(ExitReason::StartFailed(format!("not ready within {start_timeout:?}")));
                }
                reason = supervised.exited() => {
                    // A child that finished its work and exited 0 before its
                    // registration reached this supervisor (a short task) did
                    // start: its exit is handled as a normal one, so a
                    // Transient child is not restarted.
                    if reason == ExitReason::Normal {
                        break None;
                    }
                    break Some(ExitReason::StartFailed(format!("exited before it was ready ({reason})")));
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
                    self.slots[index].state = State::Running(Running { child: supervised, generation, since: Instant::now() });
                    return Started::ShutdownRequested(reply);
                }
            }
        };
        if let Some(reason) = failure {
            warn!(path = %spec.path, pid, "{reason}");
            return Started::Failed {
                pid,
                incarnation,
                reason,
            };
        }
        self.slots[index].state = State::Running(Running {
            child: supervised,
            generation,
            since: Instant::now(),
        });
        let path = spec.path.clone();
        self.announce(Lifecycle::Ready {
            path: path.clone(),
            pid,
            incarnation,
            restarts,
        })
        .await;
        if restarts > 0 {
            info!(%path, pid, restarts, "restarted");
            self.announce(Lifecycle::Restarted {
                path,
                pid,
                incarnation,
                restarts,
            })
            .await;
        }
        Started::Ready
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

    /// Stops every running child, last declared first; nothing restarts.
    async fn stop_children(&mut self) {
        for index in (0..self.slots.len()).rev() {
            self.stop_child(index, "stopping every child").await;
            self.slots[index].state = State::Down;
        }
        self.announce_if_all_exited().await;
    }

    /// Stops child `index` if it runs (gracefully, then killed after its
    /// shutdown timeout) and announces its exit; it is left down. Returns
    /// whether it was running.
    async fn stop_child(&mut self, index: usize, why: &str) -> bool {
        let State::Running(running) = std::mem::replace(&mut self.slots[index].state, State::Down) else {
            return false;
        };
        let path = self.plan.children[index].path.clone();
        let pid = running.child.pid;
        running.child.stop().await;
        let reason = running.child.exited().await;
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
        true
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
    stop: mpsc::UnboundedSender<oneshot::Sender<()>>,
    exited: watch::Receiver<Option<ExitReason>>,
}

impl Supervised {
    /// Stops the child (graceful, then killed after its shutdown timeout)
    /// and waits for it.
    async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.stop.send(done).is_ok() {
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
    let (stop, mut stop_requests) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    let (exit_tx, exited) = watch::channel(None);
    let supervised = Supervised {
        pid: child.pid,
        incarnation: child.incarnation,
        stop,
        exited,
    };
    actix_rt::spawn(async move {
        let (status, requested) = tokio::select! {
            status = child.wait() => (status, None),
            request = stop_requests.recv() => (child.stop(grace).await, request),
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A small deterministic generator: the cases are the same every run.
    fn cases(seed: u64, count: usize) -> impl Iterator<Item = u64> {
        let mut state = seed;
        std::iter::repeat_with(move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        })
        .take(count)
    }

    #[test]
    fn backoff_grows_by_its_factor_up_to_its_cap() {
        let backoff = Backoff::exponential(100 * MS, 1000 * MS);
        let mut delay = None;
        let delays: Vec<u128> = (0..8)
            .map(|_| {
                let next = backoff.after(delay, None);
                delay = Some(next);
                next.as_millis()
            })
            .collect();
        assert_eq!(delays, [100, 150, 225, 337, 506, 759, 1000, 1000]);
        assert_eq!(Backoff::none().after(Some(5 * MS), None), Duration::ZERO);
    }

    #[test]
    fn backoff_starts_over_after_a_stable_run() {
        let backoff = Backoff::exponential(100 * MS, 15_000 * MS).reset_after(30_000 * MS);
        let grown = Some(2_000 * MS);
        assert_eq!(backoff.after(grown, Some(30_000 * MS)), 100 * MS);
        assert_eq!(backoff.after(grown, Some(29_999 * MS)), 3_000 * MS);
        // A failed start never ran: no reset.
        assert_eq!(backoff.after(grown, None), 3_000 * MS);
    }

    #[test]
    fn backoff_stays_between_initial_and_max_and_never_shrinks_while_failing() {
        for case in cases(0x5eed, 500) {
            let initial = Duration::from_millis(case % 500);
            let max = initial + Duration::from_millis((case >> 9) % 20_000);
            let factor = 1.05 + ((case >> 24) % 300) as f64 / 100.0;
            let backoff = Backoff::exponential(initial, max).factor(factor);
            let mut previous = None;
            for _ in 0..400 {
                let next = backoff.after(previous, Some(Duration::ZERO));
                assert!(initial <= next && next <= max, "{backoff:?}: {next:?}");
                if let Some(previous) = previous {
                    assert!(next >= previous, "{backoff:?}: {previous:?} then {next:?}");
                }
                previous = Some(next);
            }
            // From zero it cannot grow (zero times any factor is zero).
            if !initial.is_zero() {
                assert_eq!(previous, Some(max), "{backoff:?} reaches its cap");
            }
        }
    }

    #[test]
    fn the_intensity_window_allows_max_restarts_within_the_period_and_not_one_more() {
        let limit = Intensity {
            max_restarts: 3,
            within: 1000 * MS,
        };
        let start = Instant::now();
        let mut window = RestartWindow::default();
        let verdicts: Vec<bool> = [0, 100, 200, 300]
            .map(|ms| window.exceeded(start + ms * MS, limit))
            .to_vec();
        assert_eq!(verdicts, [false, false, false, true]);
        // Restarts older than the period no longer count.
        let mut window = RestartWindow::default();
        for ms in [0, 100, 200] {
            assert!(!window.exceeded(start + ms * MS, limit));
        }
        assert!(!window.exceeded(start + 1101 * MS, limit));
        // A period boundary: exactly `within` apart still counts.
        let mut window = RestartWindow::default();
        for ms in [0, 400, 800] {
            assert!(!window.exceeded(start + ms * MS, limit));
        }
        assert!(window.exceeded(start + 1000 * MS, limit));
    }

    #[test]
    fn the_intensity_window_agrees_with_counting_by_hand() {
        let start = Instant::now();
        for case in cases(0xfeed, 300) {
            let limit = Intensity {
                max_restarts: (case % 6) as u32,
                within: Duration::from_millis(50 + (case >> 3) % 500),
            };
            let mut window = RestartWindow::default();
            let mut at = 0u64;
            let mut times = Vec::new();
            for step in cases(case | 1, 30) {
                at += step % 120;
                times.push(at);
                let expected = times
                    .iter()
                    .filter(|&&t| Duration::from_millis(at - t) <= limit.within)
                    .count()
                    > limit.max_restarts as usize;
                assert_eq!(
                    window.exceeded(start + Duration::from_millis(at), limit),
                    expected,
                    "{limit:?} at {at} after {times:?}"
                );
                if expected {
                    // The supervisor gives up here; nothing follows.
                    break;
                }
            }
        }
    }

    #[test]
    fn each_strategy_restarts_the_children_it_says() {
        assert_eq!(Strategy::OneForOne.affected(1, 3), 1..2);
        assert_eq!(Strategy::OneForAll.affected(1, 3), 0..3);
        assert_eq!(Strategy::RestForOne.affected(1, 3), 1..3);
        for len in 1..8 {
            for index in 0..len {
                for strategy in [Strategy::OneForOne, Strategy::OneForAll, Strategy::RestForOne] {
                    let affected = strategy.affected(index, len);
                    // Always the child itself, never past the end, in order.
                    assert!(affected.contains(&index), "{strategy:?} {index}/{len}");
                    assert!(affected.end <= len);
                    let expected: Vec<usize> = (0..len)
                        .filter(|&i| match strategy {
                            Strategy::OneForOne => i == index,
                            Strategy::OneForAll => true,
                            Strategy::RestForOne => i >= index,
                        })
                        .collect();
                    assert_eq!(affected.collect::<Vec<_>>(), expected, "{strategy:?} {index}/{len}");
                }
            }
        }
    }

    #[test]
    fn restart_types_decide_by_the_exit() {
        let reasons = [
            ExitReason::Normal,
            ExitReason::Code(3),
            ExitReason::Signal(9),
            ExitReason::StartFailed("x".into()),
            ExitReason::Failed {
                code: 101,
                message: "panicked".into(),
            },
        ];
        for reason in &reasons {
            assert!(Restart::Permanent.applies_to(reason));
            assert_eq!(Restart::Transient.applies_to(reason), !reason.is_normal(), "{reason:?}");
            assert!(!Restart::Temporary.applies_to(reason));
        }
    }

    #[test]
    fn auto_shutdown_ends_the_supervisor_only_when_it_says() {
        for ended in [false, true] {
            for all_down in [false, true] {
                assert!(!AutoShutdown::Never.ends(ended, all_down));
                assert_eq!(AutoShutdown::AnySignificant.ends(ended, all_down), ended);
                assert_eq!(AutoShutdown::AllSignificant.ends(ended, all_down), ended && all_down);
            }
        }
    }
}
