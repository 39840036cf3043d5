//! The end-to-end results: per system its steps, highest passing rate, latency at half
//! that rate, CPU per 1,000 orders, ratio to its ceiling; the settler's persist rate and
//! lag; the targets met or missed. Written as JSON and as a Markdown table.

use crate::cpu::CpuUsage;
use crate::diagnose::{Diagnosis, STALL_MS};
use crate::loadgen::{ClosedLoopResult, ProbeSample, StepResult};
use crate::settle::{DrainOutcome, PaidLatency, SettlerAlone};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// The latency objective a step must meet to pass.
pub const P99_OBJECTIVE_MS: f64 = 10.0;
/// Largest share of a window's requests that may fail (not the expected answer) in a
/// passing step.
pub const MAX_FAILURE_SHARE: f64 = 0.001;

/// One step, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct StepSummary {
    /// Offered rate, requests per second.
    pub offered_per_s: u64,
    /// Expected answers per second over the window.
    pub achieved_per_s: f64,
    /// Whether it met the objective.
    pub pass: bool,
    /// Why it failed, if it did.
    pub failed_because: Option<String>,
    /// Requests intended in the window.
    pub requests: u64,
    /// Of those, the expected answer.
    pub expected: u64,
    /// Of those, another answer, by status.
    pub unexpected: BTreeMap<u16, u64>,
    /// Transport errors and timeouts.
    pub errors: u64,
    /// Not answered by the end of the drain (or not sent after an abort).
    pub unfinished: u64,
    /// Latency from the intended send time, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// CPU over the window.
    pub cpu: Option<CpuUsage>,
    /// System CPU seconds (this process less the generator, plus servers) per 1,000
    /// requests of the window.
    pub cpu_s_per_1000: Option<f64>,
}

impl StepSummary {
    /// Summarises a step and judges it against the objective.
    pub fn of(r: &StepResult) -> Self {
        let p99 = r.quantile_ms(0.99);
        let failed_because = if r.aborted {
            Some("overloaded: a request waited over 1 s to be sent; stopped early".to_owned())
        } else if r.measured == 0 {
            Some("no request in the window".to_owned())
        } else if r.failure_share() > MAX_FAILURE_SHARE {
            Some(format!(
                "{:.2} % of requests failed (unexpected {:?}, errors {}, unfinished {})",
                r.failure_share() * 100.0,
                r.unexpected,
                r.errors,
                r.unfinished
            ))
        } else if p99 >= P99_OBJECTIVE_MS {
            Some(format!("p99 {p99:.2} ms >= {P99_OBJECTIVE_MS} ms"))
        } else {
            None
        };
        let cpu_s_per_1000 = r
            .cpu
            .as_ref()
            .filter(|_| r.measured > 0)
            .map(|c| c.system_s / r.measured as f64 * 1000.0);
        StepSummary {
            offered_per_s: r.rate,
            achieved_per_s: if r.window_s > 0.0 {
                r.expected as f64 / r.window_s
            } else {
                0.0
            },
            pass: failed_because.is_none(),
            failed_because,
            requests: r.measured,
            expected: r.expected,
            unexpected: r.unexpected.clone(),
            errors: r.errors,
            unfinished: r.unfinished,
            p50_ms: r.quantile_ms(0.5),
            p90_ms: r.quantile_ms(0.9),
            p99_ms: p99,
            p999_ms: r.quantile_ms(0.999),
            max_ms: r.latency_us.max() as f64 / 1000.0,
            cpu: r.cpu.clone(),
            cpu_s_per_1000,
        }
    }
}

/// The settler under the highest passing ingest rate.
#[derive(Debug, Clone, Serialize)]
pub struct SettlerSummary {
    /// Offered ingest rate, orders per second.
    pub ingest_per_s: u64,
    /// Accepted (202) per second over the step.
    pub accepted_per_s: f64,
    /// Orders persisted per second over the step.
    pub persisted_per_s: f64,
    /// Lag (accepted, not yet persisted) at the first sample.
    pub lag_start: i64,
    /// Lag at the last sample.
    pub lag_end: i64,
    /// Least-squares slope of the lag, orders per second (> 0: growing).
    pub lag_slope_per_s: f64,
    /// Whether the settler kept up: the lag grew by less than 2 % of the ingest rate.
    pub keeps_up: bool,
    /// Seconds after the step until the lag was back under 1 % of the rate.
    pub drained_after_s: Option<f64>,
    /// The samples: seconds, lag.
    pub lag_samples: Vec<(f64, i64)>,
}

impl SettlerSummary {
    /// From the probe samples of a step (probe = persisted so far) and the number of
    /// orders accepted before the step, leaving out the samples of the first `skip_s`
    /// seconds (the warm-up, while the pipeline fills: records in flight between the 202
    /// and the settler's next poll are lag too, a constant one).
    pub fn from_probes(
        rate: u64,
        accepted_before: u64,
        probes: &[ProbeSample],
        skip_s: f64,
    ) -> Option<Self> {
        let probes: Vec<ProbeSample> = probes.iter().filter(|p| p.t_s >= skip_s).copied().collect();
        let probes = probes.as_slice();
        let first = probes.first()?;
        let last = probes.last()?;
        let lag = |p: &ProbeSample| (accepted_before + p.expected_so_far) as i64 - p.value as i64;
        let samples: Vec<(f64, i64)> = probes.iter().map(|p| (p.t_s, lag(p))).collect();
        let dt = (last.t_s - first.t_s).max(1e-9);
        let n = samples.len() as f64;
        let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
        let mean_l = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
        let var = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum::<f64>();
        let cov = samples
            .iter()
            .map(|s| (s.0 - mean_t) * (s.1 as f64 - mean_l))
            .sum::<f64>();
        let slope = if var > 0.0 { cov / var } else { 0.0 };
        Some(SettlerSummary {
            ingest_per_s: rate,
            accepted_per_s: (last.expected_so_far - first.expected_so_far) as f64 / dt,
            persisted_per_s: (last.value.saturating_sub(first.value)) as f64 / dt,
            lag_start: lag(first),
            lag_end: lag(last),
            lag_slope_per_s: slope,
            keeps_up: slope <= 0.02 * rate as f64,
            drained_after_s: None,
            lag_samples: samples,
        })
    }
}

/// A closed-loop run, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct ClosedLoopSummary {
    /// Concurrent loops (connections).
    pub connections: usize,
    /// Window, seconds.
    pub window_s: f64,
    /// Expected answers per second.
    pub per_s: f64,
    /// Answers other than the expected one, and errors.
    pub failed: u64,
    /// Latency from each request's own send (closed loop), median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// System CPU seconds per 1,000 expected answers.
    pub cpu_s_per_1000: Option<f64>,
}

impl ClosedLoopSummary {
    /// Summarises a closed-loop run.
    pub fn of(r: &ClosedLoopResult) -> Self {
        ClosedLoopSummary {
            connections: r.connections,
            window_s: r.window_s,
            per_s: r.throughput(),
            failed: r.failed,
            p50_ms: r.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: r.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            cpu_s_per_1000: r
                .cpu
                .as_ref()
                .filter(|_| r.expected > 0)
                .map(|c| c.system_s / r.expected as f64 * 1000.0),
        }
    }
}

/// CPU of the whole order pipeline: from the first request of a step until every order
/// it got answered 202 was final and notified.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineCost {
    /// Orders answered 202 in the step (warm-up included).
    pub orders: u64,
    /// Seconds from the step's start to the end of settlement.
    pub span_s: f64,
    /// CPU seconds of the system under test over the span: this process less the load
    /// generator's threads and the harness's waiting, plus the server processes.
    pub system_s: f64,
    /// The same per server process (by command name).
    pub servers_by_name: BTreeMap<String, f64>,
    /// `system_s` per order, in ms.
    pub ms_per_order: f64,
}

/// Median, lowest and highest of a set of repetitions.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Lowest.
    pub min: f64,
    /// Highest.
    pub max: f64,
    /// Repetitions.
    pub n: usize,
}

impl Spread {
    /// Of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// One system's results.
#[derive(Debug, Clone, Serialize)]
pub struct SystemReport {
    /// Short name.
    pub name: String,
    /// What it is.
    pub description: String,
    /// Whether it is a ceiling.
    pub ceiling: bool,
    /// The ceiling it is compared with.
    pub ceiling_name: Option<String>,
    /// Highest passing rate of each repetition of the search (0: none passed).
    pub reps: Vec<u64>,
    /// Median of `reps` (0: none passed or not run).
    pub max_rate: u64,
    /// The ceiling's highest passing rate measured right before each repetition.
    pub paired_ceiling_reps: Vec<u64>,
    /// Median of `reps` over the median of `paired_ceiling_reps`.
    pub ratio_to_ceiling: Option<f64>,
    /// Lowest and highest ratio of one repetition to its paired ceiling.
    pub ratio_range: Option<(f64, f64)>,
    /// Closed-loop runs.
    pub closed_loop: Vec<ClosedLoopSummary>,
    /// The paired ceiling's closed-loop throughput, measured right before each run.
    pub closed_loop_ceiling: Vec<f64>,
    /// Median closed-loop throughput over the paired ceiling's median.
    pub closed_loop_ratio: Option<f64>,
    /// The step at half of `max_rate`.
    pub half: Option<StepSummary>,
    /// Every search step, in the order run (all repetitions).
    pub steps: Vec<StepSummary>,
    /// The settler at `max_rate` (accepted paths).
    pub settler: Option<SettlerSummary>,
    /// After each accepted-path run: was every order answered 202 final and notified, and
    /// how long it took.
    pub drains: Vec<DrainOutcome>,
    /// Time from 202 to paid, orders of the half-rate step.
    pub paid: Option<PaidLatency>,
    /// CPU from acceptance to paid and notified, orders of the half-rate step.
    pub cost: Option<PipelineCost>,
    /// The settler alone on a filled log, ingest idle.
    pub alone: Option<SettlerAlone>,
    /// `--diagnose`: the server runtime during the half-rate step.
    pub diagnosis: Option<Diagnosis>,
    /// Why it was not run, or anything worth knowing.
    pub notes: Vec<String>,
}

impl SystemReport {
    /// An empty report for `name`.
    pub fn new(name: &str, description: &str, ceiling: bool, ceiling_name: Option<&str>) -> Self {
        SystemReport {
            name: name.to_owned(),
            description: description.to_owned(),
            ceiling,
            ceiling_name: ceiling_name.map(str::to_owned),
            reps: Vec::new(),
            max_rate: 0,
            paired_ceiling_reps: Vec::new(),
            ratio_to_ceiling: None,
            ratio_range: None,
            closed_loop: Vec::new(),
            closed_loop_ceiling: Vec::new(),
            closed_loop_ratio: None,
            half: None,
            steps: Vec::new(),
            settler: None,
            drains: Vec::new(),
            paid: None,
            cost: None,
            alone: None,
            diagnosis: None,
            notes: Vec::new(),
        }
    }

    /// The spread of the repetitions' max rates.
    pub fn rate_spread(&self) -> Option<Spread> {
        let v: Vec<f64> = self.reps.iter().map(|r| *r as f64).collect();
        Spread::of(&v)
    }

    /// The spread of the closed-loop throughputs.
    pub fn closed_loop_spread(&self) -> Option<Spread> {
        let v: Vec<f64> = self.closed_loop.iter().map(|c| c.per_s).collect();
        Spread::of(&v)
    }

    /// CPU per order in ms: the whole pipeline (acceptance to paid and notified) when
    /// measured, else the half-rate window's.
    pub fn cpu_ms_per_order(&self) -> Option<(f64, &'static str)> {
        match (&self.cost, &self.half) {
            (Some(c), _) => Some((c.ms_per_order, "to paid + notified")),
            (None, Some(h)) => h.cpu_s_per_1000.map(|c| (c, "window")),
            _ => None,
        }
    }

    /// Sets `max_rate` and the ratios from the repetitions.
    pub fn compute(&mut self) {
        self.max_rate = self.rate_spread().map_or(0, |s| s.median.round() as u64);
        let ceil: Vec<f64> = self.paired_ceiling_reps.iter().map(|r| *r as f64).collect();
        self.ratio_to_ceiling = Spread::of(&ceil)
            .filter(|c| c.median > 0.0 && self.max_rate > 0)
            .map(|c| self.max_rate as f64 / c.median);
        let pairs: Vec<f64> = self
            .reps
            .iter()
            .zip(&self.paired_ceiling_reps)
            .filter(|(_, c)| **c > 0)
            .map(|(s, c)| *s as f64 / *c as f64)
            .collect();
        self.ratio_range = Spread::of(&pairs).map(|s| (s.min, s.max));
        self.closed_loop_ratio = match (
            self.closed_loop_spread(),
            Spread::of(&self.closed_loop_ceiling),
        ) {
            (Some(s), Some(c)) if c.median > 0.0 => Some(s.median / c.median),
            _ => None,
        };
    }

    /// Whether every settle check passed (true when there was none).
    pub fn settled(&self) -> bool {
        self.drains.iter().all(|d| d.complete)
            && self
                .alone
                .as_ref()
                .and_then(|a| a.drain.as_ref())
                .is_none_or(|d| d.complete)
    }
}

/// A target of the issue.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// What is required.
    pub target: String,
    /// The measured value, in words.
    pub measured: String,
    /// Met or missed.
    pub met: Option<bool>,
    /// By how much, in words.
    pub margin: String,
}

/// The machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Host name.
    pub host: String,
    /// CPU model.
    pub cpu: String,
    /// Cores online.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads it from `/proc`.
    pub fn here() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            host: read("/proc/sys/kernel/hostname").trim().to_owned(),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it ran (UTC, RFC 3339).
    pub started_at: String,
    /// Seconds it took.
    pub duration_s: f64,
    /// The command.
    pub command: String,
    /// Quick or full.
    pub mode: String,
    /// Warm-up and window of each step, seconds.
    pub step_warmup_s: f64,
    /// Measurement window of each step, seconds.
    pub step_window_s: f64,
    /// Repetitions of each search.
    pub repetitions: usize,
    /// Closed loop: connections and window, seconds.
    pub closed_loop_connections: usize,
    /// See `closed_loop_connections`.
    pub closed_loop_window_s: f64,
    /// How long the harness waits for the orders to settle after a run, seconds.
    pub settle_deadline_s: f64,
    /// The machine.
    pub machine: Machine,
    /// The method, in words.
    pub method: Vec<String>,
    /// Every system.
    pub systems: Vec<SystemReport>,
    /// The targets.
    pub targets: Vec<TargetCheck>,
    /// Why the run failed (orders that did not settle); empty when it did not.
    pub failures: Vec<String>,
}

fn pct(r: f64) -> String {
    format!("{:.0} %", r * 100.0)
}

fn judged(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

impl Report {
    /// The system named `name`.
    pub fn system(&self, name: &str) -> Option<&SystemReport> {
        self.systems.iter().find(|s| s.name == name)
    }

    /// Fills in medians and ratios of every system.
    pub fn compute_ratios(&mut self) {
        for s in &mut self.systems {
            s.compute();
        }
    }

    /// Collects the settle failures.
    pub fn compute_failures(&mut self) {
        self.failures = self
            .systems
            .iter()
            .flat_map(|s| {
                s.drains
                    .iter()
                    .chain(s.alone.iter().filter_map(|a| a.drain.as_ref()))
                    .filter(|d| !d.complete)
                    .map(move |d| format!("{}: {}", s.name, d.describe()))
            })
            .collect();
    }

    /// Judges the targets.
    pub fn compute_targets(&mut self) {
        let mut out = Vec::new();
        for (name, what, min) in [
            (
                "flashsale-embedded-accepted",
                "embedded, accepted path",
                0.50,
            ),
            (
                "flashsale-distributed-accepted",
                "distributed, accepted path",
                0.30,
            ),
            (
                "flashsale-embedded-soldout",
                "embedded, sold-out path",
                0.70,
            ),
            (
                "flashsale-distributed-soldout",
                "distributed, sold-out path",
                0.70,
            ),
        ] {
            let s = self.system(name);
            let (measured, met, margin) = match s.and_then(|s| s.ratio_to_ceiling.map(|r| (s, r))) {
                Some((s, r)) => (
                    format!(
                        "{} ({} /s; pairs {})",
                        pct(r),
                        s.max_rate,
                        s.ratio_range.map_or("-".to_owned(), |(a, b)| format!(
                            "{}–{}",
                            pct(a),
                            pct(b)
                        ))
                    ),
                    Some(r >= min),
                    format!("{:+.0} points", (r - min) * 100.0),
                ),
                None => ("not measured".into(), None, "-".into()),
            };
            out.push(TargetCheck {
                target: format!(
                    "{what}: max rate >= {:.0} % of the paired plain-hyper ceiling",
                    min * 100.0
                ),
                measured,
                met,
                margin,
            });
        }
        for s in self.systems.iter().filter(|s| !s.ceiling) {
            let (measured, met, margin) = match &s.half {
                Some(h) => (
                    format!("{:.2} ms at {} /s", h.p99_ms, h.offered_per_s),
                    Some(h.p99_ms < 5.0 && h.pass),
                    format!("{:+.2} ms", 5.0 - h.p99_ms),
                ),
                None => ("not measured".into(), None, "-".into()),
            };
            out.push(TargetCheck {
                target: format!("{}: p99 at half the max rate < 5 ms", s.name),
                measured,
                met,
                margin,
            });
        }
        let accepted: Vec<&SystemReport> = self
            .systems
            .iter()
            .filter(|s| !s.ceiling && s.name.ends_with("accepted"))
            .collect();
        for s in &accepted {
            let (measured, met, margin) = match &s.settler {
                Some(st) => (
                    format!(
                        "persisted {:.0} /s of {:.0} /s accepted; lag {} -> {} ({:+.0} /s)",
                        st.persisted_per_s,
                        st.accepted_per_s,
                        st.lag_start,
                        st.lag_end,
                        st.lag_slope_per_s
                    ),
                    Some(st.keeps_up),
                    format!(
                        "lag slope {:+.1} % of the ingest rate (limit +2 %)",
                        st.lag_slope_per_s / st.ingest_per_s.max(1) as f64 * 100.0
                    ),
                ),
                None => ("not measured".into(), None, "-".into()),
            };
            out.push(TargetCheck {
                target: format!(
                    "{}: settler keeps up at the max rate (lag slope < 2 % of the ingest rate)",
                    s.name
                ),
                measured,
                met,
                margin,
            });
            let alone = s.alone.as_ref().and_then(|a| a.sustained_per_s);
            let closed = s.closed_loop_spread().map(|c| c.median);
            let (measured, met, margin) = match (alone, closed) {
                (Some(a), Some(c)) => (
                    format!("settler alone {a:.0} /s; ingest closed loop {c:.0} /s"),
                    Some(a >= c),
                    format!("{:+.0} %", (a / c.max(1e-9) - 1.0) * 100.0),
                ),
                _ => ("not measured".into(), None, "-".into()),
            };
            out.push(TargetCheck {
                target: format!(
                    "{}: settler's sustained rate (ingest idle) >= ingest's closed-loop accepted rate",
                    s.name
                ),
                measured,
                met,
                margin,
            });
            let limit = if s.name.contains("embedded") {
                0.15
            } else {
                0.5
            };
            let (measured, met, margin) = match &s.cost {
                Some(c) => (
                    format!(
                        "{:.3} ms ({} orders, {:.1} s)",
                        c.ms_per_order, c.orders, c.span_s
                    ),
                    Some(c.ms_per_order <= limit),
                    format!("{:+.3} ms", limit - c.ms_per_order),
                ),
                None => ("not measured".into(), None, "-".into()),
            };
            out.push(TargetCheck {
                target: format!(
                    "{}: CPU per order, acceptance to paid and notified, <= {limit} ms",
                    s.name
                ),
                measured,
                met,
                margin,
            });
            let (measured, met, margin) = match &s.paid {
                Some(p) if p.paid > 0 => (
                    format!("{:.0} ms ({} orders)", p.p99_ms, p.paid),
                    Some(p.p99_ms <= 1000.0),
                    format!("{:+.0} ms", 1000.0 - p.p99_ms),
                ),
                _ => ("not measured".into(), None, "-".into()),
            };
            out.push(TargetCheck {
                target: format!("{}: 202 -> paid p99 <= 1 s", s.name),
                measured,
                met,
                margin,
            });
            let (measured, met, margin) = if s.drains.is_empty() {
                ("not measured".into(), None, "-".into())
            } else {
                let worst = s.drains.iter().map(|d| d.waited_s).fold(0.0f64, f64::max);
                let missing: u64 = s.drains.iter().map(|d| d.missing).max().unwrap_or(0);
                (
                    format!(
                        "{} checks, slowest {:.1} s, {} orders missing",
                        s.drains.len(),
                        worst,
                        missing
                    ),
                    Some(s.settled()),
                    "-".into(),
                )
            };
            out.push(TargetCheck {
                target: format!(
                    "{}: every order answered 202 final and notified within the deadline",
                    s.name
                ),
                measured,
                met,
                margin,
            });
        }
        self.targets = out;
    }

    /// The Markdown report.
    pub fn markdown(&self, chart: Option<&str>) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# flashsale end-to-end benchmark\n");
        if !self.failures.is_empty() {
            let _ = writeln!(s, "**RUN FAILED: orders answered 202 did not settle.**\n");
            for f in &self.failures {
                let _ = writeln!(s, "- {f}");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "Run {} on `{}` ({}, {} cores, Linux {}), {} mode, {:.0} s. Command: `{}`.\n",
            self.started_at,
            self.machine.host,
            self.machine.cpu,
            self.machine.cores,
            self.machine.kernel,
            self.mode,
            self.duration_s,
            self.command
        );
        let _ = writeln!(
            s,
            "Open loop, latency from each request's intended send time. Max rate: the highest \
             offered rate whose p99 < {P99_OBJECTIVE_MS} ms with at most {:.1} % failures \
             (steps {:.1} s warm-up + {:.1} s measured), the **median of {} repetitions** \
             (spread min–max); each repetition of a flashsale system is measured right after \
             a repetition of its ceiling, and the ratio is the system's median over the \
             paired ceiling medians (pairs: the lowest and highest ratio of one pair). \
             Closed loop: {} connections, each sending its next request when the answer came, \
             {:.0} s (the in-process load generator, as wrk would), same pairing. Latency at \
             half the max rate. CPU per order: accepted paths from the first request of the \
             half-rate step until every order is paid and notified (process less the load \
             generator, plus the server processes); other systems over the half-rate window. \
             Settle drain: after each accepted-path run, the time until every order answered \
             202 was final and notified (the run fails after {:.0} s).\n",
            MAX_FAILURE_SHARE * 100.0,
            self.step_warmup_s,
            self.step_window_s,
            self.repetitions,
            self.closed_loop_connections,
            self.closed_loop_window_s,
            self.settle_deadline_s,
        );
        let _ = writeln!(
            s,
            "| system | max rate /s, p99 < 10 ms: median (min–max) | ratio to paired ceiling (pairs) | closed loop /s: median (min–max) | closed-loop ratio | p50 / p99 ms @ half | CPU ms / order | settle drain s (slowest) | 202 -> paid p99 ms | settler alone /s |"
        );
        let _ = writeln!(s, "|---|---:|---|---:|---|---:|---:|---:|---:|---:|");
        for sys in &self.systems {
            let rate = sys.rate_spread().map_or("-".to_owned(), |sp| {
                format!("{:.0} ({:.0}–{:.0}, n={})", sp.median, sp.min, sp.max, sp.n)
            });
            let ceiling = sys.ceiling_name.as_deref().unwrap_or("");
            let ratio = match (sys.ceiling_name.is_some(), sys.ratio_to_ceiling) {
                (true, Some(r)) => format!(
                    "{} of {ceiling}{}",
                    pct(r),
                    sys.ratio_range.map_or(String::new(), |(a, b)| format!(
                        " ({}–{})",
                        pct(a),
                        pct(b)
                    ))
                ),
                (true, None) => format!("- ({ceiling})"),
                (false, _) => "ceiling".to_owned(),
            };
            let closed = sys.closed_loop_spread().map_or("-".to_owned(), |sp| {
                format!("{:.0} ({:.0}–{:.0})", sp.median, sp.min, sp.max)
            });
            let closed_ratio = match (sys.ceiling_name.is_some(), sys.closed_loop_ratio) {
                (true, Some(r)) => pct(r),
                (true, None) => "-".to_owned(),
                (false, _) => "ceiling".to_owned(),
            };
            let half = sys.half.as_ref().map_or("-".to_owned(), |h| {
                format!("{:.2} / {:.2}", h.p50_ms, h.p99_ms)
            });
            let cpu = sys
                .cpu_ms_per_order()
                .map_or("-".to_owned(), |(c, what)| format!("{c:.3} ({what})"));
            let drain = if sys.drains.is_empty() {
                "-".to_owned()
            } else if sys.settled() {
                format!(
                    "{:.1}",
                    sys.drains.iter().map(|d| d.waited_s).fold(0.0f64, f64::max)
                )
            } else {
                "**FAILED**".to_owned()
            };
            let paid = sys
                .paid
                .as_ref()
                .filter(|p| p.paid > 0)
                .map_or("-".to_owned(), |p| format!("{:.0}", p.p99_ms));
            let alone = sys
                .alone
                .as_ref()
                .and_then(|a| a.sustained_per_s)
                .map_or("-".to_owned(), |r| format!("{r:.0}"));
            let _ = writeln!(
                s,
                "| {} | {rate} | {ratio} | {closed} | {closed_ratio} | {half} | {cpu} | {drain} | {paid} | {alone} |",
                sys.name
            );
        }
        let _ = writeln!(s, "\n## Targets (reported, not asserted)\n");
        let _ = writeln!(s, "| target | measured | met | margin |");
        let _ = writeln!(s, "|---|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                t.target,
                t.measured,
                judged(t.met),
                t.margin
            );
        }
        let settlers: Vec<&SystemReport> = self
            .systems
            .iter()
            .filter(|s| s.settler.is_some() || s.alone.is_some() || !s.drains.is_empty())
            .collect();
        if !settlers.is_empty() {
            let _ = writeln!(s, "\n## Settler\n");
            let _ = writeln!(
                s,
                "At the max ingest rate (one longer step): accepted and persisted per second, \
                 the lag (accepted, not persisted) and its slope. Alone: the log filled with \
                 accepted orders while the settler was off, then the settler started with \
                 ingest idle; sustained = orders final and notified per second between 10 % \
                 and 90 % done.\n"
            );
            let _ = writeln!(
                s,
                "| system | ingest /s | accepted /s | persisted /s | lag start -> end | lag slope /s | alone: orders | alone: sustained /s | alone: overall /s (start-up incl.) | 202 -> paid p50 / p99 / max ms | 202 -> notified p99 ms | settle drains s |"
            );
            let _ = writeln!(
                s,
                "|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---|"
            );
            for sys in settlers {
                let st = sys.settler.as_ref();
                let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
                let drains = sys
                    .drains
                    .iter()
                    .map(|d| {
                        if d.complete {
                            format!("{:.1}", d.waited_s)
                        } else {
                            format!("FAILED ({} missing)", d.missing)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ =
                    writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        sys.name,
                        st.map_or("-".to_owned(), |st| st.ingest_per_s.to_string()),
                        f(st.map(|st| st.accepted_per_s)),
                        f(st.map(|st| st.persisted_per_s)),
                        st.map_or("-".to_owned(), |st| format!(
                            "{} -> {}",
                            st.lag_start, st.lag_end
                        )),
                        st.map_or("-".to_owned(), |st| format!("{:+.0}", st.lag_slope_per_s)),
                        sys.alone
                            .as_ref()
                            .map_or("-".to_owned(), |a| a.orders.to_string()),
                        f(sys.alone.as_ref().and_then(|a| a.sustained_per_s)),
                        f(sys.alone.as_ref().and_then(|a| a.overall_per_s)),
                        sys.paid.as_ref().filter(|p| p.paid > 0).map_or(
                            "-".to_owned(),
                            |p| format!("{:.0} / {:.0} / {:.0}", p.p50_ms, p.p99_ms, p.max_ms)
                        ),
                        f(sys
                            .paid
                            .as_ref()
                            .filter(|p| p.paid > 0)
                            .map(|p| p.notified_p99_ms)),
                        if drains.is_empty() {
                            "-".to_owned()
                        } else {
                            drains
                        },
                    );
            }
        }
        let costs: Vec<&SystemReport> = self.systems.iter().filter(|s| s.cost.is_some()).collect();
        if !costs.is_empty() {
            let _ = writeln!(
                s,
                "\n## CPU from acceptance to paid and notified (half-rate step)\n"
            );
            let _ = writeln!(
                s,
                "| system | orders | span s | system CPU s | servers | ms / order |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---|---:|");
            for sys in costs {
                if let Some(c) = &sys.cost {
                    let servers = if c.servers_by_name.is_empty() {
                        "0".to_owned()
                    } else {
                        c.servers_by_name
                            .iter()
                            .map(|(k, v)| format!("{k} {v:.2}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.1} | {:.2} | {} | {:.3} |",
                        sys.name, c.orders, c.span_s, c.system_s, servers, c.ms_per_order
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "\n## CPU at half the max rate (seconds over the window)\n"
        );
        let _ = writeln!(s, "| system | window s | process | generator | servers | system under test | cores busy (SUT) |");
        let _ = writeln!(s, "|---|---:|---:|---:|---|---:|---:|");
        for sys in &self.systems {
            if let Some(c) = sys.half.as_ref().and_then(|h| h.cpu.as_ref()) {
                let servers = if c.servers_by_name.is_empty() {
                    "0".to_owned()
                } else {
                    c.servers_by_name
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = writeln!(
                    s,
                    "| {} | {:.1} | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
                    sys.name,
                    c.wall_s,
                    c.process_s,
                    c.generator_s,
                    servers,
                    c.system_s,
                    c.system_s / c.wall_s.max(1e-9)
                );
            }
        }
        let diags: Vec<&SystemReport> = self
            .systems
            .iter()
            .filter(|s| s.diagnosis.is_some())
            .collect();
        if !diags.is_empty() {
            let _ = writeln!(s, "\n## Diagnosis (`--diagnose`): the server runtime\n");
            let _ = writeln!(
                s,
                "A probe task on the server runtime sleeps 1 ms again and again \
                 (`tokio_metrics::TaskMonitor`); a wake more than {} ms late is a stall. \
                 `RuntimeMonitor` sampled every 100 ms (busy share of the busiest worker, \
                 parks, global queue). Stall start: seconds since the diagnosis started.\n",
                STALL_MS
            );
            for sys in diags {
                let Some(d) = &sys.diagnosis else { continue };
                let _ = writeln!(
                    s,
                    "### {}\n\nDuring {} ({:.1} s): {} probe wakes, lateness p50 {:.2} / p99 {:.2} / max {:.1} ms, scheduling delay p99 {:.2} / max {:.1} ms, {} slow probe polls; workers busy {:.0} % on average, {} of {} intervals with a worker over 90 % busy, {:.0} parks/s, global queue up to {}. **{} stalls > {} ms**{}.\n",
                    sys.name,
                    d.during,
                    d.duration_s,
                    d.wakes,
                    d.late_p50_ms,
                    d.late_p99_ms,
                    d.late_max_ms,
                    d.sched_p99_ms,
                    d.sched_max_ms,
                    d.probe_slow_polls,
                    d.busy_mean * 100.0,
                    d.intervals_busy_over_90,
                    d.samples.len(),
                    d.parks_per_s,
                    d.global_queue_max,
                    d.stalls.len(),
                    STALL_MS,
                    match (d.period_ms, d.period_fit) {
                        (Some(p), Some(f)) => format!(
                            ", **periodic: every {p:.0} ms** ({:.0} % of the gaps are a multiple of it)",
                            f * 100.0
                        ),
                        _ if d.stalls.len() >= 3 => ", no clear period".to_owned(),
                        _ => String::new(),
                    }
                );
                if !d.stalls.is_empty() {
                    let _ = writeln!(
                        s,
                        "| stall start s | length ms | of which scheduling delay ms | busiest worker busy | global queue |"
                    );
                    let _ = writeln!(s, "|---:|---:|---:|---:|---:|");
                    for st in d.stalls.iter().take(40) {
                        let _ = writeln!(
                            s,
                            "| {:.3} | {:.1} | {:.1} | {} | {} |",
                            st.start_s,
                            st.duration_ms,
                            st.scheduling_delay_ms,
                            st.busy_max
                                .map_or("-".to_owned(), |b| format!("{:.0} %", b * 100.0)),
                            st.global_queue_depth
                                .map_or("-".to_owned(), |q| q.to_string())
                        );
                    }
                    if d.stalls.len() > 40 {
                        let _ = writeln!(s, "\n({} more in the JSON)", d.stalls.len() - 40);
                    }
                    let _ = writeln!(s);
                }
            }
        }
        let notes: Vec<(&str, &String)> = self
            .systems
            .iter()
            .flat_map(|s| s.notes.iter().map(move |n| (s.name.as_str(), n)))
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(s, "\n## Notes\n");
            for (name, n) in notes {
                let _ = writeln!(s, "- {name}: {n}");
            }
        }
        if let Some(c) = chart {
            let _ = writeln!(
                s,
                "\n## p99 against offered rate\n\n![p99 latency against offered rate]({c})"
            );
        }
        let _ = writeln!(s, "\n## Systems\n");
        for sys in &self.systems {
            let _ = writeln!(s, "- `{}`: {}", sys.name, sys.description);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_slope_from_probes() {
        let probes: Vec<ProbeSample> = (0..10)
            .map(|i| ProbeSample {
                t_s: i as f64 * 0.5,
                expected_so_far: i * 500,
                // Persists 900 of every 1000 per second: lag grows by 100/s.
                value: i * 450,
            })
            .collect();
        let s = SettlerSummary::from_probes(1000, 0, &probes, 0.0).expect("summary");
        assert!((s.lag_slope_per_s - 100.0).abs() < 1e-6);
        assert!(!s.keeps_up);
        assert!((s.persisted_per_s - 900.0).abs() < 1e-6);
    }

    #[test]
    fn medians_spreads_and_paired_ratios() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]).map(|s| s.median), Some(2.0));
        assert_eq!(
            Spread::of(&[4.0, 1.0, 2.0, 3.0]).map(|s| s.median),
            Some(2.5)
        );
        assert!(Spread::of(&[]).is_none());
        let mut r = SystemReport::new("s", "d", false, Some("c"));
        // A stall in the second pair halves both the ceiling and the system: the ratio of
        // the medians stays where the other pairs put it.
        r.reps = vec![500, 250, 520];
        r.paired_ceiling_reps = vec![1000, 500, 1000];
        r.compute();
        assert_eq!(r.max_rate, 500);
        assert_eq!(r.ratio_to_ceiling, Some(0.5));
        assert_eq!(r.ratio_range, Some((0.5, 0.52)));
    }
}
