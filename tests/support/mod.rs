//! Runs the fixture cluster as real processes and reads what its master prints.
#![allow(dead_code)]

pub mod nats;
pub mod sup;
pub mod wire;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Generous: CI is a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// One process of the fixture's tree, as its master printed it.
#[derive(Debug, Clone)]
pub struct Member {
    pub path: String,
    pub pid: u32,
    pub incarnation: u64,
    pub socket: Option<String>,
}

/// A running fixture master. Dropping it kills the master (its children
/// die with it) and removes its temp directory.
pub struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    /// Everything the cluster wrote on standard error (logs), line by line.
    errors: Arc<Mutex<Vec<String>>>,
    /// TMPDIR of the cluster: where its socket directory is made.
    pub tmp: tempfile::TempDir,
}

impl Fixture {
    pub fn start(args: &[&str]) -> Fixture {
        Fixture::start_logging(args, "warn")
    }

    /// Like [`start`](Self::start), with `RUST_LOG` set to `log`.
    pub fn start_logging(args: &[&str], log: &str) -> Fixture {
        Fixture::launch(env!("CARGO_BIN_EXE_cluster-fixture"), args, log)
    }

    /// Starts the fixture binary `exe` as a cluster's master.
    pub fn launch(exe: &str, args: &[&str], log: &str) -> Fixture {
        Fixture::launch_in(tempfile::tempdir().expect("temp dir"), exe, args, log, &[])
    }

    /// Like [`launch`](Self::launch), with `tmp` (prepared by the test) as
    /// the master's TMPDIR, and `env` added to its environment.
    pub fn launch_in(
        tmp: tempfile::TempDir,
        exe: &str,
        args: &[&str],
        log: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Fixture {
        let mut child = Command::new(exe)
            .args(args)
            .env("TMPDIR", tmp.path())
            // The discovery directory would be there instead of in TMPDIR.
            .env_remove("XDG_RUNTIME_DIR")
            .envs(env.iter().copied())
            .env("RUST_LOG", log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the fixture");
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn({
            let errors = errors.clone();
            move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    // Still shown, for a failing test's output.
                    eprintln!("{line}");
                    errors.lock().unwrap().push(line);
                }
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Fixture {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            errors,
            tmp,
        }
    }

    /// The standard error lines read so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line starting with `prefix`; panics with everything seen
    /// if the master ends or the deadline passes first.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        self.expect_matching(prefix, |line| line.starts_with(prefix))
    }

    /// Waits for a line containing `needle` (a child's relayed output, after
    /// its `path[pid] | ` prefix), like [`expect_line`](Self::expect_line).
    #[allow(dead_code)] // not every test binary that shares this module uses it
    pub fn expect_containing(&mut self, needle: &str) -> String {
        self.expect_matching(needle, |line| line.contains(needle))
    }

    fn expect_matching(&mut self, prefix: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with("FAIL") {
                        panic!("fixture failed: {line}\nall output: {:#?}", self.seen);
                    }
                    if matches(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no line {prefix:?} within {DEADLINE:?}; saw {:#?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("fixture ended before printing {prefix:?}; saw {:#?}", self.seen)
                }
            }
        }
    }

    /// Reads the `member` lines up to `ready` (scenario `serve`).
    pub fn members(&mut self) -> Vec<Member> {
        self.expect_line("ready");
        parse_members(&self.seen)
    }

    /// The members now (scenario `serve`'s `members` command).
    pub fn current_members(&mut self) -> Vec<Member> {
        let start = self.seen.len();
        self.command("members");
        self.expect_line("listed");
        parse_members(&self.seen[start..])
    }

    pub fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to the fixture");
    }

    /// Waits for the master to exit by itself.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Collect the rest of the output for assertions.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fixture did not exit within {DEADLINE:?}; saw {:#?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the master.
    pub fn signal(&self, signal: rustix::process::Signal) {
        signal_pid(self.pid(), signal);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Sends `signal` to the process `pid`.
pub fn signal_pid(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, signal).expect("send a signal");
}

/// Live processes (zombies excluded) whose command line contains `marker`.
pub fn processes_with_arg(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|&b| b == 0).any(|arg| arg == marker.as_bytes()) && alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// Whether `pid` is a live process (a zombie waiting to be reaped counts as gone).
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

/// Resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Open descriptors of process `pid`.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Every file left below `dir`.
pub fn files_below(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            found.push(path);
        }
    }
    found
}

/// The `member <path> <pid> <incarnation> <socket|->` lines among `lines`.
fn parse_members(lines: &[String]) -> Vec<Member> {
    lines
        .iter()
        .filter_map(|line| {
            let mut words = line.strip_prefix("member ")?.split(' ');
            Some(Member {
                path: words.next()?.to_owned(),
                pid: words.next()?.parse().ok()?,
                incarnation: words.next()?.parse().ok()?,
                socket: words.next().filter(|s| *s != "-").map(str::to_owned),
            })
        })
        .collect()
}
