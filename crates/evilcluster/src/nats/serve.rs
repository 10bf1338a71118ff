//! Requests from other hosts to the actor this process hosts: one NATS
//! subscription per process, `….i.<incarnation>`, dispatched in arrival
//! order through the same `Node::dispatch` as requests from local
//! connections, at most a window of them in flight.

use std::sync::Arc;

use evilcluster_wire::{Frame, Reply, ReplyPayload, WireError};
use tokio::sync::Semaphore;

use super::Mesh;
use crate::node::connection::{takes_slot, Payload, Responder};
use crate::node::throttle::clip;
use crate::node::Node;
use crate::Error;

/// Requests from other hosts in flight in this process at once; past it,
/// the subscription is not read (NATS buffers, then drops as a slow
/// consumer: NATS has no end-to-end backpressure).
const WINDOW: usize = 4096;

/// The subject of the process whose incarnation is `incarnation`.
pub(crate) fn instance_subject(base: &str, incarnation: u64) -> String {
    format!("{base}.i.{incarnation:016x}")
}

pub(super) async fn start(mesh: &Arc<Mesh>, node: &Arc<Node>) -> Result<(), Error> {
    if node.socket.is_none() {
        // Hosts nothing (a task, or a spawn supervising forks).
        return Ok(());
    }
    let subject = instance_subject(&mesh.base, node.identity.incarnation);
    let mut requests = super::Subscription::subscribe(mesh, subject).await?;
    let mesh = mesh.clone();
    let node = node.clone();
    actix_rt::spawn(async move {
        let window = Arc::new(Semaphore::new(WINDOW));
        let mut hosted = crate::node::HostedCache::default();
        while let Some(message) = requests.next().await {
            let Ok(permit) = window.clone().acquire_owned().await else {
                break;
            };
            let Ok(Frame::Request(request)) = Frame::decode(&message.payload) else {
                continue;
            };
            let reply_to = message.reply.clone().filter(|_| request.reply);
            // Only actors are reachable from other hosts, never the
            // runtime's own services; the rest is what a connection does.
            let dispatched = if takes_slot(request.actor) {
                let (responder, answered) = Responder::channel(request.reply);
                let payload = Payload::detach(&message.payload, request.payload);
                node.dispatch(None, &request, payload, responder, &mut hosted)
                    .map(|later| (later, answered))
                    .map_err(|(_unanswered, error)| error)
            } else {
                Err(WireError::UnknownActor {
                    actor: clip(request.actor).into_owned(),
                })
            };
            let client = mesh.client.clone();
            actix_rt::spawn(async move {
                let result = match dispatched {
                    Ok((later, answered)) => {
                        if let Some(later) = later {
                            later.await;
                        }
                        answered.await.unwrap_or_else(|_| {
                            Err(WireError::Stopped {
                                actor: "the actor".to_owned(),
                            })
                        })
                    }
                    Err(error) => Err(error),
                };
                drop(permit);
                let Some(reply_to) = reply_to else { return };
                let reply = Frame::Reply(Reply {
                    id: 0,
                    result: result.as_deref().map(ReplyPayload).map_err(Clone::clone),
                });
                if let Ok(bytes) = reply.encode() {
                    let _ = client.publish(reply_to, bytes.into()).await;
                }
            });
        }
    });
    Ok(())
}
