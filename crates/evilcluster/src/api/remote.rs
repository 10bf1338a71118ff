use std::marker::PhantomData;
use std::sync::Arc;

use actix::dev::ToEnvelope;

use std::collections::VecDeque;
use std::sync::Mutex;

use actix::dev::MessageResponse;
use actix::fut::ActorFuture;
use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message, MessageResult};
use futures_util::task::AtomicWaker;

use crate::node::connection::{Payload, Responder};
use crate::node::service::{decode_payload, encode_reply, Inbox, Taken};
use evilcluster_wire::{Recalled, WireError};
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

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
    <A as Handler<M>>::Result: 'static,
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

/// Handles one remote request inside the actor: decodes it, runs the
/// actor's `Handler` with `&mut self`, and answers through the responder.
type HandleFn<A> = fn(&mut A, &mut <A as Actor>::Context, &Payload, Responder);

/// The messages a [`RemoteActor`] answers, filled in from its
/// [`Messages`](RemoteActor::Messages) list.
pub struct Routes<A: Actor> {
    /// Each message's tag, its type's name and its handler.
    list: Vec<(&'static str, &'static str, HandleFn<A>)>,
    /// Where each tag is in `list`.
    by_tag: FxHashMap<&'static str, usize>,
}

impl<A: RemoteActor> Routes<A> {
    pub(crate) fn collect() -> Self {
        let mut routes = Routes {
            list: Vec::new(),
            by_tag: FxHashMap::default(),
        };
        A::Messages::register(&mut routes);
        routes
    }

    /// The route for `tag`, and its place: the one at `hint` when `tag` is
    /// that route's own string (the decoder gives it back for the same
    /// bytes), else looked up.
    fn find(&self, hint: usize, tag: &str) -> Option<(usize, &'static str, HandleFn<A>)> {
        let index = match self.list.get(hint) {
            Some(&(own, _, _)) if std::ptr::eq(own, tag) => hint,
            _ => *self.by_tag.get(tag)?,
        };
        let (own, _, handle) = self.list[index];
        Some((index, own, handle))
    }

    /// Routes messages of type `M` (tag `M::TAG`) to `A`'s handler.
    pub(crate) fn handle<M>(&mut self) -> &mut Self
    where
        A: Handler<M>,
        <A as Handler<M>>::Result: 'static,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: Serialize + Send,
    {
        let name = std::any::type_name::<M>();
        if let Some(&previous) = self.by_tag.get(M::TAG) {
            panic!(
                "{} routes two messages with tag `{}`: {} and {name}",
                A::NAME,
                M::TAG,
                self.list[previous].1
            );
        }
        self.by_tag.insert(M::TAG, self.list.len());
        self.list.push((M::TAG, name, handle_remote::<A, M>));
        self
    }
}

fn handle_remote<A, M>(act: &mut A, ctx: &mut Context<A>, payload: &Payload, responder: Responder)
where
    A: RemoteActor + Handler<M>,
    <A as Handler<M>>::Result: 'static,
    M: RemoteMessage,
    M::Result: Serialize + Send,
{
    let message: M = match payload.decode(|bytes| decode_payload(M::TAG, bytes)) {
        Ok(message) => message,
        Err(error) => return responder.answer(Err(error)),
    };
    let answer = |responder: Responder, result: M::Result| {
        let reply = if responder.wants_reply() {
            encode_reply(M::TAG, &result)
        } else {
            Ok(Vec::new())
        };
        responder.answer(reply);
    };
    let response = <A as Handler<M>>::handle(act, message, ctx);
    // A handler that returns its result as it is (or in a
    // `MessageResult`), as most do, is answered at once: every
    // `MessageResponse` actix has for such a type only passes the value
    // through a oneshot channel, allocated per message.
    let mut response = Some(response);
    let any: &mut dyn std::any::Any = &mut response;
    if let Some(value) = any.downcast_mut::<Option<M::Result>>().and_then(Option::take) {
        return answer(responder, value);
    }
    if let Some(MessageResult(value)) = any.downcast_mut::<Option<MessageResult<M>>>().and_then(Option::take) {
        return answer(responder, value);
    }
    let response = response.expect("taken only when answered above");
    // A one-way message's result is not sent, but it is waited for all
    // the same: its place in the window is given back once it is handled.
    let (done, mut result) = tokio::sync::oneshot::channel();
    response.handle(ctx, Some(done));
    match result.try_recv() {
        Ok(value) => answer(responder, value),
        // An asynchronous handler: answered when it finishes, even after
        // the actor stopped (a `ResponseFuture` outlives it, as with
        // `Addr::send`); if its answer is dropped instead, the responder,
        // dropped too, says the actor stopped.
        Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
            actix_rt::spawn(async move {
                if let Ok(value) = result.await {
                    answer(responder, value);
                }
            });
        }
        // The handler dropped its answer: it ran, and there is no result.
        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => responder.answer(Err(WireError::Stopped {
            actor: A::NAME.to_owned(),
        })),
    }
}

/// A hosted actor's inbox for requests from connections. The actor drains
/// it from its own context (see [`ActorInbox::drain`]), so requests are
/// handled in the order they arrived, interleaved with the actor's own
/// mailbox as actix interleaves a context's futures with it.
pub(crate) struct ActorInbox<A: RemoteActor> {
    routes: Routes<A>,
    queue: Mutex<Queue<A>>,
    /// The draining future, when it waits for work.
    waker: AtomicWaker,
    /// Stop the actor once the inbox is empty.
    stop_requested: std::sync::atomic::AtomicBool,
}

struct Queue<A: Actor> {
    jobs: VecDeque<Job<A>>,
    /// The actor stopped: requests are refused (their handlers never run).
    closed: bool,
}

struct Job<A: Actor> {
    handle: HandleFn<A>,
    payload: Payload,
    responder: Responder,
}

/// Requests handled in one turn before the actor lets its mailbox and
/// other futures run.
const TURN: usize = 256;

impl<A: RemoteActor> ActorInbox<A> {
    pub fn new() -> Arc<Self> {
        Arc::new(ActorInbox {
            routes: Routes::collect(),
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            waker: AtomicWaker::new(),
            stop_requested: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Stops the actor once it has handled every request the inbox holds.
    pub fn stop_when_drained(&self) {
        self.stop_requested.store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake();
    }

    /// The future that hands the inbox's requests to the actor; spawn it in
    /// the actor's context before the actor starts.
    pub fn drain(self: &Arc<Self>) -> impl ActorFuture<A, Output = ()> {
        Drain {
            inbox: self.clone(),
            batch: VecDeque::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<A>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<A: RemoteActor> Inbox for ActorInbox<A> {
    fn deliver(
        &self,
        last: Taken,
        tag: &str,
        payload: Payload,
        mut responder: Responder,
    ) -> Result<Taken, (Responder, WireError)> {
        responder.for_actor(A::NAME);
        let Some((route, own_tag, handle)) = self.routes.find(last.route, tag) else {
            let unknown = WireError::UnknownMessage {
                actor: A::NAME.to_owned(),
                tag: tag.to_owned(),
            };
            return Err((responder, unknown));
        };
        let mut queue = self.lock();
        if queue.closed {
            drop(queue);
            let closed = WireError::MailboxClosed {
                actor: A::NAME.to_owned(),
            };
            return Err((responder, closed));
        }
        let was_empty = queue.jobs.is_empty();
        queue.jobs.push_back(Job {
            handle,
            payload,
            responder,
        });
        drop(queue);
        // The drain takes the whole queue at once and registers before it
        // looks: only the first request after that needs to wake it.
        if was_empty {
            self.waker.wake();
        }
        Ok(Taken {
            names: Recalled {
                actor: A::NAME,
                tag: own_tag,
            },
            route,
        })
    }
}

struct Drain<A: RemoteActor> {
    inbox: Arc<ActorInbox<A>>,
    /// Requests taken from the inbox and not handled yet.
    batch: VecDeque<Job<A>>,
}

impl<A: RemoteActor> ActorFuture<A> for Drain<A> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        act: &mut A,
        ctx: &mut Context<A>,
        task: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.get_mut();
        let mut turn = TURN;
        loop {
            if this.batch.is_empty() {
                this.inbox.waker.register(task.waker());
                std::mem::swap(&mut this.inbox.lock().jobs, &mut this.batch);
                if this.batch.is_empty() {
                    if this
                        .inbox
                        .stop_requested
                        .swap(false, std::sync::atomic::Ordering::AcqRel)
                    {
                        ctx.stop();
                    }
                    return std::task::Poll::Pending;
                }
            }
            while let Some(Job {
                handle,
                payload,
                responder,
            }) = this.batch.pop_front()
            {
                handle(act, ctx, &payload, responder);
                // A handler that made the actor wait for a future, or stop:
                // the context comes back here once it may handle more.
                if ctx.waiting() || ctx.state() != actix::ActorState::Running {
                    return std::task::Poll::Pending;
                }
                turn -= 1;
                if turn == 0 {
                    task.waker().wake_by_ref();
                    return std::task::Poll::Pending;
                }
            }
        }
    }
}

impl<A: RemoteActor> Drop for Drain<A> {
    fn drop(&mut self) {
        // The actor is gone: what it did not take never reached a handler.
        let left = {
            let mut queue = self.inbox.lock();
            queue.closed = true;
            std::mem::take(&mut queue.jobs)
        };
        for job in self.batch.drain(..).chain(left) {
            job.responder.answer(Err(WireError::MailboxClosed {
                actor: A::NAME.to_owned(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    struct Two;
    impl Actor for Two {
        type Context = Context<Self>;
    }

    #[derive(actix::Message, Serialize, Deserialize)]
    #[rtype(result = "()")]
    struct First;
    #[derive(actix::Message, Serialize, Deserialize)]
    #[rtype(result = "()")]
    struct Second;
    crate::remote_messages! { First => "two.first", Second => "two.second" }

    impl Handler<First> for Two {
        type Result = ();
        fn handle(&mut self, _: First, _: &mut Context<Self>) {}
    }
    impl Handler<Second> for Two {
        type Result = ();
        fn handle(&mut self, _: Second, _: &mut Context<Self>) {}
    }
    impl RemoteActor for Two {
        const NAME: &'static str = "two";
        type Messages = crate::messages![First, Second];
    }

    #[test]
    fn a_route_hint_serves_only_its_own_tag_string() {
        let routes = Routes::<Two>::collect();
        let place = |hint: usize, tag: &str| routes.find(hint, tag).map(|(place, _, _)| place);
        let first = place(usize::MAX, "two.first").expect("routed");
        let second = place(usize::MAX, "two.second").expect("routed");
        assert_ne!(first, second);
        // The route's own string at its place: that route.
        let (_, own, _) = routes.find(second, "two.second").expect("routed");
        assert_eq!(own, "two.second");
        assert_eq!(place(second, own), Some(second));
        // A hint at another route, or the same bytes in another string:
        // looked up, never taken on trust.
        assert_eq!(place(second, "two.first"), Some(first));
        assert_eq!(place(first, &String::from("two.second")), Some(second));
        // The start of the route's own string is another tag.
        assert_eq!(place(second, &own[..7]), None);
        assert_eq!(place(first, "two.third"), None);
    }
}
