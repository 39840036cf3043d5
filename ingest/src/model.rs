//! The admission model: every rule that decides an order's fate, with no I/O.
//!
//! The embedded backend runs this state machine directly; the Redis Lua script implements
//! the same rules and is checked against this model by the model tests. Checks run in a
//! fixed order: idempotency, sale active, the user's token bucket, the per-user limit,
//! stock. A rejection takes no stock; only an acceptance changes stock, the user's units,
//! the sequence and the idempotency record.
//!
//! Time is the caller's `now` in microseconds (the backend's clock: Redis `TIME` for the
//! distributed backend), and the token bucket counts milli-tokens in integers so the Lua
//! script, whose numbers are doubles, computes exactly the same values.

use sequencer::OrderRecord;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use storage::{Order, OrderId, Sale, UserId};

/// A token costs this many milli-tokens.
pub const TOKEN: i64 = 1000;

/// The rules of one sale that admission needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleRules {
    /// Total units put on sale.
    pub stock: u64,
    /// Most units a user may hold.
    pub per_user_limit: u32,
    /// Bucket refill per second.
    pub rate_per_second: u32,
    /// Bucket capacity.
    pub burst: u32,
    /// First microsecond the sale is open.
    pub starts_at_us: i64,
    /// First microsecond the sale is closed.
    pub ends_at_us: i64,
}

impl SaleRules {
    /// The admission rules of a sale.
    pub fn of(sale: &Sale) -> Self {
        SaleRules {
            stock: u64::from(sale.stock),
            per_user_limit: sale.per_user_limit,
            rate_per_second: sale.user_rate.per_second,
            burst: sale.user_rate.burst,
            starts_at_us: sale.starts_at.micros(),
            ends_at_us: sale.ends_at.micros(),
        }
    }
}

/// One order attempt as admission sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitRequest {
    /// The buyer.
    pub user: UserId,
    /// Units asked for (already checked against the per-order maximum).
    pub quantity: u32,
    /// The buyer's Idempotency-Key.
    pub key: String,
    /// Digest of the request body.
    pub fingerprint: String,
    /// Id the order gets if accepted.
    pub order_id: OrderId,
}

/// The answer stored for an accepted order and replayed for its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The order's id.
    pub order_id: OrderId,
    /// Its sequence number in the sale.
    pub sequence: u64,
    /// Units accepted.
    pub quantity: u32,
}

/// Why admission refused an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The Idempotency-Key was used before with a different body.
    IdempotencyConflict,
    /// No such sale.
    UnknownSale,
    /// The sale has not started or has ended.
    NotActive,
    /// The user's token bucket is empty; retry after this many seconds.
    RateLimited {
        /// Whole seconds until a token is available.
        retry_after_s: u32,
    },
    /// The order would take the user over the per-user limit.
    LimitExceeded,
    /// Not enough stock left.
    SoldOut,
    /// A per-sale map of the admission state is at its cap (see [`Limits`]): nothing was
    /// taken. `retry_after_s` is 0 when the sale has taken its most orders (retrying does
    /// not help), else the seconds until a token bucket refills and frees room.
    Capacity {
        /// Whole seconds until room may be free (0: not before the sale ends).
        retry_after_s: u32,
    },
}

impl Rejection {
    /// The stable code of the rejection (also its stats key).
    pub fn code(self) -> &'static str {
        match self {
            Rejection::IdempotencyConflict => "idempotency_conflict",
            Rejection::UnknownSale => "unknown_sale",
            Rejection::NotActive => "sale_not_active",
            Rejection::RateLimited { .. } => "rate_limited",
            Rejection::LimitExceeded => "limit_exceeded",
            Rejection::SoldOut => "sold_out",
            Rejection::Capacity { .. } => "capacity_exceeded",
        }
    }
}

/// What admission decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A new order: stock taken, answer stored (unconfirmed until the log has it).
    Accepted(Answer),
    /// A retry of an accepted, confirmed order: its first answer.
    Replayed(Answer),
    /// A retry of an order whose record is not yet confirmed durable.
    InProgress,
    /// Refused; nothing taken.
    Rejected(Rejection),
}

/// How a bucket of a bucketed sale is asked for a decision (see
/// [`SaleState::admit_in_bucket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketAsk {
    /// The attempt's first ask: a shortage of units is answered [`BucketAnswer::Short`].
    First,
    /// The ask after borrowing: the first ask took the attempt's token.
    Retry,
}

/// A bucket's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketAnswer {
    /// Decided, as a whole sale decides.
    Decided(Decision),
    /// Every check passed but the bucket holds fewer units than asked: borrow, then ask
    /// again with [`BucketAsk::Retry`]. Nothing was counted.
    Short {
        /// Units the bucket holds.
        left: i64,
    },
}

/// A user's token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Milli-tokens available.
    pub tokens: i64,
    /// When `tokens` was last computed (microseconds).
    pub at_us: i64,
}

/// Takes one token at `now_us`, or says how many whole seconds until one is available.
pub fn take_token(
    bucket: Option<Bucket>,
    rate_per_second: u32,
    burst: u32,
    now_us: i64,
) -> (Bucket, Result<(), u32>) {
    let cap = i64::from(burst) * TOKEN;
    let rate = i64::from(rate_per_second.max(1));
    let mut b = bucket.unwrap_or(Bucket {
        tokens: cap,
        at_us: now_us,
    });
    let elapsed = (now_us - b.at_us).max(0);
    // Time to fill an empty bucket; past it the bucket is full whatever the history, and
    // below it `elapsed * rate` cannot overflow (cap <= 1e9 milli-tokens, rate <= 1e6).
    let fill_us = cap * 1000 / rate + 1;
    if elapsed >= fill_us {
        b.tokens = cap;
        b.at_us = now_us;
    } else {
        // Credit whole milli-tokens and advance the clock only by the time they are
        // worth, so frequent callers keep the fraction instead of losing it.
        let added = elapsed * rate / 1000;
        b.tokens = (b.tokens + added).min(cap);
        b.at_us += added * 1000 / rate;
        if b.tokens == cap {
            b.at_us = now_us;
        }
    }
    if b.tokens >= TOKEN {
        b.tokens -= TOKEN;
        (b, Ok(()))
    } else {
        let missing_us = ((TOKEN - b.tokens) * 1000 + rate - 1) / rate;
        let secs = (missing_us + 999_999) / 1_000_000;
        (b, Err(secs.clamp(1, i64::from(u32::MAX)) as u32))
    }
}

/// When a bucket has refilled to its capacity: from then on it is equivalent to no bucket
/// at all (what [`take_token`] does with `None`), so it may be dropped.
pub fn bucket_full_at(bucket: Bucket, rate_per_second: u32, burst: u32) -> i64 {
    let cap = i64::from(burst) * TOKEN;
    let rate = i64::from(rate_per_second.max(1));
    let fill_us = cap * 1000 / rate + 1;
    let missing = (cap - bucket.tokens).max(0);
    let refill_us = (missing * 1000 + rate - 1) / rate;
    bucket.at_us.saturating_add(refill_us.min(fill_us))
}

/// Caps of one sale's admission state, so a flash sale's memory stays bounded whatever the
/// number of buyers (see `docs/ARCHITECTURE.md`, "Bounded memory").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most orders a sale accepts (aborted ones included); this bounds the idempotency
    /// answers, the users' units and the released and claimed sets. Past it orders are
    /// refused with [`Rejection::Capacity`].
    pub max_orders: u64,
    /// Most token buckets kept at once. A bucket that refilled is dropped (it is the same
    /// as none); when the map is full of buckets still refilling, a user without one is
    /// refused with [`Rejection::Capacity`] until one refills.
    pub max_buckets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_orders: 1_000_000,
            max_buckets: 1_000_000,
        }
    }
}

/// How many entries a sale's admission state holds, per map (the memory bound's gauge).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entries {
    /// Token buckets still refilling.
    pub buckets: usize,
    /// Users holding units.
    pub units: usize,
    /// Idempotency answers.
    pub answers: usize,
    /// Orders released or aborted.
    pub released: usize,
    /// Orders claimed by the settler.
    pub claimed: usize,
}

impl Entries {
    /// Every entry.
    pub fn total(&self) -> usize {
        self.buckets + self.units + self.answers + self.released + self.claimed
    }
}

/// The stored answer of an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemEntry {
    /// Digest of the body the key was first used with.
    pub fingerprint: String,
    /// The answer given.
    pub answer: Answer,
    /// Whether the order's record is durable in the log.
    pub confirmed: bool,
}

/// An accepted order, as release and abort need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRef {
    /// The order.
    pub order_id: OrderId,
    /// Its buyer.
    pub user: UserId,
    /// Units it holds.
    pub quantity: u32,
    /// Its Idempotency-Key.
    pub key: String,
}

impl From<&AdmitRequest> for OrderRef {
    /// The order an attempt would be (its id is the one it gets if accepted).
    fn from(r: &AdmitRequest) -> Self {
        OrderRef {
            order_id: r.order_id,
            user: r.user.clone(),
            quantity: r.quantity,
            key: r.key.clone(),
        }
    }
}

impl From<&OrderRecord> for OrderRef {
    /// The order of a log record.
    fn from(r: &OrderRecord) -> Self {
        OrderRef {
            order_id: r.order_id,
            user: r.user_id.clone(),
            quantity: r.quantity,
            key: r.idempotency_key.clone(),
        }
    }
}

impl From<&Order> for OrderRef {
    /// The order as the store holds it.
    fn from(o: &Order) -> Self {
        OrderRef {
            order_id: o.new.order_id,
            user: o.new.user_id.clone(),
            quantity: o.new.quantity,
            key: o.new.idempotency_key.clone(),
        }
    }
}

/// What an abort did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortOutcome {
    /// The acceptance was undone: stock back, answer forgotten.
    Undone,
    /// The settler already read the order's record: it is durable and stays.
    AlreadyClaimed,
    /// The order held nothing (a decision that never ran, a refusal, or undone before).
    Nothing,
}

/// Admission counters of a sale, for stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Total units put on sale.
    pub stock: u64,
    /// Units not taken.
    pub stock_left: i64,
    /// Orders accepted (not counting replays).
    pub accepted_orders: u64,
    /// Units accepted.
    pub accepted_units: u64,
    /// Units given back (released or aborted).
    pub released_units: u64,
    /// Rejections by code.
    pub rejected: Vec<(String, u64)>,
}

/// The content of a [`SaleState`], for writing it to another backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The sale's rules (stock includes additions).
    pub rules: SaleRules,
    /// Counters.
    pub counters: Counters,
    /// Next sequence number.
    pub next_sequence: u64,
    /// Units held, by user (users holding none left out).
    pub units: Vec<(UserId, u32)>,
    /// Idempotency answers by (user, key).
    pub answers: Vec<(UserId, String, IdemEntry)>,
    /// Orders released or aborted.
    pub released: Vec<OrderId>,
    /// Orders the settler took (durable; no abort may undo them).
    pub claimed: Vec<OrderId>,
    /// The sale ended and settled; its entries were dropped.
    #[serde(default)]
    pub retired: bool,
}

/// Admission state of one sale.
#[derive(Debug, Clone)]
pub struct SaleState {
    /// The sale's rules.
    pub rules: SaleRules,
    /// Units not taken; negative only if restored data is inconsistent.
    pub stock_left: i64,
    /// Next sequence number.
    pub next_sequence: u64,
    accepted_orders: u64,
    accepted_units: u64,
    released_units: u64,
    units: HashMap<UserId, u32>,
    buckets: HashMap<UserId, Bucket>,
    idem: HashMap<(UserId, String), IdemEntry>,
    released: HashSet<OrderId>,
    claimed: HashSet<OrderId>,
    rejected: HashMap<&'static str, u64>,
    limits: Limits,
    /// No bucket becomes full before this: a prune before it would free nothing.
    prune_at_us: i64,
    /// Buckets left by the last prune: a periodic prune waits until the map doubled, so
    /// its scans cost a constant per bucket added.
    pruned_len: usize,
    /// Ended and settled: every per-user and per-order entry was dropped.
    retired: bool,
}

impl SaleState {
    /// A sale with all its stock.
    pub fn new(rules: SaleRules) -> Self {
        Self::with_limits(rules, Limits::default())
    }

    /// A sale with all its stock and the given caps.
    pub fn with_limits(rules: SaleRules, limits: Limits) -> Self {
        SaleState {
            limits,
            prune_at_us: i64::MIN,
            pruned_len: 0,
            retired: false,
            rules,
            stock_left: rules.stock as i64,
            next_sequence: 1,
            accepted_orders: 0,
            accepted_units: 0,
            released_units: 0,
            units: HashMap::new(),
            buckets: HashMap::new(),
            idem: HashMap::new(),
            released: HashSet::new(),
            claimed: HashSet::new(),
            rejected: HashMap::new(),
        }
    }

    /// Decides one attempt at `now_us`.
    pub fn admit(&mut self, req: &AdmitRequest, now_us: i64) -> Decision {
        match self.admit_in_bucket(req, now_us, None) {
            BucketAnswer::Decided(d) => d,
            // Only a bucket asked as such answers short.
            BucketAnswer::Short { .. } => Decision::Rejected(Rejection::SoldOut),
        }
    }

    /// Decides one attempt at `now_us` as one bucket of a bucketed sale
    /// ([`crate::stock_buckets`]) when `ask` is set: [`BucketAsk::First`] answers
    /// [`BucketAnswer::Short`] instead of `sold_out` when the bucket lacks the units (and
    /// counts no rejection: the caller borrows and asks again); [`BucketAsk::Retry`] is
    /// that second ask, which takes no token (the first one took it). `None`: as
    /// [`admit`](Self::admit).
    pub fn admit_in_bucket(
        &mut self,
        req: &AdmitRequest,
        now_us: i64,
        ask: Option<BucketAsk>,
    ) -> BucketAnswer {
        let answer = self.decide(req, now_us, ask);
        if let BucketAnswer::Decided(Decision::Rejected(r)) = answer {
            *self.rejected.entry(r.code()).or_default() += 1;
        }
        answer
    }

    fn decide(&mut self, req: &AdmitRequest, now_us: i64, ask: Option<BucketAsk>) -> BucketAnswer {
        use BucketAnswer::Decided;
        if self.retired {
            // Ended and settled; its answers are past their retention.
            return Decided(Decision::Rejected(Rejection::NotActive));
        }
        let idem_key = (req.user.clone(), req.key.clone());
        if let Some(entry) = self.idem.get(&idem_key) {
            if entry.fingerprint != req.fingerprint {
                return Decided(Decision::Rejected(Rejection::IdempotencyConflict));
            }
            if !entry.confirmed {
                return Decided(Decision::InProgress);
            }
            return Decided(Decision::Replayed(entry.answer));
        }
        if now_us < self.rules.starts_at_us || now_us >= self.rules.ends_at_us {
            return Decided(Decision::Rejected(Rejection::NotActive));
        }
        let existing = self.buckets.get(&req.user).copied();
        if existing.is_none() && self.buckets.len() >= self.limits.max_buckets {
            if now_us >= self.prune_at_us {
                self.prune_buckets(now_us);
            }
            if self.buckets.len() >= self.limits.max_buckets {
                let wait_us = self.prune_at_us.saturating_sub(now_us).max(0);
                let secs = ((wait_us + 999_999) / 1_000_000).clamp(1, i64::from(u32::MAX));
                return Decided(Decision::Rejected(Rejection::Capacity {
                    retry_after_s: secs as u32,
                }));
            }
        }
        if ask != Some(BucketAsk::Retry) {
            let (bucket, took) = take_token(
                existing,
                self.rules.rate_per_second,
                self.rules.burst,
                now_us,
            );
            self.buckets.insert(req.user.clone(), bucket);
            if let Err(retry_after_s) = took {
                return Decided(Decision::Rejected(Rejection::RateLimited { retry_after_s }));
            }
        }
        let held = self.units.get(&req.user).copied().unwrap_or(0);
        if u64::from(held) + u64::from(req.quantity) > u64::from(self.rules.per_user_limit) {
            return Decided(Decision::Rejected(Rejection::LimitExceeded));
        }
        if self.stock_left < i64::from(req.quantity) {
            if ask == Some(BucketAsk::First) {
                return BucketAnswer::Short {
                    left: self.stock_left,
                };
            }
            return Decided(Decision::Rejected(Rejection::SoldOut));
        }
        if self.next_sequence > self.limits.max_orders {
            return Decided(Decision::Rejected(Rejection::Capacity { retry_after_s: 0 }));
        }
        let answer = Answer {
            order_id: req.order_id,
            sequence: self.next_sequence,
            quantity: req.quantity,
        };
        self.take(&req.user, req.quantity);
        self.next_sequence += 1;
        self.idem.insert(
            idem_key,
            IdemEntry {
                fingerprint: req.fingerprint.clone(),
                answer,
                confirmed: false,
            },
        );
        Decided(Decision::Accepted(answer))
    }

    /// A user holding no unit needs no entry (absent means 0).
    fn give_back_units(&mut self, user: &UserId, quantity: u32) {
        if let Some(u) = self.units.get_mut(user) {
            *u = u.saturating_sub(quantity);
            if *u == 0 {
                self.units.remove(user);
            }
        }
    }

    fn take(&mut self, user: &UserId, quantity: u32) {
        self.stock_left -= i64::from(quantity);
        *self.units.entry(user.clone()).or_default() += quantity;
        self.accepted_orders += 1;
        self.accepted_units += u64::from(quantity);
    }

    /// Marks an accepted order's record durable: its retries now get its answer.
    pub fn confirm(&mut self, order: &OrderRef) -> bool {
        match self.idem.get_mut(&(order.user.clone(), order.key.clone())) {
            Some(e) if e.answer.order_id == order.order_id => {
                e.confirmed = true;
                true
            }
            _ => false,
        }
    }

    /// Gives an order's units back to the sale and its user, once per order id whatever
    /// the number of calls. Returns whether this call released it.
    pub fn release(&mut self, order: &OrderRef) -> bool {
        if self.retired || !self.released.insert(order.order_id) {
            return false;
        }
        self.stock_left += i64::from(order.quantity);
        self.give_back_units(&order.user, order.quantity);
        self.released_units += u64::from(order.quantity);
        true
    }

    /// Undoes an acceptance whose record never reached the log, or whose decision timed
    /// out before its answer came back: as if it had never been accepted (stock, the
    /// user's units and the accepted counters go back; the sequence number stays used) and
    /// its idempotency answer is forgotten, so the buyer's retry is decided afresh.
    ///
    /// Only an order that holds the idempotency answer of its key, was never released and
    /// was not claimed by the settler is undone, so an abort of a decision that never ran
    /// (or was a refusal) gives nothing back, and an order whose record the settler already
    /// read stays.
    pub fn abort(&mut self, order: &OrderRef) -> AbortOutcome {
        if self.retired {
            return AbortOutcome::Nothing;
        }
        if self.claimed.contains(&order.order_id) {
            // The settler holds the record: the order is durable, whatever the producer said.
            return AbortOutcome::AlreadyClaimed;
        }
        let key = (order.user.clone(), order.key.clone());
        let holds = self
            .idem
            .get(&key)
            .is_some_and(|e| e.answer.order_id == order.order_id);
        if !holds {
            return AbortOutcome::Nothing;
        }
        self.idem.remove(&key);
        if !self.released.insert(order.order_id) {
            return AbortOutcome::Nothing;
        }
        self.stock_left += i64::from(order.quantity);
        self.give_back_units(&order.user, order.quantity);
        self.accepted_orders = self.accepted_orders.saturating_sub(1);
        self.accepted_units = self
            .accepted_units
            .saturating_sub(u64::from(order.quantity));
        AbortOutcome::Undone
    }

    /// The settler takes an order it read from the log: from now on an abort cannot undo
    /// it. Returns `false` if it was aborted first (the buyer got 503 and its stock went
    /// back), in which case the settler cancels it instead of charging it.
    pub fn claim(&mut self, order_id: OrderId) -> bool {
        if self.retired {
            // Retired only once every order was final: nothing is left to cancel.
            return true;
        }
        if self.claimed.contains(&order_id) {
            return true;
        }
        if self.released.contains(&order_id) {
            return false;
        }
        self.claimed.insert(order_id);
        true
    }

    /// Rebuilds the effect of an order that is durable in the log (recovery after restart).
    pub fn restore_accepted(&mut self, order: &OrderRef, fingerprint: &str, sequence: u64) {
        if self.retired {
            return;
        }
        // Durable in the log: no abort may undo it.
        self.claimed.insert(order.order_id);
        let key = (order.user.clone(), order.key.clone());
        if let Some(e) = self.idem.get_mut(&key) {
            if e.answer.order_id == order.order_id {
                // Already counted (a checkpoint taken while its confirmation was on its
                // way): only its durability is news.
                e.confirmed = true;
                self.next_sequence = self.next_sequence.max(sequence + 1);
                return;
            }
        }
        self.take(&order.user, order.quantity);
        self.next_sequence = self.next_sequence.max(sequence + 1);
        self.idem.insert(
            (order.user.clone(), order.key.clone()),
            IdemEntry {
                fingerprint: fingerprint.to_owned(),
                answer: Answer {
                    order_id: order.order_id,
                    sequence,
                    quantity: order.quantity,
                },
                confirmed: true,
            },
        );
    }

    /// Drops every token bucket that has refilled by `now_us` (equivalent to no bucket),
    /// and notes when the next one will have. Returns how many were dropped.
    pub fn prune_buckets(&mut self, now_us: i64) -> usize {
        let (rate, burst) = (self.rules.rate_per_second, self.rules.burst);
        let before = self.buckets.len();
        let mut next = i64::MAX;
        self.buckets.retain(|_, b| {
            let full_at = bucket_full_at(*b, rate, burst);
            if full_at <= now_us {
                return false;
            }
            next = next.min(full_at);
            true
        });
        self.prune_at_us = next;
        self.pruned_len = self.buckets.len();
        if self.buckets.capacity() > 4 * self.buckets.len().max(1024) {
            self.buckets.shrink_to_fit();
        }
        before - self.buckets.len()
    }

    /// Whether a periodic prune is worth it at `now_us`: a bucket has refilled and the map
    /// doubled since the last prune.
    pub fn prune_due(&self, now_us: i64) -> bool {
        !self.buckets.is_empty()
            && now_us >= self.prune_at_us
            && self.buckets.len() >= 2 * self.pruned_len
    }

    /// The sale ended and every order of it is final: drops every per-user and per-order
    /// entry (buckets, units, idempotency answers, released and claimed sets); the counters
    /// stay for stats. From now on every attempt is refused as `sale_not_active`, a retry
    /// of an accepted order included (its answer is past its retention).
    pub fn retire(&mut self) {
        self.retired = true;
        self.units = HashMap::new();
        self.buckets = HashMap::new();
        self.idem = HashMap::new();
        self.released = HashSet::new();
        self.claimed = HashSet::new();
    }

    /// Whether [`retire`](Self::retire) dropped the sale's entries.
    pub fn is_retired(&self) -> bool {
        self.retired
    }

    /// Orders accepted (replays and aborted ones not counted).
    pub fn accepted_orders(&self) -> u64 {
        self.accepted_orders
    }

    /// Entries held, per map.
    pub fn entries(&self) -> Entries {
        Entries {
            buckets: self.buckets.len(),
            units: self.units.len(),
            answers: self.idem.len(),
            released: self.released.len(),
            claimed: self.claimed.len(),
        }
    }

    /// Adds units to the sale.
    pub fn add_stock(&mut self, units: u64) {
        self.rules.stock += units;
        self.stock_left += units as i64;
    }

    /// Units a user holds.
    pub fn units_of(&self, user: &UserId) -> u32 {
        self.units.get(user).copied().unwrap_or(0)
    }

    /// Everything a backend must hold to continue from this state (reconciliation writes
    /// it to Redis).
    pub fn snapshot(&self) -> Snapshot {
        let mut units: Vec<(UserId, u32)> = self
            .units
            .iter()
            .filter(|(_, u)| **u > 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        units.sort();
        let mut answers: Vec<(UserId, String, IdemEntry)> = self
            .idem
            .iter()
            .map(|((u, k), e)| (u.clone(), k.clone(), e.clone()))
            .collect();
        answers.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut released: Vec<OrderId> = self.released.iter().copied().collect();
        released.sort();
        let mut claimed: Vec<OrderId> = self.claimed.iter().copied().collect();
        claimed.sort();
        Snapshot {
            rules: self.rules,
            counters: self.counters(),
            next_sequence: self.next_sequence,
            units,
            answers,
            released,
            claimed,
            retired: self.retired,
        }
    }

    /// What a checkpoint keeps: the effect of the orders whose records are durable (the
    /// confirmed or claimed answers) and the releases, without the token buckets (they
    /// start full, as after any restart). Any other answer is left out with its effect undone
    /// (stock, units, accepted counters; its sequence number stays used): its record is
    /// either past the checkpoint's log position, where recovery replays it, or never
    /// lands. Not sorted: the checkpoint is read back into maps.
    pub fn durable_snapshot(&self) -> Snapshot {
        let mut counters = self.counters();
        let mut units = self.units.clone();
        let mut answers = Vec::with_capacity(self.idem.len());
        for ((user, key), e) in &self.idem {
            // Claimed: the settler read its record, so it is durable even if its
            // confirmation has not landed yet (it may even be released already).
            if e.confirmed || self.claimed.contains(&e.answer.order_id) {
                let mut e = e.clone();
                e.confirmed = true;
                answers.push((user.clone(), key.clone(), e));
                continue;
            }
            let q = e.answer.quantity;
            counters.stock_left += i64::from(q);
            counters.accepted_orders = counters.accepted_orders.saturating_sub(1);
            counters.accepted_units = counters.accepted_units.saturating_sub(u64::from(q));
            if let Some(u) = units.get_mut(user) {
                *u = u.saturating_sub(q);
            }
        }
        Snapshot {
            rules: self.rules,
            counters,
            next_sequence: self.next_sequence,
            units: units.into_iter().filter(|(_, u)| *u > 0).collect(),
            answers,
            released: self.released.iter().copied().collect(),
            claimed: self.claimed.iter().copied().collect(),
            retired: self.retired,
        }
    }

    /// A sale's state as a checkpoint held it, under the catalog's current rules (stock
    /// added since the checkpoint is added to what is left).
    pub fn from_snapshot(snapshot: Snapshot, rules: SaleRules, limits: Limits) -> Self {
        let added = rules.stock as i64 - snapshot.rules.stock as i64;
        let c = snapshot.counters;
        let codes = [
            Rejection::IdempotencyConflict,
            Rejection::UnknownSale,
            Rejection::NotActive,
            Rejection::RateLimited { retry_after_s: 0 },
            Rejection::LimitExceeded,
            Rejection::SoldOut,
            Rejection::Capacity { retry_after_s: 0 },
        ]
        .map(Rejection::code);
        let rejected = c
            .rejected
            .into_iter()
            .filter_map(|(k, v)| codes.iter().find(|c| **c == k).map(|c| (*c, v)))
            .collect();
        SaleState {
            rules,
            stock_left: c.stock_left + added,
            next_sequence: snapshot.next_sequence,
            accepted_orders: c.accepted_orders,
            accepted_units: c.accepted_units,
            released_units: c.released_units,
            units: snapshot.units.into_iter().collect(),
            buckets: HashMap::new(),
            idem: snapshot
                .answers
                .into_iter()
                .map(|(u, k, e)| ((u, k), e))
                .collect(),
            released: snapshot.released.into_iter().collect(),
            claimed: snapshot.claimed.into_iter().collect(),
            rejected,
            limits,
            prune_at_us: i64::MIN,
            pruned_len: 0,
            retired: snapshot.retired,
        }
    }

    /// The order's record is durable in the log (read back by the checkpoint writer): its
    /// answer is confirmed and no abort may undo it. Unlike
    /// [`restore_accepted`](Self::restore_accepted) it never takes anything: an order this
    /// state does not hold is left alone.
    pub fn mark_durable(&mut self, order: &OrderRef) {
        if self.retired {
            return;
        }
        let key = (order.user.clone(), order.key.clone());
        if let Some(e) = self.idem.get_mut(&key) {
            if e.answer.order_id == order.order_id {
                e.confirmed = true;
                self.claimed.insert(order.order_id);
            }
        }
    }

    /// Counters for stats.
    pub fn counters(&self) -> Counters {
        let mut rejected: Vec<(String, u64)> = self
            .rejected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        rejected.sort();
        Counters {
            stock: self.rules.stock,
            stock_left: self.stock_left,
            accepted_orders: self.accepted_orders,
            accepted_units: self.accepted_units,
            released_units: self.released_units,
            rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: i64 = 1_000_000;

    fn rules(stock: u64, limit: u32) -> SaleRules {
        SaleRules {
            stock,
            per_user_limit: limit,
            rate_per_second: 5,
            burst: 10,
            starts_at_us: 0,
            ends_at_us: 1_000 * SEC,
        }
    }

    fn req(user: u8, quantity: u32, key: u8, body: u8) -> AdmitRequest {
        AdmitRequest {
            user: UserId::parse(format!("u{user}")).expect("user"),
            quantity,
            key: format!("k{key}"),
            fingerprint: format!("f{body}"),
            order_id: OrderId::new(),
        }
    }

    #[test]
    fn checks_run_in_order_and_rejections_take_nothing() {
        let mut s = SaleState::new(rules(3, 2));
        let a = req(1, 2, 1, 1);
        let Decision::Accepted(ans) = s.admit(&a, SEC) else {
            panic!("first order must be accepted")
        };
        assert_eq!(ans.sequence, 1);
        assert_eq!(s.admit(&a, SEC), Decision::InProgress);
        assert!(s.confirm(&OrderRef::from(&a)));
        assert_eq!(s.admit(&a, SEC), Decision::Replayed(ans));
        let mut conflict = a.clone();
        conflict.fingerprint = "other".into();
        assert_eq!(
            s.admit(&conflict, SEC),
            Decision::Rejected(Rejection::IdempotencyConflict)
        );
        assert_eq!(
            s.admit(&req(1, 1, 2, 1), SEC),
            Decision::Rejected(Rejection::LimitExceeded)
        );
        assert_eq!(
            s.admit(&req(2, 2, 1, 1), SEC),
            Decision::Rejected(Rejection::SoldOut)
        );
        assert_eq!(
            s.admit(&req(2, 1, 1, 1), 2_000 * SEC),
            Decision::Rejected(Rejection::NotActive)
        );
        assert_eq!(s.stock_left, 1);
        assert!(s.release(&OrderRef::from(&a)));
        assert!(
            !s.release(&OrderRef::from(&a)),
            "release happens once per order"
        );
        assert_eq!(s.stock_left, 3);
        assert_eq!(s.units_of(&a.user), 0);
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let mut s = SaleState::new(rules(1_000_000, 1000));
        let mut admitted_first_second = 0;
        // 50 requests a second for two seconds, each with a fresh key.
        let mut retry_after = None;
        for i in 0..100u32 {
            let now = SEC + i64::from(i) * SEC / 50;
            let r = AdmitRequest {
                key: format!("k{i}"),
                ..req(1, 1, 0, 0)
            };
            match s.admit(&r, now) {
                Decision::Accepted(_) if i < 50 => admitted_first_second += 1,
                Decision::Rejected(Rejection::RateLimited { retry_after_s }) => {
                    retry_after = Some(retry_after_s)
                }
                _ => {}
            }
        }
        assert!(
            (10..=15).contains(&admitted_first_second),
            "{admitted_first_second}"
        );
        assert_eq!(retry_after, Some(1));
    }

    #[test]
    fn frequent_callers_still_refill() {
        // One request every 100 us against 5/s: each call earns half a milli-token, which
        // must accumulate rather than be rounded away.
        let mut bucket = None;
        let mut admitted = 0;
        for i in 0..30_000i64 {
            let (b, took) = take_token(bucket, 5, 1, i * 100);
            bucket = Some(b);
            admitted += i32::from(took.is_ok());
        }
        // Three seconds at 5/s plus the initial token.
        assert!((15..=17).contains(&admitted), "{admitted}");
        // A long silence fills the bucket without overflow.
        let (b, took) = take_token(bucket, 1_000_000, 1_000_000, i64::MAX / 2);
        assert!(took.is_ok());
        assert_eq!(b.tokens, 1_000_000 * TOKEN - TOKEN);
    }

    #[test]
    fn abort_of_a_decision_that_took_nothing_gives_nothing_back() {
        let mut s = SaleState::new(rules(1, 1));
        let a = req(1, 1, 1, 1);
        assert!(matches!(s.admit(&a, SEC), Decision::Accepted(_)));
        let refused = req(2, 1, 1, 1);
        assert_eq!(
            s.admit(&refused, SEC),
            Decision::Rejected(Rejection::SoldOut)
        );
        assert_eq!(
            s.abort(&OrderRef::from(&refused)),
            AbortOutcome::Nothing,
            "a refusal holds no answer"
        );
        let never_sent = req(3, 1, 1, 1);
        assert_eq!(s.abort(&OrderRef::from(&never_sent)), AbortOutcome::Nothing);
        assert_eq!(s.stock_left, 0, "nothing was given back");
        assert!(s.claim(a.order_id), "the settler takes the order");
        assert_eq!(
            s.abort(&OrderRef::from(&a)),
            AbortOutcome::AlreadyClaimed,
            "a claimed order stays"
        );
        assert_eq!(s.stock_left, 0);
        assert!(s.release(&OrderRef::from(&a)));
        assert_eq!(s.abort(&OrderRef::from(&a)), AbortOutcome::AlreadyClaimed);
        assert_eq!(s.stock_left, 1);
        // Aborted first: the settler's claim fails and it cancels the order.
        let b = req(4, 1, 1, 1);
        assert!(matches!(s.admit(&b, SEC), Decision::Accepted(_)));
        assert_eq!(s.abort(&OrderRef::from(&b)), AbortOutcome::Undone);
        assert!(!s.claim(b.order_id));
    }

    #[test]
    fn abort_forgets_the_answer_so_a_retry_is_decided_again() {
        let mut s = SaleState::new(rules(1, 1));
        let a = req(1, 1, 1, 1);
        assert!(matches!(s.admit(&a, SEC), Decision::Accepted(_)));
        assert_eq!(s.abort(&OrderRef::from(&a)), AbortOutcome::Undone);
        assert_eq!(s.stock_left, 1);
        let c = s.counters();
        assert_eq!(
            (c.accepted_orders, c.accepted_units, c.released_units),
            (0, 0, 0)
        );
        let retry = AdmitRequest {
            order_id: OrderId::new(),
            ..a.clone()
        };
        assert!(matches!(s.admit(&retry, SEC), Decision::Accepted(_)));
    }

    #[test]
    fn a_checkpoint_plus_the_log_after_it_counts_every_order_once() {
        let mut s = SaleState::new(rules(10, 5));
        let done = req(1, 1, 1, 1); // durable and confirmed before the checkpoint
        let late = req(2, 1, 1, 1); // durable, claimed and released, confirmation late
        let pending = req(3, 2, 1, 1); // its record lands after the checkpoint
        let lost = req(4, 1, 1, 1); // its record never lands
        for r in [&done, &late, &pending, &lost] {
            assert!(matches!(s.admit(r, SEC), Decision::Accepted(_)));
        }
        s.confirm(&OrderRef::from(&done));
        assert!(s.claim(late.order_id));
        assert!(s.release(&OrderRef::from(&late)));
        let snapshot = s.durable_snapshot();
        let json = serde_json::to_string(&snapshot).expect("encode");
        let back: Snapshot = serde_json::from_str(&json).expect("decode");
        let mut r = SaleState::from_snapshot(back, rules(12, 5), Limits::default());
        // Recovery replays the log after the checkpoint: `late` (claimed before the
        // snapshot, so already counted) and `pending`.
        r.restore_accepted(&OrderRef::from(&late), &late.fingerprint, 2);
        r.restore_accepted(&OrderRef::from(&pending), &pending.fingerprint, 3);
        // The store's releases are replayed too; `late` was released once already.
        assert!(!r.release(&OrderRef::from(&late)));
        assert_eq!(
            r.stock_left,
            12 - 1 - 2,
            "done and pending hold units; 2 added"
        );
        assert_eq!(r.units_of(&late.user), 0);
        assert_eq!(r.units_of(&pending.user), 2);
        assert_eq!(
            r.units_of(&lost.user),
            0,
            "a record that never landed is gone"
        );
        assert_eq!(r.next_sequence, 5, "sequence numbers are never reused");
        let c = r.counters();
        assert_eq!(
            (c.accepted_orders, c.accepted_units, c.released_units),
            (3, 4, 1)
        );
        assert_eq!(
            r.admit(&done, SEC),
            Decision::Replayed(Answer {
                order_id: done.order_id,
                sequence: 1,
                quantity: 1
            })
        );
        assert!(matches!(r.admit(&lost, SEC), Decision::Accepted(_)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit {
            user: u8,
            qty: u32,
            key: u8,
            body: u8,
        },
        Confirm(usize),
        Release(usize),
        Abort(usize),
        Tick(u32),
        AddStock(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..6, 1u32..4, 0u8..4, 0u8..2).prop_map(|(user, qty, key, body)| Op::Admit { user, qty, key, body }),
            3 => (0usize..64).prop_map(Op::Confirm),
            2 => (0usize..64).prop_map(Op::Release),
            1 => (0usize..64).prop_map(Op::Abort),
            2 => (0u32..3_000_000).prop_map(Op::Tick),
            1 => (0u8..3).prop_map(Op::AddStock),
        ]
    }

    proptest! {
        #[test]
        fn accepted_never_exceeds_stock(stock in 1u64..20, limit in 1u32..5, ops in prop::collection::vec(op(), 1..200)) {
            let mut s = SaleState::new(rules(stock, limit));
            // The same sale dropping every refilled bucket after each step decides alike:
            // a full bucket is the same as none.
            let mut pruned = SaleState::new(rules(stock, limit));
            let mut now = SEC;
            let mut total_stock = stock;
            let mut accepted: Vec<AdmitRequest> = Vec::new();
            let mut released: HashSet<OrderId> = HashSet::new();
            let mut aborted: HashSet<OrderId> = HashSet::new();
            for op in ops {
                match op {
                    Op::Admit { user, qty, key, body } => {
                        let r = req(user, qty, key, body);
                        let d = s.admit(&r, now);
                        prop_assert_eq!(pruned.admit(&r, now), d);
                        pruned.prune_buckets(now);
                        if let Decision::Accepted(a) = d {
                            prop_assert_eq!(a.order_id, r.order_id);
                            accepted.push(r);
                        }
                    }
                    Op::Confirm(i) => if let Some(r) = accepted.get(i) { s.confirm(&OrderRef::from(r)); pruned.confirm(&OrderRef::from(r)); },
                    Op::Release(i) => if let Some(r) = accepted.get(i) {
                        let first = released.insert(r.order_id);
                        prop_assert_eq!(s.release(&OrderRef::from(r)), first);
                        prop_assert_eq!(pruned.release(&OrderRef::from(r)), first);
                    },
                    Op::Abort(i) => if let Some(r) = accepted.get(i) {
                        let holds = !aborted.contains(&r.order_id);
                        let outcome = s.abort(&OrderRef::from(r));
                        prop_assert_eq!(pruned.abort(&OrderRef::from(r)), outcome);
                        let undone = outcome == AbortOutcome::Undone;
                        prop_assert!(!undone || (holds && !released.contains(&r.order_id)));
                        if undone {
                            released.insert(r.order_id);
                        }
                        aborted.insert(r.order_id);
                    },
                    Op::Tick(us) => now += i64::from(us),
                    Op::AddStock(n) => { s.add_stock(u64::from(n)); pruned.add_stock(u64::from(n)); total_stock += u64::from(n); }
                }
                let held: u64 = accepted.iter().filter(|r| !released.contains(&r.order_id)).map(|r| u64::from(r.quantity)).sum();
                prop_assert!(held <= total_stock, "held {} > stock {}", held, total_stock);
                prop_assert_eq!(s.stock_left, total_stock as i64 - held as i64);
                for u in 0..6u8 {
                    let user = UserId::parse(format!("u{u}")).expect("user");
                    let by_user: u64 = accepted.iter().filter(|r| r.user == user && !released.contains(&r.order_id)).map(|r| u64::from(r.quantity)).sum();
                    prop_assert!(by_user <= u64::from(limit));
                    prop_assert_eq!(u64::from(s.units_of(&user)), by_user);
                }
            }
        }
    }
}
