//! The `evilcluster` command: inspect and stop running evilcluster clusters.
//!
//! A cluster's master advertises itself in the user's discovery directory
//! (see [`evilcluster_wire::control`]); this crate finds it there
//! ([`discovery`]), speaks the control protocol to it ([`client`]), and
//! renders what it answers ([`render`]). [`main`] parses the arguments and
//! maps errors to exit codes.
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

/// The `evilcluster` command: parses the arguments, runs, and maps errors to
/// exit codes (and messages on standard error).
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    match run(cli, &discovery::user_discovery_dir(), &mut stdout.lock()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader went away (`evilcluster ps app | head`): nothing to say.
        Err(CliError::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("evilcluster: {error}");
            std::process::ExitCode::from(error.exit_code() as u8)
        }
    }
}
