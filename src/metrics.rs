//! The process's metrics: one registry per process, rendered on `GET /metrics`.
//!
//! [`process_registry`] holds every crate's process-global families (ingest's admission
//! families, the store's, the settler's and the log's), the runtime metrics of the
//! process's runtimes ([`RuntimeWatch`]) and `flashsale_build_info`. `serve` adds its API's
//! families and the per-sale gauges and renders it on its API listener; `settle` renders it
//! on a listener of its own ([`serve_metrics`], `metrics.settle_listen`). Names and labels:
//! `docs/METRICS.md`.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use httpd::{Handler, Hangup, ServerConfig};
use hyper::body::Incoming;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_metrics::TaskMonitor;
use tokio_util::sync::CancellationToken;

/// Build information (always 1).
pub const BUILD_INFO: &str = "flashsale_build_info";
/// Worker threads of a runtime.
pub const RUNTIME_WORKERS: &str = "flashsale_runtime_workers";
/// Time a runtime's workers spent busy.
pub const RUNTIME_BUSY: &str = "flashsale_runtime_busy_seconds";
/// Polls of instrumented tasks over [`LONG_POLL`].
pub const RUNTIME_LONG_POLLS: &str = "flashsale_runtime_long_polls";
/// Time instrumented tasks waited to be polled once woken.
pub const RUNTIME_SCHEDULING_DELAY: &str = "flashsale_runtime_scheduling_delay_seconds";

/// What embedded recovery skipped because the catalog lacks its sale.
pub const RECOVERY_SKIPPED: &str = "flashsale_recovery_skipped";
/// `what` of [`RECOVERY_SKIPPED`]: a log record (its units are not counted as taken).
pub const SKIPPED_RECORD: &str = "log_record";
/// `what` of [`RECOVERY_SKIPPED`]: a failed or expired order (its units are not given back).
pub const SKIPPED_RELEASE: &str = "release";

/// A poll of an instrumented task longer than this is a long poll.
pub const LONG_POLL: Duration = Duration::from_millis(1);
/// How often a runtime's probe task wakes (its scheduling delay is the runtime's when
/// nothing else instrumented runs).
pub const PROBE_EVERY: Duration = Duration::from_millis(100);

/// Labels of `flashsale_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    process: &'static str,
}

/// Label of [`RECOVERY_SKIPPED`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkippedLabel {
    what: &'static str,
}

static RECOVERY_SKIPS: LazyLock<Family<SkippedLabel, Counter>> = LazyLock::new(|| {
    let family = Family::<SkippedLabel, Counter>::default();
    // Both series from the start at 0.
    for what in [SKIPPED_RECORD, SKIPPED_RELEASE] {
        let _ = family.get_or_create(&SkippedLabel { what });
    }
    family
});

/// Counts one item embedded recovery skipped (`what`: [`SKIPPED_RECORD`] or
/// [`SKIPPED_RELEASE`]).
pub fn recovery_skipped(what: &'static str) {
    RECOVERY_SKIPS.get_or_create(&SkippedLabel { what }).inc();
}

/// A runtime whose metrics the process exports, under the label `runtime`: tokio's stable
/// worker metrics, and a [`TaskMonitor`] for the tasks instrumented on it (the HTTP
/// connections, the settler, a probe).
#[derive(Debug, Clone)]
pub struct RuntimeWatch {
    name: &'static str,
    handle: tokio::runtime::Handle,
    monitor: TaskMonitor,
}

impl RuntimeWatch {
    /// Watches the runtime of `handle` under the name `name`.
    pub fn new(name: &'static str, handle: tokio::runtime::Handle) -> Self {
        let mut builder = TaskMonitor::builder();
        builder.with_slow_poll_threshold(LONG_POLL);
        RuntimeWatch {
            name,
            handle,
            monitor: builder.build(),
        }
    }

    /// The monitor of this runtime's instrumented tasks.
    pub fn monitor(&self) -> &TaskMonitor {
        &self.monitor
    }

    /// Runs `task` on this runtime, instrumented.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(self.monitor.instrument(task))
    }

    /// Starts this runtime's probe: an instrumented task that wakes every
    /// [`PROBE_EVERY`] until `shutdown`, so the scheduling delay is measured even when
    /// nothing else instrumented is woken.
    pub fn start_probe(&self, shutdown: CancellationToken) {
        self.spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
            }
        });
    }
}

/// Encodes the runtime families from the watched runtimes at each scrape.
#[derive(Debug)]
struct RuntimeCollector(Vec<RuntimeWatch>);

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let label = |w: &RuntimeWatch| [("runtime", w.name)];
        let mut e = encoder.encode_descriptor(
            RUNTIME_WORKERS,
            "Worker threads of the runtime",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for w in &self.0 {
            let workers = i64::try_from(w.handle.metrics().num_workers()).unwrap_or(i64::MAX);
            ConstGauge::new(workers).encode(e.encode_family(&label(w))?)?;
        }
        let mut e = encoder.encode_descriptor(
            RUNTIME_BUSY,
            "Time the runtime's workers spent busy, summed over the workers (busy ratio: \
             rate / workers)",
            None,
            ConstCounter::new(0.0f64).metric_type(),
        )?;
        for w in &self.0 {
            let m = w.handle.metrics();
            let busy: f64 = (0..m.num_workers())
                .map(|i| m.worker_total_busy_duration(i).as_secs_f64())
                .sum();
            ConstCounter::new(busy).encode(e.encode_family(&label(w))?)?;
        }
        let mut e = encoder.encode_descriptor(
            RUNTIME_LONG_POLLS,
            "Polls of instrumented tasks (HTTP connections, the settler, a probe) longer than \
             1 ms",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for w in &self.0 {
            let polls = w.monitor.cumulative().total_slow_poll_count;
            ConstCounter::new(polls).encode(e.encode_family(&label(w))?)?;
        }
        let mut e = encoder.encode_descriptor(
            RUNTIME_SCHEDULING_DELAY,
            "Time instrumented tasks waited to be polled once woken",
            None,
            ConstCounter::new(0.0f64).metric_type(),
        )?;
        for w in &self.0 {
            let delay = w.monitor.cumulative().total_scheduled_duration;
            ConstCounter::new(delay.as_secs_f64()).encode(e.encode_family(&label(w))?)?;
        }
        Ok(())
    }
}

/// Registers the settler's and the log's process-global families. The one place they are
/// added to a process's registry.
fn register_settler_and_log(registry: &mut Registry) {
    settler::metrics::register(registry);
    sequencer::metrics::register(registry);
}

/// The registry of a process named `process` (`serve`, `settle`): every crate's
/// process-global families, `flashsale_build_info` and the metrics of `runtimes`.
pub fn process_registry(process: &'static str, runtimes: Vec<RuntimeWatch>) -> Registry {
    let mut registry = Registry::default();
    ingest::metrics::register(&mut registry);
    storage::metrics::register(&mut registry);
    register_settler_and_log(&mut registry);
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            process,
        })
        .set(1);
    registry.register(BUILD_INFO, "Build of the process (always 1)", build);
    registry.register(
        RECOVERY_SKIPPED,
        "Log records and releases embedded recovery skipped because the catalog lacks their sale",
        RECOVERY_SKIPS.clone(),
    );
    registry.register_collector(Box::new(RuntimeCollector(runtimes)));
    registry
}

/// Answers `GET /metrics` (and `GET /healthz`) from a registry.
#[derive(Debug)]
struct MetricsEndpoint {
    registry: Arc<Registry>,
}

type Resp = Response<Full<Bytes>>;

fn plain(status: StatusCode, body: &'static str) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl MetricsEndpoint {
    fn answer(&self, req: &Request<Incoming>) -> Resp {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (body, content_type) = ingest::metrics::render(
                    &self.registry,
                    ingest::metrics::wants_openmetrics(accept),
                );
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                resp
            }
            (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n"),
            (_, "/metrics" | "/healthz") => plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
            _ => plain(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
        }
    }
}

impl Handler for MetricsEndpoint {
    fn handle(&self, req: Request<Incoming>) -> impl Future<Output = Result<Resp, Hangup>> + Send {
        let resp = self.answer(&req);
        async move { Ok(resp) }
    }
}

/// Serves `registry` on `GET /metrics` on `listener` until `shutdown` (the metrics
/// listener of `flashsale settle`).
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let config = ServerConfig {
        max_connections: 64,
        shutdown_grace: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    httpd::serve_with(
        listener,
        Arc::new(MetricsEndpoint { registry }),
        None,
        config,
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runtime_and_build_families_encode() {
        let watch = RuntimeWatch::new("test", tokio::runtime::Handle::current());
        let shutdown = CancellationToken::new();
        watch.start_probe(shutdown.clone());
        watch
            .spawn(async { std::thread::sleep(Duration::from_millis(5)) })
            .await
            .expect("task");
        let registry = process_registry("test", vec![watch]);
        let (text, _) = ingest::metrics::render(&registry, true);
        shutdown.cancel();
        for want in [
            "flashsale_build_info{version=\"",
            "flashsale_runtime_workers{runtime=\"test\"} 2",
            "flashsale_runtime_busy_seconds_total{runtime=\"test\"}",
            "flashsale_runtime_scheduling_delay_seconds_total{runtime=\"test\"}",
            "flashsale_store_duration_seconds",
            "flashsale_admission_duration_seconds",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        // The task that blocked its thread for 5 ms is a long poll.
        let long_polls: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("flashsale_runtime_long_polls_total{runtime=\"test\"} "))
            .and_then(|v| v.parse().ok())
            .expect("long polls");
        assert!(long_polls >= 1, "{text}");
    }
}
