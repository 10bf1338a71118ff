//! The original evilcluster's "real example", as a working cluster.
//!
//! ```text
//! myapp (master)
//! ├── webserverFrontend       2 forks   renders pages, asks the api
//! ├── webserverApi            2 forks   counts visits and reads profiles in the datastore
//! ├── inMemoryDatastore       1 process a HashMap<String, String> shared by everyone
//! └── backgroundTaskManager   task      every few hundred ms, sums the visit counters
//!                                       into a "report" key, and checks the api
//! ```
//!
//! Every box is its own OS process running this same executable. The
//! frontend's spawn binds one TCP port (any free one, or `--port N`) and hands
//! it to both its forks, which serve HTTP on it with actix-web. The master
//! starts the tree, then plays 12 real HTTP requests against that port (the
//! kernel picks the fork); each request travels frontend fork → api fork →
//! datastore across processes, and the printed line says which fork and pid
//! served each hop. The master then waits for the background task manager's
//! report, prints it with the live members, and stops the tree: the program
//! exits 0 with no process left behind.
//!
//! It shows typed messages with stable wire tags, async handlers that call
//! other actors (`addr_of`), forks and round robin, a task worker, and typed
//! per-worker options read with `evilcluster::options` (the datastore's
//! capacity and seed profiles, the frontend's site name, the task's period).
//!
//! Run it:
//!
//! ```text
//! cargo run --release --example realapp
//! cargo run --release --example realapp -- --serve
//! ```
//!
//! As two hosts joined through NATS (the README's "Beyond one machine";
//! run `nats-server` first, and give each host its own node name):
//!
//! ```text
//! EVILCLUSTER_NATS_URL=nats://127.0.0.1:4222 EVILCLUSTER_NODE=store \
//!     cargo run --release --features nats --example realapp -- --only inMemoryDatastore
//! EVILCLUSTER_NATS_URL=nats://127.0.0.1:4222 EVILCLUSTER_NODE=web \
//!     cargo run --release --features nats --example realapp -- --without inMemoryDatastore
//! ```
//!
//! The second host's api forks and task reach the datastore on the first
//! through NATS; the demo runs on the second, the first serves until stopped.
//!
//! With `--serve` the cluster keeps running after the demo: browse
//! `http://127.0.0.1:<port>/<user>`, or type a user name and Enter to request
//! a page through the frontend actor; Ctrl-C (or SIGTERM) stops the whole tree
//! cleanly. The runtime logs to stderr (`RUST_LOG=warn` quiets it); results
//! go to stdout.

use std::collections::HashMap;
use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use actix::MessageResult;
use evilcluster::prelude::*;
use evilcluster::TaskResult;

// ------------------------------------------------------------------ options

/// Options of `inMemoryDatastore`.
struct DatastoreOptions {
    /// At most this many keys; writes of new keys beyond it are refused.
    capacity: usize,
    /// `profile:<user>` entries loaded at start.
    profiles: Vec<(&'static str, &'static str)>,
}

/// Options of `webserverFrontend`.
struct FrontendOptions {
    site: &'static str,
}

/// Options of `backgroundTaskManager`.
struct TaskOptions {
    interval_ms: u64,
    rounds: u32,
}

// ----------------------------------------------------------------- messages

/// Which process served a hop: its worker, fork (if any) and pid.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hop {
    worker: String,
    fork: Option<(u32, u32)>,
    pid: u32,
}

impl Hop {
    fn here() -> Hop {
        Hop {
            worker: evilcluster::role().worker().unwrap_or("master").to_owned(),
            fork: evilcluster::fork_number(),
            pid: std::process::id(),
        }
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fork {
            Some((k, n)) => write!(f, "{} fork {k}/{n} (pid {})", self.worker, self.pid),
            None => write!(f, "{} (pid {})", self.worker, self.pid),
        }
    }
}

/// Datastore: the value of a key.
#[derive(Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "Option<String>")]
#[remote(tag = "datastore.get", idempotent)]
struct Get(String);

/// Datastore: sets a key.
#[derive(Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "Result<(), String>")]
#[remote(tag = "datastore.put")]
struct Put(String, String);

/// Datastore: adds one to a numeric key (missing = 0) and returns it.
#[derive(Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "Result<Counter, String>")]
#[remote(tag = "datastore.incr")]
struct Incr(String);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Counter {
    value: u64,
    by: Hop,
}

/// Datastore: every `(key, value)` whose key starts with the prefix, sorted.
#[derive(Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "Vec<(String, String)>")]
#[remote(tag = "datastore.scan")]
struct Scan(String);

/// Api: records a visit of `user` and returns what the page needs.
#[derive(Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "Result<Visit, String>")]
#[remote(tag = "api.record_visit")]
struct RecordVisit {
    user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Visit {
    number: u64,
    profile: Option<String>,
    api: Hop,
    datastore: Hop,
}

/// Api: `user`'s profile, read-only. Safe to handle twice, so a call whose
/// api fork dies is sent again to another one (see `remote_messages!`).
#[derive(Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "Option<String>")]
#[remote(tag = "api.read_profile", idempotent)]
struct ReadProfile {
    user: String,
}

/// Api: which fork answers and how many visits it has recorded.
#[derive(Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "ApiHealth")]
#[remote(tag = "api.health")]
struct Health;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ApiHealth {
    by: Hop,
    visits_recorded: u64,
}

/// Frontend: renders `user`'s page.
#[derive(Message, RemoteMessage, Serialize, Deserialize)]
#[rtype(result = "Result<Page, String>")]
#[remote(tag = "frontend.render")]
struct Render {
    user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Page {
    title: String,
    frontend: Hop,
    visit: Visit,
}

// ------------------------------------------------------------------- actors

/// One process holding the cluster's shared state.
#[derive(Default)]
struct InMemoryDatastore {
    map: HashMap<String, String>,
    capacity: usize,
}

impl InMemoryDatastore {
    fn insert(&mut self, key: String, value: String) -> Result<(), String> {
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            return Err(format!("datastore full ({} keys), `{key}` refused", self.capacity));
        }
        self.map.insert(key, value);
        Ok(())
    }
}

impl Actor for InMemoryDatastore {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        let options = evilcluster::options::<DatastoreOptions>().expect("inMemoryDatastore is declared with options");
        self.capacity = options.capacity;
        self.map.reserve(options.capacity);
        for (user, profile) in &options.profiles {
            let _ = self.insert(format!("profile:{user}"), (*profile).to_owned());
        }
        tracing::info!(
            capacity = self.capacity,
            profiles = options.profiles.len(),
            "datastore ready"
        );
    }
}

impl Handler<Get> for InMemoryDatastore {
    type Result = Option<String>;
    fn handle(&mut self, Get(key): Get, _: &mut Context<Self>) -> Option<String> {
        self.map.get(&key).cloned()
    }
}

impl Handler<Put> for InMemoryDatastore {
    type Result = Result<(), String>;
    fn handle(&mut self, Put(key, value): Put, _: &mut Context<Self>) -> Self::Result {
        self.insert(key, value)
    }
}

impl Handler<Incr> for InMemoryDatastore {
    type Result = Result<Counter, String>;
    fn handle(&mut self, Incr(key): Incr, _: &mut Context<Self>) -> Self::Result {
        let current = match self.map.get(&key) {
            None => 0,
            Some(text) => text
                .parse::<u64>()
                .map_err(|_| format!("`{key}` holds {text:?}, not a number"))?,
        };
        let value = current + 1;
        self.insert(key, value.to_string())?;
        Ok(Counter { value, by: Hop::here() })
    }
}

impl Handler<Scan> for InMemoryDatastore {
    type Result = MessageResult<Scan>;
    fn handle(&mut self, Scan(prefix): Scan, _: &mut Context<Self>) -> Self::Result {
        let mut found: Vec<(String, String)> = self
            .map
            .iter()
            .filter(|(key, _)| key.starts_with(&prefix))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        found.sort();
        MessageResult(found)
    }
}

impl RemoteActor for InMemoryDatastore {
    const NAME: &'static str = "inMemoryDatastore";
    type Messages = evilcluster::messages![Get, Put, Incr, Scan];
}

/// The api layer: stateless apart from its own request count.
#[derive(Default)]
struct WebserverApi {
    visits_recorded: u64,
}

impl Actor for WebserverApi {
    type Context = Context<Self>;
}

impl Handler<RecordVisit> for WebserverApi {
    type Result = ResponseFuture<Result<Visit, String>>;
    fn handle(&mut self, RecordVisit { user }: RecordVisit, _: &mut Context<Self>) -> Self::Result {
        self.visits_recorded += 1;
        Box::pin(async move {
            let store = evilcluster::addr_of::<InMemoryDatastore>();
            let counter = store
                .send(Incr(format!("visits:{user}")))
                .await
                .map_err(|e| e.to_string())??;
            let profile = store
                .send(Get(format!("profile:{user}")))
                .await
                .map_err(|e| e.to_string())?;
            Ok(Visit {
                number: counter.value,
                profile,
                api: Hop::here(),
                datastore: counter.by,
            })
        })
    }
}

impl Handler<Health> for WebserverApi {
    type Result = MessageResult<Health>;
    fn handle(&mut self, _: Health, _: &mut Context<Self>) -> Self::Result {
        MessageResult(ApiHealth {
            by: Hop::here(),
            visits_recorded: self.visits_recorded,
        })
    }
}

impl Handler<ReadProfile> for WebserverApi {
    type Result = ResponseFuture<Option<String>>;
    fn handle(&mut self, ReadProfile { user }: ReadProfile, _: &mut Context<Self>) -> Self::Result {
        Box::pin(async move {
            evilcluster::addr_of::<InMemoryDatastore>()
                .send(Get(format!("profile:{user}")))
                .await
                .ok()
                .flatten()
        })
    }
}

impl RemoteActor for WebserverApi {
    const NAME: &'static str = "webserverApi";
    type Messages = evilcluster::messages![RecordVisit, Health, ReadProfile];
}

/// The frontend layer: turns an api answer into a page.
#[derive(Default)]
struct WebserverFrontend {
    site: String,
    /// This fork's HTTP server on the shared port.
    http: Option<actix_web::dev::ServerHandle>,
}

impl Actor for WebserverFrontend {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.site = evilcluster::options::<FrontendOptions>()
            .map(|o| o.site.to_owned())
            .unwrap_or_else(|| "an unnamed site".into());
        // Every fork serves HTTP on the port its spawn bound once.
        if let Some(listener) = evilcluster::listener() {
            self.http = serve_http(listener, self.site.clone());
        }
    }

    /// On a graceful stop (shutdown, rolling restart), the HTTP requests
    /// under way finish first; the other forks take the new connections.
    fn stopping(&mut self, ctx: &mut Context<Self>) -> actix::Running {
        let Some(server) = self.http.take() else {
            return actix::Running::Stop;
        };
        evilcluster_suite::http::finish_then_stop(server, ctx);
        actix::Running::Continue
    }
}

/// A page for `user`: the visit is recorded by an api fork, which reads the
/// profile from the datastore.
async fn render(site: String, user: String) -> Result<Page, String> {
    let visit = evilcluster::addr_of::<WebserverApi>()
        .send(RecordVisit { user: user.clone() })
        .await
        .map_err(|e| e.to_string())??;
    let who = visit.profile.clone().unwrap_or_else(|| "anonymous visitor".into());
    let title = match visit.number {
        1 => format!("Welcome to {site}, {user} ({who})"),
        n => format!("Welcome back to {site}, {user} ({who}), visit #{n}"),
    };
    Ok(Page {
        title,
        frontend: Hop::here(),
        visit,
    })
}

/// `GET /{user}` with actix-web on the shared listener; the handler calls the
/// api and the datastore in other processes with `addr_of`.
fn serve_http(listener: std::net::TcpListener, site: String) -> Option<actix_web::dev::ServerHandle> {
    let app = move || {
        let site = site.clone();
        actix_web::App::new()
            // Read-only: answered even while forks die (idempotent calls).
            .route(
                "/profile/{user}",
                actix_web::web::get().to(|user: actix_web::web::Path<String>| async move {
                    let user = user.into_inner();
                    match evilcluster::addr_of::<WebserverApi>()
                        .send(ReadProfile { user: user.clone() })
                        .await
                    {
                        Ok(Some(profile)) => actix_web::HttpResponse::Ok().body(format!("{user}: {profile}\n")),
                        Ok(None) => actix_web::HttpResponse::Ok().body(format!("{user}: no profile\n")),
                        Err(error) => actix_web::HttpResponse::BadGateway().body(error.to_string()),
                    }
                }),
            )
            .route(
                "/{user}",
                actix_web::web::get().to(move |user: actix_web::web::Path<String>| {
                    let site = site.clone();
                    async move {
                        match render(site, user.into_inner()).await {
                            Ok(page) => actix_web::HttpResponse::Ok().body(describe(&page)),
                            Err(error) => actix_web::HttpResponse::BadGateway().body(error),
                        }
                    }
                }),
            )
    };
    match actix_web::HttpServer::new(app)
        .workers(1)
        .disable_signals()
        .shutdown_timeout(5)
        .listen(listener)
    {
        Ok(server) => {
            let server = server.run();
            let handle = server.handle();
            actix_rt::spawn(server);
            Some(handle)
        }
        Err(error) => {
            tracing::error!(%error, "cannot serve HTTP");
            None
        }
    }
}

impl Handler<Render> for WebserverFrontend {
    type Result = ResponseFuture<Result<Page, String>>;
    fn handle(&mut self, Render { user }: Render, _: &mut Context<Self>) -> Self::Result {
        Box::pin(render(self.site.clone(), user))
    }
}

impl RemoteActor for WebserverFrontend {
    const NAME: &'static str = "webserverFrontend";
    type Messages = evilcluster::messages![Render];
}

// --------------------------------------------------------------------- task

/// `backgroundTaskManager`: every `interval_ms`, for `rounds` rounds, sums
/// the visit counters into `report` (text) and `report:visits` (the total).
async fn background() -> TaskResult {
    let options = evilcluster::options::<TaskOptions>().ok_or("backgroundTaskManager has no TaskOptions")?;
    let store = evilcluster::addr_of::<InMemoryDatastore>();
    let api = evilcluster::addr_of::<WebserverApi>();
    let mut ticks = tokio::time::interval(Duration::from_millis(options.interval_ms));
    for round in 1..=options.rounds {
        ticks.tick().await;
        let counters = store.send(Scan("visits:".into())).await?;
        let mut per_user = Vec::new();
        let mut total = 0;
        for (key, value) in &counters {
            let visits: u64 = value.parse()?;
            total += visits;
            per_user.push(format!("{} {visits}", key.trim_start_matches("visits:")));
        }
        let health = api.send(Health).await?;
        let report = format!(
            "round {round}/{} by {}: {total} visits from {} users [{}]; {} has recorded {} visits",
            options.rounds,
            Hop::here(),
            counters.len(),
            per_user.join(", "),
            health.by,
            health.visits_recorded,
        );
        store.send(Put("report".into(), report)).await??;
        store.send(Put("report:visits".into(), total.to_string())).await??;
    }
    tracing::info!(rounds = options.rounds, "background task manager done");
    Ok(())
}

// ------------------------------------------------------------------- master

const USERS: [&str; 12] = [
    "alice", "bob", "carol", "alice", "dave", "bob", "alice", "eve", "carol", "alice", "bob", "mallory",
];

fn describe(page: &Page) -> String {
    format!(
        "{} → {} → {}: {:?}",
        page.frontend, page.visit.api, page.visit.datastore, page.title
    )
}

/// `GET {path}` over HTTP/1.1 to `address`: the body of a 200 answer.
async fn http_get(address: &str, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.map_err(|e| e.to_string())?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(format!("GET {path}: {response:?}")),
    }
}

/// The address the frontend's forks share, as its spawn announced it.
fn frontend_address() -> Result<String, String> {
    evilcluster::members()
        .into_iter()
        .find_map(|m| {
            m.hosting
                .listen
                .clone()
                .filter(|_| m.worker() == WebserverFrontend::NAME)
                .map(String::from)
        })
        .ok_or_else(|| "webserverFrontend announced no listening address".to_owned())
}

/// What the master runs once the tree is ready.
async fn demo(serve: bool) -> Result<(), String> {
    let frontend = evilcluster::addr_of::<WebserverFrontend>();
    let address = frontend_address()?;
    println!("webserverFrontend: both forks serve http://{address}/");
    for (i, user) in USERS.iter().enumerate() {
        let page = http_get(&address, &format!("/{user}")).await?;
        println!("request {:>2} GET /{user:<8} → {page}", i + 1);
    }

    // Wait for a report that has seen every request.
    let store = evilcluster::addr_of::<InMemoryDatastore>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = store
            .send(Get("report:visits".into()))
            .await
            .map_err(|e| e.to_string())?
            .and_then(|n| n.parse::<usize>().ok());
        if seen >= Some(USERS.len()) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "backgroundTaskManager never reported {} visits (last seen: {seen:?})",
                USERS.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = store
        .send(Get("report".into()))
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    println!("report: {report}");

    let mut members = evilcluster::members();
    members.sort_by_key(|m| (m.hosting.order, m.fork));
    println!("members:");
    for m in &members {
        println!(
            "  {:<34} {:<6} pid {:<7} {}",
            m.path,
            m.role,
            m.pid,
            m.hosting.actor_type.as_deref().unwrap_or("-")
        );
    }

    if serve {
        println!("serving http://{address}/<user>");
        serve_until_signal(frontend).await?;
    }
    Ok(())
}

/// `--serve`: renders a page for every user name typed on stdin, until
/// SIGINT or SIGTERM.
async fn serve_until_signal(frontend: RemoteAddr<WebserverFrontend>) -> Result<(), String> {
    println!("serving: type a user name and Enter for a page; Ctrl-C stops the cluster");
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdin_open = true;
    let signal = evilcluster::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            line = lines.recv(), if stdin_open => match line {
                None => stdin_open = false,
                Some(line) => {
                    let user = line.trim();
                    if user.is_empty() {
                        continue;
                    }
                    match frontend.send(Render { user: user.into() }).await {
                        Ok(Ok(page)) => println!("GET /{user} → {}", describe(&page)),
                        Ok(Err(e)) => println!("GET /{user} failed: {e}"),
                        Err(e) => println!("GET /{user} failed: {e}"),
                    }
                }
            },
        }
    }
    println!("shutdown signal received; stopping the cluster");
    Ok(())
}

fn main() -> ExitCode {
    // In the master: how long the tree takes to be ready (issue 12's "Start").
    let began = std::time::Instant::now();
    let mut serve = std::env::args().skip(1).any(|arg| arg == "--serve");
    // `--port N` to choose the port; by default any free one.
    let args: Vec<String> = std::env::args().collect();
    // As one of several hosts (with NATS): `--only w1,w2` runs only these
    // workers here, `--without w1,w2` all but these.
    let list = |flag: &str| {
        args.iter()
            .position(|arg| arg == flag)
            .and_then(|at| args.get(at + 1))
            .map(|names| names.split(',').map(str::to_owned).collect::<Vec<String>>())
    };
    let (only, without) = (list("--only"), list("--without"));
    let off = |name: &str| {
        only.as_ref().is_some_and(|only| !only.iter().any(|n| n == name))
            || without
                .as_ref()
                .is_some_and(|without| without.iter().any(|n| n == name))
    };
    // A host without the frontend has no demo to play: it serves the
    // other hosts until stopped.
    let frontend_here = !off("webserverFrontend");
    serve |= !frontend_here;
    let port = args
        .iter()
        .position(|arg| arg == "--port")
        .and_then(|at| args.get(at + 1))
        .map_or("0", String::as_str);
    let outcome = Cluster::new("myapp")
        .spawn(
            Worker::actor::<WebserverFrontend>()
                .forks(2)
                .listen(format!("127.0.0.1:{port}"))
                .options(FrontendOptions { site: "MyApp" })
                .disable(off("webserverFrontend")),
        )
        .spawn(Worker::actor::<WebserverApi>().forks(2).disable(off("webserverApi")))
        .spawn(
            Worker::actor::<InMemoryDatastore>()
                .disable(off("inMemoryDatastore"))
                .options(DatastoreOptions {
                    capacity: 64,
                    profiles: vec![
                        ("alice", "Alice Liddell, admin"),
                        ("bob", "Bob Builder, editor"),
                        ("carol", "Carol Danvers, reader"),
                        ("dave", "Dave Lister, reader"),
                        ("eve", "Eve Moneypenny, auditor"),
                    ],
                }),
        )
        // Its job ends: restarted only if it fails.
        .spawn(
            Worker::task("backgroundTaskManager", background)
                .restart(Restart::Transient)
                .options(TaskOptions {
                    interval_ms: 200,
                    rounds: 25,
                })
                .disable(off("backgroundTaskManager")),
        )
        .run_with(move |cluster| {
            let ready = began.elapsed();
            let members = cluster.members();
            // What starting cost the machine: with fewer CPUs than
            // processes, the tree cannot be ready before CPU / CPUs.
            let cpu: Option<f64> = members.iter().map(|m| cpu_ms(m.pid)).sum();
            println!(
                "tree ready in {:.1} ms ({} processes{})",
                ready.as_secs_f64() * 1e3,
                members.len(),
                cpu.map(|ms| format!(", {ms:.1} ms of CPU on {} CPUs", available_cpus()))
                    .unwrap_or_default()
            );
            async move {
                if frontend_here {
                    demo(serve).await
                } else {
                    println!("serving this host's workers to the other hosts; Ctrl-C stops");
                    std::future::pending().await
                }
            }
        });
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(failure)) => {
            eprintln!("realapp: {failure}");
            ExitCode::FAILURE
        }
        // A signal before the demo finished (or, with --serve, while serving):
        // the runtime has already stopped the tree cleanly.
        Err(evilcluster::Error::Interrupted) => {
            if !serve {
                eprintln!("realapp: interrupted; the cluster was stopped");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("realapp: {error}");
            ExitCode::FAILURE
        }
    }
}

/// CPU time process `pid` has used so far, in milliseconds, from the
/// scheduler's count of each of its threads (Linux, `/proc/PID/task/*/schedstat`);
/// `None` where that is not available.
fn cpu_ms(pid: u32) -> Option<f64> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        nanos += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(nanos as f64 / 1e6)
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
