//! The hyper server: accept loop, connection cap, header-read and idle timeouts, graceful
//! shutdown.
//!
//! [`serve`] takes an already-bound listener (tests bind port 0) and a cancellation token.
//! On cancel it stops accepting, asks every connection to finish its in-flight request and
//! close, waits up to the grace period, then aborts what is left.

use crate::api::Ingest;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

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

/// Serves the API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
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
        let ingest = Arc::clone(&ingest);
        let config = config.clone();
        let shutdown = shutdown.clone();
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let _permit = permit;
            ingest.metrics.open_connections.inc();
            let activity = Arc::new(Activity {
                started: Instant::now(),
                last_ms: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
            });
            let act = Arc::clone(&activity);
            let svc_ingest = Arc::clone(&ingest);
            let service = service_fn(move |req| {
                let ingest = Arc::clone(&svc_ingest);
                let act = Arc::clone(&act);
                async move {
                    act.in_flight.fetch_add(1, Ordering::Relaxed);
                    let resp = ingest.handle(req).await;
                    act.in_flight.fetch_sub(1, Ordering::Relaxed);
                    act.touch();
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
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
            ingest.metrics.open_connections.dec();
        });
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
