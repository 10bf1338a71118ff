//! Typed addresses of remote actors.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Message;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;

use crate::api::pipeline::SendAll;
use crate::api::remote::{RemoteActor, RemoteMessage, Routed};
use crate::node::connection::{frame_size, Link, LinkError, Outgoing, Payload, ReplyWaiter, LARGE_PAYLOAD};
use crate::node::deadline::Deadline;
use crate::node::directory::{Member, Pick};
use crate::node::rpc::{deadline_after, deadline_from, link_error, timed_out, wait};
use crate::node::service::{Capped, Counter};
use crate::node::{self, Node};
use crate::SendError;

/// The address of a remote actor, by name: whichever live process hosts it.
///
/// Cheap to create and to clone; it resolves on every send through this
/// process's local directory, so it follows restarts. For a worker with
/// forks, each send goes to the next live fork in turn.
pub struct RemoteAddr<A> {
    target: Target,
    actor: PhantomData<fn() -> A>,
}

/// Where a send goes, untyped: what [`RemoteAddr`] and [`RemoteRecipient`]
/// share.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target {
    pub(super) actor: &'static str,
    pick: Pick,
    timeout: Option<Duration>,
    resolve_timeout: Option<Duration>,
    /// Only the instances on this host (node name), across NATS.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    node: Option<&'static str>,
}

impl<A> Clone for RemoteAddr<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for RemoteAddr<A> {}

impl<A> std::fmt::Debug for RemoteAddr<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteAddr")
            .field("actor", &std::any::type_name::<A>())
            .field("pick", &self.target.pick)
            .finish()
    }
}

/// The address of actor `A`, wherever it runs. Returns at once; the name is
/// resolved on first use.
///
/// ```no_run
/// # use evilcluster::prelude::*;
/// # #[derive(Default)] struct Datastore;
/// # impl Actor for Datastore { type Context = Context<Self>; }
/// # #[derive(Message, Serialize, Deserialize)] #[rtype(result = "Option<String>")] struct Get(String);
/// # evilcluster::remote_messages! { Get => "get" }
/// # impl Handler<Get> for Datastore { type Result = Option<String>; fn handle(&mut self, _: Get, _: &mut Context<Self>) -> Option<String> { None } }
/// # impl RemoteActor for Datastore { const NAME: &'static str = "datastore"; type Messages = evilcluster::messages![Get]; }
/// # async fn demo() -> Result<(), SendError> {
/// let value: Option<String> = evilcluster::addr_of::<Datastore>().send(Get("k".into())).await?;
/// # Ok(()) }
/// ```
pub fn addr_of<A: RemoteActor>() -> RemoteAddr<A> {
    RemoteAddr {
        target: Target {
            actor: A::NAME,
            pick: Pick::Any,
            timeout: None,
            resolve_timeout: None,
            node: None,
        },
        actor: PhantomData,
    }
}

/// The address of fork `number` (1-based) of actor `A`'s worker.
pub fn addr_of_fork<A: RemoteActor>(number: u32) -> RemoteAddr<A> {
    let mut addr = addr_of::<A>();
    addr.target.pick = Pick::Fork(number);
    addr
}

impl<A: RemoteActor> RemoteAddr<A> {
    /// Sets the deadline of each call through this address, counted from
    /// the moment the call starts and covering everything: waiting for the
    /// name to be registered, connecting, waiting for room on a busy
    /// connection and waiting for the reply (default: the cluster's call
    /// timeout, 5 s unless configured). The deadline is kept by the
    /// caller's own runtime, whatever the receiving side is doing.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.target.timeout = Some(timeout);
        self
    }

    /// Sets how long a send waits for a declared actor to be registered
    /// before it fails with [`SendError::NotRegistered`] (default: the
    /// cluster's resolve timeout, 10 s unless configured; never past the
    /// call's deadline). An actor no worker declares fails at once with
    /// [`SendError::NotDeclared`].
    pub fn resolve_timeout(mut self, timeout: Duration) -> Self {
        self.target.resolve_timeout = Some(timeout);
        self
    }

    /// Only the instances running on the host named `node` (its
    /// [`NatsOptions::node`](crate::NatsOptions::node) name; this host's own
    /// name means local instances only). Sends wait for one there as for an
    /// unregistered name.
    #[cfg(feature = "nats")]
    pub fn on_node(mut self, node: &str) -> Self {
        self.target.node = Some(crate::nats::intern(node));
        self
    }

    /// A type-erased address for one message type, like actix's
    /// `Recipient<M>`: it can be stored beside recipients of other actors
    /// that take the same message.
    pub fn recipient<M, I>(&self) -> RemoteRecipient<M>
    where
        A: Routed<M, I>,
        M: RemoteMessage,
        M::Result: DeserializeOwned + Send,
    {
        RemoteRecipient {
            target: self.target,
            message: PhantomData,
        }
    }

    /// Sends `message` and waits for the handler's result.
    ///
    /// Await the returned request, optionally after setting its own
    /// [`timeout`](SendRequest::timeout). When the connection is full (its
    /// byte budget or its window of messages in flight), the call waits for
    /// room within its deadline; [`try_send`](Self::try_send) fails instead.
    ///
    /// Delivery is at most once; [`SendError::handler_may_have_run`] tells
    /// which errors leave the handler's effect unknown. A request refused
    /// before it reached a handler (the instance was leaving, or restarted)
    /// is sent again to another live instance within the deadline, and so
    /// is an [idempotent](RemoteMessage::IDEMPOTENT) one whose instance died.
    pub fn send<M, I>(&self, message: M) -> SendRequest<M>
    where
        A: Routed<M, I>,
        M: RemoteMessage,
        M::Result: DeserializeOwned + Send,
    {
        SendRequest::new(self.target, message, true)
    }

    /// Like [`send`](Self::send), but fails at once with
    /// [`SendError::Full`] instead of waiting when the connection has no
    /// room (it still waits for the name to resolve and to connect).
    pub fn try_send<M, I>(&self, message: M) -> SendRequest<M>
    where
        A: Routed<M, I>,
        M: RemoteMessage,
        M::Result: DeserializeOwned + Send,
    {
        SendRequest::new(self.target, message, false)
    }

    /// Sends each of `messages` in turn, keeping up to `window` of them
    /// waiting for their replies at once, and yields their results in the
    /// order of the messages: pipelining, for throughput from one task
    /// without one future per call (like OTP's request-id collections, or
    /// a stream of [`send`](Self::send)s through `buffered(window)`, at a
    /// fraction of the cost per call).
    ///
    /// Each call is what [`send`](Self::send) makes of it: its own deadline
    /// (from when it is sent), at-most-once delivery, round robin among the
    /// instances, waiting for room on a full connection. Messages are sent
    /// in order; a result that arrives early waits for those before it.
    /// Dropping the stream cancels the calls still waiting.
    ///
    /// ```no_run
    /// # use evilcluster::prelude::*;
    /// # use futures_util::StreamExt;
    /// # #[derive(Default)] struct Datastore;
    /// # impl Actor for Datastore { type Context = Context<Self>; }
    /// # #[derive(Message, Serialize, Deserialize)] #[rtype(result = "Option<String>")] struct Get(String);
    /// # evilcluster::remote_messages! { Get => "get" }
    /// # impl Handler<Get> for Datastore { type Result = Option<String>; fn handle(&mut self, _: Get, _: &mut Context<Self>) -> Option<String> { None } }
    /// # impl RemoteActor for Datastore { const NAME: &'static str = "datastore"; type Messages = evilcluster::messages![Get]; }
    /// # async fn demo() -> Result<(), SendError> {
    /// let keys = (0..10_000).map(|i| Get(format!("key{i}")));
    /// let mut values = evilcluster::addr_of::<Datastore>().send_all(keys, 256);
    /// while let Some(value) = values.next().await {
    ///     let _value: Option<String> = value?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn send_all<M, I, T>(&self, messages: T, window: usize) -> SendAll<M, T::IntoIter>
    where
        A: Routed<M, I>,
        M: RemoteMessage,
        M::Result: DeserializeOwned + Send,
        T: IntoIterator<Item = M>,
    {
        SendAll::new(self.target, messages.into_iter(), window)
    }

    /// Sends `message` to every instance of the actor — each fork of its
    /// worker, or its one process — at once, and collects each one's result:
    /// `(Some(fork), result)` per fork, or `(None, result)` for a worker
    /// without forks. An instance that is not running gives
    /// [`SendError::NotRegistered`] at once rather than being waited for.
    pub async fn broadcast<M, I>(&self, message: M) -> Vec<(Option<u32>, Result<M::Result, SendError>)>
    where
        A: Routed<M, I>,
        M: RemoteMessage + Clone,
        M::Result: DeserializeOwned + Send,
    {
        let now = Duration::ZERO;
        #[cfg(feature = "nats")]
        if let Some(mesh) = crate::nats::mesh() {
            let remote = crate::nats::instances(&mesh, A::NAME);
            if !remote.is_empty() {
                return self.broadcast_across_hosts(&mesh, message, remote).await;
            }
        }
        match crate::node::directory::declared_forks(A::NAME) {
            Some(forks) if forks > 0 => {
                let sends = (1..=forks).map(|fork| {
                    let mut addr = self.resolve_timeout(now);
                    addr.target.pick = Pick::Fork(fork);
                    let request = addr.send(message.clone());
                    async move { (Some(fork), request.await) }
                });
                futures_util::future::join_all(sends).await
            }
            _ => vec![(None, self.resolve_timeout(now).send(message).await)],
        }
    }

    /// [`broadcast`](Self::broadcast) when other hosts run instances too:
    /// this host's (as declared here, when it runs the worker) and every
    /// other host's, each once.
    #[cfg(feature = "nats")]
    async fn broadcast_across_hosts<M, I>(
        &self,
        mesh: &crate::nats::Mesh,
        message: M,
        remote: Vec<(&'static str, Option<u32>)>,
    ) -> Vec<(Option<u32>, Result<M::Result, SendError>)>
    where
        A: Routed<M, I>,
        M: RemoteMessage + Clone,
        M::Result: DeserializeOwned + Send,
    {
        let here = crate::nats::intern(&mesh.node_name);
        let runs_here = crate::members().iter().any(|m| m.actor() == Some(A::NAME));
        let mut targets: Vec<(&'static str, Option<u32>)> = Vec::new();
        if runs_here {
            match crate::node::directory::declared_forks(A::NAME) {
                Some(forks) if forks > 0 => targets.extend((1..=forks).map(|fork| (here, Some(fork)))),
                _ => targets.push((here, None)),
            }
        }
        targets.extend(remote);
        let sends = targets.into_iter().map(|(node, fork)| {
            let mut addr = self.resolve_timeout(Duration::ZERO);
            addr.target.node = Some(node);
            if let Some(fork) = fork {
                addr.target.pick = Pick::Fork(fork);
            }
            let request = addr.send(message.clone());
            async move { (fork, request.await) }
        });
        futures_util::future::join_all(sends).await
    }

    /// Sends `message` without waiting for a result. Returns once the message
    /// is queued on the connection; messages from one process to one actor
    /// are delivered in the order sent, `send` and `do_send` alike.
    ///
    /// When the connection is full (the receiver is behind), it waits for
    /// room, up to the address's timeout: a fast sender is slowed to the
    /// receiver's pace rather than queueing without bound.
    pub async fn do_send<M, I>(&self, message: M) -> Result<(), SendError>
    where
        A: Routed<M, I>,
        M: RemoteMessage,
    {
        self.target.one_way(message, true).await
    }

    /// Like [`do_send`](Self::do_send), but fails at once with
    /// [`SendError::Full`] instead of waiting when the connection has no room.
    pub async fn try_do_send<M, I>(&self, message: M) -> Result<(), SendError>
    where
        A: Routed<M, I>,
        M: RemoteMessage,
    {
        self.target.one_way(message, false).await
    }
}

impl Target {
    async fn one_way<M: RemoteMessage>(&self, message: M, wait_for_room: bool) -> Result<(), SendError> {
        let node = node::current().ok_or(SendError::NotInCluster)?;
        node.stats.sent();
        // The common case, with no clock read: the connection is up and has room.
        let first = self.route_now(&node);
        #[cfg(feature = "nats")]
        if matches!(first, Route::Resolve) || self.node.is_some() {
            if let Some(mesh) = crate::nats::mesh() {
                if matches!(first, Route::Resolve) || self.node.is_some_and(|n| n != mesh.node_name) {
                    return self.one_way_across_hosts(node, mesh, message, wait_for_room).await;
                }
            }
        }
        if let Route::Ready(link, incarnation) = &first {
            match try_queue(link, self.actor, *incarnation, &message, false) {
                Ok(Some(_)) => return Ok(()),
                // No room, or refused before it was sent: the path below
                // waits for room or picks another instance.
                Ok(None) => {}
                Err(error) if never_sent(&error) => {}
                Err(error) => return Err(error),
            }
        }
        let deadline = self.deadline(&node);
        let mut route = Some(first);
        let mut avoid = Vec::new();
        let mut message = message;
        loop {
            let next = route.take().unwrap_or_else(|| self.route_now(&node));
            let (link, incarnation) = self.route(&node, next, deadline, &avoid).await?;
            let (returned, queued) =
                queue(&link, self.actor, incarnation, message, false, wait_for_room, deadline).await;
            match queued {
                Ok(_) => return Ok(()),
                // Refused before it was sent (the instance is stopping, or
                // the connection closed): another instance takes it.
                Err(error) if never_sent(&error) && Instant::now() < deadline => {
                    avoid.push((link.peer.path.clone(), incarnation));
                    message = returned;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn deadline(&self, node: &Node) -> Instant {
        deadline_after(self.timeout.unwrap_or(node.config.call_timeout))
    }

    /// The connection to send on right now, when the name is known and the
    /// connection is up (the common case: no waiting, no allocation).
    fn route_now(&self, node: &Node) -> Route {
        let state = node.directory.state();
        if let Some((link, incarnation)) = node.sole_link(state, self.actor, self.pick) {
            return Route::Ready(link, incarnation);
        }
        match node.directory.pick_noting_sole(self.actor, self.pick) {
            None => Route::Resolve,
            Some((member, sole)) => match node.open_link_to(&member) {
                Some(link) => {
                    // Every pick gives this instance until the directory
                    // changes: the next call skips the lookup.
                    if sole {
                        node.remember_sole(state, self.actor, self.pick, &link, member.incarnation);
                    }
                    Route::Ready(link, member.incarnation)
                }
                None => Route::Connect(member),
            },
        }
    }

    /// Finishes what [`route_now`](Self::route_now) could not: waits for the
    /// name to be registered and connects, by the deadline. Instances in
    /// `avoid` (path and incarnation) refused this message already.
    async fn route(
        &self,
        node: &Arc<Node>,
        mut route: Route,
        deadline: Instant,
        avoid: &[(String, u64)],
    ) -> Result<(Arc<Link>, u64), SendError> {
        let started = Instant::now();
        let resolve_by = deadline.min(deadline_after(
            self.resolve_timeout.unwrap_or(node.config.resolve_timeout),
        ));
        let avoided = |path: &str, incarnation: u64| avoid.iter().any(|(p, inc)| p == path && *inc == incarnation);
        loop {
            let member = match route {
                Route::Ready(link, incarnation) if !avoided(&link.peer.path, incarnation) => {
                    return Ok((link, incarnation))
                }
                Route::Ready(..) => {
                    route = Route::Resolve;
                    continue;
                }
                Route::Connect(member) => member,
                Route::Resolve => {
                    if crate::node::directory::declared_forks(self.actor).is_none()
                        && crate::node::directory::declared_any()
                    {
                        return Err(SendError::NotDeclared { actor: self.actor });
                    }
                    let accept = |m: &Member| !avoided(&m.path, m.incarnation);
                    let wait = node.directory.wait_pick(self.actor, self.pick, accept);
                    tokio::time::timeout_at(resolve_by.into(), wait)
                        .await
                        .map_err(|_| SendError::NotRegistered {
                            actor: self.actor,
                            fork: match self.pick {
                                Pick::Fork(number) => Some(number),
                                Pick::Any => None,
                            },
                            waited: started.elapsed(),
                        })?
                }
            };
            if avoided(&member.path, member.incarnation) {
                route = Route::Resolve;
                continue;
            }
            let connect = tokio::time::timeout_at(deadline.into(), node.link_to(&member));
            match connect.await {
                Ok(Ok(link)) => return Ok((link, member.incarnation)),
                Err(_) => return Err(timed_out(self.actor, "(connecting)", started)),
                // The process is gone (the directory has not caught up yet):
                // nothing was sent, so look for another instance.
                Ok(Err(reason)) if Instant::now() < deadline => {
                    tracing::debug!(actor = self.actor, path = %member.path, %reason, "connecting failed; trying again");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    route = Route::Resolve;
                    if let Some(next) = node.directory.pick_where(self.actor, self.pick, |m| {
                        !(m.path == member.path && m.incarnation == member.incarnation)
                    }) {
                        route = match node.open_link(&next) {
                            Some(link) => Route::Ready(link, next.incarnation),
                            None => Route::Connect(next),
                        };
                    }
                }
                Ok(Err(reason)) => {
                    return Err(SendError::Disconnected {
                        actor: self.actor,
                        path: member.path.to_string(),
                        reason,
                    })
                }
            }
        }
    }
}

/// Where a send stands after looking at the local directory.
enum Route {
    Ready(Arc<Link>, u64),
    Connect(Arc<Member>),
    Resolve,
}

/// A pending [`RemoteAddr::send`]: a future of the handler's result.
///
/// The request is queued when it is first polled (so requests polled in
/// turn are sent in turn); set its deadline first with
/// [`timeout`](Self::timeout). From a thread with no async runtime, use
/// [`blocking`](Self::blocking).
#[must_use = "a request does nothing until awaited"]
pub struct SendRequest<M: Message> {
    state: SendState<M>,
}

enum SendState<M: Message> {
    Ready {
        target: Target,
        message: M,
        wait_for_room: bool,
    },
    /// Queued at once on an open connection: waits for the reply right
    /// here (the common case, with nothing boxed).
    Sent(Sent<M>),
    /// Anything else (resolving, connecting, waiting for room, sending
    /// again elsewhere), as one boxed future.
    Running(BoxFuture<'static, Result<M::Result, SendError>>),
    Done,
}

/// A request queued on a connection, waiting for its reply.
struct Sent<M> {
    target: Target,
    /// Kept to send it again to another instance, when that is safe.
    message: M,
    request: Outstanding,
    incarnation: u64,
    started: Instant,
    deadline: Instant,
    /// Made when the reply did not come at the first poll.
    timer: Option<Deadline>,
}

/// A queued request; dropping it before its reply was taken cancels it.
struct Outstanding {
    link: Arc<Link>,
    id: u64,
    /// The reply (or its failure) was taken: nothing to cancel.
    ended: bool,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if !self.ended {
            self.link.cancel(self.id);
        }
    }
}

// The message is only ever moved out, never pinned in place.
impl<M: Message> Unpin for SendRequest<M> {}

impl<M: Message> std::fmt::Debug for SendRequest<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            SendState::Ready { .. } => "ready",
            SendState::Sent(_) => "waiting for the reply",
            SendState::Running(_) => "running",
            SendState::Done => "done",
        };
        f.debug_struct("SendRequest")
            .field("message", &std::any::type_name::<M>())
            .field("state", &state)
            .finish()
    }
}

impl<M> SendRequest<M>
where
    M: RemoteMessage,
    M::Result: DeserializeOwned + Send,
{
    pub(super) fn new(target: Target, message: M, wait_for_room: bool) -> Self {
        SendRequest {
            state: SendState::Ready {
                target,
                message,
                wait_for_room,
            },
        }
    }

    /// A call started at `now`, not waiting for its reply yet: queued at
    /// once when the connection is up and has room, as at a first poll.
    /// Its deadline counts from `now`.
    pub(super) fn started(target: Target, message: M, now: Instant) -> Self {
        SendRequest {
            state: start_send(target, message, true, now),
        }
    }

    /// Starts the call at `now` (see [`started`](Self::started)).
    fn start_at(&mut self, now: Instant) {
        if let SendState::Ready { .. } = self.state {
            let SendState::Ready {
                target,
                message,
                wait_for_room,
            } = std::mem::replace(&mut self.state, SendState::Done)
            else {
                unreachable!("matched just above")
            };
            self.state = start_send(target, message, wait_for_room, now);
        }
    }

    /// Whether the request is on a connection, waiting only for its reply
    /// (rather than for a name, a connection or room).
    pub(super) fn queued(&self) -> bool {
        matches!(self.state, SendState::Sent(_))
    }

    /// Sets this call's deadline, counted from when it starts (see
    /// [`RemoteAddr::timeout`]). Has no effect once the request is polled.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        if let SendState::Ready { target, .. } = &mut self.state {
            target.timeout = Some(timeout);
        }
        self
    }

    /// Sends the request and blocks this thread until it ends: for code on a
    /// plain thread, outside any async runtime. The call itself runs on the
    /// cluster's own runtime thread. Never call it from async code (it would
    /// block that runtime's thread).
    pub fn blocking(self) -> Result<M::Result, SendError>
    where
        M::Result: 'static,
    {
        let Some(node) = node::current() else {
            return Err(SendError::NotInCluster);
        };
        let (done, result) = std::sync::mpsc::sync_channel(1);
        node.spawn_on_runtime(Box::pin(async move {
            let _ = done.send(self.await);
        }));
        result.recv().unwrap_or_else(|_| {
            Err(SendError::Disconnected {
                actor: "(unknown)",
                path: node.identity.path.clone(),
                reason: "the cluster's runtime stopped before the call ended".to_owned(),
            })
        })
    }
}

impl<M> std::future::Future for SendRequest<M>
where
    M: RemoteMessage,
    M::Result: DeserializeOwned + Send,
{
    type Output = Result<M::Result, SendError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        if let SendState::Ready { .. } = this.state {
            this.start_at(Instant::now());
        }
        if let SendState::Sent(sent) = &mut this.state {
            let request = &mut sent.request;
            let outcome = match request.link.poll_reply(request.id, cx) {
                std::task::Poll::Ready(outcome) => {
                    request.ended = true;
                    crate::node::rpc::outcome_to_result(&request.link, sent.target.actor, M::TAG, outcome)
                }
                std::task::Poll::Pending => {
                    let deadline = sent.deadline;
                    let timer = sent.timer.get_or_insert_with(|| Deadline::new(deadline));
                    std::task::ready!(timer.poll_expired(cx));
                    Err(timed_out(sent.target.actor, M::TAG, sent.started))
                }
            };
            let retry = match &outcome {
                Err(error) if Instant::now() < sent.deadline && retry_elsewhere::<M>(error) => {
                    tracing::debug!(actor = sent.target.actor, tag = M::TAG, path = %sent.request.link.peer.path, %error, "sending again to another instance");
                    true
                }
                _ => false,
            };
            if !retry {
                let (actor, started) = (sent.target.actor, sent.started);
                // Dropped where it is: a call's state is large to move.
                this.state = SendState::Done;
                let outcome = outcome.and_then(|reply| decode_reply(M::TAG, &reply));
                log_outcome(actor, M::TAG, started, &outcome);
                return std::task::Poll::Ready(outcome);
            }
            let SendState::Sent(sent) = std::mem::replace(&mut this.state, SendState::Done) else {
                unreachable!("matched just above")
            };
            let avoid = vec![(sent.request.link.peer.path.clone(), sent.incarnation)];
            let Sent {
                target,
                message,
                started,
                deadline,
                ..
            } = sent;
            let Some(node) = node::current() else {
                return std::task::Poll::Ready(Err(SendError::NotInCluster));
            };
            let slow = Slow {
                node,
                target,
                message,
                wait_for_room: true,
                first: None,
                route: None,
                avoid,
                started,
                deadline,
            };
            this.state = SendState::Running(Box::pin(slow.run()));
        }
        match &mut this.state {
            SendState::Running(call) => {
                let outcome = std::task::ready!(call.as_mut().poll(cx));
                this.state = SendState::Done;
                std::task::Poll::Ready(outcome)
            }
            _ => panic!("a SendRequest polled after it completed"),
        }
    }
}

/// A type-erased remote address for messages of type `M`, whichever actor
/// answers them (see [`RemoteAddr::recipient`]).
pub struct RemoteRecipient<M> {
    target: Target,
    message: PhantomData<fn(M)>,
}

impl<M> Clone for RemoteRecipient<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for RemoteRecipient<M> {}

impl<M> std::fmt::Debug for RemoteRecipient<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteRecipient")
            .field("actor", &self.target.actor)
            .field("message", &std::any::type_name::<M>())
            .finish()
    }
}

impl<M> RemoteRecipient<M>
where
    M: RemoteMessage,
    M::Result: DeserializeOwned + Send,
{
    /// The name of the actor it reaches.
    pub fn actor(&self) -> &'static str {
        self.target.actor
    }

    /// Sets the deadline of each call (see [`RemoteAddr::timeout`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.target.timeout = Some(timeout);
        self
    }

    /// Sends `message` and waits for the result (see [`RemoteAddr::send`]).
    pub fn send(&self, message: M) -> SendRequest<M> {
        SendRequest::new(self.target, message, true)
    }

    /// Like [`send`](Self::send), failing with [`SendError::Full`] instead of
    /// waiting for room.
    pub fn try_send(&self, message: M) -> SendRequest<M> {
        SendRequest::new(self.target, message, false)
    }

    /// Sends each of `messages`, up to `window` waiting at once, and yields
    /// their results in order (see [`RemoteAddr::send_all`]).
    pub fn send_all<T>(&self, messages: T, window: usize) -> SendAll<M, T::IntoIter>
    where
        T: IntoIterator<Item = M>,
    {
        SendAll::new(self.target, messages.into_iter(), window)
    }

    /// Sends `message` without waiting for a result (see [`RemoteAddr::do_send`]).
    pub async fn do_send(&self, message: M) -> Result<(), SendError> {
        self.target.one_way(message, true).await
    }

    /// Like [`do_send`](Self::do_send), failing with [`SendError::Full`]
    /// instead of waiting for room.
    pub async fn try_do_send(&self, message: M) -> Result<(), SendError> {
        self.target.one_way(message, false).await
    }
}

/// Starts a call: queued at once when the connection is up and has room
/// (so calls started in turn are sent in turn), then waits for its reply,
/// sending it again to another instance when that is safe.
fn start_send<M>(target: Target, message: M, wait_for_room: bool, started: Instant) -> SendState<M>
where
    M: RemoteMessage,
    M::Result: DeserializeOwned + Send,
{
    let Some(node) = node::current() else {
        return SendState::Running(Box::pin(std::future::ready(Err(SendError::NotInCluster))));
    };
    let deadline = deadline_from(started, target.timeout.unwrap_or(node.config.call_timeout));
    node.stats.sent();
    // Aimed at another host's instances: only NATS reaches them.
    #[cfg(feature = "nats")]
    let named_elsewhere = target
        .node
        .and_then(|named| crate::nats::mesh().filter(|mesh| named != mesh.node_name));
    #[cfg(feature = "nats")]
    let route = match named_elsewhere {
        Some(_) => Route::Resolve,
        None => target.route_now(&node),
    };
    #[cfg(not(feature = "nats"))]
    let route = target.route_now(&node);
    // No instance on this host (the NATS layer is looked up only then):
    // another host may have one.
    #[cfg(feature = "nats")]
    if let Some(mesh) = named_elsewhere.or_else(|| matches!(route, Route::Resolve).then(crate::nats::mesh).flatten()) {
        return SendState::Running(Box::pin(across_hosts::<M>(
            node,
            mesh,
            target,
            message,
            wait_for_room,
            started,
            deadline,
        )));
    }
    // Queued now when there is room, so that the order of sends is the
    // order of the calls; otherwise once the name resolves and there is room.
    let (first, route) = match route {
        Route::Ready(link, incarnation) => match try_queue::<M>(&link, target.actor, incarnation, &message, true) {
            Ok(Some(waiter)) => {
                let id = waiter.expect("a reply was asked for");
                return SendState::Sent(Sent {
                    target,
                    message,
                    request: Outstanding { link, id, ended: false },
                    incarnation,
                    started,
                    deadline,
                    timer: None,
                });
            }
            Ok(None) => (None, Some(Route::Ready(link, incarnation))),
            Err(error) => (Some((link, incarnation, Err(error))), None),
        },
        // Kept for the first attempt: picking again would skip an
        // instance of the round robin.
        pending => (None, Some(pending)),
    };
    let slow = Slow {
        node,
        target,
        message,
        wait_for_room,
        first,
        route,
        avoid: Vec::new(),
        started,
        deadline,
    };
    SendState::Running(Box::pin(slow.run()))
}

/// A connection, the incarnation it reaches, and how queueing on it went.
type Attempt = (Arc<Link>, u64, Result<Option<ReplyWaiter>, SendError>);

/// The slow path of a call: everything but "queued at once, answered".
struct Slow<M> {
    node: Arc<Node>,
    target: Target,
    message: M,
    wait_for_room: bool,
    /// A first attempt already made on a ready connection.
    first: Option<Attempt>,
    route: Option<Route>,
    /// Instances (path and incarnation) that refused this message already.
    avoid: Vec<(String, u64)>,
    started: Instant,
    deadline: Instant,
}

impl<M> Slow<M>
where
    M: RemoteMessage,
    M::Result: DeserializeOwned + Send,
{
    async fn run(self) -> Result<M::Result, SendError> {
        let Slow {
            node,
            target,
            mut message,
            wait_for_room,
            mut first,
            mut route,
            mut avoid,
            started,
            deadline,
        } = self;
        let outcome = loop {
            let (link, incarnation, queued) = match first.take() {
                Some(first) => first,
                None => {
                    let next = route.take().unwrap_or_else(|| target.route_now(&node));
                    let (link, incarnation) = target.route(&node, next, deadline, &avoid).await?;
                    let (returned, queued) =
                        queue(&link, target.actor, incarnation, message, true, wait_for_room, deadline).await;
                    message = returned;
                    (link, incarnation, queued)
                }
            };
            let queued = queued.map(|waiter| waiter.expect("a reply was asked for"));
            let outcome = match queued {
                Ok(waiter) => wait(&link, waiter, target.actor, M::TAG, deadline, started).await,
                // Not sent at all: safe to send anywhere else.
                Err(error) if never_sent(&error) => {
                    if Instant::now() < deadline {
                        avoid.push((link.peer.path.clone(), incarnation));
                        continue;
                    }
                    Err(error)
                }
                Err(error) => Err(error),
            };
            match outcome {
                Ok(reply) => break decode_reply(M::TAG, &reply),
                Err(error) if Instant::now() < deadline && retry_elsewhere::<M>(&error) => {
                    tracing::debug!(actor = target.actor, tag = M::TAG, path = %link.peer.path, %error, "sending again to another instance");
                    avoid.push((link.peer.path.clone(), incarnation));
                }
                Err(error) => break Err(error),
            }
        };
        log_outcome(target.actor, M::TAG, started, &outcome);
        outcome
    }
}

/// Logs how a call ended, when calls are logged (it costs a clock read).
fn log_outcome<T>(actor: &'static str, tag: &'static str, started: Instant, outcome: &Result<T, SendError>) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        let latency = started.elapsed();
        let caller = node::current()
            .map(|node| node.identity.path.clone())
            .unwrap_or_default();
        match outcome {
            Ok(_) => tracing::debug!(%caller, actor, tag, ?latency, "request answered"),
            Err(error) => tracing::debug!(%caller, actor, tag, ?latency, %error, "request failed"),
        }
    }
}

/// Whether a message failed before it was written to its connection (the
/// instance refused new requests as it stops, or the connection closed
/// first): it can go to any other instance, whatever the message.
fn never_sent(error: &SendError) -> bool {
    matches!(error, SendError::Rejected { .. } | SendError::Disconnected { .. })
}

/// Whether a failed call may be sent again to another instance: when it
/// provably reached no handler, or when the message says it is safe to
/// handle twice.
fn retry_elsewhere<M: RemoteMessage>(error: &SendError) -> bool {
    match error {
        SendError::Disconnected { .. } | SendError::Stopped { .. } => M::IDEMPOTENT,
        SendError::UnknownActor { .. } | SendError::MailboxClosed { .. } => true,
        SendError::Rejected { .. } => true,
        _ => false,
    }
}

/// Encodes `message` and queues it if the connection has room now.
/// `Ok(None)`: no room (nothing was encoded; the caller waits for room).
///
/// The message's size is measured first, without encoding it (a pass that
/// only counts bytes): an oversized message is refused before anything is
/// encoded, and room is taken for the exact size, so a message is encoded
/// once, when it is queued, however long it waited.
#[allow(clippy::type_complexity)]
fn try_queue<M: RemoteMessage>(
    link: &Link,
    actor: &'static str,
    incarnation: u64,
    message: &M,
    reply: bool,
) -> Result<Option<Option<ReplyWaiter>>, SendError> {
    // Most messages are small: encoded once, into this thread's buffer,
    // and measured by that.
    let small = with_small_payload(message, link.max_frame, |payload| {
        let admission = match link.try_admit(frame_size(actor, M::TAG, payload.len())) {
            Ok(admission) => admission,
            Err(LinkError::Full) => return Ok(None),
            Err(error) => return Err(link_error(link, actor, M::TAG, error)),
        };
        link.request(actor, M::TAG, incarnation, payload, reply, Some(admission))
            .map(Some)
            .map_err(|error| link_error(link, actor, M::TAG, error))
    });
    if let Some(queued) = small {
        return queued;
    }
    let size = payload_size(message, link.max_frame)?;
    let admission = match link.try_admit(frame_size(actor, M::TAG, size)) {
        Ok(admission) => admission,
        Err(LinkError::Full) => return Ok(None),
        Err(error) => return Err(link_error(link, actor, M::TAG, error)),
    };
    with_payload(message, size, link.max_frame, |payload| {
        link.request_payload(actor, M::TAG, incarnation, payload?, reply, Some(admission))
            .map(Some)
            .map_err(|error| link_error(link, actor, M::TAG, error))
    })
}

/// Encodes `message` and queues it, waiting for room up to `deadline`
/// (or failing with [`SendError::Full`] when told not to wait). Takes the
/// message and gives it back, for a caller that may send it again.
///
/// A caller that has to wait holds only its message, not an encoding of
/// it (a crowd of callers waiting on a slow receiver costs what their
/// messages cost), and encodes it once it has room.
async fn queue<M: RemoteMessage>(
    link: &Link,
    actor: &'static str,
    incarnation: u64,
    message: M,
    reply: bool,
    wait_for_room: bool,
    deadline: Instant,
) -> (M, Result<Option<ReplyWaiter>, SendError>) {
    match try_queue(link, actor, incarnation, &message, reply) {
        Ok(Some(queued)) => return (message, Ok(queued)),
        Ok(None) if wait_for_room => {}
        Ok(None) => {
            let full = SendError::Full {
                actor,
                path: link.peer.path.clone(),
            };
            return (message, Err(full));
        }
        Err(error) => return (message, Err(error)),
    }
    let started = Instant::now();
    // Measured again (it only counts): the message may be another one's
    // after a retry, and this keeps no encoding while waiting.
    let size = match payload_size(&message, link.max_frame) {
        Ok(size) => size,
        Err(error) => return (message, Err(error)),
    };
    let admission = match tokio::time::timeout_at(deadline.into(), link.admit(frame_size(actor, M::TAG, size))).await {
        Err(_) => return (message, Err(timed_out(actor, M::TAG, started))),
        Ok(Err(error)) => return (message, Err(link_error(link, actor, M::TAG, error))),
        Ok(Ok(admission)) => admission,
    };
    let outcome = with_payload(&message, size, link.max_frame, |payload| {
        link.request_payload(actor, M::TAG, incarnation, payload?, reply, Some(admission))
            .map_err(|error| link_error(link, actor, M::TAG, error))
    });
    (message, outcome)
}

/// The size of `message`'s encoding, measured without making it:
/// [`SendError::TooLarge`] past `limit`, before a byte is encoded.
fn payload_size<M: RemoteMessage>(message: &M, limit: usize) -> Result<usize, SendError> {
    let mut counter = Counter { len: 0, limit };
    match rmp_serde::encode::write(&mut counter, message) {
        Ok(()) => Ok(counter.len),
        Err(_) if counter.len > limit => Err(SendError::TooLarge {
            tag: M::TAG,
            size: counter.len,
            max: limit,
        }),
        Err(e) => Err(SendError::Encode {
            tag: M::TAG,
            detail: e.to_string(),
        }),
    }
}

/// Encodes `message` (at most `limit` bytes) into this thread's payload
/// buffer and hands it to `f`: no allocation per message once the buffer
/// has grown. A large message (`size`, as [`payload_size`] measured it) is
/// encoded into a buffer of its own, of exactly its size, and handed over
/// as it is: the connection writes it from there, and its memory goes back
/// once it is written.
fn with_payload<M: RemoteMessage, T>(
    message: &M,
    size: usize,
    limit: usize,
    f: impl FnOnce(Result<Outgoing<'_>, SendError>) -> T,
) -> T {
    PAYLOAD.with(|buffer| {
        let mut fresh;
        let mut borrowed = buffer.try_borrow_mut();
        let payload = match borrowed.as_deref_mut() {
            Ok(buffer) if size < LARGE_PAYLOAD => buffer,
            _ => {
                fresh = crate::node::connection::large_buffer(size.min(limit));
                &mut fresh
            }
        };
        payload.clear();
        let mut capped = Capped {
            out: payload,
            limit,
            overflowed: false,
        };
        let encoded = rmp_serde::encode::write(&mut capped, message);
        let overflowed = capped.overflowed;
        let result = match encoded {
            Ok(()) if payload.len() >= LARGE_PAYLOAD => f(Ok(Outgoing::Shared(std::mem::take(payload).into()))),
            Ok(()) => f(Ok(Outgoing::Borrowed(payload))),
            // The size is at least what was written when the limit was hit.
            Err(_) if overflowed => f(Err(SendError::TooLarge {
                tag: M::TAG,
                size: payload.len() + 1,
                max: limit,
            })),
            Err(e) => f(Err(SendError::Encode {
                tag: M::TAG,
                detail: e.to_string(),
            })),
        };
        crate::node::connection::shrink(payload);
        result
    })
}

thread_local! {
    /// Where this thread encodes the messages it sends (one at a time).
    static PAYLOAD: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(256));
}

/// Runs `f` on `message` encoded into this thread's buffer when it is
/// small (under [`LARGE_PAYLOAD`] and `limit`); `None`, without calling
/// `f`, when it is not (a large one is measured first, then encoded into a
/// buffer of its own: see [`with_payload`]).
fn with_small_payload<M: RemoteMessage, T>(
    message: &M,
    limit: usize,
    f: impl FnOnce(&[u8]) -> Result<T, SendError>,
) -> Option<Result<T, SendError>> {
    PAYLOAD.with(|buffer| {
        let mut buffer = buffer.try_borrow_mut().ok()?;
        buffer.clear();
        let mut capped = Capped {
            out: &mut buffer,
            limit: limit.min(LARGE_PAYLOAD - 1),
            overflowed: false,
        };
        let encoded = rmp_serde::encode::write(&mut capped, message);
        if capped.overflowed {
            return None;
        }
        Some(match encoded {
            Ok(()) => f(&buffer),
            Err(e) => Err(SendError::Encode {
                tag: M::TAG,
                detail: e.to_string(),
            }),
        })
    })
}

/// Decodes a reply; bytes in it may be slices of the received frame.
fn decode_reply<T: DeserializeOwned>(tag: &'static str, reply: &Payload) -> Result<T, SendError> {
    reply
        .decode(|bytes| rmp_serde::from_slice(bytes))
        .map_err(|e| SendError::ReplyDecode {
            tag,
            detail: e.to_string(),
        })
}

/// `message` encoded on its own, for a transport that takes its bytes.
#[cfg(feature = "nats")]
fn encoded<M: RemoteMessage>(message: &M, limit: usize) -> Result<Vec<u8>, SendError> {
    let size = payload_size(message, limit)?;
    with_payload(message, size, limit, |payload| payload.map(|p| p.as_slice().to_vec()))
}

/// A send with no instance on this host (or aimed at another host's): waits
/// for an instance here (then sends locally, as usual) or on another host
/// (then through NATS), and sends again elsewhere when that is safe.
#[cfg(feature = "nats")]
async fn across_hosts<M>(
    node: Arc<Node>,
    mesh: Arc<crate::nats::Mesh>,
    target: Target,
    message: M,
    wait_for_room: bool,
    started: Instant,
    deadline: Instant,
) -> Result<M::Result, SendError>
where
    M: RemoteMessage,
    M::Result: DeserializeOwned + Send,
{
    let payload = encoded(&message, node.config.max_frame_length)?;
    let resolve_by = deadline.min(deadline_after(
        target.resolve_timeout.unwrap_or(node.config.resolve_timeout),
    ));
    let mut avoid: Vec<(String, u64)> = Vec::new();
    loop {
        let resolved =
            crate::nats::resolve(&node, &mesh, target.actor, target.pick, target.node, &avoid, resolve_by).await;
        let to = match resolved {
            Some(crate::nats::Resolved::Remote(to)) => to,
            Some(crate::nats::Resolved::Local) => {
                let mut local = target;
                local.timeout = Some(deadline.saturating_duration_since(Instant::now()));
                local.node = None;
                return SendRequest::new(local, message, wait_for_room).await;
            }
            None => {
                return Err(SendError::NotRegistered {
                    actor: target.actor,
                    fork: match target.pick {
                        Pick::Fork(number) => Some(number),
                        Pick::Any => None,
                    },
                    waited: started.elapsed(),
                })
            }
        };
        let outcome = crate::nats::call(&mesh, &to, target.actor, M::TAG, &payload, true, deadline, started).await;
        match outcome {
            Ok(reply) => return decode_reply(M::TAG, &Payload::Shared(reply.unwrap_or_default())),
            Err(error) if Instant::now() < deadline && retry_elsewhere::<M>(&error) => {
                tracing::debug!(actor = target.actor, tag = M::TAG, path = %to.place(), %error, "sending again to another instance");
                avoid.push((to.path.clone(), to.incarnation));
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(feature = "nats")]
impl Target {
    /// [`one_way`](Self::one_way) with no instance on this host.
    async fn one_way_across_hosts<M: RemoteMessage>(
        &self,
        node: Arc<Node>,
        mesh: Arc<crate::nats::Mesh>,
        message: M,
        wait_for_room: bool,
    ) -> Result<(), SendError> {
        let started = Instant::now();
        let deadline = self.deadline(&node);
        let resolve_by = deadline.min(deadline_after(
            self.resolve_timeout.unwrap_or(node.config.resolve_timeout),
        ));
        let resolved = crate::nats::resolve(&node, &mesh, self.actor, self.pick, self.node, &[], resolve_by).await;
        let to = match resolved {
            Some(crate::nats::Resolved::Remote(to)) => to,
            Some(crate::nats::Resolved::Local) => {
                let mut local = *self;
                local.node = None;
                local.timeout = Some(deadline.saturating_duration_since(Instant::now()));
                return Box::pin(local.one_way(message, wait_for_room)).await;
            }
            None => {
                return Err(SendError::NotRegistered {
                    actor: self.actor,
                    fork: match self.pick {
                        Pick::Fork(number) => Some(number),
                        Pick::Any => None,
                    },
                    waited: started.elapsed(),
                })
            }
        };
        let payload = encoded(&message, node.config.max_frame_length)?;
        crate::nats::call(&mesh, &to, self.actor, M::TAG, &payload, false, deadline, started)
            .await
            .map(drop)
    }
}
