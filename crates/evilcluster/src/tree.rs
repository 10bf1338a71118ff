//! The tree of processes, rendered for people.

use std::fmt::Write;

use crate::directory::Member;

/// What the tree needs to know about a declared worker.
#[derive(Debug, Clone)]
pub(crate) struct Declared {
    pub name: String,
    pub forks: u32,
    pub disabled: bool,
    /// The hosted actor's `NAME` and Rust type, for an actor worker.
    pub actor: Option<&'static str>,
    pub type_name: Option<&'static str>,
}

/// Renders the declared tree with the live members:
///
/// ```text
/// myapp (master, pid 100)
/// ├── webserverApi (spawn, pid 101)
/// │   ├── 1 (fork, pid 104) WebserverApi up
/// │   └── 2 (fork, pid 105) WebserverApi up
/// └── backgroundTaskManager (spawn, pid 103) up
/// ```
pub(crate) fn render(cluster: &str, master_pid: u32, workers: &[Declared], members: &[Member]) -> String {
    let mut out = format!("{cluster} (master, pid {master_pid})\n");
    for (index, worker) in workers.iter().enumerate() {
        let last = index + 1 == workers.len();
        let (branch, indent) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        let path = format!("{cluster}/{}", worker.name);
        let spawn = members.iter().find(|m| m.path == path);
        let _ = write!(out, "{branch}{}", worker.name);
        if worker.disabled {
            out.push_str(" (disabled)\n");
            continue;
        }
        match spawn {
            Some(member) => {
                let _ = write!(out, " (spawn, pid {})", member.pid);
            }
            None => out.push_str(" (spawn)"),
        }
        if worker.forks == 0 {
            out.push_str(&state(worker, spawn.is_some()));
            out.push('\n');
            continue;
        }
        out.push('\n');
        for number in 1..=worker.forks {
            let fork_branch = if number == worker.forks {
                "└── "
            } else {
                "├── "
            };
            let fork_path = format!("{path}/{number}");
            let fork = members.iter().find(|m| m.path == fork_path);
            let _ = write!(out, "{indent}{fork_branch}{number} (fork");
            if let Some(member) = fork {
                let _ = write!(out, ", pid {}", member.pid);
            }
            out.push(')');
            out.push_str(&state(worker, fork.is_some()));
            out.push('\n');
        }
    }
    out
}

fn state(worker: &Declared, up: bool) -> String {
    let state = if up { "up" } else { "down" };
    match worker.type_name {
        Some(type_name) => format!(" {type_name} {state}"),
        None => format!(" {state}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(path: &str, pid: u32) -> Member {
        Member {
            path: path.into(),
            role: "spawn".into(),
            worker: String::new(),
            order: 0,
            fork: None,
            pid,
            incarnation: 1,
            actor: None,
            actor_type: None,
            socket: None,
        }
    }

    #[test]
    fn renders_spawns_forks_and_missing_processes() {
        let workers = [
            Declared {
                name: "web".into(),
                forks: 2,
                disabled: false,
                actor: Some("web"),
                type_name: Some("Web"),
            },
            Declared {
                name: "old".into(),
                forks: 0,
                disabled: true,
                actor: None,
                type_name: None,
            },
            Declared {
                name: "tasks".into(),
                forks: 0,
                disabled: false,
                actor: None,
                type_name: None,
            },
        ];
        let members = [member("app/web", 11), member("app/web/1", 12), member("app/tasks", 14)];
        let expected = "\
app (master, pid 10)
├── web (spawn, pid 11)
│   ├── 1 (fork, pid 12) Web up
│   └── 2 (fork) Web down
├── old (disabled)
└── tasks (spawn, pid 14) up
";
        assert_eq!(render("app", 10, &workers, &members), expected);
    }
}
