//! `evilcluster`: inspect and stop running evilcluster clusters.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use evilcluster_cli::{discovery, Cli, CliError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    match evilcluster_cli::run(cli, &discovery::user_discovery_dir(), &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`evilcluster ps app | head`): nothing to say.
        Err(CliError::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("evilcluster: {error}");
            ExitCode::from(error.exit_code() as u8)
        }
    }
}
