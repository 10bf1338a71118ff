//! The control protocol: what a tool such as the `evilcluster` command
//! asks a running cluster's master, and how it finds it.
//!
//! A master writes two files into [`discovery_dir`]: `<cluster>.endpoint`
//! (line 1: the master's socket path, line 2: its pid) and
//! `<cluster>.cookie` (the cluster cookie, hex, mode 0600). A tool connects
//! to that socket, runs the ordinary [`handshake`](crate::handshake) with
//! the cookie, and sends [`Request`](crate::Request)s to the
//! [`CONTROL`] service with the master's incarnation (from the handshake).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::tree::{render_tree, tree_lines, TreeLine};

/// The service every master hosts for tools.
pub const CONTROL: &str = "evilcluster.control";
/// Asks for a [`Status`]; the payload is MessagePack nil (`0xc0`).
pub const STATUS_TAG: &str = "control.status";
/// Asks the master to stop the cluster cleanly, as SIGTERM does; the
/// payload is MessagePack nil, the reply is nil once the stop has begun.
pub const STOP_TAG: &str = "control.stop";
/// Asks for a rolling restart of one worker: its forks one at a time, each
/// ready again before the next stops (or its one process). The payload is
/// the worker's name (a MessagePack string); the reply, once done, is a
/// `Result<u32, String>`: how many processes were restarted, or why not.
pub const RESTART_TAG: &str = "control.restart";

/// Where masters of user `uid` advertise themselves:
/// `$XDG_RUNTIME_DIR/evilcluster` when that variable names an absolute
/// path (a directory only this user can enter, cleared at logout), else
/// `<temp dir>/evilcluster-<uid>`. Either way the directory must be
/// private ([`open_private_dir`]) before anything in it is trusted.
pub fn discovery_dir(uid: u32) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(runtime) if runtime.is_absolute() => runtime.join("evilcluster"),
        _ => std::env::temp_dir().join(format!("evilcluster-{uid}")),
    }
}

/// The file a live master holds locked (`flock`, exclusive) for its whole
/// life: the proof that a cluster of that name runs. It holds the pid.
pub fn lock_file(dir: &Path, cluster: &str) -> PathBuf {
    dir.join(format!("{cluster}.lock"))
}

/// The directory holding a cluster's sockets, next to its discovery files.
pub fn run_dir(dir: &Path, cluster: &str) -> PathBuf {
    dir.join(format!("{cluster}.run"))
}

/// Why a discovery directory or file is not trusted. Another user (or a
/// careless program) could have planted or changed it, so nothing in it is
/// read, and nothing is written through it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Untrusted {
    /// A symbolic link where a directory or file of this user belongs.
    #[error("{path} is a symbolic link; remove it (a private directory of this user belongs there)")]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// Something else than the directory or regular file expected.
    #[error("{path} is not a {expected}; remove it")]
    WrongType {
        /// The path.
        path: PathBuf,
        /// `directory` or `regular file`.
        expected: &'static str,
    },
    /// It belongs to another user.
    #[error("{path} belongs to uid {owner}, not to this user (uid {uid}); remove it, or point TMPDIR or XDG_RUNTIME_DIR elsewhere")]
    Owner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's user.
        uid: u32,
    },
    /// Other users may read or change it.
    #[error("{path} has mode {mode:04o}, so other users may read or change it; it must have no group or other permissions (chmod 700 for the directory, 600 for a file)")]
    Mode {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It could not be opened or examined.
    #[error("cannot open {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

impl Untrusted {
    /// Whether it simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Untrusted::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Opens the private directory `path` of user `uid` (creating it with mode
/// 0700 first, when `create`: private from its first instant), and checks
/// what was opened — not the path, which could change meanwhile: a real
/// directory (a symbolic link is not followed), owned by `uid`, with no
/// group or other permissions.
pub fn open_private_dir(path: &Path, uid: u32, create: bool) -> Result<std::os::fd::OwnedFd, Untrusted> {
    use rustix::fs::{Mode, OFlags};
    let io = |error: rustix::io::Errno| Untrusted::Io {
        path: path.to_owned(),
        source: error.into(),
    };
    if create {
        match rustix::fs::mkdir(path, Mode::RWXU) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(error) => return Err(io(error)),
        }
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(dir) => dir,
        // Linux says ENOTDIR for a link with O_DIRECTORY|O_NOFOLLOW.
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
            let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            return Err(match link {
                true => Untrusted::Symlink { path: path.to_owned() },
                false => Untrusted::WrongType {
                    path: path.to_owned(),
                    expected: "directory",
                },
            });
        }
        Err(error) => return Err(io(error)),
    };
    check_private(&dir, path, uid, rustix::fs::FileType::Directory)?;
    Ok(dir)
}

/// Opens the regular file `name` of the private directory `dir` (opened
/// with [`open_private_dir`]) for reading, without following a symbolic
/// link, and checks it as [`open_private_dir`] checks a directory.
pub fn open_private_file(
    dir: impl std::os::fd::AsFd,
    dir_path: &Path,
    name: &str,
    uid: u32,
) -> Result<std::fs::File, Untrusted> {
    use rustix::fs::{Mode, OFlags};
    let path = dir_path.join(name);
    // NONBLOCK: a FIFO planted there must not hang the reader.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let file = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(file) => file,
        Err(rustix::io::Errno::LOOP) => return Err(Untrusted::Symlink { path }),
        Err(error) => {
            return Err(Untrusted::Io {
                path,
                source: error.into(),
            })
        }
    };
    check_private(&file, &path, uid, rustix::fs::FileType::RegularFile)?;
    Ok(std::fs::File::from(file))
}

/// Checks an open directory or file: its type, owner and permissions.
pub fn check_private(
    fd: impl std::os::fd::AsFd,
    path: &Path,
    uid: u32,
    expected: rustix::fs::FileType,
) -> Result<(), Untrusted> {
    let stat = rustix::fs::fstat(fd).map_err(|error| Untrusted::Io {
        path: path.to_owned(),
        source: error.into(),
    })?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != expected {
        return Err(Untrusted::WrongType {
            path: path.to_owned(),
            expected: match expected {
                rustix::fs::FileType::Directory => "directory",
                _ => "regular file",
            },
        });
    }
    if stat.st_uid != uid {
        return Err(Untrusted::Owner {
            path: path.to_owned(),
            owner: stat.st_uid,
            uid,
        });
    }
    let mode = stat.st_mode & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Untrusted::Mode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The file holding a cluster's master socket path and pid.
pub fn endpoint_file(dir: &Path, cluster: &str) -> PathBuf {
    dir.join(format!("{cluster}.endpoint"))
}

/// The text of an endpoint file: the master's socket path, then its pid.
pub fn endpoint_text(socket: &str, pid: u32) -> String {
    format!("{socket}\n{pid}\n")
}

/// Parses an endpoint file: line 1 the socket path, line 2 the pid.
pub fn parse_endpoint(text: &str) -> Result<(PathBuf, u32), String> {
    let mut lines = text.lines();
    let socket = lines
        .next()
        .map(str::trim_end)
        .filter(|line| !line.is_empty())
        .ok_or("line 1 should be the master's socket path, but the file is empty")?;
    let pid_line = lines
        .next()
        .map(str::trim)
        .ok_or("line 2 should be the master's pid, but there is no line 2")?;
    let pid = pid_line
        .parse::<u32>()
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| format!("line 2 should be the master's pid, found {pid_line:?}"))?;
    Ok((PathBuf::from(socket), pid))
}

/// Whether process `pid` (an advertised master) runs. A zombie — exited,
/// not yet reaped by its parent — does not, though it still answers kill(0):
/// on Linux its state in `/proc` tells.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            return stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X");
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && Path::new("/proc/self/stat").exists() => {
            return false
        }
        Err(_) => {}
    }
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        // It exists, but belongs to someone else.
        Err(error) => error == rustix::io::Errno::PERM,
    }
}

/// The file holding a cluster's cookie, hex-encoded.
pub fn cookie_file(dir: &Path, cluster: &str) -> PathBuf {
    dir.join(format!("{cluster}.cookie"))
}

/// The live tree of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The cluster's name.
    pub cluster: String,
    /// Every declared process, in tree order: the master, then each worker
    /// in declaration order followed by its forks (a disabled worker is one
    /// entry, without forks).
    pub processes: Vec<ProcessStatus>,
}

/// What a process is in the tree. On the wire and in JSON: `"master"`,
/// `"spawn"` or `"fork"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleKind {
    /// The process that was started; it supervises the spawns.
    Master,
    /// A worker's process, started by the master.
    Spawn,
    /// A copy of a worker, started by its spawn.
    Fork,
}

impl RoleKind {
    /// `master`, `spawn` or `fork`.
    pub fn as_str(self) -> &'static str {
        match self {
            RoleKind::Master => "master",
            RoleKind::Spawn => "spawn",
            RoleKind::Fork => "fork",
        }
    }
}

impl std::str::FromStr for RoleKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "master" => Ok(RoleKind::Master),
            "spawn" => Ok(RoleKind::Spawn),
            "fork" => Ok(RoleKind::Fork),
            other => Err(format!("not a role: {other:?} (master, spawn or fork)")),
        }
    }
}

impl std::fmt::Display for RoleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a declared process runs. On the wire and in JSON: `"up"`,
/// `"down"` or `"disabled"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    /// Running and registered.
    Up,
    /// Declared, not running now (starting, restarting or stopped).
    Down,
    /// Declared with `disable(true)`: never started.
    Disabled,
}

impl ProcessState {
    /// `up`, `down` or `disabled`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Up => "up",
            ProcessState::Down => "down",
            ProcessState::Disabled => "disabled",
        }
    }
}

impl std::str::FromStr for ProcessState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "up" => Ok(ProcessState::Up),
            "down" => Ok(ProcessState::Down),
            "disabled" => Ok(ProcessState::Disabled),
            other => Err(format!("not a process state: {other:?} (up, down or disabled)")),
        }
    }
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One process of the tree, as `evilcluster ps` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessStatus {
    /// Path in the tree, e.g. `myapp/webserverApi/2`.
    pub path: String,
    /// What it is in the tree.
    pub role: RoleKind,
    /// Whether it runs.
    pub state: ProcessState,
    /// Operating-system process id, while up.
    pub pid: Option<u32>,
    /// The `NAME` of the actor it hosts (or would host, while down).
    pub actor: Option<String>,
    /// The hosted actor's Rust type, for display.
    pub actor_type: Option<String>,
    /// Milliseconds since the process started, while up.
    pub uptime_ms: Option<u64>,
    /// How many times this path was restarted.
    pub restarts: u32,
    /// Requests its actor handled for other processes (the runtime's own
    /// traffic — registry, status — is not counted here or below).
    pub messages_in: u64,
    /// Requests this process sent to actors (`send` and `do_send`).
    pub messages_out: u64,
    /// Requests for its actor that it refused or whose handling failed.
    pub errors: u64,
    /// Resident memory in bytes, where the platform tells.
    pub rss_bytes: Option<u64>,
    /// Proportional set size in bytes (shared pages counted once across the
    /// processes that share them), where the platform tells. Summed over a
    /// tree it is what the tree costs.
    #[serde(default)]
    pub pss_bytes: Option<u64>,
    /// Handling time of sampled requests, by power-of-two microsecond
    /// buckets: `latency_us[i]` counts requests that took less than `2^i` µs
    /// (the last bucket: the rest).
    pub latency_us: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_files_round_trip_and_bad_ones_are_refused() {
        let (socket, pid) = parse_endpoint(&endpoint_text("/tmp/x/master.sock", 1234)).unwrap();
        assert_eq!(socket, PathBuf::from("/tmp/x/master.sock"));
        assert_eq!(pid, 1234);
        assert!(parse_endpoint("").is_err());
        assert!(parse_endpoint("/tmp/x.sock\n").is_err());
        assert!(parse_endpoint("/tmp/x.sock\nabc\n").is_err());
        assert!(parse_endpoint("/tmp/x.sock\n0\n").is_err());
    }

    #[test]
    fn this_process_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
