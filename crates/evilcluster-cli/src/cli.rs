//! The command line: arguments and what each command does.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use evilcluster_wire::control::render_tree;

use crate::client::{Client, DEFAULT_TIMEOUT};
use crate::discovery::{self, Master};
use crate::error::CliError;
use crate::render;

/// Inspect, restart and stop running evilcluster clusters of the current user.
#[derive(Debug, Parser)]
#[command(name = "evilcluster", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the processes of a running cluster, with their state and counters.
    Ps {
        /// The cluster's name (the one given to `Cluster::new`).
        cluster: String,
        /// Print the status as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the process tree of a running cluster.
    Tree {
        /// The cluster's name (the one given to `Cluster::new`).
        cluster: String,
    },
    /// Restart a worker's processes one at a time, each ready again before
    /// the next stops (its forks keep serving throughout), as `pm2 reload`.
    Restart {
        /// The cluster's name (the one given to `Cluster::new`).
        cluster: String,
        /// The worker to restart.
        worker: String,
        /// How long to wait for the restart to finish, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "120", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Stop a running cluster cleanly and wait until its master has exited.
    Stop {
        /// The cluster's name (the one given to `Cluster::new`).
        cluster: String,
        /// How long to wait for the master to exit, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
        timeout: Duration,
    },
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is not a usable number of seconds"))
}

/// How often `stop` looks whether the master is gone.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Runs `cli` against the clusters advertised in discovery directory `dir`,
/// writing results to `out`.
pub fn run(cli: Cli, dir: &Path, out: &mut dyn Write) -> Result<(), CliError> {
    match cli.command {
        Command::Ps { cluster, json } => {
            let status = fetch_status(dir, &cluster)?;
            let text = if json {
                render::json(&status).map_err(|error| CliError::Output(error.into()))?
            } else {
                render::table(&status)
            };
            write_all(out, &text)
        }
        Command::Tree { cluster } => {
            let status = fetch_status(dir, &cluster)?;
            write_all(out, &render_tree(&status))
        }
        Command::Restart {
            cluster,
            worker,
            timeout,
        } => {
            let master = discovery::locate(dir, &cluster)?;
            let restarted = runtime()?.block_on(async {
                let mut client = Client::connect(&master, DEFAULT_TIMEOUT).await?;
                client.restart(&worker, timeout).await
            })?;
            write_all(
                out,
                &format!("restarted {restarted} process(es) of {cluster}/{worker}, one at a time\n"),
            )
        }
        Command::Stop { cluster, timeout } => {
            let master = discovery::locate(dir, &cluster)?;
            stop(&master, timeout)?;
            write_all(
                out,
                &format!("cluster {cluster:?} stopped (master pid {} has exited)\n", master.pid),
            )
        }
    }
}

fn fetch_status(dir: &Path, cluster: &str) -> Result<evilcluster_wire::control::Status, CliError> {
    let master = discovery::locate(dir, cluster)?;
    runtime()?.block_on(async {
        let mut client = Client::connect(&master, DEFAULT_TIMEOUT).await?;
        client.status().await
    })
}

/// Asks the master to stop, then waits up to `timeout` for its pid to go.
fn stop(master: &Master, timeout: Duration) -> Result<(), CliError> {
    let confirmed = runtime()?.block_on(async {
        let mut client = Client::connect(master, DEFAULT_TIMEOUT).await?;
        client.stop().await
    });
    match confirmed {
        Ok(()) => {}
        // The master may go away before its confirmation gets out; its
        // pid tells whether the stop is under way.
        Err(CliError::ConnectionLost { detail, .. }) => {
            eprintln!(
                "evilcluster: the master of cluster {:?} hung up before confirming the stop ({detail}); waiting for it to exit",
                master.cluster
            );
        }
        Err(error) => return Err(error),
    }
    let started = Instant::now();
    while evilcluster_wire::control::pid_alive(master.pid) {
        if started.elapsed() >= timeout {
            return Err(CliError::StopTimedOut {
                cluster: master.cluster.clone(),
                pid: master.pid,
                after: timeout,
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

fn write_all(out: &mut dyn Write, text: &str) -> Result<(), CliError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn arguments_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["evilcluster", "ps", "--json", "myapp"]).unwrap();
        assert!(matches!(cli.command, Command::Ps { ref cluster, json: true } if cluster == "myapp"));
        let cli = Cli::try_parse_from(["evilcluster", "stop", "myapp"]).unwrap();
        assert!(matches!(cli.command, Command::Stop { timeout, .. } if timeout == Duration::from_secs(30)));
        let cli = Cli::try_parse_from(["evilcluster", "stop", "myapp", "--timeout", "2.5"]).unwrap();
        assert!(matches!(cli.command, Command::Stop { timeout, .. } if timeout == Duration::from_millis(2500)));
        assert!(Cli::try_parse_from(["evilcluster", "stop", "myapp", "--timeout", "soon"]).is_err());
        assert!(Cli::try_parse_from(["evilcluster", "tree"]).is_err());
        let cli = Cli::try_parse_from(["evilcluster", "restart", "myapp", "web"]).unwrap();
        assert!(
            matches!(cli.command, Command::Restart { ref worker, timeout, .. } if worker == "web" && timeout == Duration::from_secs(120))
        );
        assert!(Cli::try_parse_from(["evilcluster", "restart", "myapp"]).is_err());
    }

    #[test]
    fn a_missing_cluster_is_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("discovery");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let cli = Cli::try_parse_from(["evilcluster", "tree", "absent"]).unwrap();
        let mut out = Vec::new();
        let error = run(cli, &dir, &mut out).unwrap_err();
        assert_eq!(error.exit_code(), 1);
        assert!(
            error.to_string().starts_with("no cluster named \"absent\" is running"),
            "{error}"
        );
        assert!(out.is_empty());
    }
}
