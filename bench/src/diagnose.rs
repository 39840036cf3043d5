//! Diagnosis mode (`e2e --diagnose`): what the server runtime did while a step ran.
//!
//! Two instruments, both from `tokio-metrics`:
//!
//! - a **probe task** on the server runtime (the one the HTTP server, the settler and the
//!   in-process servers run on), instrumented with a [`TaskMonitor`] that publishes its
//!   scheduling delay: it sleeps 1 ms, again and again, and records for every wake how
//!   late it ran (now − the deadline: timer and scheduling delay together) and its
//!   scheduling delay (woken → polled, from [`TaskScheduling`]). When every worker is
//!   busy in a long poll, or the VM does not run the process, the probe wakes late: a
//!   **stall**. Stalls longer than 5 ms are listed with their start and length, and the
//!   period of their recurrence is estimated (a stall every 100 ms shows as period 100).
//! - a [`RuntimeMonitor`] sampled every 100 ms from a plain thread (so it samples through
//!   a stall): per interval the busy share of the busiest and least busy worker, park
//!   counts, the global queue depth and live tasks (tokio's stable metrics only).

use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_metrics::{RuntimeMonitor, TaskMonitor, TaskScheduling};

/// A probe wake later than this is a stall.
pub const STALL_MS: f64 = 5.0;

/// One runtime sample (a 100 ms interval).
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeSample {
    /// End of the interval, seconds since the diagnosis started.
    pub t_s: f64,
    /// Busy time of all workers over the interval, divided by workers × interval.
    pub busy: f64,
    /// Busy share of the busiest worker.
    pub busy_max: f64,
    /// Busy share of the least busy worker.
    pub busy_min: f64,
    /// Times workers parked in the interval.
    pub parks: u64,
    /// Tasks in the global (injection) queue at the sample.
    pub global_queue_depth: usize,
    /// Tasks alive at the sample.
    pub live_tasks: usize,
}

/// One stall: a probe wake more than [`STALL_MS`] late.
#[derive(Debug, Clone, Serialize)]
pub struct Stall {
    /// When the probe should have woken, seconds since the diagnosis started.
    pub start_s: f64,
    /// How late it woke, ms.
    pub duration_ms: f64,
    /// Of that, scheduling delay (woken → polled), ms.
    pub scheduling_delay_ms: f64,
    /// Busy share of the busiest worker in the 100 ms interval holding the stall.
    pub busy_max: Option<f64>,
    /// Global queue depth at the end of that interval.
    pub global_queue_depth: Option<usize>,
}

/// What the diagnosis saw.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    /// What ran meanwhile.
    pub during: String,
    /// Seconds observed.
    pub duration_s: f64,
    /// Probe wakes.
    pub wakes: u64,
    /// Lateness of the probe's wakes, ms: median, p99, max.
    pub late_p50_ms: f64,
    /// 99th percentile.
    pub late_p99_ms: f64,
    /// Slowest.
    pub late_max_ms: f64,
    /// Scheduling delay (woken → polled), p99 and max, ms.
    pub sched_p99_ms: f64,
    /// Slowest scheduling delay.
    pub sched_max_ms: f64,
    /// The probe's polls slower than 1 ms (its polls are trivial: a long one means the
    /// thread was descheduled mid-poll).
    pub probe_slow_polls: u64,
    /// Stalls (> [`STALL_MS`]), in time order.
    pub stalls: Vec<Stall>,
    /// Estimated period of the stalls, ms, and the share of gaps between stalls that
    /// are a whole multiple of it (within 10 % of the period).
    pub period_ms: Option<f64>,
    /// See `period_ms`.
    pub period_fit: Option<f64>,
    /// Mean busy share of the workers.
    pub busy_mean: f64,
    /// Intervals in which the busiest worker was busy over 90 % of the time.
    pub intervals_busy_over_90: u64,
    /// Parks per second (all workers).
    pub parks_per_s: f64,
    /// Deepest global queue seen.
    pub global_queue_max: usize,
    /// Every runtime sample.
    pub samples: Vec<RuntimeSample>,
}

/// A running diagnosis.
pub struct Diagnoser {
    stop: Arc<AtomicBool>,
    t0: Instant,
    probe: tokio::task::JoinHandle<Vec<(f64, f64, f64)>>,
    sampler: std::thread::JoinHandle<Vec<RuntimeSample>>,
    monitor: TaskMonitor,
}

impl Diagnoser {
    /// Starts the probe task on `handle`'s runtime and the sampler thread.
    pub fn start(handle: &tokio::runtime::Handle) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let monitor = {
            let mut b = TaskMonitor::builder();
            b.with_slow_poll_threshold(Duration::from_millis(1))
                .with_long_delay_threshold(Duration::from_millis(STALL_MS as u64))
                .publish_scheduling_delay();
            b.build()
        };
        let probe = {
            let stop = Arc::clone(&stop);
            handle.spawn(monitor.instrument(async move {
                // (intended wake s since t0, lateness ms, scheduling delay ms)
                let mut wakes = Vec::with_capacity(1 << 14);
                while !stop.load(Ordering::Relaxed) {
                    let deadline = Instant::now() + Duration::from_millis(1);
                    let before = TaskScheduling::try_current().unwrap_or_default();
                    tokio::time::sleep_until(deadline.into()).await;
                    let now = Instant::now();
                    let after = TaskScheduling::try_current().unwrap_or_default();
                    let sched = after
                        .total_scheduled_duration
                        .saturating_sub(before.total_scheduled_duration);
                    wakes.push((
                        deadline.saturating_duration_since(t0).as_secs_f64(),
                        now.saturating_duration_since(deadline).as_secs_f64() * 1000.0,
                        sched.as_secs_f64() * 1000.0,
                    ));
                }
                wakes
            }))
        };
        let sampler = {
            let stop = Arc::clone(&stop);
            let handle = handle.clone();
            std::thread::Builder::new()
                .name("diag-sampler".into())
                .spawn(move || {
                    let monitor = RuntimeMonitor::new(&handle);
                    let mut intervals = monitor.intervals();
                    let mut out = Vec::new();
                    let _ = intervals.next();
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                        let Some(m) = intervals.next() else { break };
                        let el = m.elapsed.as_secs_f64().max(1e-9);
                        let workers = m.workers_count.max(1) as f64;
                        out.push(RuntimeSample {
                            t_s: t0.elapsed().as_secs_f64(),
                            busy: m.total_busy_duration.as_secs_f64() / el / workers,
                            busy_max: m.max_busy_duration.as_secs_f64() / el,
                            busy_min: m.min_busy_duration.as_secs_f64() / el,
                            parks: m.total_park_count,
                            global_queue_depth: m.global_queue_depth,
                            live_tasks: m.live_tasks_count,
                        });
                    }
                    out
                })
                .expect("spawn the sampler thread")
        };
        Diagnoser {
            stop,
            t0,
            probe,
            sampler,
            monitor,
        }
    }

    /// Stops both instruments and summarises; `handle` runs the wait for the probe.
    pub fn finish(self, handle: &tokio::runtime::Handle, during: &str) -> Diagnosis {
        self.stop.store(true, Ordering::Relaxed);
        let duration_s = self.t0.elapsed().as_secs_f64();
        let wakes = handle.block_on(self.probe).unwrap_or_default();
        let samples = self.sampler.join().unwrap_or_default();
        let task = self.monitor.cumulative();
        summarise(
            during,
            duration_s,
            &wakes,
            samples,
            task.total_slow_poll_count,
        )
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The period of events starting at `starts` (seconds): the largest candidate period
/// (a gap between consecutive events, or a half or third of one, at least 5 ms) of which
/// at least 70 % of the gaps are a whole multiple, within 10 % of the period. Returns the
/// period in ms and the share of gaps it explains.
pub fn estimate_period(starts: &[f64]) -> Option<(f64, f64)> {
    let gaps: Vec<f64> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .filter(|g| *g > 0.0)
        .collect();
    if gaps.len() < 3 {
        return None;
    }
    let fit = |p: f64| {
        let ok = gaps
            .iter()
            .filter(|g| {
                let k = (**g / p).round().max(1.0);
                (**g - k * p).abs() <= 0.1 * p
            })
            .count();
        ok as f64 / gaps.len() as f64
    };
    let mut candidates: Vec<f64> = gaps
        .iter()
        .flat_map(|g| [*g, *g / 2.0, *g / 3.0])
        .filter(|p| *p >= 5.0)
        .collect();
    candidates.sort_by(|a, b| b.total_cmp(a));
    candidates
        .into_iter()
        .map(|p| (p, fit(p)))
        .find(|(_, f)| *f >= 0.7)
        .map(|(p, f)| {
            // Refine: the mean of the gaps that are one period long, when there are some.
            let ones: Vec<f64> = gaps
                .iter()
                .copied()
                .filter(|g| (g - p).abs() <= 0.1 * p)
                .collect();
            let p = if ones.is_empty() {
                p
            } else {
                ones.iter().sum::<f64>() / ones.len() as f64
            };
            (p, f)
        })
}

fn summarise(
    during: &str,
    duration_s: f64,
    wakes: &[(f64, f64, f64)],
    samples: Vec<RuntimeSample>,
    probe_slow_polls: u64,
) -> Diagnosis {
    let mut late: Vec<f64> = wakes.iter().map(|w| w.1).collect();
    let mut sched: Vec<f64> = wakes.iter().map(|w| w.2).collect();
    late.sort_by(f64::total_cmp);
    sched.sort_by(f64::total_cmp);
    // Consecutive late wakes within the same stall are one stall.
    let mut stalls: Vec<Stall> = Vec::new();
    for &(at, late_ms, sched_ms) in wakes.iter().filter(|w| w.1 > STALL_MS) {
        if let Some(last) = stalls.last_mut() {
            let last_end = last.start_s + last.duration_ms / 1000.0;
            if at <= last_end + 0.002 {
                let end = (at + late_ms / 1000.0).max(last_end);
                last.duration_ms = (end - last.start_s) * 1000.0;
                last.scheduling_delay_ms = last.scheduling_delay_ms.max(sched_ms);
                continue;
            }
        }
        let sample = samples.iter().find(|s| s.t_s >= at + late_ms / 1000.0);
        stalls.push(Stall {
            start_s: at,
            duration_ms: late_ms,
            scheduling_delay_ms: sched_ms,
            busy_max: sample.map(|s| s.busy_max),
            global_queue_depth: sample.map(|s| s.global_queue_depth),
        });
    }
    let starts: Vec<f64> = stalls.iter().map(|s| s.start_s).collect();
    let period = estimate_period(&starts);
    let n = samples.len().max(1) as f64;
    Diagnosis {
        during: during.to_owned(),
        duration_s,
        wakes: wakes.len() as u64,
        late_p50_ms: quantile(&late, 0.5),
        late_p99_ms: quantile(&late, 0.99),
        late_max_ms: late.last().copied().unwrap_or(0.0),
        sched_p99_ms: quantile(&sched, 0.99),
        sched_max_ms: sched.last().copied().unwrap_or(0.0),
        probe_slow_polls,
        stalls,
        period_ms: period.map(|p| p.0),
        period_fit: period.map(|p| p.1),
        busy_mean: samples.iter().map(|s| s.busy).sum::<f64>() / n,
        intervals_busy_over_90: samples.iter().filter(|s| s.busy_max > 0.9).count() as u64,
        parks_per_s: samples.iter().map(|s| s.parks).sum::<u64>() as f64 / duration_s.max(1e-9),
        global_queue_max: samples
            .iter()
            .map(|s| s.global_queue_depth)
            .max()
            .unwrap_or(0),
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_periodic_stall_shows_its_period() {
        // Every 100 ms, with some occurrences missed and a little jitter.
        let starts: Vec<f64> = [0.0, 0.1, 0.2, 0.401, 0.5, 0.599, 0.8, 0.9, 1.0]
            .into_iter()
            .collect();
        let (p, fit) = estimate_period(&starts).expect("a period");
        assert!((p - 100.0).abs() < 2.0, "{p}");
        assert!(fit >= 0.99, "{fit}");
        // Every 250 ms.
        let starts: Vec<f64> = (0..12).map(|i| f64::from(i) * 0.25).collect();
        let (p, _) = estimate_period(&starts).expect("a period");
        assert!((p - 250.0).abs() < 1.0, "{p}");
    }

    #[test]
    fn random_stalls_have_no_period() {
        let starts = [0.0, 0.013, 0.31, 0.317, 0.9, 1.77, 1.8, 2.93];
        assert!(estimate_period(&starts).is_none_or(|(_, fit)| fit < 1.0));
        assert!(estimate_period(&[0.0, 0.1]).is_none());
    }

    #[test]
    fn the_probe_sees_a_blocked_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let d = Diagnoser::start(rt.handle());
        std::thread::sleep(Duration::from_millis(50));
        // Block the only worker for 30 ms, twice.
        for _ in 0..2 {
            rt.spawn(async { std::thread::sleep(Duration::from_millis(30)) });
            std::thread::sleep(Duration::from_millis(120));
        }
        let r = d.finish(rt.handle(), "test");
        assert!(r.wakes > 50, "{}", r.wakes);
        assert!(r.stalls.len() >= 2, "{:?}", r.stalls);
        assert!(
            r.stalls.iter().any(|s| s.duration_ms >= 20.0),
            "{:?}",
            r.stalls
        );
        assert!(!r.samples.is_empty());
    }
}
