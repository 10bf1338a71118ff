//! Typed addresses of remote actors.

use std::future::IntoFuture;
use std::marker::PhantomData;
use std::time::Duration;

use actix::Handler;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::connection::{Link, LinkError, ReplyWaiter};
use crate::directory::Pick;
use crate::node;
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

    /// Sends `message` without waiting for a result. Returns once the message
    /// is queued on the connection; messages from one process to one actor
    /// are delivered in the order sent, `send` and `do_send` alike.
    pub async fn do_send<M>(&self, message: M) -> Result<(), SendError>
    where
        A: Handler<M>,
        M: RemoteMessage,
    {
        let payload = encode(M::TAG, &message)?;
        let (link, incarnation) = self.route().await?;
        queue(&link, A::NAME, M::TAG, incarnation, &payload, false).map(drop)
    }

    /// Resolves the name and finds the connection to the chosen instance.
    async fn route(&self) -> Result<(std::sync::Arc<Link>, u64), SendError> {
        let node = node::current().ok_or(SendError::NotInCluster)?;
        let waited = self.resolve_timeout.unwrap_or(node.config.resolve_timeout);
        let member = node
            .directory
            .resolve(A::NAME, self.pick, waited)
            .await
            .ok_or(SendError::NotRegistered {
                actor: A::NAME,
                fork: match self.pick {
                    Pick::Fork(number) => Some(number),
                    Pick::Any => None,
                },
                waited,
            })?;
        let link = node.link_to(&member).await.map_err(|reason| SendError::Disconnected {
            actor: A::NAME,
            path: member.path.clone(),
            reason,
        })?;
        Ok((link, member.incarnation))
    }
}

/// A pending [`RemoteAddr::send`]; await it for the result.
#[must_use = "a request does nothing until awaited"]
pub struct SendRequest<A, M> {
    addr: RemoteAddr<A>,
    message: M,
}

impl<A, M> SendRequest<A, M> {
    /// Sets how long this call waits for its reply.
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
        // Encoded here, so the future holds bytes rather than the message.
        let payload = encode(M::TAG, &self.message);
        let addr = self.addr;
        Box::pin(async move {
            let payload = payload?;
            let (link, incarnation) = addr.route().await?;
            let timeout = match addr.timeout {
                Some(timeout) => timeout,
                None => node::current().ok_or(SendError::NotInCluster)?.config.call_timeout,
            };
            let reply = call(&link, A::NAME, M::TAG, incarnation, &payload, timeout).await?;
            decode(M::TAG, &reply)
        })
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

type Waiter = Option<ReplyWaiter>;

fn queue(
    link: &Link,
    actor: &'static str,
    tag: &'static str,
    incarnation: u64,
    payload: &[u8],
    reply: bool,
) -> Result<Waiter, SendError> {
    link.request(actor, tag, incarnation, payload, reply)
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
    let (id, reply) = queue(link, actor, tag, incarnation, payload, true)?.expect("a reply was asked for");
    let _cancel = Cancel { link, id };
    match tokio::time::timeout(timeout, reply).await {
        Err(_) => Err(SendError::Timeout {
            actor,
            tag,
            after: timeout,
        }),
        Ok(Err(_)) => Err(SendError::Disconnected {
            actor,
            path: link.peer.path.clone(),
            reason: "the connection closed before the reply arrived".to_owned(),
        }),
        Ok(Ok(Err(error))) => Err(SendError::from_wire(actor, tag, error)),
        Ok(Ok(Ok(bytes))) => Ok(bytes),
    }
}
