//! Calls to instances on other hosts: picked from the other hosts'
//! members (round robin, like local forks), sent by NATS request/reply to
//! the instance's own subject, ended at once when its host is lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use evilcluster_wire::{Frame, Request};
use tokio_util::sync::CancellationToken;

use super::Mesh;
use crate::node::directory::Pick;
use crate::node::Node;
use crate::SendError;
use evilcluster_wire::control::RoleKind;

/// An instance on another host, chosen for one call.
#[derive(Debug, Clone)]
pub(crate) struct RemotePick {
    pub node: String,
    pub path: String,
    pub incarnation: u64,
    lost: CancellationToken,
}

impl RemotePick {
    /// Where the instance is, for errors and logs: `node:path`.
    pub fn place(&self) -> String {
        format!("{}:{}", self.node, self.path)
    }
}

/// The next instance of `actor` on another host (`fork`: that fork;
/// `on_node`: on that host only), skipping those in `avoid`.
pub(crate) fn pick(
    mesh: &Mesh,
    actor: &str,
    pick: Pick,
    on_node: Option<&str>,
    avoid: &[(String, u64)],
) -> Option<RemotePick> {
    mesh.view.with_hosts(|hosts| {
        let mut ids: Vec<&u64> = hosts.keys().collect();
        ids.sort();
        let candidates: Vec<RemotePick> = ids
            .into_iter()
            .map(|id| &hosts[id])
            .filter(|host| on_node.is_none_or(|n| n == host.node))
            .flat_map(|host| {
                host.members
                    .iter()
                    .filter(|m| {
                        m.actor() == Some(actor) && m.hosting.socket_dir.is_some() && m.role != RoleKind::Master
                    })
                    .filter(|m| match pick {
                        Pick::Any => true,
                        Pick::Fork(number) => m.fork == Some(number),
                    })
                    .filter(|m| !avoid.iter().any(|(p, i)| *p == m.path && *i == m.incarnation))
                    .map(move |m| RemotePick {
                        node: host.node.clone(),
                        path: m.path.to_string(),
                        incarnation: m.incarnation,
                        lost: host.lost.clone(),
                    })
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let turn = mesh.view.next.fetch_add(1, Ordering::Relaxed);
        Some(candidates[turn % candidates.len()].clone())
    })
}

/// Where a send goes when it may cross hosts.
pub(crate) enum Resolved {
    /// An instance runs on this host: use the local path.
    Local,
    /// Only another host has one.
    Remote(RemotePick),
}

/// Waits, until `resolve_by`, for an instance of `actor` on this host
/// (preferred) or on another. `None`: none came.
pub(crate) async fn resolve(
    node: &Node,
    mesh: &Mesh,
    actor: &str,
    which: Pick,
    on_node: Option<&str>,
    avoid: &[(String, u64)],
    resolve_by: Instant,
) -> Option<Resolved> {
    let local_allowed = on_node.is_none_or(|n| n == mesh.node_name);
    let remote_node = on_node.filter(|n| *n != mesh.node_name);
    let mut local_changes = node.directory.changes();
    let mut remote_changes = mesh.view.changes();
    loop {
        local_changes.mark_unchanged();
        remote_changes.mark_unchanged();
        if local_allowed
            && node
                .directory
                .pick_where(actor, which, |m| {
                    !avoid.iter().any(|(p, i)| *p == m.path && *i == m.incarnation)
                })
                .is_some()
        {
            return Some(Resolved::Local);
        }
        if on_node.is_none() || remote_node.is_some() {
            if let Some(found) = pick(mesh, actor, which, remote_node, avoid) {
                return Some(Resolved::Remote(found));
            }
        }
        let changed = async {
            tokio::select! {
                _ = local_changes.changed() => {}
                _ = remote_changes.changed() => {}
            }
        };
        if tokio::time::timeout_at(resolve_by.into(), changed).await.is_err() {
            return None;
        }
    }
}

fn unreachable(mesh: &Mesh, actor: &'static str, reason: impl std::fmt::Display) -> SendError {
    SendError::Unreachable {
        actor,
        url: mesh.options.url.clone(),
        reason: reason.to_string(),
    }
}

/// Sends one encoded message to `to` and, when `reply`, waits for its
/// reply bytes until `deadline`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn call(
    mesh: &Arc<Mesh>,
    to: &RemotePick,
    actor: &'static str,
    tag: &'static str,
    payload: &[u8],
    reply: bool,
    deadline: Instant,
    started: Instant,
) -> Result<Option<Bytes>, SendError> {
    let frame = Frame::Request(Request {
        id: 0,
        actor,
        tag,
        incarnation: to.incarnation,
        reply,
        payload,
    });
    let bytes = frame.encode().map_err(|e| SendError::Encode {
        tag,
        detail: e.to_string(),
    })?;
    let max = mesh.max_payload;
    if max > 0 && bytes.len() > max {
        return Err(SendError::TooLarge {
            tag,
            size: bytes.len(),
            max,
        });
    }
    if !mesh.connected() && !mesh.wait_connected(deadline).await {
        return Err(unreachable(mesh, actor, "not connected to any NATS server"));
    }
    let subject = super::serve::instance_subject(&mesh.base, to.incarnation);
    let lost = || SendError::Disconnected {
        actor,
        path: to.place(),
        reason: format!("node `{}` lost (no heartbeat, or it left)", to.node),
    };
    if to.lost.is_cancelled() {
        return Err(lost());
    }
    if !reply {
        return mesh
            .client
            .publish(subject, Bytes::from(bytes))
            .await
            .map(|()| None)
            .map_err(|e| unreachable(mesh, actor, e));
    }
    let request = async_nats::Request::new().payload(Bytes::from(bytes)).timeout(None);
    let dropped = mesh.connection_dropped();
    let answer = tokio::select! {
        answer = mesh.client.send_request(subject, request) => answer,
        () = to.lost.cancelled() => return Err(lost()),
        () = dropped.cancelled() => {
            return Err(SendError::Disconnected {
                actor,
                path: to.place(),
                reason: "this process lost its connection to NATS before the reply came".to_owned(),
            })
        }
        () = tokio::time::sleep_until(deadline.into()) => {
            return Err(SendError::Timeout { actor, tag, after: started.elapsed() })
        }
    };
    let message = match answer {
        Ok(message) => message,
        // Nobody listens on the instance's subject: it is gone, and the
        // message reached no handler.
        Err(error) if error.kind() == async_nats::client::RequestErrorKind::NoResponders => {
            return Err(SendError::UnknownActor { actor })
        }
        Err(error) => {
            return Err(SendError::Disconnected {
                actor,
                path: to.place(),
                reason: format!("NATS request failed: {error}"),
            })
        }
    };
    match Frame::decode(&message.payload) {
        Ok(Frame::Reply(reply)) => match reply.result {
            Ok(payload) => Ok(Some(Bytes::copy_from_slice(payload.0))),
            Err(error) => Err(SendError::from_wire(actor, tag, error)),
        },
        _ => Err(SendError::Decode {
            tag,
            detail: format!("{} answered with something other than a reply frame", to.place()),
        }),
    }
}

/// Every instance of `actor` on the other hosts: (node, fork).
pub(crate) fn instances(mesh: &Mesh, actor: &str) -> Vec<(&'static str, Option<u32>)> {
    let mut found: Vec<(&'static str, Option<u32>)> = mesh.view.with_hosts(|hosts| {
        hosts
            .values()
            .flat_map(|host| {
                host.members
                    .iter()
                    .filter(|m| {
                        m.actor() == Some(actor) && m.hosting.socket_dir.is_some() && m.role != RoleKind::Master
                    })
                    .map(|m| (super::intern(&host.node), m.fork))
                    .collect::<Vec<_>>()
            })
            .collect()
    });
    found.sort();
    found
}
