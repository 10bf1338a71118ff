//! The `evilcluster` command against a real running cluster (the
//! `cli-fixture` binary): `ps`, `tree` and `stop`.

#[path = "../crates/evilcluster-cli/tests/support/mod.rs"]
mod support;

use evilcluster_wire::control::ProcessStatus;
use support::{alive, eventually, mask_pids, unique_name, Fixture};

fn find<'a>(processes: &'a [ProcessStatus], path: &str) -> &'a ProcessStatus {
    processes
        .iter()
        .find(|p| p.path == path)
        .unwrap_or_else(|| panic!("no process {path} in {processes:#?}"))
}

#[test]
fn ps_json_lists_every_process_with_its_role_and_actor() {
    let name = unique_name("ps");
    let mut fixture = Fixture::start(&name);
    let status = fixture.wait_until_up();
    assert_eq!(status.cluster, name);

    // Tree order: the master, then each worker followed by its forks.
    let paths: Vec<&str> = status.processes.iter().map(|p| p.path.as_str()).collect();
    let expected_paths: Vec<String> = ["", "/web", "/web/1", "/web/2", "/store", "/ghost", "/tasks"]
        .iter()
        .map(|suffix| format!("{name}{suffix}"))
        .collect();
    assert_eq!(paths, expected_paths, "{status:#?}");

    // (path, role, state, actor, actor type); the master's own services are not checked.
    let expected = [
        ("/web", "spawn", "up", None, None),
        ("/web/1", "fork", "up", Some("web"), Some("Web")),
        ("/web/2", "fork", "up", Some("web"), Some("Web")),
        ("/store", "spawn", "up", Some("store"), Some("Store")),
        // Not running; the actor it would host is still shown.
        ("/ghost", "spawn", "disabled", Some("ghost"), Some("Ghost")),
        ("/tasks", "spawn", "up", None, None),
    ];
    let master = find(&status.processes, &name);
    assert_eq!((master.role.as_str(), master.state.as_str()), ("master", "up"));
    assert_eq!(master.pid, Some(fixture.pid()));
    for (suffix, role, state, actor, actor_type) in expected {
        let p = find(&status.processes, &format!("{name}{suffix}"));
        let seen = (
            p.role.as_str(),
            p.state.as_str(),
            p.actor.as_deref(),
            p.actor_type.as_deref(),
        );
        assert_eq!(seen, (role, state, actor, actor_type), "{suffix}: {p:#?}");
    }

    let mut pids = Vec::new();
    for p in &status.processes {
        if p.state == evilcluster_wire::control::ProcessState::Up {
            let pid = p.pid.unwrap_or_else(|| panic!("{} is up without a pid", p.path));
            assert!(alive(pid), "{} has pid {pid}, which is not running", p.path);
            pids.push(pid);
            assert!(p.uptime_ms.is_some(), "{} is up without an uptime", p.path);
            if cfg!(target_os = "linux") {
                assert!(
                    p.rss_bytes.is_some_and(|rss| rss > 0),
                    "{}: rss {:?}",
                    p.path,
                    p.rss_bytes
                );
                // Shared pages counted once: never more than resident.
                assert!(
                    p.pss_bytes
                        .is_some_and(|pss| pss > 0 && pss <= p.rss_bytes.unwrap_or(0) + (1 << 20)),
                    "{}: pss {:?}, rss {:?}",
                    p.path,
                    p.pss_bytes,
                    p.rss_bytes
                );
            }
        } else {
            assert_eq!((p.pid, p.uptime_ms), (None, None), "{p:#?}");
        }
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 6, "pids are not distinct: {status:#?}");

    // The task worker pinged the store once: counted on both sides.
    eventually("the store counted the task's request", || {
        let run = fixture.evilcluster(&["ps", "--json", &name]);
        let status: evilcluster_wire::control::Status = serde_json::from_str(&run.stdout).expect("a status");
        let store = find(&status.processes, &format!("{name}/store"));
        let tasks = find(&status.processes, &format!("{name}/tasks"));
        store.messages_in >= 1 && tasks.messages_out >= 1
    });

    // The table: a header and one row per process, in the same order.
    let run = fixture.evilcluster(&["ps", &name]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{}", run.stdout);
    assert!(lines[0].starts_with("NAME") && lines[0].contains("PID") && lines[0].contains("MEM"));
    assert!(lines[1].starts_with(&name) && lines[1].contains(&fixture.pid().to_string()));
    assert!(lines[3].contains("1") && lines[3].contains("fork") && lines[3].contains("Web"));
    assert!(lines[6].contains("ghost") && lines[6].contains("disabled"));
    assert!(run.stdout.contains(" MiB"), "{}", run.stdout);
}

/// The last tree the master logged (after "cluster ready" or "cluster changed").
fn last_logged_tree(stderr: &[String], name: &str) -> Option<String> {
    let start = stderr
        .iter()
        .rposition(|line| line.contains("cluster ready") || line.contains("cluster changed"))?;
    let mut tree = String::new();
    for (i, line) in stderr[start + 1..].iter().enumerate() {
        let is_tree_line = if i == 0 {
            line.starts_with(&format!("{name} (master"))
        } else {
            line.starts_with(['├', '│', '└'])
        };
        if !is_tree_line {
            break;
        }
        tree.push_str(line);
        tree.push('\n');
    }
    Some(tree)
}

#[test]
fn tree_prints_the_tree() {
    let name = unique_name("tree");
    let mut fixture = Fixture::start(&name);
    fixture.wait_until_up();
    let run = fixture.evilcluster(&["tree", &name]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stderr, "");
    let expected = format!(
        "\
{name} (master, pid N)
├── web (spawn, pid N)
│   ├── 1 (fork, pid N) Web up
│   └── 2 (fork, pid N) Web up
├── store (spawn, pid N) Store up
├── ghost (disabled)
└── tasks (spawn, pid N) up
"
    );
    assert_eq!(mask_pids(&run.stdout), expected);
    assert!(run
        .stdout
        .starts_with(&format!("{name} (master, pid {})\n", fixture.pid())));

    // Exactly what the runtime itself logs, pids included.
    let mut logged = None;
    eventually("the master logged the same tree", || {
        logged = last_logged_tree(&fixture.stderr_lines(), &name);
        logged.as_deref() == Some(run.stdout.as_str())
    });
}

#[test]
fn stop_stops_the_cluster() {
    let name = unique_name("stop");
    let mut fixture = Fixture::start(&name);
    let status = fixture.wait_until_up();
    let run = fixture.evilcluster(&["stop", &name, "--timeout", "50"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(
        run.stdout,
        format!("cluster {name:?} stopped (master pid {} has exited)\n", fixture.pid())
    );
    assert_eq!(run.stderr, "", "{run:#?}");

    let (exit, stdout) = fixture.wait();
    assert!(exit.success(), "the master exited with {exit}; stdout {stdout:#?}");
    assert_eq!(stdout, ["done"]);
    for p in &status.processes {
        if let Some(pid) = p.pid {
            eventually(&format!("{} (pid {pid}) is gone", p.path), || !alive(pid));
        }
    }

    let after = fixture.evilcluster(&["ps", &name]);
    assert_eq!(after.code, Some(1), "{after:#?}");
    assert!(
        after.stderr.contains(&format!("no cluster named {name:?} is running")),
        "{after:#?}"
    );
}

#[test]
fn ps_counts_the_restarts_of_a_killed_fork() {
    let name = unique_name("restarts");
    let mut fixture = Fixture::start(&name);
    let status = fixture.wait_until_up();
    let path = format!("{name}/web/2");
    assert!(status.processes.iter().all(|p| p.restarts == 0), "{status:#?}");
    let old = find(&status.processes, &path).pid.expect("web/2 runs");
    let pid = rustix::process::Pid::from_raw(old as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("SIGKILL web/2");

    let mut after = None;
    eventually("web/2 is back, as a new process with one restart", || {
        let run = fixture.evilcluster(&["ps", "--json", &name]);
        let Ok(status) = serde_json::from_str::<evilcluster_wire::control::Status>(&run.stdout) else {
            return false;
        };
        let fork = find(&status.processes, &path);
        let back = fork.state == evilcluster_wire::control::ProcessState::Up
            && fork.pid.is_some_and(|pid| pid != old)
            && fork.restarts == 1;
        if back {
            after = Some(status);
        }
        back
    });
    let after = after.expect("seen");
    fixture.remember(&after);
    for p in after.processes.iter().filter(|p| p.path != path) {
        assert_eq!(p.restarts, 0, "only web/2 restarted: {p:#?}");
    }
    // The table shows it too, right-aligned under RESTARTS.
    let run = fixture.evilcluster(&["ps", &name]);
    let new_pid = find(&after.processes, &path).pid.expect("web/2 runs").to_string();
    let header: Vec<char> = run.stdout.lines().next().expect("a header").chars().collect();
    let end = (0..header.len())
        .find(|&i| header[i..].starts_with(&"RESTARTS".chars().collect::<Vec<_>>()))
        .expect("a RESTARTS column")
        + "RESTARTS".len();
    let row: Vec<char> = run
        .stdout
        .lines()
        .find(|l| l.contains(&format!(" {new_pid} ")))
        .unwrap_or_else(|| panic!("no web/2 row in {}", run.stdout))
        .chars()
        .collect();
    let cell: String = row[..end].iter().collect();
    assert_eq!(cell.split_whitespace().last(), Some("1"), "{}", run.stdout);
}

#[test]
fn restart_replaces_a_workers_forks_one_at_a_time() {
    let name = unique_name("reload");
    let mut fixture = Fixture::start(&name);
    let before = fixture.wait_until_up();
    let pid_of = |status: &evilcluster_wire::control::Status, path: &str| find(&status.processes, path).pid;
    let (web1, web2) = (format!("{name}/web/1"), format!("{name}/web/2"));

    let run = fixture.evilcluster(&["restart", &name, "web"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(
        run.stdout,
        format!("restarted 2 process(es) of {name}/web, one at a time\n")
    );
    let run = fixture.evilcluster(&["ps", "--json", &name]);
    let after: evilcluster_wire::control::Status = serde_json::from_str(&run.stdout).expect("a status");
    fixture.remember(&after);
    for path in [&web1, &web2] {
        let fork = find(&after.processes, path);
        assert_eq!(fork.state, evilcluster_wire::control::ProcessState::Up, "{fork:#?}");
        assert_ne!(fork.pid, pid_of(&before, path), "{path} is a new process");
        assert_eq!(fork.restarts, 1, "{fork:#?}");
    }
    let store = format!("{name}/store");
    assert_eq!(pid_of(&after, &store), pid_of(&before, &store), "others untouched");

    let unknown = fixture.evilcluster(&["restart", &name, "nope"]);
    assert_eq!(unknown.code, Some(2), "{unknown:#?}");
    assert!(
        unknown
            .stderr
            .contains("could not restart worker `nope`: no worker named `nope` is declared"),
        "{unknown:#?}"
    );
}
