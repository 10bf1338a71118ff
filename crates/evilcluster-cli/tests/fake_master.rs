//! The `evilcluster` binary against a fake master served from this test
//! process: the control protocol exactly as documented in
//! `evilcluster_wire::control`, without the runtime.
#![cfg(unix)]

mod support;

use std::path::Path;

use bytes::Bytes;
use evilcluster_wire::control::{self, ProcessStatus, Status, CONTROL, STATUS_TAG, STOP_TAG};
use evilcluster_wire::handshake::{self, NONCE_LEN};
use evilcluster_wire::{Cookie, Frame, Identity, Reply, ReplyPayload, WireError};
use futures_util::{SinkExt, StreamExt};
use support::{discovery_dir, evilcluster, unique_name};
use tokio_util::codec::Framed;

const COOKIE: &[u8] = b"fake master cookie";
const INCARNATION: u64 = 4242;

fn process(path: &str, role: &str, state: &str, pid: Option<u32>, actor_type: Option<&str>) -> ProcessStatus {
    ProcessStatus {
        path: path.into(),
        role: role.parse().expect("a role"),
        state: state.parse().expect("a state"),
        pid,
        actor: actor_type.map(str::to_lowercase),
        actor_type: actor_type.map(Into::into),
        uptime_ms: pid.map(|_| 62_000),
        restarts: 0,
        messages_in: 3,
        messages_out: 4,
        errors: 0,
        rss_bytes: pid.map(|_| 10 * 1024 * 1024),
        pss_bytes: pid.map(|_| 3 * 1024 * 1024),
        latency_us: vec![1, 2, 3],
    }
}

fn status(name: &str) -> Status {
    let path = |suffix: &str| format!("{name}{suffix}");
    Status {
        cluster: name.into(),
        processes: vec![
            process(name, "master", "up", Some(100), None),
            process(&path("/web"), "spawn", "up", Some(101), None),
            process(&path("/web/1"), "fork", "up", Some(104), Some("Web")),
            process(&path("/web/2"), "fork", "down", None, Some("Web")),
            process(&path("/ghost"), "spawn", "disabled", None, Some("Ghost")),
            process(&path("/tasks"), "spawn", "up", Some(103), None),
        ],
    }
}

/// Serves the control protocol on a socket under `tmp` and advertises it
/// (with this process's pid) in `tmp`'s discovery directory.
fn serve(tmp: &Path, name: &str) {
    let dir = discovery_dir(tmp);
    support::private_dir(&dir);
    let socket = tmp.join("master.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    support::write_private(
        control::endpoint_file(&dir, name),
        format!("{}\n{}\n", socket.display(), std::process::id()),
    )
    .unwrap();
    support::write_private(control::cookie_file(&dir, name), format!("{}\n", hex::encode(COOKIE))).unwrap();
    let name = name.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(answer(stream, name.clone()));
            }
        });
    });
}

async fn answer(stream: tokio::net::UnixStream, name: String) {
    let mut framed = Framed::new(
        stream,
        evilcluster_wire::codec(evilcluster_wire::DEFAULT_MAX_FRAME_LENGTH),
    );
    let me = Identity {
        cluster: name.clone(),
        path: name.clone(),
        incarnation: INCARNATION,
    };
    let Ok(_) = handshake::accept(&mut framed, &me, &Cookie::new(COOKIE), [7; NONCE_LEN]).await else {
        return;
    };
    while let Some(Ok(body)) = framed.next().await {
        let Ok(Frame::Request(request)) = Frame::decode(&body) else {
            return;
        };
        let payload;
        let result = if request.actor != CONTROL {
            Err(WireError::UnknownActor {
                actor: request.actor.into(),
            })
        } else if request.incarnation != INCARNATION {
            Err(WireError::StaleIncarnation {
                requested: request.incarnation,
                current: INCARNATION,
            })
        } else if request.tag == STATUS_TAG {
            payload = rmp_serde::to_vec_named(&status(&name)).unwrap();
            Ok(ReplyPayload(&payload))
        } else if request.tag == STOP_TAG {
            Ok(ReplyPayload(&[0xc0]))
        } else {
            Err(WireError::UnknownMessage {
                actor: CONTROL.into(),
                tag: request.tag.into(),
            })
        };
        let reply = Frame::Reply(Reply { id: request.id, result });
        framed.send(Bytes::from(reply.encode().unwrap())).await.unwrap();
    }
}

#[test]
fn ps_json_prints_the_status() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("fake-json");
    serve(tmp.path(), &name);
    let run = evilcluster(tmp.path(), &["ps", "--json", &name]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let printed: Status = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(printed, status(&name));
}

#[test]
fn ps_prints_a_table() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("fake-ps");
    serve(tmp.path(), &name);
    let run = evilcluster(tmp.path(), &["ps", &name]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{}", run.stdout);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "ROLE", "STATE", "PID", "ACTOR", "UPTIME", "RESTARTS", "IN", "OUT", "ERRORS", "MEM", "PSS"]
    );
    let fork: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(
        fork,
        [
            "│",
            "├──",
            "1",
            "fork",
            "up",
            "104",
            "Web",
            "1m02s",
            "0",
            "3",
            "4",
            "0",
            "10.0",
            "MiB",
            "3.0",
            "MiB"
        ]
    );
    // Every row has its columns at the header's positions.
    let pid_end = lines[0].find("PID").unwrap() + 3;
    for line in &lines[1..] {
        let chars: Vec<char> = line.chars().collect();
        let header_chars = lines[0][..pid_end].chars().count();
        assert_ne!(chars[header_chars - 1], ' ', "PID column not right-aligned in {line:?}");
    }
}

#[test]
fn tree_prints_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("fake-tree");
    serve(tmp.path(), &name);
    let run = evilcluster(tmp.path(), &["tree", &name]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let expected = format!(
        "\
{name} (master, pid 100)
├── web (spawn, pid 101)
│   ├── 1 (fork, pid 104) Web up
│   └── 2 (fork) Web down
├── ghost (disabled)
└── tasks (spawn, pid 103) up
"
    );
    assert_eq!(run.stdout, expected);
}

#[test]
fn stop_gives_up_after_its_timeout() {
    // The fake master's pid is this test's: it never exits.
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("fake-stop");
    serve(tmp.path(), &name);
    let run = evilcluster(tmp.path(), &["stop", &name, "--timeout", "0.3"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.starts_with(&format!(
            "evilcluster: cluster {name:?} was asked to stop, but its master (pid {}) is still running after 0.3s",
            std::process::id()
        )),
        "{run:#?}"
    );
}

#[test]
fn a_wrong_cookie_exits_with_2() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("fake-cookie");
    serve(tmp.path(), &name);
    let cookie = control::cookie_file(&discovery_dir(tmp.path()), &name);
    support::write_private(&cookie, "00112233\n").unwrap();
    let run = evilcluster(tmp.path(), &["ps", &name]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("cookie"), "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
}
