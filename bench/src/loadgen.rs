//! The open-loop load generator.
//!
//! Requests are sent on a fixed schedule: request `i` of a step at `rate` per second is
//! *intended* to leave at `start + i / rate`, whatever happened to the requests before it.
//! Its latency is measured from that intended instant, not from when it actually left, so
//! when the system (or the generator) falls behind, the time a request waited to be sent
//! counts as latency: coordinated omission cannot hide a queue.
//!
//! A pacer thread (plain `std::thread::sleep`, about 100 µs of precision instead of the
//! 1 ms of tokio's timer) hands the due request indices to a current-thread tokio runtime,
//! which starts one task per request. A task waits for one of `max_in_flight` permits
//! (HTTP/1 needs a connection per request in flight; the cap keeps an overloaded step
//! from opening thousands), calls the [`Target`], and records the latency from the
//! intended instant into an HDR histogram. Only requests intended inside the measurement
//! window (after the warm-up) are recorded. A step whose requests wait longer than
//! `overload_cutoff` for a permit is overloaded beyond doubt: it stops sending early
//! and is marked `aborted` (it fails).

use crate::cpu::{CpuSnapshot, CpuUsage};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one call returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The answer the scenario expects (202 on the accepted path, 409 on the sold-out path,
    /// an accepted decision, a delivery report).
    Expected,
    /// Another answer (its HTTP status, or 0 for a non-HTTP target).
    Unexpected(u16),
    /// No answer: a transport error.
    Error,
}

/// A boxed call.
pub type CallFuture = Pin<Box<dyn Future<Output = Outcome> + Send + 'static>>;

/// A system under load: `call(i)` makes request `i` of a step.
pub trait Target: Send + Sync + 'static {
    /// Starts request `i`.
    fn call(&self, i: u64) -> CallFuture;
}

/// When each request of a step is intended to be sent: request `i` at `i / rate` seconds
/// after the start, in whole nanoseconds (integer arithmetic, so exact and monotonic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Requests per second.
    pub rate: u64,
}

impl Schedule {
    /// A schedule of `rate` requests per second (at least 1).
    pub fn new(rate: u64) -> Self {
        Schedule { rate: rate.max(1) }
    }

    /// Offset of request `i`'s intended send time from the start, in nanoseconds.
    pub fn intended_ns(&self, i: u64) -> u64 {
        (u128::from(i) * 1_000_000_000 / u128::from(self.rate)) as u64
    }

    /// Offset of request `i`'s intended send time from the start.
    pub fn intended(&self, i: u64) -> Duration {
        Duration::from_nanos(self.intended_ns(i))
    }

    /// How many requests are due `elapsed_ns` after the start: the number of `i` with
    /// `intended_ns(i) <= elapsed_ns`.
    pub fn due_by(&self, elapsed_ns: u64) -> u64 {
        // floor(i * 1e9 / rate) <= e  <=>  i * 1e9 < (e + 1) * rate  <=>  i < ceil(...)
        let bound = (u128::from(elapsed_ns) + 1) * u128::from(self.rate);
        bound.div_ceil(1_000_000_000) as u64
    }

    /// The indices intended within `[from, to)` after the start.
    pub fn window(&self, from: Duration, to: Duration) -> Range<u64> {
        let first = if from.is_zero() {
            0
        } else {
            self.due_by(from.as_nanos() as u64 - 1)
        };
        let end = if to.is_zero() {
            0
        } else {
            self.due_by(to.as_nanos() as u64 - 1)
        };
        first..end.max(first)
    }
}

/// Latency of a request intended at `intended` and answered at `done`: the whole time
/// from the intended instant, including any wait before it was actually sent. Zero if it
/// was answered before it was due (which a correct generator never does).
pub fn latency_from_intended(intended: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(intended)
}

/// How one step runs.
#[derive(Debug, Clone)]
pub struct StepConfig {
    /// Offered rate, requests per second.
    pub rate: u64,
    /// Sent at the same rate before measuring; not recorded.
    pub warmup: Duration,
    /// The measurement window.
    pub measure: Duration,
    /// Most requests in flight (one HTTP/1 connection each); later ones wait, and the
    /// wait counts as latency.
    pub max_in_flight: usize,
    /// A request that waits longer than this for a permit aborts the step.
    pub overload_cutoff: Duration,
    /// A request unanswered after this counts as an error.
    pub request_timeout: Duration,
    /// Longest wait for the requests in flight after the last one was sent.
    pub drain_timeout: Duration,
    /// Probes sampled every `probe_every` during the step (e.g. the settler's count of
    /// persisted orders).
    pub probe_every: Duration,
    /// Requests at least this slow are listed in [`StepResult::slow`].
    pub slow: Duration,
}

impl StepConfig {
    /// A step at `rate` with the given warm-up and window and the harness defaults.
    pub fn new(rate: u64, warmup: Duration, measure: Duration) -> Self {
        StepConfig {
            rate,
            warmup,
            measure,
            max_in_flight: 1024,
            overload_cutoff: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(6),
            probe_every: Duration::from_millis(500),
            slow: Duration::from_millis(5),
        }
    }
}

/// A value sampled during a step.
pub type Probe = Arc<dyn Fn() -> u64 + Send + Sync>;

/// One sample of a step's probe.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProbeSample {
    /// Seconds since the step started.
    pub t_s: f64,
    /// Expected answers so far in the step (warm-up included).
    pub expected_so_far: u64,
    /// The probe's value.
    pub value: u64,
}

/// What one step measured.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Offered rate, requests per second.
    pub rate: u64,
    /// Requests sent (warm-up included).
    pub sent: u64,
    /// Requests intended inside the window.
    pub measured: u64,
    /// Of those, answered as expected.
    pub expected: u64,
    /// Of those, answered otherwise (by status).
    pub unexpected: std::collections::BTreeMap<u16, u64>,
    /// Of those, transport errors and timeouts.
    pub errors: u64,
    /// Of those, not answered by the end of the drain.
    pub unfinished: u64,
    /// Expected answers in the whole step (warm-up included).
    pub expected_total: u64,
    /// Latency from the intended send time, microseconds, of the window's answered
    /// requests.
    pub latency_us: Histogram<u64>,
    /// Whether the step stopped early, overloaded.
    pub aborted: bool,
    /// CPU over the window.
    pub cpu: Option<CpuUsage>,
    /// Length of the window actually run, seconds.
    pub window_s: f64,
    /// Probe samples.
    pub probes: Vec<ProbeSample>,
    /// The slow requests of the window (latency at least `slow_ms`), at most 2000: seconds
    /// from the step's start to the intended send time, and latency in ms. Their spacing
    /// shows a periodic stall.
    pub slow: Vec<(f64, f64)>,
    /// CPU seconds the pacer thread used over the whole step (warm-up included), so a
    /// caller measuring CPU over a longer span can leave the generator out.
    pub pacer_cpu_s: f64,
}

impl StepResult {
    /// Share of the window's requests not answered as expected.
    pub fn failure_share(&self) -> f64 {
        if self.measured == 0 {
            return 1.0;
        }
        1.0 - self.expected as f64 / self.measured as f64
    }

    /// Latency quantile in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

struct Recorder {
    hist: Histogram<u64>,
    slow: Vec<(f64, f64)>,
    expected: u64,
    unexpected: std::collections::BTreeMap<u16, u64>,
    errors: u64,
    done: u64,
}

struct Shared {
    recorder: Mutex<Recorder>,
    abort: AtomicBool,
    expected_total: AtomicU64,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

/// Runs one step against `target` on the current-thread runtime `rt` (the generator's),
/// sampling CPU at the window's edges with `cpu_self` (the generator's own threads are
/// identified so their CPU can be set apart) and `probe` every `probe_every`.
pub fn run_step(
    rt: &tokio::runtime::Runtime,
    target: Arc<dyn Target>,
    config: &StepConfig,
    probe: Option<Probe>,
) -> StepResult {
    let schedule = Schedule::new(config.rate);
    let total = schedule.due_by((config.warmup + config.measure).as_nanos() as u64 - 1);
    let window = schedule.window(config.warmup, config.warmup + config.measure);
    let shared = Arc::new(Shared {
        recorder: Mutex::new(Recorder {
            hist: new_histogram(),
            slow: Vec::new(),
            expected: 0,
            unexpected: Default::default(),
            errors: 0,
            done: 0,
        }),
        abort: AtomicBool::new(false),
        expected_total: AtomicU64::new(0),
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Range<u64>>();
    let generator_tid = crate::cpu::thread_id();
    let start = Instant::now() + Duration::from_millis(5);

    // The pacer: hands out due indices, samples CPU at the window's edges and the probe.
    let pacer = {
        let shared = Arc::clone(&shared);
        let config = config.clone();
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                let pacer_tid = crate::cpu::thread_id();
                let tids = [generator_tid, pacer_tid];
                let tick = Duration::from_micros(100);
                let window_start = start + config.warmup;
                let window_end = window_start + config.measure;
                let mut cpu0: Option<(CpuSnapshot, Instant)> = None;
                let mut probes = Vec::new();
                let mut next_probe = start;
                let mut sent = 0u64;
                loop {
                    let now = Instant::now();
                    if shared.abort.load(Ordering::Relaxed) {
                        break;
                    }
                    if cpu0.is_none() && now >= window_start {
                        cpu0 = Some((CpuSnapshot::take(&tids), now));
                    }
                    if let Some(p) = &probe {
                        if now >= next_probe {
                            probes.push(ProbeSample {
                                t_s: now.saturating_duration_since(start).as_secs_f64(),
                                expected_so_far: shared.expected_total.load(Ordering::Relaxed),
                                value: p(),
                            });
                            next_probe += config.probe_every;
                        }
                    }
                    if now >= start {
                        let due = schedule
                            .due_by(now.duration_since(start).as_nanos() as u64)
                            .min(total);
                        if due > sent {
                            if tx.send(sent..due).is_err() {
                                break;
                            }
                            sent = due;
                        }
                    }
                    if sent >= total {
                        break;
                    }
                    let mut wake = start + schedule.intended(sent);
                    if cpu0.is_none() {
                        wake = wake.min(window_start);
                    }
                    if probe.is_some() {
                        wake = wake.min(next_probe);
                    }
                    let now = Instant::now();
                    std::thread::sleep(wake.saturating_duration_since(now).max(tick));
                }
                drop(tx);
                // The window ends when its last request is due.
                let now = Instant::now();
                if !shared.abort.load(Ordering::Relaxed) && now < window_end {
                    std::thread::sleep(window_end - now);
                }
                let cpu = cpu0.map(|(c0, t0)| {
                    let c1 = CpuSnapshot::take(&tids);
                    c1.since(&c0, Instant::now().duration_since(t0))
                });
                let pacer_cpu_s = crate::cpu::thread_cpu_s(pacer_tid);
                (sent, cpu, probes, pacer_cpu_s)
            })
            .expect("spawn the pacer thread")
    };

    let semaphore = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1)));
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(range) = rx.recv().await {
            for i in range {
                let target = Arc::clone(&target);
                let shared = Arc::clone(&shared);
                let semaphore = Arc::clone(&semaphore);
                let intended = start + schedule.intended(i);
                let in_window = window.contains(&i);
                let cutoff = config.overload_cutoff;
                let slow = config.slow;
                let timeout = config.request_timeout;
                tasks.spawn(async move {
                    let Ok(_permit) = semaphore.acquire().await else {
                        return;
                    };
                    if Instant::now().saturating_duration_since(intended) > cutoff {
                        shared.abort.store(true, Ordering::Relaxed);
                    }
                    if shared.abort.load(Ordering::Relaxed) {
                        // Overloaded: the step fails; what still waits is not sent (it
                        // counts as unfinished), so the drain is quick.
                        return;
                    }
                    let outcome = tokio::time::timeout(timeout, target.call(i))
                        .await
                        .unwrap_or(Outcome::Error);
                    let latency = latency_from_intended(intended, Instant::now());
                    if outcome == Outcome::Expected {
                        shared.expected_total.fetch_add(1, Ordering::Relaxed);
                    }
                    if in_window {
                        let mut r = shared.recorder.lock().expect("recorder");
                        r.done += 1;
                        r.hist.saturating_record(latency.as_micros().max(1) as u64);
                        if latency >= slow && r.slow.len() < 2000 {
                            let at = intended.saturating_duration_since(start).as_secs_f64();
                            r.slow.push((at, latency.as_secs_f64() * 1000.0));
                        }
                        match outcome {
                            Outcome::Expected => r.expected += 1,
                            Outcome::Unexpected(s) => *r.unexpected.entry(s).or_default() += 1,
                            Outcome::Error => r.errors += 1,
                        }
                    }
                });
            }
            // Reap finished tasks so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
        let drained = tokio::time::timeout(config.drain_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    });
    let (sent, cpu, probes, pacer_cpu_s) = pacer.join().expect("pacer thread");
    let aborted = shared.abort.load(Ordering::Relaxed);
    let measured_in_window = window.end.min(sent).saturating_sub(window.start);
    let r = shared.recorder.lock().expect("recorder");
    let window_s = cpu.as_ref().map_or(0.0, |c| c.wall_s);
    StepResult {
        rate: config.rate,
        sent,
        measured: measured_in_window,
        expected: r.expected,
        unexpected: r.unexpected.clone(),
        errors: r.errors,
        unfinished: measured_in_window.saturating_sub(r.done),
        expected_total: shared.expected_total.load(Ordering::Relaxed),
        latency_us: r.hist.clone(),
        aborted,
        cpu,
        window_s,
        probes,
        slow: r.slow.clone(),
        pacer_cpu_s,
    }
}

/// How a closed-loop run goes: `connections` loops, each sending its next request as soon
/// as the previous one was answered (as wrk does), for `warmup` (not recorded) and then
/// `duration`.
#[derive(Debug, Clone)]
pub struct ClosedLoopConfig {
    /// Concurrent loops (one HTTP/1 connection each).
    pub connections: usize,
    /// Run before measuring; not recorded.
    pub warmup: Duration,
    /// The measurement window.
    pub duration: Duration,
    /// A request unanswered after this counts as an error.
    pub request_timeout: Duration,
    /// Stop once this many expected answers came (the window ends then).
    pub limit: Option<u64>,
}

/// What a closed-loop run measured.
#[derive(Debug, Clone)]
pub struct ClosedLoopResult {
    /// Concurrent loops.
    pub connections: usize,
    /// Length of the window, seconds.
    pub window_s: f64,
    /// Requests answered inside the window.
    pub completed: u64,
    /// Of those, the expected answer.
    pub expected: u64,
    /// Of those, another answer or an error.
    pub failed: u64,
    /// Latency of the window's requests (from send to answer: closed loop, so it says
    /// nothing about queueing before the send), microseconds.
    pub latency_us: Histogram<u64>,
    /// CPU over the window.
    pub cpu: Option<CpuUsage>,
}

impl ClosedLoopResult {
    /// Expected answers per second.
    pub fn throughput(&self) -> f64 {
        if self.window_s > 0.0 {
            self.expected as f64 / self.window_s
        } else {
            0.0
        }
    }
}

/// Runs a closed-loop saturation test against `target` on the generator runtime `rt`:
/// the throughput wrk would report with `connections` connections. Answers that complete
/// inside the window count; latency is measured from each request's own send, so unlike
/// [`run_step`] it hides queueing (that is what closed loop means).
pub fn run_closed_loop(
    rt: &tokio::runtime::Runtime,
    target: Arc<dyn Target>,
    config: &ClosedLoopConfig,
) -> ClosedLoopResult {
    let generator_tid = crate::cpu::thread_id();
    let connections = config.connections.max(1);
    let total = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let start = Instant::now();
        let window_start = start + config.warmup;
        let end = window_start + config.duration;
        let mut loops = tokio::task::JoinSet::new();
        for c in 0..connections {
            let target = Arc::clone(&target);
            let timeout = config.request_timeout;
            let total = Arc::clone(&total);
            let limit = config.limit;
            loops.spawn(async move {
                let mut hist = new_histogram();
                let (mut completed, mut expected, mut failed) = (0u64, 0u64, 0u64);
                let mut i = c as u64;
                loop {
                    let sent = Instant::now();
                    if sent >= end || limit.is_some_and(|l| total.load(Ordering::Relaxed) >= l) {
                        break;
                    }
                    let outcome = tokio::time::timeout(timeout, target.call(i))
                        .await
                        .unwrap_or(Outcome::Error);
                    let done = Instant::now();
                    i += connections as u64;
                    if outcome == Outcome::Expected {
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                    if done >= window_start && done <= end {
                        completed += 1;
                        hist.saturating_record(done.duration_since(sent).as_micros().max(1) as u64);
                        if outcome == Outcome::Expected {
                            expected += 1;
                        } else {
                            failed += 1;
                        }
                    }
                }
                (hist, completed, expected, failed)
            });
        }
        tokio::time::sleep_until(window_start.into()).await;
        let c0 = (CpuSnapshot::take(&[generator_tid]), Instant::now());
        match config.limit {
            None => tokio::time::sleep_until(end.into()).await,
            Some(l) => {
                while Instant::now() < end && total.load(Ordering::Relaxed) < l {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        let c1 = CpuSnapshot::take(&[generator_tid]);
        let window = Instant::now().duration_since(c0.1);
        let cpu = c1.since(&c0.0, window);
        let mut out = ClosedLoopResult {
            connections,
            window_s: window.as_secs_f64(),
            completed: 0,
            expected: 0,
            failed: 0,
            latency_us: new_histogram(),
            cpu: Some(cpu),
        };
        let drained =
            tokio::time::timeout(config.request_timeout + Duration::from_secs(1), async {
                while let Some(r) = loops.join_next().await {
                    if let Ok((hist, completed, expected, failed)) = r {
                        let _ = out.latency_us.add(&hist);
                        out.completed += completed;
                        out.expected += expected;
                        out.failed += failed;
                    }
                }
            })
            .await;
        if drained.is_err() {
            loops.abort_all();
            while loops.join_next().await.is_some() {}
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_are_evenly_spaced() {
        let s = Schedule::new(4);
        let times: Vec<u64> = (0..6).map(|i| s.intended_ns(i)).collect();
        assert_eq!(
            times,
            [
                0,
                250_000_000,
                500_000_000,
                750_000_000,
                1_000_000_000,
                1_250_000_000
            ]
        );
        // A rate that does not divide a second: monotonic, and n requests per second.
        let s = Schedule::new(3);
        assert_eq!(s.intended_ns(1), 333_333_333);
        assert_eq!(s.intended_ns(3), 1_000_000_000);
    }

    #[test]
    fn due_by_counts_exactly_the_requests_intended_by_then() {
        for rate in [1, 3, 7, 1000, 12_345, 1_000_000] {
            let s = Schedule::new(rate);
            for i in 0..2000u64 {
                let t = s.intended_ns(i);
                // At its intended instant request i is due (i + 1 are), just before not.
                assert_eq!(s.due_by(t), i + 1, "rate {rate} i {i}");
                if i > 0 {
                    assert_eq!(s.due_by(t - 1), i, "rate {rate} i {i}");
                }
            }
        }
    }

    #[test]
    fn a_window_holds_rate_times_length_requests() {
        let s = Schedule::new(1000);
        let w = s.window(Duration::from_secs(1), Duration::from_secs(4));
        assert_eq!(w, 1000..4000);
        assert_eq!(w.end - w.start, 3000);
        assert_eq!(s.window(Duration::ZERO, Duration::from_millis(10)), 0..10);
    }

    #[test]
    fn latency_counts_from_the_intended_send_time() {
        let t0 = Instant::now();
        let intended = t0 + Duration::from_millis(10);
        // Sent 30 ms late (the generator or a connection was busy), answered 2 ms later:
        // the buyer waited 32 ms, not 2.
        let sent = intended + Duration::from_millis(30);
        let done = sent + Duration::from_millis(2);
        assert_eq!(
            latency_from_intended(intended, done),
            Duration::from_millis(32)
        );
        assert_eq!(latency_from_intended(done, intended), Duration::ZERO);
    }

    struct Sleepy {
        delay: Duration,
    }

    impl Target for Sleepy {
        fn call(&self, i: u64) -> CallFuture {
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if i % 100 == 99 {
                    Outcome::Unexpected(409)
                } else {
                    Outcome::Expected
                }
            })
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_step_sends_on_schedule_and_records_the_window() {
        let rt = runtime();
        let config = StepConfig::new(2000, Duration::from_millis(100), Duration::from_millis(300));
        let r = run_step(
            &rt,
            Arc::new(Sleepy {
                delay: Duration::from_millis(2),
            }),
            &config,
            None,
        );
        assert!(!r.aborted);
        assert_eq!(r.sent, 800);
        assert_eq!(r.measured, 600);
        assert_eq!(r.expected + r.unexpected.values().sum::<u64>(), 600);
        assert_eq!(r.unexpected.get(&409), Some(&6));
        // Every latency includes the 2 ms of the call.
        assert!(r.latency_us.min() >= 2000, "min {}", r.latency_us.min());
        assert!(r.cpu.is_some());
    }

    #[test]
    fn a_closed_loop_sends_as_fast_as_answers_come() {
        // 4 loops, 10 ms per call: about 400 answers per second.
        let rt = runtime();
        let config = ClosedLoopConfig {
            connections: 4,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(500),
            request_timeout: Duration::from_secs(1),
            limit: None,
        };
        let r = run_closed_loop(
            &rt,
            Arc::new(Sleepy {
                delay: Duration::from_millis(10),
            }),
            &config,
        );
        let total = r.expected + r.failed;
        assert!((150..=210).contains(&total), "{total}");
        // Every hundredth answer is a 409.
        assert!(r.failed >= 1, "{r:?}");
        assert!(r.latency_us.min() >= 10_000);
        assert!(
            r.throughput() > 300.0 && r.throughput() < 420.0,
            "{}",
            r.throughput()
        );
    }

    #[test]
    fn a_queue_shows_up_as_latency_and_aborts_the_step() {
        // One request at a time, 20 ms each, offered 200/s: the queue grows by 3 requests
        // every 20 ms, and the latency from the intended time grows with it.
        let rt = runtime();
        let mut config =
            StepConfig::new(200, Duration::from_millis(50), Duration::from_millis(500));
        config.max_in_flight = 1;
        config.overload_cutoff = Duration::from_millis(200);
        let r = run_step(
            &rt,
            Arc::new(Sleepy {
                delay: Duration::from_millis(20),
            }),
            &config,
            None,
        );
        assert!(r.aborted);
        // A closed-loop measure would say 20 ms; the buyers waited far longer.
        assert!(r.quantile_ms(0.99) > 150.0, "p99 {}", r.quantile_ms(0.99));
    }
}
