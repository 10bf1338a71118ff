//! Declaring the workers of a cluster.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::fut::{wrap_future, ActorFutureExt};
use actix::AsyncContext;
use futures_util::future::LocalBoxFuture;
use tokio::sync::oneshot;

use crate::api::remote::{ActorInbox, RemoteActor};
use crate::node::service::Inbox;
use crate::node::Config;
use crate::supervision::policy::{AutoShutdown, Backoff, Intensity, Restart, Strategy};
use crate::supervision::supervisor::ChildSpec;
use crate::Role;

/// What a task worker's function returns.
pub type TaskResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub(crate) type Host = Box<dyn FnOnce() -> Hosted>;

/// A hosted actor, running.
pub(crate) struct Hosted {
    pub inbox: Arc<dyn Inbox>,
    /// Asks the actor to stop: it handles what its mailbox holds, then its
    /// `stopping` and `stopped` run (`stopping` may refuse).
    pub stop: Box<dyn FnOnce()>,
    /// Closes once the actor has stopped, for whatever reason.
    pub stopped: oneshot::Receiver<()>,
    /// Sent once the actor's `started` has run (closed unsent if it
    /// stopped there).
    pub started: oneshot::Receiver<()>,
}
pub(crate) type Task = Box<dyn FnOnce() -> LocalBoxFuture<'static, TaskResult>>;

pub(crate) enum Body {
    Actor {
        name: &'static str,
        type_name: &'static str,
        host: Host,
    },
    Task(Task),
}

/// One worker of the tree: a spawned process hosting an actor or running a
/// task, optionally forked into several copies.
///
/// The same `main` runs in every process, so the declaration (options
/// included) is built the same way everywhere; only the process whose role
/// it is runs the actor or the task.
pub struct Worker {
    pub(crate) name: String,
    pub(crate) forks: u32,
    pub(crate) disabled: bool,
    pub(crate) options: Option<Arc<dyn Any + Send + Sync>>,
    pub(crate) body: Body,
    pub(crate) supervision: Supervision,
    /// The TCP address its processes share, if any.
    pub(crate) listen: Option<String>,
}

/// How a worker's processes are supervised.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Supervision {
    pub restart: Restart,
    pub backoff: Backoff,
    /// Overrides of the cluster's defaults.
    pub start_timeout: Option<Duration>,
    pub shutdown_timeout: Option<Duration>,
    /// How the spawn supervises its forks.
    pub fork_strategy: Strategy,
    pub fork_intensity: Intensity,
    /// Whether the spawn is significant for the master's [`AutoShutdown`].
    pub significant: bool,
    /// When the spawn ends by itself as its forks end; the forks are its
    /// significant children unless this is `Never`.
    pub fork_auto_shutdown: AutoShutdown,
    /// Each fork's own restart limit.
    pub fork_max_restarts: Option<Intensity>,
}

impl Supervision {
    /// How one of the worker's processes (the spawn, or fork `k`) of a
    /// worker with `forks` forks is supervised.
    pub fn child(&self, role: Role, path: String, forks: u32, config: &Config) -> ChildSpec {
        let is_fork = matches!(role, Role::Fork { .. });
        ChildSpec {
            significant: if is_fork {
                self.fork_auto_shutdown != AutoShutdown::Never
            } else {
                self.significant
            },
            max_restarts: if is_fork { self.fork_max_restarts } else { None },
            shutdown_timeout: self.shutdown_budget(&role, forks, config),
            role,
            path,
            restart: self.restart,
            backoff: self.backoff,
            start_timeout: self.start_timeout.unwrap_or(config.start_timeout),
        }
    }

    /// How long each of the worker's processes may take to stop gracefully.
    pub fn shutdown_timeout(&self, config: &Config) -> Duration {
        self.shutdown_timeout.unwrap_or(config.shutdown_timeout)
    }

    /// How long the process in `role` of a worker with `forks` forks may
    /// take to stop before its parent kills it. Budgets nest, as OTP gives a
    /// supervisor `infinity`: a spawn with forks stops them (all at once on
    /// shutdown, one after another for a one-for-all or rest-for-one
    /// restart that may be under way), each within its own timeout, then
    /// itself, so its budget is the sum; killing it sooner could kill its
    /// forks mid-stop.
    pub fn shutdown_budget(&self, role: &Role, forks: u32, config: &Config) -> Duration {
        let own = self.shutdown_timeout(config);
        match role {
            Role::Spawn { .. } if forks > 0 => own.saturating_mul(forks.saturating_add(1)),
            _ => own,
        }
    }
}

impl Worker {
    /// A worker hosting `A`, built with `A::default()`, named `A::NAME`.
    pub fn actor<A: RemoteActor + Default>() -> Self {
        Self::actor_with(A::default)
    }

    /// A worker hosting `A`, built by `make` in the hosting process only.
    pub fn actor_with<A: RemoteActor>(make: impl FnOnce() -> A + 'static) -> Self {
        let host: Host = Box::new(move || {
            let (alive, stopped) = oneshot::channel::<()>();
            let (has_started, started) = oneshot::channel::<()>();
            let inbox = ActorInbox::<A>::new();
            let drain = inbox.drain();
            let stopper = inbox.clone();
            A::create(move |ctx| {
                ctx.set_mailbox_capacity(A::mailbox_capacity());
                // The context polls what it spawned only after `started`.
                ctx.spawn(wrap_future(async move {
                    let _ = has_started.send(());
                }));
                // Requests from other processes, handled in the actor's own
                // context, with `&mut self`. actix polls every item of a
                // context on each wake-up (once per request), so the drain
                // is the only lasting one: it carries `alive` (it never
                // ends, so `alive` is dropped with the context, after
                // `stopped` ran), and stop requests reach it through the
                // inbox.
                ctx.spawn(drain.map(move |(), _, _| drop(alive)));
                make()
            });
            // Asked to stop, the actor first handles the requests its inbox
            // already holds (no new ones come: the process left the
            // directory and refuses them), then stops.
            let stop = Box::new(move || stopper.stop_when_drained());
            Hosted {
                inbox,
                stop,
                stopped,
                started,
            }
        });
        Worker {
            name: A::NAME.to_owned(),
            forks: 0,
            disabled: false,
            options: None,
            supervision: Supervision::default(),
            listen: None,
            body: Body::Actor {
                name: A::NAME,
                type_name: short_type_name::<A>(),
                host,
            },
        }
    }

    /// A worker that hosts no actor and runs `task` to completion; it may
    /// call any actor of the cluster. `Ok` ends the process normally, `Err`
    /// abnormally (exit code 1, the error in its
    /// [`ExitReason::Failed`](crate::ExitReason::Failed)).
    ///
    /// A task's restart type defaults to [`Restart::Transient`]: a task that
    /// returns `Ok` has done its work and is not started again; one that
    /// fails or panics is. Use [`restart`](Self::restart) for another.
    pub fn task<F, Fut>(name: impl Into<String>, task: F) -> Self
    where
        F: FnOnce() -> Fut + 'static,
        Fut: Future<Output = TaskResult> + 'static,
    {
        Worker {
            name: name.into(),
            forks: 0,
            disabled: false,
            options: None,
            supervision: Supervision {
                restart: Restart::Transient,
                ..Supervision::default()
            },
            listen: None,
            body: Body::Task(Box::new(move || Box::pin(task()))),
        }
    }

    /// Runs `n` forks of this worker instead of one process; the spawn
    /// supervises them, and sends to the worker's actor are balanced over
    /// them round robin. `0` (the default) means no forks.
    pub fn forks(mut self, n: u32) -> Self {
        self.forks = n;
        self
    }

    /// Declares the worker without starting it; its options stay readable.
    pub fn disable(mut self, disabled: bool) -> Self {
        self.disabled = disabled;
        self
    }

    /// Typed options for this worker, read in its processes with
    /// [`options`](crate::options) and anywhere with [`options_of`](crate::options_of).
    pub fn options<T: Any + Send + Sync>(mut self, options: T) -> Self {
        self.options = Some(Arc::new(options));
        self
    }

    /// When this worker's processes (the spawn, and each fork) are
    /// restarted after they exit. Default: [`Restart::Permanent`] for an
    /// actor, [`Restart::Transient`] for a [`task`](Self::task).
    pub fn restart(mut self, restart: Restart) -> Self {
        self.supervision.restart = restart;
        self
    }

    /// The delay before each restart of this worker's processes.
    /// Default: [`Backoff::default`] (100 ms, ×1.5 per restart, at most 15 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.supervision.backoff = backoff;
        self
    }

    /// How long each of this worker's processes may take to become ready
    /// (overrides [`Cluster::start_timeout`](crate::Cluster::start_timeout));
    /// running out counts as a failed start.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.supervision.start_timeout = Some(timeout);
        self
    }

    /// How long each of this worker's processes may take to stop gracefully
    /// before it is killed (overrides [`Cluster::shutdown_timeout`](crate::Cluster::shutdown_timeout)).
    /// The spawn of a worker with forks stops its forks one after another
    /// first, so its parent gives it the forks' timeouts plus its own.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.supervision.shutdown_timeout = Some(timeout);
        self
    }

    /// Which forks the spawn restarts when one of them is to be restarted.
    /// Default: [`Strategy::OneForOne`].
    pub fn fork_strategy(mut self, strategy: Strategy) -> Self {
        self.supervision.fork_strategy = strategy;
        self
    }

    /// How many fork restarts the spawn allows within `within` before it
    /// gives up: it stops its forks and exits abnormally, which its own
    /// supervisor (the master) sees as the spawn failing. Default: 10 in 60 s.
    pub fn fork_intensity(mut self, max_restarts: u32, within: Duration) -> Self {
        self.supervision.fork_intensity = Intensity { max_restarts, within };
        self
    }

    /// Marks the spawn significant for the master's
    /// [`Cluster::auto_shutdown`](crate::Cluster::auto_shutdown): its ending
    /// for good (exit code 0 for a [`Restart::Transient`] worker, any exit
    /// for a [`Restart::Temporary`] one) can end the whole tree. A
    /// significant worker must not be [`Restart::Permanent`] (refused at
    /// start, as OTP does). Default: `false`.
    pub fn significant(mut self, significant: bool) -> Self {
        self.supervision.significant = significant;
        self
    }

    /// When the spawn ends by itself as its forks end (OTP's
    /// `auto_shutdown`, with every fork significant): with
    /// [`AutoShutdown::AllSignificant`], once every fork has ended for good
    /// (exit code 0 for a [`Restart::Transient`] worker) the spawn exits
    /// with code 0 — forks that finish their work end their spawn. With
    /// [`AutoShutdown::AnySignificant`], the first fork that ends does, and
    /// the spawn stops the others. The forks must not be
    /// [`Restart::Permanent`] (refused at start). Default:
    /// [`AutoShutdown::Never`]: the spawn stays up with no fork left.
    ///
    /// A batch worker whose forks each do a share of the work and return:
    /// `Worker::task("batch", job).forks(4).fork_auto_shutdown(AutoShutdown::AllSignificant)`
    /// (tasks are `Transient` by default); add `.significant(true)` and
    /// `Cluster::auto_shutdown(AutoShutdown::AnySignificant)` for the whole
    /// tree to end with it.
    pub fn fork_auto_shutdown(mut self, auto_shutdown: AutoShutdown) -> Self {
        self.supervision.fork_auto_shutdown = auto_shutdown;
        self
    }

    /// Gives each fork a restart limit of its own: a fork that exits more
    /// than `max_restarts` times within `within` stays down, while its
    /// siblings go on serving (sends go to them) and the spawn does not
    /// give up because of it: a fork with its own limit has its restarts
    /// counted against that limit, not against the spawn's
    /// [`fork_intensity`](Self::fork_intensity). A
    /// [`Lifecycle::StaysDown`](crate::Lifecycle::StaysDown) event says so.
    /// Default: none, only the spawn-wide [`fork_intensity`](Self::fork_intensity).
    pub fn fork_max_restarts(mut self, max_restarts: u32, within: Duration) -> Self {
        self.supervision.fork_max_restarts = Some(Intensity { max_restarts, within });
        self
    }

    /// Shares one TCP listener bound to `address` (`"127.0.0.1:8080"`; port 0
    /// picks a free port) among the worker's processes: the spawn binds it
    /// once and hands it to each fork, restarted forks included, so all forks
    /// serve one port and connections are never refused while the spawn is
    /// up. Get it in a fork with [`listener`](crate::listener); the bound
    /// address is in the spawn's [`Hosting::listen`](crate::Hosting::listen).
    /// Unix only.
    pub fn listen(mut self, address: impl Into<String>) -> Self {
        self.listen = Some(address.into());
        self
    }

    /// The worker's name: its actor's `NAME`, or the task's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn actor_name(&self) -> Option<&'static str> {
        match &self.body {
            Body::Actor { name, .. } => Some(name),
            Body::Task(_) => None,
        }
    }

    pub(crate) fn type_name(&self) -> Option<&'static str> {
        match &self.body {
            Body::Actor { type_name, .. } => Some(type_name),
            Body::Task(_) => None,
        }
    }
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

type OptionsTable = HashMap<String, Arc<dyn Any + Send + Sync>>;

type Options = Arc<(Option<String>, OptionsTable)>;

/// The options of the cluster started last in this process: a later
/// cluster's replace an earlier one's (two clusters run one after the
/// other in one process, as two tests do, never see each other's).
static OPTIONS: std::sync::RwLock<Option<Options>> = std::sync::RwLock::new(None);

fn current_options() -> Option<Options> {
    OPTIONS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

pub(crate) fn publish_options(own: Option<&str>, workers: &[Worker]) {
    crate::node::directory::declare(workers.iter().map(|w| (w.name.clone(), w.forks)));
    let table = workers
        .iter()
        .filter_map(|w| Some((w.name.clone(), w.options.clone()?)))
        .collect();
    *OPTIONS.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new((own.map(str::to_owned), table)));
}

/// This worker's options, as declared with [`Worker::options`]; `None` in the
/// master, before the cluster runs, or if the type differs.
pub fn options<T: Any + Send + Sync>() -> Option<Arc<T>> {
    let options = current_options()?;
    options_of(options.0.as_deref()?)
}

/// The options of any declared worker, disabled ones included.
pub fn options_of<T: Any + Send + Sync>(worker: &str) -> Option<Arc<T>> {
    let options = current_options()?;
    options.1.get(worker)?.clone().downcast().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two clusters started one after the other in one process (two tests,
    /// say) each see their own declarations, never the first one's.
    #[test]
    fn a_second_cluster_in_the_same_process_sees_its_own_workers_and_options() {
        publish_options(
            None,
            &[Worker::task("first", || async { Ok(()) }).options(1u32).forks(2)],
        );
        assert_eq!(options_of::<u32>("first").as_deref(), Some(&1));
        assert_eq!(crate::node::directory::declared_forks("first"), Some(2));
        publish_options(
            Some("second"),
            &[Worker::task("second", || async { Ok(()) }).options(2u32)],
        );
        assert_eq!(options_of::<u32>("first"), None, "the first cluster's options are gone");
        assert_eq!(options::<u32>().as_deref(), Some(&2));
        assert_eq!(crate::node::directory::declared_forks("first"), None);
        assert_eq!(crate::node::directory::declared_forks("second"), Some(0));
    }

    #[test]
    fn a_task_is_transient_by_default_and_an_actor_permanent() {
        struct Idle;
        impl actix::Actor for Idle {
            type Context = actix::Context<Self>;
        }
        impl RemoteActor for Idle {
            const NAME: &'static str = "idle";
            type Messages = crate::messages![];
        }
        let task = Worker::task("t", || async { Ok(()) });
        assert_eq!(task.supervision.restart, Restart::Transient);
        let actor = Worker::actor_with(|| Idle);
        assert_eq!(actor.supervision.restart, Restart::Permanent);
        assert_eq!(task.restart(Restart::Permanent).supervision.restart, Restart::Permanent);
    }

    #[test]
    fn only_forks_carry_the_fork_limit_and_fork_significance() {
        let config = Config::default();
        let supervision = Supervision {
            significant: false,
            fork_auto_shutdown: AutoShutdown::AllSignificant,
            fork_max_restarts: Some(Intensity {
                max_restarts: 2,
                within: Duration::from_secs(1),
            }),
            ..Supervision::default()
        };
        let spawn = supervision.child(Role::Spawn { name: "w".into() }, "c/w".into(), 2, &config);
        assert!(!spawn.significant);
        assert_eq!(spawn.max_restarts, None);
        let fork = Role::Fork {
            name: "w".into(),
            number: 1,
            of: 2,
        };
        let fork = supervision.child(fork, "c/w/1".into(), 2, &config);
        assert!(fork.significant);
        assert_eq!(fork.max_restarts, supervision.fork_max_restarts);
    }

    #[test]
    fn a_spawn_with_forks_gets_their_shutdown_timeouts_plus_its_own() {
        let config = Config::default();
        let supervision = Supervision {
            shutdown_timeout: Some(Duration::from_secs(3)),
            ..Supervision::default()
        };
        let spawn = Role::Spawn { name: "w".into() };
        let fork = Role::Fork {
            name: "w".into(),
            number: 1,
            of: 2,
        };
        assert_eq!(supervision.shutdown_budget(&spawn, 2, &config), Duration::from_secs(9));
        assert_eq!(supervision.shutdown_budget(&spawn, 0, &config), Duration::from_secs(3));
        assert_eq!(supervision.shutdown_budget(&fork, 2, &config), Duration::from_secs(3));
        // The cluster's default applies when the worker sets none.
        assert_eq!(
            Supervision::default().shutdown_budget(&spawn, 1, &config),
            config.shutdown_timeout * 2
        );
        assert_eq!(
            supervision.child(spawn, "c/w".into(), 2, &config).shutdown_timeout,
            Duration::from_secs(9)
        );
    }
}
