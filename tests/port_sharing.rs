//! Forks sharing one TCP port ([`Worker::listen`]), serving HTTP with
//! actix-web: the supervision fixture's `pool` with `--http`.

mod support;

use rustix::process::Signal;
use support::sup::{http_get, http_load_during, Sup};
use support::{eventually, signal_pid};

#[test]
fn forks_share_one_port_and_keep_serving_while_one_is_killed_and_restarted() {
    let mut sup = Sup::start(&["--pool", "3", "--listen", "pool"]);
    for k in 1..=3 {
        sup.event(&format!("ready sup/pool/{k} "));
    }
    sup.fixture.command("addr pool");
    let addr = sup.fixture.expect_line("addr ")["addr ".len()..].to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    // 200 requests from 4 clients at once: all answered, by more than one fork.
    let bodies: Vec<String> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| (0..50).map(|_| http_get(&addr).expect("an answer")).collect::<Vec<_>>()))
            .collect();
        clients.into_iter().flat_map(|c| c.join().expect("client")).collect()
    });
    assert_eq!(bodies.len(), 200);
    let a = sup
        .fixture
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("event ready sup/a "))
        .unwrap();
    let a_pid = a.split(' ').next().unwrap();
    let mut forks: Vec<&str> = bodies
        .iter()
        .map(|body| {
            // "fork K pid P a A": the handler reached `a` across processes.
            let words: Vec<&str> = body.split(' ').collect();
            assert_eq!((words[0], words[4], words[5]), ("fork", "a", a_pid), "{body}");
            words[1]
        })
        .collect();
    forks.sort_unstable();
    forks.dedup();
    assert!(forks.len() > 1, "every request went to fork {forks:?}");

    // Fork 1 killed and restarted under load: no connection is refused; only
    // a request fork 1 had accepted when it died can fail.
    let fork1: u32 = sup
        .fixture
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("event ready sup/pool/1 "))
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let served_by_new_fork1 = std::sync::atomic::AtomicBool::new(false);
    let new_fork1 = std::sync::Mutex::new(String::new());
    let load = http_load_during(
        &addr,
        4,
        |body| {
            let new = new_fork1.lock().unwrap();
            if !new.is_empty() && body.starts_with(&format!("fork 1 pid {new} ")) {
                served_by_new_fork1.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        },
        || {
            signal_pid(fork1, Signal::KILL);
            let back = sup.event("restarted sup/pool/1 ");
            *new_fork1.lock().unwrap() = back[0].clone();
            eventually("the new fork 1 serves requests", || {
                served_by_new_fork1.load(std::sync::atomic::Ordering::SeqCst)
            });
        },
    );
    eprintln!(
        "while fork 1 was killed and restarted: {} answered, {} failed",
        load.ok,
        load.failed.len()
    );
    assert!(load.ok > 0);
    for error in &load.failed {
        assert_ne!(error.kind(), std::io::ErrorKind::ConnectionRefused, "{:?}", load.failed);
    }
    assert!(
        load.failed.len() <= 4,
        "{} of {} requests failed: {:?}",
        load.failed.len(),
        load.ok + load.failed.len(),
        load.failed
    );
    sup.quit();
}

#[test]
fn a_worker_without_forks_serves_on_its_own_listener() {
    let mut sup = Sup::start(&["--listen", "b"]);
    let b = sup.ready("sup/b");
    sup.fixture.command("addr b");
    let addr = sup.fixture.expect_line("addr ")["addr ".len()..].to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let body = http_get(&addr).expect("an answer");
    assert!(body.starts_with(&format!("fork 0 pid {b} a ")), "{body}");
    sup.quit();
}
