//! The master's control service, spoken by hand the way `evilcluster ps`
//! and `evilcluster stop` speak it.

mod support;

use std::time::Duration;

use bytes::Bytes;
use evilcluster_wire::control::{self, Status, CONTROL, STATUS_TAG, STOP_TAG};
use evilcluster_wire::handshake::{self, NONCE_LEN};
use evilcluster_wire::{codec, Cookie, Frame, Identity, Request};
use futures_util::{SinkExt, StreamExt};
use support::{alive, eventually, Fixture};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

struct Client {
    framed: Framed<UnixStream, LengthDelimitedCodec>,
    incarnation: u64,
}

impl Client {
    /// Finds the cluster the way a tool does: by name, through the files its master advertises.
    async fn connect(tmp: &std::path::Path, cluster: &str) -> Client {
        // The fixture's TMPDIR is `tmp`, so its discovery directory is there.
        let dir = tmp.join(format!("evilcluster-{}", rustix::process::getuid().as_raw()));
        let endpoint = std::fs::read_to_string(control::endpoint_file(&dir, cluster)).expect("endpoint file");
        let socket = endpoint.lines().next().expect("socket line");
        let cookie = std::fs::read_to_string(control::cookie_file(&dir, cluster)).expect("cookie file");
        let cookie = Cookie::new(hex::decode(cookie.trim()).expect("a hex cookie"));
        let stream = UnixStream::connect(socket).await.expect("connect to the master");
        let mut framed = Framed::new(stream, codec(evilcluster_wire::DEFAULT_MAX_FRAME_LENGTH));
        let me = Identity {
            cluster: cluster.into(),
            path: format!("{cluster}/test-tool"),
            incarnation: 1,
        };
        let master = handshake::connect(&mut framed, &me, &cookie, [5; NONCE_LEN])
            .await
            .expect("handshake");
        Client {
            framed,
            incarnation: master.incarnation,
        }
    }

    async fn ask(&mut self, id: u64, tag: &str) -> Vec<u8> {
        let request = Frame::Request(Request {
            id,
            actor: CONTROL,
            tag,
            incarnation: self.incarnation,
            reply: true,
            payload: &[0xc0],
        });
        self.framed.send(Bytes::from(request.encode().unwrap())).await.unwrap();
        loop {
            let body = tokio::time::timeout(Duration::from_secs(20), self.framed.next())
                .await
                .expect("a reply in time")
                .expect("connection open")
                .unwrap();
            if let Frame::Reply(reply) = Frame::decode(&body).unwrap() {
                if reply.id == id {
                    return reply.result.expect("a successful reply").0.to_vec();
                }
            }
        }
    }
}

#[test]
fn status_lists_every_process_and_stop_stops_the_cluster() {
    let mut fixture = Fixture::start(&["serve"]);
    let members = fixture.members();
    fixture.command("check");
    fixture.expect_line("checked ok");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = fixture.tmp.path().to_owned();
    let status: Status = runtime.block_on(async {
        let mut client = Client::connect(&tmp, "fixture").await;
        rmp_decode(&client.ask(1, STATUS_TAG).await)
    });
    let rows: Vec<(&str, &str, &str, Option<&str>)> = status
        .processes
        .iter()
        .map(|p| {
            (
                p.path.as_str(),
                p.role.as_str(),
                p.state.as_str(),
                p.actor_type.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("fixture", "master", "up", None),
            ("fixture/store", "spawn", "up", Some("Store")),
            ("fixture/echo", "spawn", "up", None),
            ("fixture/echo/1", "fork", "up", Some("Echo")),
            ("fixture/echo/2", "fork", "up", Some("Echo")),
            ("fixture/echo/3", "fork", "up", Some("Echo")),
            ("fixture/prober", "spawn", "up", Some("Prober")),
            ("fixture/ghost", "spawn", "disabled", Some("Ghost")),
            ("fixture/tasks", "spawn", "up", None),
        ]
    );
    for process in status
        .processes
        .iter()
        .filter(|p| p.state == evilcluster_wire::control::ProcessState::Up)
    {
        let member = members
            .iter()
            .find(|m| m.path == process.path)
            .expect("listed by the fixture");
        assert_eq!(process.pid, Some(member.pid), "{}", process.path);
        assert!(
            process.uptime_ms.is_some() && process.rss_bytes.is_some_and(|b| b > 0),
            "{process:?}"
        );
    }
    // The `check` above wrote and read the store: it counted them.
    let store = status.processes.iter().find(|p| p.path == "fixture/store").unwrap();
    assert!(store.messages_in >= 2, "{store:?}");
    assert_eq!(store.actor.as_deref(), Some("store"));
    let master = &status.processes[0];
    assert!(master.messages_out >= 2, "{master:?}");

    runtime.block_on(async {
        let mut client = Client::connect(&tmp, "fixture").await;
        client.ask(2, STOP_TAG).await;
    });
    fixture.expect_line("stopped");
    assert!(fixture.wait().success());
    for member in &members {
        eventually("every process stopped", || !alive(member.pid));
    }
}

fn rmp_decode(bytes: &[u8]) -> Status {
    rmp_serde::from_slice(bytes).expect("a Status")
}

#[test]
fn status_shows_the_restart_count_of_a_process_waiting_for_its_restart() {
    // `c` crashes on every start; between attempts it is down, and `ps`
    // still tells how many times it was restarted.
    let mut fixture = Fixture::launch(
        env!("CARGO_BIN_EXE_supervision-fixture"),
        &["--crash", "c", "--backoff", "3000,3000", "--intensity", "50,60000"],
        "warn",
    );
    fixture.expect_line("event restarting sup/c 2 ");
    let tmp = fixture.tmp.path().to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = Client::connect(&tmp, "sup").await;
        let mut id = 0;
        loop {
            id += 1;
            let status: Status = rmp_serde::from_slice(&client.ask(id, STATUS_TAG).await).unwrap();
            let c = status
                .processes
                .iter()
                .find(|p| p.path == "sup/c")
                .expect("a row for c");
            if c.state == evilcluster_wire::control::ProcessState::Down && c.restarts >= 2 {
                break;
            }
            assert!(id < 1000, "c: {c:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}
