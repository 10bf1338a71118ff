//! How the cost of a cluster grows with its tree: one spawn with N forks of a
//! tiny actor, for N = 1, 8, 32, 128 and 256 (issue 12, "Scale").
//!
//! ```text
//! cargo run --release --example scale                  # every size, one table
//! cargo run --release --example scale -- 8 32          # only these sizes
//! cargo run --release --example scale -- --spawns      # N spawns (no forks) instead
//! ```
//!
//! The driver runs each size in a fresh master process (this program again,
//! with `--one N`) one after another, and prints one row per size:
//!
//! - **ready**: from the `Cluster` start in the master to the whole tree
//!   ready (`Cluster::start` returning), total and per process;
//! - **PSS**: the proportional set size summed over every process of the
//!   tree (`/proc/PID/smaps_rollup`: shared pages counted once), per
//!   process, and the master's and a (median) fork's own in KiB, taken
//!   once the tree has served the requests below (as the raw echo's is);
//! - **propagation**: one fork SIGKILLed and restarted at once: from the
//!   master's directory seeing the new process to one other fork's
//!   directory seeing it (**prop1**, polled with single requests), and to
//!   every fork's (**propN**, polled with broadcasts: an upper bound, to
//!   within one broadcast);
//! - **broadcast**: the median of 20 broadcasts (`SCALE_BROADCASTS=n` for
//!   another count) of a tiny request to every fork, divided by the number
//!   of forks (µs per instance);
//! - **rr / one**: 2,000 sequential requests (`SCALE_CALLS=n` for another
//!   count, here and in the raw baseline) through the worker's name
//!   (round robin over the forks) against 2,000 to one fork: the ratio;
//!   **cycle**: 2,000 to each fork in turn, picked by number: what changing
//!   the receiving process costs without the round robin;
//! - **raw**: the same figures with no runtime at all, once the tree is
//!   gone: N echo processes (this program again) behind raw
//!   length-framed Unix sockets; **ready**: all N started at once, until
//!   each has answered one echo; **KiB**: an echo process's PSS (the
//!   median), beside a fork's; a broadcast (a frame written to each, then
//!   every echo read; median of as many as above, per instance), and 2,000
//!   sequential echoes to the first (**one**) against round robin over all
//!   N (**rr/1**): what this machine charges for waking many processes, and
//!   a different one each time; and **stop**: every echo process told to
//!   exit at once, until the last is gone (no tree, no goodbyes);
//! - **stop**: `ClusterHandle::shutdown` (every process gone), total and
//!   per process;
//! - **fds** and **sockets** per process: open descriptors and those that
//!   are sockets, in the master and the largest in any child.
//!
//! Read ratios and growth with N, not absolute times: the machine is shared.
//! The runtime logs to stderr (`RUST_LOG=warn` by default here).

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use evilcluster::prelude::*;
use evilcluster_suite::bench::{self, RawEchoServer};

/// The tiny actor every fork hosts.
#[derive(Default)]
struct Tiny;

impl Actor for Tiny {
    type Context = Context<Self>;
}

/// Answers the fork number.
#[derive(Clone, Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "u32")]
#[remote(tag = "scale.ping")]
struct Ping;

/// Whether this process's directory has `path` as process `pid`.
#[derive(Clone, Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "bool")]
#[remote(tag = "scale.sees")]
struct Sees {
    path: String,
    pid: u32,
}

impl Handler<Ping> for Tiny {
    type Result = u32;
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> u32 {
        evilcluster::fork_number().map_or(0, |(number, _)| number)
    }
}

impl Handler<Sees> for Tiny {
    type Result = bool;
    fn handle(&mut self, sees: Sees, _: &mut Context<Self>) -> bool {
        evilcluster::members()
            .iter()
            .any(|m| m.path == sees.path && m.pid == sees.pid)
    }
}

impl RemoteActor for Tiny {
    const NAME: &'static str = "tiny";
    type Messages = evilcluster::messages![Ping, Sees];
}

const SIZES: [u32; 5] = [1, 8, 32, 128, 256];

fn cluster(forks: u32) -> Cluster {
    Cluster::new("scale").start_timeout(Duration::from_secs(60)).spawn(
        Worker::actor::<Tiny>()
            .forks(forks)
            .backoff(Backoff::none())
            .fork_intensity(1000, Duration::from_secs(60)),
    )
}

/// N spawns of a task that waits (no forks): spawns start one at a time,
/// each ready before the next, by design.
fn spawns(n: u32) -> Cluster {
    (1..=n).fold(
        Cluster::new("scale").start_timeout(Duration::from_secs(60)),
        |cluster, i| {
            cluster.spawn(Worker::task(format!("t{i}"), || async {
                std::future::pending::<()>().await;
                Ok(())
            }))
        },
    )
}

fn main() -> ExitCode {
    // The raw echo processes of the baseline are this program again.
    bench::serve_raw_echo_if_requested();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [one, n] if one == "--one-spawns" => one_run(n, "a number of spawns", spawns, one_spawns),
        [flag, sizes @ ..] if flag == "--spawns" => drive(sizes, true),
        [one, n] if one == "--one" => one_run(n, "a number of forks", cluster, one_size),
        sizes => drive(sizes, false),
    }
}

/// One size, in a fresh master (`measure`) and in the processes it starts
/// (`declare(n).run()`).
fn one_run(n: &str, takes: &str, declare: fn(u32) -> Cluster, measure: fn(u32) -> ExitCode) -> ExitCode {
    let Ok(n) = n.parse::<u32>() else {
        eprintln!("{takes} was expected, not {n:?}");
        return ExitCode::from(2);
    };
    if !evilcluster::is_master() {
        return match declare(n).run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    measure(n)
}

/// Runs each size in a master of its own, one after another; prints the table.
fn drive(sizes: &[String], spawns: bool) -> ExitCode {
    let sizes: Vec<u32> = if sizes.is_empty() {
        SIZES.to_vec()
    } else {
        match sizes.iter().map(|s| s.parse()).collect() {
            Ok(sizes) => sizes,
            Err(_) => {
                eprintln!("usage: scale [N ...]   (numbers of forks; default 1 8 32 128 256)");
                return ExitCode::from(2);
            }
        }
    };
    let exe = std::env::current_exe().expect("this program's path");
    if spawns {
        println!(
            "evilcluster scale: N spawns of a waiting task, no forks (release build; CPUs: {})",
            cpus()
        );
        println!(
            "{:>5} {:>6} | {:>9} {:>8} | {:>9} {:>8} | {:>9} {:>8} | {:>11}",
            "N", "procs", "ready ms", "ms/proc", "PSS MiB", "KiB/proc", "stop ms", "ms/proc", "fds m/max"
        );
    } else {
        println!(
            "evilcluster scale: one spawn with N forks of a tiny actor (release build; CPUs: {})",
            cpus()
        );
        println!(
            "{:>5} {:>6} | {:>9} {:>8} | {:>9} {:>8} {:>7} {:>7} | {:>8} {:>8} | {:>9} | {:>7} {:>7} {:>5} {:>8} | {:>9} {:>7} {:>9} {:>7} {:>8} {:>8} | {:>9} {:>8} | {:>11} {:>11}",
            "N",
            "procs",
            "ready ms",
            "ms/proc",
            "PSS MiB",
            "KiB/proc",
            "master",
            "fork",
            "prop1 ms",
            "propN ms",
            "bcast us",
            "rr us",
            "one us",
            "rr/1",
            "cycle us",
            "raw ready",
            "raw KiB",
            "raw bcast",
            "raw one",
            "raw rr/1",
            "raw stop",
            "stop ms",
            "ms/proc",
            "fds m/max",
            "socks m/max"
        );
    }
    let mut code = ExitCode::SUCCESS;
    for n in sizes {
        let mut command = Command::new(&exe);
        command.args([if spawns { "--one-spawns" } else { "--one" }, &n.to_string()]);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        match command.output() {
            Ok(out) if out.status.success() => print!("{}", String::from_utf8_lossy(&out.stdout)),
            Ok(out) => {
                eprintln!("N={n}: {}", out.status);
                eprint!("{}", String::from_utf8_lossy(&out.stderr));
                code = ExitCode::FAILURE;
            }
            Err(error) => {
                eprintln!("N={n}: cannot start: {error}");
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One size, in the master: starts the tree, measures, stops it, prints a row.
fn one_size(n: u32) -> ExitCode {
    let system = actix_rt::System::new();
    let row = system.block_on(as_task(async move {
        // More calls make the timed loops long enough to profile.
        let calls = count_from_env("SCALE_CALLS", 2000);
        let broadcasts = count_from_env("SCALE_BROADCASTS", 20) as usize;
        let began = Instant::now();
        let handle = cluster(n).start().await.map_err(|e| e.to_string())?;
        let ready = began.elapsed();
        let running = handle.running();
        let members = running.members();
        let procs = members.len(); // the master, the spawn and every fork
        let pids: Vec<u32> = members.iter().map(|m| m.pid).collect();

        // Connections to every fork first: the figures below are steady state.
        let tiny = evilcluster::addr_of::<Tiny>();
        for reply in tiny.broadcast(Ping).await {
            reply.1.map_err(|e| format!("warm-up broadcast: {e}"))?;
        }
        let mut rounds = Vec::new();
        for _ in 0..broadcasts {
            let at = Instant::now();
            let replies = tiny.broadcast(Ping).await;
            rounds.push(at.elapsed());
            if replies.iter().any(|r| r.1.is_err()) {
                return Err("a broadcast failed".to_owned());
            }
        }
        let broadcast_us = median_per_instance(rounds, n);

        // Each timed loop is warmed up by two passes over the forks: the
        // first pass after the broadcasts measured twice as slow here.
        let warm_up = warm_up(n);
        let rr = time_calls(&tiny, warm_up, calls).await?;
        let one = time_calls(&evilcluster::addr_of_fork::<Tiny>(1), warm_up, calls).await?;
        let cycle = time_cycle(n, calls).await?;
        // Memory once every process has taken in the whole membership and
        // served requests, as the raw echo's is: measured right after
        // ready, a fork of 256 had not yet (450 KiB then, 478 settled,
        // pinned to one CPU).
        let total_pss: u64 = pids.iter().filter_map(|&pid| pss_kib(pid)).sum();
        // One fork's own: what a member of the tree costs every process.
        let fork_pss = median(
            members
                .iter()
                .filter(|m| m.fork.is_some())
                .filter_map(|m| pss_kib(m.pid))
                .collect(),
        );
        let master_pss = pss_kib(std::process::id()).unwrap_or(0);
        let children: Vec<u32> = pids.iter().copied().filter(|&p| p != std::process::id()).collect();
        let fork_sockets = sockets_and_fds(&children);
        let master_fds = sockets_and_fds(&[std::process::id()]);

        let propagation = propagation(&running, n).await?;

        let stopping = Instant::now();
        handle.shutdown().await.map_err(|e| e.to_string())?;
        let stop = stopping.elapsed();
        // After the tree is gone: the raw clients' buffers must not be in
        // the master's PSS above, and a heap does not give pages back.
        let raw = raw_baseline(n, broadcasts, calls).await?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Ok::<String, String>(format!(
            "{:>5} {:>6} | {:>9.1} {:>8.2} | {:>9.1} {:>8.0} {:>7} {:>7} | {:>8.2} {:>8.1} | {:>9.1} | {:>7.1} {:>7.1} {:>5.2} {:>8.1} | {:>9.1} {:>7} {:>9.1} {:>7.1} {:>8.2} {:>8.1} | {:>9.1} {:>8.2} | {:>5}/{:<5} {:>5}/{:<5}\n",
            n,
            procs,
            ms(ready),
            ms(ready) / procs as f64,
            total_pss as f64 / 1024.0,
            total_pss as f64 / procs as f64,
            master_pss,
            fork_pss,
            ms(propagation.0),
            ms(propagation.1),
            broadcast_us,
            rr,
            one,
            rr / one,
            cycle,
            ms(raw.ready),
            raw.pss,
            raw.broadcast,
            raw.one,
            raw.round_robin / raw.one,
            ms(raw.stop),
            ms(stop),
            ms(stop) / procs as f64,
            master_fds.1,
            fork_sockets.1,
            master_fds.0,
            fork_sockets.0,
        ))
    }));
    match row {
        Ok(row) => {
            print!("{row}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("N={n}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `measure` as a task of the system, as a program's `main` runs
/// under `Cluster::run_with`: the system polls its root future again on
/// every wake-up of any of its tasks, and a wake-up of the root costs more
/// than one of a task, charged to every request measured there (the raw
/// baseline's too).
async fn as_task<T: 'static>(
    measure: impl std::future::Future<Output = Result<T, String>> + 'static,
) -> Result<T, String> {
    actix_rt::spawn(measure).await.map_err(|failed| failed.to_string())?
}

/// N spawns, in the master: time to ready, PSS, stop, descriptors.
fn one_spawns(n: u32) -> ExitCode {
    let system = actix_rt::System::new();
    let row = system.block_on(as_task(async move {
        let began = Instant::now();
        let handle = spawns(n).start().await.map_err(|e| e.to_string())?;
        let ready = began.elapsed();
        let members = handle.running().members();
        let procs = members.len();
        let pids: Vec<u32> = members.iter().map(|m| m.pid).collect();
        let total_pss: u64 = pids.iter().filter_map(|&pid| pss_kib(pid)).sum();
        let children: Vec<u32> = pids.iter().copied().filter(|&p| p != std::process::id()).collect();
        let child_fds = sockets_and_fds(&children);
        let master_fds = sockets_and_fds(&[std::process::id()]);
        let stopping = Instant::now();
        handle.shutdown().await.map_err(|e| e.to_string())?;
        let stop = stopping.elapsed();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Ok::<String, String>(format!(
            "{:>5} {:>6} | {:>9.1} {:>8.2} | {:>9.1} {:>8.0} | {:>9.1} {:>8.2} | {:>5}/{:<5}\n",
            n,
            procs,
            ms(ready),
            ms(ready) / procs as f64,
            total_pss as f64 / 1024.0,
            total_pss as f64 / procs as f64,
            ms(stop),
            ms(stop) / procs as f64,
            master_fds.1,
            child_fds.1,
        ))
    }));
    match row {
        Ok(row) => {
            print!("{row}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("N={n}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The count set in the environment variable `name`, or `default`; at least 1.
fn count_from_env(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// Requests before a timed loop: two passes over `n` forks, at least 100.
fn warm_up(n: u32) -> u32 {
    (2 * n).max(100)
}

/// Microseconds per sequential request through `addr`, after `warm_up`.
async fn time_calls(addr: &evilcluster::RemoteAddr<Tiny>, warm_up: u32, calls: u32) -> Result<f64, String> {
    for _ in 0..warm_up {
        addr.send(Ping).await.map_err(|e| e.to_string())?;
    }
    let at = Instant::now();
    for _ in 0..calls {
        addr.send(Ping).await.map_err(|e| e.to_string())?;
    }
    Ok(at.elapsed().as_secs_f64() * 1e6 / f64::from(calls))
}

/// Microseconds per sequential request, each to the next fork by number
/// (what round robin does, picked by hand: the cost of changing process).
async fn time_cycle(n: u32, calls: u32) -> Result<f64, String> {
    let forks: Vec<_> = (1..=n).map(evilcluster::addr_of_fork::<Tiny>).collect();
    for i in 0..warm_up(n) {
        forks[(i % n) as usize].send(Ping).await.map_err(|e| e.to_string())?;
    }
    let at = Instant::now();
    for i in 0..calls {
        forks[(i % n) as usize].send(Ping).await.map_err(|e| e.to_string())?;
    }
    Ok(at.elapsed().as_secs_f64() * 1e6 / f64::from(calls))
}

/// What the machine gives with no runtime: the time to start the processes
/// and have each answer once, and one's PSS (KiB); microseconds per
/// instance of a broadcast, per echo of round robin and per echo to one
/// process; the time to stop all the processes.
struct RawBaseline {
    ready: Duration,
    pss: u64,
    broadcast: f64,
    round_robin: f64,
    one: f64,
    stop: Duration,
}

/// Measures [`RawBaseline`] over raw framed sockets to `n` echo processes.
/// Starting the processes blocks this thread, which has nothing else to do
/// yet; dropping them stops them.
async fn raw_baseline(n: u32, broadcasts: usize, calls: u32) -> Result<RawBaseline, String> {
    let fail = |e: &dyn std::fmt::Display| format!("raw baseline: {e}");
    let began = Instant::now();
    let servers = RawEchoServer::start_many(n as usize).map_err(|e| fail(&e))?;
    let mut clients = Vec::with_capacity(servers.len());
    for server in &servers {
        let mut client = server.connect().await.map_err(|e| fail(&e))?;
        client.round_trips(1).await.map_err(|e| fail(&e))?;
        clients.push(client);
    }
    let ready = began.elapsed();
    let pss = median(servers.iter().filter_map(|s| pss_kib(s.pid())).collect());
    // Each answers twice before the broadcasts, as before `raw ready` was timed.
    for client in &mut clients {
        client.round_trips(1).await.map_err(|e| fail(&e))?;
    }
    let mut rounds = Vec::with_capacity(broadcasts);
    for seq in 0..broadcasts as u64 {
        let at = Instant::now();
        for client in &mut clients {
            client.send(seq).await.map_err(|e| fail(&e))?;
        }
        for client in &mut clients {
            client.receive(seq).await.map_err(|e| fail(&e))?;
        }
        rounds.push(at.elapsed());
    }
    for i in 0..warm_up(n) {
        clients[(i % n) as usize].round_trips(1).await.map_err(|e| fail(&e))?;
    }
    let at = Instant::now();
    for i in 0..calls {
        clients[(i % n) as usize].round_trips(1).await.map_err(|e| fail(&e))?;
    }
    let round_robin = at.elapsed().as_secs_f64() * 1e6 / f64::from(calls);
    clients[0]
        .round_trips(u64::from(warm_up(n)))
        .await
        .map_err(|e| fail(&e))?;
    let one = clients[0].round_trips(u64::from(calls)).await.map_err(|e| fail(&e))?;
    Ok(RawBaseline {
        ready,
        pss,
        broadcast: median_per_instance(rounds, n),
        round_robin,
        one: one.as_secs_f64() * 1e6 / f64::from(calls),
        stop: bench::stop_all(servers),
    })
}

/// The median of `rounds`, in microseconds, divided by `n`.
fn median_per_instance(rounds: Vec<Duration>, n: u32) -> f64 {
    median(rounds).as_secs_f64() * 1e6 / f64::from(n)
}

/// SIGKILLs one fork; once the master's directory has its successor, how
/// long until every fork's directory has it too.
async fn propagation(running: &evilcluster::RunningCluster, n: u32) -> Result<(Duration, Duration), String> {
    let victim = n.div_ceil(2);
    let path = format!("scale/tiny/{victim}");
    let old = running
        .members()
        .into_iter()
        .find(|m| m.path == path)
        .ok_or("no victim")?
        .pid;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(old as i32).ok_or("bad pid")?,
        rustix::process::Signal::KILL,
    )
    .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        if let Some(m) = running.members().into_iter().find(|m| m.path == path && m.pid != old) {
            break m.pid;
        }
        if Instant::now() > deadline {
            return Err("the killed fork did not come back".into());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    let seen_by_master = Instant::now();
    // One chosen fork (the last, or the only one), asked again and again
    // with single requests: a close figure for one process.
    let witness = evilcluster::addr_of_fork::<Tiny>(if victim == n { 1 } else { n });
    let one = loop {
        if witness
            .send(Sees {
                path: path.clone(),
                pid: new,
            })
            .await
            .map_err(|e| e.to_string())?
        {
            break seen_by_master.elapsed();
        }
        if Instant::now() > deadline {
            return Err("the restarted fork was never seen by the witness".into());
        }
    };
    let tiny = evilcluster::addr_of::<Tiny>().timeout(Duration::from_secs(10));
    loop {
        let replies = tiny
            .broadcast(Sees {
                path: path.clone(),
                pid: new,
            })
            .await;
        if replies.iter().all(|r| matches!(r.1, Ok(true))) {
            return Ok((one, seen_by_master.elapsed()));
        }
        if Instant::now() > deadline {
            return Err("the restarted fork was never seen by every fork".into());
        }
    }
}

/// The middle of `values` (zero when there are none).
fn median<T: Ord + Copy + Default>(mut values: Vec<T>) -> T {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// Proportional set size of process `pid`, in KiB.
fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The largest count of (socket descriptors, descriptors) among `pids`.
fn sockets_and_fds(pids: &[u32]) -> (usize, usize) {
    let mut most = (0, 0);
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let (mut sockets, mut fds) = (0, 0);
        for entry in entries.flatten() {
            fds += 1;
            if std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
                sockets += 1;
            }
        }
        most = (most.0.max(sockets), most.1.max(fds));
    }
    most
}
