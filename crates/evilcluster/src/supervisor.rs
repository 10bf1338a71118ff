//! Watching child processes: their exit, and stopping them on request.

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::directory::Member;
use crate::node::Node;
use crate::process::{self, ChildProcess, Launch};
use crate::Error;

/// How a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Exit code 0.
    Normal,
    /// A non-zero exit code, or death by a signal.
    Abnormal(String),
}

impl Exit {
    fn from_status(status: std::io::Result<ExitStatus>) -> Exit {
        match status {
            Ok(status) if status.success() => Exit::Normal,
            Ok(status) => Exit::Abnormal(describe(status)),
            Err(error) => Exit::Abnormal(format!("could not be waited for: {error}")),
        }
    }
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("killed by signal {signal}");
        }
    }
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => status.to_string(),
    }
}

/// A running child, watched by a task of its own.
pub(crate) struct Supervised {
    stop: mpsc::UnboundedSender<oneshot::Sender<()>>,
    exited: watch::Receiver<Option<Exit>>,
}

impl Supervised {
    /// Stops the child (graceful, then killed after `grace`) and waits for it.
    pub async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.stop.send(done).is_ok() {
            let _ = stopped.await;
        }
    }

    /// Resolves once the child has exited, with how.
    pub async fn exited(&self) -> Exit {
        let mut exited = self.exited.clone();
        let exit = exited.wait_for(Option::is_some).await;
        match exit {
            Ok(exit) => exit.clone().expect("waited for Some"),
            Err(_) => Exit::Abnormal("its supervisor task ended".into()),
        }
    }
}

fn watch_child(mut child: ChildProcess, grace: Duration) -> Supervised {
    let (stop, mut stop_requests) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    let (exit_tx, exited) = watch::channel(None);
    let supervised = Supervised { stop, exited };
    actix_rt::spawn(async move {
        let (exit, requested) = tokio::select! {
            status = child.wait() => (Exit::from_status(status), None),
            // A stop request, or every handle dropped: either way, stop it.
            request = stop_requests.recv() => (Exit::from_status(child.stop(grace).await), request),
        };
        match &exit {
            Exit::Normal => info!(path = %child.path, pid = child.pid, "exited normally"),
            Exit::Abnormal(how) if requested.is_some() => {
                warn!(path = %child.path, pid = child.pid, "exited with error while stopping: {how}")
            }
            Exit::Abnormal(how) => warn!(path = %child.path, pid = child.pid, "exited with error: {how}"),
        }
        exit_tx.send_replace(Some(exit));
        if let Some(done) = requested {
            let _ = done.send(());
        }
    });
    supervised
}

/// Starts a child and waits until it has registered with the master (its
/// readiness), it exits, or the start timeout passes.
pub(crate) async fn start_child(node: &Arc<Node>, launch: Launch<'_>) -> Result<Supervised, Error> {
    let path = launch.path.to_owned();
    let incarnation = launch.incarnation;
    let child = process::launch(launch).await?;
    info!(%path, pid = child.pid, "started");
    let supervised = watch_child(child, node.config.shutdown_timeout);
    let is_it = |m: &Arc<Member>| m.path == path && m.incarnation == incarnation;
    let ready = node
        .directory
        .wait_for(node.config.start_timeout, |members| members.iter().any(is_it));
    tokio::select! {
        ready = ready => {
            if ready {
                Ok(supervised)
            } else {
                supervised.stop().await;
                Err(Error::StartFailed { path, reason: format!("not ready within {:?}", node.config.start_timeout) })
            }
        }
        exit = supervised.exited() => Err(Error::StartFailed {
            path,
            reason: match exit {
                Exit::Normal => "exited normally before it was ready".into(),
                Exit::Abnormal(how) => format!("exited before it was ready ({how})"),
            },
        }),
    }
}

/// Stops children in reverse start order.
pub(crate) async fn stop_all(children: &mut Vec<Supervised>) {
    while let Some(child) = children.pop() {
        child.stop().await;
    }
}
