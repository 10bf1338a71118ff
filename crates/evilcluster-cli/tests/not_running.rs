//! The `evilcluster` command when there is no such cluster: one clear line
//! naming the cluster on standard error, exit code 1.

mod support;

use evilcluster_wire::control;
use support::{discovery_dir, evilcluster, unique_name};

#[test]
fn every_command_says_the_cluster_is_not_running() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("absent");
    let endpoint = control::endpoint_file(&discovery_dir(tmp.path()), &name);
    for args in [
        vec!["ps", name.as_str()],
        vec!["ps", "--json", name.as_str()],
        vec!["tree", name.as_str()],
        vec!["stop", name.as_str()],
    ] {
        let run = evilcluster(tmp.path(), &args);
        assert_eq!(run.code, Some(1), "{args:?}: {run:#?}");
        assert_eq!(run.stdout, "", "{args:?}");
        assert_eq!(
            run.stderr,
            format!(
                "evilcluster: no cluster named {name:?} is running (no {})\n",
                endpoint.display()
            ),
            "{args:?}"
        );
    }
}

#[test]
fn a_stale_endpoint_file_is_not_running() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("stale");
    let dir = discovery_dir(tmp.path());
    support::private_dir(&dir);
    // Pid 4294967295 cannot exist.
    support::write_private(
        control::endpoint_file(&dir, &name),
        "/nowhere/master.sock\n4294967295\n",
    )
    .unwrap();
    support::write_private(control::cookie_file(&dir, &name), "00\n").unwrap();
    let run = evilcluster(tmp.path(), &["ps", &name]);
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stderr.starts_with(&format!(
            "evilcluster: no cluster named {name:?} is running (its master, pid 4294967295, has exited"
        )),
        "{run:#?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
}

#[cfg(unix)]
#[test]
fn a_refusing_socket_is_not_running() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("refused");
    let dir = discovery_dir(tmp.path());
    support::private_dir(&dir);
    // A socket file nobody listens on any more, advertised by a live pid (ours).
    let socket = tmp.path().join("master.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    support::write_private(
        control::endpoint_file(&dir, &name),
        format!("{}\n{}\n", socket.display(), std::process::id()),
    )
    .unwrap();
    support::write_private(control::cookie_file(&dir, &name), "00\n").unwrap();
    let run = evilcluster(tmp.path(), &["tree", &name]);
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stderr.starts_with(&format!(
            "evilcluster: no cluster named {name:?} is running (its master socket {} refuses connections",
            socket.display()
        )),
        "{run:#?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
}

#[test]
fn a_malformed_endpoint_file_exits_with_2() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("garbled");
    let dir = discovery_dir(tmp.path());
    support::private_dir(&dir);
    let endpoint = control::endpoint_file(&dir, &name);
    support::write_private(&endpoint, "just one line\n").unwrap();
    let run = evilcluster(tmp.path(), &["ps", &name]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr
            .starts_with(&format!("evilcluster: {} is malformed: ", endpoint.display())),
        "{run:#?}"
    );
}

#[test]
fn an_invalid_name_exits_with_2() {
    let tmp = tempfile::tempdir().unwrap();
    let run = evilcluster(tmp.path(), &["ps", "a/b"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("\"a/b\" is not a valid cluster name"), "{run:#?}");
}
