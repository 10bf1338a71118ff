//! The master's control service for tools (`evilcluster ps`, `tree`,
//! `stop`), and the files through which tools find a cluster by name.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use evilcluster_wire::control::{self, ProcessStatus, Status, CONTROL, STATUS_TAG, STOP_TAG};
use evilcluster_wire::{Cookie, WireError};
use futures_util::future::join_all;
use tokio::sync::Notify;

use crate::addr::call;
use crate::directory::Member;
use crate::node::Node;
use crate::remote::{encode_reply, Dispatch, Service};
use crate::stats::{ProcessStats, STATS, STATS_TAG};
use crate::tree::Declared;
use crate::Error;

/// How long the status waits for one process's counters.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct ControlService {
    pub node: Weak<Node>,
    pub cluster: String,
    pub declared: Vec<Declared>,
    pub stop: Arc<Notify>,
}

impl Service for ControlService {
    fn dispatch(&self, tag: &str, _payload: &[u8], _reply: bool) -> Result<Dispatch, WireError> {
        match tag {
            STATUS_TAG => {
                let node = self.node.upgrade().ok_or_else(|| WireError::MailboxClosed {
                    actor: CONTROL.to_owned(),
                })?;
                let (cluster, declared) = (self.cluster.clone(), self.declared.clone());
                let tag = tag.to_owned();
                Ok(Some(Box::pin(async move {
                    encode_reply(&tag, &status(&node, cluster, &declared).await)
                })))
            }
            STOP_TAG => {
                tracing::info!("stop requested by a control client");
                self.stop.notify_one();
                Ok(Some(Box::pin(std::future::ready(encode_reply(tag, &())))))
            }
            _ => Err(WireError::UnknownMessage {
                actor: CONTROL.to_owned(),
                tag: tag.to_owned(),
            }),
        }
    }
}

/// The live tree: declared processes in tree order, with each live one's counters.
async fn status(node: &Arc<Node>, cluster: String, declared: &[Declared]) -> Status {
    let members = node.directory.members();
    let rows = rows(&cluster, declared, &members);
    let counters = join_all(rows.iter().map(|row| async move {
        match (row.member, row.role) {
            (Some(_), "master") => Some(node.stats.snapshot()),
            (Some(member), _) => fetch(node, member).await,
            (None, _) => None,
        }
    }))
    .await;
    let processes = rows.into_iter().zip(counters).map(|(row, c)| row.status(c)).collect();
    Status { cluster, processes }
}

/// The declared processes as the directory knows them, without counters:
/// what the master's logged tree shows.
pub(crate) fn declared_status(cluster: &str, declared: &[Declared], members: &[Member]) -> Status {
    Status {
        cluster: cluster.to_owned(),
        processes: rows(cluster, declared, members)
            .into_iter()
            .map(|row| row.status(None))
            .collect(),
    }
}

/// The master, then each worker followed by its forks.
fn rows<'a>(cluster: &str, declared: &[Declared], members: &'a [Member]) -> Vec<Row<'a>> {
    let find = |path: &str| members.iter().find(|m| m.path == path);
    let mut rows = vec![Row {
        path: cluster.to_owned(),
        role: "master",
        member: find(cluster),
        disabled: false,
        hosts: None,
    }];
    for worker in declared {
        let path = format!("{cluster}/{}", worker.name);
        // A spawn with forks hosts nothing itself; each fork hosts the actor.
        let hosts = worker.actor.zip(worker.type_name);
        rows.push(Row {
            path: path.clone(),
            role: "spawn",
            member: find(&path),
            disabled: worker.disabled,
            hosts: hosts.filter(|_| worker.forks == 0),
        });
        if !worker.disabled {
            for number in 1..=worker.forks {
                let fork = format!("{path}/{number}");
                rows.push(Row {
                    member: find(&fork),
                    path: fork,
                    role: "fork",
                    disabled: false,
                    hosts,
                });
            }
        }
    }
    rows
}

/// One declared process, in tree order.
struct Row<'a> {
    path: String,
    role: &'static str,
    member: Option<&'a Member>,
    disabled: bool,
    /// The actor it hosts (or would host): `NAME` and Rust type.
    hosts: Option<(&'static str, &'static str)>,
}

impl Row<'_> {
    fn status(self, counters: Option<ProcessStats>) -> ProcessStatus {
        let counters = counters.unwrap_or_default();
        let up = self.member.is_some();
        ProcessStatus {
            path: self.path,
            role: self.role.to_owned(),
            state: match (self.disabled, up) {
                (true, _) => "disabled",
                (false, true) => "up",
                (false, false) => "down",
            }
            .to_owned(),
            pid: self.member.map(|m| m.pid),
            actor: self.hosts.map(|(name, _)| name.to_owned()),
            actor_type: self.hosts.map(|(_, type_name)| type_name.to_owned()),
            uptime_ms: up.then_some(counters.uptime_ms),
            restarts: self.member.map_or(0, |m| m.restarts),
            messages_in: counters.messages_in,
            messages_out: counters.messages_out,
            errors: counters.errors,
            rss_bytes: counters.rss_bytes,
            latency_us: counters.latency_us,
        }
    }
}

/// One live process's counters, over its connection with the master.
async fn fetch(node: &Arc<Node>, member: &Member) -> Option<ProcessStats> {
    let link = match &member.socket {
        Some(_) => node.link_to(member).await.ok()?,
        // It hosts nothing, so it does not listen: use the connection it opened to us.
        None => node.link_for(&member.path, member.incarnation)?,
    };
    let reply = call(&link, STATS, STATS_TAG, member.incarnation, &[0xc0], STATS_TIMEOUT)
        .await
        .ok()?;
    rmp_serde::from_slice(&reply).ok()
}

/// The files that let tools find this cluster by name; removed on drop.
pub(crate) struct Advertisement {
    endpoint: PathBuf,
    cookie: PathBuf,
}

impl Advertisement {
    /// Advertises the master's socket under the cluster's name, unless a
    /// live master already does.
    pub fn publish(cluster: &str, socket: &str, cookie: &Cookie) -> Result<Advertisement, Error> {
        use std::io::Write;

        let dir = control::discovery_dir(rustix::process::getuid().as_raw());
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        let endpoint = control::endpoint_file(&dir, cluster);
        if let Some(pid) = advertised_pid(&endpoint) {
            if pid != std::process::id() && control::pid_alive(pid) {
                return Err(Error::NameTaken {
                    cluster: cluster.to_owned(),
                    pid,
                });
            }
        }
        let write = |path: &PathBuf, text: String| -> Result<(), Error> {
            let context = || format!("cannot write {}", path.display());
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            // Only the owner may read the cookie.
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(|e| Error::io(context(), e))?;
            file.write_all(text.as_bytes()).map_err(|e| Error::io(context(), e))
        };
        let cookie_path = control::cookie_file(&dir, cluster);
        write(&cookie_path, format!("{}\n", hex::encode(cookie.as_bytes())))?;
        write(&endpoint, control::endpoint_text(socket, std::process::id()))?;
        Ok(Advertisement {
            endpoint,
            cookie: cookie_path,
        })
    }
}

impl Drop for Advertisement {
    fn drop(&mut self) {
        // Only our own: a newer master of the same name may have taken over.
        if advertised_pid(&self.endpoint) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.endpoint);
            let _ = std::fs::remove_file(&self.cookie);
        }
    }
}

fn advertised_pid(endpoint: &PathBuf) -> Option<u32> {
    let text = std::fs::read_to_string(endpoint).ok()?;
    control::parse_endpoint(&text).ok().map(|(_, pid)| pid)
}
