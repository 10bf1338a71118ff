//! Compares evilcluster's transport with a raw length-framed Unix socket,
//! and prints a small table (the one in the README).
//!
//! Three processes: this master, the `bench.echo` worker (an evilcluster
//! child) and a raw echo server (this executable again, see
//! `evilcluster_suite::bench`). Each round measures, in turn:
//!
//! - round trip: 20,000 sequential echoes, each awaited before the next;
//! - pipelined: 200,000 echoes with up to 1,024 in flight, as one future
//!   per call (`buffer_unordered`) and as one `send_all` stream; the raw
//!   socket both without futures and with one future per call (a channel
//!   each, the least such a client costs);
//! - do_send: 200,000 `do_send`s, then one `send` to wait for all of them;
//! - large payloads: sequential echoes of 16 KiB, 256 KiB, 1 MiB and 4 MiB
//!   (the request carries the bytes and so does the reply), against the raw
//!   socket echoing frames of the same size.
//!
//! Beside the round trip it prints a blocking C `socketpair` ping-pong of
//! the same length (built with `cc` when there is one): the floor under any
//! runtime. `TRANSPORT_COMPARE_SECTIONS=small` or `=large` runs one half.
//!
//! The table shows the median of 5 rounds. Both clients run on the master's
//! actix runtime thread, where the runtime's connection tasks live.
//!
//! ```text
//! cargo run --release --example transport_compare
//! ```
//!
//! Round trips are dominated by how fast the OS wakes a sleeping process
//! on another CPU. On virtual machines whose idle vCPUs halt, that wake-up
//! can cost tens of microseconds and vary from run to run (even making the
//! raw socket look slower than evilcluster). To compare the software paths
//! alone, run everything on one CPU (children inherit the affinity):
//!
//! ```text
//! taskset -c 0 target/release/examples/transport_compare
//! ```
//!
//! The runtime logs to stderr (`RUST_LOG=warn` quiets it); the table goes to
//! stdout. It stops every process it started and removes their sockets.

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use evilcluster::Cluster;
use evilcluster_suite::bench::{self, BenchError, CSocketpair, ClusterClient, RawClient, RawEchoServer};

const ROUNDS: usize = 5;
const ROUND_TRIPS: u64 = 20_000;
const PIPELINED: u64 = 200_000;
const DO_SENDS: u64 = 200_000;
const WINDOW: usize = 1024;
/// Large payload sizes, and the bytes each way per size and round.
const LARGE: [usize; 4] = [16 << 10, 256 << 10, 1 << 20, 4 << 20];
const LARGE_BYTES: usize = 64 << 20;

/// Issue 12's targets.
const ROUND_TRIP_TARGET: f64 = 1.1;
const PIPELINED_TARGET: f64 = 1_500_000.0;
const PIPELINED_RATIO_TARGET: f64 = 0.35;

fn main() -> ExitCode {
    // The raw echo server is this executable started again: check first.
    bench::serve_raw_echo_if_requested();
    let cluster = bench::cluster();
    if !evilcluster::is_master() {
        return match cluster.run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("transport_compare worker: {error}");
                ExitCode::FAILURE
            }
        };
    }
    match compare(cluster) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("transport_compare: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Per-round results.
#[derive(Default)]
struct Samples {
    raw_round_trip: Vec<f64>,
    cluster_round_trip: Vec<f64>,
    raw_pipelined: Vec<f64>,
    /// The raw socket with one future per call, as evilcluster's pipelined.
    raw_pipelined_futures: Vec<f64>,
    cluster_pipelined: Vec<f64>,
    cluster_send_all: Vec<f64>,
    cluster_do_send: Vec<f64>,
    c_round_trip: Vec<f64>,
    /// Per size in [`LARGE`]: GB/s each way.
    raw_large: [Vec<f64>; LARGE.len()],
    cluster_large: [Vec<f64>; LARGE.len()],
    /// The same with `SharedBytes` instead of `ByteBuf`.
    shared_large: [Vec<f64>; LARGE.len()],
}

/// Which parts to run (`TRANSPORT_COMPARE_SECTIONS`: `small`, `large`, or both).
#[derive(Clone, Copy)]
struct Sections {
    small: bool,
    large: bool,
}

impl Sections {
    fn from_env() -> Self {
        match std::env::var("TRANSPORT_COMPARE_SECTIONS") {
            Ok(list) => Sections {
                small: list.split(',').any(|s| s.trim() == "small"),
                large: list.split(',').any(|s| s.trim() == "large"),
            },
            Err(_) => Sections {
                small: true,
                large: true,
            },
        }
    }
}

fn compare(cluster: Cluster) -> Result<(), Box<dyn Error>> {
    let sections = Sections::from_env();
    // Only the small-message table prints the C figure (and a profile of
    // one path must not see a compiler run).
    let wanted = sections.small && std::env::var_os("TRANSPORT_COMPARE_ONLY").is_none();
    let c_program = match wanted.then(CSocketpair::build) {
        None => None,
        Some(Ok(program)) => Some(program),
        Some(Err(error)) => {
            eprintln!("transport_compare: no C socketpair figure ({error})");
            None
        }
    };
    let raw_server = RawEchoServer::start()?;
    let system = actix_rt::System::new();
    let handle = system.block_on(cluster.start())?;
    // Ctrl-C (or SIGTERM) stops the measurement, not the cleanup below.
    let measured: Result<Samples, Box<dyn Error>> = system.block_on(async {
        let raw = raw_server.connect().await?;
        // Measured as a task, like the runtime's own: waking the runtime's
        // root future costs an eventfd write per wake-up, which would be
        // charged to whichever side runs there. And the wait for Ctrl-C is
        // a task too: the system polls its root future on every wake-up of
        // any task (as `Cluster::run` knows), and a signal listener there
        // cost each side's client ~330 instructions per round trip.
        let watched = actix_rt::spawn(async move {
            tokio::select! {
                samples = actix_rt::spawn(measure(raw, sections, c_program)) => Ok(samples??),
                _ = evilcluster::shutdown_signal() => Err("interrupted".into()),
            }
        });
        watched.await?
    });
    // Stop everything before reporting, whatever happened.
    drop(raw_server);
    system.block_on(handle.shutdown())?;
    let samples = measured?;
    if std::env::var_os("TRANSPORT_COMPARE_ONLY").is_none() {
        if sections.small {
            print_table(&samples);
        }
        if sections.large {
            print_large(&samples);
        }
    }
    Ok(())
}

async fn measure(mut raw: RawClient, sections: Sections, c: Option<CSocketpair>) -> Result<Samples, BenchError> {
    let cluster = ClusterClient::new();
    cluster.warm_up().await?;
    // For profiling one path alone: `TRANSPORT_COMPARE_ONLY=pipelined perf record ...`.
    if let Ok(only) = std::env::var("TRANSPORT_COMPARE_ONLY") {
        profile_only(&only, cluster, raw).await?;
        return Ok(Samples::default());
    }
    let mut samples = Samples::default();
    if sections.large {
        measure_large(&mut raw, &cluster, &mut samples).await?;
    }
    if !sections.small {
        return Ok(samples);
    }
    raw.round_trips(2_000).await?;
    cluster.round_trips(2_000).await?;
    raw.pipelined(20_000, WINDOW).await?;
    raw.pipelined_futures(20_000, WINDOW).await?;
    cluster.pipelined(20_000, WINDOW).await?;
    cluster.pipelined_send_all(20_000, WINDOW).await?;
    cluster.do_send(20_000).await?;

    for _ in 0..ROUNDS {
        samples
            .raw_round_trip
            .push(micros_each(raw.round_trips(ROUND_TRIPS).await?, ROUND_TRIPS));
        if let Some(c) = &c {
            // Blocking, on purpose: nothing else is being measured.
            let each = c.round_trip(ROUND_TRIPS, bench::raw_frame_len())?;
            samples.c_round_trip.push(each.as_secs_f64() * 1e6);
        }
        samples
            .cluster_round_trip
            .push(micros_each(cluster.round_trips(ROUND_TRIPS).await?, ROUND_TRIPS));
        samples
            .raw_pipelined
            .push(per_second(raw.pipelined(PIPELINED, WINDOW).await?, PIPELINED));
        samples
            .raw_pipelined_futures
            .push(per_second(raw.pipelined_futures(PIPELINED, WINDOW).await?, PIPELINED));
        samples
            .cluster_pipelined
            .push(per_second(cluster.pipelined(PIPELINED, WINDOW).await?, PIPELINED));
        samples.cluster_send_all.push(per_second(
            cluster.pipelined_send_all(PIPELINED, WINDOW).await?,
            PIPELINED,
        ));
        samples
            .cluster_do_send
            .push(per_second(cluster.do_send(DO_SENDS).await?, DO_SENDS));
    }
    Ok(samples)
}

/// Runs one path alone and prints its rate, so that a profiler sees
/// nothing else: for about five seconds, or for exactly
/// `TRANSPORT_COMPARE_COUNT` messages (for instruction counts, see
/// `benches/instructions.sh`). The large-payload paths (`blobs`,
/// `shared-blobs`, `raw-blobs`) echo `TRANSPORT_COMPARE_SIZE` bytes
/// (1 MiB unless told), a batch being 64 of them.
async fn profile_only(only: &str, cluster: ClusterClient, mut raw: RawClient) -> Result<(), BenchError> {
    let exact: Option<u64> = std::env::var("TRANSPORT_COMPARE_COUNT")
        .ok()
        .and_then(|n| n.parse().ok());
    let size: usize = std::env::var("TRANSPORT_COMPARE_SIZE")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1 << 20);
    let large = only.ends_with("blobs");
    let batch = exact.unwrap_or(if large { 64 } else { PIPELINED });
    let start = std::time::Instant::now();
    let mut count = 0u64;
    loop {
        match only {
            "pipelined" => cluster.pipelined(batch, WINDOW).await?,
            "send-all" => cluster.pipelined_send_all(batch, WINDOW).await?,
            "raw-pipelined" => raw.pipelined(batch, WINDOW).await?,
            "raw-futures" => raw.pipelined_futures(batch, WINDOW).await?,
            "round-trip" => cluster.round_trips(batch).await?,
            "raw-round-trip" => raw.round_trips(batch).await?,
            "do-send" => cluster.do_send(batch).await?,
            "blobs" => cluster.blobs(size, batch).await?,
            "shared-blobs" => cluster.shared_blobs(size, batch).await?,
            "raw-blobs" => raw.blobs(size, batch).await?,
            other => panic!(
                "TRANSPORT_COMPARE_ONLY={other}: one of pipelined, send-all, raw-pipelined, raw-futures, round-trip, raw-round-trip, \
                 do-send, blobs, shared-blobs, raw-blobs"
            ),
        };
        count += batch;
        if exact.is_some() || start.elapsed() >= Duration::from_secs(5) {
            break;
        }
    }
    if large {
        let gigabytes = (size as u64 * count) as f64 / 1e9;
        eprintln!("{only}: {:.2} GB/s each way", gigabytes / start.elapsed().as_secs_f64());
    } else {
        eprintln!("{only}: {} per second", thousands(per_second(start.elapsed(), count)));
    }
    Ok(())
}

/// Sequential echoes of each size in [`LARGE`], raw and evilcluster in
/// turn, [`ROUNDS`] times.
async fn measure_large(raw: &mut RawClient, cluster: &ClusterClient, samples: &mut Samples) -> Result<(), BenchError> {
    for &size in &LARGE {
        raw.blobs(size, 4).await?;
        cluster.blobs(size, 4).await?;
        cluster.shared_blobs(size, 4).await?;
    }
    for _ in 0..ROUNDS {
        for (i, &size) in LARGE.iter().enumerate() {
            let n = (LARGE_BYTES / size) as u64;
            let gigabytes = (size as u64 * n) as f64 / 1e9;
            samples.raw_large[i].push(gigabytes / raw.blobs(size, n).await?.as_secs_f64());
            samples.cluster_large[i].push(gigabytes / cluster.blobs(size, n).await?.as_secs_f64());
            samples.shared_large[i].push(gigabytes / cluster.shared_blobs(size, n).await?.as_secs_f64());
        }
    }
    Ok(())
}

fn print_large(samples: &Samples) {
    println!(
        "large payloads: sequential echoes, request and reply of the same size (median of {ROUNDS} rounds; {} MiB each way per size and round)",
        LARGE_BYTES >> 20
    );
    println!("(ec: a ByteBuf, copied where it is received; shared: SharedBytes, a slice of the received frame)");
    println!(
        "{:<10} {:>10} {:>10} {:>8} {:>11} {:>10} {:>10} {:>11}   target",
        "size", "raw GB/s", "ec GB/s", "ec/raw", "ec us/echo", "shared", "shared/raw", "shared us"
    );
    for (i, &size) in LARGE.iter().enumerate() {
        let raw = median(&samples.raw_large[i]);
        let cluster = median(&samples.cluster_large[i]);
        let shared = median(&samples.shared_large[i]);
        let label = if size >= 1 << 20 {
            format!("{} MiB", size >> 20)
        } else {
            format!("{} KiB", size >> 10)
        };
        let target = if size == 1 << 20 {
            ">= 1 GB/s, >= 0.5x raw"
        } else {
            ">= 0.5x raw"
        };
        println!(
            "{label:<10} {raw:>10.2} {cluster:>10.2} {:>7.2}x {:>11.0} {shared:>10.2} {:>9.2}x {:>11.0}   {target}",
            cluster / raw,
            size as f64 / (cluster * 1e9) * 1e6,
            shared / raw,
            size as f64 / (shared * 1e9) * 1e6,
        );
    }
    println!(
        "spread (min-max GB/s): {}",
        LARGE
            .iter()
            .enumerate()
            .map(|(i, &size)| format!(
                "{} KiB raw {:.2}-{:.2} ec {:.2}-{:.2} shared {:.2}-{:.2}",
                size >> 10,
                min(&samples.raw_large[i]),
                max(&samples.raw_large[i]),
                min(&samples.cluster_large[i]),
                max(&samples.cluster_large[i]),
                min(&samples.shared_large[i]),
                max(&samples.shared_large[i])
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

fn micros_each(elapsed: Duration, n: u64) -> f64 {
    elapsed.as_secs_f64() * 1e6 / n as f64
}

fn per_second(elapsed: Duration, n: u64) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

/// `1234567.8` → `"1,234,568"`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn print_table(samples: &Samples) {
    let raw_rt = median(&samples.raw_round_trip);
    let cluster_rt = median(&samples.cluster_round_trip);
    let raw_pipe = median(&samples.raw_pipelined);
    let cluster_pipe = median(&samples.cluster_pipelined);
    let raw_futures = median(&samples.raw_pipelined_futures);
    let send_all = median(&samples.cluster_send_all);
    let do_send = median(&samples.cluster_do_send);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());

    println!(
        "evilcluster transport vs raw Unix socket (median of {ROUNDS} rounds; CPUs: {cpus}; frames: {} bytes)",
        bench::raw_frame_len()
    );
    println!(
        "{:<28} {:>12} {:>12} {:>10}   target",
        "", "raw socket", "evilcluster", "ec/raw"
    );
    println!(
        "{:<28} {:>12.2} {:>12.2} {:>9.2}x   <= {ROUND_TRIP_TARGET:.2}x raw",
        "round trip (us)",
        raw_rt,
        cluster_rt,
        cluster_rt / raw_rt
    );
    if !samples.c_round_trip.is_empty() {
        println!(
            "{:<28} {:>12.2} {:>12} {:>9.2}x   (C socketpair ping-pong, blocking, same length)",
            "C round trip (us)",
            median(&samples.c_round_trip),
            "-",
            cluster_rt / median(&samples.c_round_trip)
        );
    }
    println!(
        "{:<28} {:>12} {:>12} {:>9.2}x   >= {}, >= {PIPELINED_RATIO_TARGET:.2}x raw",
        format!("pipelined (msg/s, w={WINDOW})"),
        thousands(raw_pipe),
        thousands(cluster_pipe),
        cluster_pipe / raw_pipe,
        thousands(PIPELINED_TARGET)
    );
    println!(
        "{:<28} {:>12} {:>12} {:>9.2}x   (both with one future per call)",
        "  against raw futures",
        thousands(raw_futures),
        thousands(cluster_pipe),
        cluster_pipe / raw_futures,
    );
    println!(
        "{:<28} {:>12} {:>12} {:>9.2}x   >= {}, >= {PIPELINED_RATIO_TARGET:.2}x raw",
        format!("  one send_all (msg/s)"),
        thousands(raw_pipe),
        thousands(send_all),
        send_all / raw_pipe,
        thousands(PIPELINED_TARGET)
    );
    println!("{:<28} {:>12} {:>12}", "do_send (msg/s)", "-", thousands(do_send));
    println!(
        "spread over rounds (min-max): round trip raw {:.2}-{:.2} us, evilcluster {:.2}-{:.2} us; \
         pipelined raw {}-{}, raw futures {}-{}, evilcluster {}-{} msg/s, send_all {}-{} msg/s; do_send {}-{} msg/s",
        min(&samples.raw_round_trip),
        max(&samples.raw_round_trip),
        min(&samples.cluster_round_trip),
        max(&samples.cluster_round_trip),
        thousands(min(&samples.raw_pipelined)),
        thousands(max(&samples.raw_pipelined)),
        thousands(min(&samples.raw_pipelined_futures)),
        thousands(max(&samples.raw_pipelined_futures)),
        thousands(min(&samples.cluster_pipelined)),
        thousands(max(&samples.cluster_pipelined)),
        thousands(min(&samples.cluster_send_all)),
        thousands(max(&samples.cluster_send_all)),
        thousands(min(&samples.cluster_do_send)),
        thousands(max(&samples.cluster_do_send)),
    );
    println!(
        "per round: {} sequential round trips, {} pipelined echoes, {} do_sends",
        thousands(ROUND_TRIPS as f64),
        thousands(PIPELINED as f64),
        thousands(DO_SENDS as f64)
    );
}

fn min(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}
