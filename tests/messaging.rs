//! Typed request/reply between real processes: master, spawns and forks.

mod support;

use support::Fixture;

/// Runs a fixture scenario made of one check, named like the scenario,
/// and expects it to pass and the cluster to exit cleanly.
fn scenario_passes(scenario: &str) {
    let mut fixture = Fixture::start(&[scenario]);
    fixture.expect_line(&format!("ok {scenario}"));
    assert!(fixture.wait().success(), "{:#?}", fixture.seen);
}

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
    scenario_passes("ordering");
}

#[test]
fn a_hundred_thousand_requests_all_get_their_own_reply() {
    scenario_passes("many_requests");
}

#[test]
fn send_all_pipelines_calls_and_yields_their_results_in_order() {
    scenario_passes("send_all");
}

#[test]
fn a_fork_sleeps_once_per_request_not_again_when_its_reply_is_read() {
    scenario_passes("wakeups");
}

#[test]
fn a_request_in_flight_to_a_dying_process_fails_with_disconnected() {
    scenario_passes("disconnect");
}

#[test]
fn each_event_route_reaches_exactly_the_processes_it_names() {
    scenario_passes("events");
}

#[test]
fn a_burst_of_events_costs_the_master_its_bytes_once_not_once_per_process() {
    scenario_passes("event_burst");
}

#[test]
fn an_event_published_from_a_thread_outside_the_runtime_is_delivered() {
    scenario_passes("event_from_a_plain_thread");
}

#[test]
fn broadcast_reaches_every_fork_and_reports_a_dead_one() {
    scenario_passes("broadcast");
}
