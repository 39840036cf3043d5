//! The end-to-end benchmark: one run measures the ceilings (plain hyper, raw Redis, the
//! admission script alone, produce-only Kafka) and flashsale (embedded and distributed,
//! accepted and sold-out paths) with the same open-loop load generator, and writes
//! `bench/results/<date>-<host>.json`, `bench/results/latest.md` and a PNG chart.
//!
//! ```sh
//! cargo run --release -p bench --features kafka --bin e2e -- [--quick] [--only a,b] [--out DIR]
//! ```

use bench::cpu::CpuSnapshot;
use bench::diagnose::{Diagnoser, Diagnosis};
use bench::loadgen::{
    run_closed_loop, run_step, ClosedLoopConfig, Probe, StepConfig, StepResult, Target,
};
use bench::report::{
    ClosedLoopSummary, Machine, PipelineCost, Report, SettlerSummary, StepSummary, SystemReport,
};
use bench::search::{find_max_rate, find_max_rate_near, round_rate, SearchPlan};
use bench::settle::{follow_settler, paid_latency, wait_settled, DrainOutcome, SettlerAlone};
use bench::systems::{self, Accepted, Backends, Diagnostics, Flashsale, HttpOrders};
use http::StatusCode;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::SaleId;

/// Distinct buyers of the HTTP scenarios.
const USERS: usize = 20_000;

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    only: Option<Vec<String>>,
    out: PathBuf,
    warmup: Duration,
    measure: Duration,
    bisections: u32,
    /// Bisections of a repetition's search (from the earlier repetitions' median).
    narrow_bisections: u32,
    /// Repetitions of every search and closed-loop run.
    reps: usize,
    closed_connections: usize,
    closed_warmup: Duration,
    closed_window: Duration,
    /// The closed loop's window on accepted paths: every order it gets must settle
    /// before the next run, and it gets them far faster than the settler settles them.
    closed_window_accepted: Duration,
    sustain: Duration,
    settle_wait: Duration,
    /// How long the orders of an accepted-path run may take to settle before the run fails.
    settle_deadline: Duration,
    /// Orders in the log for the settler-alone measurement, and the longest fill.
    fill_orders: u64,
    fill_max: Duration,
    start_rate: u64,
    max_rate: u64,
    /// Diagnostic mode: one step per system at this rate (sustain-long), nothing written.
    fixed_rate: Option<u64>,
    /// Diagnostic settings (only with `--fixed-rate`).
    diag: Diagnostics,
    /// Runtime metrics during the half-rate steps (and `--fixed-rate` steps).
    diagnose: bool,
}

impl Opts {
    fn parse() -> anyhow::Result<Self> {
        let mut quick = false;
        let mut only = None;
        let mut out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results"));
        let mut max_rate = 200_000;
        let mut fixed_rate = None;
        let mut reps = None;
        let mut diagnose = false;
        let mut diag = Diagnostics::default();
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--diagnose" => diagnose = true,
                "--only" => {
                    let v = args
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("--only needs a list"))?;
                    only = Some(v.split(',').map(str::to_owned).collect());
                }
                "--out" => {
                    out = PathBuf::from(
                        args.next()
                            .ok_or_else(|| anyhow::anyhow!("--out needs a directory"))?,
                    );
                }
                "--max-rate" => {
                    max_rate = args
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("--max-rate needs a number"))?
                        .parse()?;
                }
                "--reps" => {
                    let n: usize = args
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("--reps needs a number"))?
                        .parse()?;
                    reps = Some(n.max(1));
                }
                "--fixed-rate" => {
                    fixed_rate = Some(
                        args.next()
                            .ok_or_else(|| anyhow::anyhow!("--fixed-rate needs a number"))?
                            .parse()?,
                    );
                }
                "--diag-no-fsync" => diag.no_fsync = true,
                "--diag-no-settler" => diag.no_settler = true,
                "--diag-kafka-consumer" => diag.kafka_consumer = true,
                "-h" | "--help" => {
                    println!(
                        "e2e [--quick] [--diagnose] [--reps N] [--only plain-hyper,redis-raw,admission-only,kafka-produce,\
                         flashsale-embedded-soldout,flashsale-embedded-accepted,\
                         flashsale-distributed-soldout,flashsale-distributed-accepted] \
                         [--out DIR] [--max-rate N] [--fixed-rate N (one step per system, for \
                         profiling; writes nothing) [--diag-no-fsync] [--diag-no-settler] [--diag-kafka-consumer]]"
                    );
                    std::process::exit(0);
                }
                other => anyhow::bail!("unknown argument {other:?} (try --help)"),
            }
        }
        anyhow::ensure!(
            fixed_rate.is_some() || (!diag.no_fsync && !diag.no_settler && !diag.kafka_consumer),
            "--diag-* only with --fixed-rate (a measured run uses the real settings)"
        );
        Ok(if quick {
            Opts {
                quick,
                only,
                out,
                warmup: Duration::from_millis(300),
                measure: Duration::from_millis(1000),
                bisections: 1,
                narrow_bisections: 1,
                reps: reps.unwrap_or(3),
                closed_connections: 64,
                closed_warmup: Duration::from_millis(300),
                closed_window: Duration::from_secs(1),
                closed_window_accepted: Duration::from_millis(300),
                sustain: Duration::from_secs(2),
                settle_wait: Duration::from_secs(3),
                settle_deadline: Duration::from_secs(120),
                fill_orders: 3_000,
                fill_max: Duration::from_secs(5),
                start_rate: 1000,
                max_rate,
                fixed_rate,
                diag,
                diagnose,
            }
        } else {
            Opts {
                quick,
                only,
                out,
                warmup: Duration::from_millis(500),
                measure: Duration::from_millis(2500),
                bisections: 3,
                narrow_bisections: 2,
                reps: reps.unwrap_or(3),
                closed_connections: 64,
                closed_warmup: Duration::from_millis(500),
                closed_window: Duration::from_secs(3),
                closed_window_accepted: Duration::from_secs(1),
                sustain: Duration::from_secs(8),
                settle_wait: Duration::from_secs(20),
                settle_deadline: Duration::from_secs(120),
                fill_orders: 20_000,
                fill_max: Duration::from_secs(20),
                start_rate: 1000,
                max_rate,
                fixed_rate,
                diag,
                diagnose,
            }
        })
    }

    fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| name.starts_with(n.as_str())))
    }
}

/// The settler side of an accepted-path system: orders answered 202 and persisted.
struct SettlerProbe {
    answered: Arc<std::sync::atomic::AtomicU64>,
    persisted: Arc<dyn Fn() -> u64 + Send + Sync>,
    base: u64,
}

impl SettlerProbe {
    fn lag(&self) -> i64 {
        self.answered.load(Ordering::Relaxed) as i64
            - ((self.persisted)().saturating_sub(self.base)) as i64
    }

    /// Waits until the lag is under `slack`, at most `limit`; how long it took.
    fn wait_drained(&self, slack: i64, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.lag() <= slack {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

struct Harness {
    opts: Opts,
    gen_rt: tokio::runtime::Runtime,
    server: tokio::runtime::Handle,
}

/// Something the harness loads: how to make its target, and for accepted paths how to
/// wait for the settler between steps and check that every order settled after a run.
struct Subject<'a> {
    name: &'a str,
    make: &'a dyn Fn() -> Arc<dyn Target>,
    settler: Option<&'a SettlerProbe>,
    settle: Option<&'a dyn Fn() -> DrainOutcome>,
}

impl Harness {
    fn step(
        &self,
        target: Arc<dyn Target>,
        rate: u64,
        measure: Duration,
        probe: Option<Probe>,
    ) -> StepResult {
        let config = StepConfig::new(rate, self.opts.warmup, measure);
        run_step(&self.gen_rt, target, &config, probe)
    }

    fn pause(&self, subj: &Subject, rate: u64) {
        if let Some(s) = subj.settler {
            let slack = (rate as i64 / 100).max(20);
            let _ = s.wait_drained(slack, self.opts.settle_wait);
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    /// One repetition of the max-rate search: a full search the first time, then a
    /// narrower one from the median of the earlier repetitions.
    fn search_rep(&self, subj: &Subject, rep: &mut SystemReport) -> u64 {
        let plan = SearchPlan {
            start: self.opts.start_rate,
            min: 50,
            max: self.opts.max_rate,
            bisections: self.opts.bisections,
            resolution: 0.05,
        };
        let hint = rep
            .rate_spread()
            .map(|s| s.median as u64)
            .filter(|m| *m > 0);
        let n = rep.reps.len() + 1;
        let mut steps = Vec::new();
        let mut run = |rate: u64| {
            let r = self.step((subj.make)(), rate, self.opts.measure, None);
            let s = StepSummary::of(&r);
            log_step(subj.name, &s);
            let pass = s.pass;
            steps.push(s);
            self.pause(subj, rate);
            pass
        };
        let max = match hint {
            None => find_max_rate(plan, &mut run),
            Some(h) => find_max_rate_near(
                SearchPlan {
                    bisections: self.opts.narrow_bisections,
                    ..plan
                },
                h,
                &mut run,
            ),
        };
        rep.steps.extend(steps);
        rep.reps.push(max);
        eprintln!("   {} repetition {n}: max rate {max}/s", subj.name);
        max
    }

    /// One closed-loop run.
    fn closed_rep(&self, subj: &Subject, rep: &mut SystemReport) -> f64 {
        let config = ClosedLoopConfig {
            connections: self.opts.closed_connections,
            warmup: if subj.settle.is_some() {
                self.opts.closed_warmup / 2
            } else {
                self.opts.closed_warmup
            },
            duration: if subj.settle.is_some() {
                self.opts.closed_window_accepted
            } else {
                self.opts.closed_window
            },
            request_timeout: Duration::from_secs(5),
            limit: None,
        };
        let r = run_closed_loop(&self.gen_rt, (subj.make)(), &config);
        let c = ClosedLoopSummary::of(&r);
        eprintln!(
            "   {} closed loop ({} connections): {:.0}/s, {} failed, p50 {:.2} p99 {:.2} ms",
            subj.name, c.connections, c.per_s, c.failed, c.p50_ms, c.p99_ms
        );
        let per_s = c.per_s;
        rep.closed_loop.push(c);
        self.pause(subj, per_s as u64);
        per_s
    }

    /// After an accepted-path run: every order answered 202 final and notified.
    fn settle_check(&self, subj: &Subject, rep: &mut SystemReport) {
        let Some(check) = subj.settle else { return };
        if rep.drains.iter().any(|d| !d.complete) {
            return; // already failed; the first failure names what is missing
        }
        let d = check();
        if d.complete {
            eprintln!("   {} settle: {}", subj.name, d.describe());
        } else {
            eprintln!("   {} settle: FAILED: {}", subj.name, d.describe());
        }
        rep.drains.push(d);
    }

    /// The repetitions: (ceiling search, system search, ceiling closed loop, system
    /// closed loop) `reps` times, so a stall of the machine moves both sides of a pair.
    fn pairs(
        &self,
        mut ceiling: Option<(&Subject, &mut SystemReport)>,
        subj: &Subject,
        rep: &mut SystemReport,
    ) {
        eprintln!("== {}: {}", rep.name, rep.description);
        for _ in 0..self.opts.reps {
            if let Some((c, crep)) = ceiling.as_mut() {
                let m = self.search_rep(c, crep);
                rep.paired_ceiling_reps.push(m);
            }
            self.search_rep(subj, rep);
            self.settle_check(subj, rep);
            if let Some((c, crep)) = ceiling.as_mut() {
                let t = self.closed_rep(c, crep);
                rep.closed_loop_ceiling.push(t);
            }
            self.closed_rep(subj, rep);
            self.settle_check(subj, rep);
        }
        rep.compute();
        if rep.max_rate == 0 {
            rep.notes
                .push("no step passed, down to 50 requests/s".to_owned());
        }
    }

    /// The step at half the max rate (latency, window CPU; `--diagnose`: runtime
    /// metrics).
    fn half(&self, subj: &Subject, rep: &mut SystemReport) {
        if rep.max_rate == 0 {
            return;
        }
        let rate = round_rate((rep.max_rate / 2).max(1));
        let diag = self.opts.diagnose.then(|| Diagnoser::start(&self.server));
        let r = self.step((subj.make)(), rate, self.opts.measure, None);
        let s = StepSummary::of(&r);
        eprint!("   half: ");
        log_step(subj.name, &s);
        if let Some(d) = diag {
            let d = d.finish(&self.server, &format!("the half-rate step ({rate}/s)"));
            log_diagnosis(subj.name, &d);
            rep.diagnosis = Some(d);
        }
        rep.half = Some(s);
        self.pause(subj, rate);
    }

    /// `--fixed-rate`: one long step, its slow requests grouped in bursts.
    fn fixed(&self, subj: &Subject, rate: u64, rep: &mut SystemReport) {
        eprintln!("== {}: {}", rep.name, rep.description);
        let diag = self.opts.diagnose.then(|| Diagnoser::start(&self.server));
        let r = self.step((subj.make)(), rate, self.opts.sustain, None);
        let s = StepSummary::of(&r);
        log_step(subj.name, &s);
        if let Some(c) = &s.cpu {
            eprintln!("   cpu: {c:?}");
        }
        if let Some(d) = diag {
            let d = d.finish(&self.server, &format!("a step at {rate}/s"));
            log_diagnosis(subj.name, &d);
            rep.diagnosis = Some(d);
        }
        // When the slow requests were intended: a periodic stall shows as clusters.
        let mut slow = r.slow.clone();
        slow.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut clusters: Vec<(f64, f64, usize, f64)> = Vec::new(); // from, to, n, max ms
        for (at, ms) in slow {
            match clusters.last_mut() {
                Some(c) if at - c.1 < 0.05 => {
                    c.1 = at;
                    c.2 += 1;
                    c.3 = c.3.max(ms);
                }
                _ => clusters.push((at, at, 1, ms)),
            }
        }
        for (from, to, n, max) in clusters.iter().take(40) {
            eprintln!(
                "   slow (>= 5 ms): intended {from:.3}..{to:.3} s, {n} requests, max {max:.1} ms"
            );
        }
        rep.steps.push(s);
        rep.notes.push(format!("diagnostic step at {rate}/s"));
    }
}

fn log_diagnosis(name: &str, d: &Diagnosis) {
    eprintln!(
        "   {name} diagnosis: {} wakes, late p99 {:.2} max {:.1} ms, busy {:.0} %, {} stalls > 5 ms{}",
        d.wakes,
        d.late_p99_ms,
        d.late_max_ms,
        d.busy_mean * 100.0,
        d.stalls.len(),
        d.period_ms
            .map_or(String::new(), |p| format!(", period {p:.0} ms"))
    );
    for st in d.stalls.iter().take(20) {
        eprintln!(
            "     stall at {:.3} s: {:.1} ms (scheduling delay {:.1} ms, busiest worker {})",
            st.start_s,
            st.duration_ms,
            st.scheduling_delay_ms,
            st.busy_max
                .map_or("-".to_owned(), |b| format!("{:.0} %", b * 100.0))
        );
    }
}

fn log_step(name: &str, s: &StepSummary) {
    eprintln!(
        "   {name} {:>7}/s: {} p50 {:.2} p99 {:.2} p99.9 {:.2} ms, achieved {:.0}/s, cpu/1k {}{}",
        s.offered_per_s,
        if s.pass { "PASS" } else { "FAIL" },
        s.p50_ms,
        s.p99_ms,
        s.p999_ms,
        s.achieved_per_s,
        s.cpu_s_per_1000
            .map_or("-".to_owned(), |c| format!("{c:.3} s")),
        s.failed_because
            .as_ref()
            .map_or(String::new(), |w| format!(" ({w})"))
    );
}

fn not_run(name: &str, description: &str, ceiling_name: Option<&str>, why: String) -> SystemReport {
    eprintln!("== {name}: not run: {why}");
    let mut r = SystemReport::new(name, description, ceiling_name.is_none(), ceiling_name);
    r.notes.push(format!("not run: {why}"));
    r
}

const PLAIN: &str = "plain-hyper";
const REDIS_RAW: &str = "redis-raw";

/// The plain hyper ceiling, running for the whole run next to every flashsale system.
struct Ceiling {
    orders: HttpOrders,
    report: SystemReport,
}

/// Measures one subject: alone (`--fixed-rate` or no ceiling), or paired with the ceiling.
fn measure(
    h: &Harness,
    ceiling: Option<(&Subject, &mut SystemReport)>,
    subj: &Subject,
    rep: &mut SystemReport,
) {
    if let Some(rate) = h.opts.fixed_rate {
        h.fixed(subj, rate, rep);
        return;
    }
    h.pairs(ceiling, subj, rep);
    h.half(subj, rep);
}

/// The accepted path's extra measurements: the half-rate step with the CPU of the whole
/// pipeline and the time from 202 to paid, the settler at the max rate, and the settler
/// alone on a filled log.
#[allow(clippy::too_many_arguments)]
fn accepted_extras(
    h: &Harness,
    server_rt: &tokio::runtime::Runtime,
    fs: &mut Flashsale,
    subj: &Subject,
    orders: &HttpOrders,
    probe: &SettlerProbe,
    tokens: &[String],
    rep: &mut SystemReport,
) {
    let sale = SaleId::parse("bench-accepted").expect("sale id");
    let main_tid = bench::cpu::thread_id();
    // Half the max rate, from the first request until every order is paid and notified.
    if rep.max_rate > 0 {
        let rate = round_rate((rep.max_rate / 2).max(1));
        let from = orders.accepted_len();
        let diag = h.opts.diagnose.then(|| Diagnoser::start(&h.server));
        let c0 = CpuSnapshot::take(&[main_tid]);
        let t0 = Instant::now();
        let r = h.step((subj.make)(), rate, h.opts.measure, None);
        let s = StepSummary::of(&r);
        eprint!("   half: ");
        log_step(subj.name, &s);
        let drain = settle_now(
            server_rt,
            fs,
            &sale,
            &orders.accepted_since(0),
            h.opts.settle_deadline,
        );
        let c1 = CpuSnapshot::take(&[main_tid]);
        let span = t0.elapsed();
        if let Some(d) = diag {
            let d = d.finish(
                &h.server,
                &format!("the half-rate step ({rate}/s) and the settlement of its orders"),
            );
            log_diagnosis(subj.name, &d);
            rep.diagnosis = Some(d);
        }
        let mine = orders.accepted_since(from);
        let usage = c1.since(&c0, span);
        let system_s = (usage.system_s - r.pacer_cpu_s).max(0.0);
        if drain.complete && !mine.is_empty() {
            rep.cost = Some(PipelineCost {
                orders: mine.len() as u64,
                span_s: span.as_secs_f64(),
                system_s,
                servers_by_name: usage.servers_by_name.clone(),
                ms_per_order: system_s / mine.len() as f64 * 1000.0,
            });
            match server_rt.block_on(paid_latency(fs.running().store.as_ref(), &mine, 3000)) {
                Ok(p) => {
                    eprintln!(
                        "   202 -> paid: p50 {:.0} p99 {:.0} max {:.0} ms ({} of {} paid); CPU {:.3} ms/order over {:.1} s",
                        p.p50_ms,
                        p.p99_ms,
                        p.max_ms,
                        p.paid,
                        p.orders,
                        system_s / mine.len() as f64 * 1000.0,
                        span.as_secs_f64()
                    );
                    rep.paid = Some(p);
                }
                Err(e) => rep.notes.push(format!("202 -> paid not measured: {e:#}")),
            }
        }
        eprintln!("   {} settle: {}", subj.name, drain.describe());
        rep.drains.push(drain);
        rep.half = Some(s);
        h.pause(subj, rate);
    }
    // The settler at the max rate.
    if rep.max_rate > 0 {
        let persisted = Arc::clone(&probe.persisted);
        let p: Probe = Arc::new(move || persisted());
        let accepted_before = probe.answered.load(Ordering::Relaxed) + probe.base;
        let r = h.step((subj.make)(), rep.max_rate, h.opts.sustain, Some(p));
        let s = StepSummary::of(&r);
        eprint!("   sustain: ");
        log_step(subj.name, &s);
        rep.settler = SettlerSummary::from_probes(
            rep.max_rate,
            accepted_before,
            &r.probes,
            h.opts.warmup.as_secs_f64(),
        )
        .map(|mut st| {
            let slack = (rep.max_rate as i64 / 100).max(20);
            st.drained_after_s = probe
                .wait_drained(slack, h.opts.settle_wait * 2)
                .map(|d| d.as_secs_f64());
            eprintln!(
                "   settler: persisted {:.0}/s, accepted {:.0}/s, lag {} -> {} ({:+.0}/s)",
                st.persisted_per_s, st.accepted_per_s, st.lag_start, st.lag_end, st.lag_slope_per_s
            );
            st
        });
        h.settle_check(subj, rep);
    }
    // The settler alone: fill the log with the settler off, then start it with no load.
    match settler_alone(h, server_rt, fs, tokens) {
        Ok(a) => {
            eprintln!(
                "   settler alone: {} orders (filled in {:.1} s), sustained {:?}/s, overall {:?}/s, all done after {:?} s",
                a.orders, a.fill_s, a.sustained_per_s.map(|r| r.round()), a.overall_per_s.map(|r| r.round()), a.all_done_s
            );
            if let Some(d) = a.drain.as_ref().filter(|d| !d.complete) {
                eprintln!("   settler alone: FAILED: {}", d.describe());
            }
            rep.alone = Some(a);
        }
        Err(e) => rep.notes.push(format!("settler alone not measured: {e:#}")),
    }
}

/// Waits for `accepted` to be final and notified in `fs`'s store, gated by its settler's
/// counters.
fn settle_now(
    server_rt: &tokio::runtime::Runtime,
    fs: &Flashsale,
    sale: &SaleId,
    accepted: &[Accepted],
    deadline: Duration,
) -> DrainOutcome {
    let stats = fs.running().settler_stats.clone();
    let gate = move |expected: u64| {
        stats.as_ref().is_none_or(|s| {
            let s = s.snapshot();
            (s.paid + s.payment_failed + s.expired).min(s.notified) >= expected
        })
    };
    let partition_of = |id| fs.partition_of(id);
    let store = Arc::clone(&fs.running().store);
    match server_rt.block_on(wait_settled(
        store.as_ref(),
        sale,
        accepted,
        deadline,
        &partition_of,
        Some(&gate),
    )) {
        Ok(d) => d,
        Err(e) => DrainOutcome {
            complete: false,
            waited_s: 0.0,
            expected: accepted.len() as u64,
            missing: accepted.len() as u64,
            not_stored: 0,
            not_final: 0,
            not_notified: 0,
            missing_by_partition: Default::default(),
            missing_sample: vec![format!("store error: {e:#}")],
        },
    }
}

fn settler_alone(
    h: &Harness,
    server_rt: &tokio::runtime::Runtime,
    fs: &mut Flashsale,
    tokens: &[String],
) -> anyhow::Result<SettlerAlone> {
    let sale = SaleId::parse("bench-fill")?;
    server_rt.block_on(fs.restart(false))?;
    server_rt.block_on(fs.create_sale(sale.as_str(), 0))?;
    let fill = HttpOrders::new(
        fs.running().addr,
        sale.as_str(),
        tokens.to_vec(),
        StatusCode::ACCEPTED,
    )?
    .recording();
    let config = ClosedLoopConfig {
        connections: h.opts.closed_connections,
        warmup: Duration::ZERO,
        duration: h.opts.fill_max,
        request_timeout: Duration::from_secs(5),
        limit: Some(h.opts.fill_orders),
    };
    let r = run_closed_loop(&h.gen_rt, Arc::new(fill.fresh()), &config);
    let filled = fill.accepted_since(0);
    let orders = filled.len() as u64;
    anyhow::ensure!(orders > 0, "the fill got no 202");
    server_rt.block_on(fs.restart(true))?;
    let stats = fs
        .running()
        .settler_stats
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the settler did not start"))?;
    let (t10, t90, t100) =
        server_rt.block_on(follow_settler(&stats, orders, h.opts.settle_deadline));
    let drain = settle_now(server_rt, fs, &sale, &filled, Duration::from_secs(10));
    Ok(SettlerAlone {
        orders,
        fill_s: r.window_s,
        fill_rate: orders as f64 / r.window_s.max(1e-9),
        all_done_s: t100,
        sustained_per_s: match (t10, t90) {
            (Some(a), Some(b)) if b > a => Some(orders as f64 * 0.8 / (b - a)),
            _ => None,
        },
        overall_per_s: t100.map(|t| orders as f64 / t.max(1e-9)),
        drain: Some(drain),
    })
}

fn flashsale_systems(
    h: &Harness,
    server_rt: &tokio::runtime::Runtime,
    backends: Backends,
    ceiling: &mut Ceiling,
    out: &mut Vec<SystemReport>,
) {
    let (label, what) = match backends {
        Backends::Embedded => (
            "flashsale-embedded",
            "flashsale, embedded admission + file log (fsync, group commit) + SQLite, settler and mock provider in process",
        ),
        Backends::Distributed => (
            "flashsale-distributed",
            "flashsale, Redis admission (Lua) + Kafka log (tansu, memory) + Postgres 2 shards, settler and mock provider in process",
        ),
    };
    let soldout = format!("{label}-soldout");
    let accepted = format!("{label}-accepted");
    if !h.opts.wants(&soldout) && !h.opts.wants(&accepted) {
        return;
    }
    let so_desc = format!("{what}; sold-out path (stock 1, sold first; every request 409)");
    let acc_desc = format!(
        "{what}; accepted path (stock 100 M, 1000 per user, bucket 1 M/s, {USERS} users; every request 202)"
    );
    let started = Instant::now();
    let mut fs = match server_rt.block_on(Flashsale::start(backends, h.opts.diag)) {
        Ok(f) => f,
        Err(e) => {
            out.push(not_run(&soldout, &so_desc, Some(PLAIN), format!("{e:#}")));
            out.push(not_run(&accepted, &acc_desc, Some(PLAIN), format!("{e:#}")));
            return;
        }
    };
    eprintln!(
        "   {label} started in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let setup = server_rt.block_on(async {
        fs.create_sale("bench-soldout", 1).await?;
        fs.create_sale("bench-accepted", 0).await?;
        let status = fs.order("bench-soldout", "holder").await?;
        anyhow::ensure!(
            status == StatusCode::ACCEPTED,
            "selling the last unit: {status}"
        );
        anyhow::Ok(())
    });
    let tokens = fs.tokens("buyer-", USERS);
    let (tokens, ()) = match (tokens, setup) {
        (Ok(t), Ok(())) => (t, ()),
        (Err(e), _) | (_, Err(e)) => {
            out.push(not_run(&soldout, &so_desc, Some(PLAIN), format!("{e:#}")));
            out.push(not_run(&accepted, &acc_desc, Some(PLAIN), format!("{e:#}")));
            let _ = server_rt.block_on(fs.stop());
            return;
        }
    };
    let addr = fs.running().addr;
    let make_ceiling = || Arc::new(ceiling.orders.fresh()) as Arc<dyn Target>;
    let ceiling_subj = Subject {
        name: PLAIN,
        make: &make_ceiling,
        settler: None,
        settle: None,
    };
    if h.opts.wants(&soldout) {
        match HttpOrders::new(addr, "bench-soldout", tokens.clone(), StatusCode::CONFLICT) {
            Ok(t) => {
                let make = || Arc::new(t.fresh()) as Arc<dyn Target>;
                let subj = Subject {
                    name: &soldout,
                    make: &make,
                    settler: None,
                    settle: None,
                };
                let mut rep = SystemReport::new(&soldout, &so_desc, false, Some(PLAIN));
                measure(
                    h,
                    Some((&ceiling_subj, &mut ceiling.report)),
                    &subj,
                    &mut rep,
                );
                out.push(rep);
            }
            Err(e) => out.push(not_run(&soldout, &so_desc, Some(PLAIN), format!("{e:#}"))),
        }
    }
    if h.opts.wants(&accepted) {
        match HttpOrders::new(addr, "bench-accepted", tokens.clone(), StatusCode::ACCEPTED) {
            Ok(t) => {
                let t = t.recording();
                let has_settler = fs.running().settler_stats.is_some();
                let stats = fs.running().settler_stats.clone();
                let persisted: Arc<dyn Fn() -> u64 + Send + Sync> =
                    Arc::new(move || stats.as_ref().map_or(0, |s| s.snapshot().persisted));
                // The holder's order first: the lag counts this sale's orders only.
                let t0 = Instant::now();
                while has_settler && persisted() < 1 && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let probe = SettlerProbe {
                    answered: Arc::clone(&t.answered),
                    base: persisted(),
                    persisted,
                };
                let sale = SaleId::parse("bench-accepted").expect("sale id");
                let make = || Arc::new(t.fresh()) as Arc<dyn Target>;
                let settle = || {
                    settle_now(
                        server_rt,
                        &fs,
                        &sale,
                        &t.accepted_since(0),
                        h.opts.settle_deadline,
                    )
                };
                let mut rep = SystemReport::new(&accepted, &acc_desc, false, Some(PLAIN));
                {
                    let subj = Subject {
                        name: &accepted,
                        make: &make,
                        settler: Some(&probe),
                        settle: (h.opts.fixed_rate.is_none() && has_settler)
                            .then_some(&settle as &dyn Fn() -> DrainOutcome),
                    };
                    if let Some(rate) = h.opts.fixed_rate {
                        h.fixed(&subj, rate, &mut rep);
                    } else {
                        h.pairs(Some((&ceiling_subj, &mut ceiling.report)), &subj, &mut rep);
                    }
                }
                if h.opts.fixed_rate.is_none() && has_settler {
                    let subj = Subject {
                        name: &accepted,
                        make: &make,
                        settler: Some(&probe),
                        settle: None,
                    };
                    accepted_extras(h, server_rt, &mut fs, &subj, &t, &probe, &tokens, &mut rep);
                }
                out.push(rep);
            }
            Err(e) => out.push(not_run(&accepted, &acc_desc, Some(PLAIN), format!("{e:#}"))),
        }
    }
    if let Err(e) = server_rt.block_on(fs.stop()) {
        eprintln!("   stopping {label}: {e:#}");
    }
}

fn run() -> anyhow::Result<bool> {
    let opts = Opts::parse()?;
    let started_wall = time::OffsetDateTime::now_utc();
    let started = Instant::now();
    // The server runtime: the settings of `flashsale serve` (src/main.rs).
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The load generator: one thread of its own (plus the pacer).
    let gen_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let h = Harness {
        opts: opts.clone(),
        gen_rt,
        server: server_rt.handle().clone(),
    };
    let mut systems_out: Vec<SystemReport> = Vec::new();

    // 1. Plain hyper: runs for the whole run; measured next to every flashsale system.
    let plain_desc = "plain hyper HTTP/1 server in this process (same runtime), fixed 202 JSON answer after reading the body";
    let any_flashsale = [
        "flashsale-embedded-soldout",
        "flashsale-embedded-accepted",
        "flashsale-distributed-soldout",
        "flashsale-distributed-accepted",
    ]
    .iter()
    .any(|n| opts.wants(n));
    let mut ceiling = None;
    let mut plain_task = None;
    if opts.wants(PLAIN) || any_flashsale {
        let auth = flashsale::config::Config::default().auth.to_auth_config()?;
        let tokens = (0..USERS)
            .map(|u| {
                ingest::auth::issue_token(&auth, &format!("buyer-{u}"), Duration::from_secs(7200))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (addr, task) = server_rt.block_on(systems::start_plain_hyper())?;
        plain_task = Some(task);
        ceiling = Some(Ceiling {
            orders: HttpOrders::new(addr, "bench-accepted", tokens, StatusCode::ACCEPTED)?,
            report: SystemReport::new(PLAIN, plain_desc, true, None),
        });
    }

    // 2. Redis: raw commands, then the admission script alone (paired with raw Redis).
    let raw_desc =
        "redis-server (testkit) and one multiplexed connection: INCR per call, no script, no HTTP";
    let adm_desc = "RedisAdmission::admit (admit.lua, EVALSHA) of a new order on an open sale, no HTTP, no log";
    if opts.wants(REDIS_RAW) || opts.wants("admission-only") {
        let redis = testkit::RedisServer::start();
        let raw = server_rt.block_on(systems::RedisRaw::connect(
            &redis.url(),
            server_rt.handle().clone(),
        ));
        let adm = if opts.wants("admission-only") {
            Some(server_rt.block_on(systems::AdmissionOnly::start(
                &redis.url(),
                USERS,
                server_rt.handle().clone(),
            )))
        } else {
            None
        };
        match raw {
            Ok(raw) => {
                let raw = Arc::new(raw);
                let make_raw = || Arc::clone(&raw) as Arc<dyn Target>;
                let raw_subj = Subject {
                    name: REDIS_RAW,
                    make: &make_raw,
                    settler: None,
                    settle: None,
                };
                let mut raw_rep = SystemReport::new(REDIS_RAW, raw_desc, true, None);
                match adm {
                    Some(Ok(a)) => {
                        let a = Arc::new(a);
                        let make = || Arc::clone(&a) as Arc<dyn Target>;
                        let subj = Subject {
                            name: "admission-only",
                            make: &make,
                            settler: None,
                            settle: None,
                        };
                        let mut rep =
                            SystemReport::new("admission-only", adm_desc, true, Some(REDIS_RAW));
                        measure(&h, Some((&raw_subj, &mut raw_rep)), &subj, &mut rep);
                        if opts.wants(REDIS_RAW) && opts.fixed_rate.is_none() {
                            raw_rep.compute();
                            h.half(&raw_subj, &mut raw_rep);
                        }
                        if opts.wants(REDIS_RAW) {
                            systems_out.push(raw_rep);
                        }
                        systems_out.push(rep);
                    }
                    Some(Err(e)) => {
                        systems_out.push(not_run(
                            "admission-only",
                            adm_desc,
                            Some(REDIS_RAW),
                            format!("{e:#}"),
                        ));
                        measure(&h, None, &raw_subj, &mut raw_rep);
                        systems_out.push(raw_rep);
                    }
                    None => {
                        measure(&h, None, &raw_subj, &mut raw_rep);
                        systems_out.push(raw_rep);
                    }
                }
            }
            Err(e) => systems_out.push(not_run(REDIS_RAW, raw_desc, None, format!("{e:#}"))),
        }
    }

    // 3. Produce-only Kafka.
    let kafka_desc = "KafkaLog::send (rdkafka, idempotent, acks=all, lz4, linger 1 ms) of an encoded order record to tansu (memory storage), waiting for each delivery report";
    if opts.wants("kafka-produce") {
        #[cfg(feature = "kafka")]
        {
            let broker = testkit::TansuBroker::start();
            match server_rt.block_on(systems::KafkaProduce::start(
                &broker.bootstrap(),
                server_rt.handle().clone(),
                opts.diag.kafka_consumer,
            )) {
                Ok(t) => {
                    let t = Arc::new(t);
                    let make = || Arc::clone(&t) as Arc<dyn Target>;
                    let subj = Subject {
                        name: "kafka-produce",
                        make: &make,
                        settler: None,
                        settle: None,
                    };
                    let mut rep = SystemReport::new("kafka-produce", kafka_desc, true, None);
                    measure(&h, None, &subj, &mut rep);
                    systems_out.push(rep);
                }
                Err(e) => {
                    systems_out.push(not_run("kafka-produce", kafka_desc, None, format!("{e:#}")))
                }
            }
        }
        #[cfg(not(feature = "kafka"))]
        systems_out.push(not_run(
            "kafka-produce",
            kafka_desc,
            None,
            "built without the `kafka` feature (run with `--features kafka`)".into(),
        ));
    }

    // 4. flashsale, each system paired with plain hyper.
    if let Some(c) = ceiling.as_mut() {
        flashsale_systems(&h, &server_rt, Backends::Embedded, c, &mut systems_out);
        flashsale_systems(&h, &server_rt, Backends::Distributed, c, &mut systems_out);
    }
    if let Some(mut c) = ceiling {
        if opts.wants(PLAIN) {
            let make = || Arc::new(c.orders.fresh()) as Arc<dyn Target>;
            let subj = Subject {
                name: PLAIN,
                make: &make,
                settler: None,
                settle: None,
            };
            if c.report.reps.is_empty() {
                // No flashsale system ran: the ceiling alone.
                measure(&h, None, &subj, &mut c.report);
            } else if opts.fixed_rate.is_none() {
                c.report.compute();
                h.half(&subj, &mut c.report);
            }
            systems_out.insert(0, c.report);
        }
    }
    if let Some(t) = plain_task {
        t.abort();
    }

    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.retain(|a| !a.is_empty());
    let command = format!(
        "cargo run --release -p bench --features kafka --bin e2e --{}",
        args.iter().map(|a| format!(" {a}")).collect::<String>()
    );
    let mut report = Report {
        started_at: started_wall
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        duration_s: started.elapsed().as_secs_f64(),
        command,
        mode: if opts.quick { "quick" } else { "full" }.to_owned(),
        step_warmup_s: opts.warmup.as_secs_f64(),
        step_window_s: opts.measure.as_secs_f64(),
        repetitions: opts.reps,
        closed_loop_connections: opts.closed_connections,
        closed_loop_window_s: opts.closed_window.as_secs_f64(),
        settle_deadline_s: opts.settle_deadline.as_secs_f64(),
        machine: Machine::here(),
        method: vec![
            "open loop: request i of a step is intended at i/rate; latency from that instant".into(),
            "closed loop: N connections, each sending its next request as soon as the answer came (the in-process load generator, as wrk does)".into(),
            "load generator: one current-thread tokio runtime + a pacer thread, in this process, at most 1024 requests in flight".into(),
            "system under test: a multi-thread tokio runtime (defaults, as flashsale serve) in this process, plus its servers".into(),
            "repetitions: each flashsale search and closed-loop run right after one of plain hyper; figures are medians".into(),
        ],
        systems: systems_out,
        targets: Vec::new(),
        failures: Vec::new(),
    };
    report.compute_ratios();
    report.compute_targets();
    report.compute_failures();
    for f in &report.failures {
        eprintln!("FAILED: {f}");
    }
    let ok = report.failures.is_empty();

    if opts.fixed_rate.is_some() {
        eprintln!("diagnostic run: nothing written");
        return Ok(ok);
    }
    std::fs::create_dir_all(&opts.out)?;
    let date = started_wall.date();
    let stem = format!(
        "{}-{:02}-{:02}-{}",
        date.year(),
        u8::from(date.month()),
        date.day(),
        if report.machine.host.is_empty() {
            "host"
        } else {
            report.machine.host.as_str()
        }
    );
    let png = format!("{stem}.png");
    let chart = match bench::chart::draw(&report, &opts.out.join(&png)) {
        Ok(_) => Some(png.as_str()),
        Err(e) => {
            eprintln!("chart: {e:#}");
            None
        }
    };
    std::fs::write(
        opts.out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = report.markdown(chart);
    std::fs::write(opts.out.join("latest.md"), &md)?;
    println!("{md}");
    eprintln!(
        "wrote {}/{stem}.json, latest.md{} in {:.0} s",
        opts.out.display(),
        chart.map_or(String::new(), |c| format!(", {c}")),
        started.elapsed().as_secs_f64()
    );
    Ok(ok)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: the run FAILED: orders answered 202 did not settle (see above and the report)");
            std::process::ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
