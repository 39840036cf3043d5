//! A test run killed with `kill -9` leaves its servers running; the next harness start
//! kills them and removes their directories.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Set in the child test process: it starts a redis-server, says so, and waits to be
/// killed.
const CHILD: &str = "FLASHSALE_TESTKIT_REAP_CHILD";

/// Run only as the child of [`a_killed_test_runs_servers_are_reaped_at_the_next_start`].
#[test]
#[ignore = "the child half of a_killed_test_runs_servers_are_reaped_at_the_next_start"]
fn child_holds_a_redis_server_until_killed() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let redis = testkit::RedisServer::start();
    println!("redis {}", redis.dir().display());
    // Waits for the parent's SIGKILL, which comes as soon as it has read the line above.
    std::thread::sleep(Duration::from_secs(600));
}

/// The pid of the server running in `dir`, from its pid file.
fn server_in(dir: &Path) -> Option<u32> {
    std::fs::read_dir(testkit::pid_dir())
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path())
                .is_ok_and(|t| t.lines().nth(2) == Some(&*dir.to_string_lossy()))
        })?
        .path()
        .file_stem()?
        .to_str()?
        .parse()
        .ok()
}

/// Whether `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

#[tokio::test]
async fn a_killed_test_runs_servers_are_reaped_at_the_next_start() {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "child_holds_a_redis_server_until_killed",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the child test process");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    // Blocks until the child has started its server (it prints right after).
    while !line.starts_with("redis ") {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("child output") > 0,
            "the child exited before starting its redis-server"
        );
    }
    let dir = PathBuf::from(line["redis ".len()..].trim());
    let pid = server_in(&dir).expect("a pid file for the child's redis-server");
    assert!(running(pid));

    child.kill().expect("kill -9 the child test");
    child.wait().expect("reap the child");
    // The test process is gone; its redis-server is not: nothing ran its Drop.
    assert!(running(pid), "redis-server died with its test");

    let killed = testkit::reap_orphans();
    assert!(killed.contains(&pid), "reaped {killed:?}, not {pid}");
    assert!(
        testkit::wait_until(Duration::from_secs(10), || async { !running(pid) }).await,
        "redis-server {pid} still runs after the reap"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
    assert!(server_in(&dir).is_none(), "its pid file is still there");

    // A live test's servers are left alone, and stopping one removes its pid file.
    let mine = testkit::RedisServer::start();
    let my_dir = mine.dir().to_path_buf();
    let my_pid = server_in(&my_dir).expect("pid file of this test's server");
    assert!(!testkit::reap_orphans().contains(&my_pid));
    assert!(running(my_pid));
    drop(mine);
    assert!(
        server_in(&my_dir).is_none(),
        "a stopped server's pid file stays"
    );
}

/// Run only as the child of [`a_killed_test_runs_s3_server_is_reaped_with_its_sockets`].
#[test]
#[ignore = "the child half of a_killed_test_runs_s3_server_is_reaped_with_its_sockets"]
fn child_holds_an_s3_server_until_killed() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let s3 = testkit::S3Server::start();
    println!("s3 {}", s3.dir().display());
    std::thread::sleep(Duration::from_secs(600));
}

/// The files outside its directory that the pid file of the server in `dir` lists.
fn files_of_server_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(testkit::pid_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .find(|t| t.lines().nth(2) == Some(&*dir.to_string_lossy()))
        .map(|t| t.lines().skip(3).map(PathBuf::from).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_killed_test_runs_s3_server_is_reaped_with_its_sockets() {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "child_holds_an_s3_server_until_killed",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the child test process");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.starts_with("s3 ") {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("child output") > 0,
            "the child exited before starting its S3 server"
        );
    }
    let dir = PathBuf::from(line["s3 ".len()..].trim());
    let pid = server_in(&dir).expect("a pid file for the child's S3 server");
    let sockets = files_of_server_in(&dir);
    assert_eq!(sockets.len(), 5, "{sockets:?}");
    assert!(sockets.iter().any(|s| s.exists()), "{sockets:?}");

    child.kill().expect("kill -9 the child test");
    child.wait().expect("reap the child");
    assert!(running(pid), "weed died with its test");

    // Another test's reaper (this binary's redis test, any other test process starting
    // its first server) may have come first: what counts is that it is gone.
    testkit::reap_orphans();
    assert!(
        testkit::wait_until(Duration::from_secs(10), || async { !running(pid) }).await,
        "weed {pid} still runs after the reap"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
    for socket in &sockets {
        assert!(!socket.exists(), "{} was not removed", socket.display());
    }
}
