//! The test harness's CQL v4 server as a command, for running the Scylla store by hand:
//!
//! ```sh
//! cargo run -p testkit --bin cql-server -- [--port PORT]
//! flashsale demo --store scylla://127.0.0.1:PORT/flashsale
//! ```
//!
//! Prints `scylla://127.0.0.1:PORT` on stdout once it listens (PORT is a free one unless
//! `--port` is given), then serves until it is killed; the data lives in memory only. Its
//! limits are those of `testkit::CqlServer`.

use std::io::Write;
use std::process::ExitCode;

const USAGE: &str = "usage: cql-server [--port PORT]";

fn main() -> ExitCode {
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => {
                println!(
                    "{USAGE}\nServes CQL v4 on 127.0.0.1:PORT (default: a free port) until killed."
                );
                return ExitCode::SUCCESS;
            }
            "--port" => args.next(),
            other => match other.strip_prefix("--port=") {
                Some(v) => Some(v.to_owned()),
                None => {
                    eprintln!("cql-server: unknown argument {other:?}\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
        };
        match value.as_deref().map(str::parse::<u16>) {
            Some(Ok(p)) => port = p,
            _ => {
                eprintln!("cql-server: --port needs a port number (0 to 65535)\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let server = match testkit::CqlServer::start_on(port) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("cql-server: cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "scylla://{}", server.node())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(out);
    // The server runs on a thread of its own; this one only keeps the process alive.
    loop {
        std::thread::park();
    }
}
