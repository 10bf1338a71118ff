//! Processes and sockets never outlive the cluster.

mod support;

use support::{alive, eventually, files_below, Fixture};

#[test]
fn killing_the_master_takes_every_child_with_it() {
    let mut fixture = Fixture::start(&["serve"]);
    let members = fixture.members();
    let children: Vec<u32> = members
        .iter()
        .map(|m| m.pid)
        .filter(|&pid| pid != fixture.pid())
        .collect();
    // store, echo + 3 forks, prober, tasks.
    assert_eq!(children.len(), 7, "{members:#?}");
    assert!(children.iter().all(|&pid| alive(pid)));

    fixture.kill(); // SIGKILL: the master gets no chance to clean up.
    eventually("every child of the killed master is gone", || {
        children.iter().all(|&pid| !alive(pid))
    });
}

#[test]
fn a_clean_exit_leaves_no_process_and_no_socket_file() {
    let mut fixture = Fixture::start(&["serve"]);
    let members = fixture.members();
    let sockets: Vec<String> = members.iter().filter_map(|m| m.socket.clone()).collect();
    assert!(
        sockets.len() >= 5,
        "master, store, three echo forks and prober listen: {members:#?}"
    );
    for socket in &sockets {
        assert!(socket.starts_with(&*fixture.tmp.path().to_string_lossy()), "{socket}");
        // Only the owner may even enter the directory holding the sockets.
        use std::os::unix::fs::PermissionsExt;
        let dir = std::path::Path::new(socket).parent().expect("a socket directory");
        let mode = std::fs::metadata(dir).expect("socket directory").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{} has mode {:o}", dir.display(), mode & 0o777);
    }
    fixture.command("check");
    fixture.expect_line("checked ok");
    fixture.command("quit");
    assert!(fixture.wait().success(), "{:#?}", fixture.seen);
    for member in &members {
        assert!(
            !alive(member.pid),
            "{} (pid {}) outlived the cluster",
            member.path,
            member.pid
        );
    }
    // The per-user directory where masters advertise themselves to tools
    // (`evilcluster ps`) stays, empty; nothing else does.
    let discovery = fixture
        .tmp
        .path()
        .join(format!("evilcluster-{}", rustix::process::getuid().as_raw()));
    let left: Vec<_> = files_below(fixture.tmp.path())
        .into_iter()
        .filter(|p| *p != discovery)
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn killing_a_spawn_takes_its_forks_with_it() {
    let mut fixture = Fixture::start(&["serve"]);
    let members = fixture.members();
    let pid_of = |path: &str| members.iter().find(|m| m.path == path).map(|m| m.pid).expect(path);
    let spawn = pid_of("fixture/echo");
    let forks: Vec<u32> = (1..=3).map(|k| pid_of(&format!("fixture/echo/{k}"))).collect();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(spawn as i32).expect("a pid"),
        rustix::process::Signal::KILL,
    )
    .expect("SIGKILL the echo spawn");
    eventually("the forks of the killed spawn are gone", || {
        forks.iter().all(|&pid| !alive(pid))
    });
    // The rest of the tree is unaffected.
    assert!(alive(pid_of("fixture/store")));
    fixture.command("quit");
    fixture.wait();
}
