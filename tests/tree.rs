//! The master logs the rendered tree when the cluster is ready and after
//! every change.

mod support;

use support::{eventually, Fixture};

/// `pid 1234` → `pid N`, so that the text can be compared.
fn mask_pids(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find("pid ") {
        out.push_str(&rest[..at + 4]);
        rest = &rest[at + 4..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            out.push('N');
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// The tree logged after the last line containing `heading`, if complete.
fn last_tree(lines: &[String], heading: &str) -> Option<String> {
    let start = lines.iter().rposition(|l| l.contains(heading))?;
    let tree: Vec<String> = lines[start + 1..]
        .iter()
        .take_while(|l| !l.is_empty())
        .map(|l| mask_pids(l))
        .collect();
    (tree.last()?.starts_with("└── ")).then(|| tree.join("\n"))
}

#[test]
fn the_tree_is_logged_when_ready_and_after_a_change() {
    let mut fixture = Fixture::start_logging(&["serve", "--temporary-echo"], "info");
    let members = fixture.members();
    let ready = "\
fixture (master, pid N)
├── store (spawn, pid N) Store up
├── echo (spawn, pid N)
│   ├── 1 (fork, pid N) Echo up
│   ├── 2 (fork, pid N) Echo up
│   └── 3 (fork, pid N) Echo up
├── prober (spawn, pid N) Prober up
├── ghost (disabled)
└── tasks (spawn, pid N) up";
    let mut logged = None;
    eventually("the master logged the ready tree", || {
        logged = last_tree(&fixture.stderr_lines(), "cluster ready");
        logged.is_some()
    });
    assert_eq!(logged.as_deref(), Some(ready));

    let fork = members.iter().find(|m| m.path == "fixture/echo/2").expect("fork 2").pid;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(fork as i32).expect("a pid"),
        rustix::process::Signal::KILL,
    )
    .expect("SIGKILL fork 2");
    eventually("the master logged the tree without fork 2", || {
        last_tree(&fixture.stderr_lines(), "cluster changed")
            .is_some_and(|tree| tree == ready.replace("├── 2 (fork, pid N) Echo up", "├── 2 (fork) Echo down"))
    });
    fixture.command("quit");
    assert!(fixture.wait().success());
}
