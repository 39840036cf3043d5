//! After the load: did every order answered 202 end final and notified, how long after
//! its 202 was it paid, and how fast does the settler go on its own.
//!
//! Everything here reads the order store through the public `OrderStore` trait
//! (`Running::store`) and the settler's counters (`Running::settler_stats`).

use crate::systems::Accepted;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};
use storage::{OrderId, OrderStatus, OrderStore, SaleId};

/// Final statuses: the settler has nothing more to decide.
pub const FINAL: [OrderStatus; 3] = [
    OrderStatus::Paid,
    OrderStatus::PaymentFailed,
    OrderStatus::Expired,
];

/// The outcome of waiting for a sale's accepted orders to settle.
#[derive(Debug, Clone, Serialize)]
pub struct DrainOutcome {
    /// Whether every order answered 202 was final and notified before the deadline.
    pub complete: bool,
    /// Seconds from the start of the wait until complete (or until the deadline).
    pub waited_s: f64,
    /// Orders answered 202 (distinct ids recorded by the load generator).
    pub expected: u64,
    /// Of those, not in the store, not final, or not notified at the deadline.
    pub missing: u64,
    /// Of the missing: not in the store at all.
    pub not_stored: u64,
    /// Of the missing: stored but not final.
    pub not_final: u64,
    /// Of the missing: final but not notified (or its stock release still owed).
    pub not_notified: u64,
    /// Missing orders per log partition.
    pub missing_by_partition: BTreeMap<u32, u64>,
    /// A few missing ids.
    pub missing_sample: Vec<String>,
}

async fn sale_settled(
    store: &dyn OrderStore,
    sale: &SaleId,
    expected: u64,
) -> anyhow::Result<bool> {
    let totals = store.sale_totals(sale).await?;
    let finals: u64 = FINAL.iter().map(|s| totals.get(*s).orders).sum();
    if totals.orders < expected || finals < totals.orders {
        return Ok(false);
    }
    Ok(store.unfinished_followups(1).await?.is_empty())
}

/// Waits (at most `deadline`) until every order of `accepted` is in the store, final and
/// notified: the sale holds at least that many orders, none of them in a non-final
/// status, and no final order anywhere owes a notification or a release. The store is
/// asked when `gate(expected)` says it may be done (a cheap look at the settler's
/// counters, every 20 ms), and at least once a second anyway (the query costs the
/// system CPU, so it is not polled faster). When the deadline passes, names what is
/// missing (and on which partition, through `partition_of`).
pub async fn wait_settled(
    store: &dyn OrderStore,
    sale: &SaleId,
    accepted: &[Accepted],
    deadline: Duration,
    partition_of: &(dyn Fn(OrderId) -> Option<u32> + Sync),
    gate: Option<&(dyn Fn(u64) -> bool + Sync)>,
) -> anyhow::Result<DrainOutcome> {
    let ids: HashSet<OrderId> = accepted.iter().map(|a| a.id).collect();
    let expected = ids.len() as u64;
    let t0 = Instant::now();
    let mut asked: Option<Instant> = None;
    loop {
        let since = asked.map_or(Duration::MAX, |a| a.elapsed());
        let due = (since >= Duration::from_millis(200) && gate.is_none_or(|g| g(expected)))
            || since >= Duration::from_secs(1);
        if due {
            asked = Some(Instant::now());
        }
        if due && sale_settled(store, sale, expected).await? {
            return Ok(DrainOutcome {
                complete: true,
                waited_s: t0.elapsed().as_secs_f64(),
                expected,
                missing: 0,
                not_stored: 0,
                not_final: 0,
                not_notified: 0,
                missing_by_partition: BTreeMap::new(),
                missing_sample: Vec::new(),
            });
        }
        if t0.elapsed() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited_s = t0.elapsed().as_secs_f64();
    // What is missing, order by order.
    let stored: HashMap<OrderId, (OrderStatus, bool)> = store
        .orders_of_sale(sale)
        .await?
        .into_iter()
        .map(|o| {
            let released_ok = !o.status.releases_stock() || o.released_at.is_some();
            (
                o.new.order_id,
                (o.status, o.notified_at.is_some() && released_ok),
            )
        })
        .collect();
    let mut out = DrainOutcome {
        complete: false,
        waited_s,
        expected,
        missing: 0,
        not_stored: 0,
        not_final: 0,
        not_notified: 0,
        missing_by_partition: BTreeMap::new(),
        missing_sample: Vec::new(),
    };
    for id in &ids {
        let missing = match stored.get(id) {
            None => {
                out.not_stored += 1;
                true
            }
            Some((status, _)) if !FINAL.contains(status) => {
                out.not_final += 1;
                true
            }
            Some((_, false)) => {
                out.not_notified += 1;
                true
            }
            Some(_) => false,
        };
        if missing {
            out.missing += 1;
            if let Some(p) = partition_of(*id) {
                *out.missing_by_partition.entry(p).or_default() += 1;
            }
            if out.missing_sample.len() < 5 {
                out.missing_sample.push(id.to_string());
            }
        }
    }
    Ok(out)
}

impl DrainOutcome {
    /// One line for the log and the report.
    pub fn describe(&self) -> String {
        if self.complete {
            return format!(
                "all {} orders answered 202 final and notified after {:.1} s",
                self.expected, self.waited_s
            );
        }
        let parts: Vec<String> = self
            .missing_by_partition
            .iter()
            .map(|(p, n)| format!("partition {p}: {n}"))
            .collect();
        format!(
            "{} of {} orders answered 202 not settled after {:.0} s ({} not in the store, {} not final, {} not notified or not released; {}; e.g. {})",
            self.missing,
            self.expected,
            self.waited_s,
            self.not_stored,
            self.not_final,
            self.not_notified,
            if parts.is_empty() {
                "partitions unknown".to_owned()
            } else {
                parts.join(", ")
            },
            self.missing_sample.join(", ")
        )
    }
}

/// Time from each 202 to the order's entry into `paid` (and to its notification).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PaidLatency {
    /// Orders looked at (every recorded 202 of the step, or an even sample of them).
    pub orders: u64,
    /// Of those, paid.
    pub paid: u64,
    /// 202 to paid, median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// 202 to notified, 99th percentile, ms.
    pub notified_p99_ms: f64,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Reads the history of (at most `limit`, evenly spread) orders of `accepted` and
/// measures `paid.at - 202` for each paid one. The store keeps milliseconds, so values
/// are good to 1 ms (negative differences, a payment recorded in the millisecond the 202
/// was read, count as 0).
pub async fn paid_latency(
    store: &dyn OrderStore,
    accepted: &[Accepted],
    limit: usize,
) -> anyhow::Result<PaidLatency> {
    let step = (accepted.len() / limit.max(1)).max(1);
    let mut to_paid = Vec::new();
    let mut to_notified = Vec::new();
    let mut orders = 0u64;
    for a in accepted.iter().step_by(step) {
        orders += 1;
        let Some(order) = store.get_order(a.id).await? else {
            continue;
        };
        if let Some(h) = order.history.iter().find(|h| h.status == OrderStatus::Paid) {
            to_paid.push(((h.at.millis() * 1000 - a.at_us) as f64 / 1000.0).max(0.0));
        }
        if let Some(n) = order.notified_at {
            to_notified.push(((n.millis() * 1000 - a.at_us) as f64 / 1000.0).max(0.0));
        }
    }
    to_paid.sort_by(f64::total_cmp);
    to_notified.sort_by(f64::total_cmp);
    Ok(PaidLatency {
        orders,
        paid: to_paid.len() as u64,
        p50_ms: quantile(&to_paid, 0.5),
        p99_ms: quantile(&to_paid, 0.99),
        max_ms: to_paid.last().copied().unwrap_or(0.0),
        notified_p99_ms: quantile(&to_notified, 0.99),
    })
}

/// The settler alone: a log filled with accepted orders while it was off, then started
/// with no load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SettlerAlone {
    /// Orders in the log when the settler started.
    pub orders: u64,
    /// Seconds the fill took (ingest alone, closed loop).
    pub fill_s: f64,
    /// Orders per second accepted during the fill.
    pub fill_rate: f64,
    /// Seconds from `App::start` returning until every order was final and notified
    /// (`None`: not within the deadline).
    pub all_done_s: Option<f64>,
    /// Orders final and notified per second between 10 % and 90 % done: the sustained
    /// rate.
    pub sustained_per_s: Option<f64>,
    /// The same over the whole run, start-up included.
    pub overall_per_s: Option<f64>,
    /// The store's verdict after the settler's counters said done.
    pub drain: Option<DrainOutcome>,
}

/// Follows the settler's counters (every 20 ms, at most `deadline`) until `orders` are
/// final (paid, payment failed or expired) and notified; returns the seconds at which
/// 10 %, 90 % and 100 % were done.
pub async fn follow_settler(
    stats: &settler::SettlerStats,
    orders: u64,
    deadline: Duration,
) -> (Option<f64>, Option<f64>, Option<f64>) {
    let t0 = Instant::now();
    let (mut t10, mut t90) = (None, None);
    loop {
        let s = stats.snapshot();
        let done = (s.paid + s.payment_failed + s.expired).min(s.notified);
        let t = t0.elapsed().as_secs_f64();
        if t10.is_none() && done * 10 >= orders {
            t10 = Some(t);
        }
        if t90.is_none() && done * 10 >= orders * 9 {
            t90 = Some(t);
        }
        if done >= orders {
            return (t10, t90, Some(t));
        }
        if t0.elapsed() >= deadline {
            return (t10, t90, None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_sorted_list() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
