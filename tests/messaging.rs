//! Typed request/reply between real processes: master, spawns and forks.

mod support;

use support::Fixture;

#[test]
fn every_kind_of_process_reaches_every_other() {
    let mut fixture = Fixture::start(&["all", "--user-flag", "kept as is"]);
    for check in [
        "master_to_spawn",
        "spawn_to_spawn",
        "fork_to_spawn",
        "round_robin",
        "fork_targeted",
        "timeout",
        "not_registered",
        "unknown_message",
        "too_large",
        "roles_and_options",
        "task_worker",
    ] {
        fixture.expect_line(&format!("ok {check}"));
    }
    fixture.expect_line("done");
    assert!(fixture.wait().success(), "{:#?}", fixture.seen);
}

#[test]
fn ten_thousand_do_sends_arrive_complete_and_in_order() {
    let mut fixture = Fixture::start(&["ordering"]);
    fixture.expect_line("ok ordering");
    assert!(fixture.wait().success(), "{:#?}", fixture.seen);
}

#[test]
fn a_hundred_thousand_requests_all_get_their_own_reply() {
    let mut fixture = Fixture::start(&["many_requests"]);
    fixture.expect_line("ok many_requests");
    assert!(fixture.wait().success(), "{:#?}", fixture.seen);
}

#[test]
fn a_request_in_flight_to_a_dying_process_fails_with_disconnected() {
    let mut fixture = Fixture::start(&["disconnect"]);
    fixture.expect_line("ok disconnect");
    assert!(fixture.wait().success(), "{:#?}", fixture.seen);
}

#[test]
fn each_event_route_reaches_exactly_the_processes_it_names() {
    let mut fixture = Fixture::start(&["events"]);
    fixture.expect_line("ok events");
    assert!(fixture.wait().success(), "{:#?}", fixture.seen);
}

#[test]
fn broadcast_reaches_every_fork_and_reports_a_dead_one() {
    let mut fixture = Fixture::start(&["broadcast"]);
    fixture.expect_line("ok broadcast");
    assert!(fixture.wait().success(), "{:#?}", fixture.seen);
}
