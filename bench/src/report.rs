//! The end-to-end results: per system its steps, highest passing rate, latency at half
//! that rate, CPU per 1,000 orders, ratio to its ceiling; the settler's persist rate and
//! lag; the targets met or missed. Written as JSON and as a Markdown table.

use crate::cpu::CpuUsage;
use crate::loadgen::{ProbeSample, StepResult};
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
    /// Highest passing rate, requests per second (0: none passed or not run).
    pub max_rate: u64,
    /// Ratio of `max_rate` to the ceiling's.
    pub ratio_to_ceiling: Option<f64>,
    /// The step at half of `max_rate`.
    pub half: Option<StepSummary>,
    /// Every search step, in the order run.
    pub steps: Vec<StepSummary>,
    /// The settler at `max_rate` (accepted paths).
    pub settler: Option<SettlerSummary>,
    /// Why it was not run, or anything worth knowing.
    pub notes: Vec<String>,
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
    /// The machine.
    pub machine: Machine,
    /// The method, in words.
    pub method: Vec<String>,
    /// Every system.
    pub systems: Vec<SystemReport>,
    /// The targets.
    pub targets: Vec<TargetCheck>,
}

impl Report {
    /// The system named `name`.
    pub fn system(&self, name: &str) -> Option<&SystemReport> {
        self.systems.iter().find(|s| s.name == name)
    }

    /// Fills in ratios to ceilings.
    pub fn compute_ratios(&mut self) {
        let maxima: BTreeMap<String, u64> = self
            .systems
            .iter()
            .map(|s| (s.name.clone(), s.max_rate))
            .collect();
        for s in &mut self.systems {
            s.ratio_to_ceiling = s.ceiling_name.as_ref().and_then(|c| {
                let m = *maxima.get(c)?;
                (m > 0 && s.max_rate > 0).then(|| s.max_rate as f64 / m as f64)
            });
        }
    }

    /// Judges the targets.
    pub fn compute_targets(&mut self) {
        let mut out = Vec::new();
        let ratio_target = |out: &mut Vec<TargetCheck>, name: &str, what: &str, min: f64| {
            let s = self.system(name);
            let (measured, met, margin) = match s.and_then(|s| s.ratio_to_ceiling) {
                Some(r) => (
                    format!("{:.0} % ({} /s)", r * 100.0, s.map_or(0, |s| s.max_rate)),
                    Some(r >= min),
                    format!("{:+.0} points", (r - min) * 100.0),
                ),
                None => ("not measured".into(), None, "-".into()),
            };
            out.push(TargetCheck {
                target: format!("{what} >= {:.0} % of the plain-hyper ceiling", min * 100.0),
                measured,
                met,
                margin,
            });
        };
        ratio_target(
            &mut out,
            "flashsale-distributed-accepted",
            "distributed, accepted path",
            0.30,
        );
        ratio_target(
            &mut out,
            "flashsale-embedded-accepted",
            "embedded, accepted path",
            0.50,
        );
        ratio_target(
            &mut out,
            "flashsale-embedded-soldout",
            "embedded, sold-out path",
            0.70,
        );
        ratio_target(
            &mut out,
            "flashsale-distributed-soldout",
            "distributed, sold-out path",
            0.70,
        );
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
        for s in self
            .systems
            .iter()
            .filter(|s| s.settler.is_some() || s.name.ends_with("accepted") && !s.ceiling)
        {
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
                    "{}: settler keeps up at the max rate (lag not growing)",
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
             (steps {:.1} s warm-up + {:.1} s measured; doubling, then bisecting). Latency and \
             CPU at half the max rate. CPU: this process less the load generator's threads, plus \
             the server processes (redis-server, tansu, postgres) it started.\n",
            MAX_FAILURE_SHARE * 100.0,
            self.step_warmup_s,
            self.step_window_s
        );
        let _ = writeln!(
            s,
            "| system | max rate /s (p99 < 10 ms) | p50 ms @ half | p99 ms @ half | p99.9 ms @ half | CPU s / 1k orders @ half | ratio to ceiling |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
        for sys in &self.systems {
            let h = sys.half.as_ref();
            let f = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |v| format!("{v:.d$}"));
            let ratio = match (&sys.ceiling_name, sys.ratio_to_ceiling) {
                (Some(c), Some(r)) => format!("{:.0} % of {c}", r * 100.0),
                (Some(c), None) => format!("- ({c})"),
                (None, _) => "ceiling".to_owned(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                sys.name,
                if sys.max_rate > 0 {
                    sys.max_rate.to_string()
                } else {
                    "-".into()
                },
                f(h.map(|h| h.p50_ms), 2),
                f(h.map(|h| h.p99_ms), 2),
                f(h.map(|h| h.p999_ms), 2),
                f(h.and_then(|h| h.cpu_s_per_1000), 3),
                ratio
            );
        }
        let _ = writeln!(s, "\n## Targets (reported, not asserted)\n");
        let _ = writeln!(s, "| target | measured | met | margin |");
        let _ = writeln!(s, "|---|---|---|---|");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                t.target, t.measured, met, t.margin
            );
        }
        let settlers: Vec<&SystemReport> = self
            .systems
            .iter()
            .filter(|s| s.settler.is_some())
            .collect();
        if !settlers.is_empty() {
            let _ = writeln!(s, "\n## Settler at the max ingest rate\n");
            let _ = writeln!(
                s,
                "| system | ingest offered /s | accepted /s | persisted /s | lag start -> end | lag slope /s | drained after |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---|---:|---|");
            for sys in settlers {
                if let Some(st) = &sys.settler {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.0} | {:.0} | {} -> {} | {:+.0} | {} |",
                        sys.name,
                        st.ingest_per_s,
                        st.accepted_per_s,
                        st.persisted_per_s,
                        st.lag_start,
                        st.lag_end,
                        st.lag_slope_per_s,
                        st.drained_after_s
                            .map_or("not within the wait".to_owned(), |d| format!("{d:.1} s"))
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
}
