//! A long chaos run: a worker with 3 forks answers `Check(x)` with a
//! verifiable answer to 16 concurrent callers in the master (500 ms deadline
//! per call), while a random live fork is SIGKILLed every 200 ms and one
//! rolling restart of the worker runs half-way through. At the end it prints
//! how every call ended (correct, wrong, or each `SendError` variant), how
//! many ended later than their deadline + 50 ms, and the master's resident
//! memory at the start, at its largest and at the end. See
//! `evilcluster_suite::chaos` for what it does and its arguments.
//!
//! ```text
//! cargo run --release --example chaos                       # 1,000,000 calls
//! cargo run --release --example chaos -- --requests 200000 --callers 64
//! cargo run --release --example chaos -- --kill-every-ms 0 --no-roll   # no chaos: a baseline
//! ```
//!
//! The runtime logs to stderr (`RUST_LOG=error` quiets the kills' warnings);
//! the report goes to stdout. Exit code 0 once the run is done, whatever the
//! counts say (read them); 2 if the cluster itself failed.

#[cfg(unix)]
fn main() -> std::process::ExitCode {
    evilcluster_suite::chaos::main(1_000_000)
}

#[cfg(not(unix))]
fn main() {
    eprintln!("the chaos harness kills processes with Unix signals: Unix only");
}
