//! The `evilcluster` command: inspect and stop running evilcluster clusters.
//!
//! A cluster's master advertises itself in the user's discovery directory
//! (see [`evilcluster_wire::control`]); this crate finds it there
//! ([`discovery`]), speaks the control protocol to it ([`client`]), and
//! renders what it answers ([`render`]). `src/main.rs` only parses the
//! arguments and maps errors to exit codes.
//!
//! ```text
//! evilcluster ps <CLUSTER> [--json]     the processes, as a table (or JSON)
//! evilcluster tree <CLUSTER>            the process tree
//! evilcluster stop <CLUSTER> [--timeout SECONDS]
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod client;
pub mod discovery;
pub mod error;
pub mod render;
mod transport;

pub use cli::{run, Cli, Command};
pub use error::{CliError, NotRunning};
