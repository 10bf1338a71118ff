//! Local sockets through `interprocess`: Unix domain sockets in a private
//! directory on Unix, named pipes on Windows.

#[cfg(unix)]
mod unix;

use std::io;
#[cfg(not(unix))]
use std::pin::Pin;
#[cfg(not(unix))]
use std::sync::Arc;
#[cfg(not(unix))]
use std::task::{Context, Poll};

use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::{Listener as _, Stream as _};
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
#[cfg(not(unix))]
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Binds a listener on `path` (a socket file inside the cluster's private directory).
pub(crate) fn listen(path: &str) -> io::Result<Listener> {
    let name = path.to_fs_name::<GenericFilePath>()?;
    ListenerOptions::new().name(name).create_tokio()
}

/// Connects to a listener bound by [`listen`].
pub(crate) async fn connect(path: &str) -> io::Result<Stream> {
    let name = path.to_fs_name::<GenericFilePath>()?;
    Stream::connect(name).await
}

pub(crate) async fn accept(listener: &Listener) -> io::Result<Stream> {
    listener.accept().await
}

/// Turns a connected stream into the stream the handshake runs on.
///
/// On Unix the socket is registered for readability only (see [`unix`]).
#[cfg(unix)]
pub(crate) fn into_io(stream: Stream) -> io::Result<Io> {
    match stream {
        Stream::UdSocket(stream) => unix::Io::new(std::os::fd::OwnedFd::try_from(stream)?.into()),
    }
}

/// See the Unix version.
#[cfg(not(unix))]
pub(crate) fn into_io(stream: Stream) -> io::Result<Io> {
    Ok(SharedStream(Arc::new(stream)))
}

/// A connected stream, before it is split.
#[cfg(unix)]
pub(crate) type Io = unix::Io;
/// A connected stream, before it is split.
#[cfg(not(unix))]
pub(crate) type Io = SharedStream;

/// The reading half of an [`Io`].
#[cfg(unix)]
pub(crate) type ReadHalf = unix::ReadHalf;
/// The writing half of an [`Io`].
#[cfg(unix)]
pub(crate) type WriteHalf = unix::WriteHalf;
/// The reading half of an [`Io`].
#[cfg(not(unix))]
pub(crate) type ReadHalf = SharedStream;
/// The writing half of an [`Io`].
#[cfg(not(unix))]
pub(crate) type WriteHalf = SharedStream;

/// Writes to a socket without its writing half (see the Unix version).
#[cfg(unix)]
pub(crate) type DirectWriter = unix::DirectWriter;

/// None exists: every byte goes through the writing half.
#[cfg(not(unix))]
pub(crate) enum DirectWriter {}

#[cfg(not(unix))]
impl DirectWriter {
    pub(crate) fn try_write(&self, _: &[u8]) -> io::Result<usize> {
        match *self {}
    }
}

/// A handle that writes to `write`'s socket without waiting, where the
/// platform has one.
#[cfg(unix)]
pub(crate) fn direct(write: &WriteHalf) -> Option<DirectWriter> {
    Some(write.direct())
}

/// See the Unix version.
#[cfg(not(unix))]
pub(crate) fn direct(_: &WriteHalf) -> Option<DirectWriter> {
    None
}

#[cfg(unix)]
pub(crate) fn split(io: Io) -> (ReadHalf, WriteHalf) {
    io.split()
}

#[cfg(not(unix))]
pub(crate) fn split(io: Io) -> (ReadHalf, WriteHalf) {
    (SharedStream(io.0.clone()), io)
}

/// One half of a stream shared by its reader and its writer task.
///
/// `interprocess` reads and writes through `&Stream`, so both halves hold the
/// same `Arc` instead of splitting the stream.
#[cfg(not(unix))]
pub(crate) struct SharedStream(pub Arc<Stream>);

#[cfg(not(unix))]
impl AsyncRead for SharedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

#[cfg(not(unix))]
impl AsyncWrite for SharedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        (*self.0).is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_shutdown(cx)
    }
}
