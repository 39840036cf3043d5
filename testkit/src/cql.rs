//! A CQL v4 server of the test's own: the in-memory `kassandra` engine behind its frame
//! codec, on a free loopback port, served by a thread with a runtime of its own. No Scylla
//! or Cassandra server can be installed on these machines; the scylla driver talks to this
//! one. What it does not do (checked with the scylla 1.x driver): it keeps minimal system
//! tables (the driver's automatic schema agreement must be off), it ignores `USING
//! TIMESTAMP`, `CLUSTERING ORDER`, `ORDER BY` and `LIMIT` (rows come back ascending, all of
//! them), and it does not check `IF` conditions (no lightweight transactions).

use futures_util::{SinkExt, StreamExt};
use kassandra::frame::{request::Request, request_stream, response::Response, response_sink};
use kassandra::session::KassandraSession;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

type Engine = Arc<Mutex<KassandraSession>>;

/// A running CQL server; stopped (connections closed, data dropped) when dropped.
#[derive(Debug)]
pub struct CqlServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CqlServer {
    /// Starts a server on a free port of 127.0.0.1, empty.
    pub fn start() -> CqlServer {
        CqlServer::start_on(0).expect("a free port for the CQL server")
    }

    /// Starts a server on `port` of 127.0.0.1 (0: a free one), empty; fails when the port
    /// cannot be bound.
    pub fn start_on(port: u16) -> std::io::Result<CqlServer> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let engine: Engine = Arc::new(Mutex::new(KassandraSession::new()));
        let thread = std::thread::Builder::new()
            .name("cql-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the CQL server's runtime");
                rt.block_on(serve(listener, engine, stopped));
            })?;
        Ok(CqlServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT`, a known node for the driver.
    pub fn node(&self) -> String {
        self.addr.to_string()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for CqlServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    engine: Engine,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let mut clients = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    clients.spawn(client(Arc::clone(&engine), stream));
                }
            }
        }
    }
    clients.abort_all();
}

async fn client(engine: Engine, mut stream: tokio::net::TcpStream) {
    let (mut read, mut write) = stream.split();
    let mut requests = request_stream(&mut read);
    let mut responses = response_sink(&mut write);
    while let Some(Ok((frame, opcode, data))) = requests.next().await {
        let answer = |r: Result<_, _>| match r {
            Ok(result) => Response::Result(result),
            Err(e) => Response::Error(e),
        };
        let response = match Request::deserialize(opcode, &data, frame.flags) {
            Ok(Request::StartUp(_)) | Ok(Request::Register { .. }) => Response::Ready,
            Ok(Request::Options) => Response::options(),
            Ok(Request::Query(q)) => answer(engine.lock().expect("engine").process(q)),
            Ok(Request::Prepare(q)) => answer(engine.lock().expect("engine").prepare(q)),
            Ok(Request::Execute(e)) => answer(engine.lock().expect("engine").execute(e)),
            Ok(Request::Batch(b)) => answer(engine.lock().expect("engine").process_batch(b)),
            // Authentication and anything it cannot parse: close the connection.
            _ => return,
        };
        if responses.send((response, frame.stream)).await.is_err() {
            return;
        }
    }
}
