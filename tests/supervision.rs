//! Supervision across real processes: strategies, restart types, intensity,
//! backoff, clean shutdown. The fixture's master prints every lifecycle
//! event; its actors log each start and stop to a file.

mod support;

use rustix::process::Signal;
use support::sup::{http_load_during, Sup};
use support::{alive, processes_with_arg, signal_pid};

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

#[test]
fn spawns_start_in_declaration_order_each_once_the_one_before_is_ready() {
    // The master launches every spawn's process at once, and a spawn its
    // forks, so that their start-ups overlap; each is held until its turn.
    // `a` and `c` take 300 ms to create their actors: any process let go
    // early (b, c, or the pool's forks) would start its actor before them.
    let mut sup = Sup::start(&["--pool", "2", "--slow-start", "a=300,c=300"]);
    // The last event of the start; every earlier one is printed before it.
    sup.event("ready sup/pool ");
    let events = sup.events_seen();
    let at = |event: &str| {
        let found: Vec<usize> = (0..events.len()).filter(|&i| events[i] == event).collect();
        assert_eq!(found.len(), 1, "{event} once: {events:#?}");
        found[0]
    };
    // Each spawn is started (Spawned) only once the one before it is ready,
    // and is ready before the next: the events say so in this order.
    let spawns = ["sup/a", "sup/b", "sup/c", "sup/pool"];
    for pair in spawns.windows(2) {
        assert!(
            at(&format!("ready {}", pair[0])) < at(&format!("spawned {}", pair[1])),
            "{events:#?}"
        );
    }
    for spawn in spawns {
        assert!(
            at(&format!("spawned {spawn}")) < at(&format!("ready {spawn}")),
            "{events:#?}"
        );
    }
    for fork in ["sup/pool/1", "sup/pool/2"] {
        assert!(at("spawned sup/pool") < at(&format!("forked {fork}")), "{events:#?}");
        assert!(
            at(&format!("forked {fork}")) < at(&format!("ready {fork}")),
            "{events:#?}"
        );
        assert!(at(&format!("ready {fork}")) < at("ready sup/pool"), "{events:#?}");
    }
    // And the actors themselves started in that order, across processes.
    let mut starts = sup.order("start");
    starts[3..].sort();
    assert_eq!(starts, ["sup/a", "sup/b", "sup/c", "sup/pool/1", "sup/pool/2"]);
    sup.quit();
}

#[test]
fn a_spawn_is_ready_only_once_its_actor_has_started() {
    // `a`'s actor takes 300 ms in its `started`: `b`, declared next, is let
    // go only after that, so its actor starts after `a`'s.
    let mut sup = Sup::start(&["--slow-started", "a=300"]);
    sup.ready("sup/a");
    sup.ready("sup/b");
    sup.ready("sup/c");
    assert_eq!(sup.order("start"), ["sup/a", "sup/b", "sup/c"], "{:?}", sup.records());
    sup.quit();
}

const RESTART_TYPES: [&str; 2] = ["--restart", "a=permanent,b=transient,c=temporary"];

/// Starts a, b and c with [`RESTART_TYPES`], then sends b a request that
/// takes `ms` to answer; returns once it is on its way, with b's pid.
fn slow_request_to_b(ms: u32) -> (Sup, u32) {
    let mut sup = Sup::start(&RESTART_TYPES);
    sup.ready("sup/a");
    let b = sup.ready("sup/b");
    sup.ready("sup/c");
    sup.fixture.command(&format!("slow b {ms}"));
    sup.fixture.expect_line("slow sent");
    (sup, b)
}

/// Waits for the outcome of [`slow_request_to_b`]'s request ("slow sent"
/// is seen already) and checks it was answered.
fn expect_slow_ok(sup: &mut Sup) {
    if !sup
        .fixture
        .seen
        .iter()
        .any(|l| l == "slow ok" || l.starts_with("slow err"))
    {
        sup.fixture.expect_line("slow ");
    }
    assert!(
        sup.fixture.seen.iter().any(|l| l == "slow ok"),
        "{:#?}",
        sup.fixture.seen
    );
}

/// Voluntary sleeps so far of process `pid`'s main thread (where its
/// runtime runs); `None` once it is gone.
fn sleeps_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|n| n.trim().parse().ok())
}

#[test]
fn a_stopping_process_waits_for_its_last_reply_without_waking_on_a_clock() {
    // b is told to stop while it serves a 600 ms request, and waits until
    // the reply is out before it exits. It used to look every 2 ms while
    // waiting (~300 wake-ups here; when a tree of 256 forks stopped, those
    // wake-ups took most of the stop's CPU); now what it waits for wakes it.
    let (mut sup, b) = slow_request_to_b(600);
    let before = sleeps_of(b).expect("b runs");
    signal_pid(b, Signal::TERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = before;
    while let Some(sleeps) = sleeps_of(b) {
        last = sleeps;
        assert!(std::time::Instant::now() < deadline, "b did not stop");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    expect_slow_ok(&mut sup);
    let woke = last - before;
    println!("b slept {woke} times while stopping");
    assert!(woke < 100, "b woke {woke} times in the 600 ms it waited to stop");
    sup.quit();
}

#[test]
fn after_a_normal_exit_only_permanent_children_restart() {
    // A request in flight when b is told to stop still gets its reply.
    let (mut sup, b) = slow_request_to_b(300);
    signal_pid(b, Signal::TERM); // SIGTERM to a child is a normal stop.
    assert_eq!(sup.event("exited sup/b "), [b.to_string(), "normal".into()]);
    expect_slow_ok(&mut sup);

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

    // A call surely in flight to fork 2 when it dies: the load's calls may
    // all be between a reply and the next send at that moment.
    sup.fixture.command("hold pool 2");
    let holding = sup.fixture.expect_containing("holding a call");
    assert!(holding.contains(&format!("[{old_pid}]")), "held by fork 2: {holding}");

    signal_pid(old_pid, Signal::KILL);
    let killed = std::time::Instant::now();
    let held = sup.fixture.expect_line("held 2 ");
    // Failed by the dead connection, not by its 120 s timeout or after the
    // fork's 60 s of holding it.
    assert_eq!(held, "held 2 error Disconnected", "the call in flight");
    let waited = killed.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(10),
        "the call in flight failed {waited:?} after the kill"
    );
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
    sup.assert_logged(&["sup/b exited", "giving up"]);
    // a was started and stopped cleanly; nothing is left.
    assert_eq!(sup.count("start", "sup/a"), 1);
    assert_eq!(sup.count("stop", "sup/a"), 1);
    // c's process, launched early each time with b's, was never let go: it
    // neither started its actor nor was announced.
    assert_eq!(sup.count("start", "sup/c"), 0);
    assert!(!seen.iter().any(|l| l.starts_with("event spawned sup/c ")), "{seen:#?}");
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
    // The pool's forks (replicas) stop together, before their spawn; the
    // spawns stop last declared first.
    let mut stops = sup.order("stop");
    stops[..2].sort();
    assert_eq!(stops, ["sup/pool/1", "sup/pool/2", "sup/c", "sup/b", "sup/a"]);
    assert!(sup.fixture.seen.iter().any(|l| l == "event all-exited sup"));
    sup.nothing_left();
    let left = support::files_below(sup.fixture.tmp.path());
    assert!(left.iter().all(|p| p.is_dir()), "left behind: {left:?}");
}

#[test]
fn a_spawns_forks_stop_together_each_within_its_own_timeout() {
    // Each fork takes 2 s to stop, under a 3 s shutdown timeout: the spawn
    // asks both at once, so both are stopping before either has stopped,
    // and neither is killed.
    let mut sup = Sup::start(&["--pool", "2", "--slow-stop", "pool=2000", "--shutdown-ms", "3000"]);
    sup.event("ready sup/pool ");
    sup.fixture.signal(Signal::TERM);
    let status = sup.fixture.wait();
    assert!(status.success(), "{status:?}: {:#?}", sup.fixture.seen);
    assert!(
        sup.fixture.seen.iter().any(|l| l == "stopped"),
        "{:#?}",
        sup.fixture.seen
    );
    let forks: Vec<(String, String)> = sup
        .records()
        .into_iter()
        .filter(|(what, path)| (what == "stopping" || what == "stop") && path.starts_with("sup/pool/"))
        .collect();
    let whats: Vec<&str> = forks.iter().map(|(what, _)| what.as_str()).collect();
    assert_eq!(whats, ["stopping", "stopping", "stop", "stop"], "{forks:?}");
    // Both forks stopped gracefully, then the rest in reverse order.
    let mut stops = sup.order("stop");
    stops[..2].sort();
    assert_eq!(
        stops,
        ["sup/pool/1", "sup/pool/2", "sup/c", "sup/b", "sup/a"],
        "{:#?}",
        sup.fixture.seen
    );
    let killed: Vec<&String> = sup
        .fixture
        .seen
        .iter()
        .filter(|l| l.starts_with("event exited ") && !l.ends_with(" normal"))
        .collect();
    assert!(killed.is_empty(), "{killed:#?}");
    let lines = sup.fixture.stderr_lines();
    let kills: Vec<&String> = lines.iter().filter(|l| l.contains("killing it")).collect();
    assert!(kills.is_empty(), "{kills:#?}");
    sup.nothing_left();
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
    sup.assert_logged(&["did not stop in time; killing it", "sup/c"]);
    // The others still stopped gracefully, after c.
    assert_eq!(sup.order("stop"), ["sup/b", "sup/a"]);
    assert!(!alive(c));
    sup.nothing_left();
}

/// A panic in the program's `main` (under `run_with`) is the master's own:
/// it unwinds out of `run_with` at once, while the task that watches for
/// signals and stop requests still waits, and every child goes with the
/// master.
#[test]
fn a_panic_in_main_ends_the_master_with_it_and_leaves_nothing() {
    let mut sup = Sup::start(&["--pool", "2"]);
    sup.event("ready sup/pool ");
    sup.fixture.command("panic");
    let status = sup.fixture.wait();
    assert_eq!(status.code(), Some(101), "{status:?}: {:#?}", sup.fixture.seen);
    let stderr = sup.fixture.stderr_lines().join("\n");
    assert!(stderr.contains("the program's main panicked on purpose"), "{stderr}");
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
fn a_rolling_restart_replaces_every_fork_while_no_http_request_fails() {
    let mut sup = Sup::start(&["--pool", "3", "--listen", "pool"]);
    for k in 1..=3 {
        sup.event(&format!("ready sup/pool/{k} "));
    }
    sup.fixture.command("addr pool");
    let addr = sup.fixture.expect_line("addr ")["addr ".len()..].to_owned();

    let mut rolled = String::new();
    let load = http_load_during(
        &addr,
        4,
        |_| {},
        || {
            sup.fixture.command("roll pool");
            rolled = sup.fixture.expect_line("roll");
        },
    );
    assert_eq!(rolled, "rolled 3", "{:#?}", sup.fixture.seen);
    eprintln!(
        "during the rolling restart: {} answered, {} failed",
        load.ok,
        load.failed.len()
    );
    assert!(load.ok > 0);
    assert!(
        load.failed.is_empty(),
        "{} of {} requests failed: {:?}",
        load.failed.len(),
        load.ok + load.failed.len(),
        load.failed
    );

    // One at a time: each fork was back before the next one stopped. (The
    // events are printed by another thread of the master than the reply.)
    sup.event("restarted sup/pool/3 ");
    let order: Vec<String> = sup
        .events_seen()
        .into_iter()
        .filter(|e| e.starts_with("exited sup/pool/") || e.starts_with("restarted sup/pool/"))
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
    sup.assert_logged(&["not ready within 300ms", "sup/c"]);
    sup.nothing_left();
}

/// A caller remembers its connection to an actor's only instance; the
/// instance's restart must send the next call to the new process, at once.
#[test]
fn calls_to_a_single_instance_reach_its_new_process_after_a_restart() {
    let mut sup = Sup::start(&[]);
    let first = sup.ready("sup/a");
    for _ in 0..3 {
        sup.fixture.command("ping a");
        assert_eq!(sup.fixture.expect_line("p"), format!("pong a {first}"));
    }
    sup.fixture.command("exit a 7");
    let second: u32 = sup.event("restarted sup/a ")[0].parse().expect("pid");
    assert_ne!(second, first);
    for _ in 0..3 {
        sup.fixture.command("ping a");
        assert_eq!(sup.fixture.expect_line("p"), format!("pong a {second}"));
    }
    sup.quit();
}

/// While one fork of two is down, the other is the only instance (a
/// caller remembers its connection to it); once the fork is back, round
/// robin reaches both again.
#[test]
fn round_robin_reaches_a_fork_again_once_it_is_back() {
    // The fork stays down long enough for the calls below to find it gone.
    let mut sup = Sup::start(&["--pool", "2", "--backoff", "3000,3000"]);
    let one = sup.ready("sup/pool/1");
    sup.ready("sup/pool/2");
    sup.fixture.command("exit pool 2 7");
    sup.event("exited sup/pool/2 ");
    for _ in 0..3 {
        sup.fixture.command("ping pool");
        assert_eq!(sup.fixture.expect_line("p"), format!("pong pool {one}"));
    }
    let two: u32 = sup.event("restarted sup/pool/2 ")[0].parse().expect("pid");
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..4 {
        sup.fixture.command("ping pool");
        reached.insert(sup.fixture.expect_line("p"));
    }
    let both = [format!("pong pool {one}"), format!("pong pool {two}")];
    assert_eq!(reached, both.into_iter().collect(), "{:#?}", sup.fixture.seen);
    sup.quit();
}

#[test]
fn a_panicking_handler_ends_its_process_abnormally_and_it_is_restarted() {
    let mut sup = Sup::start(&[]);
    let a = sup.ready("sup/a");
    sup.fixture.command("panic a");
    // The code every panic ends a child with, and the panic's own message.
    assert_eq!(sup.event("exited sup/a "), [a.to_string(), "code:101".into()]);
    let why = sup.event("why sup/a ").join(" ");
    assert!(
        why.starts_with("exit code 101: panicked at ") && why.ends_with(": told to panic"),
        "{why}"
    );
    sup.event("restarted sup/a ");
    assert!(
        sup.fixture.seen.iter().any(|l| l == "panic reply error")
            || sup.fixture.expect_line("panic reply") == "panic reply error"
    );
    sup.quit();
}

#[test]
fn a_panicking_task_ends_with_the_same_code_and_its_message() {
    let mut sup = Sup::start(&["--panicker"]);
    // It may panic before or after it counts as ready; either way the
    // reason says the code and the message.
    let why = sup.event("why sup/panicker ").join(" ");
    assert!(
        why.contains("exit code 101: panicked at ") && why.ends_with(": the task panicked on purpose"),
        "{why}"
    );
    sup.quit();
}

#[test]
fn a_task_that_returns_ok_is_not_restarted_by_default() {
    let mut sup = Sup::start(&["--sender-default"]);
    assert_eq!(sup.event("exited sup/sender ")[1], "normal");
    // The master's supervisor handles exits in order: once a is back, the
    // sender's exit was decided.
    sup.fixture.command("exit a 0");
    sup.event("restarted sup/a ");
    assert!(
        !sup.fixture
            .seen
            .iter()
            .any(|l| l.starts_with("event restarting sup/sender")),
        "{:#?}",
        sup.fixture.seen
    );
    sup.quit();
}

#[test]
fn forks_that_all_finish_end_their_spawn_normally() {
    let mut sup = Sup::start(&["--batch", "2", "--fork-auto", "all"]);
    // The forks' work is done: the spawn exits normally and, transient,
    // stays down.
    let exit = sup.event("exited sup/batch ");
    assert_eq!(exit[1], "normal", "{exit:?}");
    let seen = &sup.fixture.seen;
    let ready = seen.iter().find_map(|l| l.strip_prefix("event ready sup/batch "));
    assert_eq!(ready.and_then(|r| r.split(' ').next()), Some(exit[0].as_str()));
    for k in 1..=2 {
        assert!(
            seen.iter()
                .any(|l| l.starts_with(&format!("event exited sup/batch/{k} ")) && l.ends_with(" normal")),
            "{seen:#?}"
        );
    }
    assert_eq!(sup.count("batch", "sup/batch/1"), 1);
    assert_eq!(sup.count("batch", "sup/batch/2"), 1);
    sup.fixture.command("exit a 0");
    sup.event("restarted sup/a ");
    let restarted: Vec<&String> = sup
        .fixture
        .seen
        .iter()
        .filter(|l| l.starts_with("event restarting sup/batch"))
        .collect();
    assert!(restarted.is_empty(), "{restarted:#?}");
    sup.quit();
}

#[test]
fn a_significant_batch_ends_the_whole_tree_and_run_returns_ok() {
    let mut sup = Sup::launch(&[
        "--batch",
        "2",
        "--fork-auto",
        "all",
        "--significant",
        "batch",
        "--auto-shutdown",
        "any",
        "--run",
    ]);
    let status = sup.fixture.wait();
    assert!(status.success(), "{status:?}: {:#?}", sup.fixture.seen);
    let seen = &sup.fixture.seen;
    assert!(seen.iter().any(|l| l == "done"), "{seen:#?}");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("event exited sup/batch ") && l.ends_with(" normal")),
        "{seen:#?}"
    );
    // The rest of the tree was stopped, last declared first.
    assert_eq!(sup.order("stop"), ["sup/c", "sup/b", "sup/a"]);
    assert_eq!(sup.order("batch").len(), 2);
    sup.nothing_left();
}

#[test]
fn a_fork_that_keeps_failing_stays_down_while_its_siblings_serve() {
    let mut sup = Sup::start(&[
        "--pool",
        "2",
        "--crash-fork",
        "pool=2",
        "--fork-max-restarts",
        "2,60000",
        // Lower than the failing fork's restarts: they do not count here.
        "--fork-intensity",
        "1,60000",
        "--backoff",
        "20,20",
    ]);
    assert_eq!(sup.event("stays-down sup/pool/2 "), ["2"]);
    sup.event("ready sup/pool ");
    assert_eq!(sup.count("attempt", "sup/pool/2"), 3, "first start and two restarts");
    // Its sibling serves; nobody gave up.
    sup.fixture.command("ping pool 1");
    let pong = sup.fixture.expect_line("p");
    assert!(pong.starts_with("pong 1 "), "{pong}");
    assert!(
        !sup.fixture.seen.iter().any(|l| l.starts_with("event gave-up")),
        "{:#?}",
        sup.fixture.seen
    );
    assert_eq!(sup.count("start", "sup/pool/1"), 1);
    sup.quit();
}

#[test]
fn workers_learn_when_the_cluster_is_ready_and_which_fork_is_last() {
    let mut sup = Sup::start(&["--pool", "2", "--ready-probe"]);
    let everyone = ["sup/a", "sup/b", "sup/c", "sup/pool/1", "sup/pool/2"];
    support::eventually("every actor saw the cluster ready", || {
        everyone.iter().all(|path| sup.count("cluster-ready", path) == 1)
    });
    // Not before the whole tree had started.
    let records = sup.records();
    let last_start = records.iter().rposition(|(what, _)| what == "start").unwrap();
    let first_ready = records.iter().position(|(what, _)| what == "cluster-ready").unwrap();
    assert!(last_start < first_ready, "{records:?}");
    assert_eq!(sup.order("last-fork"), ["sup/pool/2"]);
    // A process started after that learns it at once.
    let a = sup.ready("sup/a");
    signal_pid(a, Signal::KILL);
    sup.event("restarted sup/a ");
    support::eventually("the restarted a saw the cluster ready", || {
        sup.count("cluster-ready", "sup/a") == 2
    });
    sup.quit();
}

#[test]
fn a_workers_forks_start_together_each_with_its_own_number() {
    let forks = 12;
    let mut sup = Sup::start(&["--pool", &forks.to_string()]);
    sup.event("ready sup/pool ");
    let seen = sup.fixture.seen.clone();
    let at = |what: &str, k: u32| -> Vec<usize> {
        let prefix = format!("event {what} sup/pool/{k} ");
        seen.iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with(&prefix))
            .map(|(i, _)| i)
            .collect()
    };
    let mut pids = Vec::new();
    let (mut last_forked, mut first_ready) = (0, usize::MAX);
    for k in 1..=forks {
        let (forked, ready) = (at("forked", k), at("ready", k));
        assert_eq!((forked.len(), ready.len()), (1, 1), "fork {k}: {seen:#?}");
        last_forked = last_forked.max(forked[0]);
        first_ready = first_ready.min(ready[0]);
        pids.push(seen[ready[0]].split(' ').nth(3).expect("a pid").to_owned());
        // Each process runs as its own fork number, once.
        assert_eq!(sup.count("start", &format!("sup/pool/{k}")), 1);
    }
    // Launched together: every fork had been started before the first was ready.
    assert!(last_forked < first_ready, "{seen:#?}");
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), forks as usize, "one process per fork");
    sup.fixture.signal(Signal::TERM);
    assert!(sup.fixture.wait().success());
    sup.nothing_left();
}
