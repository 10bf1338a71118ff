//! Forks sharing one listening port.
//!
//! The spawn binds the TCP listener once and keeps it for its whole life; each
//! fork, restarted ones included, receives a duplicate of that descriptor over
//! a Unix socket in the cluster's private socket directory (`SCM_RIGHTS`).
//! Every fork then accepts on the same socket, and connections wait in its
//! backlog — never refused — while at least the spawn is up.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use tracing::warn;

use crate::Error;

/// This process's listener, once it has one.
static LISTENER: Mutex<Option<TcpListener>> = Mutex::new(None);

/// The TCP listener this process's worker shares, declared with
/// [`Worker::listen`](crate::Worker::listen): in each fork (and in a spawn
/// without forks) a handle to the one socket the spawn bound. `None`
/// elsewhere. Each call returns a new handle to the same socket; hand it to
/// a web server (`actix_web::HttpServer::listen`, `tokio::net::TcpListener::from_std`
/// after `set_nonblocking(true)`).
pub fn listener() -> Option<TcpListener> {
    let listener = LISTENER.lock().unwrap_or_else(|e| e.into_inner());
    match listener.as_ref()?.try_clone() {
        Ok(handle) => Some(handle),
        Err(error) => {
            warn!(%error, "cannot duplicate the shared listener");
            None
        }
    }
}

/// This process's part of a worker's shared listener.
pub(crate) struct Shared {
    /// The bound address, as the process announces it.
    pub address: String,
    /// In a spawn with forks: where its forks fetch the listener.
    pub handoff: Option<Handoff>,
}

/// Gets the worker's listener — from the spawn at `from_spawn` (a fork), or
/// by binding `address` — makes it this process's [`listener`], and, with
/// `for_forks`, serves it to the forks at that path.
pub(crate) fn share(address: &str, from_spawn: Option<&Path>, for_forks: Option<PathBuf>) -> Result<Shared, Error> {
    let bound = match from_spawn {
        Some(handoff) => receive(handoff)?,
        None => TcpListener::bind(address).map_err(|e| Error::io(format!("cannot listen on {address}"), e))?,
    };
    let local = bound
        .local_addr()
        .map_err(|e| Error::io("cannot read the listener's address", e))?;
    let handoff = for_forks.map(|path| Handoff::serve(&bound, path)).transpose()?;
    *LISTENER.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
    Ok(Shared {
        address: local.to_string(),
        handoff,
    })
}

/// The forks this process started and has not yet seen exit: the only
/// processes its handoff serves.
static OUR_FORKS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Records a fork this process just started (before it can connect: the
/// fork waits for its cookie, written after this).
pub(crate) fn fork_started(pid: u32) {
    OUR_FORKS.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
}

/// Forgets a fork that exited (before its pid can be reused).
pub(crate) fn fork_exited(pid: u32) {
    OUR_FORKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

/// Whether the process at the other end of `stream` is one of this
/// process's current forks, by the kernel's word (`SO_PEERCRED`), not the
/// peer's: any process of this user can reach the socket.
fn is_our_fork(stream: &UnixStream) -> Result<(), String> {
    let peer = rustix::net::sockopt::socket_peercred(stream).map_err(|e| format!("no peer credentials: {e}"))?;
    let pid = peer.pid.as_raw_nonzero().get() as u32;
    if peer.uid != rustix::process::getuid() {
        return Err(format!("pid {pid} runs as uid {}", peer.uid.as_raw()));
    }
    if !OUR_FORKS.lock().unwrap_or_else(|e| e.into_inner()).contains(&pid) {
        return Err(format!("pid {pid} is not one of this spawn's forks"));
    }
    Ok(())
}

/// The spawn's side: serves duplicates of `listener` to its own current
/// forks that connect to `path` (checked by peer credentials; anyone else
/// is hung up on). Removes the socket file when dropped.
pub(crate) struct Handoff {
    pub path: PathBuf,
}

impl Handoff {
    pub fn serve(listener: &TcpListener, path: PathBuf) -> Result<Handoff, Error> {
        let shared = listener
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate the listener", e))?;
        let handoff =
            UnixListener::bind(&path).map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
        std::thread::Builder::new()
            .name("evilcluster-listener".into())
            .spawn(move || {
                let mut throttle = crate::node::throttle::Throttle::default();
                for fork in handoff.incoming() {
                    let sent = fork.and_then(|fork| match is_our_fork(&fork) {
                        Ok(()) => send_descriptor(&fork, shared.as_fd()),
                        Err(stranger) => {
                            if throttle.allow("listener handoff") {
                                warn!("refused to hand the listener over: {stranger}");
                            }
                            Ok(())
                        }
                    });
                    if let Err(error) = sent {
                        warn!(%error, "could not hand the listener to a fork");
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the listener handoff thread", e))?;
        Ok(Handoff { path })
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn send_descriptor(to: &UnixStream, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    sendmsg(to, &[IoSlice::new(b"L")], &mut control, SendFlags::empty())?;
    Ok(())
}

/// The fork's side: fetches the spawn's listener from `path`.
fn receive(path: &Path) -> Result<TcpListener, Error> {
    let context = || format!("cannot get the shared listener from {}", path.display());
    let stream = UnixStream::connect(path).map_err(|e| Error::io(context(), e))?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| Error::io(context(), e.into()))?;
    let fd: Option<OwnedFd> = control.drain().find_map(|message| match message {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    let fd = fd.ok_or_else(|| Error::Environment(format!("{}: no descriptor arrived", context())))?;
    Ok(TcpListener::from(fd))
}
