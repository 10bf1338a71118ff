//! Local attackers and careless same-user processes against a real cluster
//! (issue 10): the discovery and run directories, stale state, strangers
//! that never authenticate, peers claiming identities that are not theirs,
//! the listener handoff, log floods and the role environment.
//!
//! Every test starts real processes; each [`Fixture`] kills its tree and
//! removes its temp directory when dropped, pass or fail.

mod support;

use std::ffi::OsStr;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use support::wire;
use support::{alive, eventually, Fixture, Member};

const COOKIE: &str = "a-fixed-test-cookie";

fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The discovery directory a master with `TMPDIR=tmp` uses.
fn discovery(tmp: &Path) -> PathBuf {
    tmp.join(format!("evilcluster-{}", uid()))
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Starts the cluster fixture (`serve`) with `tmp` as its TMPDIR.
fn serve_in(tmp: tempfile::TempDir, env: &[(&str, &OsStr)]) -> Fixture {
    Fixture::launch_in(
        tmp,
        env!("CARGO_BIN_EXE_cluster-fixture"),
        &["serve", "--cookie", COOKIE],
        "warn",
        env,
    )
}

/// The master refused to start: it printed why and exited non-zero.
fn refused_to_start(fixture: &mut Fixture) -> String {
    assert!(!fixture.wait().success(), "{:#?}", fixture.seen);
    let line = fixture.seen.iter().find(|l| l.starts_with("FAIL cluster"));
    line.cloned()
        .unwrap_or_else(|| panic!("no reason given: {:#?}", fixture.seen))
}

// 1. The discovery directory is private and verified.

#[test]
fn a_discovery_directory_others_can_write_is_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = discovery(tmp.path());
    std::fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o777);
    let mut fixture = serve_in(tmp, &[]);
    let why = refused_to_start(&mut fixture);
    assert!(why.contains(&*dir.to_string_lossy()) && why.contains("0777"), "{why}");
}

#[test]
fn a_discovery_directory_that_is_a_symlink_is_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    set_mode(&elsewhere, 0o700);
    symlink(&elsewhere, discovery(tmp.path())).unwrap();
    let mut fixture = serve_in(tmp, &[]);
    let why = refused_to_start(&mut fixture);
    assert!(why.contains("symbolic link"), "{why}");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing written through the link"
    );
}

#[test]
fn discovery_files_that_are_symlinks_are_replaced_not_followed() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = discovery(tmp.path());
    std::fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o700);
    let mut targets = Vec::new();
    for name in ["fixture.endpoint", "fixture.cookie"] {
        let target = tmp.path().join(format!("precious-{name}"));
        std::fs::write(&target, "precious\n").unwrap();
        symlink(&target, dir.join(name)).unwrap();
        targets.push((dir.join(name), target));
    }
    let mut fixture = serve_in(tmp, &[]);
    fixture.members();
    for (file, target) in &targets {
        assert_eq!(
            std::fs::read_to_string(target).unwrap(),
            "precious\n",
            "{} was written through",
            target.display()
        );
        let meta = std::fs::symlink_metadata(file).unwrap();
        assert!(meta.is_file(), "{} is still a link", file.display());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", file.display());
    }
    fixture.command("quit");
    assert!(fixture.wait().success());
}

/// With a real second user (the suite runs as root here): `nobody`
/// pre-creates root's discovery directory in a sticky, world-writable
/// TMPDIR, world-writable, as the attacker did.
#[test]
fn another_users_discovery_directory_is_refused() {
    if uid() != 0 {
        println!("skipped: needs root to act as a second user (`setpriv --reuid=nobody`)");
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    set_mode(tmp.path(), 0o1777);
    let dir = discovery(tmp.path());
    let made = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .args([
            "sh",
            "-c",
            "umask 0; mkdir -m 0777 \"$1\" && echo x > \"$1/fixture.cookie\"",
            "sh",
        ])
        .arg(&dir)
        .status();
    match made {
        Ok(status) if status.success() => {}
        other => {
            println!("skipped: cannot act as user nobody here ({other:?})");
            return;
        }
    }
    let mut fixture = serve_in(tmp, &[]);
    let why = refused_to_start(&mut fixture);
    assert!(why.contains("belongs to uid"), "{why}");
    assert_eq!(std::fs::read_to_string(dir.join("fixture.cookie")).unwrap(), "x\n");
}

// 2. Liveness by lock; a dead cluster's leftovers go.

fn sockets(members: &[Member]) -> Vec<PathBuf> {
    members
        .iter()
        .filter_map(|m| m.socket.as_ref().map(PathBuf::from))
        .collect()
}

#[test]
fn a_sigkilled_masters_leftovers_are_removed_by_the_next_start() {
    let mut first = serve_in(tempfile::tempdir().expect("temp dir"), &[]);
    let members = first.members();
    let old = sockets(&members);
    assert!(old.len() >= 5, "{members:#?}");
    let master_socket = PathBuf::from(master(&members).socket.expect("the master listens"));
    first.kill();
    eventually("the killed master's children are gone", || {
        members.iter().all(|m| !alive(m.pid))
    });
    // A SIGKILLed master removes nothing (its children may still remove
    // their own sockets on the way out).
    assert!(
        master_socket.exists(),
        "SIGKILL leaves the master's socket behind: {old:?}"
    );
    let tmp = std::mem::replace(&mut first.tmp, tempfile::tempdir().expect("temp dir"));
    drop(first);

    let mut second = serve_in(tmp, &[]);
    let new = sockets(&second.members());
    let stale: Vec<_> = old.iter().filter(|s| s.exists() && !new.contains(s)).collect();
    assert!(stale.is_empty(), "left behind: {stale:?}");
    let old_dirs: Vec<_> = old
        .iter()
        .filter_map(|s| s.parent())
        .filter(|d| d.exists() && !new.iter().any(|n| n.starts_with(d)))
        .collect();
    assert!(old_dirs.is_empty(), "old socket directories left behind: {old_dirs:?}");
    second.command("check");
    second.expect_line("checked ok");
    second.command("quit");
    assert!(second.wait().success());
}

#[test]
fn a_stale_endpoint_naming_an_unrelated_live_pid_does_not_block_a_start() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = discovery(tmp.path());
    std::fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o700);
    let endpoint = dir.join("fixture.endpoint");
    // This test process: alive, and not a master.
    std::fs::write(&endpoint, format!("/nowhere/master.sock\n{}\n", std::process::id())).unwrap();
    set_mode(&endpoint, 0o600);
    let mut fixture = serve_in(tmp, &[]);
    fixture.members();
    let text = std::fs::read_to_string(&endpoint).unwrap();
    assert!(text.ends_with(&format!("\n{}\n", fixture.pid())), "{text}");
    fixture.command("quit");
    assert!(fixture.wait().success());
}

#[test]
fn a_second_master_of_the_same_name_is_refused_while_the_first_lives() {
    // Both masters share one discovery directory through XDG_RUNTIME_DIR.
    let runtime = tempfile::tempdir().expect("temp dir");
    set_mode(runtime.path(), 0o700);
    let env = [("XDG_RUNTIME_DIR", runtime.path().as_os_str())];
    let mut first = serve_in(tempfile::tempdir().expect("temp dir"), &env);
    first.members();
    assert!(runtime.path().join("evilcluster/fixture.endpoint").exists());
    let mut second = serve_in(tempfile::tempdir().expect("temp dir"), &env);
    let why = refused_to_start(&mut second);
    assert!(
        why.contains("already running") && why.contains(&first.pid().to_string()),
        "{why}"
    );
    first.command("check");
    first.expect_line("checked ok");
    first.command("quit");
    assert!(first.wait().success());
}

// 3. Strangers that never authenticate are bounded.

const MIB: u64 = 1024 * 1024;

fn master(members: &[Member]) -> Member {
    members
        .iter()
        .find(|m| m.path == "fixture")
        .cloned()
        .expect("the master is listed")
}

#[test]
fn unauthenticated_giant_frames_do_not_grow_the_master() {
    // The default maximum frame (16 MiB), as in the issue.
    let mut fixture = Fixture::launch_in(
        tempfile::tempdir().expect("temp dir"),
        env!("CARGO_BIN_EXE_cluster-fixture"),
        &["serve", "--cookie", COOKIE, "--max-frame", "16777216"],
        "warn",
        &[],
    );
    let master = master(&fixture.members());
    let socket = master.socket.clone().expect("the master listens");
    let before = support::rss(master.pid);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut peak = before;
    std::thread::scope(|scope| {
        for _ in 0..40 {
            scope.spawn(|| {
                use std::io::Write;
                if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&socket) {
                    // A header announcing 16 MiB - 1, then that many bytes.
                    let chunk = vec![0x5a_u8; 64 * 1024];
                    let mut sent = stream.write_all(&(16 * MIB as u32 - 1).to_be_bytes()).is_ok();
                    let mut left = 16 * MIB - 1;
                    while sent && left > 0 {
                        let n = left.min(chunk.len() as u64) as usize;
                        sent = stream.write_all(&chunk[..n]).is_ok();
                        left -= n as u64;
                    }
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        while done.load(std::sync::atomic::Ordering::SeqCst) < 40 {
            peak = peak.max(support::rss(master.pid));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    });
    peak = peak.max(support::rss(master.pid));
    println!(
        "master RSS {} MiB before, {} MiB at most during",
        before / MIB,
        peak / MIB
    );
    assert!(
        peak < before + 32 * MIB,
        "the master grew from {} MiB to {} MiB",
        before / MIB,
        peak / MIB
    );
    fixture.command("check");
    fixture.expect_line("checked ok");
    fixture.command("quit");
    assert!(fixture.wait().success());
}

/// The master at a soft and hard limit of 256 descriptors; 500 connections
/// that never say a word.
#[test]
fn a_flood_of_idle_connections_leaves_the_cluster_serving_and_restarting() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let exe = env!("CARGO_BIN_EXE_cluster-fixture");
    let mut fixture = Fixture::launch_in(
        tmp,
        "prlimit",
        &["--nofile=256:256", "--", exe, "serve", "--cookie", COOKIE],
        "warn",
        &[],
    );
    let members = fixture.members();
    let master = master(&members);
    let socket = master.socket.clone().expect("the master listens");
    let baseline = support::fds(master.pid);
    let flood: Vec<_> = (0..500)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
        .collect();
    // The most descriptors the master holds while it accepts (or closes) them.
    let mut during = 0;
    let watch = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < watch {
        during = during.max(support::fds(master.pid));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    println!("master descriptors: {baseline} before, {during} with 500 idle strangers");
    assert!(
        during <= baseline + 70,
        "{baseline} descriptors before, {during} during"
    );
    fixture.command("check");
    fixture.expect_line("checked ok");

    let fork = members
        .iter()
        .find(|m| m.path == "fixture/echo/2")
        .cloned()
        .expect("echo/2");
    support::signal_pid(fork.pid, rustix::process::Signal::KILL);
    let deadline = std::time::Instant::now() + support::DEADLINE;
    let restarted = loop {
        assert!(std::time::Instant::now() < deadline, "echo/2 was not restarted");
        let now = fixture.current_members();
        if let Some(new) = now.iter().find(|m| m.path == fork.path && m.pid != fork.pid) {
            break new.clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_ne!(restarted.incarnation, fork.incarnation);
    fixture.command("check");
    fixture.expect_line("checked ok");
    drop(flood);
    fixture.command("quit");
    assert!(fixture.wait().success());
}

// 4. A peer acts only as the identity it authenticated as, and only through
// the connection registered for it.

/// Samples for `period` that `condition` holds throughout.
fn holds_for(what: &str, period: std::time::Duration, mut condition: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + period;
    while std::time::Instant::now() < until {
        assert!(condition(), "{what} stopped holding");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_duplicate_connection_claiming_a_worker_leaves_the_real_one_registered() {
    let mut fixture = serve_in(tempfile::tempdir().expect("temp dir"), &[]);
    let members = fixture.members();
    let master = master(&members);
    let store = members.iter().find(|m| m.path == "fixture/store").cloned().unwrap();
    wire::runtime().block_on(async {
        // The store's own path and incarnation, from the directory.
        let (conn, _) = wire::claim(
            master.socket.as_deref().unwrap(),
            COOKIE,
            &store.path,
            store.incarnation,
        )
        .await;
        drop(conn);
    });
    // Each `members` round trip goes through the master after it saw the close.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < deadline {
        let now = fixture.current_members();
        assert!(
            now.iter().any(|m| m.path == store.path && m.pid == store.pid),
            "the real store went down: {now:#?}"
        );
    }
    fixture.command("check");
    fixture.expect_line("checked ok");
    assert!(alive(store.pid));
    fixture.command("quit");
    assert!(fixture.wait().success());
}

#[test]
fn a_connection_claiming_the_master_on_a_forks_socket_does_not_stop_the_fork() {
    let mut fixture = serve_in(tempfile::tempdir().expect("temp dir"), &[]);
    let members = fixture.members();
    let master = master(&members);
    let fork = members.iter().find(|m| m.path == "fixture/echo/1").cloned().unwrap();
    wire::runtime().block_on(async {
        let (conn, _) = wire::claim(
            fork.socket.as_deref().unwrap(),
            COOKIE,
            &master.path,
            master.incarnation,
        )
        .await;
        drop(conn);
    });
    holds_for("the fork running", std::time::Duration::from_secs(1), || {
        alive(fork.pid)
    });
    let now = fixture.current_members();
    assert!(now.iter().any(|m| m.path == fork.path && m.pid == fork.pid), "{now:#?}");
    fixture.command("check");
    fixture.expect_line("checked ok");
    fixture.command("quit");
    assert!(fixture.wait().success());
}

#[test]
fn payload_paths_must_match_the_handshake_identity() {
    #[derive(serde::Serialize)]
    struct Leave {
        path: String,
        incarnation: u64,
    }
    #[derive(serde::Serialize)]
    struct Publication {
        to: evilcluster::To,
        tag: String,
        from: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    }
    let mut fixture = serve_in(tempfile::tempdir().expect("temp dir"), &[]);
    let members = fixture.members();
    let master = master(&members);
    let store = members.iter().find(|m| m.path == "fixture/store").cloned().unwrap();
    wire::runtime().block_on(async {
        let (mut conn, peer) = wire::claim(master.socket.as_deref().unwrap(), COOKIE, "fixture/intruder", 77).await;
        let registry = "evilcluster.registry";
        // Announce the store, pointing at a socket of ours.
        let fake = evilcluster::Member {
            path: store.path.clone().into(),
            role: evilcluster::RoleKind::Spawn,
            fork: None,
            pid: std::process::id(),
            incarnation: 77,
            restarts: 0,
            hosting: evilcluster::Hosting {
                worker: "store".into(),
                order: 1,
                actor: Some("store".into()),
                actor_type: None,
                socket_dir: Some("/nowhere".into()),
                listen: None,
            }
            .shared(),
        };
        let payload = rmp_serde::to_vec(&fake).unwrap();
        let announced = wire::ask(&mut conn, 1, registry, "registry.announce", peer.incarnation, &payload).await;
        // (Matched by name: the variant is new in this change.)
        let refused = |outcome: &Result<Vec<u8>, evilcluster_wire::WireError>| {
            outcome.is_err() && format!("{outcome:?}").contains("Impersonation")
        };
        assert!(refused(&announced), "{announced:?}");
        let leave = rmp_serde::to_vec(&Leave {
            path: store.path.clone(),
            incarnation: store.incarnation,
        })
        .unwrap();
        let left = wire::ask(&mut conn, 2, registry, "registry.leave", peer.incarnation, &leave).await;
        assert!(refused(&left), "{left:?}");
        let publication = rmp_serde::to_vec(&Publication {
            to: evilcluster::To::All,
            tag: "anything".into(),
            from: store.path.clone(),
            payload: vec![0xc0],
        })
        .unwrap();
        let published = wire::ask(
            &mut conn,
            3,
            "evilcluster.events",
            "events.publish",
            peer.incarnation,
            &publication,
        )
        .await;
        assert!(refused(&published), "{published:?}");
    });
    let now = fixture.current_members();
    let listed = now
        .iter()
        .find(|m| m.path == store.path)
        .expect("the store is still listed");
    assert_eq!(listed.pid, store.pid, "{now:#?}");
    fixture.command("check");
    fixture.expect_line("checked ok");
    fixture.command("quit");
    assert!(fixture.wait().success());
}

// 5. The listener handoff serves only the spawn's own forks.

/// What a process connecting to the handoff socket at `path` receives: the
/// bytes, and whether a descriptor came with them.
fn fetch_handoff(path: &Path) -> (usize, bool) {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::mem::MaybeUninit;
    let stream = std::os::unix::net::UnixStream::connect(path).expect("connect to the handoff socket");
    stream.set_read_timeout(Some(support::DEADLINE)).unwrap();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let received = recvmsg(
        &stream,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map(|r| r.bytes)
    .unwrap_or(0);
    let fd = control.drain().any(|message| match message {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next().is_some(),
        _ => false,
    });
    (received, fd)
}

#[test]
fn the_listener_handoff_serves_only_the_spawns_own_forks() {
    let mut sup = support::sup::Sup::start(&["--pool", "2", "--listen", "pool"]);
    for k in 1..=2 {
        sup.event(&format!("ready sup/pool/{k} "));
    }
    let handoff = support::files_below(sup.fixture.tmp.path())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "listener"))
        .expect("the spawn's handoff socket");
    let (bytes, descriptor) = fetch_handoff(&handoff);
    assert!(
        !descriptor && bytes == 0,
        "a stranger got {bytes} bytes, descriptor: {descriptor}"
    );

    // Its own forks still get it: a killed fork comes back and serves.
    let fork1: u32 = sup
        .fixture
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("event ready sup/pool/1 "))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .expect("fork 1's pid");
    support::signal_pid(fork1, rustix::process::Signal::KILL);
    sup.event("ready sup/pool/1 ");
    sup.fixture.command("addr pool");
    let addr = sup.fixture.expect_line("addr ")["addr ".len()..].to_owned();
    assert!(support::sup::http_get(&addr).is_ok());
    sup.quit();
}

// 6. A peer cannot turn the logs into its megaphone.

#[test]
fn a_huge_cluster_name_gives_a_short_log_line_and_a_short_refusal() {
    use evilcluster_wire::handshake::{self, Message, NONCE_LEN};
    let mut fixture = serve_in(tempfile::tempdir().expect("temp dir"), &[]);
    let master = master(&fixture.members());
    let socket = master.socket.clone().unwrap();
    let hello = |cluster: String| Message::Hello {
        version: evilcluster_wire::PROTOCOL_VERSION,
        cluster,
        path: "fixture/intruder".into(),
        incarnation: 1,
        nonce: vec![1; NONCE_LEN],
    };
    let refusal = wire::runtime().block_on(async {
        // 1 MB: refused on its header, before it is read.
        let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let mut framed = tokio_util::codec::Framed::new(stream, evilcluster_wire::codec(2 << 20));
        // (The master may hang up while it is still being sent.)
        let _ = handshake::send(&mut framed, &hello("x".repeat(1 << 20))).await;
        let _ = handshake::receive(&mut framed).await;
        // 3 KB: fits in a handshake frame, and is refused as another cluster.
        let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let mut framed = tokio_util::codec::Framed::new(stream, evilcluster_wire::codec(2 << 20));
        handshake::send(&mut framed, &hello("y".repeat(3000))).await.unwrap();
        handshake::receive(&mut framed).await
    });
    match refusal {
        Ok(Message::Refused { reason }) => assert!(reason.len() < 400, "a refusal of {} bytes", reason.len()),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let deadline = std::time::Instant::now() + support::DEADLINE;
    loop {
        let lines = fixture.stderr_lines();
        let refused: Vec<_> = lines.iter().filter(|l| l.contains("refused a connection")).collect();
        if refused.len() >= 2 {
            let longest = lines.iter().map(String::len).max().unwrap_or(0);
            assert!(longest < 1000, "a log line of {longest} bytes");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no refusal logged: {lines:#?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fixture.command("check");
    fixture.expect_line("checked ok");
    fixture.command("quit");
    assert!(fixture.wait().success());
}

#[test]
fn a_hundred_thousand_bad_messages_give_a_few_dozen_warnings() {
    use evilcluster_wire::{Frame, Request};
    use tokio::io::AsyncWriteExt;
    let mut fixture = serve_in(tempfile::tempdir().expect("temp dir"), &[]);
    let store = fixture
        .members()
        .into_iter()
        .find(|m| m.path == "fixture/store")
        .unwrap();
    wire::runtime().block_on(async {
        let (conn, _) = wire::claim(store.socket.as_deref().unwrap(), COOKIE, "fixture/intruder", 78).await;
        let mut stream = conn.into_inner();
        // One-way messages with a tag the store does not route.
        let mut batch = Vec::new();
        for id in 0..100_000u64 {
            let body = Frame::Request(Request {
                id,
                actor: "store",
                tag: "store.nope",
                incarnation: store.incarnation,
                reply: false,
                payload: &[0xc0],
            })
            .encode()
            .unwrap();
            batch.extend_from_slice(&(body.len() as u32).to_be_bytes());
            batch.extend_from_slice(&body);
        }
        stream.write_all(&batch).await.unwrap();
        stream.shutdown().await.unwrap();
    });
    // The count of what was held back comes at the latest when the connection ends.
    let deadline = std::time::Instant::now() + support::DEADLINE;
    let lines = loop {
        let lines = fixture.stderr_lines();
        if lines.iter().any(|l| l.contains("suppressed")) {
            break lines;
        }
        let refused = lines.iter().filter(|l| l.contains("refused a request")).count();
        assert!(
            std::time::Instant::now() < deadline,
            "no count of suppressed warnings; {refused} warnings logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let warnings = lines.iter().filter(|l| l.contains("refused a request")).count();
    println!("100,000 bad messages: {warnings} warning lines");
    assert!(warnings <= 50, "{warnings} warning lines");
    fixture.command("check");
    fixture.expect_line("checked ok");
    fixture.command("quit");
    assert!(fixture.wait().success());
}

// 7. The role environment: not inherited, never a panic.

#[test]
fn what_a_worker_starts_inherits_no_role_variables() {
    let mut fixture = serve_in(tempfile::tempdir().expect("temp dir"), &[]);
    fixture.members();
    fixture.command("environ");
    let line = fixture.expect_line("environ ");
    assert_eq!(
        line, "environ ours= child=",
        "the store, and `env` started by it, see role variables"
    );
    // Still the store: its role and path were read before they were removed.
    fixture.command("check");
    fixture.expect_line("checked ok");
    fixture.command("quit");
    assert!(fixture.wait().success());
}

#[test]
fn a_malformed_role_environment_is_a_clear_error_not_a_panic() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cluster-fixture"))
        .args(["serve", "--print-role"])
        .env("EVILCLUSTER_ROLE", "fork")
        .env("EVILCLUSTER_WORKER", "echo")
        .env("EVILCLUSTER_FORK", "not a number")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the fixture");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("FAIL cluster: bad evilcluster environment") && stdout.contains("EVILCLUSTER_FORK"),
        "{stdout}"
    );
}
