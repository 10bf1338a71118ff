//! The local-socket transport to a master: Unix domain sockets.
//!
//! Kept in one place so another platform's transport only touches this file.

use std::path::Path;

/// A connection to a master.
#[cfg(unix)]
pub(crate) type Stream = tokio::net::UnixStream;

/// A connection to a master (no transport on this platform).
#[cfg(not(unix))]
pub(crate) type Stream = tokio::io::DuplexStream;

/// Connects to the master socket at `path`.
#[cfg(unix)]
pub(crate) async fn connect(path: &Path) -> std::io::Result<Stream> {
    tokio::net::UnixStream::connect(path).await
}

/// Connects to the master socket at `path`.
#[cfg(not(unix))]
pub(crate) async fn connect(path: &Path) -> std::io::Result<Stream> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!("cannot connect to {}: only Unix sockets are supported", path.display()),
    ))
}

/// Whether a connection error means nobody listens there (any more).
pub(crate) fn is_refusal(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
    )
}
