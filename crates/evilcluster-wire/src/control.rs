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

/// Where masters of user `uid` advertise themselves: `<temp dir>/evilcluster-<uid>`.
pub fn discovery_dir(uid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("evilcluster-{uid}"))
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

/// One process of the tree, as `evilcluster ps` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessStatus {
    /// Path in the tree, e.g. `myapp/webserverApi/2`.
    pub path: String,
    /// `master`, `spawn` or `fork`.
    pub role: String,
    /// `up`, `down` (declared, not running) or `disabled`.
    pub state: String,
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
