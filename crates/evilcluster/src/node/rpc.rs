//! The one internal request path: every service of the runtime (registry,
//! events, stats, control) and the typed addresses put their requests on a
//! connection and wait for replies through these functions.

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::node::connection::{Failure, Link, LinkError, Outgoing, Payload, ReplyWaiter};
use crate::SendError;

/// The instant `timeout` from now, or a far one for a timeout too large to add.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    deadline_from(Instant::now(), timeout)
}

pub(crate) fn deadline_from(now: Instant, timeout: Duration) -> Instant {
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

pub(crate) fn timed_out(actor: &'static str, tag: &'static str, started: Instant) -> SendError {
    SendError::Timeout {
        actor,
        tag,
        after: started.elapsed(),
    }
}

pub(crate) fn link_error(link: &Link, actor: &'static str, tag: &'static str, error: LinkError) -> SendError {
    match error {
        LinkError::TooLarge { size } => SendError::TooLarge {
            tag,
            size,
            max: link.max_frame,
        },
        LinkError::Full => SendError::Full {
            actor,
            path: link.peer.path.clone(),
        },
        LinkError::GoingAway => SendError::Rejected {
            actor,
            tag,
            reason: format!("{} is stopping and takes no new requests", link.peer.path),
        },
        LinkError::Closed(reason) => SendError::Disconnected {
            actor,
            path: link.peer.path.clone(),
            reason,
        },
    }
}

pub(crate) fn decode<T: DeserializeOwned>(tag: &'static str, bytes: &[u8]) -> Result<T, SendError> {
    rmp_serde::from_slice(bytes).map_err(|e| SendError::Decode {
        tag,
        detail: e.to_string(),
    })
}

pub(crate) fn encode<T: Serialize>(tag: &'static str, value: &T) -> Result<Vec<u8>, SendError> {
    rmp_serde::to_vec(value).map_err(|e| SendError::Encode {
        tag,
        detail: e.to_string(),
    })
}

/// Forgets a request if its caller stops waiting (deadline or drop).
struct Cancel<'a> {
    link: &'a Link,
    id: u64,
}

impl Drop for Cancel<'_> {
    fn drop(&mut self) {
        self.link.cancel(self.id);
    }
}

/// Sends one request of the runtime's own on `link` and waits for its
/// reply bytes. These take no place in the flow-control window.
pub(crate) async fn call(
    link: &Link,
    actor: &'static str,
    tag: &'static str,
    incarnation: u64,
    payload: &[u8],
    timeout: Duration,
) -> Result<Payload, SendError> {
    let started = Instant::now();
    let deadline = deadline_after(timeout);
    let waiter = link
        .request(actor, tag, incarnation, payload, true, None)
        .map_err(|error| link_error(link, actor, tag, error))?
        .expect("a reply was asked for");
    wait(link, waiter, actor, tag, deadline, started).await
}

/// Sends one message of the runtime's own on `link` and waits for nothing
/// (a directory push, an event delivery). Like [`call`], it takes no place
/// in the flow-control window: these are the runtime's, not the actors'.
/// A payload pushed to many connections is best handed over as
/// [`Outgoing::Shared`]: then all of them write it from one buffer.
pub(crate) fn push(
    link: &Link,
    actor: &'static str,
    tag: &'static str,
    incarnation: u64,
    payload: Outgoing<'_>,
) -> Result<(), SendError> {
    link.request_payload(actor, tag, incarnation, payload, false, None)
        .map(drop)
        .map_err(|error| link_error(link, actor, tag, error))
}

/// Waits for the reply to a queued request, until `deadline`.
pub(crate) async fn wait(
    link: &Link,
    id: ReplyWaiter,
    actor: &'static str,
    tag: &'static str,
    deadline: Instant,
    started: Instant,
) -> Result<Payload, SendError> {
    let _cancel = Cancel { link, id };
    let reply = std::future::poll_fn(|cx| link.poll_reply(id, cx));
    match tokio::time::timeout_at(deadline.into(), reply).await {
        Err(_) => Err(timed_out(actor, tag, started)),
        Ok(outcome) => outcome_to_result(link, actor, tag, outcome),
    }
}

/// What a caller makes of a request's outcome.
pub(crate) fn outcome_to_result(
    link: &Link,
    actor: &'static str,
    tag: &'static str,
    outcome: Result<Payload, Failure>,
) -> Result<Payload, SendError> {
    match outcome {
        Ok(bytes) => Ok(bytes),
        Err(Failure::Closed(reason)) => Err(SendError::Disconnected {
            actor,
            path: link.peer.path.clone(),
            reason,
        }),
        Err(Failure::Wire(error)) => Err(SendError::from_wire(actor, tag, error)),
    }
}
