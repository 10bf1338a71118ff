//! Watching a name: up and down events for every instance of an actor, with
//! the reason for each down (Erlang's monitors, for a whole name).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use rustc_hash::FxHashMap;

use crate::api::events::Subscription;
use crate::api::lifecycle::{lifecycle, ExitReason, Lifecycle};
use crate::api::remote::RemoteActor;
use crate::node::directory::declared_forks;

/// A change of one instance of a watched actor.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Watched {
    /// The instance is up: ready to take requests.
    Up {
        /// Its path, e.g. `myapp/webserverApi/2`.
        path: String,
        /// Its fork number, for a worker with forks.
        fork: Option<u32>,
        /// Its process id.
        pid: u32,
        /// Which start of this path it is.
        incarnation: u64,
    },
    /// The instance is gone.
    Down {
        /// Its path.
        path: String,
        /// Its fork number, for a worker with forks.
        fork: Option<u32>,
        /// The process id it had.
        pid: u32,
        /// The incarnation that went down.
        incarnation: u64,
        /// How it ended: a normal exit, an exit code, a signal. A fork whose
        /// spawn died abruptly was killed with it: `Signal(9)`.
        reason: ExitReason,
    },
}

/// Watches every instance of `A`: first an [`Up`](Watched::Up) for each
/// instance up now, then every change as it happens, including restarts
/// (down, then up as a new incarnation). Works in any process, and whenever
/// it is created: one created before the cluster starts (in `main`, before
/// [`Cluster::run`](crate::Cluster::run)) sees every instance come up.
///
/// ```no_run
/// # async fn example() {
/// # use evilcluster::prelude::*;
/// # #[derive(Default)] struct Api;
/// # impl Actor for Api { type Context = Context<Self>; }
/// # impl RemoteActor for Api { const NAME: &'static str = "api"; type Messages = evilcluster::messages![]; }
/// use evilcluster::Watched;
/// use futures_util::StreamExt;
///
/// let mut api = evilcluster::watch::<Api>();
/// while let Some(change) = api.next().await {
///     if let Watched::Down { path, reason, .. } = change {
///         eprintln!("{path} went down: {reason}");
///     }
/// }
/// # }
/// ```
pub fn watch<A: RemoteActor>() -> Watch {
    let events = lifecycle();
    let mut watch = Watch {
        actor: A::NAME,
        forks: declared_forks(A::NAME),
        events,
        up: FxHashMap::default(),
        queue: VecDeque::new(),
    };
    for member in crate::members() {
        if member.actor() == Some(A::NAME) {
            watch.came_up(member.path.into(), member.pid, member.incarnation);
        }
    }
    #[cfg(feature = "nats")]
    for (node, members) in crate::remote_members() {
        for member in members {
            if member.actor() == Some(A::NAME) && member.role != crate::RoleKind::Master {
                watch.came_up(format!("{node}:{}", member.path), member.pid, member.incarnation);
            }
        }
    }
    watch
}

/// The stream returned by [`watch`].
pub struct Watch {
    actor: &'static str,
    /// How many forks the actor's worker declares; `None` until the
    /// cluster's declaration is known here (a watch made before the
    /// cluster started learns it from the first event).
    forks: Option<u32>,
    events: Subscription<Lifecycle>,
    /// Instances up now: path → (pid, incarnation).
    up: FxHashMap<String, (u32, u64)>,
    queue: VecDeque<Watched>,
}

impl Watch {
    /// The fork number if `path` is an instance of the watched actor:
    /// `Some(Some(k))` for fork k, `Some(None)` for a worker without forks.
    fn instance(&mut self, path: &str) -> Option<Option<u32>> {
        let mut parts = path.split('/').skip(1);
        if parts.next()? != self.actor {
            return None;
        }
        if path.contains(':') {
            // On another host (`node:path`), whatever this host declares.
            return match (parts.next(), parts.next()) {
                (None, _) => Some(None),
                (Some(fork), None) => fork.parse().ok().map(Some),
                _ => None,
            };
        }
        if self.forks.is_none() {
            self.forks = declared_forks(self.actor);
        }
        // Not declared (yet): nothing is an instance, rather than guessing.
        let forks = self.forks?;
        match (parts.next(), parts.next()) {
            (None, _) if forks == 0 => Some(None),
            (Some(fork), None) if forks > 0 => fork.parse().ok().map(Some),
            _ => None,
        }
    }

    fn came_up(&mut self, path: String, pid: u32, incarnation: u64) {
        let Some(fork) = self.instance(&path) else { return };
        if self.up.get(&path) == Some(&(pid, incarnation)) {
            return;
        }
        self.up.insert(path.clone(), (pid, incarnation));
        self.queue.push_back(Watched::Up {
            path,
            fork,
            pid,
            incarnation,
        });
    }

    fn went_down(&mut self, path: &str, incarnation: u64, reason: ExitReason) {
        if let Some(fork) = self.instance(path) {
            if self.up.get(path).is_some_and(|&(_, up)| up == incarnation) {
                let (pid, incarnation) = self.up.remove(path).expect("checked");
                self.queue.push_back(Watched::Down {
                    path: path.to_owned(),
                    fork,
                    pid,
                    incarnation,
                    reason,
                });
            }
            return;
        }
        // A spawn that died abruptly took its forks with it (they got
        // SIGKILL); a spawn stopping gracefully reported them itself.
        let prefix = format!("{path}/");
        let mut orphans: Vec<(String, (u32, u64))> = self
            .up
            .iter()
            .filter(|(fork, _)| fork.starts_with(&prefix))
            .map(|(path, up)| (path.clone(), *up))
            .collect();
        orphans.sort();
        for (fork_path, (pid, incarnation)) in orphans {
            self.up.remove(&fork_path);
            let fork = self.instance(&fork_path).flatten();
            self.queue.push_back(Watched::Down {
                fork,
                path: fork_path,
                pid,
                incarnation,
                reason: ExitReason::Signal(9),
            });
        }
    }

    fn apply(&mut self, event: Lifecycle) {
        match event {
            Lifecycle::Ready {
                path, pid, incarnation, ..
            } => self.came_up(path, pid, incarnation),
            Lifecycle::Exited {
                path,
                incarnation,
                reason,
                ..
            } => self.went_down(&path, incarnation, reason),
            _ => {}
        }
    }
}

impl Stream for Watch {
    type Item = Watched;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Watched>> {
        loop {
            if let Some(next) = self.queue.pop_front() {
                return Poll::Ready(Some(next));
            }
            match std::task::ready!(Pin::new(&mut self.events).poll_next(cx)) {
                Some(delivery) => self.apply(delivery.event),
                None => return Poll::Ready(None),
            }
        }
    }
}
