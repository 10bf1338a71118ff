//! Cross-host messaging through NATS against bare `async-nats`
//! request/reply between the same two processes, in the same run (not a
//! test: `cargo bench --features nats --bench nats`). Starts a `nats-server` on a free
//! loopback port and two hosts of the `nats-fixture` cluster: `a` runs the
//! `echo` actor (which also answers bare NATS requests), `b` runs none, so
//! `b`'s master reaches `echo` through NATS. The local-socket figures are
//! `a`'s master calling its own `echo`.
//!
//! Set `NATS_BENCH_CALLS` (default 20000) and `NATS_BENCH_WINDOW` (default 64).

#[path = "../tests/support/mod.rs"]
mod support;

use support::nats::{ask, host, server_binary, Server};

fn main() {
    let Some(binary) = server_binary() else { return };
    let calls: u64 = std::env::var("NATS_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let window: u64 = std::env::var("NATS_BENCH_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let server = Server::start(&binary, &[]);
    let mut a = host(&server.url(), "a", Some(0), &[("FIXTURE_RAW", "1")]);
    let mut b = host(&server.url(), "b", None, &[]);
    a.expect_line("ready");
    b.expect_line("ready");
    let expected = "nodes b,a".to_owned();
    support::nats::ask_until(&mut b, "nodes", "b sees a", |answer| answer.contains(&expected));
    println!("{calls} calls of 8 bytes each way, {window} in flight when pipelined");
    for round in 1..=3 {
        let bare = ask(&mut b, &format!("bench_raw {calls} {window}"));
        let cross = ask(&mut b, &format!("bench {calls} {window}"));
        let local = ask(&mut a, &format!("bench {calls} {window}"));
        println!("round {round}");
        println!("  cross-host, bare async-nats : {}", bare.join(" "));
        println!("  cross-host, evilcluster     : {}", cross.join(" "));
        println!("  local socket, evilcluster   : {}", local.join(" "));
    }
}
