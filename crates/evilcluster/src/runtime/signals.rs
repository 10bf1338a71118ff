//! Shutdown signals (SIGINT, SIGTERM).

use super::*;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    listen_for_shutdown().await
}

/// Starts listening for SIGINT and SIGTERM now (from then on they no longer
/// kill the process), and resolves when one arrives.
pub(super) fn listen_for_shutdown() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind| {
            signal(kind)
                .map_err(|error| warn!(%error, "cannot listen for signal {}", kind.as_raw_value()))
                .ok()
        };
        let (mut interrupt, mut terminate) = (listen(SignalKind::interrupt()), listen(SignalKind::terminate()));
        async move {
            tokio::select! {
                Some(()) = async { interrupt.as_mut()?.recv().await } => {}
                Some(()) = async { terminate.as_mut()?.recv().await } => {}
                else => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
