use std::marker::PhantomData;
use std::sync::Arc;

use actix::dev::ToEnvelope;

use crate::node::service::{decode_payload, encode_reply, Dispatch, Service};
use actix::{Actor, Addr, Context, Handler, Message};
use evilcluster_wire::WireError;
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::node::connection::Link;

/// A message that can cross process boundaries.
///
/// `TAG` names it on the wire. It must be stable across builds and unique
/// among the messages of one actor: two builds of the same program agree on
/// it, whatever the compiler calls the type.
///
/// ```
/// use evilcluster::prelude::*;
///
/// #[derive(Message, Serialize, Deserialize)]
/// #[rtype(result = "Option<String>")]
/// struct Get(String);
///
/// impl RemoteMessage for Get {
///     const TAG: &'static str = "datastore.get";
/// }
/// ```
pub trait RemoteMessage: Message + Serialize + DeserializeOwned + Send + 'static {
    /// The message's stable name on the wire.
    const TAG: &'static str;

    /// Whether handling the message twice does no harm (a read, or a write
    /// of the same value). A `send` of an idempotent message whose instance
    /// died before answering (`Disconnected`) is sent again to another live
    /// instance within the same deadline; other messages are never sent
    /// twice. Default: `false`.
    const IDEMPOTENT: bool = false;
}

/// Implements [`RemoteMessage`] for several types at once.
///
/// ```
/// use evilcluster::prelude::*;
///
/// #[derive(Message, Serialize, Deserialize)]
/// #[rtype(result = "()")]
/// struct Put(String, String);
/// #[derive(Message, Serialize, Deserialize)]
/// #[rtype(result = "Option<String>")]
/// struct Get(String);
///
/// evilcluster::remote_messages! {
///     Put => "datastore.put",
///     Get => "datastore.get",
/// }
/// ```
///
/// Add `, idempotent` after a tag for a message that is safe to handle twice
/// (see [`RemoteMessage::IDEMPOTENT`]):
///
/// ```
/// # use evilcluster::prelude::*;
/// # #[derive(Message, Serialize, Deserialize)]
/// # #[rtype(result = "Option<String>")]
/// # struct Get(String);
/// evilcluster::remote_messages! { Get => "datastore.get", idempotent }
/// ```
#[macro_export]
macro_rules! remote_messages {
    () => {};
    ($message:ty => $tag:expr, idempotent $(, $($rest:tt)*)?) => {
        impl $crate::RemoteMessage for $message {
            const TAG: &'static str = $tag;
            const IDEMPOTENT: bool = true;
        }
        $($crate::remote_messages! { $($rest)* })?
    };
    ($message:ty => $tag:expr $(, $($rest:tt)*)?) => {
        impl $crate::RemoteMessage for $message {
            const TAG: &'static str = $tag;
        }
        $($crate::remote_messages! { $($rest)* })?
    };
}

/// An actix actor that other processes can reach by name.
///
/// ```
/// use evilcluster::prelude::*;
///
/// #[derive(Default)]
/// struct Counter(u64);
/// impl Actor for Counter {
///     type Context = Context<Self>;
/// }
///
/// #[derive(Message, Serialize, Deserialize)]
/// #[rtype(result = "u64")]
/// struct Add(u64);
/// evilcluster::remote_messages! { Add => "counter.add" }
///
/// impl Handler<Add> for Counter {
///     type Result = u64;
///     fn handle(&mut self, Add(n): Add, _: &mut Context<Self>) -> u64 {
///         self.0 += n;
///         self.0
///     }
/// }
///
/// impl RemoteActor for Counter {
///     const NAME: &'static str = "counter";
///     type Messages = evilcluster::messages![Add];
/// }
/// ```
pub trait RemoteActor: Actor<Context = Context<Self>> {
    /// The actor's stable name in the cluster, also its worker's name.
    const NAME: &'static str;

    /// The messages other processes may send it, listed with
    /// [`messages!`](crate::messages): `type Messages = evilcluster::messages![Get, Put];`.
    ///
    /// The list is checked by the compiler: `addr_of::<A>().send(m)`
    /// compiles only when `m`'s type is in `A`'s list (and `A` handles it),
    /// and the same list builds the routes the hosting process dispatches
    /// by, so the two cannot disagree.
    ///
    /// ```compile_fail
    /// use evilcluster::prelude::*;
    ///
    /// #[derive(Default)]
    /// struct Counter;
    /// impl Actor for Counter { type Context = Context<Self>; }
    ///
    /// #[derive(Message, Serialize, Deserialize)]
    /// #[rtype(result = "u64")]
    /// struct Add(u64);
    /// #[derive(Message, Serialize, Deserialize)]
    /// #[rtype(result = "u64")]
    /// struct Reset;
    /// evilcluster::remote_messages! { Add => "counter.add", Reset => "counter.reset" }
    ///
    /// impl Handler<Add> for Counter {
    ///     type Result = u64;
    ///     fn handle(&mut self, Add(n): Add, _: &mut Context<Self>) -> u64 { n }
    /// }
    /// impl Handler<Reset> for Counter {
    ///     type Result = u64;
    ///     fn handle(&mut self, _: Reset, _: &mut Context<Self>) -> u64 { 0 }
    /// }
    /// impl RemoteActor for Counter {
    ///     const NAME: &'static str = "counter";
    ///     type Messages = evilcluster::messages![Add]; // `Reset` is handled, not listed
    /// }
    ///
    /// async fn reset() {
    ///     // Does not compile: `Counter` does not list `Reset`.
    ///     let _ = evilcluster::addr_of::<Counter>().send(Reset).await;
    /// }
    /// ```
    type Messages: MessageList<Self>;

    /// Mailbox capacity of the hosting process's instance. Remote callers
    /// pipeline requests, so it is far above actix's default of 16.
    fn mailbox_capacity() -> usize {
        DEFAULT_MAILBOX_CAPACITY
    }
}

/// A list of message types built by [`messages!`](crate::messages): what a
/// [`RemoteActor`] answers. Implemented for `()` and `(M, Rest)`.
pub trait MessageList<A: Actor> {
    #[doc(hidden)]
    fn register(routes: &mut Routes<A>);
}

impl<A: Actor> MessageList<A> for () {
    fn register(_: &mut Routes<A>) {}
}

impl<A, M, Rest> MessageList<A> for (M, Rest)
where
    A: RemoteActor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: RemoteMessage,
    M::Result: Serialize + Send,
    Rest: MessageList<A>,
{
    fn register(routes: &mut Routes<A>) {
        routes.handle::<M>();
        Rest::register(routes);
    }
}

/// Where a message sits in a [`MessageList`]: at its head…
#[doc(hidden)]
pub struct Here;
/// …or further down.
#[doc(hidden)]
pub struct There<I>(PhantomData<I>);

/// A [`MessageList`] that contains `M` (at position `I`, which the compiler
/// infers).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{M}` is not in the actor's `Messages` list",
    label = "this actor does not list `{M}`",
    note = "add `{M}` to the actor's `type Messages = evilcluster::messages![...]` (and implement `Handler<{M}>` for it)"
)]
pub trait Contains<M, I> {}

impl<M, Rest> Contains<M, Here> for (M, Rest) {}

impl<Head, Rest, M, I> Contains<M, There<I>> for (Head, Rest) where Rest: Contains<M, I> {}

/// `A` answers `M` from other processes: `M` is in `A`'s
/// [`Messages`](RemoteActor::Messages). What `send` and `do_send` require.
pub trait Routed<M: Message, I>: RemoteActor + Handler<M> {}

impl<A, M, I> Routed<M, I> for A
where
    M: Message,
    A: RemoteActor + Handler<M>,
    A::Messages: Contains<M, I>,
{
}

/// Lists the messages a [`RemoteActor`] answers, for its `Messages` type:
///
/// ```
/// # use evilcluster::prelude::*;
/// # #[derive(Message, Serialize, Deserialize)] #[rtype(result = "()")] struct Put(String, String);
/// # #[derive(Message, Serialize, Deserialize)] #[rtype(result = "Option<String>")] struct Get(String);
/// type Messages = evilcluster::messages![Get, Put];
/// ```
#[macro_export]
macro_rules! messages {
    () => { () };
    ($head:ty $(, $rest:ty)* $(,)?) => { ($head, $crate::messages![$($rest),*]) };
}

/// Default mailbox capacity of a hosted actor. Large enough that a send
/// never parks the caller, which is what keeps a connection's messages in
/// order; each connection's flow-control window (4,096 messages) bounds
/// what one peer can queue, so the mailbox holds at most that many per
/// connected process.
pub const DEFAULT_MAILBOX_CAPACITY: usize = 1 << 20;

type Route<A> = Box<dyn Fn(&Addr<A>, &[u8], bool) -> Result<Dispatch, WireError> + Send + Sync>;

/// The messages a [`RemoteActor`] answers, filled in by [`RemoteActor::routes`].
pub struct Routes<A: Actor> {
    table: FxHashMap<&'static str, (&'static str, Route<A>)>,
}

impl<A: RemoteActor> Routes<A> {
    pub(crate) fn collect() -> Self {
        let mut routes = Routes {
            table: FxHashMap::default(),
        };
        A::Messages::register(&mut routes);
        routes
    }

    /// Accepts `M` from other processes.
    ///
    /// # Panics
    /// If another message of this actor already uses `M::TAG`.
    pub(crate) fn handle<M>(&mut self) -> &mut Self
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: Serialize + Send,
    {
        let route: Route<A> = Box::new(|addr, payload, reply| {
            let message: M = decode_payload(M::TAG, payload)?;
            if !addr.connected() {
                // Not queued: the handler did not run.
                return Err(WireError::MailboxClosed {
                    actor: A::NAME.to_owned(),
                });
            }
            // One queue for both kinds, so do_send and send stay in order;
            // a one-way message is awaited too, so that the connection knows
            // when its place in the window is free again.
            let pending = addr.send(message);
            Ok(Some(Box::pin(async move {
                let result = pending.await.map_err(|_| WireError::Stopped {
                    actor: A::NAME.to_owned(),
                })?;
                if reply {
                    encode_reply(M::TAG, &result)
                } else {
                    Ok(Vec::new())
                }
            })))
        });
        let name = std::any::type_name::<M>();
        if let Some((previous, _)) = self.table.insert(M::TAG, (name, route)) {
            panic!(
                "{} routes two messages with tag `{}`: {previous} and {name}",
                A::NAME,
                M::TAG
            );
        }
        self
    }
}

/// A hosted actor, seen as a service.
pub(crate) struct ActorService<A: RemoteActor> {
    addr: Addr<A>,
    routes: Routes<A>,
}

impl<A: RemoteActor> ActorService<A> {
    pub fn new(addr: Addr<A>) -> Self {
        ActorService {
            addr,
            routes: Routes::collect(),
        }
    }
}

impl<A: RemoteActor> Service for ActorService<A> {
    fn dispatch(
        &self,
        _caller: Option<&Arc<Link>>,
        tag: &str,
        payload: &[u8],
        reply: bool,
    ) -> Result<Dispatch, WireError> {
        let (_, route) = self.routes.table.get(tag).ok_or_else(|| WireError::UnknownMessage {
            actor: A::NAME.to_owned(),
            tag: tag.to_owned(),
        })?;
        route(&self.addr, payload, reply)
    }
}
