//! The harness's CQL server answers the scylla driver: schema, prepared writes, reads.

use scylla::client::session_builder::SessionBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scylla_driver_writes_and_reads_through_the_cql_server() {
    let server = testkit::CqlServer::start();
    let session = SessionBuilder::new()
        .known_node(server.node())
        // Its system tables list no peers: the driver's schema agreement cannot run.
        .auto_await_schema_agreement(false)
        .build()
        .await
        .expect("the driver connects");
    for ddl in [
        "CREATE KEYSPACE fs WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
        "CREATE TABLE fs.orders (id text PRIMARY KEY, quantity int)",
    ] {
        session.query_unpaged(ddl, &[]).await.expect(ddl);
    }
    let insert = session
        .prepare("INSERT INTO fs.orders (id, quantity) VALUES (?, ?)")
        .await
        .expect("prepare");
    for (id, q) in [("a", 1), ("b", 2)] {
        session
            .execute_unpaged(&insert, (id, q))
            .await
            .expect("insert");
    }
    let rows = session
        .query_unpaged("SELECT id, quantity FROM fs.orders WHERE id = 'b'", &[])
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows");
    let got: Vec<(String, i32)> = rows
        .rows::<(String, i32)>()
        .expect("typed rows")
        .collect::<Result<_, _>>()
        .expect("decoded");
    assert_eq!(got, vec![("b".to_owned(), 2)]);

    // Stopped: the port no longer answers.
    let port = server.port();
    drop(server);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn start_on_a_taken_port_is_an_error_not_a_panic() {
    let server = testkit::CqlServer::start();
    assert!(testkit::CqlServer::start_on(server.port()).is_err());
}

/// Kills the child when dropped, so a failed assertion leaves no server behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cql-server` with `args` and reads the URL it prints.
fn cql_server(args: &[&str]) -> (Killed, String) {
    use std::io::BufRead;
    let mut child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_cql-server"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run cql-server"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("its first line");
    (child, line.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cql_server_command_prints_its_url_and_serves_until_killed() {
    let (child, url) = tokio::task::block_in_place(|| cql_server(&[]));
    let port: u16 = url
        .strip_prefix("scylla://127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not scylla://127.0.0.1:PORT: {url:?}"));
    let session = SessionBuilder::new()
        .known_node(format!("127.0.0.1:{port}"))
        .auto_await_schema_agreement(false)
        .build()
        .await
        .expect("the driver connects");
    session
        .query_unpaged(
            "CREATE KEYSPACE fs WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
            &[],
        )
        .await
        .expect("DDL");
    drop(session);
    drop(child);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    // Again on the port it just gave back, by --port.
    let (again, url) = tokio::task::block_in_place(|| cql_server(&["--port", &port.to_string()]));
    assert_eq!(url, format!("scylla://127.0.0.1:{port}"));
    drop(again);

    // A bad argument.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_cql-server"))
        .args(["--port", "not-a-port"])
        .output()
        .expect("run cql-server");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--port"));
}
