//! What a process hosts, as the connections see it: a service answers
//! requests by tag. User actors (through their routes) and the runtime's own
//! services (registry, directory, events, stats, control) are all services.

use std::sync::Arc;

use evilcluster_wire::{Recalled, WireError};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde::Serialize;

use crate::node::connection::{Link, Payload, Responder, LARGE_PAYLOAD};

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
    /// the reason it was refused (the handler did not run). Says how it
    /// took it (the names as the actor's own strings, for the reader to
    /// decode the next request with, and the route); `last` is what it said
    /// of the connection's request before: a request with the same tag (the
    /// very string `last` gave back, as the decoder recalled it) takes the
    /// same route without looking it up.
    // The responder comes back by value: it is moved, not boxed, on the
    // path every request takes.
    #[allow(clippy::result_large_err)]
    fn deliver(
        &self,
        last: Taken,
        tag: &str,
        payload: Payload,
        responder: Responder,
    ) -> Result<Taken, (Responder, WireError)>;
}

/// How an actor's inbox took a request: the actor's name and the tag as
/// the actor's own strings, and the place of the tag's route among the
/// actor's routes.
#[derive(Clone, Copy, Default)]
pub(crate) struct Taken {
    pub names: Recalled,
    pub route: usize,
}

/// What a process hosts under one name.
#[derive(Clone)]
pub(crate) enum Hosted {
    /// One of the runtime's own services.
    Service(Arc<dyn Service>),
    /// A user's actor.
    Actor(Arc<dyn Inbox>),
}

/// The last name a connection's requests were for, and what it resolved
/// to: consecutive requests for the same actor (the usual traffic) skip
/// the shared table's lock and lookup. Stale as soon as anything is hosted
/// or removed (see [`Node::dispatch`](crate::node::Node::dispatch)).
#[derive(Default)]
pub(crate) struct HostedCache {
    last: Option<(u64, String, Hosted)>,
    /// How the actor `last` names took the connection's last request it
    /// took: its names decode the next request without checking them again,
    /// and its route serves the next one with the same tag.
    taken: Taken,
    /// `taken` is of the actor `last` names (its name is `taken`'s).
    taken_by_last: bool,
}

impl HostedCache {
    /// The names to decode the connection's next request with.
    pub(crate) fn recalled(&self) -> &Recalled {
        &self.taken.names
    }

    /// What the actor the cache resolved last said of the request it took.
    pub(crate) fn taken(&self) -> Taken {
        self.taken
    }

    /// Remembers how the actor the cache resolved last took a request.
    pub(crate) fn took(&mut self, taken: Taken) {
        // Its name stands for the cached one only if it is that name (an
        // actor is hosted under its own name; checked, not assumed): once
        // per change of names, not per request.
        let unchanged = self.taken_by_last && std::ptr::eq(taken.names.actor, self.taken.names.actor);
        self.taken_by_last = unchanged || matches!(&self.last, Some((_, name, _)) if name == taken.names.actor);
        self.taken = taken;
    }

    /// What `actor` is hosted as while the table is at `generation`: the
    /// cached answer, or `lookup`'s (remembered), or `None`.
    pub(crate) fn resolve(
        &mut self,
        generation: u64,
        actor: &str,
        lookup: impl FnOnce() -> Option<Hosted>,
    ) -> Option<&Hosted> {
        // The decoder gives the recalled name itself when the bytes are its:
        // then the same string is the same name, without comparing bytes.
        let recalled = self.taken_by_last && std::ptr::eq(actor, self.taken.names.actor);
        let hit = matches!(&self.last, Some((at, name, _)) if *at == generation && (recalled || name == actor));
        if !hit {
            let hosted = lookup()?;
            self.taken_by_last = false;
            match &mut self.last {
                Some((at, name, cached)) => {
                    *at = generation;
                    name.clear();
                    name.push_str(actor);
                    *cached = hosted;
                }
                None => self.last = Some((generation, actor.to_owned(), hosted)),
            }
        }
        self.last.as_ref().map(|(_, _, hosted)| hosted)
    }
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
pub(crate) fn decode_payload<'a, T: Deserialize<'a>>(tag: &str, payload: &'a [u8]) -> Result<T, WireError> {
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
    let mut out = crate::node::connection::small_buffer();
    let mut small = Capped {
        out: &mut out,
        limit: LARGE_PAYLOAD - 1,
        overflowed: false,
    };
    match rmp_serde::encode::write(&mut small, value) {
        Ok(()) => return Ok(out),
        Err(e) if !small.overflowed => return Err(error(e)),
        Err(_) => {}
    }
    let mut counted = Counter {
        len: 0,
        limit: usize::MAX,
    };
    rmp_serde::encode::write(&mut counted, value).map_err(error)?;
    let mut out = crate::node::connection::large_buffer(counted.len);
    rmp_serde::encode::write(&mut out, value).map_err(error)?;
    Ok(out)
}

/// A `Write` that refuses to grow past a limit, so that an oversized
/// message is refused while it is being encoded, not after.
pub(crate) struct Capped<'a> {
    pub out: &'a mut Vec<u8>,
    pub limit: usize,
    /// The limit was hit (rather than the encoder failing).
    pub overflowed: bool,
}

impl std::io::Write for Capped<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.write_all(bytes).map(|()| bytes.len())
    }

    // What the encoder calls: one check and one copy, no loop.
    #[inline]
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.out.len() + bytes.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `Write` that only counts, up to a limit: measures a message's
/// encoding without making it (a byte string is one write, counted at once).
pub(crate) struct Counter {
    pub len: usize,
    pub limit: usize,
}

impl std::io::Write for Counter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.len += bytes.len();
        if self.len > self.limit {
            return Err(std::io::Error::other("over the maximum frame length"));
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    impl Service for Nothing {
        fn dispatch(&self, _: Option<&Arc<Link>>, _: &str, _: &[u8], _: bool) -> Result<Dispatch, WireError> {
            Ok(None)
        }
    }

    fn hosted() -> Hosted {
        Hosted::Service(Arc::new(Nothing))
    }

    #[test]
    fn a_cached_name_is_looked_up_again_when_the_table_or_the_name_changes() {
        let lookups = std::cell::Cell::new(0);
        let mut cache = HostedCache::default();
        let mut resolve = |generation: u64, actor: &str| {
            cache
                .resolve(generation, actor, || {
                    lookups.set(lookups.get() + 1);
                    Some(hosted())
                })
                .is_some()
        };
        assert!(resolve(3, "store"));
        assert!(resolve(3, "store"));
        assert_eq!(lookups.get(), 1, "the second request for the same name is cached");
        // Anything hosted or removed since, or another name: looked up again.
        assert!(resolve(4, "store"));
        assert!(resolve(4, "stor"));
        assert!(resolve(4, "store2"));
        assert_eq!(lookups.get(), 4);
        // A name nothing hosts: not found.
        assert!(cache.resolve(5, "ghost", || None).is_none());
    }

    #[test]
    fn a_recalled_name_is_the_cached_one_only_while_it_is_the_last_resolved() {
        // Statics: one string each, the same pointer at every use.
        static STORE: &str = "store";
        static ELSEWHERE: &str = "elsewhere";
        let lookups = std::cell::Cell::new(0);
        let mut cache = HostedCache::default();
        let resolve = |cache: &mut HostedCache, actor: &str| {
            cache
                .resolve(1, actor, || {
                    lookups.set(lookups.get() + 1);
                    Some(hosted())
                })
                .is_some()
        };
        assert!(resolve(&mut cache, "store"));
        cache.took(Taken {
            names: Recalled { actor: STORE, tag: "t" },
            route: 0,
        });
        assert!(resolve(&mut cache, STORE));
        assert_eq!(lookups.get(), 1, "the recalled name is the cached one");
        // Another name in between: the recalled string no longer names what
        // the cache holds, though the decoder may still give it back.
        assert!(resolve(&mut cache, "other"));
        assert!(resolve(&mut cache, STORE));
        assert_eq!(lookups.get(), 3);
        // Names an actor gave back that are not the cached name never stand
        // for it.
        cache.took(Taken {
            names: Recalled {
                actor: ELSEWHERE,
                tag: "t",
            },
            route: 0,
        });
        assert!(resolve(&mut cache, ELSEWHERE));
        assert_eq!(lookups.get(), 4);
        // A string that starts where the recalled one does is not it.
        assert!(resolve(&mut cache, STORE));
        cache.took(Taken {
            names: Recalled { actor: STORE, tag: "t" },
            route: 0,
        });
        assert!(resolve(&mut cache, STORE));
        assert_eq!(lookups.get(), 5);
        assert!(resolve(&mut cache, &STORE[..4]));
        assert_eq!(lookups.get(), 6);
    }
}
