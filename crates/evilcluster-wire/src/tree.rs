//! The tree of a cluster's processes, rendered for people: shared by the
//! runtime's logs and the `evilcluster` command, so both always agree.

use std::fmt::Write;

use crate::control::{ProcessState, ProcessStatus, RoleKind, Status};

/// One line of the tree: a process (or the cluster itself, when the status
/// has no master entry) with its place in the tree.
#[derive(Debug)]
pub struct TreeLine<'a> {
    /// The process, `None` for a synthetic root.
    pub process: Option<&'a ProcessStatus>,
    /// Box-drawing prefix before the label (empty for the root).
    pub prefix: String,
    /// The name under its parent: the worker name, the fork number.
    pub label: String,
    /// Whether other processes hang below it.
    pub has_children: bool,
}

/// Lays out `status.processes` as a tree by path: each process hangs below
/// the nearest listed process whose path is a prefix of its own (a fork
/// below its spawn), and below the master otherwise. Siblings keep the
/// order of the list.
pub fn tree_lines(status: &Status) -> Vec<TreeLine<'_>> {
    let processes = &status.processes;
    let root = processes
        .iter()
        .position(|p| p.role == RoleKind::Master)
        .or_else(|| processes.iter().position(|p| p.path == status.cluster));
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); processes.len()];
    let mut top = Vec::new();
    for index in (0..processes.len()).filter(|&i| Some(i) != root) {
        match parent_of(processes, index, root) {
            Some(parent) => children[parent].push(index),
            None => top.push(index),
        }
    }
    let mut lines = vec![TreeLine {
        process: root.map(|r| &processes[r]),
        prefix: String::new(),
        label: root.map_or_else(|| status.cluster.clone(), |r| processes[r].path.clone()),
        has_children: !top.is_empty(),
    }];
    let root_path = root.map_or(status.cluster.as_str(), |r| processes[r].path.as_str());
    walk(processes, &children, &top, root_path, "", &mut lines);
    lines
}

/// The index of the process `index` hangs below, `None` for the root.
fn parent_of(processes: &[ProcessStatus], index: usize, root: Option<usize>) -> Option<usize> {
    let mut path = processes[index].path.as_str();
    while let Some((parent, _)) = path.rsplit_once('/') {
        if let Some(found) = processes
            .iter()
            .enumerate()
            .position(|(i, p)| i != index && p.path == parent)
        {
            return if Some(found) == root { None } else { Some(found) };
        }
        path = parent;
    }
    None
}

fn walk<'a>(
    processes: &'a [ProcessStatus],
    children: &[Vec<usize>],
    siblings: &[usize],
    parent_path: &str,
    indent: &str,
    lines: &mut Vec<TreeLine<'a>>,
) {
    for (position, &index) in siblings.iter().enumerate() {
        let last = position + 1 == siblings.len();
        let (branch, more) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        let process = &processes[index];
        let label = process
            .path
            .strip_prefix(parent_path)
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(&process.path)
            .to_owned();
        lines.push(TreeLine {
            process: Some(process),
            prefix: format!("{indent}{branch}"),
            label,
            has_children: !children[index].is_empty(),
        });
        walk(
            processes,
            children,
            &children[index],
            &process.path,
            &format!("{indent}{more}"),
            lines,
        );
    }
}

/// Renders the tree as the runtime logs it:
///
/// ```text
/// myapp (master, pid 100)
/// ├── webserverFrontend (spawn, pid 101)
/// │   ├── 1 (fork, pid 104) WebserverFrontend up
/// │   └── 2 (fork, pid 105) WebserverFrontend up, restarts 1
/// ├── ghost (disabled)
/// └── backgroundTaskManager (spawn, pid 103) up
/// ```
///
/// A process with others below it (a spawn with forks, the master) shows no
/// state; a process without a pid shows none.
pub fn render_tree(status: &Status) -> String {
    let mut out = String::new();
    for line in tree_lines(status) {
        let _ = write!(out, "{}{}", line.prefix, line.label);
        let Some(process) = line.process else {
            out.push('\n');
            continue;
        };
        if process.state == ProcessState::Disabled {
            out.push_str(" (disabled)\n");
            continue;
        }
        let _ = write!(out, " ({}", process.role);
        if let Some(pid) = process.pid {
            let _ = write!(out, ", pid {pid}");
        }
        out.push(')');
        if !line.has_children && process.role != RoleKind::Master {
            if let Some(actor_type) = &process.actor_type {
                let _ = write!(out, " {actor_type}");
            }
            let _ = write!(out, " {}", process.state);
            if process.restarts > 0 {
                let _ = write!(out, ", restarts {}", process.restarts);
            }
        } else if process.restarts > 0 {
            let _ = write!(out, " restarts {}", process.restarts);
        }
        out.push('\n');
    }
    out
}
