//! `evilcluster`: inspect and stop running evilcluster clusters.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    evilcluster_cli::main()
}
