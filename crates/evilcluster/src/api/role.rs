use evilcluster_wire::control::RoleKind;
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::Error;

/// The environment variables a parent sets for a child. One prefix, so a
/// user's own variables never collide with them.
pub(crate) mod env {
    pub const ROLE: &str = "EVILCLUSTER_ROLE";
    pub const WORKER: &str = "EVILCLUSTER_WORKER";
    pub const FORK: &str = "EVILCLUSTER_FORK";
    pub const FORKS: &str = "EVILCLUSTER_FORKS";
    pub const PATH: &str = "EVILCLUSTER_PATH";
    pub const INCARNATION: &str = "EVILCLUSTER_INCARNATION";
    pub const MASTER: &str = "EVILCLUSTER_MASTER";
    pub const SOCKET_DIR: &str = "EVILCLUSTER_SOCKET_DIR";
    pub const PARENT: &str = "EVILCLUSTER_PARENT";
    pub const RESTARTS: &str = "EVILCLUSTER_RESTARTS";
    pub const LISTENER: &str = "EVILCLUSTER_LISTENER";
    pub const ALL: [&str; 11] = [
        ROLE,
        WORKER,
        FORK,
        FORKS,
        PATH,
        INCARNATION,
        MASTER,
        SOCKET_DIR,
        PARENT,
        RESTARTS,
        LISTENER,
    ];
}

/// What this process is in the cluster's tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// The process the user started; it spawns and supervises the workers.
    Master,
    /// A worker spawned by the master.
    Spawn {
        /// The worker's name.
        name: String,
    },
    /// One of the forks of a spawned worker.
    Fork {
        /// The worker's name.
        name: String,
        /// This fork's number, from 1 to `of`.
        number: u32,
        /// How many forks the worker has.
        of: u32,
    },
}

impl Role {
    /// The worker's name, or `None` in the master.
    pub fn worker(&self) -> Option<&str> {
        match self {
            Role::Master => None,
            Role::Spawn { name } | Role::Fork { name, .. } => Some(name),
        }
    }

    /// What this process is in the tree, without the worker's name.
    pub fn kind(&self) -> RoleKind {
        match self {
            Role::Master => RoleKind::Master,
            Role::Spawn { .. } => RoleKind::Spawn,
            Role::Fork { .. } => RoleKind::Fork,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Master => f.write_str("master"),
            Role::Spawn { name } => write!(f, "spawn `{name}`"),
            Role::Fork { name, number, of } => write!(f, "fork {number}/{of} of `{name}`"),
        }
    }
}

/// Everything a child learns from its parent's environment.
#[derive(Debug, Clone)]
pub(crate) struct ChildEnv {
    pub role: Role,
    pub path: String,
    pub incarnation: u64,
    pub master_socket: String,
    pub socket_dir: PathBuf,
    pub parent: u32,
    /// How many times this path was restarted before this process.
    pub restarts: u32,
    /// Where to fetch the worker's shared listener (a fork of a listening worker).
    pub listener: Option<PathBuf>,
}

fn var(name: &str) -> Result<String, Error> {
    std::env::var(name).map_err(|_| Error::Environment(format!("{name} is missing or not UTF-8")))
}

fn number<T: std::str::FromStr>(name: &str) -> Result<T, Error> {
    let text = var(name)?;
    text.parse()
        .map_err(|_| Error::Environment(format!("{name}={text:?} is not a number")))
}

/// What the parent's environment said, read once (see [`ChildEnv::from_env`]).
static CHILD_ENV: OnceLock<Result<Option<ChildEnv>, String>> = OnceLock::new();

fn cached() -> &'static Result<Option<ChildEnv>, String> {
    CHILD_ENV.get_or_init(|| {
        let read = ChildEnv::read().map_err(|error| match error {
            Error::Environment(detail) => detail,
            other => other.to_string(),
        });
        remove_role_variables();
        read
    })
}

/// Removes the role variables once they are read: anything this process
/// starts (a shell, a helper, another evilcluster program) must not inherit
/// them and take itself for this worker. `remove_var` is safe in edition
/// 2021, but only sound while no other thread reads the environment: the
/// first read happens as `Cluster::run` begins, before the runtime starts
/// any thread (the master has none of these variables, so nothing is
/// removed there even when `Cluster::start` runs inside a live system).
fn remove_role_variables() {
    for name in env::ALL {
        if std::env::var_os(name).is_some() {
            std::env::remove_var(name);
        }
    }
}

impl ChildEnv {
    /// `Ok(None)` in the master (no role variable at all). Read from the
    /// environment on the first call, which also removes the variables;
    /// later calls return the same answer.
    pub fn from_env() -> Result<Option<ChildEnv>, Error> {
        cached().clone().map_err(Error::Environment)
    }

    fn read() -> Result<Option<ChildEnv>, Error> {
        let Ok(kind) = std::env::var(env::ROLE) else {
            return Ok(None);
        };
        let name = var(env::WORKER)?;
        let role = match kind.as_str() {
            "spawn" => Role::Spawn { name },
            "fork" => Role::Fork {
                name,
                number: number(env::FORK)?,
                of: number(env::FORKS)?,
            },
            other => return Err(Error::Environment(format!("{}={other:?} is not a role", env::ROLE))),
        };
        Ok(Some(ChildEnv {
            role,
            path: var(env::PATH)?,
            incarnation: number(env::INCARNATION)?,
            master_socket: var(env::MASTER)?,
            socket_dir: PathBuf::from(var(env::SOCKET_DIR)?),
            parent: number(env::PARENT)?,
            restarts: number(env::RESTARTS)?,
            listener: std::env::var_os(env::LISTENER).map(PathBuf::from),
        }))
    }
}

/// This process's role, read once from the environment the parent set.
///
/// A process whose `EVILCLUSTER_*` environment is malformed (one not
/// started by evilcluster) is answered [`Role::Master`] here, and
/// [`Cluster::run`](crate::Cluster::run) refuses to run in it with
/// [`Error::Environment`]; [`try_role`] tells the two apart.
pub fn role() -> &'static Role {
    static MASTER: Role = Role::Master;
    try_role().unwrap_or(&MASTER)
}

/// This process's role, or why its `EVILCLUSTER_*` environment is malformed.
pub fn try_role() -> Result<&'static Role, Error> {
    match cached() {
        Ok(None) => {
            static MASTER: Role = Role::Master;
            Ok(&MASTER)
        }
        Ok(Some(child)) => Ok(&child.role),
        Err(detail) => Err(Error::Environment(detail.clone())),
    }
}

/// This process's path in the tree (`myapp/webserverApi/2`) in a spawn or a
/// fork; `None` in the master, whose path is the cluster's name.
pub fn path() -> Option<&'static str> {
    match cached() {
        Ok(Some(child)) => Some(&child.path),
        _ => None,
    }
}

/// `true` in the process the user started (the original's `isMain`).
pub fn is_master() -> bool {
    matches!(role(), Role::Master)
}

/// `true` in a worker spawned by the master (the original's `isSpawn`).
pub fn is_spawn() -> bool {
    matches!(role(), Role::Spawn { .. })
}

/// `true` in a fork of a spawned worker (the original's `isFork`).
pub fn is_fork() -> bool {
    matches!(role(), Role::Fork { .. })
}

/// `true` in the last fork of a worker (fork `of` of `of`), e.g. to do
/// something once per worker after its other forks started (forks start in
/// number order).
pub fn is_last_fork() -> bool {
    fork_number().is_some_and(|(number, of)| number == of)
}

/// This fork's number (1-based) and the fork count, or `None` outside a fork.
pub fn fork_number() -> Option<(u32, u32)> {
    match role() {
        Role::Fork { number, of, .. } => Some((*number, *of)),
        _ => None,
    }
}
