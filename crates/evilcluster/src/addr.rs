//! Typed addresses of remote actors.

use std::future::IntoFuture;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Handler;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::connection::{Failure, Link, LinkError, ReplyWaiter};
use crate::directory::{Member, Pick};
use crate::node::{self, Node};
use crate::remote::{RemoteActor, RemoteMessage};
use crate::SendError;

/// The address of a remote actor, by name: whichever live process hosts it.
///
/// Cheap to create and to clone; it resolves on every send through this
/// process's local directory, so it follows restarts. For a worker with
/// forks, each send goes to the next live fork in turn.
pub struct RemoteAddr<A> {
    pick: Pick,
    timeout: Option<Duration>,
    resolve_timeout: Option<Duration>,
    actor: PhantomData<fn() -> A>,
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
            .field("pick", &self.pick)
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
/// # impl RemoteActor for Datastore { const NAME: &'static str = "datastore"; fn routes(r: &mut Routes<Self>) { r.handle::<Get>(); } }
/// # async fn demo() -> Result<(), SendError> {
/// let value: Option<String> = evilcluster::addr_of::<Datastore>().send(Get("k".into())).await?;
/// # Ok(()) }
/// ```
pub fn addr_of<A: RemoteActor>() -> RemoteAddr<A> {
    RemoteAddr {
        pick: Pick::Any,
        timeout: None,
        resolve_timeout: None,
        actor: PhantomData,
    }
}

/// The address of fork `number` (1-based) of actor `A`'s worker.
pub fn addr_of_fork<A: RemoteActor>(number: u32) -> RemoteAddr<A> {
    RemoteAddr {
        pick: Pick::Fork(number),
        ..addr_of::<A>()
    }
}

impl<A: RemoteActor> RemoteAddr<A> {
    /// Sets how long each call through this address waits for its reply
    /// (default: the cluster's call timeout, 5 s unless configured).
    /// Deadlines are kept by the connection with a 5 ms tick, so a timeout
    /// fires up to 10 ms late, never early.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets how long a send waits for the name to be registered before it
    /// fails with [`SendError::NotRegistered`] (default: the cluster's
    /// resolve timeout, 10 s unless configured).
    pub fn resolve_timeout(mut self, timeout: Duration) -> Self {
        self.resolve_timeout = Some(timeout);
        self
    }

    /// Sends `message` and waits for the handler's result.
    ///
    /// Await the returned request, optionally after setting its own
    /// [`timeout`](SendRequest::timeout). Delivery is at most once: after
    /// [`SendError::Disconnected`] or [`SendError::Timeout`] the handler may
    /// or may not have run.
    pub fn send<M>(&self, message: M) -> SendRequest<A, M>
    where
        A: Handler<M>,
        M: RemoteMessage,
        M::Result: DeserializeOwned + Send,
    {
        SendRequest { addr: *self, message }
    }

    /// Sends `message` to every instance of the actor — each fork of its
    /// worker, or its one process — at once, and collects each one's result:
    /// `(Some(fork), result)` per fork, or `(None, result)` for a worker
    /// without forks. An instance that is not running gives
    /// [`SendError::NotRegistered`] at once rather than being waited for.
    pub async fn broadcast<M>(&self, message: M) -> Vec<(Option<u32>, Result<M::Result, SendError>)>
    where
        A: Handler<M>,
        M: RemoteMessage + Clone,
        M::Result: DeserializeOwned + Send,
    {
        let now = Duration::ZERO;
        match crate::events::declared_forks(A::NAME) {
            Some(forks) if forks > 0 => {
                let sends = (1..=forks).map(|fork| {
                    let addr = RemoteAddr {
                        pick: Pick::Fork(fork),
                        ..*self
                    }
                    .resolve_timeout(now);
                    let request = addr.send(message.clone());
                    async move { (Some(fork), request.await) }
                });
                futures_util::future::join_all(sends).await
            }
            _ => vec![(None, self.resolve_timeout(now).send(message).await)],
        }
    }

    /// Sends `message` without waiting for a result. Returns once the message
    /// is queued on the connection; messages from one process to one actor
    /// are delivered in the order sent, `send` and `do_send` alike.
    pub async fn do_send<M>(&self, message: M) -> Result<(), SendError>
    where
        A: Handler<M>,
        M: RemoteMessage,
    {
        let node = node::current().ok_or(SendError::NotInCluster)?;
        node.stats.sent();
        let (link, incarnation) = match self.route_now(&node) {
            Route::Ready(link, incarnation) => (link, incarnation),
            pending => self.route(&node, pending).await?,
        };
        with_payload(&message, |payload| {
            queue(&link, A::NAME, M::TAG, incarnation, payload?, None).map(drop)
        })
    }

    /// The connection to send on right now, when the name is known and the
    /// connection is up (the common case: no waiting, no allocation).
    fn route_now(&self, node: &Node) -> Route {
        match node.directory.pick(A::NAME, self.pick) {
            None => Route::Resolve,
            Some(member) => match node.open_link(&member) {
                Some(link) => Route::Ready(link, member.incarnation),
                None => Route::Connect(member),
            },
        }
    }

    /// Finishes what [`route_now`](Self::route_now) could not: waits for the
    /// name to be registered and connects.
    async fn route(&self, node: &Arc<Node>, route: Route) -> Result<(Arc<Link>, u64), SendError> {
        let member = match route {
            Route::Ready(link, incarnation) => return Ok((link, incarnation)),
            Route::Connect(member) => member,
            Route::Resolve => {
                let waited = self.resolve_timeout.unwrap_or(node.config.resolve_timeout);
                node.directory
                    .resolve(A::NAME, self.pick, waited)
                    .await
                    .ok_or(SendError::NotRegistered {
                        actor: A::NAME,
                        fork: match self.pick {
                            Pick::Fork(number) => Some(number),
                            Pick::Any => None,
                        },
                        waited,
                    })?
            }
        };
        let link = node.link_to(&member).await.map_err(|reason| SendError::Disconnected {
            actor: A::NAME,
            path: member.path.clone(),
            reason,
        })?;
        Ok((link, member.incarnation))
    }
}

/// Where a send stands after looking at the local directory.
enum Route {
    Ready(Arc<Link>, u64),
    Connect(Arc<Member>),
    Resolve,
}

/// A pending [`RemoteAddr::send`]; await it for the result.
#[must_use = "a request does nothing until awaited"]
pub struct SendRequest<A, M> {
    addr: RemoteAddr<A>,
    message: M,
}

impl<A, M> SendRequest<A, M> {
    /// Sets how long this call waits for its reply (fires up to 10 ms late,
    /// never early).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.addr.timeout = Some(timeout);
        self
    }
}

impl<A, M> IntoFuture for SendRequest<A, M>
where
    A: RemoteActor + Handler<M>,
    M: RemoteMessage,
    M::Result: DeserializeOwned + Send,
{
    type Output = Result<M::Result, SendError>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        let SendRequest { addr, message } = self;
        let Some(node) = node::current() else {
            return Box::pin(std::future::ready(Err(SendError::NotInCluster)));
        };
        let timeout = addr.timeout.unwrap_or(node.config.call_timeout);
        node.stats.sent();
        let ask = move |link: Arc<Link>, incarnation: u64, message: &M| {
            let waiter = with_payload(message, |payload| {
                queue(&link, A::NAME, M::TAG, incarnation, payload?, Some(timeout))
            })?;
            Ok::<_, SendError>((link, waiter.expect("a reply was asked for")))
        };
        // Queued now when possible, so that the order of sends is the order
        // of the calls; otherwise once the name resolves.
        let queued = match addr.route_now(&node) {
            Route::Ready(link, incarnation) => Ok(ask(link, incarnation, &message)),
            pending => Err((pending, message)),
        };
        // Tracing each request costs a clock read: only when it is logged.
        let started = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
        Box::pin(async move {
            let outcome = async {
                let (link, waiter) = match queued {
                    Ok(queued) => queued?,
                    Err((pending, message)) => {
                        let (link, incarnation) = addr.route(&node, pending).await?;
                        ask(link, incarnation, &message)?
                    }
                };
                let reply = wait(&link, waiter, A::NAME, M::TAG, timeout).await?;
                decode(M::TAG, &reply)
            }
            .await;
            if let Some(started) = started {
                let latency = started.elapsed();
                let caller = &node.identity.path;
                match &outcome {
                    Ok(_) => tracing::debug!(%caller, actor = A::NAME, tag = M::TAG, ?latency, "request answered"),
                    Err(error) => {
                        tracing::debug!(%caller, actor = A::NAME, tag = M::TAG, ?latency, %error, "request failed")
                    }
                }
            }
            outcome
        })
    }
}

/// Encodes `message` into this thread's payload buffer and hands it to `f`:
/// no allocation per message once the buffer has grown.
fn with_payload<M: RemoteMessage, T>(message: &M, f: impl FnOnce(Result<&[u8], SendError>) -> T) -> T {
    thread_local! {
        static PAYLOAD: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(256));
    }
    PAYLOAD.with(|buffer| {
        let mut fresh = Vec::new();
        let mut borrowed = buffer.try_borrow_mut();
        let payload = match borrowed.as_deref_mut() {
            Ok(buffer) => buffer,
            Err(_) => &mut fresh,
        };
        payload.clear();
        match rmp_serde::encode::write(payload, message) {
            Ok(()) => f(Ok(payload)),
            Err(e) => f(Err(SendError::Encode {
                tag: M::TAG,
                detail: e.to_string(),
            })),
        }
    })
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

type Waiter = Option<ReplyWaiter>;

fn queue(
    link: &Link,
    actor: &'static str,
    tag: &'static str,
    incarnation: u64,
    payload: &[u8],
    reply_within: Option<Duration>,
) -> Result<Waiter, SendError> {
    link.request(actor, tag, incarnation, payload, reply_within)
        .map_err(|error| match error {
            LinkError::TooLarge { size } => SendError::TooLarge {
                tag,
                size,
                max: link.max_frame,
            },
            LinkError::Closed(reason) => SendError::Disconnected {
                actor,
                path: link.peer.path.clone(),
                reason,
            },
        })
}

/// Forgets a request if its caller stops waiting (timeout or drop).
struct Cancel<'a> {
    link: &'a Link,
    id: u64,
}

impl Drop for Cancel<'_> {
    fn drop(&mut self) {
        self.link.cancel(self.id);
    }
}

/// Sends one request on `link` and waits for its reply bytes.
pub(crate) async fn call(
    link: &Link,
    actor: &'static str,
    tag: &'static str,
    incarnation: u64,
    payload: &[u8],
    timeout: Duration,
) -> Result<Bytes, SendError> {
    let waiter = queue(link, actor, tag, incarnation, payload, Some(timeout))?.expect("a reply was asked for");
    wait(link, waiter, actor, tag, timeout).await
}

/// Waits for the reply to a queued request.
async fn wait(
    link: &Link,
    (id, reply): ReplyWaiter,
    actor: &'static str,
    tag: &'static str,
    timeout: Duration,
) -> Result<Bytes, SendError> {
    let _cancel = Cancel { link, id };
    // The connection's sweeper ends the wait at the deadline (see `Link`).
    match reply.await {
        Err(_) => Err(SendError::Disconnected {
            actor,
            path: link.peer.path.clone(),
            reason: "the connection closed before the reply arrived".to_owned(),
        }),
        Ok(Err(Failure::TimedOut)) => Err(SendError::Timeout {
            actor,
            tag,
            after: timeout,
        }),
        Ok(Err(Failure::Wire(error))) => Err(SendError::from_wire(actor, tag, error)),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}
