//! The evilcluster integration suite: examples, cross-process tests and
//! benchmarks of the `evilcluster` runtime. Not published.
//!
//! The library only holds what several targets share; see [`bench`](mod@bench) for the
//! transport benchmark support used by `benches/transport.rs` and
//! `examples/transport_compare.rs`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(unix)]
pub mod bench;
