//! Rendering a [`Status`] for people: the tree, the `ps` table, and their
//! units.

use evilcluster_wire::control::{tree_lines, ProcessState, Status};

/// An uptime for people: `3s`, `2m10s`, `1h02m`, `4d03h`.
pub fn format_uptime(ms: u64) -> String {
    let seconds = ms / 1000;
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86_400);
    if minutes == 0 {
        format!("{seconds}s")
    } else if hours == 0 {
        format!("{minutes}m{:02}s", seconds % 60)
    } else if days == 0 {
        format!("{hours}h{:02}m", minutes % 60)
    } else {
        format!("{days}d{:02}h", hours % 24)
    }
}

/// A memory size in MiB with one decimal: `12.3 MiB`.
pub fn format_memory(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[derive(Clone, Copy, PartialEq)]
enum Align {
    Left,
    Right,
}

const COLUMNS: [(&str, Align); 12] = [
    ("NAME", Align::Left),
    ("ROLE", Align::Left),
    ("STATE", Align::Left),
    ("PID", Align::Right),
    ("ACTOR", Align::Left),
    ("UPTIME", Align::Right),
    ("RESTARTS", Align::Right),
    ("IN", Align::Right),
    ("OUT", Align::Right),
    ("ERRORS", Align::Right),
    ("MEM", Align::Right),
    ("PSS", Align::Right),
];

const NONE: &str = "-";

/// Renders the `ps` table: a header row, then one row per process in tree
/// order, the NAME column drawn as the tree.
pub fn table(status: &Status) -> String {
    let mut rows: Vec<Vec<String>> = vec![COLUMNS.iter().map(|(name, _)| (*name).to_owned()).collect()];
    for line in tree_lines(status) {
        let name = format!("{}{}", line.prefix, line.label);
        let Some(p) = line.process else {
            let mut row = vec![NONE.to_owned(); COLUMNS.len()];
            row[0] = name;
            rows.push(row);
            continue;
        };
        let up = p.state == ProcessState::Up;
        rows.push(vec![
            name,
            p.role.to_string(),
            p.state.to_string(),
            p.pid.map_or_else(|| NONE.into(), |pid| pid.to_string()),
            p.actor_type
                .clone()
                .or_else(|| p.actor.clone())
                .unwrap_or_else(|| NONE.into()),
            p.uptime_ms.map_or_else(|| NONE.into(), format_uptime),
            p.restarts.to_string(),
            count(up, p.messages_in),
            count(up, p.messages_out),
            count(up, p.errors),
            p.rss_bytes.map_or_else(|| NONE.into(), format_memory),
            p.pss_bytes.map_or_else(|| NONE.into(), format_memory),
        ]);
    }
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|c| rows.iter().map(|row| row[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let pad = widths[c] - cell.chars().count();
            match COLUMNS[c].1 {
                Align::Left => {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
                Align::Right => {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A counter, or `-` for a process that is not up and counted nothing.
fn count(up: bool, value: u64) -> String {
    if !up && value == 0 {
        NONE.into()
    } else {
        value.to_string()
    }
}

/// The status as pretty-printed JSON, with a final newline.
pub fn json(status: &Status) -> Result<String, serde_json::Error> {
    let mut out = serde_json::to_string_pretty(status)?;
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use evilcluster_wire::control::{render_tree, ProcessStatus};

    fn process(path: &str, role: &str, state: &str, pid: Option<u32>, actor_type: Option<&str>) -> ProcessStatus {
        ProcessStatus {
            path: path.into(),
            role: role.parse().expect("a role"),
            state: state.parse().expect("a state"),
            pid,
            actor: actor_type.map(|t| t.to_lowercase()),
            actor_type: actor_type.map(Into::into),
            uptime_ms: pid.map(|_| 130_000),
            restarts: 0,
            messages_in: 0,
            messages_out: 0,
            errors: 0,
            rss_bytes: pid.map(|_| 5 * 1024 * 1024 + 300 * 1024),
            pss_bytes: pid.map(|_| 1200 * 1024),
            latency_us: Vec::new(),
        }
    }

    fn readme_status() -> Status {
        Status {
            cluster: "myapp".into(),
            processes: vec![
                process("myapp", "master", "up", Some(100), None),
                process(
                    "myapp/webserverFrontend",
                    "spawn",
                    "up",
                    Some(101),
                    Some("WebserverFrontend"),
                ),
                process(
                    "myapp/webserverFrontend/1",
                    "fork",
                    "up",
                    Some(104),
                    Some("WebserverFrontend"),
                ),
                process(
                    "myapp/webserverFrontend/2",
                    "fork",
                    "up",
                    Some(105),
                    Some("WebserverFrontend"),
                ),
                process(
                    "myapp/inMemoryDatastore",
                    "spawn",
                    "up",
                    Some(102),
                    Some("InMemoryDatastore"),
                ),
                process("myapp/ghost", "spawn", "disabled", None, Some("Ghost")),
                process("myapp/backgroundTaskManager", "spawn", "up", Some(103), None),
            ],
        }
    }

    #[test]
    fn tree_matches_the_runtime_rendering() {
        let expected = "\
myapp (master, pid 100)
├── webserverFrontend (spawn, pid 101)
│   ├── 1 (fork, pid 104) WebserverFrontend up
│   └── 2 (fork, pid 105) WebserverFrontend up
├── inMemoryDatastore (spawn, pid 102) InMemoryDatastore up
├── ghost (disabled)
└── backgroundTaskManager (spawn, pid 103) up
";
        assert_eq!(render_tree(&readme_status()), expected);
    }

    #[test]
    fn tree_shows_down_processes_without_pid() {
        let status = Status {
            cluster: "app".into(),
            processes: vec![
                process("app", "master", "up", Some(10), None),
                process("app/web", "spawn", "up", Some(11), None),
                process("app/web/1", "fork", "up", Some(12), Some("Web")),
                process("app/web/2", "fork", "down", None, Some("Web")),
                process("app/old", "spawn", "disabled", None, None),
                process("app/store", "spawn", "down", None, Some("Store")),
                process("app/tasks", "spawn", "up", Some(14), None),
            ],
        };
        // The same expectations as the runtime's own tree test.
        let expected = "\
app (master, pid 10)
├── web (spawn, pid 11)
│   ├── 1 (fork, pid 12) Web up
│   └── 2 (fork) Web down
├── old (disabled)
├── store (spawn) Store down
└── tasks (spawn, pid 14) up
";
        assert_eq!(render_tree(&status), expected);
    }

    #[test]
    fn tree_of_a_down_spawn_with_forks_and_the_last_worker_forking() {
        let status = Status {
            cluster: "app".into(),
            processes: vec![
                process("app", "master", "up", Some(10), None),
                process("app/a", "spawn", "up", Some(11), Some("A")),
                process("app/web", "spawn", "down", None, Some("Web")),
                process("app/web/1", "fork", "down", None, Some("Web")),
                process("app/web/2", "fork", "down", None, Some("Web")),
            ],
        };
        let expected = "\
app (master, pid 10)
├── a (spawn, pid 11) A up
└── web (spawn)
    ├── 1 (fork) Web down
    └── 2 (fork) Web down
";
        assert_eq!(render_tree(&status), expected);
    }

    #[test]
    fn tree_without_a_master_entry_still_renders() {
        let status = Status {
            cluster: "app".into(),
            processes: vec![process("app/a", "spawn", "up", Some(11), None)],
        };
        assert_eq!(render_tree(&status), "app\n└── a (spawn, pid 11) up\n");
        let empty = Status {
            cluster: "app".into(),
            processes: Vec::new(),
        };
        assert_eq!(render_tree(&empty), "app\n");
    }

    #[test]
    fn uptime_is_short_and_human() {
        assert_eq!(format_uptime(0), "0s");
        assert_eq!(format_uptime(999), "0s");
        assert_eq!(format_uptime(3_000), "3s");
        assert_eq!(format_uptime(59_999), "59s");
        assert_eq!(format_uptime(60_000), "1m00s");
        assert_eq!(format_uptime(130_000), "2m10s");
        assert_eq!(format_uptime(3_599_000), "59m59s");
        assert_eq!(format_uptime(3_600_000), "1h00m");
        assert_eq!(format_uptime(3_720_000), "1h02m");
        assert_eq!(format_uptime(86_399_000), "23h59m");
        assert_eq!(format_uptime(86_400_000 + 3 * 3_600_000), "1d03h");
    }

    #[test]
    fn memory_in_mib_with_one_decimal() {
        assert_eq!(format_memory(0), "0.0 MiB");
        assert_eq!(format_memory(1024 * 1024), "1.0 MiB");
        assert_eq!(format_memory(5 * 1024 * 1024 + 300 * 1024), "5.3 MiB");
        assert_eq!(format_memory(1536 * 1024 * 1024), "1536.0 MiB");
    }

    #[test]
    fn table_is_aligned_with_a_header() {
        let mut status = readme_status();
        status.processes[0].uptime_ms = Some(3_720_000);
        status.processes[0].rss_bytes = Some(12 * 1024 * 1024);
        status.processes[2].messages_in = 12_345;
        status.processes[2].messages_out = 7;
        status.processes[2].errors = 2;
        status.processes[2].restarts = 1;
        status.processes[2].uptime_ms = Some(3_000);
        let expected = "\
NAME                       ROLE    STATE     PID  ACTOR              UPTIME  RESTARTS     IN  OUT  ERRORS       MEM      PSS
myapp                      master  up        100  -                   1h02m         0      0    0       0  12.0 MiB  1.2 MiB
├── webserverFrontend      spawn   up        101  WebserverFrontend   2m10s         0      0    0       0   5.3 MiB  1.2 MiB
│   ├── 1                  fork    up        104  WebserverFrontend      3s         1  12345    7       2   5.3 MiB  1.2 MiB
│   └── 2                  fork    up        105  WebserverFrontend   2m10s         0      0    0       0   5.3 MiB  1.2 MiB
├── inMemoryDatastore      spawn   up        102  InMemoryDatastore   2m10s         0      0    0       0   5.3 MiB  1.2 MiB
├── ghost                  spawn   disabled    -  Ghost                   -         0      -    -       -         -        -
└── backgroundTaskManager  spawn   up        103  -                   2m10s         0      0    0       0   5.3 MiB  1.2 MiB
";
        assert_eq!(table(&status), expected);
    }

    #[test]
    fn json_round_trips() {
        let status = readme_status();
        let text = json(&status).unwrap();
        assert!(text.ends_with("}\n"));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["cluster"], "myapp");
        assert_eq!(value["processes"][2]["path"], "myapp/webserverFrontend/1");
        assert_eq!(value["processes"][2]["pid"], 104);
        assert_eq!(value["processes"][5]["pid"], serde_json::Value::Null);
    }
}
