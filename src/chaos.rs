//! The chaos harness shared by `examples/chaos.rs` (long runs) and the
//! `chaos-fixture` binary of `tests/chaos.rs` (a bounded run).
//!
//! ```text
//! chaos (master)      callers: tasks sending `Check(x)` with a per-call timeout,
//! │                   a killer: SIGKILLs a random live fork every 200 ms,
//! │                   and one rolling restart of the worker half-way through
//! └── chaosEcho (spawn)
//!     ├── 1 (fork)    answers `Check(x)` with `expected(x)`
//!     ├── 2 (fork)
//!     └── 3 (fork)
//! ```
//!
//! A few calls (`--stall-ppm`, per million) ask the fork to wait twice their
//! deadline before answering: those must end with `SendError::Timeout` on
//! time, which is what the late count watches.
//!
//! Every call's outcome is counted: a correct answer, a wrong one, or the
//! typed [`SendError`] variant; and separately, whether it ended later than
//! its deadline plus [`LATE_SLACK`]. The caller process's resident memory is
//! sampled at the start, every kill tick, and at the end. The master prints a
//! table, then one `summary key=value ...` line for tools and tests.
//!
//! Arguments (every process sees them and declares the same tree):
//! `--requests N` (default: the binary's), `--callers N` (16),
//! `--timeout-ms MS` (500), `--kill-every-ms MS` (200, 0: no kills),
//! `--forks N` (3), `--stall-ppm N` (1000), `--no-roll`, `--seed N`; any
//! other argument is ignored.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use evilcluster::prelude::*;
use evilcluster::Backoff;

/// How much later than its deadline a call may end before it counts as late.
pub const LATE_SLACK: Duration = Duration::from_millis(50);

/// The worker's name (and its actor's).
pub const ECHO: &str = "chaosEcho";

/// What a run does; read from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Calls to make in all.
    pub requests: u64,
    /// Concurrent callers, each with one call in flight.
    pub callers: usize,
    /// Each call's deadline (its timeout, and its resolve timeout).
    pub timeout: Duration,
    /// How often a random live fork is SIGKILLed (zero: never).
    pub kill_every: Duration,
    /// Forks of the echo worker.
    pub forks: u32,
    /// Whether one rolling restart runs half-way through.
    pub roll: bool,
    /// Calls per million whose answer is held back twice their deadline.
    pub stall_ppm: u64,
    /// Seeds the random values and the choice of victims.
    pub seed: u64,
}

impl Settings {
    /// The settings the command line gives, `requests` unless it says.
    pub fn from_args(requests: u64) -> Settings {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| {
            let at = args.iter().position(|a| a == name)?;
            let text = args.get(at + 1)?;
            Some(
                text.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name} takes a number, not {text:?}")),
            )
        };
        Settings {
            requests: value("--requests").unwrap_or(requests),
            callers: value("--callers").map_or(16, |n| n.max(1) as usize),
            timeout: Duration::from_millis(value("--timeout-ms").unwrap_or(500)),
            kill_every: Duration::from_millis(value("--kill-every-ms").unwrap_or(200)),
            forks: value("--forks").map_or(3, |n| n.clamp(1, 64) as u32),
            roll: !args.iter().any(|a| a == "--no-roll"),
            stall_ppm: value("--stall-ppm").unwrap_or(1000).min(1_000_000),
            seed: value("--seed").unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            }),
        }
    }
}

/// Asks for [`expected`]`(x)`, answered after `stall_ms` (0 for most calls).
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Answer")]
pub struct Check {
    /// The value asked about.
    pub x: u64,
    /// How long the fork holds the answer back.
    pub stall_ms: u32,
}

/// The answer to `Check(x)`: the same in every fork, so a caller can tell a
/// right answer from a wrong one (another call's, or a corrupted one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The value asked about, echoed.
    pub echo: u64,
    /// `x * 2`, wrapping.
    pub doubled: u64,
    /// A mix of every bit of `x`.
    pub digest: u64,
}

evilcluster::remote_messages! { Check => "chaos.check" }

/// The one right answer to `Check(x)`.
pub fn expected(x: u64) -> Answer {
    Answer {
        echo: x,
        doubled: x.wrapping_mul(2),
        digest: mix(x),
    }
}

/// The splitmix64 finaliser: every output bit depends on every input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small deterministic generator (splitmix64): no dependency for values
/// that only need to differ.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
}

/// The actor every fork hosts.
#[derive(Default)]
pub struct ChaosEcho;

impl Actor for ChaosEcho {
    type Context = Context<Self>;
}

impl Handler<Check> for ChaosEcho {
    type Result = ResponseFuture<Answer>;
    fn handle(&mut self, Check { x, stall_ms }: Check, _: &mut Context<Self>) -> Self::Result {
        let answer = expected(x);
        if stall_ms == 0 {
            return Box::pin(std::future::ready(answer));
        }
        // Held back without blocking the actor: the fork keeps answering
        // the other calls meanwhile.
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(stall_ms.into())).await;
            answer
        })
    }
}

impl RemoteActor for ChaosEcho {
    const NAME: &'static str = ECHO;
    type Messages = evilcluster::messages![Check];
}

/// How one kind of outcome went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// Calls that ended this way.
    pub count: u64,
    /// The longest of them.
    pub slowest: Duration,
    /// Those that ended later than their deadline plus [`LATE_SLACK`].
    pub late: u64,
}

impl Outcome {
    fn add(&mut self, elapsed: Duration, late: bool) {
        self.count += 1;
        self.slowest = self.slowest.max(elapsed);
        self.late += u64::from(late);
    }
}

/// What a run saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The settings it ran with.
    pub requests: u64,
    /// Calls started.
    pub sent: u64,
    /// Correct answers.
    pub ok: Outcome,
    /// Answers other than [`expected`].
    pub wrong: Outcome,
    /// Errors, by [`SendError`] variant name.
    pub errors: BTreeMap<String, Outcome>,
    /// Forks SIGKILLed.
    pub kills: u64,
    /// Kill ticks that found no live fork to kill.
    pub no_victim: u64,
    /// The rolling restart's outcome, and how many times it was asked.
    pub roll: Option<(u32, Result<u32, String>)>,
    /// The caller process's resident memory, in KiB.
    pub rss_start_kib: u64,
    /// The largest sample.
    pub rss_max_kib: u64,
    /// At the end of the load.
    pub rss_end_kib: u64,
    /// How long the load ran.
    pub elapsed: Duration,
}

impl Report {
    /// Calls that ended, one way or another.
    pub fn ended(&self) -> u64 {
        self.ok.count + self.wrong.count + self.errors.values().map(|o| o.count).sum::<u64>()
    }

    /// Calls that ended later than their deadline plus [`LATE_SLACK`].
    pub fn late(&self) -> u64 {
        self.ok.late + self.wrong.late + self.errors.values().map(|o| o.late).sum::<u64>()
    }

    fn record(&mut self, x: u64, outcome: Result<Answer, SendError>, elapsed: Duration, deadline: Duration) {
        let late = elapsed > deadline + LATE_SLACK;
        match outcome {
            Ok(answer) if answer == expected(x) => self.ok.add(elapsed, late),
            Ok(_) => self.wrong.add(elapsed, late),
            Err(error) => self.errors.entry(variant(&error)).or_default().add(elapsed, late),
        }
    }

    /// Prints the table, then the `summary` line.
    pub fn print(&self, settings: &Settings) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "chaos: {} requests, {} callers, {} forks, deadline {:?} (+{:?} slack), a fork SIGKILLed every {:?}, \
             {} per million calls stalled, seed {}",
            self.requests,
            settings.callers,
            settings.forks,
            settings.timeout,
            LATE_SLACK,
            settings.kill_every,
            settings.stall_ppm,
            settings.seed
        );
        println!(
            "| {:<24} | {:>9} | {:>6} | {:>10} |",
            "outcome", "count", "late", "slowest ms"
        );
        println!("|{:-<26}|{:->11}|{:->8}|{:->12}|", "", "", "", "");
        let row = |name: &str, o: &Outcome| {
            println!(
                "| {name:<24} | {:>9} | {:>6} | {:>10.1} |",
                o.count,
                o.late,
                ms(o.slowest)
            );
        };
        row("correct answer", &self.ok);
        row("wrong answer", &self.wrong);
        for (name, outcome) in &self.errors {
            row(&format!("SendError::{name}"), outcome);
        }
        row(
            "all",
            &Outcome {
                count: self.ended(),
                slowest: self
                    .errors
                    .values()
                    .chain([&self.ok, &self.wrong])
                    .map(|o| o.slowest)
                    .max()
                    .unwrap_or_default(),
                late: self.late(),
            },
        );
        let roll = match &self.roll {
            None => "not run".to_owned(),
            Some((asked, Ok(n))) => format!("restarted {n} forks (asked {asked} times)"),
            Some((asked, Err(why))) => format!("failed after {asked} asks: {why}"),
        };
        println!(
            "sent {}, ended {}; {} kills ({} ticks without a live fork); rolling restart: {roll}",
            self.sent,
            self.ended(),
            self.kills,
            self.no_victim
        );
        println!(
            "caller RSS: start {} KiB, max {} KiB, end {} KiB; {:.1} s, {:.0} calls/s",
            self.rss_start_kib,
            self.rss_max_kib,
            self.rss_end_kib,
            self.elapsed.as_secs_f64(),
            self.ended() as f64 / self.elapsed.as_secs_f64().max(1e-9)
        );
        let mut summary = format!(
            "summary requests={} sent={} ended={} ok={} wrong={} late={} kills={} no_victim={} roll={} \
             rss_start_kib={} rss_max_kib={} rss_end_kib={} elapsed_ms={}",
            self.requests,
            self.sent,
            self.ended(),
            self.ok.count,
            self.wrong.count,
            self.late(),
            self.kills,
            self.no_victim,
            match &self.roll {
                None => "none".to_owned(),
                Some((_, Ok(n))) => format!("ok:{n}"),
                Some((_, Err(_))) => "failed".to_owned(),
            },
            self.rss_start_kib,
            self.rss_max_kib,
            self.rss_end_kib,
            self.elapsed.as_millis()
        );
        for (name, outcome) in &self.errors {
            summary.push_str(&format!(" error.{name}={}", outcome.count));
        }
        println!("{summary}");
    }
}

/// The variant's name: the counts stay typed without listing every
/// variant here (the enum is non-exhaustive).
fn variant(error: &SendError) -> String {
    let debug = format!("{error:?}");
    debug.split([' ', '{', '(']).next().unwrap_or("Unknown").to_owned()
}

/// This process's resident set size, in KiB (0 where /proc has no answer).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The parent of `pid`, from /proc: a pid in the directory could have been
/// reused by an unrelated process since, and the killer must not touch it.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The declared tree: the same in every process.
pub fn cluster(settings: &Settings) -> Cluster {
    Cluster::new("chaos").spawn(
        Worker::actor::<ChaosEcho>()
            .forks(settings.forks)
            // Kills are the point: the spawn must never give up on its forks,
            // and a killed fork should come back at once rather than after a
            // growing backoff.
            .fork_intensity(u32::MAX, Duration::from_secs(1))
            .backoff(Backoff::exponential(
                Duration::from_millis(10),
                Duration::from_millis(50),
            )),
    )
}

/// Runs the harness: the cluster, the load, the chaos; prints the report.
/// `requests` is the default for `--requests`.
pub fn main(requests: u64) -> ExitCode {
    let settings = Settings::from_args(requests);
    let load = settings.clone();
    match cluster(&settings).run_with(move |_| run(load)) {
        Ok(report) => {
            report.print(&settings);
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("FAIL cluster: {error}");
            ExitCode::from(2)
        }
    }
}

/// The load and the chaos, from the master once the tree is ready.
pub async fn run(settings: Settings) -> Report {
    let report = Rc::new(RefCell::new(Report {
        requests: settings.requests,
        rss_start_kib: rss_kib(),
        ..Report::default()
    }));
    {
        let mut r = report.borrow_mut();
        r.rss_max_kib = r.rss_start_kib;
    }
    let started = Instant::now();
    let issued = Rc::new(Cell::new(0u64));
    let done = Rc::new(Cell::new(false));
    let mut seeds = Rng(settings.seed);
    let killer = actix_rt::spawn(chaos(
        settings.clone(),
        Rng(seeds.next()),
        issued.clone(),
        done.clone(),
        report.clone(),
    ));
    let callers: Vec<_> = (0..settings.callers)
        .map(|_| {
            actix_rt::spawn(caller(
                settings.clone(),
                Rng(seeds.next()),
                issued.clone(),
                report.clone(),
            ))
        })
        .collect();
    for caller in callers {
        caller.await.expect("a caller panicked");
    }
    done.set(true);
    let roll = killer.await.expect("the killer panicked");
    let mut report = report.borrow().clone();
    report.roll = roll;
    report.sent = issued.get();
    report.elapsed = started.elapsed();
    report.rss_end_kib = rss_kib();
    report.rss_max_kib = report.rss_max_kib.max(report.rss_end_kib);
    report
}

/// One caller: a call at a time, until every request has been issued.
async fn caller(settings: Settings, mut rng: Rng, issued: Rc<Cell<u64>>, report: Rc<RefCell<Report>>) {
    // The deadline covers resolving the name too: with every fork down at
    // once, a call must not wait the default 10 s for one to come back.
    let echo = addr_of::<ChaosEcho>()
        .timeout(settings.timeout)
        .resolve_timeout(settings.timeout);
    // Twice the deadline: a stalled call always times out.
    let stall_ms = u32::try_from(settings.timeout.as_millis() * 2).unwrap_or(u32::MAX);
    while issued.get() < settings.requests {
        issued.set(issued.get() + 1);
        let x = rng.next();
        let stalled = rng.next() % 1_000_000 < settings.stall_ppm;
        let check = Check {
            x,
            stall_ms: if stalled { stall_ms } else { 0 },
        };
        let began = Instant::now();
        let outcome = echo.send(check).await;
        let elapsed = began.elapsed();
        report.borrow_mut().record(x, outcome, elapsed, settings.timeout);
    }
}

/// Every `kill_every`: samples memory and SIGKILLs a random live fork; once
/// half the requests are issued, starts the rolling restart. Ends when the
/// load is done (and the restart too); returns the restart's outcome.
async fn chaos(
    settings: Settings,
    mut rng: Rng,
    issued: Rc<Cell<u64>>,
    done: Rc<Cell<bool>>,
    report: Rc<RefCell<Report>>,
) -> Option<(u32, Result<u32, String>)> {
    let mut roll = None;
    let period = if settings.kill_every.is_zero() {
        Duration::from_millis(200)
    } else {
        settings.kill_every
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // The first tick is immediate.
    while !done.get() {
        tick.tick().await;
        if done.get() {
            break;
        }
        {
            let mut r = report.borrow_mut();
            r.rss_max_kib = r.rss_max_kib.max(rss_kib());
        }
        if !settings.kill_every.is_zero() {
            kill_a_fork(&mut rng, &report);
        }
        if settings.roll && roll.is_none() && issued.get() >= settings.requests / 2 {
            roll = Some(actix_rt::spawn(roll_once()));
        }
    }
    match roll {
        Some(roll) => Some(roll.await.expect("the rolling restart panicked")),
        None => None,
    }
}

fn kill_a_fork(rng: &mut Rng, report: &RefCell<Report>) {
    let members = evilcluster::members();
    let spawn = members
        .iter()
        .find(|m| m.worker() == ECHO && m.fork.is_none())
        .map(|m| m.pid);
    let forks: Vec<u32> = members
        .iter()
        .filter(|m| m.actor() == Some(ECHO) && m.fork.is_some())
        .map(|m| m.pid)
        .filter(|&pid| spawn.is_some() && parent_of(pid) == spawn)
        .collect();
    let mut report = report.borrow_mut();
    if forks.is_empty() {
        report.no_victim += 1;
        return;
    }
    let victim = forks[(rng.next() % forks.len() as u64) as usize];
    let Some(pid) = rustix::process::Pid::from_raw(victim as i32) else {
        return;
    };
    // It may have died since the directory listed it: then nothing to do.
    if rustix::process::kill_process(pid, rustix::process::Signal::KILL).is_ok() {
        report.kills += 1;
    }
}

/// One rolling restart of the echo worker (asked again if the killer shot
/// a fork it was bringing up). The spawn refuses one while a
/// fork is starting (as killed forks keep doing): asked again until it runs.
async fn roll_once() -> (u32, Result<u32, String>) {
    let mut asked = 0;
    loop {
        asked += 1;
        match evilcluster::restart_worker(ECHO).await {
            Ok(restarted) => return (asked, Ok(restarted)),
            // The refusal is only told in words (`Error::RestartFailed`'s reason).
            Err(error) if error.to_string().contains("try again") && asked < 200 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The killer shot a fork the roll had just started (on a loaded
            // machine a start takes long enough to be hit): that roll is over,
            // typed as it should be; roll again.
            Err(error) if error.to_string().contains("did not come back") && asked < 20 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => return (asked, Err(error.to_string())),
        }
    }
}
