//! A control-protocol client: connects to a master, runs the handshake and
//! sends requests to its [`CONTROL`] service.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use evilcluster_wire::control::{Status, CONTROL, RESTART_TAG, STATUS_TAG, STOP_TAG};
use evilcluster_wire::handshake::{self, NONCE_LEN};
use evilcluster_wire::{Cookie, Frame, Identity, Request};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::discovery::Master;
use crate::error::{CliError, NotRunning};
use crate::transport;

/// How long each step (connect, handshake, each reply) may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// MessagePack nil: the payload of every control request.
const NIL: &[u8] = &[0xc0];

/// An open, authenticated connection to a cluster's master.
pub struct Client<T = transport::Stream> {
    cluster: String,
    framed: Framed<T, LengthDelimitedCodec>,
    master_incarnation: u64,
    next_id: u64,
    timeout: Duration,
}

impl Client {
    /// Connects to `master`'s socket and runs the handshake, each within `timeout`.
    pub async fn connect(master: &Master, timeout: Duration) -> Result<Client, CliError> {
        let stream = match within(
            &master.cluster,
            "connecting",
            timeout,
            transport::connect(&master.socket),
        )
        .await?
        {
            Ok(stream) => stream,
            Err(error) if transport::is_refusal(&error) => {
                return Err(CliError::NotRunning {
                    cluster: master.cluster.clone(),
                    reason: NotRunning::SocketRefused {
                        socket: master.socket.clone(),
                        detail: error.to_string(),
                    },
                })
            }
            Err(source) => {
                return Err(CliError::Connect {
                    cluster: master.cluster.clone(),
                    socket: master.socket.clone(),
                    source,
                })
            }
        };
        Client::handshake(&master.cluster, stream, &master.cookie, timeout).await
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Client<T> {
    /// Runs the caller's side of the handshake on `stream`, within `timeout`.
    pub async fn handshake(cluster: &str, stream: T, cookie: &Cookie, timeout: Duration) -> Result<Self, CliError> {
        let mut framed = Framed::new(
            stream,
            evilcluster_wire::codec(evilcluster_wire::DEFAULT_MAX_FRAME_LENGTH),
        );
        let me = Identity {
            cluster: cluster.to_owned(),
            path: format!("{cluster}/evilcluster-cli"),
            incarnation: u64::from_le_bytes(random()?),
        };
        let nonce: [u8; NONCE_LEN] = random()?;
        let peer = within(
            cluster,
            "running the handshake",
            timeout,
            handshake::connect(&mut framed, &me, cookie, nonce),
        )
        .await?
        .map_err(|source| CliError::Handshake {
            cluster: cluster.to_owned(),
            source,
        })?;
        Ok(Client {
            cluster: cluster.to_owned(),
            framed,
            master_incarnation: peer.incarnation,
            next_id: 1,
            timeout,
        })
    }

    /// Asks for the cluster's [`Status`].
    pub async fn status(&mut self) -> Result<Status, CliError> {
        let payload = self.request(STATUS_TAG).await?;
        rmp_serde::from_slice(&payload).map_err(|error| CliError::BadReply {
            cluster: self.cluster.clone(),
            tag: STATUS_TAG,
            detail: error.to_string(),
        })
    }

    /// Asks the master to stop the cluster; returns once it says the stop has begun.
    pub async fn stop(&mut self) -> Result<(), CliError> {
        let payload = self.request(STOP_TAG).await?;
        rmp_serde::from_slice::<()>(&payload).map_err(|error| CliError::BadReply {
            cluster: self.cluster.clone(),
            tag: STOP_TAG,
            detail: format!("expected nil: {error}"),
        })
    }

    /// Asks for a rolling restart of `worker` and waits (up to `timeout`)
    /// until it is done; returns how many processes were restarted.
    pub async fn restart(&mut self, worker: &str, timeout: Duration) -> Result<u32, CliError> {
        let payload = rmp_serde::to_vec(worker).map_err(|error| CliError::Encode {
            tag: RESTART_TAG,
            detail: error.to_string(),
        })?;
        let usual = std::mem::replace(&mut self.timeout, timeout);
        let reply = self.request_with(RESTART_TAG, &payload).await;
        self.timeout = usual;
        let outcome: Result<u32, String> = rmp_serde::from_slice(&reply?).map_err(|error| CliError::BadReply {
            cluster: self.cluster.clone(),
            tag: RESTART_TAG,
            detail: error.to_string(),
        })?;
        outcome.map_err(|reason| CliError::RestartFailed {
            cluster: self.cluster.clone(),
            worker: worker.to_owned(),
            reason,
        })
    }

    /// Sends `tag` with a nil payload to the control service and returns the
    /// reply's payload.
    pub async fn request(&mut self, tag: &'static str) -> Result<Vec<u8>, CliError> {
        self.request_with(tag, NIL).await
    }

    /// Sends `tag` with `payload` to the control service and returns the
    /// reply's payload.
    pub async fn request_with(&mut self, tag: &'static str, payload: &[u8]) -> Result<Vec<u8>, CliError> {
        let id = self.next_id;
        self.next_id += 1;
        let body = Frame::Request(Request {
            id,
            actor: CONTROL,
            tag,
            incarnation: self.master_incarnation,
            reply: true,
            payload,
        })
        .encode()
        .map_err(|error| CliError::Encode {
            tag,
            detail: error.to_string(),
        })?;
        let cluster = self.cluster.clone();
        let sending = "sending the request";
        within(&cluster, sending, self.timeout, self.framed.send(Bytes::from(body)))
            .await?
            .map_err(|error| lost(&cluster, sending, error.to_string()))?;
        let step = waiting_step(tag);
        within(
            &cluster,
            step,
            self.timeout,
            read_reply(&mut self.framed, &cluster, tag, id),
        )
        .await?
    }
}

/// Reads frames until the reply to request `id`.
async fn read_reply<T: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
    cluster: &str,
    tag: &'static str,
    id: u64,
) -> Result<Vec<u8>, CliError> {
    let step = waiting_step(tag);
    loop {
        let body = match framed.next().await {
            Some(Ok(body)) => body,
            Some(Err(error)) => return Err(lost(cluster, step, error.to_string())),
            None => return Err(lost(cluster, step, "the master closed the connection".into())),
        };
        let frame = Frame::decode(&body).map_err(|source| CliError::Malformed {
            cluster: cluster.to_owned(),
            source,
        })?;
        match frame {
            Frame::Reply(reply) if reply.id == id => {
                return reply
                    .result
                    .map(|payload| payload.0.to_vec())
                    .map_err(|source| CliError::Remote {
                        cluster: cluster.to_owned(),
                        tag,
                        source,
                    })
            }
            // Not ours (a request from the master, or a stray reply): this
            // client serves nothing, so it is ignored.
            _ => continue,
        }
    }
}

fn waiting_step(tag: &str) -> &'static str {
    match tag {
        STATUS_TAG => "waiting for the status",
        STOP_TAG => "waiting for the stop to be confirmed",
        RESTART_TAG => "waiting for the rolling restart to finish",
        _ => "waiting for the reply",
    }
}

fn lost(cluster: &str, step: &'static str, detail: String) -> CliError {
    CliError::ConnectionLost {
        cluster: cluster.to_owned(),
        step,
        detail,
    }
}

/// Runs `future` with a deadline.
async fn within<F: Future>(
    cluster: &str,
    step: &'static str,
    after: Duration,
    future: F,
) -> Result<F::Output, CliError> {
    tokio::time::timeout(after, future)
        .await
        .map_err(|_| CliError::Timeout {
            cluster: cluster.to_owned(),
            step,
            after,
        })
}

fn random<const N: usize>() -> Result<[u8; N], CliError> {
    let mut bytes = [0; N];
    getrandom::fill(&mut bytes).map_err(|error| CliError::Random(error.to_string()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use evilcluster_wire::control::ProcessStatus;
    use evilcluster_wire::{Reply, ReplyPayload, WireError};

    use super::*;

    const CLUSTER: &str = "unit";
    const MASTER_INCARNATION: u64 = 77;

    fn cookie() -> Cookie {
        Cookie::new(*b"unit cookie")
    }

    fn status() -> Status {
        Status {
            cluster: CLUSTER.into(),
            processes: vec![ProcessStatus {
                path: CLUSTER.into(),
                role: evilcluster_wire::control::RoleKind::Master,
                state: evilcluster_wire::control::ProcessState::Up,
                pid: Some(1),
                actor: None,
                actor_type: None,
                uptime_ms: Some(1000),
                restarts: 0,
                messages_in: 1,
                messages_out: 2,
                errors: 0,
                rss_bytes: Some(1 << 20),
                pss_bytes: Some(1 << 19),
                latency_us: vec![0; 4],
            }],
        }
    }

    /// A fake master: accepts the handshake, then answers each request with
    /// what `answer` returns (None: no reply).
    async fn fake_master(
        stream: tokio::io::DuplexStream,
        answer: impl Fn(&Request<'_>) -> Option<Result<Vec<u8>, WireError>>,
    ) -> Vec<(String, String, u64)> {
        let mut framed = Framed::new(stream, evilcluster_wire::codec(1 << 20));
        let me = Identity {
            cluster: CLUSTER.into(),
            path: CLUSTER.into(),
            incarnation: MASTER_INCARNATION,
        };
        let caller = handshake::accept(&mut framed, &me, &cookie(), [9; NONCE_LEN])
            .await
            .unwrap();
        assert_eq!(caller.path, "unit/evilcluster-cli");
        let mut seen = Vec::new();
        while let Some(Ok(body)) = framed.next().await {
            let Ok(Frame::Request(request)) = Frame::decode(&body) else {
                panic!("not a request");
            };
            assert_eq!(request.payload, NIL);
            assert!(request.reply);
            seen.push((request.actor.to_owned(), request.tag.to_owned(), request.incarnation));
            let Some(result) = answer(&request) else { continue };
            // A stray reply first, which the client must skip.
            let stray = Frame::Reply(Reply {
                id: request.id + 1000,
                result: Ok(ReplyPayload(NIL)),
            });
            framed.send(Bytes::from(stray.encode().unwrap())).await.unwrap();
            let reply = Frame::Reply(Reply {
                id: request.id,
                result: result.as_ref().map(|p| ReplyPayload(p)).map_err(Clone::clone),
            });
            framed.send(Bytes::from(reply.encode().unwrap())).await.unwrap();
        }
        seen
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn status_and_stop_round_trip() {
        rt().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            let master = tokio::spawn(fake_master(b, |request| {
                Some(Ok(match request.tag {
                    STATUS_TAG => rmp_serde::to_vec_named(&status()).unwrap(),
                    _ => NIL.to_vec(),
                }))
            }));
            let mut client = Client::handshake(CLUSTER, a, &cookie(), DEFAULT_TIMEOUT).await.unwrap();
            assert_eq!(client.status().await.unwrap(), status());
            client.stop().await.unwrap();
            drop(client);
            let seen = master.await.unwrap();
            assert_eq!(
                seen,
                [
                    (CONTROL.into(), STATUS_TAG.into(), MASTER_INCARNATION),
                    (CONTROL.into(), STOP_TAG.into(), MASTER_INCARNATION)
                ]
            );
        });
    }

    #[test]
    fn status_as_a_positional_array_decodes_too() {
        rt().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            tokio::spawn(fake_master(b, |_| Some(Ok(rmp_serde::to_vec(&status()).unwrap()))));
            let mut client = Client::handshake(CLUSTER, a, &cookie(), DEFAULT_TIMEOUT).await.unwrap();
            assert_eq!(client.status().await.unwrap(), status());
        });
    }

    #[test]
    fn a_wire_error_becomes_a_remote_error() {
        rt().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            tokio::spawn(fake_master(b, |request| {
                Some(Err(WireError::UnknownActor {
                    actor: request.actor.to_owned(),
                }))
            }));
            let mut client = Client::handshake(CLUSTER, a, &cookie(), DEFAULT_TIMEOUT).await.unwrap();
            let error = client.status().await.unwrap_err();
            assert!(
                matches!(
                    &error,
                    CliError::Remote {
                        tag: STATUS_TAG,
                        source: WireError::UnknownActor { .. },
                        ..
                    }
                ),
                "{error:?}"
            );
            assert!(error.to_string().contains("without this control command"), "{error}");
            assert_eq!(error.exit_code(), 2);
        });
    }

    #[test]
    fn an_undecodable_status_is_a_bad_reply() {
        rt().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            tokio::spawn(fake_master(b, |_| Some(Ok(NIL.to_vec()))));
            let mut client = Client::handshake(CLUSTER, a, &cookie(), DEFAULT_TIMEOUT).await.unwrap();
            let error = client.status().await.unwrap_err();
            assert!(matches!(&error, CliError::BadReply { .. }), "{error:?}");
        });
    }

    #[test]
    fn no_reply_times_out() {
        rt().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            tokio::spawn(fake_master(b, |_| None));
            let mut client = Client::handshake(CLUSTER, a, &cookie(), Duration::from_millis(200))
                .await
                .unwrap();
            let error = client.status().await.unwrap_err();
            assert!(
                matches!(
                    &error,
                    CliError::Timeout {
                        step: "waiting for the status",
                        ..
                    }
                ),
                "{error:?}"
            );
        });
    }

    #[test]
    fn a_wrong_cookie_fails_the_handshake() {
        rt().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            tokio::spawn(async move {
                let mut framed = Framed::new(b, evilcluster_wire::codec(1 << 20));
                let me = Identity {
                    cluster: CLUSTER.into(),
                    path: CLUSTER.into(),
                    incarnation: 1,
                };
                let _ = handshake::accept(&mut framed, &me, &Cookie::new(*b"other"), [9; NONCE_LEN]).await;
            });
            let error = Client::handshake(CLUSTER, a, &cookie(), DEFAULT_TIMEOUT)
                .await
                .err()
                .unwrap();
            assert!(matches!(&error, CliError::Handshake { .. }), "{error:?}");
            assert!(error.to_string().contains("cookie"), "{error}");
        });
    }

    #[test]
    fn a_closed_connection_is_reported() {
        rt().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            tokio::spawn(async move {
                let mut framed = Framed::new(b, evilcluster_wire::codec(1 << 20));
                let me = Identity {
                    cluster: CLUSTER.into(),
                    path: CLUSTER.into(),
                    incarnation: 1,
                };
                handshake::accept(&mut framed, &me, &cookie(), [9; NONCE_LEN])
                    .await
                    .unwrap();
                // Read the request, then hang up.
                let _ = framed.next().await;
            });
            let mut client = Client::handshake(CLUSTER, a, &cookie(), DEFAULT_TIMEOUT).await.unwrap();
            let error = client.status().await.unwrap_err();
            assert!(matches!(&error, CliError::ConnectionLost { .. }), "{error:?}");
        });
    }
}
