//! The evilcluster integration suite: examples, cross-process tests and
//! benchmarks of the `evilcluster` runtime. Not published.
//!
//! The library only holds what several targets share; see [`bench`](mod@bench) for the
//! transport benchmark support used by `benches/transport.rs` and
//! `examples/transport_compare.rs`, and [`fixture`] for the fixture binaries.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(unix)]
pub mod bench;

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
