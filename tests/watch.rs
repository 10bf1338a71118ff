//! Watching a name: up/down events for every instance of an actor.

mod support;

use rustix::process::Signal;
use support::signal_pid;
use support::sup::Sup;

#[test]
fn watching_a_name_sees_down_then_up_across_a_sigkill_and_restart() {
    let mut sup = Sup::start(&["--pool", "2"]);
    sup.event("ready sup/pool ");
    sup.fixture.command("watch");
    let up = |sup: &mut Sup, path: &str| -> u32 {
        let line = sup.fixture.expect_line(&format!("watch up {path} "));
        line.rsplit(' ').next().unwrap().parse().expect("pid")
    };
    let fork1 = up(&mut sup, "sup/pool/1");
    let fork2 = up(&mut sup, "sup/pool/2");

    // One fork killed: down (with the signal), then up as a new process.
    signal_pid(fork2, Signal::KILL);
    assert_eq!(
        sup.fixture.expect_line("watch "),
        format!("watch down sup/pool/2 {fork2} signal:9")
    );
    let fork2_again = up(&mut sup, "sup/pool/2");
    assert_ne!(fork2_again, fork2);

    // The spawn killed: both forks die with it, then all come back.
    let spawn = sup
        .fixture
        .seen
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("event ready sup/pool "));
    let spawn: u32 = spawn.expect("spawn ready").split(' ').next().unwrap().parse().unwrap();
    signal_pid(spawn, Signal::KILL);
    let mut downs = vec![sup.fixture.expect_line("watch "), sup.fixture.expect_line("watch ")];
    downs.sort();
    assert_eq!(
        downs,
        [
            format!("watch down sup/pool/1 {fork1} signal:9"),
            format!("watch down sup/pool/2 {fork2_again} signal:9"),
        ]
    );
    up(&mut sup, "sup/pool/1");
    up(&mut sup, "sup/pool/2");
    sup.quit();
}

#[test]
fn a_watch_made_before_the_cluster_starts_sees_the_forks_not_the_spawn() {
    let mut sup = Sup::start(&["--pool", "2", "--watch-early"]);
    let up = |sup: &mut Sup, path: &str| -> u32 {
        let line = sup.fixture.expect_line(&format!("early up {path} "));
        line.rsplit(' ').next().unwrap().parse().expect("pid")
    };
    up(&mut sup, "sup/pool/1");
    let fork2 = up(&mut sup, "sup/pool/2");
    signal_pid(fork2, Signal::KILL);
    assert_eq!(
        sup.fixture.expect_line("early down "),
        format!("early down sup/pool/2 {fork2} signal:9")
    );
    assert_ne!(up(&mut sup, "sup/pool/2"), fork2);
    // The spawn hosts nothing: it is never an instance.
    let spawn: Vec<&String> = sup
        .fixture
        .seen
        .iter()
        .filter(|l| l.starts_with("early ") && l.split(' ').nth(2) == Some("sup/pool"))
        .collect();
    assert!(spawn.is_empty(), "{spawn:#?}");
    sup.quit();
}
