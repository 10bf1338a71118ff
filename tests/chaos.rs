//! Chaos, bounded: 50,000 calls with a 500 ms deadline each from 8 callers
//! in the master to a worker with 3 forks, while a random live fork is
//! SIGKILLed every 200 ms, the worker is rolled once half-way through, and
//! one call in a thousand is held back past its deadline (the `chaos-fixture`
//! binary, see `evilcluster_suite::chaos`). Every call must end, none with a
//! wrong answer, and the callers' memory stays bounded.
//! Run with `--nocapture` to see the counts.
#![cfg(unix)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::{processes_with_arg, Fixture, DEADLINE};

/// Whether a call that ends later than its deadline + 50 ms fails the test.
/// Deadlines are instants kept by the caller's own runtime, so none should.
const ASSERT_NO_LATE_CALLS: bool = true;

/// The bound the task sets on the whole run, start to exit.
const RUN_BOUND: Duration = Duration::from_secs(60);

/// How much the caller process's resident memory may grow during the load.
const RSS_GROWTH_MAX_KIB: u64 = 64 * 1024;

/// Errors that no amount of killing explains: the two ends disagree, or the
/// caller is broken.
const BUG_KINDS: [&str; 5] = ["NotInCluster", "UnknownMessage", "Encode", "Decode", "TooLarge"];

const REQUESTS: u64 = 50_000;

/// The fixture's master; dropping it kills it and waits until every process
/// of the run is gone (its children die with it), pass or fail.
struct Run {
    fixture: Fixture,
    run_id: String,
    _dir: tempfile::TempDir,
}

impl Run {
    fn start(args: &[&str]) -> Run {
        let dir = tempfile::tempdir().expect("temp dir");
        let run_id = format!("run-{}", dir.path().display());
        let mut all = args.to_vec();
        all.extend(["--run-id", &run_id]);
        // Kills make the survivors log warnings by the dozen: errors only.
        let fixture = Fixture::launch(env!("CARGO_BIN_EXE_chaos-fixture"), &all, "error");
        Run {
            fixture,
            run_id,
            _dir: dir,
        }
    }

    fn nothing_left(&self) {
        support::eventually("no process of the run is left", || {
            processes_with_arg(&self.run_id).is_empty()
        });
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.fixture.kill();
        let deadline = Instant::now() + DEADLINE;
        while !processes_with_arg(&self.run_id).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn calls_under_random_fork_kills_and_a_rolling_restart_all_end_correctly() {
    let launched = Instant::now();
    let requests = REQUESTS.to_string();
    // A fixed seed: the same values, stalls and choices of victim every run
    // (the timing still varies).
    let mut run = Run::start(&[
        "--requests",
        &requests,
        "--callers",
        "8",
        "--timeout-ms",
        "500",
        "--stall-ppm",
        "1000",
        "--seed",
        "20261130",
    ]);
    let summary = run.fixture.expect_line("summary ");
    let status = run.fixture.wait();
    let took = launched.elapsed();
    // The report, for `--nocapture`.
    for line in &run.fixture.seen {
        println!("{line}");
    }
    assert!(status.success(), "{status:?}: {:#?}", run.fixture.seen);
    run.nothing_left();
    let left = support::files_below(run.fixture.tmp.path());
    assert!(left.iter().all(|p| p.is_dir()), "left behind: {left:?}");

    let counts: HashMap<&str, &str> = summary
        .split(' ')
        .skip(1)
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let count = |key: &str| -> u64 {
        counts
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {summary}"))
            .parse()
            .expect("a count")
    };
    assert_eq!(count("sent"), REQUESTS, "{summary}");
    assert_eq!(count("ended"), REQUESTS, "every call ended: {summary}");
    assert_eq!(count("wrong"), 0, "{summary}");
    for kind in BUG_KINDS {
        assert!(!counts.contains_key(format!("error.{kind}").as_str()), "{summary}");
    }
    // The chaos happened: forks were killed, stalled calls timed out (about
    // 50 are stalled; a kill of their fork ends some as Disconnected), and
    // the rolling restart ran.
    assert!(count("kills") >= 1, "{summary}");
    assert!(count("error.Timeout") >= 1, "{summary}");
    assert!(counts["roll"].starts_with("ok:"), "{summary}");
    let growth = count("rss_max_kib").saturating_sub(count("rss_start_kib"));
    assert!(growth < RSS_GROWTH_MAX_KIB, "caller RSS grew {growth} KiB: {summary}");
    let late = count("late");
    if ASSERT_NO_LATE_CALLS || std::env::var_os("CHAOS_STRICT_DEADLINES").is_some_and(|v| v == "1") {
        assert_eq!(late, 0, "calls ended later than their deadline + 50 ms: {summary}");
    } else if late > 0 {
        eprintln!("note: {late} calls ended later than their deadline + 50 ms (reported, not asserted)");
    }
    assert!(took < RUN_BOUND, "the run took {took:?}");
}
