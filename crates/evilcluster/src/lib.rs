//! # evilcluster
//!
//! Monolithic clustering for Rust: one program, many OS processes, each
//! process an actix actor that any other process reaches by name, typed, as
//! if it were local.
//!
//! The program's `main` declares a tree of named workers. The master process
//! (the one you start) spawns them as copies of its own executable; a worker
//! may fork into several copies. Every spawned worker or fork hosts an actor,
//! or runs a task, and [`addr_of`] reaches any actor from anywhere.
//!
//! ```
//! use evilcluster::prelude::*;
//!
//! #[derive(Default)]
//! struct Counter(u64);
//! impl Actor for Counter {
//!     type Context = Context<Self>;
//! }
//!
//! #[derive(Message, Serialize, Deserialize)]
//! #[rtype(result = "u64")]
//! struct Add(u64);
//! evilcluster::remote_messages! { Add => "counter.add" }
//!
//! impl Handler<Add> for Counter {
//!     type Result = u64;
//!     fn handle(&mut self, Add(n): Add, _: &mut Context<Self>) -> u64 {
//!         self.0 += n;
//!         self.0
//!     }
//! }
//!
//! impl RemoteActor for Counter {
//!     const NAME: &'static str = "counter";
//!     type Messages = evilcluster::messages![Add];
//! }
//!
//! fn main() -> evilcluster::Result<()> {
//!     // The same code runs in the master and in the `counter` process; only
//!     // the master runs the closure.
//!     let total = Cluster::new("doc-example")
//!         .spawn(Worker::actor::<Counter>())
//!         .run_with(|_cluster| async {
//!             let counter = evilcluster::addr_of::<Counter>();
//!             counter.send(Add(2)).await?;
//!             counter.send(Add(3)).await
//!         })??;
//!     assert_eq!(total, 5);
//!     Ok(())
//! }
//! ```
//!
//! ## Processes
//! Children are this executable started again, with the user's arguments
//! untouched and `EVILCLUSTER_*` variables saying their role; query it with
//! [`role`], [`is_master`], [`is_spawn`], [`is_fork`], [`fork_number`]. A
//! child's standard input is its control pipe from its parent (so children
//! do not read the terminal). A child dies with its parent: on Linux by the
//! parent-death signal, everywhere when the control pipe or its connection
//! to the master closes.
//!
//! ## Supervision
//! The master supervises its spawns and each spawn its forks, as OTP
//! supervisors do: a [`Strategy`] (one-for-one, one-for-all, rest-for-one)
//! per supervisor, a [`Restart`] type (permanent, transient, temporary) and a
//! [`Backoff`] per worker, an intensity limit after which the supervisor
//! stops its children and fails upward ([`Error::GaveUp`]). Exit code 0 is a
//! normal exit; any other code or a signal is abnormal. Children stop
//! gracefully in reverse order (the actor's `stopping`/`stopped` run, replies
//! in flight are written), then are killed after their shutdown timeout.
//! [`lifecycle`] streams what happens, [`watch`] follows one actor's
//! instances, and [`restart_worker`] restarts a worker's forks one at a time.
//!
//! ## Transport
//! One local socket per hosting process (in a directory only the owner can
//! enter), one connection per pair of processes, multiplexed by request id;
//! length-prefixed MessagePack frames, described in [`evilcluster_wire`];
//! every connection opens with an HMAC challenge/response over the cluster
//! cookie. Messages from one process to one actor arrive in the order sent.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The layers, bottom up; imports only go down (ARCHITECTURE.md).
mod api; // 6. what users call
mod error;
#[cfg(unix)]
mod listener;
#[cfg(feature = "nats")]
mod nats; // beyond one machine: hosts joined through NATS (between node and api)
mod node; // 2. this process, its connections, the one internal request path
mod observe; // the control endpoint, live status, the tree
#[cfg(unix)]
mod output;
mod registry; // 3. who is where: the master's registry
mod runtime; // 5. the master's and a child's runtimes, signals
mod supervision; // 4. policy, engine, launching processes

/// Forks share a listener on Unix only.
#[cfg(not(unix))]
mod listener {
    use std::path::{Path, PathBuf};

    /// Always `None`: sharing a listener is Unix only.
    pub fn listener() -> Option<std::net::TcpListener> {
        None
    }
    pub(crate) struct Handoff {
        pub path: PathBuf,
    }
    pub(crate) struct Shared {
        pub address: String,
        pub handoff: Option<Handoff>,
    }
    pub(crate) fn share(address: &str, _: Option<&Path>, _: Option<PathBuf>) -> Result<Shared, crate::Error> {
        Err(crate::Error::Declaration(format!(
            "a worker listens on {address}: sharing a listener is Unix only"
        )))
    }
}

/// Children's output is relayed with a prefix on Unix only.
#[cfg(not(unix))]
mod output {
    /// Gives `inlet` back: whoever reads it must do so on its own thread.
    pub(crate) fn relay<I>(_prefix: &str, inlet: I) -> Result<(), (std::io::Error, I)> {
        Err((std::io::Error::other("output relay is Unix only"), inlet))
    }
    pub(crate) fn finish() {}
    pub(crate) fn for_child() -> (std::process::Stdio, std::process::Stdio) {
        (std::process::Stdio::inherit(), std::process::Stdio::inherit())
    }
}

pub use api::addr::{addr_of, addr_of_fork, RemoteAddr, RemoteRecipient, SendRequest};
pub use api::events::{publish, subscribe, Delivery, Event, PublishError, Subscription, To};
pub use api::lifecycle::{cluster_ready, lifecycle, ExitReason, Lifecycle, PANIC_EXIT_CODE};
pub use api::pipeline::SendAll;
pub use api::remote::{
    Contains, Here, MessageList, RemoteActor, RemoteMessage, Routed, Routes, There, DEFAULT_MAILBOX_CAPACITY,
};
pub use api::role::{fork_number, is_fork, is_last_fork, is_master, is_spawn, path, role, try_role, Role};
pub use api::shared_bytes::SharedBytes;
pub use api::watch::{watch, Watch, Watched};
pub use error::{Error, Result, SendError};
/// Derives [`RemoteMessage`](trait@RemoteMessage) with the message's stable
/// wire tag declared beside it: `#[derive(RemoteMessage)] #[remote(tag = "kv.get")]`
/// (add `idempotent` for a message safe to handle twice).
///
/// ```
/// use evilcluster::prelude::*;
///
/// #[derive(Message, RemoteMessage, Serialize, Deserialize)]
/// #[rtype(result = "Option<String>")]
/// #[remote(tag = "datastore.get", idempotent)]
/// struct Get(String);
///
/// assert_eq!(<Get as evilcluster::RemoteMessage>::TAG, "datastore.get");
/// assert!(<Get as evilcluster::RemoteMessage>::IDEMPOTENT);
/// ```
///
/// A message without its tag does not compile:
///
/// ```compile_fail
/// use evilcluster::prelude::*;
///
/// #[derive(Message, RemoteMessage, Serialize, Deserialize)]
/// #[rtype(result = "()")]
/// struct Untagged;
/// ```
pub use evilcluster_macros::RemoteMessage;
pub use evilcluster_wire::control::{ProcessState, RoleKind};
pub use listener::listener;
#[cfg(feature = "nats")]
pub use nats::{nodes, NatsOptions, NODE_ENV, URL_ENV};
pub use node::directory::{Hosting, Member, Name};
pub use observe::control::restart_worker;
pub use runtime::{shutdown_signal, Cluster, ClusterHandle, RunningCluster};
pub use supervision::policy::{AutoShutdown, Backoff, Intensity, Restart, Strategy};
pub use supervision::worker::{options, options_of, TaskResult, Worker};

/// The README's tour, compiled as a doc test so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeTour;

/// The wire protocol crate, re-exported for tools that speak it directly.
pub use evilcluster_wire as wire;

/// The live processes of the cluster, as this process's directory knows them
/// (empty outside a running cluster).
pub fn members() -> Vec<Member> {
    node::current().map(|node| node.directory.members()).unwrap_or_default()
}

/// The live processes of the other hosts of the cluster, by node name
/// (empty without NATS): what their masters' last heartbeats said.
#[cfg(feature = "nats")]
pub fn remote_members() -> Vec<(String, Vec<Member>)> {
    nats::remote_members()
}

/// Everything a typical evilcluster program needs, actix's actor API included.
pub mod prelude {
    pub use crate::{
        addr_of, addr_of_fork, AutoShutdown, Backoff, Cluster, Delivery, Event, RemoteActor, RemoteAddr, RemoteMessage,
        RemoteRecipient, Restart, Role, Routes, SendError, Strategy, To, Worker,
    };
    pub use actix::{
        Actor, ActorContext, AsyncContext, Context, Handler, Message, MessageResult, ResponseFuture, StreamHandler,
    };
    pub use serde::{Deserialize, Serialize};
}
