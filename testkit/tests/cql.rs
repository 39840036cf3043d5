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
