//! Beyond one machine: hosts (separate masters with their own node names)
//! joined through a real `nats-server`. Each test starts its own server(s)
//! on free loopback ports and stops them at the end, pass or fail.
//!
//! Skipped, with a line saying so, when nats-server is not installed;
//! under CI (`CI` set) a missing server fails instead.

mod support;

use std::collections::BTreeSet;

use support::nats::{ask, ask_until, host, server_binary, Server};

/// The `at <node> <path>` answers among `lines`.
fn places(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|line| {
            let mut words = line.strip_prefix("at ")?.split(' ');
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

fn nodes_seen(lines: &[String]) -> BTreeSet<String> {
    places(lines).into_iter().map(|(node, _)| node).collect()
}

/// Waits until `host` sees exactly `nodes` (itself first).
fn wait_nodes(host: &mut support::Fixture, nodes: &str) {
    let expected = format!("nodes {nodes}");
    ask_until(host, "nodes", &expected, |answer| answer.contains(&expected));
}

/// Hosts `a` and `b` with `echo_forks` forks of the echo actor each, and
/// `c` without one, all ready, and `c` seeing the other two.
fn three_hosts(server: &Server, echo_forks: Option<u32>) -> [support::Fixture; 3] {
    let mut hosts = [
        host(&server.url(), "a", echo_forks, &[]),
        host(&server.url(), "b", echo_forks, &[]),
        host(&server.url(), "c", None, &[]),
    ];
    for h in &mut hosts {
        h.expect_line("ready");
    }
    wait_nodes(&mut hosts[2], "c,a,b");
    hosts
}

#[test]
fn a_call_crosses_hosts_and_prefers_a_local_instance() {
    let Some(binary) = server_binary() else { return };
    let server = Server::start(&binary, &[]);
    let mut a = host(&server.url(), "a", Some(2), &[]);
    let mut b = host(&server.url(), "b", None, &[]);
    a.expect_line("ready");
    b.expect_line("ready");
    // B runs no echo: its calls go to A's two forks, in turn.
    let answer = ask_until(&mut b, "where 4", "b reaches a's forks", |answer| {
        places(answer).len() == 4
    });
    let paths: BTreeSet<String> = places(&answer)
        .into_iter()
        .map(|(node, path)| format!("{node} {path}"))
        .collect();
    assert_eq!(
        paths,
        BTreeSet::from(["a natsapp/echo/1".to_owned(), "a natsapp/echo/2".to_owned()]),
        "{answer:?}"
    );
    // A has its own instances: it never goes through NATS.
    let answer = ask(&mut a, "where 6");
    assert_eq!(nodes_seen(&answer), BTreeSet::from(["a".to_owned()]), "{answer:?}");
    // One fork, and one node, by name.
    let answer = ask(&mut b, "where_fork 2");
    assert_eq!(
        places(&answer),
        [("a".to_owned(), "natsapp/echo/2".to_owned())],
        "{answer:?}"
    );
    let answer = ask(&mut b, "where_node a");
    assert_eq!(nodes_seen(&answer), BTreeSet::from(["a".to_owned()]), "{answer:?}");
    // Order from one sender to one instance, across hosts.
    let answer = ask(&mut b, "seq 2000");
    assert_eq!(answer, ["seq 2000 true"], "{answer:?}");
    // A node that does not exist: a typed error after the resolve wait.
    let answer = ask(&mut b, "where_node nowhere");
    assert!(
        answer
            .iter()
            .any(|l| l.starts_with("err no live process hosts actor `echo`")),
        "{answer:?}"
    );
}

#[test]
fn calls_are_balanced_across_hosts() {
    let Some(binary) = server_binary() else { return };
    let server = Server::start(&binary, &[]);
    let [_a, mut b, mut c] = three_hosts(&server, Some(0));
    let answer = ask_until(&mut c, "where 10", "c reaches a and b", |answer| {
        nodes_seen(answer) == BTreeSet::from(["a".to_owned(), "b".to_owned()])
    });
    assert_eq!(places(&answer).len(), 10, "{answer:?}");
    // B has its own: local first.
    let answer = ask(&mut b, "where 5");
    assert_eq!(nodes_seen(&answer), BTreeSet::from(["b".to_owned()]), "{answer:?}");
}

#[test]
fn a_lost_host_fails_calls_in_flight_at_once_and_leaves_the_directory() {
    let Some(binary) = server_binary() else { return };
    let server = Server::start(&binary, &[]);
    let [mut a, _b, mut c] = three_hosts(&server, Some(0));
    // A call that would take 30 s, to whichever host; then that host dies.
    let started = ask(&mut c, "where_node a");
    assert_eq!(nodes_seen(&started), BTreeSet::from(["a".to_owned()]));
    c.command("sleep 30000 60000");
    c.expect_line("started");
    c.command("sleep 30000 60000");
    c.expect_line("started");
    // The call to A reached its handler.
    a.expect_containing("handling sleep on a");
    a.kill();
    // The call that went to A ends with a typed error well before its
    // 60 s deadline (the host timeout is 2 s); the other one is unharmed.
    let failed = c.expect_line("failed");
    eprintln!("in-flight call to the lost host: {failed}");
    let elapsed: u64 = failed.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(failed.contains("disconnected: "), "{failed}");
    assert!(failed.contains("node `a` lost"), "{failed}");
    assert!(elapsed < 20_000, "{failed}");
    wait_nodes(&mut c, "c,b");
    // New calls go to the remaining host.
    let answer = ask(&mut c, "where 4");
    assert_eq!(nodes_seen(&answer), BTreeSet::from(["b".to_owned()]), "{answer:?}");
}

#[test]
fn the_cluster_survives_a_nats_server_restart() {
    let Some(binary) = server_binary() else { return };
    let mut server = Server::start(&binary, &[]);
    let mut a = host(&server.url(), "a", Some(1), &[]);
    let mut b = host(&server.url(), "b", None, &[]);
    a.expect_line("ready");
    b.expect_line("ready");
    ask_until(&mut b, "where 1", "b reaches a", |answer| places(answer).len() == 1);
    server.stop();
    // While no server runs: a typed error by the call's deadline: not sent
    // (unreachable), or sent just before the client saw the server go.
    b.command("sleep 1 1500");
    b.expect_line("started");
    let failed = b.expect_line("failed");
    assert!(
        failed.contains("is unreachable") || failed.contains("lost its connection to NATS"),
        "{failed}"
    );
    server.restart();
    // Clients reconnect, heartbeats resume, calls resume.
    ask_until(&mut b, "where 1", "b reaches a again", |answer| {
        places(answer).len() == 1
    });
    let answer = ask(&mut b, "seq 500");
    assert_eq!(answer, ["seq 500 true"], "{answer:?}");
    // A stream of one-way messages across another restart: some may be
    // lost (at most once), none arrives twice or out of order.
    b.command("seq_slowly 2000");
    b.expect_line("seq_slowly under way");
    server.stop();
    server.restart();
    let report = b.expect_line("seq_slowly");
    eprintln!("one-way messages across a NATS restart: {report}");
    let words: Vec<&str> = report.split(' ').collect();
    let count: u64 = words[1].parse().unwrap();
    assert!(count <= 2500, "{report}"); // 500 before, at most 2000 now
    assert_eq!(words[2], "true", "duplicated or reordered: {report}");
    b.expect_line("done");
}

#[test]
fn a_three_server_nats_cluster_loses_one_server() {
    let Some(binary) = server_binary() else { return };
    let ports: Vec<u16> = (0..3).map(|_| support::nats::free_port()).collect();
    let routes: Vec<String> = ports.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
    let routes = routes.join(",");
    let mut servers: Vec<Server> = (0..3)
        .map(|i| {
            let client_port = support::nats::free_port();
            let cluster = format!("nats://127.0.0.1:{}", ports[i]);
            Server::start_at(
                &binary,
                "127.0.0.1",
                client_port,
                &["--cluster_name", "ec", "--cluster", &cluster, "--routes", &routes],
                &[],
            )
        })
        .collect();
    let all: Vec<String> = servers.iter().map(Server::url).collect();
    // A prefers server 0, B server 1; both know every server.
    let url_a = format!("{},{},{}", all[0], all[1], all[2]);
    let url_b = format!("{},{},{}", all[1], all[2], all[0]);
    let mut a = host(&url_a, "a", Some(0), &[]);
    let mut b = host(&url_b, "b", None, &[]);
    a.expect_line("ready");
    b.expect_line("ready");
    ask_until(&mut b, "where 1", "b reaches a through the NATS cluster", |answer| {
        places(answer).len() == 1
    });
    servers[0].stop();
    ask_until(&mut b, "where 1", "b reaches a after server 0 died", |answer| {
        places(answer).len() == 1
    });
    let answer = ask(&mut b, "nodes");
    assert_eq!(answer, ["nodes b,a"], "{answer:?}");
}

#[test]
fn wrong_credentials_are_refused() {
    let Some(binary) = server_binary() else { return };
    let server = Server::start(&binary, &["--user", "app", "--pass", "s3cret"]);
    let good = server.url().replace("nats://", "nats://app:s3cret@");
    let mut a = host(&good, "a", Some(0), &[]);
    a.expect_line("ready");
    let mut intruder = host(
        &server.url(),
        "x",
        None,
        &[("EVILCLUSTER_NATS_USER", "app"), ("EVILCLUSTER_NATS_PASSWORD", "wrong")],
    );
    let status = intruder.wait();
    assert!(!status.success());
    let errors = intruder.stderr_lines().join("\n");
    assert!(errors.contains("authorization violation"), "{errors}");
    // No server there at all: the host does not start either.
    let nowhere = format!("nats://127.0.0.1:{}", support::nats::free_port());
    let mut lonely = host(&nowhere, "y", None, &[]);
    assert!(!lonely.wait().success());
    let errors = lonely.stderr_lines().join("\n");
    assert!(errors.contains("Nats {"), "{errors}");
    let mut b = host(
        &server.url(),
        "b",
        None,
        &[
            ("EVILCLUSTER_NATS_USER", "app"),
            ("EVILCLUSTER_NATS_PASSWORD", "s3cret"),
        ],
    );
    b.expect_line("ready");
    ask_until(&mut b, "where 1", "b reaches a", |answer| places(answer).len() == 1);
}

#[test]
fn clusters_of_other_names_never_mix() {
    let Some(binary) = server_binary() else { return };
    let server = Server::start(&binary, &[]);
    let mut a = host(&server.url(), "a", Some(0), &[]);
    let mut other = host(&server.url(), "o", Some(0), &[("FIXTURE_CLUSTER", "otherapp")]);
    let mut b = host(&server.url(), "b", None, &[]);
    for h in [&mut a, &mut other, &mut b] {
        h.expect_line("ready");
    }
    wait_nodes(&mut b, "b,a");
    let answer = ask(&mut b, "where 6");
    assert_eq!(nodes_seen(&answer), BTreeSet::from(["a".to_owned()]), "{answer:?}");
    let answer = ask(&mut b, "nodes");
    assert_eq!(answer, ["nodes b,a"], "{answer:?}");
}

#[test]
fn events_and_broadcast_span_hosts() {
    let Some(binary) = server_binary() else { return };
    let server = Server::start(&binary, &[]);
    let mut a = host(&server.url(), "a", Some(2), &[]);
    let mut b = host(&server.url(), "b", Some(0), &[]);
    let mut c = host(&server.url(), "c", None, &[]);
    for h in [&mut a, &mut b, &mut c] {
        h.expect_line("ready");
    }
    wait_nodes(&mut c, "c,a,b");
    // A broadcast reaches every instance on every host, once (once c has
    // heard of all of them: a's forks register one after the other).
    let everyone = ["at a natsapp/echo/1", "at a natsapp/echo/2", "at b natsapp/echo"];
    ask_until(&mut c, "broadcast", "a broadcast reaches all three", |answer| {
        answer == everyone
    });
    // An event to everyone reaches every host's master (and its processes).
    ask(&mut a, "publish all hello");
    ask_until(&mut c, "pings", "c's master hears a's event", |answer| {
        answer.iter().any(|l| l.contains("hello@a:natsapp"))
    });
    ask_until(&mut b, "pings", "b's master hears a's event", |answer| {
        answer.iter().any(|l| l.contains("hello@a:natsapp"))
    });
    // An event to a worker reaches its instances on every host.
    ask(&mut c, "publish echo w1");
    ask_until(
        &mut c,
        "instance_pings",
        "every echo instance hears c's event",
        |answer| {
            answer.len() == 3
                && answer
                    .iter()
                    .all(|l| l.starts_with("instance") && l.contains("w1@c:natsapp"))
        },
    );
    // ...and not the masters.
    let answer = ask(&mut b, "pings");
    assert!(!answer.iter().any(|l| l.contains("w1")), "{answer:?}");
}

#[test]
fn a_remote_instance_is_watched_and_seen_down_when_its_host_is_lost() {
    let Some(binary) = server_binary() else { return };
    let server = Server::start(&binary, &[]);
    let mut a = host(&server.url(), "a", Some(2), &[]);
    let mut c = host(&server.url(), "c", None, &[]);
    a.expect_line("ready");
    c.expect_line("ready");
    wait_nodes(&mut c, "c,a");
    c.command("watch");
    c.expect_line("watch up a:natsapp/echo/");
    c.expect_line("watch up a:natsapp/echo/");
    a.kill();
    let down = c.expect_line("watch down a:natsapp/echo/");
    assert!(down.contains("node lost"), "{down}");
    c.expect_line("watch down a:natsapp/echo/");
}

/// Hosts in separate network namespaces, each with a veth pair to the
/// namespace that runs the NATS server: nothing but NATS connects them.
/// Cutting one host's link is a host loss; restoring it, a return.
#[test]
fn hosts_in_separate_network_namespaces_see_a_cut_link_as_a_lost_host() {
    let Some(binary) = server_binary() else { return };
    let Some(netns) = support::nats::Netns::create(2) else {
        return;
    };
    let port = 4222;
    let server_prefix = netns.exec(0);
    let server_prefix: Vec<&str> = server_prefix.iter().map(String::as_str).collect();
    let _server = Server::start_at(&binary, "0.0.0.0", port, &[], &server_prefix);
    netns.wait_reachable(1, port);
    netns.wait_reachable(2, port);
    let (exec_a, exec_b) = (netns.exec(1), netns.exec(2));
    let exec_a: Vec<&str> = exec_a.iter().map(String::as_str).collect();
    let exec_b: Vec<&str> = exec_b.iter().map(String::as_str).collect();
    let mut a = support::nats::host_via(&format!("nats://10.231.1.1:{port}"), "a", Some(1), &[], Some(&exec_a));
    let mut b = support::nats::host_via(&format!("nats://10.231.2.1:{port}"), "b", None, &[], Some(&exec_b));
    a.expect_line("ready");
    b.expect_line("ready");
    ask_until(&mut b, "where 2", "b reaches a through NATS", |answer| {
        places(answer).len() == 2
    });
    // A call in flight when the link goes down ends with the host's loss.
    b.command("sleep 30000 60000");
    b.expect_line("started");
    a.expect_containing("handling sleep on a");
    netns.link(1, false);
    let failed = b.expect_line("failed");
    assert!(failed.contains("node `a` lost"), "{failed}");
    wait_nodes(&mut b, "b");
    let answer = ask(&mut b, "where_node a");
    assert!(
        answer.iter().any(|l| l.starts_with("err no live process")),
        "{answer:?}"
    );
    // The link comes back: A's client reconnects, and B sees it again.
    netns.link(1, true);
    ask_until(&mut b, "where 1", "b reaches a again", |answer| {
        places(answer).len() == 1
    });
}

/// Runs `evilcluster <args>` against the master of `host` (its TMPDIR).
fn cli(host: &support::Fixture, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cli-under-test"))
        .args(args)
        .env("TMPDIR", host.tmp.path())
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("run the evilcluster command");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8")
}

#[test]
fn ps_and_tree_show_every_hosts_tree() {
    let Some(binary) = server_binary() else { return };
    let server = Server::start(&binary, &[]);
    let mut a = host(&server.url(), "a", Some(2), &[]);
    let mut b = host(&server.url(), "b", None, &[]);
    a.expect_line("ready");
    b.expect_line("ready");
    wait_nodes(&mut b, "b,a");
    let tree = cli(&b, &["tree", "natsapp"]);
    eprintln!("{tree}");
    let a_master = format!("a:natsapp (master, pid {})", a.pid());
    assert!(tree.contains(&a_master), "{tree}");
    assert!(tree.contains("echo (spawn, pid"), "{tree}");
    assert_eq!(tree.matches("(fork, pid").count(), 2, "{tree}");
    assert!(tree.contains("Echo up"), "{tree}");
    let ps = cli(&b, &["ps", "natsapp", "--json"]);
    for path in ["\"a:natsapp/echo/1\"", "\"a:natsapp/echo/2\"", "\"natsapp\""] {
        assert!(ps.contains(path), "{path} missing: {ps}");
    }
}
