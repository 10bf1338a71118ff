//! Transport benchmarks: evilcluster against a raw length-framed Unix socket.
//!
//! - `round_trip/{raw,evilcluster}`: one message, await its reply, repeat.
//! - `pipelined/{raw,evilcluster,send_all}`: up to 1,024 requests in
//!   flight (throughput per message); `evilcluster` with one future per
//!   call, `send_all` through one `RemoteAddr::send_all` stream.
//! - `do_send/evilcluster`: `do_send`s, then one `send` once they are all
//!   handled (throughput per message).
//! - `large_echo/{raw,evilcluster}/{256 KiB,1 MiB,4 MiB}`: sequential echoes
//!   whose request and reply both carry that many bytes (throughput in
//!   bytes each way).
//!
//! This binary is also the cluster's worker and the raw echo server: both
//! are it, started again (see `evilcluster_suite::bench`). Both clients run
//! on the master's actix runtime thread, where the runtime's connection
//! tasks live.
//!
//! ```text
//! cargo bench --bench transport
//! cargo bench --bench transport -- --quick
//! ```
//!
//! Round trips mostly measure cross-CPU wake-ups, which are slow and
//! erratic on virtual machines; `taskset -c 0 cargo bench --bench transport`
//! compares the software paths alone (see `examples/transport_compare.rs`).

use std::future::Future;
use std::time::Duration;

use criterion::async_executor::AsyncExecutor;
use criterion::{Criterion, Throughput};
use evilcluster_suite::bench::{self, ClusterClient, RawClient, RawEchoServer};

/// Requests in flight in the pipelined benchmarks.
const WINDOW: usize = 1024;

/// Runs criterion's futures on the actix system that started the cluster.
#[derive(Clone, Copy)]
struct Actix<'a>(&'a actix_rt::SystemRunner);

impl AsyncExecutor for Actix<'_> {
    fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.0.block_on(future)
    }
}

fn main() {
    // The raw echo server is this executable started again: check first.
    bench::serve_raw_echo_if_requested();
    let cluster = bench::cluster();
    if !evilcluster::is_master() {
        if let Err(error) = cluster.run() {
            eprintln!("transport bench worker: {error}");
            std::process::exit(1);
        }
        return;
    }

    let raw_server = RawEchoServer::start().expect("start the raw echo server");
    let system = actix_rt::System::new();
    let handle = system.block_on(cluster.start()).expect("start the cluster");
    let raw = system
        .block_on(raw_server.connect())
        .expect("connect to the raw echo server");
    let raw = std::rc::Rc::new(tokio::sync::Mutex::new(raw));
    let echo = ClusterClient::new();
    system.block_on(echo.warm_up()).expect("reach the echo actor");

    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    benchmarks(&mut criterion, Actix(&system), &raw, echo);
    criterion.final_summary();

    drop(raw);
    drop(raw_server);
    system.block_on(handle.shutdown()).expect("stop the cluster");
}

/// Runs a measurement as a task of the actix runtime, like the runtime's own
/// tasks: waking the runtime's root future costs an eventfd write per
/// wake-up, which would be charged to whichever side ran there.
async fn as_task<T: 'static>(measure: impl Future<Output = T> + 'static) -> T {
    actix_rt::spawn(measure).await.expect("the measurement task panicked")
}

type SharedRaw = std::rc::Rc<tokio::sync::Mutex<RawClient>>;

fn benchmarks(c: &mut Criterion, actix: Actix<'_>, raw: &SharedRaw, echo: ClusterClient) {
    let mut group = c.benchmark_group("round_trip");
    group.bench_function("raw", |b| {
        b.to_async(actix).iter_custom(|n| {
            let raw = raw.clone();
            as_task(async move { raw.lock().await.round_trips(n).await.expect("raw round trips") })
        })
    });
    group.bench_function("evilcluster", |b| {
        b.to_async(actix)
            .iter_custom(|n| as_task(async move { echo.round_trips(n).await.expect("evilcluster round trips") }))
    });
    group.finish();

    let mut group = c.benchmark_group("pipelined");
    group.sample_size(20).throughput(Throughput::Elements(1));
    group.bench_function("raw", |b| {
        b.to_async(actix).iter_custom(|n| {
            let raw = raw.clone();
            as_task(async move {
                raw.lock()
                    .await
                    .pipelined(n, WINDOW)
                    .await
                    .expect("raw pipelined echoes")
            })
        })
    });
    group.bench_function("evilcluster", |b| {
        b.to_async(actix).iter_custom(|n| {
            as_task(async move { echo.pipelined(n, WINDOW).await.expect("evilcluster pipelined sends") })
        })
    });
    group.bench_function("send_all", |b| {
        b.to_async(actix).iter_custom(|n| {
            as_task(async move { echo.pipelined_send_all(n, WINDOW).await.expect("evilcluster send_all") })
        })
    });
    group.finish();

    let mut group = c.benchmark_group("large_echo");
    group.sample_size(10);
    for size in [256usize << 10, 1 << 20, 4 << 20] {
        group.throughput(Throughput::Bytes(size as u64));
        let label = if size >= 1 << 20 {
            format!("{} MiB", size >> 20)
        } else {
            format!("{} KiB", size >> 10)
        };
        group.bench_function(format!("raw/{label}"), |b| {
            b.to_async(actix).iter_custom(|n| {
                let raw = raw.clone();
                as_task(async move { raw.lock().await.blobs(size, n).await.expect("raw large echoes") })
            })
        });
        group.bench_function(format!("evilcluster/{label}"), |b| {
            b.to_async(actix)
                .iter_custom(|n| as_task(async move { echo.blobs(size, n).await.expect("evilcluster large echoes") }))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("do_send");
    group.sample_size(20).throughput(Throughput::Elements(1));
    group.bench_function("evilcluster", |b| {
        b.to_async(actix)
            .iter_custom(|n| as_task(async move { echo.do_send(n).await.expect("evilcluster do_sends") }))
    });
    group.finish();
}
