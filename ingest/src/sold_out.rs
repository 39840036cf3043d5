//! The per-instance sold-out flag of the Redis backend: once a sale is sold out, most
//! attempts are answered `sold_out` without a Redis call.
//!
//! Answering from a local flag must not break invariant 4 (a retry of an accepted order
//! gets its first answer) nor hide stock that came back. So:
//!
//! - A flag is set only when Redis answered `sold_out` with **no** unit left. While no unit
//!   is left no order can be accepted, so the flag stays true until units come back. A
//!   sale in stock buckets is flagged only when every bucket has no unit left and none is
//!   lent in flight between buckets (a transfer's arrival publishes `stock` like a
//!   release).
//! - Units come back only through the release/abort script, `add-stock` and reconcile; each
//!   publishes `stock` on the sale's channel `{prefix}{sale}:events`. Every instance keeps
//!   one pattern subscription and drops the sale's flag on that message. Redis writes the
//!   message to subscribers before it answers the caller, so the window in which a flag
//!   outlives its truth is the subscriber's own processing delay.
//! - With the flag the instance fetches the users who hold an answer (the fields of the
//!   sale's `units` hash: every user who was ever accepted). Their attempts still go to
//!   Redis, which returns a stored answer to a retry. Anyone else holds no answer, so
//!   `sold_out` is the answer Redis would give (quantity within the per-user limit, before
//!   the sale's end).
//! - A flag learnt while an event arrived is thrown away (a per-instance epoch), and a lost
//!   subscription (connection closed, ping unanswered) drops every flag and stops setting
//!   new ones until the subscription is back. Flags also expire after a short TTL.
//!
//! What differs from Redis: the flag answers before the user's token bucket, so a user
//! over the rate limit may get `sold_out` instead of `rate_limited` (both take nothing).
//! Sold-out answers given locally are added to the sale's `rejected` counters in Redis
//! once a second.

use crate::model::AdmitRequest;
use crate::redis_admission::Conn;
use dashmap::{DashMap, DashSet};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage::{SaleId, Timestamp};

/// How close to a sale's end the flag stops answering (clocks of instances and Redis differ).
const END_MARGIN_US: i64 = 2_000_000;

/// What an instance knows of a sold-out sale.
#[derive(Debug)]
struct Flag {
    /// Users holding an answer in the sale: their attempts go to Redis.
    holders: HashSet<Box<str>>,
    per_user_limit: u32,
    /// End of the sale on the instance's clock, in microseconds.
    ends_at_us: i64,
}

/// State shared by the admission path and the subscriber task.
#[derive(Debug)]
pub(crate) struct Shared {
    flags: moka::sync::Cache<SaleId, Arc<Flag>>,
    /// Bumped by every event and every change of the subscription.
    epoch: AtomicU64,
    /// The subscription is up: flags may be set.
    live: AtomicBool,
    /// Sales whose holders are being fetched.
    loading: DashSet<SaleId>,
    /// Sold-out answers given locally and not yet added to Redis's counters.
    unflushed: DashMap<SaleId, u64>,
    /// Sold-out answers given locally since start.
    answered: AtomicU64,
    prefix: String,
}

/// The sold-out flags of one instance, with their subscriber and counter-flush task.
/// Dropping it stops the task.
#[derive(Debug)]
pub struct SoldOutFlags {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SoldOutFlags {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The events channel of a sale.
pub(crate) fn channel(prefix: &str, sale: &SaleId) -> String {
    format!("{prefix}{{{}}}:events", sale.as_str())
}

fn sale_of_channel(prefix: &str, channel: &str) -> Option<SaleId> {
    let id = channel
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix("}:events")?;
    SaleId::parse(id).ok()
}

impl SoldOutFlags {
    /// Starts the subscriber (on the first of `clients` that answers) for keys under
    /// `prefix`; flags live at most `ttl`.
    pub(crate) fn start(
        clients: Vec<redis::Client>,
        conn: Conn,
        prefix: &str,
        ttl: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            flags: moka::sync::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(10_000)
                .build(),
            epoch: AtomicU64::new(0),
            live: AtomicBool::new(false),
            loading: DashSet::new(),
            unflushed: DashMap::new(),
            answered: AtomicU64::new(0),
            prefix: prefix.to_owned(),
        });
        let task = tokio::spawn(run(Arc::clone(&shared), clients, conn));
        SoldOutFlags { shared, task }
    }

    /// Whether the attempt can be answered `sold_out` here; counts it if so.
    pub(crate) fn answer_locally(&self, sale: &SaleId, req: &AdmitRequest) -> bool {
        let Some(flag) = self.shared.flags.get(sale) else {
            return false;
        };
        let local = self.shared.live.load(Ordering::Acquire)
            && req.quantity <= flag.per_user_limit
            && Timestamp::now().micros() < flag.ends_at_us - END_MARGIN_US
            && !flag.holders.contains(req.user.as_str());
        if local {
            // The sale's counter exists after its first local answer: no id clone after.
            match self.shared.unflushed.get_mut(sale) {
                Some(mut n) => *n += 1,
                None => *self.shared.unflushed.entry(sale.clone()).or_default() += 1,
            }
            self.shared.answered.fetch_add(1, Ordering::Relaxed);
            crate::metrics::sold_out_local().inc();
        }
        local
    }

    /// The epoch to pass to [`learn`](Self::learn), read before the decision is sent.
    pub(crate) fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// Redis answered `sold_out` with no unit left for a decision sent at `epoch`: fetch the
    /// users holding answers and set the flag, in the background.
    pub(crate) fn learn(&self, sale: &SaleId, epoch: u64, conn: Conn, keys: FlagKeys) {
        let s = &self.shared;
        if !s.live.load(Ordering::Acquire)
            || s.epoch.load(Ordering::Acquire) != epoch
            || s.flags.contains_key(sale)
            || !s.loading.insert(sale.clone())
        {
            return;
        }
        let (shared, sale) = (Arc::clone(s), sale.clone());
        tokio::spawn(async move {
            match fetch(conn, &keys).await {
                Ok(Some(flag)) => {
                    // An event since the decision was sent may have brought units back.
                    if shared.live.load(Ordering::Acquire)
                        && shared.epoch.load(Ordering::Acquire) == epoch
                    {
                        shared.flags.insert(sale.clone(), Arc::new(flag));
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "sold-out flag not set"),
            }
            shared.loading.remove(&sale);
        });
    }

    /// Sold-out answers this instance gave without Redis since it started.
    pub fn answered_locally(&self) -> u64 {
        self.shared.answered.load(Ordering::Relaxed)
    }
}

/// Keys a flag is read from: per stock bucket of the sale (one for most sales), its sale
/// hash, units hash and lent hash.
#[derive(Debug)]
pub(crate) struct FlagKeys {
    pub buckets: Vec<[String; 3]>,
}

/// Reads every bucket of the sale (one pipeline each: a bucket is one hash slot) and makes
/// a flag only if each has no unit left and none lent on the way to another bucket (a
/// transfer in flight still carries units; its arrival publishes `stock`). The holders are
/// the users holding units in any bucket; the limit and end come from the first bucket
/// (every bucket has the same).
async fn fetch(conn: Conn, keys: &FlagKeys) -> redis::RedisResult<Option<Flag>> {
    type Fields = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);
    let reads = keys.buckets.iter().map(|[sale, units, lent]| {
        let mut conn = conn.clone();
        async move {
            let read: redis::RedisResult<(Fields, Vec<String>, Vec<String>)> = redis::pipe()
                .cmd("HMGET")
                .arg(sale)
                .arg(&["left", "limit", "ends", "skew"])
                .cmd("HKEYS")
                .arg(units)
                .cmd("HKEYS")
                .arg(lent)
                .query_async(&mut conn)
                .await;
            read
        }
    });
    let mut holders = HashSet::new();
    let mut first = None;
    for read in futures_util::future::join_all(reads).await {
        let ((left, limit, ends, skew), users, lent) = read?;
        // Every key of a sale holds a placeholder field "\n" from its creation.
        let in_flight = lent.iter().any(|id| id != "\n");
        let (Some(0), Some(limit), Some(ends), false) = (left, limit, ends, in_flight) else {
            return Ok(None);
        };
        first.get_or_insert((limit, ends - skew.unwrap_or(0)));
        holders.extend(users.into_iter().map(String::into_boxed_str));
    }
    let Some((limit, ends_at_us)) = first else {
        return Ok(None);
    };
    Ok(Some(Flag {
        holders,
        per_user_limit: u32::try_from(limit).unwrap_or(0),
        ends_at_us,
    }))
}

/// Drops every flag and refuses new ones until the subscription is back.
fn lose(shared: &Shared) {
    shared.live.store(false, Ordering::Release);
    shared.epoch.fetch_add(1, Ordering::AcqRel);
    shared.flags.invalidate_all();
}

/// Keeps the subscription (reconnecting with backoff) and flushes local counters.
///
/// On a Redis Cluster a message published on any node reaches the subscribers of every
/// node (the cluster bus forwards it), so one subscription on one node is enough; when that
/// node is lost the next attempt goes to the next seed node.
async fn run(shared: Arc<Shared>, clients: Vec<redis::Client>, conn: Conn) {
    use futures_util::StreamExt;
    let pattern = format!("{}{{*}}:events", shared.prefix);
    let mut backoff = Duration::from_millis(50);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for attempt in 0usize.. {
        let client = &clients[attempt % clients.len().max(1)];
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            redis::RedisResult::Ok(pubsub.split())
        };
        let (mut sink, mut stream) =
            match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
                Ok(Ok(parts)) => parts,
                _ => {
                    flush(&shared, &conn).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
        backoff = Duration::from_millis(50);
        // Events sent before the subscription are lost: start from no flags.
        shared.flags.invalidate_all();
        shared.epoch.fetch_add(1, Ordering::AcqRel);
        shared.live.store(true, Ordering::Release);
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => {
                        shared.epoch.fetch_add(1, Ordering::AcqRel);
                        match sale_of_channel(&shared.prefix, msg.get_channel_name()) {
                            Some(sale) => shared.flags.invalidate(&sale),
                            None => shared.flags.invalidate_all(),
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    flush(&shared, &conn).await;
                    let ping = tokio::time::timeout(Duration::from_secs(1), sink.ping::<redis::Value>());
                    if !matches!(ping.await, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        tracing::warn!("sold-out flags: lost the Redis subscription; answering from Redis only");
        lose(&shared);
    }
}

/// Adds the locally given sold-out answers to the sales' counters in Redis.
async fn flush(shared: &Shared, conn: &Conn) {
    let due: Vec<(SaleId, u64)> = shared
        .unflushed
        .iter()
        .filter(|e| *e.value() > 0)
        .map(|e| (e.key().clone(), *e.value()))
        .collect();
    for (sale, n) in due {
        if let Some(mut e) = shared.unflushed.get_mut(&sale) {
            *e -= n;
        }
        let key = format!("{}{{{}}}:rejected", shared.prefix, sale.as_str());
        let mut conn = conn.clone();
        let r: redis::RedisResult<i64> = redis::cmd("HINCRBY")
            .arg(&key)
            .arg("sold_out")
            .arg(n)
            .query_async(&mut conn)
            .await;
        if r.is_err() {
            *shared.unflushed.entry(sale).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip() {
        let sale = SaleId::parse("spring-1").expect("id");
        let c = channel("fs:", &sale);
        assert_eq!(c, "fs:{spring-1}:events");
        assert_eq!(sale_of_channel("fs:", &c), Some(sale));
        assert_eq!(sale_of_channel("other:", &c), None);
        assert_eq!(sale_of_channel("fs:", "fs:{x}:rejected"), None);
    }
}
