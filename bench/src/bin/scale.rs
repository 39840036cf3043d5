//! The scale-out step: admission decisions per second for one hot sale, on one
//! redis-server, on a 3-primary Redis Cluster with the sale in one bucket (one slot, one
//! node), and with the sale in N stock buckets (spread over the nodes); with the CPU each
//! Redis node spent per decision, which is what the fleet model of `docs/SCALING.md` scales.
//!
//! ```sh
//! cargo run --release -p bench --bin scale -- [--buckets 6] [--seconds 3] [--reps 3] [--inflight 256]
//! ```
//!
//! Every decision is a new buyer's accepted order (`RedisAdmission::admit`, the admit
//! script; with buckets, the buyer's bucket): stock 100 M, no per-user limit reached, token
//! buckets that never run dry. `--inflight` decisions are in flight at once from one client
//! process (the shape of many ingest instances sharing the cluster). Reported: the median
//! of `--reps` windows (min-max), the busiest node's CPU share (cores) and the Redis CPU per
//! decision (all nodes). On a machine with fewer cores than nodes plus client, the nodes
//! share cores: the CPU per decision, not the rate, is the figure to scale.

use bench::cpu::pid_cpu_s;
use ingest::admission::Admission;
use ingest::model::{AdmitRequest, Decision};
use ingest::redis_admission::RedisAdmission;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{Currency, Money, OrderId, Sale, SaleId, Timestamp, UserId, UserRate};

#[derive(Debug, Clone)]
struct Opts {
    buckets: u32,
    seconds: f64,
    reps: usize,
    inflight: usize,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        buckets: 6,
        seconds: 3.0,
        reps: 3,
        inflight: 256,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--buckets" => o.buckets = value()?.parse()?,
            "--seconds" => o.seconds = value()?.parse()?,
            "--reps" => o.reps = value()?.parse()?,
            "--inflight" => o.inflight = value()?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(o.buckets >= 1 && o.reps >= 1 && o.inflight >= 1);
    Ok(o)
}

fn sale(id: &str, buckets: u32) -> Sale {
    let now = Timestamp::now();
    Sale {
        id: SaleId::parse(id).expect("id"),
        sku: "s".into(),
        stock: storage::MAX_STOCK,
        price: Money {
            minor: 1,
            currency: Currency::parse("EUR").expect("eur"),
        },
        starts_at: now,
        ends_at: now.plus_millis(3_600_000),
        per_user_limit: 1000,
        max_quantity_per_order: 1,
        user_rate: UserRate {
            per_second: 1_000_000,
            burst: 1_000_000,
        },
        stock_buckets: buckets,
        created_at: now,
    }
}

/// One measured window.
#[derive(Debug, Clone, Copy)]
struct Window {
    per_s: f64,
    /// CPU of the busiest Redis node, in cores.
    busiest_cores: f64,
    /// Redis CPU (all nodes) per decision, microseconds.
    redis_us_per_decision: f64,
}

/// Runs `inflight` loops of decisions for `seconds`; counts the accepted ones.
async fn window(
    redis: &Arc<RedisAdmission>,
    sale: &SaleId,
    pids: &[u32],
    o: &Opts,
    next_user: &Arc<AtomicU64>,
) -> anyhow::Result<Window> {
    let cpu =
        |pids: &[u32]| -> Vec<f64> { pids.iter().map(|&p| pid_cpu_s(p).unwrap_or(0.0)).collect() };
    let before = cpu(pids);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(o.seconds);
    let accepted = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..o.inflight {
        let (redis, sale, next, accepted) = (
            Arc::clone(redis),
            sale.clone(),
            Arc::clone(next_user),
            Arc::clone(&accepted),
        );
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let req = AdmitRequest {
                    user: UserId::parse(format!("u{n}")).expect("user"),
                    quantity: 1,
                    key: "k".into(),
                    fingerprint: "f".into(),
                    order_id: OrderId::new(),
                };
                match redis.admit(&sale, &req).await {
                    Ok(Decision::Accepted(_)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(other) => return Err(anyhow::anyhow!("not accepted: {other:?}")),
                    Err(e) => return Err(anyhow::anyhow!("admit: {e}")),
                }
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let wall = start.elapsed().as_secs_f64();
    let after = cpu(pids);
    let used: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let n = accepted.load(Ordering::Relaxed) as f64;
    Ok(Window {
        per_s: n / wall,
        busiest_cores: used.iter().copied().fold(0.0, f64::max) / wall,
        redis_us_per_decision: used.iter().sum::<f64>() / n.max(1.0) * 1e6,
    })
}

/// Median and range of the windows of one scenario.
fn summary(name: &str, ws: &[Window]) -> String {
    let mut rates: Vec<f64> = ws.iter().map(|w| w.per_s).collect();
    rates.sort_by(f64::total_cmp);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    format!(
        "| {name} | {:.0} ({:.0}-{:.0}, n={}) | {:.2} | {:.1} |",
        median(rates.clone()),
        rates[0],
        rates[rates.len() - 1],
        ws.len(),
        median(ws.iter().map(|w| w.busiest_cores).collect()),
        median(ws.iter().map(|w| w.redis_us_per_decision).collect()),
    )
}

async fn scenario(
    name: &str,
    url: &str,
    pids: &[u32],
    buckets: u32,
    o: &Opts,
) -> anyhow::Result<String> {
    let redis = Arc::new(RedisAdmission::connect(url, "bench:", Duration::from_secs(5)).await?);
    let id = format!("scale-{buckets}");
    let s = sale(&id, buckets);
    redis.create_sale(&s).await?;
    let next = Arc::new(AtomicU64::new(0));
    // Warm-up: connections to every node, scripts loaded.
    let warm = Opts {
        seconds: 0.5,
        ..o.clone()
    };
    window(&redis, &s.id, pids, &warm, &next).await?;
    let mut ws = Vec::new();
    for _ in 0..o.reps {
        ws.push(window(&redis, &s.id, pids, o, &next).await?);
    }
    let line = summary(name, &ws);
    eprintln!("{line}");
    Ok(line)
}

fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut lines = Vec::new();
    {
        let single = testkit::RedisServer::start();
        let pids: Vec<u32> = single.pid().into_iter().collect();
        lines.push(rt.block_on(scenario(
            "one redis-server, 1 bucket",
            &single.url(),
            &pids,
            1,
            &o,
        ))?);
    }
    let cluster = testkit::RedisCluster::start(3);
    let pids: Vec<u32> = (0..cluster.len()).filter_map(|i| cluster.pid(i)).collect();
    lines.push(rt.block_on(scenario(
        "3-primary cluster, 1 bucket",
        &cluster.url(),
        &pids,
        1,
        &o,
    ))?);
    lines.push(rt.block_on(scenario(
        &format!("3-primary cluster, {} buckets", o.buckets),
        &cluster.url(),
        &pids,
        o.buckets,
        &o,
    ))?);
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "Admission decisions for one sale (accepted orders, {} in flight, {} windows of {} s, \
         median (min-max)); {cores} cores shared by the client and every node.\n",
        o.inflight, o.reps, o.seconds
    );
    println!("| setup | decisions /s | busiest node, cores | Redis CPU µs / decision |");
    println!("|---|---:|---:|---:|");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
