//! Test harness: real servers for tests (redis-server, the tansu Kafka-protocol broker),
//! started on free loopback ports in temporary directories and killed when dropped.
//!
//! Every test that needs a server starts its own (a redis-server starts in milliseconds),
//! so tests never share state and need no key prefixes to stay apart. When a server's
//! binary is missing, the harness fails with a message naming the binary and the setup
//! script that installs it.
#![allow(clippy::unwrap_used)] // test support: a broken harness should fail loudly

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

/// A redis-server of the test's own, with persistence off.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
}

impl RedisServer {
    /// Starts redis-server on a free port; panics with a clear message if it cannot.
    pub fn start() -> RedisServer {
        let binary = require_binary("redis-server", "redis-server");
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir,
            binary,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        wait_for_port(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            &mut child,
            "redis-server",
        );
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

    /// Kills it with SIGKILL (its data is lost: persistence is off).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
        let mut child = Command::new(&self.binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &self.storage])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        wait_for_port(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            &mut child,
            "tansu broker",
        );
        self.child = Some(child);
    }

    /// `127.0.0.1:PORT`, the bootstrap servers.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
    }
}
