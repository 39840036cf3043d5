//! CPU time from `/proc`: this process (`/proc/self/stat` utime + stime), the load
//! generator's own threads (`/proc/self/task/TID/stat`, so they can be set apart), and
//! every descendant process (the redis-server, tansu and postgres servers testkit starts
//! are children of this process; postgres backends are children of their postmaster),
//! found by walking `/proc/*/stat` parent links. A descendant's reaped children count
//! through its `cutime + cstime`; a child that exits between two snapshots loses what it
//! used since the first.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::time::Duration;

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux when it cannot be asked).
pub fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The kernel id of the calling thread (from `/proc/thread-self`), 0 if unknown.
pub fn thread_id() -> u32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (utime + stime) the thread `tid` of this process has used so far, 0 if
/// unknown.
pub fn thread_cpu_s(tid: u32) -> f64 {
    if tid == 0 {
        return 0.0;
    }
    read_stat(&format!("/proc/self/task/{tid}/stat"))
        .map_or(0.0, |s| s.own as f64 / ticks_per_second())
}

/// The fields of a `stat` line this module needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// Command name.
    pub comm: String,
    /// Parent pid.
    pub ppid: u32,
    /// utime + stime, ticks.
    pub own: u64,
    /// cutime + cstime (reaped children), ticks.
    pub children: u64,
}

/// Parses a `/proc/PID/stat` line (the command name may hold spaces and parentheses).
pub fn parse_stat(line: &str) -> Option<Stat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field n is rest[n - 3].
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        comm,
        ppid: field(4)? as u32,
        own: field(14)? + field(15)?,
        children: field(16)? + field(17)?,
    })
}

fn read_stat(path: &str) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

/// CPU seconds process `pid` has used (utime + stime), `None` if it is gone.
pub fn pid_cpu_s(pid: u32) -> Option<f64> {
    read_stat(&format!("/proc/{pid}/stat")).map(|s| s.own as f64 / ticks_per_second())
}

/// CPU counters at one instant.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    process: u64,
    generator: u64,
    /// Descendant pid -> (command, utime + stime + cutime + cstime).
    descendants: HashMap<u32, (String, u64)>,
}

/// Every process below `root`, with its stat.
fn descendants_of(root: u32) -> HashMap<u32, Stat> {
    let mut all: HashMap<u32, Stat> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(s) = read_stat(&format!("/proc/{pid}/stat")) {
                all.insert(pid, s);
            }
        }
    }
    let mut out = HashMap::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        let kids: Vec<u32> = all
            .iter()
            .filter(|(_, s)| s.ppid == parent)
            .map(|(p, _)| *p)
            .collect();
        for k in kids {
            if let Some(s) = all.remove(&k) {
                out.insert(k, s);
                frontier.push(k);
            }
        }
    }
    out
}

impl CpuSnapshot {
    /// Takes a snapshot; `generator_tids` are this process's threads that belong to the
    /// load generator.
    pub fn take(generator_tids: &[u32]) -> Self {
        let me = std::process::id();
        let process = read_stat("/proc/self/stat").map_or(0, |s| s.own);
        let generator = generator_tids
            .iter()
            .filter(|t| **t != 0)
            .filter_map(|t| read_stat(&format!("/proc/self/task/{t}/stat")))
            .map(|s| s.own)
            .sum();
        let descendants = descendants_of(me)
            .into_iter()
            .map(|(pid, s)| (pid, (s.comm, s.own + s.children)))
            .collect();
        CpuSnapshot {
            process,
            generator,
            descendants,
        }
    }

    /// The CPU used from `earlier` to this snapshot, over `wall`.
    pub fn since(&self, earlier: &CpuSnapshot, wall: Duration) -> CpuUsage {
        let hz = ticks_per_second();
        let s = |ticks: u64| ticks as f64 / hz;
        let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
        let mut children = 0u64;
        for (pid, (comm, t1)) in &self.descendants {
            let t0 = earlier.descendants.get(pid).map_or(0, |(_, t)| *t);
            let d = t1.saturating_sub(t0);
            children += d;
            *by_name.entry(comm.clone()).or_default() += s(d);
        }
        let process = self.process.saturating_sub(earlier.process);
        let generator = self.generator.saturating_sub(earlier.generator);
        CpuUsage {
            wall_s: wall.as_secs_f64(),
            process_s: s(process),
            generator_s: s(generator),
            servers_s: s(children),
            servers_by_name: by_name,
            system_s: s(process.saturating_sub(generator) + children),
        }
    }
}

/// CPU used over a window, in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUsage {
    /// Length of the window.
    pub wall_s: f64,
    /// This whole process (system under test and load generator).
    pub process_s: f64,
    /// The load generator's threads (pacer and the client runtime's thread).
    pub generator_s: f64,
    /// The server processes below this one (redis-server, tansu, postgres).
    pub servers_s: f64,
    /// The same by command name.
    pub servers_by_name: BTreeMap<String, f64>,
    /// The system under test: this process less the generator, plus the servers.
    pub system_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 4 0";
        let s = parse_stat(line).expect("parses");
        assert_eq!(s.comm, "tokio (rt) 1");
        assert_eq!(s.ppid, 1);
        assert_eq!(s.own, 300);
        assert_eq!(s.children, 10);
    }

    #[test]
    fn own_process_and_thread_are_readable() {
        assert!(read_stat("/proc/self/stat").is_some());
        let tid = thread_id();
        assert!(tid > 0);
        let a = CpuSnapshot::take(&[tid]);
        // Burn a little CPU on this thread.
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let b = CpuSnapshot::take(&[tid]);
        let u = b.since(&a, t.elapsed());
        // The process's and the thread's counters are read one after the other, so the
        // thread can gain a tick (10 ms) the process reading missed.
        assert!(u.process_s + 0.021 >= u.generator_s, "{u:?}");
        assert!(u.generator_s > 0.0, "{u:?}");
    }
}
