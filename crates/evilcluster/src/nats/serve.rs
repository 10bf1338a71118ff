//! Requests from other hosts to the actor this process hosts: one NATS
//! subscription per process, `….i.<incarnation>`, dispatched in arrival
//! order into the same services as local requests, at most a window of
//! them in flight.

use std::sync::Arc;

use evilcluster_wire::{Frame, Reply, ReplyPayload, WireError};
use tokio::sync::Semaphore;

use super::Mesh;
use crate::node::connection::{Payload, Responder};
use crate::node::service::Hosted;
use crate::node::Node;
use crate::Error;
use futures_util::future::BoxFuture;

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
        while let Some(message) = requests.next().await {
            let Ok(permit) = window.clone().acquire_owned().await else {
                break;
            };
            let respond = |result: Result<ReplyPayload<'_>, WireError>| {
                let reply_to = message.reply.clone()?;
                Frame::Reply(Reply { id: 0, result })
                    .encode()
                    .ok()
                    .map(|bytes| (reply_to, bytes))
            };
            let Ok(Frame::Request(request)) = Frame::decode(&message.payload) else {
                continue;
            };
            let dispatched = if request.incarnation != node.identity.incarnation {
                Err(WireError::StaleIncarnation {
                    requested: request.incarnation,
                    current: node.identity.incarnation,
                })
            } else {
                // Only actors are reachable from other hosts, never the
                // runtime's own services (named `evilcluster.…`).
                let hosted = Some(request.actor)
                    .filter(|actor| !actor.starts_with("evilcluster."))
                    .and_then(|actor| node.hosted(actor));
                match hosted {
                    Some(Hosted::Actor(inbox)) => {
                        let (responder, answered) = Responder::channel(request.reply);
                        let payload = Payload::detach(&message.payload, request.payload);
                        match inbox.deliver(request.tag, payload, responder) {
                            Ok(()) => Ok(Some(Box::pin(async move {
                                answered.await.unwrap_or_else(|_| {
                                    Err(WireError::Stopped {
                                        actor: "the actor".to_owned(),
                                    })
                                })
                            }) as BoxFuture<'static, _>)),
                            Err((_unanswered, error)) => Err(error),
                        }
                    }
                    Some(Hosted::Service(service)) => {
                        service.dispatch(None, request.tag, request.payload, request.reply)
                    }
                    None => Err(WireError::UnknownActor {
                        actor: crate::node::throttle::clip(request.actor).into_owned(),
                    }),
                }
            };
            match dispatched {
                Ok(None) => drop(permit),
                Ok(Some(handled)) => {
                    let client = mesh.client.clone();
                    let reply_to = message.reply.clone().filter(|_| request.reply);
                    actix_rt::spawn(async move {
                        let result = handled.await;
                        drop(permit);
                        let Some(reply_to) = reply_to else { return };
                        let bytes = match &result {
                            Ok(bytes) => Frame::Reply(Reply {
                                id: 0,
                                result: Ok(ReplyPayload(bytes)),
                            })
                            .encode(),
                            Err(error) => Frame::Reply(Reply {
                                id: 0,
                                result: Err(error.clone()),
                            })
                            .encode(),
                        };
                        if let Ok(bytes) = bytes {
                            let _ = client.publish(reply_to, bytes.into()).await;
                        }
                    });
                }
                Err(error) => {
                    drop(permit);
                    if let Some((reply_to, bytes)) = respond(Err(error)) {
                        let _ = mesh.client.publish(reply_to, bytes.into()).await;
                    }
                }
            }
        }
    });
    Ok(())
}
