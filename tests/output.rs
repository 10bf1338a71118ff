//! Children's output reaches the terminal whole and prefixed with the
//! process's path and pid, like `pm2 logs`.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use support::Fixture;

const LINES: u32 = 500;
const PROCESSES: [&str; 4] = ["fixture/store", "fixture/echo/1", "fixture/echo/2", "fixture/echo/3"];

/// Checks that every line mentioning `marker` reads
/// `<path>[<pid>] | … <marker> <path> <i>`, and that each of the four
/// processes sent all its numbers.
fn check(lines: &[String], marker: &str) {
    let mut numbers: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut pids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in lines.iter().filter(|l| l.contains(marker)) {
        let (prefix, rest) = line.split_once(" | ").unwrap_or_else(|| panic!("no prefix: {line:?}"));
        let (path, pid) = prefix
            .strip_suffix(']')
            .and_then(|p| p.split_once('['))
            .unwrap_or_else(|| panic!("prefix is not path[pid]: {line:?}"));
        assert!(pid.parse::<u32>().is_ok(), "{line:?}");
        let tail = rest.split_once(marker).unwrap_or_else(|| panic!("{line:?}")).1;
        let mut words = tail.split_whitespace();
        assert_eq!(
            words.next(),
            Some(path),
            "line prefixed with another process's path: {line:?}"
        );
        let number: u32 = words
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line:?}"));
        assert_eq!(words.next(), None, "two lines run together: {line:?}");
        numbers.entry(path.to_owned()).or_default().insert(number);
        pids.entry(path.to_owned()).or_default().insert(pid.to_owned());
    }
    let expected: BTreeSet<String> = PROCESSES.iter().map(|p| p.to_string()).collect();
    assert_eq!(numbers.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for (path, seen) in &numbers {
        assert_eq!(seen.len(), LINES as usize, "{path} lost lines of {marker}");
        assert_eq!(pids[path].len(), 1, "{path} under several pids");
    }
}

#[test]
fn lines_from_processes_printing_at_once_stay_whole_and_prefixed() {
    let mut fixture = Fixture::start(&["chatter"]);
    fixture.expect_line("ok chatter");
    assert!(fixture.wait().success(), "{:#?}", fixture.seen);
    check(&fixture.seen, "chatter ");
    // Logs (standard error) too, the user's `tracing` calls included.
    check(&fixture.stderr_lines(), "chatter-log ");
}
