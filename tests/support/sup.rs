//! The supervision fixture (`supervision-fixture`) run as a cluster: its
//! master prints every lifecycle event as an `event ...` line; its actors
//! log each start and stop to a file.

use std::path::PathBuf;

use super::{eventually, processes_with_arg, Fixture};

/// A supervision fixture run, with its starts file.
pub struct Sup {
    pub fixture: Fixture,
    pub starts: PathBuf,
    /// Passed as an argument to every process of the run, to find them all.
    pub run_id: String,
    /// How far [`event`](Self::event) has read `fixture.seen`.
    cursor: usize,
    _dir: tempfile::TempDir,
}

impl Sup {
    pub fn start(args: &[&str]) -> Sup {
        let mut sup = Sup::launch(args);
        sup.fixture.expect_line("ready");
        sup
    }

    /// Starts the master without waiting for the tree to be ready.
    pub fn launch(args: &[&str]) -> Sup {
        let dir = tempfile::tempdir().expect("temp dir");
        let starts = dir.path().join("starts");
        let run_id = format!("run-{}", dir.path().display());
        let mut all: Vec<&str> = args.to_vec();
        let starts_arg = starts.to_string_lossy().into_owned();
        all.extend(["--starts", &starts_arg, "--run-id", &run_id]);
        let fixture = Fixture::launch(env!("CARGO_BIN_EXE_supervision-fixture"), &all, "info");
        Sup {
            fixture,
            starts,
            run_id,
            cursor: 0,
            _dir: dir,
        }
    }

    /// The next event line (after the last one returned) starting with
    /// `event {prefix}`, waiting for it if need be; its words after the prefix.
    pub fn event(&mut self, prefix: &str) -> Vec<String> {
        let wanted = format!("event {prefix}");
        let seen = &self.fixture.seen;
        let line = match seen[self.cursor..].iter().position(|l| l.starts_with(&wanted)) {
            Some(at) => {
                self.cursor += at + 1;
                seen[self.cursor - 1].clone()
            }
            None => {
                let line = self.fixture.expect_line(&wanted);
                self.cursor = self.fixture.seen.len();
                line
            }
        };
        line[wanted.len()..]
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Every event seen so far, as `"{kind} {path}"`, in order.
    pub fn events_seen(&self) -> Vec<String> {
        self.fixture
            .seen
            .iter()
            .filter_map(|line| line.strip_prefix("event "))
            .map(|event| event.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect()
    }

    /// The pid from the `ready` event of `path` (the next one not yet read).
    pub fn ready(&mut self, path: &str) -> u32 {
        self.event(&format!("ready {path} "))[0].parse().expect("pid")
    }

    /// Every `start`/`stop` line of the starts file, as (what, path).
    pub fn records(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.starts)
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let mut words = line.split(' ');
                (
                    words.next().unwrap_or("").to_owned(),
                    words.next().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    pub fn count(&self, what: &str, path: &str) -> usize {
        self.records().iter().filter(|(w, p)| w == what && p == path).count()
    }

    /// Paths in the order they did `what`.
    pub fn order(&self, what: &str) -> Vec<String> {
        self.records()
            .into_iter()
            .filter(|(w, _)| w == what)
            .map(|(_, p)| p)
            .collect()
    }

    /// Panics unless one line the cluster logged contains every one of `parts`.
    pub fn assert_logged(&self, parts: &[&str]) {
        let lines = self.fixture.stderr_lines();
        assert!(
            lines.iter().any(|l| parts.iter().all(|part| l.contains(part))),
            "no log line with {parts:?} in {lines:#?}"
        );
    }

    pub fn quit(&mut self) {
        self.fixture.command("quit");
        let status = self.fixture.wait();
        assert!(status.success(), "{status:?}: {:#?}", self.fixture.seen);
        self.nothing_left();
    }

    pub fn nothing_left(&self) {
        eventually("no process of the run is left", || {
            processes_with_arg(&self.run_id).is_empty()
        });
    }
}

impl Drop for Sup {
    fn drop(&mut self) {
        self.fixture.kill();
        // Children die with the master; wait for them, pass or fail.
        let deadline = std::time::Instant::now() + super::DEADLINE;
        while !processes_with_arg(&self.run_id).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// One `GET /` to `addr`: the response's body, or why there was none.
pub fn http_get(addr: &str) -> Result<String, std::io::Error> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(super::DEADLINE))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!("bad response: {response:?}"))),
    }
}

/// What HTTP clients saw while they ran.
pub struct Load {
    /// Requests answered with 200.
    pub ok: usize,
    /// Every other outcome.
    pub failed: Vec<std::io::Error>,
}

/// Runs `clients` threads sending `GET /` to `addr` back to back, handing
/// each answer's body to `on_body`, for as long as `during` runs.
pub fn http_load_during(addr: &str, clients: usize, on_body: impl Fn(&str) + Sync, during: impl FnOnce()) -> Load {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut load = Load {
                        ok: 0,
                        failed: Vec::new(),
                    };
                    while !stop.load(Ordering::SeqCst) {
                        match http_get(addr) {
                            Ok(body) => {
                                load.ok += 1;
                                on_body(&body);
                            }
                            Err(error) => load.failed.push(error),
                        }
                    }
                    load
                })
            })
            .collect();
        during();
        stop.store(true, Ordering::SeqCst);
        let mut total = Load {
            ok: 0,
            failed: Vec::new(),
        };
        for thread in threads {
            let load = thread.join().expect("an HTTP client");
            total.ok += load.ok;
            total.failed.extend(load.failed);
        }
        total
    })
}
