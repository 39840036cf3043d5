//! The one HTTP/1.1 server loop: accept, connection cap, header-read and idle timeouts,
//! graceful shutdown.
//!
//! [`serve_with`] takes an already-bound listener (tests bind port 0), a [`Handler`] and a
//! cancellation token. On cancel it stops accepting, asks every connection to finish its
//! in-flight request and close, waits up to the grace period, then aborts what is left. The
//! API (`ingest::server::serve`), the metrics listener of `flashsale settle` and the mock
//! provider all run on it.
//!
//! Request heads are limited in size and field count (`ServerConfig::max_header_bytes`,
//! `max_headers`, enforced by hyper's parser); hyper's own answers to heads it refuses are
//! rewritten into problem+json on the way out (see [`crate::protocol`]).
//!
//! Each connection's task (which runs its requests' handlers) can be instrumented with a
//! `tokio-metrics` [`TaskMonitor`] (`ServerConfig::task_monitor`): its long polls and
//! scheduling delay are the runtime metrics of the HTTP side.

use crate::protocol::{Announced, HeadLimits, ProblemIo};
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_metrics::TaskMonitor;
use tokio_util::sync::CancellationToken;

/// A response as every handler builds it: the whole body in memory.
pub type Reply = Response<Full<Bytes>>;

/// A request left unanswered on purpose: the connection is closed without a response (the
/// mock provider's lost answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hangup;

impl std::fmt::Display for Hangup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the handler hung up without an answer")
    }
}

impl std::error::Error for Hangup {}

/// Answers requests; what [`serve_with`] serves.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request, or hangs up without an answer.
    fn handle(&self, req: Request<Incoming>) -> impl Future<Output = Result<Reply, Hangup>> + Send;
}

/// Connection-level settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most connections open at once; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// Deadline to receive a request's head. hyper starts this timer whenever it waits for
    /// a request head, so it also bounds the wait for the next request on a keep-alive
    /// connection.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed; in effect the
    /// smaller of this and `header_read_timeout`.
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Most bytes in a request head (request line and header fields); a longer head gets
    /// 431 `headers_too_large` and the connection is closed.
    pub max_header_bytes: usize,
    /// Most header fields in a request; more get 431 `headers_too_large`.
    pub max_headers: usize,
    /// Instruments every connection's task (and so its requests' handlers).
    pub task_monitor: Option<TaskMonitor>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            task_monitor: None,
        }
    }
}

/// Default of [`ServerConfig::max_header_bytes`]: 16 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default of [`ServerConfig::max_headers`] (hyper's own default too).
pub const DEFAULT_MAX_HEADERS: usize = 100;

struct Activity {
    started: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Serves `handler` on `listener` until `shutdown` is cancelled; `open_connections`, when
/// given, follows the connections open.
pub async fn serve_with<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    open_connections: Option<Gauge>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(&handler);
        let open = open_connections.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
        let monitor = config.task_monitor.clone();
        let connection = async move {
            let _permit = permit;
            if let Some(open) = &open {
                open.inc();
            }
            let activity = Arc::new(Activity {
                started: Instant::now(),
                last_ms: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
            });
            let act = Arc::clone(&activity);
            let announced = Arc::new(Announced::default());
            let ann = Arc::clone(&announced);
            let service = service_fn(move |req: Request<Incoming>| {
                let handler = Arc::clone(&handler);
                let act = Arc::clone(&act);
                let ann = Arc::clone(&ann);
                async move {
                    act.in_flight.fetch_add(1, Ordering::Relaxed);
                    let head_request = req.method() == Method::HEAD;
                    let resp = handler.handle(req).await;
                    if resp.is_ok() {
                        ann.push(head_request);
                    }
                    act.in_flight.fetch_sub(1, Ordering::Relaxed);
                    act.touch();
                    resp
                }
            });
            let limits = HeadLimits {
                max_bytes: config.max_header_bytes,
                max_fields: config.max_headers,
            };
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout)
                .keep_alive(true)
                .max_header_size(config.max_header_bytes);
            // Setting the field cap moves hyper's header array from the stack to the heap
            // (about 5% of its parsing time): only when it differs from hyper's default.
            if config.max_headers != DEFAULT_MAX_HEADERS {
                builder.max_headers(config.max_headers);
            }
            let io = ProblemIo::new(stream, announced, limits);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let tick = (config.idle_timeout / 4).max(Duration::from_millis(50));
            let mut closing = false;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(e) = res {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = shutdown.cancelled(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = tokio::time::sleep(tick), if !closing => {
                        if activity.idle_for() >= config.idle_timeout {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            if let Some(open) = &open {
                open.dec();
            }
        };
        match monitor {
            Some(m) => conns.spawn(m.instrument(connection)),
            None => conns.spawn(connection),
        };
    }
    drop(listener);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = conns.len(),
            "grace period over; aborting connections"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    Ok(())
}
