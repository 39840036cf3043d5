//! Test harness: real servers for tests (redis-server and Redis Clusters, the tansu Kafka-protocol broker,
//! Postgres, Prometheus, a SeaweedFS S3 server), started on free loopback ports in temporary
//! directories and killed when dropped.
//!
//! Every test that needs a server starts its own (a redis-server starts in milliseconds),
//! so tests never share state and need no key prefixes to stay apart. When a server's
//! binary is missing, the harness fails with a message naming the binary and the setup
//! script that installs it.
#![allow(clippy::unwrap_used)] // test support: a broken harness should fail loudly

mod cql;
mod reap;
mod redis_cluster;
mod s3;
mod wait;

pub use cql::CqlServer;
pub use redis_cluster::RedisCluster;
pub use s3::S3Server;

pub use reap::{pid_dir, reap_orphans};
pub use wait::{eventually, eventually_ok, wait_until};

use reap::PidFile;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The script that installs every server the tests need.
pub const SETUP: &str = "scripts/test.sh";

/// Finds `binary` on PATH (or in the usual sbin directories) or panics with a clear message.
pub fn require_binary(binary: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{binary}` is not installed: run {SETUP} (it installs the Debian package \
                 `{package}`), or `apt-get install {package}`"
            )
        })
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

fn wait_for_port(addr: SocketAddr, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited during start-up ({status}); see its output above");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `command` (a server listening on `port` of 127.0.0.1, running in `dir`), waits
/// until it listens, and records its pid file.
fn launch(command: &mut Command, port: u16, dir: &Path, what: &str) -> (Child, PidFile) {
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    wait_for_port(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        &mut child,
        what,
    );
    let pid_file = PidFile::record(&child, dir);
    (child, pid_file)
}

/// SIGKILLs a server started by [`launch`] (if it runs) and drops its pid file.
fn kill_launched(child: &mut Option<Child>, pid_file: &mut Option<PidFile>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    *pid_file = None;
}

/// A redis-server of the test's own, with persistence off.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    pid_file: Option<PidFile>,
    port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
}

impl RedisServer {
    /// Starts redis-server on a free port; panics with a clear message if it cannot.
    pub fn start() -> RedisServer {
        reap::reap_once();
        let binary = require_binary("redis-server", "redis-server");
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer {
            child: None,
            pid_file: None,
            port: free_port(),
            dir,
            binary,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let (child, pid_file) = launch(
            Command::new(&self.binary)
                .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .arg("--dir")
                .arg(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
            self.port,
            self.dir.path(),
            "redis-server",
        );
        self.pid_file = Some(pid_file);
        self.child = Some(child);
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it with SIGKILL (its data is lost: persistence is off).
    pub fn kill(&mut self) {
        kill_launched(&mut self.child, &mut self.pid_file);
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The directory it runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tansu Kafka-protocol broker of the test's own.
#[derive(Debug)]
pub struct TansuBroker {
    child: Option<Child>,
    pid_file: Option<PidFile>,
    port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
    storage: String,
}

impl TansuBroker {
    /// Starts a broker keeping records in memory.
    pub fn start() -> TansuBroker {
        Self::start_with_storage("memory://tansu/")
    }

    /// Starts a broker keeping records in SQLite inside its directory, so they survive
    /// `kill -9` and a restart.
    pub fn start_durable() -> TansuBroker {
        Self::start_with_storage("sqlite://broker.db")
    }

    fn start_with_storage(storage: &str) -> TansuBroker {
        reap::reap_once();
        let binary = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cargo/bin/tansu"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| {
                std::env::var_os("PATH")
                    .and_then(|p| {
                        std::env::split_paths(&p)
                            .map(|d| d.join("tansu"))
                            .find(|p| p.is_file())
                    })
                    .unwrap_or_else(|| {
                        panic!(
                            "`tansu` is not installed: run {SETUP} (it runs `cargo install \
                             tansu --locked --features dynostore,libsql`)"
                        )
                    })
            });
        let mut broker = TansuBroker {
            child: None,
            pid_file: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            binary,
            storage: storage.to_owned(),
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // The sqlite path is taken relative to the working directory: run inside the dir.
        // Its stderr (panics above all) goes to `tansu.log` in its directory, across restarts.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let (child, pid_file) = launch(
            Command::new(&self.binary)
                .arg("broker")
                .args(["--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", &self.storage])
                .current_dir(self.dir.path())
                .stdout(Stdio::null())
                .stderr(log),
            self.port,
            self.dir.path(),
            "tansu broker",
        );
        self.pid_file = Some(pid_file);
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    /// What the broker wrote to stderr so far (every run of it, restarts included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `127.0.0.1:PORT`, the bootstrap servers.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        kill_launched(&mut self.child, &mut self.pid_file);
    }

    /// Freezes it (SIGSTOP): connections stay open but nothing is answered, as with a
    /// broker that hangs or a network partition.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws it (SIGCONT) after [`TansuBroker::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill {sig} of the broker failed");
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        // A paused process cannot die until it is continued.
        self.resume();
        self.kill();
        // A broker that panicked (tansu answers every later request with an error) is the
        // likely cause of a failing test: say so in the test's output.
        let log = self.log();
        if let Some(at) = log.find("panicked at") {
            let tail: String = log[at..].lines().take(3).collect::<Vec<_>>().join("\n");
            eprintln!(
                "testkit: the tansu broker on port {} panicked: {tail}",
                self.port
            );
        }
    }
}

/// The directory holding both `initdb` and `postgres` (and `createdb`): PATH first, then
/// Debian's `/usr/lib/postgresql/VERSION/bin`, highest version first. Panics naming the
/// missing binary and [`SETUP`] when there is none.
fn postgres_bin_dir() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versioned.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(versioned.into_iter().map(|(_, d)| d))
        .collect();
    for binary in ["initdb", "postgres", "createdb"] {
        if !dirs.iter().any(|d| d.join(binary).is_file()) {
            panic!(
                "`{binary}` is not installed: run {SETUP} (it installs the Debian package \
                 `postgresql`), or `apt-get install postgresql`"
            );
        }
    }
    dirs.into_iter()
        .find(|d| {
            ["initdb", "postgres", "createdb"]
                .iter()
                .all(|b| d.join(b).is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "no directory holds `initdb`, `postgres` and `createdb` of one installation: \
                 run {SETUP} (it installs the Debian package `postgresql`)"
            )
        })
}

/// The system user the servers run as when the tests run as root (initdb refuses root).
const POSTGRES_USER: &str = "postgres";
/// The database superuser of every test server (trust authentication, no password).
const PG_SUPERUSER: &str = "postgres";

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// uid and gid of a system user, from `id`.
fn user_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, user])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `id {flag} {user}`: {e}"));
        assert!(
            out.status.success(),
            "the tests run as root, so postgres must run as the system user `{user}`, which \
             does not exist: run {SETUP} (the Debian package `postgresql` creates it)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    (id("-u"), id("-g"))
}

/// A Postgres server of the test's own: a fresh cluster (`initdb`, trust authentication)
/// in a temporary directory, listening on 127.0.0.1 on a free port, with its unix socket in
/// that directory. As root (machines and CI), it runs as the `postgres` system user via
/// `setpriv`, which execs, so the child process is the postmaster itself.
#[derive(Debug)]
pub struct PostgresServer {
    child: Option<Child>,
    pid_file: Option<PidFile>,
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `(uid, gid)` to run as, when the tests run as root.
    run_as: Option<(u32, u32)>,
    /// Frozen by [`PostgresServer::freeze`]: the processes stopped.
    frozen: Vec<u32>,
}

/// The processes whose parent is `pid` (from `/proc`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                // `pid (comm) state ppid ...`: the comm may hold spaces, not `)`.
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn send_signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let ok = Command::new("kill")
        .arg(sig)
        .args(pids.iter().map(u32::to_string))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pids:?} failed");
}

impl PostgresServer {
    /// Freezes it: SIGSTOP to the postmaster and every process it runs (the sessions'
    /// backends), so connections stay open but nothing is answered and TCP never gives up,
    /// as with a hung host. [`PostgresServer::thaw`] resumes it; dropping it thaws it first.
    pub fn freeze(&mut self) {
        let Some(c) = &self.child else {
            return;
        };
        let postmaster = c.id();
        // The postmaster first, so it forks nothing after its children are listed.
        send_signal("-STOP", &[postmaster]);
        let children = children_of(postmaster);
        send_signal("-STOP", &children);
        self.frozen = std::iter::once(postmaster).chain(children).collect();
    }

    /// Resumes a server stopped by [`PostgresServer::freeze`].
    pub fn thaw(&mut self) {
        let frozen = std::mem::take(&mut self.frozen);
        // The children first, then the postmaster.
        send_signal("-CONT", &frozen.iter().rev().copied().collect::<Vec<_>>());
    }

    /// Creates a cluster and starts it; panics with a clear message if it cannot.
    pub fn start() -> PostgresServer {
        reap::reap_once();
        let bin = postgres_bin_dir();
        let run_as = running_as_root().then(|| user_ids(POSTGRES_USER));
        // The server user must reach the directory: make it under /tmp (world-traversable)
        // and hand it over.
        let dir = tempfile::Builder::new()
            .prefix("flashsale-pg-")
            .tempdir_in(if run_as.is_some() {
                PathBuf::from("/tmp")
            } else {
                std::env::temp_dir()
            })
            .unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut server = PostgresServer {
            child: None,
            pid_file: None,
            port: free_port(),
            dir,
            bin,
            run_as,
            frozen: Vec::new(),
        };
        server.initdb();
        server.spawn();
        server
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command for a server binary, run as the server user when the tests run as root.
    fn server_command(&self, binary: &str) -> Command {
        let program = self.bin.join(binary);
        match self.run_as {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn initdb(&self) {
        let out = self
            .server_command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                PG_SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .arg("--no-sync")
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb in {}: {e}", self.bin.display()));
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid)).unwrap();
        }
        let mut child = self
            .server_command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=16MB"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres in {}: {e}", self.bin.display()));
        self.pid_file = Some(PidFile::record(&child, self.dir.path()));
        self.wait_ready(&mut child);
        self.child = Some(child);
    }

    /// Waits until the postmaster reports `ready` in `postmaster.pid` (as `pg_ctl -w` does)
    /// and its port accepts connections.
    fn wait_ready(&self, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid_file = self.data_dir().join("postmaster.pid");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "postgres exited during start-up ({status}); its log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            let ready = std::fs::read_to_string(&pid_file)
                .map(|text| {
                    let lines: Vec<&str> = text.lines().collect();
                    lines.first().map(|l| l.trim()) == Some(&child.id().to_string())
                        && lines.get(7).map(|l| l.trim()) == Some("ready")
                })
                .unwrap_or(false);
            if ready && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "postgres was not ready on {addr} within 30 s; its log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Creates database `name` (owned by the superuser).
    pub fn create_database(&self, name: &str) {
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", PG_SUPERUSER, "-w", name])
            .output()
            .unwrap_or_else(|e| panic!("cannot run createdb: {e}"));
        assert!(
            out.status.success(),
            "createdb {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB` (trust authentication: no password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{PG_SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory it runs in (the cluster is in `data/`, the log in `postgres.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill {sig} of postgres failed");
        }
    }

    /// Stops it with a fast shutdown (SIGINT: sessions are ended, the data is kept) and
    /// waits until it has exited.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal("-INT");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                self.pid_file = None;
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("postgres did not stop within 30 s of a fast shutdown");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts it again after [`PostgresServer::stop`], on the same port with the same data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "postgres is running already");
        self.spawn();
    }

    /// Kills it: an immediate shutdown (SIGQUIT, the postmaster ends its sessions), then
    /// SIGKILL if it has not exited within 5 s.
    pub fn kill(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.thaw();
        self.signal("-QUIT");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.pid_file = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        self.pid_file = None;
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Postgres for the sharded store: one [`PostgresServer`] per shard (so one shard can be
/// stopped alone), database `flashsale_catalog` on server 0 and `flashsale_shard_{i}` on
/// server `i`.
#[derive(Debug)]
pub struct PostgresCluster {
    servers: Vec<PostgresServer>,
}

impl PostgresCluster {
    /// Starts `shards` servers (at once) and creates the databases.
    pub fn start(shards: usize) -> PostgresCluster {
        assert!(shards > 0, "a cluster needs at least one shard");
        let servers: Vec<PostgresServer> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..shards)
                .map(|i| {
                    s.spawn(move || {
                        let server = PostgresServer::start();
                        if i == 0 {
                            server.create_database("flashsale_catalog");
                        }
                        server.create_database(&format!("flashsale_shard_{i}"));
                        server
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        PostgresCluster { servers }
    }

    /// The catalog database's URL (on server 0).
    pub fn catalog_url(&self) -> String {
        self.servers[0].url("flashsale_catalog")
    }

    /// The shard databases' URLs, shard `i` at index `i`.
    pub fn shard_urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .enumerate()
            .map(|(i, s)| s.url(&format!("flashsale_shard_{i}")))
            .collect()
    }

    /// The server of shard `i` (server 0 also holds the catalog).
    pub fn server(&self, i: usize) -> &PostgresServer {
        &self.servers[i]
    }

    /// Stops the server of shard `i` (fast shutdown; data kept). Stopping shard 0 stops the
    /// catalog too.
    pub fn stop_shard(&mut self, i: usize) {
        self.servers[i].stop();
    }

    /// Starts the server of shard `i` again, same port and data.
    pub fn start_shard(&mut self, i: usize) {
        self.servers[i].start_again();
    }

    /// Freezes the server of shard `i` (see [`PostgresServer::freeze`]).
    pub fn freeze_shard(&mut self, i: usize) {
        self.servers[i].freeze();
    }

    /// Resumes the server of shard `i` after [`PostgresCluster::freeze_shard`].
    pub fn thaw_shard(&mut self, i: usize) {
        self.servers[i].thaw();
    }
}

/// A Prometheus server of the test's own (the Debian `prometheus` binary), listening on a
/// free loopback port, with its TSDB in a temporary directory and its log in
/// `prometheus.log` there. Query it over its HTTP API at [`PrometheusServer::url`].
#[derive(Debug)]
pub struct PrometheusServer {
    child: Option<Child>,
    _pid_file: PidFile,
    port: u16,
    dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// The text of a `prometheus.yml` that scrapes every second: one job per
    /// `(job_name, targets)`, targets as `host:port`.
    pub fn scrape_config(jobs: &[(&str, Vec<String>)]) -> String {
        let mut out = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n",
        );
        for (job, targets) in jobs {
            let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
            out.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        out
    }

    /// Starts Prometheus scraping `jobs` every second (see [`PrometheusServer::scrape_config`]).
    pub fn scraping(jobs: &[(&str, Vec<String>)]) -> PrometheusServer {
        Self::start(&Self::scrape_config(jobs))
    }

    /// Starts Prometheus with `config`, the text of a `prometheus.yml` (written to its
    /// directory, so relative `rule_files` are looked for there: give absolute paths), and
    /// waits until `/-/ready` answers 200. Panics with its log when it does not start.
    pub fn start(config: &str) -> PrometheusServer {
        reap::reap_once();
        let binary = require_binary("prometheus", "prometheus");
        let dir = tempfile::Builder::new()
            .prefix("flashsale-prometheus-")
            .tempdir()
            .unwrap();
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let port = free_port();
        let mut child = Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "prometheus exited during start-up ({status}); its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if http_get_status(port, "/-/ready") == Some(200) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "prometheus was not ready on 127.0.0.1:{port} within 30 s; its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        PrometheusServer {
            _pid_file: PidFile::record(&child, dir.path()),
            child: Some(child),
            port,
            dir,
        }
    }

    /// `http://127.0.0.1:PORT`, the base of its HTTP API (`/api/v1/query`, ...).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory it runs in (`prometheus.yml`, `prometheus.log`, `data/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What it logged so far (warnings and errors), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The status code of `GET path` on 127.0.0.1:`port` (HTTP/1.0, no client crate), or
/// `None` when nothing answers.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    http_status(port, "GET", path, b"")
}

/// The status code of `METHOD path` with `body` on 127.0.0.1:`port` (HTTP/1.0, no client
/// crate), or `None` when nothing answers within 2 s.
fn http_status(port: u16, method: &str, path: &str, body: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .ok()?;
    stream.write_all(body).ok()?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head).ok()?;
    // "HTTP/1.0 200 OK": the code is the second word of the status line.
    std::str::from_utf8(&head[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
