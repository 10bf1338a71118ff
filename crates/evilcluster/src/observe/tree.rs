//! What the rendered tree needs to know about the declared workers (the
//! rendering itself is `control::render`, beside the live status).

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::directory::Member;
    use crate::observe::control::render;
    use evilcluster_wire::control::RoleKind;

    fn member(path: &str, pid: u32) -> Member {
        Member {
            path: path.into(),
            role: RoleKind::Spawn,
            fork: None,
            pid,
            incarnation: 1,
            restarts: 0,
            hosting: crate::node::directory::Hosting {
                worker: "".into(),
                order: 0,
                actor: None,
                actor_type: None,
                socket_dir: None,
                listen: None,
            }
            .shared(),
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
        let members = [
            member("app", 10),
            member("app/web", 11),
            member("app/web/1", 12),
            member("app/tasks", 14),
        ];
        let expected = "\
app (master, pid 10)
├── web (spawn, pid 11)
│   ├── 1 (fork, pid 12) Web up
│   └── 2 (fork) Web down
├── old (disabled)
└── tasks (spawn, pid 14) up
";
        assert_eq!(render("app", &workers, &members), expected);
    }
}
