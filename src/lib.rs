//! The evilcluster integration suite: examples, cross-process tests and
//! benchmarks of the `evilcluster` runtime. Not published.
//!
//! The library only holds what several targets share; see [`bench`](mod@bench) for the
//! transport benchmark support used by `benches/transport.rs` and
//! `examples/transport_compare.rs`, [`http`] for the HTTP-serving forks of the
//! real example and the fixtures, [`fixture`] for the fixture binaries, and
//! [`chaos`](mod@chaos) for the chaos harness of `examples/chaos.rs` and
//! `tests/chaos.rs`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(unix)]
pub mod bench;
#[cfg(unix)]
pub mod chaos;

/// HTTP serving from a fork of a worker that shares a listener.
pub mod http {
    use std::time::Duration;

    use actix::fut::{wrap_future, ActorFutureExt};
    use actix::{Actor, ActorContext, AsyncContext, Context};

    /// For an actor's `stopping`: the actor's HTTP `server` finishes the
    /// requests under way, then the actor stops (return
    /// `Running::Continue` after calling this). The other forks take the new
    /// connections meanwhile.
    pub fn finish_then_stop<A: Actor<Context = Context<A>>>(
        server: actix_web::dev::ServerHandle,
        ctx: &mut Context<A>,
    ) {
        ctx.wait(
            wrap_future::<_, A>(async move {
                // Stop accepting, and let the worker take what was accepted
                // already: actix-server drops connections still queued for a
                // worker that is stopping.
                server.pause().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                server.stop(true).await
            })
            .map(|(), _, ctx: &mut Context<A>| ctx.stop()),
        );
    }
}

/// Helpers the fixture binaries share.
pub mod fixture {
    use std::io::BufRead;

    /// The lines of standard input, read on a thread of their own: how a
    /// test drives a fixture's master.
    pub fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        lines
    }
}
