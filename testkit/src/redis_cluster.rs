//! A Redis Cluster of the test's own: `n` primaries (`redis-server --cluster-enabled yes`)
//! on free loopback ports, joined with `redis-cli --cluster create ... --cluster-replicas 0`
//! so the 16384 slots are split evenly between them. Persistence is off, as for
//! [`crate::RedisServer`]: a node that is killed and restarted comes back empty but keeps
//! its identity and its slots (its `nodes.conf` stays in its directory), which is what a
//! lost primary without a replica looks like to the admission backend (the sales on its
//! slots answer "missing" until `flashsale reconcile` rebuilds them).

use crate::reap::{self, PidFile};
use crate::{free_port, kill_launched, launch, require_binary};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the cluster may take to agree on its slots after a start or a restart.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// One node of the cluster.
#[derive(Debug)]
struct Node {
    child: Option<Child>,
    pid_file: Option<PidFile>,
    port: u16,
    dir: tempfile::TempDir,
}

/// A Redis Cluster of the test's own (see the module doc).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    binary: PathBuf,
    cli: PathBuf,
}

impl RedisCluster {
    /// Starts `primaries` nodes (at least 3, as `redis-cli --cluster create` requires),
    /// joins them and waits until every node reports `cluster_state:ok`.
    pub fn start(primaries: usize) -> RedisCluster {
        assert!(primaries >= 3, "a Redis Cluster needs at least 3 primaries");
        reap::reap_once();
        let binary = require_binary("redis-server", "redis-server");
        let cli = require_binary("redis-cli", "redis-tools");
        let mut cluster = RedisCluster {
            nodes: (0..primaries)
                .map(|_| Node {
                    child: None,
                    pid_file: None,
                    port: free_port(),
                    dir: tempfile::tempdir().unwrap(),
                })
                .collect(),
            binary,
            cli,
        };
        for i in 0..primaries {
            cluster.spawn(i);
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(&cluster.cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ready();
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let (child, pid_file) = launch(
            Command::new(&self.binary)
                .args(["--bind", "127.0.0.1", "--port", &node.port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                // Short enough that a killed node is marked failed within a test.
                .args(["--cluster-node-timeout", "2000"])
                // A node that lost its slots' owner still serves the slots it owns.
                .args(["--cluster-require-full-coverage", "no"])
                .arg("--dir")
                .arg(node.dir.path())
                .current_dir(node.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
            node.port,
            node.dir.path(),
            "redis-server (cluster node)",
        );
        let node = &mut self.nodes[i];
        node.pid_file = Some(pid_file);
        node.child = Some(child);
    }

    /// `CLUSTER INFO` of the node on `port`, or `None` when it does not answer.
    fn cluster_info(&self, port: u16) -> Option<String> {
        let out = Command::new(&self.cli)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "cluster",
                "info",
            ])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until every running node says `cluster_state:ok` and knows every slot.
    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            let infos: Vec<Option<String>> = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| self.cluster_info(n.port))
                .collect();
            let ready = infos.iter().all(|i| {
                i.as_deref().is_some_and(|i| {
                    i.contains("cluster_state:ok") && i.contains("cluster_slots_ok:16384")
                })
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not agree on its slots within {READY_DEADLINE:?}: {infos:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...` (every node a seed).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// `redis://127.0.0.1:PORT/` of node `i` (a plain connection to that node).
    pub fn node_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}/", self.nodes[i].port)
    }

    /// The process id of node `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// The port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// How many nodes it has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has no node (never: [`RedisCluster::start`] wants three).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node serving `key`'s slot (`CLUSTER KEYSLOT`, then the owner in `CLUSTER NODES`,
    /// asked of a running node).
    pub fn node_of(&self, key: &str) -> usize {
        let ask = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a running node")
            .port
            .to_string();
        let cli = |args: &[&str]| -> String {
            let out = Command::new(&self.cli)
                .args(["-h", "127.0.0.1", "-p", &ask])
                .args(args)
                .output()
                .expect("redis-cli");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let slot: u16 = cli(&["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("a slot");
        // `<id> <ip:port@cport[,hostname]> <flags> <primary> <ping> <pong> <epoch> <state>
        // <slot or start-end>...`
        let nodes = cli(&["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = fields
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            let owns = fields.iter().skip(8).any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                matches!(
                    (start.parse::<u16>(), end.parse::<u16>()),
                    (Ok(s), Ok(e)) if (s..=e).contains(&slot)
                )
            });
            if owns {
                if let Some(i) = self.nodes.iter().position(|n| n.port == port) {
                    return i;
                }
            }
        }
        panic!("no node of the cluster serves slot {slot}:\n{nodes}");
    }

    /// Kills node `i` with SIGKILL (its data is lost: persistence is off).
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        kill_launched(&mut node.child, &mut node.pid_file);
    }

    /// Starts node `i` again on its port, empty but with its slots (its `nodes.conf`), and
    /// waits until the cluster is whole again.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ready();
    }

    /// The directory of node `i`.
    pub fn dir(&self, i: usize) -> &Path {
        self.nodes[i].dir.path()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
