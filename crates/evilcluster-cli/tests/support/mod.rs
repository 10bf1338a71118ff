//! Runs the `evilcluster` command (and, from the suite package, the
//! `cli-fixture` cluster) as real processes, each test in its own TMPDIR (so
//! the discovery files land there) with a cluster name of its own.
//!
//! Shared by this crate's tests and the suite's `tests/cli_cluster.rs`
//! (which includes it by path): the CLI crate builds without the runtime,
//! so the cluster fixture lives in the suite, which also builds the command
//! as `cli-under-test`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evilcluster_wire::control::{self, Status};

/// The `evilcluster` command: this crate's binary, or the suite's build of it.
fn cli_binary() -> &'static str {
    match option_env!("CARGO_BIN_EXE_evilcluster").or(option_env!("CARGO_BIN_EXE_cli-under-test")) {
        Some(binary) => binary,
        None => panic!("built without the `evilcluster` command"),
    }
}

/// Generous: CI is a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A finished run of the `evilcluster` command.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `evilcluster` command with `TMPDIR=tmp`; kills it and panics
/// if it has not finished within [`DEADLINE`].
pub fn evilcluster(tmp: &Path, args: &[&str]) -> Run {
    let mut child = Command::new(cli_binary())
        .args(args)
        .env("TMPDIR", tmp)
        // The discovery directory would be there instead of in TMPDIR.
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start evilcluster");
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("evilcluster {args:?} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// The discovery directory for this user under `tmp`.
pub fn discovery_dir(tmp: &Path) -> PathBuf {
    tmp.join(format!("evilcluster-{}", rustix::process::getuid().as_raw()))
}

/// A cluster name unique to this test run.
pub fn unique_name(test: &str) -> String {
    format!("cli-{test}-{}", std::process::id())
}

/// A running `cli-fixture` master. Dropping it SIGKILLs the master and
/// every process of its tree seen so far, and removes its TMPDIR.
pub struct Fixture {
    child: Child,
    pub name: String,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Pids of the tree seen in a status, killed on drop if still alive.
    pids: Vec<u32>,
    pub tmp: tempfile::TempDir,
}

impl Fixture {
    /// Starts the fixture as cluster `name` (logging at `info`, so the
    /// master logs its tree).
    pub fn start(name: &str) -> Fixture {
        let tmp = tempfile::tempdir().expect("temp dir");
        let Some(fixture) = option_env!("CARGO_BIN_EXE_cli-fixture") else {
            panic!("the cli-fixture cluster is built by the suite package (tests/cli_cluster.rs)")
        };
        let mut child = Command::new(fixture)
            .arg(name)
            .env("TMPDIR", tmp.path())
            .env_remove("XDG_RUNTIME_DIR")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the fixture");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("piped stderr");
        std::thread::spawn({
            let stderr = stderr.clone();
            move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    // Still shown, for a failing test's output.
                    eprintln!("{line}");
                    stderr.lock().unwrap().push(line);
                }
            }
        });
        let pipe = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Fixture {
            child,
            name: name.to_owned(),
            lines,
            seen: Vec::new(),
            stderr,
            pids: Vec::new(),
            tmp,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs the `evilcluster` command against this fixture's TMPDIR.
    pub fn evilcluster(&self, args: &[&str]) -> Run {
        evilcluster(self.tmp.path(), args)
    }

    /// The master's log lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Polls `evilcluster ps --json` until it answers with every declared
    /// process up (the disabled one excepted); returns that status. Panics
    /// if the master exits or the deadline passes first.
    pub fn wait_until_up(&mut self) -> Status {
        let deadline = Instant::now() + DEADLINE;
        let endpoint = control::endpoint_file(&discovery_dir(self.tmp.path()), &self.name);
        let mut last = None;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "the fixture exited ({status}) before its tree was up; last ps: {last:#?}; stdout: {:#?}",
                    self.drain()
                );
            }
            if endpoint.exists() {
                let run = self.evilcluster(&["ps", "--json", &self.name]);
                if run.code == Some(0) {
                    let status: Status = serde_json::from_str(&run.stdout)
                        .unwrap_or_else(|e| panic!("ps --json printed something that is not a Status ({e}): {run:#?}"));
                    self.remember(&status);
                    let all_up = status.processes.len() == 7
                        && status.processes.iter().all(|p| {
                            p.state == evilcluster_wire::control::ProcessState::Up || p.path.ends_with("/ghost")
                        });
                    if all_up {
                        return status;
                    }
                }
                last = Some(run);
            }
            assert!(
                Instant::now() < deadline,
                "the tree was not up within {DEADLINE:?}; last ps: {last:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Remembers the pids of `status`, to kill them if the test fails.
    pub fn remember(&mut self, status: &Status) {
        for pid in status.processes.iter().filter_map(|p| p.pid) {
            if pid != self.pid() && !self.pids.contains(&pid) {
                self.pids.push(pid);
            }
        }
    }

    /// Waits for the master to exit by itself; returns its status and the
    /// rest of what it printed.
    pub fn wait(&mut self) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, self.drain());
            }
            assert!(
                Instant::now() < deadline,
                "the fixture did not exit within {DEADLINE:?}; saw {:#?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn drain(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Children die with the master (parent-death signal); make sure
        // anyway, so that a failing test leaves nothing behind.
        for &pid in &self.pids {
            if alive(pid) {
                if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    evilcluster_wire::control::pid_alive(pid)
}

/// Polls until `condition` holds, or panics with `what` after the deadline.
pub fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replaces every `pid <digits>` with `pid N`.
pub fn mask_pids(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("pid ") {
        out.push_str(&rest[..at + 4]);
        rest = &rest[at + 4..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            out.push('N');
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

/// Creates `dir` (and its parents) private to this user, as a master does:
/// the command trusts nothing else.
pub fn private_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).expect("create the discovery directory");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod 700");
}

/// Writes `path` readable by this user only, as a master does.
pub fn write_private(path: impl AsRef<Path>, text: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path.as_ref(), text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}
