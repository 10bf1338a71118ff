//! What a process hosts, as the connections see it: a service answers
//! requests by tag. User actors (through their routes) and the runtime's own
//! services (registry, directory, events, stats, control) are all services.

use std::sync::Arc;

use evilcluster_wire::WireError;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::node::connection::{Link, Payload, Responder};

/// The outcome of dispatching one request to a local service.
pub(crate) type Dispatch = Option<BoxFuture<'static, Result<Vec<u8>, WireError>>>;

/// Something hosted by this process that requests can name: a user's actor
/// or one of the runtime's own services.
pub(crate) trait Service: Send + Sync {
    /// Decodes and queues one message. `Ok(None)` when no reply is wanted.
    /// `caller` is the connection it came on (`None`: from this process),
    /// whose authenticated identity is the only one it may speak for.
    fn dispatch(
        &self,
        caller: Option<&Arc<Link>>,
        tag: &str,
        payload: &[u8],
        reply: bool,
    ) -> Result<Dispatch, WireError>;
}

/// A user's actor, as the connections see it: requests go into its inbox
/// whole, and the actor answers each from its own thread through the
/// request's [`Responder`] — no envelope, channel or boxed future per
/// message between the connection and the handler.
pub(crate) trait Inbox: Send + Sync {
    /// Queues one request for the actor, or gives the responder back with
    /// the reason it was refused (the handler did not run).
    // The responder comes back by value: it is moved, not boxed, on the
    // path every request takes.
    #[allow(clippy::result_large_err)]
    fn deliver(&self, tag: &str, payload: Payload, responder: Responder) -> Result<(), (Responder, WireError)>;
}

/// What a process hosts under one name.
#[derive(Clone)]
pub(crate) enum Hosted {
    /// One of the runtime's own services.
    Service(Arc<dyn Service>),
    /// A user's actor.
    Actor(Arc<dyn Inbox>),
}

/// Refuses a request that speaks for another process than its connection
/// authenticated as.
pub(crate) fn check_identity(
    caller: Option<&Arc<Link>>,
    path: &str,
    incarnation: Option<u64>,
) -> Result<(), WireError> {
    let Some(caller) = caller else { return Ok(()) };
    let same = caller.peer.path == path && incarnation.is_none_or(|i| i == caller.peer.incarnation);
    if same {
        Ok(())
    } else {
        Err(WireError::Impersonation {
            claimed: crate::node::throttle::clip(path).into_owned(),
            authenticated: crate::node::throttle::clip(&caller.peer.path).into_owned(),
        })
    }
}

/// Refuses a request that only this process's master may make (a
/// directory snapshot, an event delivery) unless it came on the connection
/// this process opened to its master.
pub(crate) fn check_master(caller: Option<&Arc<Link>>) -> Result<(), WireError> {
    match caller {
        Some(caller) if !caller.is_master() => Err(WireError::Impersonation {
            claimed: "this process's master".into(),
            authenticated: crate::node::throttle::clip(&caller.peer.path).into_owned(),
        }),
        _ => Ok(()),
    }
}

/// Decodes a request's payload, or says why it did not decode.
pub(crate) fn decode_payload<T: DeserializeOwned>(tag: &str, payload: &[u8]) -> Result<T, WireError> {
    rmp_serde::from_slice(payload).map_err(|e| WireError::Decode {
        tag: tag.to_owned(),
        detail: e.to_string(),
    })
}

/// Encodes a handler's result for its reply, or says why it did not encode.
/// A large result is measured first (a pass that only counts), so its
/// buffer is allocated once, at its size (or is the thread's spare large
/// buffer), and is not copied as it grows.
pub(crate) fn encode_reply<T: Serialize>(tag: &str, value: &T) -> Result<Vec<u8>, WireError> {
    let error = |e: rmp_serde::encode::Error| WireError::Encode {
        tag: tag.to_owned(),
        detail: e.to_string(),
    };
    // Most results are small: encoded at once, and only a large one is
    // measured first (the small attempt stops at `LARGE_PAYLOAD`).
    let mut small = SmallOnly {
        out: crate::node::connection::small_buffer(),
        large: false,
    };
    match rmp_serde::encode::write(&mut small, value) {
        Ok(()) => return Ok(small.out),
        Err(e) if !small.large => return Err(error(e)),
        Err(_) => drop(small),
    }
    let mut counted = Counted(0);
    rmp_serde::encode::write(&mut counted, value).map_err(error)?;
    let mut out = if counted.0 >= crate::node::connection::LARGE_PAYLOAD {
        crate::node::connection::large_buffer(counted.0)
    } else {
        Vec::with_capacity(counted.0)
    };
    rmp_serde::encode::write(&mut out, value).map_err(error)?;
    Ok(out)
}

/// A `Write` into a buffer that refuses to grow to
/// [`LARGE_PAYLOAD`](crate::node::connection::LARGE_PAYLOAD), and says so.
struct SmallOnly {
    out: Vec<u8>,
    large: bool,
}

impl std::io::Write for SmallOnly {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.write_all(bytes).map(|()| bytes.len())
    }

    // What the encoder calls: one check and one copy, no loop.
    #[inline]
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.out.len() + bytes.len() >= crate::node::connection::LARGE_PAYLOAD {
            self.large = true;
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `Write` that only counts the bytes written to it.
struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
