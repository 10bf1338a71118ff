//! Supervision across real processes: strategies, restart types, intensity,
//! backoff, clean shutdown. The fixture's master prints every lifecycle
//! event; its actors log each start and stop to a file.

mod support;

use std::path::PathBuf;

use rustix::process::Signal;
use support::{alive, eventually, processes_with_arg, signal_pid, Fixture};

/// A supervision fixture run, with its starts file.
struct Sup {
    fixture: Fixture,
    starts: PathBuf,
    /// Passed as an argument to every process of the run, to find them all.
    run_id: String,
    /// How far [`event`](Self::event) has read `fixture.seen`.
    cursor: usize,
    _dir: tempfile::TempDir,
}

impl Sup {
    fn start(args: &[&str]) -> Sup {
        let mut sup = Sup::launch(args);
        sup.fixture.expect_line("ready");
        sup
    }

    /// Starts the master without waiting for the tree to be ready.
    fn launch(args: &[&str]) -> Sup {
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
    fn event(&mut self, prefix: &str) -> Vec<String> {
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

    /// The pid from the `ready` event of `path` (the next one not yet read).
    fn ready(&mut self, path: &str) -> u32 {
        self.event(&format!("ready {path} "))[0].parse().expect("pid")
    }

    /// Every `start`/`stop` line of the starts file, as (what, path).
    fn records(&self) -> Vec<(String, String)> {
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

    fn count(&self, what: &str, path: &str) -> usize {
        self.records().iter().filter(|(w, p)| w == what && p == path).count()
    }

    /// Paths in the order they did `what`.
    fn order(&self, what: &str) -> Vec<String> {
        self.records()
            .into_iter()
            .filter(|(w, _)| w == what)
            .map(|(_, p)| p)
            .collect()
    }

    fn quit(&mut self) {
        self.fixture.command("quit");
        let status = self.fixture.wait();
        assert!(status.success(), "{status:?}: {:#?}", self.fixture.seen);
        self.nothing_left();
    }

    fn nothing_left(&self) {
        eventually("no process of the run is left", || {
            processes_with_arg(&self.run_id).is_empty()
        });
    }
}

impl Drop for Sup {
    fn drop(&mut self) {
        self.fixture.kill();
        // Children die with the master; wait for them, pass or fail.
        let deadline = std::time::Instant::now() + support::DEADLINE;
        while !processes_with_arg(&self.run_id).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn counts(sup: &Sup) -> [usize; 3] {
    ["sup/a", "sup/b", "sup/c"].map(|path| sup.count("start", path))
}

/// Starts a, b, c under `strategy`, SIGKILLs b, waits until `last` is back.
fn kill_b(strategy: &str, last: &str) -> Sup {
    let mut sup = Sup::start(&["--strategy", strategy]);
    sup.ready("sup/a");
    let b = sup.ready("sup/b");
    sup.ready("sup/c");
    signal_pid(b, Signal::KILL);
    sup.event(&format!("restarted {last} "));
    sup
}

#[test]
fn one_for_one_restarts_only_the_child_that_died() {
    let mut sup = kill_b("one-for-one", "sup/b");
    sup.quit();
    assert_eq!(counts(&sup), [1, 2, 1], "{:?}", sup.records());
}

#[test]
fn one_for_all_restarts_every_child_in_declaration_order() {
    let mut sup = kill_b("one-for-all", "sup/c");
    assert_eq!(counts(&sup), [2, 2, 2], "{:?}", sup.records());
    // The survivors stopped last-declared first, then all started in order.
    assert_eq!(sup.order("stop"), ["sup/c", "sup/a"]);
    assert_eq!(sup.order("start")[3..], ["sup/a", "sup/b", "sup/c"]);
    sup.quit();
}

#[test]
fn rest_for_one_restarts_the_child_and_those_declared_after_it() {
    let mut sup = kill_b("rest-for-one", "sup/c");
    assert_eq!(counts(&sup), [1, 2, 2], "{:?}", sup.records());
    assert_eq!(sup.order("stop"), ["sup/c"]);
    assert_eq!(sup.order("start")[3..], ["sup/b", "sup/c"]);
    sup.quit();
}

const RESTART_TYPES: [&str; 2] = ["--restart", "a=permanent,b=transient,c=temporary"];

#[test]
fn after_a_normal_exit_only_permanent_children_restart() {
    let mut sup = Sup::start(&RESTART_TYPES);
    sup.ready("sup/a");
    let b = sup.ready("sup/b");
    sup.ready("sup/c");

    // A request in flight when b is told to stop still gets its reply.
    sup.fixture.command("slow b 300");
    sup.fixture.expect_line("slow sent");
    signal_pid(b, Signal::TERM); // SIGTERM to a child is a normal stop.
    assert_eq!(sup.event("exited sup/b "), [b.to_string(), "normal".into()]);
    if !sup.fixture.seen.iter().any(|l| l.starts_with("slow ")) {
        sup.fixture.expect_line("slow ");
    }
    assert!(
        sup.fixture.seen.iter().any(|l| l == "slow ok"),
        "{:#?}",
        sup.fixture.seen
    );

    sup.fixture.command("exit c 0");
    assert_eq!(sup.event("exited sup/c ")[1], "normal");
    sup.fixture.command("exit a 0");
    assert_eq!(sup.event("exited sup/a ")[1], "normal");
    // The supervisor handles exits in order: a back means b and c were decided.
    sup.event("restarted sup/a ");
    assert!(
        !sup.fixture
            .seen
            .iter()
            .any(|l| l.starts_with("event restarting sup/b") || l.starts_with("event restarting sup/c")),
        "{:#?}",
        sup.fixture.seen
    );
    assert_eq!(counts(&sup), [2, 1, 1], "{:?}", sup.records());
    sup.quit();
}

#[test]
fn after_an_abnormal_exit_permanent_and_transient_children_restart() {
    let mut sup = Sup::start(&RESTART_TYPES);
    let a = sup.ready("sup/a");
    sup.ready("sup/b");
    let c = sup.ready("sup/c");

    sup.fixture.command("exit b 7");
    assert_eq!(sup.event("exited sup/b ")[1], "code:7");
    sup.event("restarted sup/b ");
    signal_pid(c, Signal::KILL);
    assert_eq!(sup.event("exited sup/c "), [c.to_string(), "signal:9".into()]);
    signal_pid(a, Signal::KILL);
    sup.event("restarted sup/a ");
    assert!(
        !sup.fixture.seen.iter().any(|l| l.starts_with("event restarting sup/c")),
        "{:#?}",
        sup.fixture.seen
    );
    assert_eq!(counts(&sup), [2, 2, 1], "{:?}", sup.records());
    sup.quit();
}

#[test]
fn a_fork_killed_under_load_fails_its_callers_promptly_and_comes_back() {
    let mut sup = Sup::start(&["--pool", "3"]);
    for k in 1..=3 {
        sup.event(&format!("ready sup/pool/{k} "));
    }
    let old = sup.event("ready sup/pool ");
    assert_eq!(old.len(), 3);
    let fork2: Vec<String> = sup
        .fixture
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("event ready sup/pool/2 "))
        .expect("fork 2 was ready")
        .split(' ')
        .map(str::to_owned)
        .collect();
    let (old_pid, old_incarnation) = (fork2[0].parse::<u32>().unwrap(), fork2[1].clone());

    sup.fixture.command("load");
    sup.fixture.expect_line("load started");
    let report = |sup: &mut Sup| -> Vec<Vec<String>> {
        sup.fixture.command("report");
        let rows: Vec<Vec<String>> = (1..=3)
            .map(|k| {
                let line = sup.fixture.expect_line(&format!("report {k} "));
                line.split(' ').skip(2).map(str::to_owned).collect()
            })
            .collect();
        sup.fixture.expect_line("report end");
        rows
    };
    let field = |row: &[String], name: &str| -> String {
        row.iter()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_owned()
    };
    // Load reaches every fork before the kill.
    let deadline = std::time::Instant::now() + support::DEADLINE;
    while report(&mut sup).iter().any(|row| field(row, "ok") == "0") {
        assert!(std::time::Instant::now() < deadline, "load never reached every fork");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    signal_pid(old_pid, Signal::KILL);
    let back = sup.event("restarted sup/pool/2 ");
    assert_ne!(back[0], old_pid.to_string(), "a new process");
    assert_ne!(back[1], old_incarnation, "a new incarnation");
    let new_pid = back[0].clone();

    // Sends reach the new fork.
    let rows = loop {
        let rows = report(&mut sup);
        if field(&rows[1], "last_pid") == new_pid {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reply from the new fork 2: {rows:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    for other in [0, 2] {
        assert_eq!(
            field(&rows[other], "errors"),
            "0",
            "fork {}: {:?}",
            other + 1,
            rows[other]
        );
    }
    let errors: usize = field(&rows[1], "errors").parse().unwrap();
    assert!(
        errors >= 1,
        "requests were in flight to fork 2 when it died: {:?}",
        rows[1]
    );
    let slowest: u64 = field(&rows[1], "slowest_error_ms").parse().unwrap();
    assert!(
        slowest < 1000,
        "callers of the dead fork waited {slowest} ms for their error"
    );
    for kind in field(&rows[1], "kinds").split(',') {
        assert!(
            ["Disconnected", "NotRegistered"].contains(&kind),
            "typed errors only: {:?}",
            rows[1]
        );
    }
    sup.quit();
}

#[test]
fn a_child_crashing_on_every_start_backs_off_then_the_master_gives_up() {
    let mut sup = Sup::launch(&["--crash", "b", "--intensity", "3,60000", "--backoff", "100,1000"]);
    let status = sup.fixture.wait();
    assert_eq!(status.code(), Some(3), "exits non-zero: {:#?}", sup.fixture.seen);
    let seen = sup.fixture.seen.clone();
    assert!(seen.iter().any(|l| l == "event gave-up sup sup/b"), "{seen:#?}");
    // Backoff: 100 ms, then 1.5 times longer each restart.
    let delays: Vec<u64> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("event restarting sup/b "))
        .map(|rest| rest.split(' ').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(delays, [100, 150, 225], "{seen:#?}");
    // ...and really waited: each attempt at least that long after the one before.
    let attempts: Vec<u128> = std::fs::read_to_string(&sup.starts)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("attempt sup/b "))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(attempts.len(), 4, "first start and three restarts");
    for (gap, delay) in attempts.windows(2).map(|w| w[1] - w[0]).zip(&delays) {
        assert!(
            gap + 1 >= u128::from(*delay),
            "waited {gap} ms, backoff said {delay} ms"
        );
    }
    // The log names the child that used up the limit.
    assert!(
        sup.fixture
            .stderr_lines()
            .iter()
            .any(|l| l.contains("sup/b exited") && l.contains("giving up")),
        "{:#?}",
        sup.fixture.stderr_lines()
    );
    // a was started and stopped cleanly; nothing is left.
    assert_eq!(sup.count("start", "sup/a"), 1);
    assert_eq!(sup.count("stop", "sup/a"), 1);
    sup.nothing_left();
}

#[test]
fn sigterm_to_the_master_stops_every_child_in_reverse_order_and_exits_zero() {
    let mut sup = Sup::start(&["--pool", "2"]);
    sup.event("ready sup/pool ");
    sup.fixture.signal(Signal::TERM);
    let status = sup.fixture.wait();
    assert!(status.success(), "{status:?}: {:#?}", sup.fixture.seen);
    assert!(sup.fixture.seen.iter().any(|l| l == "stopped"));
    assert_eq!(
        sup.order("stop"),
        ["sup/pool/2", "sup/pool/1", "sup/c", "sup/b", "sup/a"]
    );
    assert!(sup.fixture.seen.iter().any(|l| l == "event all-exited sup"));
    sup.nothing_left();
    let left = support::files_below(sup.fixture.tmp.path());
    assert!(left.iter().all(|p| p.is_dir()), "left behind: {left:?}");
}

#[test]
fn a_child_that_ignores_the_graceful_stop_is_killed_after_its_shutdown_timeout() {
    let mut sup = Sup::start(&["--stubborn", "c", "--shutdown-ms", "300"]);
    sup.ready("sup/a");
    sup.ready("sup/b");
    let c = sup.ready("sup/c");
    sup.fixture.command("quit");
    assert!(sup.fixture.wait().success(), "{:#?}", sup.fixture.seen);
    assert_eq!(sup.count("refuses-to-stop", "sup/c"), 1);
    assert!(
        sup.fixture.seen.contains(&format!("event exited sup/c {c} signal:9")),
        "{:#?}",
        sup.fixture.seen
    );
    assert!(
        sup.fixture
            .stderr_lines()
            .iter()
            .any(|l| l.contains("did not stop in time; killing it") && l.contains("sup/c")),
        "{:#?}",
        sup.fixture.stderr_lines()
    );
    // The others still stopped gracefully, after c.
    assert_eq!(sup.order("stop"), ["sup/b", "sup/a"]);
    assert!(!alive(c));
    sup.nothing_left();
}

#[test]
fn killing_the_master_in_the_middle_of_restarts_leaves_nothing() {
    let mut sup = Sup::launch(&["--crash", "c", "--intensity", "100,60000", "--backoff", "50,50"]);
    sup.event("restarting sup/c 2 ");
    assert!(!processes_with_arg(&sup.run_id).is_empty());
    sup.fixture.kill();
    sup.nothing_left();
}

#[test]
fn messages_sent_just_before_a_normal_exit_are_not_lost() {
    let mut sup = Sup::start(&["--sender"]);
    assert_eq!(sup.event("exited sup/sender ")[1], "normal");
    sup.fixture.command("count a");
    assert_eq!(sup.fixture.expect_line("count "), "count 2000");
    sup.quit();
}

#[test]
fn watching_a_name_sees_down_then_up_across_a_sigkill_and_restart() {
    let mut sup = Sup::start(&["--pool", "2"]);
    sup.event("ready sup/pool ");
    sup.fixture.command("watch");
    let up = |sup: &mut Sup, path: &str| -> u32 {
        let line = sup.fixture.expect_line(&format!("watch up {path} "));
        line.rsplit(' ').next().unwrap().parse().expect("pid")
    };
    let fork1 = up(&mut sup, "sup/pool/1");
    let fork2 = up(&mut sup, "sup/pool/2");

    // One fork killed: down (with the signal), then up as a new process.
    signal_pid(fork2, Signal::KILL);
    assert_eq!(
        sup.fixture.expect_line("watch "),
        format!("watch down sup/pool/2 {fork2} signal:9")
    );
    let fork2_again = up(&mut sup, "sup/pool/2");
    assert_ne!(fork2_again, fork2);

    // The spawn killed: both forks die with it, then all come back.
    let spawn = sup
        .fixture
        .seen
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("event ready sup/pool "));
    let spawn: u32 = spawn.expect("spawn ready").split(' ').next().unwrap().parse().unwrap();
    signal_pid(spawn, Signal::KILL);
    let mut downs = vec![sup.fixture.expect_line("watch "), sup.fixture.expect_line("watch ")];
    downs.sort();
    assert_eq!(
        downs,
        [
            format!("watch down sup/pool/1 {fork1} signal:9"),
            format!("watch down sup/pool/2 {fork2_again} signal:9"),
        ]
    );
    up(&mut sup, "sup/pool/1");
    up(&mut sup, "sup/pool/2");
    sup.quit();
}

/// One `GET /` to `addr`: the response's body, or why there was none.
fn http_get(addr: &str) -> Result<String, std::io::Error> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(support::DEADLINE))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!("bad response: {response:?}"))),
    }
}

#[test]
fn forks_share_one_port_and_keep_serving_while_one_is_killed_and_restarted() {
    let mut sup = Sup::start(&["--pool", "3", "--http"]);
    for k in 1..=3 {
        sup.event(&format!("ready sup/pool/{k} "));
    }
    sup.fixture.command("addr");
    let addr = sup.fixture.expect_line("addr ")["addr ".len()..].to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    // 200 requests from 4 clients at once: all answered, by more than one fork.
    let bodies: Vec<String> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| (0..50).map(|_| http_get(&addr).expect("an answer")).collect::<Vec<_>>()))
            .collect();
        clients.into_iter().flat_map(|c| c.join().expect("client")).collect()
    });
    assert_eq!(bodies.len(), 200);
    let a = sup
        .fixture
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("event ready sup/a "))
        .unwrap();
    let a_pid = a.split(' ').next().unwrap();
    let mut forks: Vec<&str> = bodies
        .iter()
        .map(|body| {
            // "fork K pid P a A": the handler reached `a` across processes.
            let words: Vec<&str> = body.split(' ').collect();
            assert_eq!((words[0], words[4], words[5]), ("fork", "a", a_pid), "{body}");
            words[1]
        })
        .collect();
    forks.sort_unstable();
    forks.dedup();
    assert!(forks.len() > 1, "every request went to fork {forks:?}");

    // Fork 1 killed and restarted under load: no connection is refused; only
    // a request fork 1 had accepted when it died can fail.
    let fork1: u32 = sup
        .fixture
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("event ready sup/pool/1 "))
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let served_by_new_fork1 = std::sync::atomic::AtomicBool::new(false);
    let new_fork1 = std::sync::Mutex::new(String::new());
    let (ok, failed) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let (mut ok, mut failed) = (0, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        match http_get(&addr) {
                            Ok(body) => {
                                ok += 1;
                                let new = new_fork1.lock().unwrap();
                                if !new.is_empty() && body.starts_with(&format!("fork 1 pid {new} ")) {
                                    served_by_new_fork1.store(true, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                            Err(error) => failed.push(error),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        signal_pid(fork1, Signal::KILL);
        let back = sup.event("restarted sup/pool/1 ");
        *new_fork1.lock().unwrap() = back[0].clone();
        eventually("the new fork 1 serves requests", || {
            served_by_new_fork1.load(std::sync::atomic::Ordering::SeqCst)
        });
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .fold((0, Vec::new()), |(ok, mut failed), (o, f)| {
                failed.extend(f);
                (ok + o, failed)
            })
    });
    assert!(ok > 0);
    for error in &failed {
        assert_ne!(error.kind(), std::io::ErrorKind::ConnectionRefused, "{failed:?}");
    }
    assert!(
        failed.len() <= 4,
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    sup.quit();
}

#[test]
fn a_rolling_restart_replaces_every_fork_while_no_http_request_fails() {
    let mut sup = Sup::start(&["--pool", "3", "--http"]);
    for k in 1..=3 {
        sup.event(&format!("ready sup/pool/{k} "));
    }
    sup.fixture.command("addr");
    let addr = sup.fixture.expect_line("addr ")["addr ".len()..].to_owned();

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let (mut ok, mut failed) = (0u32, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        match http_get(&addr) {
                            Ok(_) => ok += 1,
                            Err(error) => failed.push(error.to_string()),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        sup.fixture.command("roll pool");
        let rolled = sup.fixture.expect_line("roll");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(rolled, "rolled 3", "{:#?}", sup.fixture.seen);
        clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .fold((0, Vec::new()), |(ok, mut failed), (o, f)| {
                failed.extend(f);
                (ok + o, failed)
            })
    });
    assert!(ok > 0);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );

    // One at a time: each fork was back before the next one stopped. (The
    // events are printed by another thread of the master than the reply.)
    sup.event("restarted sup/pool/3 ");
    let order: Vec<String> = sup
        .fixture
        .seen
        .iter()
        .filter_map(|l| l.strip_prefix("event "))
        .filter(|l| l.starts_with("exited sup/pool/") || l.starts_with("restarted sup/pool/"))
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        order,
        [
            "exited sup/pool/1",
            "restarted sup/pool/1",
            "exited sup/pool/2",
            "restarted sup/pool/2",
            "exited sup/pool/3",
            "restarted sup/pool/3"
        ]
    );
    // A worker without forks restarts its one process; an unknown one is refused.
    sup.fixture.command("roll b");
    assert_eq!(sup.fixture.expect_line("roll"), "rolled 1");
    sup.fixture.command("roll nope");
    assert!(sup.fixture.expect_line("roll").contains("no worker named `nope`"));
    assert_eq!(sup.count("start", "sup/b"), 2);
    sup.quit();
}

#[test]
fn a_spawn_whose_forks_keep_crashing_gives_up_and_fails_upward() {
    let mut sup = Sup::launch(&[
        "--pool",
        "2",
        "--crash",
        "pool",
        "--backoff",
        "20,20",
        "--fork-intensity",
        "2,60000",
        "--intensity",
        "1,60000",
    ]);
    let status = sup.fixture.wait();
    assert_eq!(status.code(), Some(3), "{:#?}", sup.fixture.seen);
    let seen = &sup.fixture.seen;
    // The spawn gave up on its fork, exited abnormally, was restarted once by
    // the master, gave up again; then the master gave up on the spawn.
    let gave_up: Vec<&String> = seen.iter().filter(|l| l.starts_with("event gave-up ")).collect();
    assert_eq!(
        gave_up,
        [
            "event gave-up sup/pool sup/pool/1",
            "event gave-up sup/pool sup/pool/1",
            "event gave-up sup sup/pool"
        ],
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("event exited sup/pool ") && l.ends_with(" start-failed")),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l.starts_with("event restarting sup/pool 1 ")),
        "{seen:#?}"
    );
    sup.nothing_left();
}

#[test]
fn a_child_not_ready_within_its_start_timeout_counts_as_a_failed_start() {
    let mut sup = Sup::launch(&[
        "--hang",
        "c",
        "--start-ms",
        "300",
        "--shutdown-ms",
        "200",
        "--backoff",
        "20,20",
        "--intensity",
        "1,60000",
    ]);
    let status = sup.fixture.wait();
    assert_eq!(status.code(), Some(3), "{:#?}", sup.fixture.seen);
    assert_eq!(
        sup.count("attempt", "sup/c"),
        2,
        "started, timed out, restarted once, timed out"
    );
    assert!(
        sup.fixture
            .stderr_lines()
            .iter()
            .any(|l| l.contains("not ready within 300ms") && l.contains("sup/c")),
        "{:#?}",
        sup.fixture.stderr_lines()
    );
    sup.nothing_left();
}
