//! Servers left behind by a killed test run. A test process that is killed (a CI timeout,
//! ^C, `kill -9`) never runs the `Drop` that stops its servers, and a redis-server,
//! postgres or tansu then runs on with its temporary directory. Every server the harness
//! starts gets a pid file in [`pid_dir`] naming the server, the test process that owns it
//! (each with its start time, so a reused pid is never mistaken for either) and its
//! directory; the file goes when the server is stopped. The first server a test process
//! starts reaps first: every server whose owner is gone is killed (with the processes it
//! forked, such as postgres backends), its directory removed, and its pid file deleted,
//! with the files it made outside its directory that the pid file lists (SeaweedFS's gRPC
//! sockets in /tmp).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Once;

/// Where the pid files live: `$TMPDIR/flashsale-testkit/`.
pub fn pid_dir() -> PathBuf {
    std::env::temp_dir().join("flashsale-testkit")
}

/// A process's start time (clock ticks since boot, `/proc/PID/stat` field 22), or `None`
/// when no such process runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: the comm may hold spaces, not `)`; starttime is the
    // 20th field after it.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The pid file of one running server; removed when dropped (the server was stopped).
#[derive(Debug)]
pub(crate) struct PidFile(PathBuf);

impl PidFile {
    /// Records `child`, a server running in `dir`, as owned by this test process.
    pub(crate) fn record(child: &Child, dir: &Path) -> PidFile {
        Self::record_with_files(child, dir, &[])
    }

    /// Records `child` as [`PidFile::record`] does, and `files` it makes outside `dir`:
    /// the reaper removes them too.
    pub(crate) fn record_with_files(child: &Child, dir: &Path, files: &[PathBuf]) -> PidFile {
        let owner = std::process::id();
        let pid = child.id();
        let mut text = format!(
            "{owner} {}\n{pid} {}\n{}\n",
            start_time(owner).unwrap_or(0),
            start_time(pid).unwrap_or(0),
            dir.display()
        );
        for file in files {
            text.push_str(&format!("{}\n", file.display()));
        }
        let path = pid_dir().join(format!("{pid}.pid"));
        std::fs::create_dir_all(pid_dir()).expect("the pid file directory");
        std::fs::write(&path, text).expect("a server's pid file");
        PidFile(path)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What one pid file says.
struct Entry {
    owner: (u32, u64),
    server: (u32, u64),
    dir: PathBuf,
    /// Files the server made outside its directory.
    files: Vec<PathBuf>,
}

fn parse(text: &str) -> Option<Entry> {
    let mut lines = text.lines();
    let mut pair = || -> Option<(u32, u64)> {
        let mut words = lines.next()?.split_whitespace();
        Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
    };
    let owner = pair()?;
    let server = pair()?;
    let dir = PathBuf::from(lines.next()?);
    let files = lines.map(PathBuf::from).collect();
    Some(Entry {
        owner,
        server,
        dir,
        files,
    })
}

/// Whether `(pid, start time)` is still the same running process.
fn alive((pid, started): (u32, u64)) -> bool {
    start_time(pid) == Some(started)
}

fn kill(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .status();
}

/// Kills every server whose owning test process is gone, removes its directory and its pid
/// file; returns the pids killed. Servers of live test processes are left alone, so test
/// binaries running side by side never reap each other's.
pub fn reap_orphans() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(pid_dir()) else {
        return Vec::new();
    };
    let mut killed = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        let Some(entry) = std::fs::read_to_string(&path).ok().and_then(|t| parse(&t)) else {
            // Half written by a live owner, or garbage: only an old one is removed.
            let old = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 60);
            if old {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        };
        if alive(entry.owner) {
            continue;
        }
        if alive(entry.server) {
            // The server and what it forked (a frozen postgres' stopped backends too).
            let pid = entry.server.0;
            let mut pids = crate::children_of(pid);
            pids.push(pid);
            kill(&pids);
            killed.push(pid);
        }
        if is_temporary(&entry.dir) {
            let _ = std::fs::remove_dir_all(&entry.dir);
        }
        for file in entry.files.iter().filter(|f| is_temporary(f)) {
            let _ = std::fs::remove_file(file);
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

/// Whether `path` is in a temporary directory (the only places the reaper removes from).
fn is_temporary(path: &Path) -> bool {
    path.starts_with(std::env::temp_dir()) || path.starts_with("/tmp")
}

/// Reaps once per test process, before its first server starts.
pub(crate) fn reap_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let killed = reap_orphans();
        if !killed.is_empty() {
            eprintln!(
                "testkit: killed {} server(s) left behind by a killed test run: {killed:?}",
                killed.len()
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_reads_back() {
        let e = parse("10 111\n20 222\n/tmp/x\n").expect("parse");
        assert_eq!((e.owner, e.server), ((10, 111), (20, 222)));
        assert_eq!(e.dir, PathBuf::from("/tmp/x"));
        assert!(e.files.is_empty());
        assert!(parse("10 111\n").is_none());
        let e = parse("10 111\n20 222\n/tmp/x\n/tmp/a.sock\n/tmp/b.sock\n").expect("parse");
        assert_eq!(
            e.files,
            [PathBuf::from("/tmp/a.sock"), PathBuf::from("/tmp/b.sock")]
        );
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id();
        let started = start_time(me).expect("own start time");
        assert!(alive((me, started)));
        assert!(!alive((me, started + 1)));
    }
}
