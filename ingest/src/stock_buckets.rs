//! Stock buckets: the rules of a sale whose admission state is split over `n` independent
//! counters (on Redis, each its own hash tag and so its own Cluster slot), with no I/O.
//!
//! - **A buyer lives in one bucket**: [`home_bucket`] (FNV-1a of the user id, mod `n`).
//!   The buyer's token bucket, units held and idempotency answers are kept there, so the
//!   per-user limit, the rate limit and a retry's answer are decided by one atomic call, as
//!   for a sale of one bucket.
//! - **Stock is split** evenly at creation and on additions ([`split`]; the first buckets
//!   take the remainder).
//! - **A bucket that runs short borrows**: when the home bucket lacks the units of an
//!   attempt that passed every other check, it answers short (nothing counted), the caller
//!   reads the other buckets' units once and borrows from the richest first
//!   ([`donors`]), each lending [`lend_amount`] (at least what is missing, up to half of
//!   what it holds, never more than it has), until the home bucket has enough or no bucket
//!   has anything; then the home bucket decides again (without taking a second token). So
//!   no unit is stranded in a cold bucket while a hot one sells out, and `sold_out` is
//!   answered only when the units of every bucket together are short.
//! - **Sequences stay unique per sale**: bucket `b` numbers its orders `1, 2, ...` and the
//!   order's sequence is [`global_sequence`] (`(local - 1) * n + b + 1`).
//!
//! [`BucketedSale`] is the reference the Redis backend is tested against
//! (`ingest/tests/model.rs`); the embedded backend, one process with no slots, keeps one
//! counter whatever the sale's buckets.

use crate::model::{
    AbortOutcome, AdmitRequest, Answer, BucketAnswer, BucketAsk, Counters, Decision, OrderRef,
    Rejection, SaleRules, SaleState, Snapshot,
};
use std::collections::HashMap;
use storage::{OrderId, UserId};

/// The bucket of `user` in a sale of `buckets` buckets.
pub fn home_bucket(user: &UserId, buckets: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let hash = user
        .as_str()
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % u64::from(buckets.max(1))) as u32
}

/// `total` units split over `buckets` buckets: equal shares, the remainder one unit each
/// to the first buckets.
pub fn split(total: u64, buckets: u32) -> Vec<u64> {
    let n = u64::from(buckets.max(1));
    (0..n)
        .map(|b| total / n + u64::from(b < total % n))
        .collect()
}

/// The sale-wide sequence of bucket `bucket`'s `local`-th order (`local` from 1).
pub fn global_sequence(local: u64, bucket: u32, buckets: u32) -> u64 {
    (local.max(1) - 1) * u64::from(buckets.max(1)) + u64::from(bucket) + 1
}

/// The bucket-local number of a sale-wide sequence issued by `bucket`.
pub fn local_sequence(global: u64, bucket: u32, buckets: u32) -> u64 {
    global.saturating_sub(u64::from(bucket) + 1) / u64::from(buckets.max(1)) + 1
}

/// What a donor holding `left` units lends to a bucket missing `want`: at least `want`, up
/// to half of what it holds (so a hot bucket does not come back for every order), never
/// more than it has.
pub fn lend_amount(left: i64, want: i64) -> i64 {
    if left <= 0 {
        return 0;
    }
    want.max((left + 1) / 2).min(left)
}

/// The buckets to borrow from, in order: every bucket but `home` holding units, the
/// richest first (ties: the lower index). `left[b]` is bucket `b`'s units as read once.
pub fn donors(left: &[i64], home: u32) -> Vec<u32> {
    let mut d: Vec<u32> = (0..left.len() as u32)
        .filter(|&b| b != home && left[b as usize] > 0)
        .collect();
    d.sort_by_key(|&b| (std::cmp::Reverse(left[b as usize]), b));
    d
}

/// A bucketed sale, in memory: the model of the Redis backend's stock buckets.
#[derive(Debug, Clone)]
pub struct BucketedSale {
    buckets: Vec<SaleState>,
}

impl BucketedSale {
    /// A sale of `rules` over `n` buckets, its stock split.
    pub fn new(rules: SaleRules, n: u32) -> Self {
        let buckets = split(rules.stock, n)
            .into_iter()
            .map(|stock| SaleState::new(SaleRules { stock, ..rules }))
            .collect();
        BucketedSale { buckets }
    }

    fn n(&self) -> u32 {
        self.buckets.len() as u32
    }

    fn home(&self, user: &UserId) -> usize {
        home_bucket(user, self.n()) as usize
    }

    /// Decides one attempt at `now_us` (see the module doc).
    pub fn admit(&mut self, req: &AdmitRequest, now_us: i64) -> Decision {
        let n = self.n();
        let b = self.home(&req.user);
        let decided = match self.buckets[b].admit_in_bucket(req, now_us, Some(BucketAsk::First)) {
            BucketAnswer::Decided(d) => d,
            BucketAnswer::Short { left } => {
                self.borrow(b, left, i64::from(req.quantity));
                match self.buckets[b].admit_in_bucket(req, now_us, Some(BucketAsk::Retry)) {
                    BucketAnswer::Decided(d) => d,
                    BucketAnswer::Short { .. } => Decision::Rejected(Rejection::SoldOut),
                }
            }
        };
        let global = |a: Answer| Answer {
            sequence: global_sequence(a.sequence, b as u32, n),
            ..a
        };
        match decided {
            Decision::Accepted(a) => Decision::Accepted(global(a)),
            Decision::Replayed(a) => Decision::Replayed(global(a)),
            other => other,
        }
    }

    /// Moves units into bucket `home` (holding `left`) from the others until it holds
    /// `want` or none has any; returns the units moved.
    fn borrow(&mut self, home: usize, left: i64, want: i64) -> i64 {
        let lefts: Vec<i64> = self.buckets.iter().map(|s| s.stock_left).collect();
        let mut have = left;
        let mut moved = 0;
        for d in donors(&lefts, home as u32) {
            if have >= want {
                break;
            }
            let take = lend_amount(self.buckets[d as usize].stock_left, want - have);
            self.buckets[d as usize].stock_left -= take;
            self.buckets[home].stock_left += take;
            have += take;
            moved += take;
        }
        moved
    }

    /// [`SaleState::confirm`] in the order's bucket.
    pub fn confirm(&mut self, order: &OrderRef) -> bool {
        let b = self.home(&order.user);
        self.buckets[b].confirm(order)
    }

    /// [`SaleState::release`] in the order's bucket.
    pub fn release(&mut self, order: &OrderRef) -> bool {
        let b = self.home(&order.user);
        self.buckets[b].release(order)
    }

    /// [`SaleState::abort`] in the order's bucket.
    pub fn abort(&mut self, order: &OrderRef) -> AbortOutcome {
        let b = self.home(&order.user);
        self.buckets[b].abort(order)
    }

    /// [`SaleState::claim`] in the order's bucket.
    pub fn claim(&mut self, user: &UserId, order_id: OrderId) -> bool {
        let b = self.home(user);
        self.buckets[b].claim(order_id)
    }

    /// Adds units, split over the buckets.
    pub fn add_stock(&mut self, units: u64) {
        let n = self.n();
        for (s, add) in self.buckets.iter_mut().zip(split(units, n)) {
            s.add_stock(add);
        }
    }

    /// Units a user holds.
    pub fn units_of(&self, user: &UserId) -> u32 {
        self.buckets[self.home(user)].units_of(user)
    }

    /// Each bucket's units left.
    pub fn lefts(&self) -> Vec<i64> {
        self.buckets.iter().map(|s| s.stock_left).collect()
    }

    /// The sale's counters: the buckets' added up.
    pub fn counters(&self) -> Counters {
        sum_counters(self.buckets.iter().map(SaleState::counters))
    }
}

/// A whole sale's state (as reconcile rebuilds it from the order store) split over `n`
/// buckets: each buyer's units and answers (sequences made bucket-local) in their bucket,
/// each released or claimed order in its buyer's bucket, the accepted and released counters
/// of each bucket's orders, and the units left spread evenly ([`split`]); each bucket's
/// stock is then what keeps it conserved (`stock = left + accepted - released`), so the
/// buckets' stocks add up to the sale's.
pub fn split_snapshot(whole: &Snapshot, n: u32) -> Vec<Snapshot> {
    let n = n.max(1);
    let owner: HashMap<OrderId, (&UserId, u32)> = whole
        .answers
        .iter()
        .map(|(u, _, e)| (e.answer.order_id, (u, e.answer.quantity)))
        .collect();
    let bucket_of_order =
        |id: &OrderId| owner.get(id).map_or(0, |(u, _)| home_bucket(u, n) as usize);
    let mut parts: Vec<Snapshot> = (0..n)
        .map(|_| Snapshot {
            rules: whole.rules,
            counters: Counters::default(),
            next_sequence: 1,
            units: Vec::new(),
            answers: Vec::new(),
            released: Vec::new(),
            claimed: Vec::new(),
            retired: whole.retired,
        })
        .collect();
    for (user, units) in &whole.units {
        parts[home_bucket(user, n) as usize]
            .units
            .push((user.clone(), *units));
    }
    for (user, key, entry) in &whole.answers {
        let b = home_bucket(user, n);
        let part = &mut parts[b as usize];
        let mut entry = entry.clone();
        entry.answer.sequence = local_sequence(entry.answer.sequence, b, n);
        part.next_sequence = part.next_sequence.max(entry.answer.sequence + 1);
        part.counters.accepted_orders += 1;
        part.counters.accepted_units += u64::from(entry.answer.quantity);
        part.answers.push((user.clone(), key.clone(), entry));
    }
    for id in &whole.released {
        let part = &mut parts[bucket_of_order(id)];
        part.released.push(*id);
        part.counters.released_units += owner.get(id).map_or(0, |(_, q)| u64::from(*q));
    }
    for id in &whole.claimed {
        parts[bucket_of_order(id)].claimed.push(*id);
    }
    let left = split(whole.counters.stock_left.max(0) as u64, n);
    for (part, left) in parts.iter_mut().zip(left) {
        let c = &mut part.counters;
        c.stock_left = left as i64;
        c.stock = (left + c.accepted_units).saturating_sub(c.released_units);
        part.rules.stock = c.stock;
    }
    parts
}

/// Counters of buckets added up into the sale's.
pub fn sum_counters(parts: impl IntoIterator<Item = Counters>) -> Counters {
    let mut total = Counters::default();
    let mut rejected = std::collections::BTreeMap::<String, u64>::new();
    for c in parts {
        total.stock += c.stock;
        total.stock_left += c.stock_left;
        total.accepted_orders += c.accepted_orders;
        total.accepted_units += c.accepted_units;
        total.released_units += c.released_units;
        for (code, n) in c.rejected {
            *rejected.entry(code).or_default() += n;
        }
    }
    total.rejected = rejected.into_iter().collect();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(i: u32) -> UserId {
        UserId::parse(format!("u{i}")).expect("user")
    }

    #[test]
    fn stock_splits_evenly_and_sums_to_the_whole() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split(7, 1), vec![7]);
        for (total, n) in [(0, 5), (99, 7), (100_000_000, 64)] {
            assert_eq!(split(total, n).iter().sum::<u64>(), total);
        }
    }

    #[test]
    fn sequences_of_different_buckets_never_collide_and_map_back() {
        let n = 5;
        let mut seen = std::collections::HashSet::new();
        for b in 0..n {
            for local in 1..50 {
                let g = global_sequence(local, b, n);
                assert!(seen.insert(g), "sequence {g} issued twice");
                assert_eq!(local_sequence(g, b, n), local);
            }
        }
        assert_eq!(
            global_sequence(7, 0, 1),
            7,
            "one bucket: the sequence as is"
        );
    }

    #[test]
    fn buyers_spread_over_every_bucket() {
        let mut per = [0u32; 8];
        for u in 0..8_000 {
            per[home_bucket(&user(u), 8) as usize] += 1;
        }
        assert!(per.iter().all(|&c| (800..1200).contains(&c)), "{per:?}");
        assert_eq!(home_bucket(&user(3), 1), 0);
    }

    #[test]
    fn a_lender_gives_what_is_missing_up_to_half_and_never_more_than_it_has() {
        assert_eq!(lend_amount(10, 1), 5);
        assert_eq!(lend_amount(10, 7), 7);
        assert_eq!(lend_amount(3, 5), 3);
        assert_eq!(lend_amount(0, 1), 0);
        assert_eq!(lend_amount(-2, 1), 0);
        assert_eq!(donors(&[5, 0, 9, 9], 3), vec![2, 0]);
    }

    fn rules(stock: u64, limit: u32) -> SaleRules {
        SaleRules {
            stock,
            per_user_limit: limit,
            rate_per_second: 1000,
            burst: 1000,
            starts_at_us: 0,
            ends_at_us: i64::MAX,
        }
    }

    fn req(u: u32, key: &str, quantity: u32) -> AdmitRequest {
        AdmitRequest {
            user: user(u),
            quantity,
            key: key.into(),
            fingerprint: "f".into(),
            order_id: OrderId::new(),
        }
    }

    #[test]
    fn a_whole_state_splits_into_buckets_that_add_up_to_it() {
        let mut whole = SaleState::new(rules(50, 3));
        let mut accepted = Vec::new();
        for u in 0..30 {
            let r = req(u, "k", 1 + u % 3);
            if let Decision::Accepted(a) = whole.admit(&r, 1) {
                accepted.push((r, a));
            }
        }
        for (r, _) in accepted.iter().take(5) {
            let o = OrderRef::from(r);
            assert!(whole.claim(o.order_id));
            assert!(whole.release(&o));
        }
        let snap = whole.snapshot();
        let parts = split_snapshot(&snap, 4);
        assert_eq!(parts.len(), 4);
        let total = sum_counters(parts.iter().map(|p| p.counters.clone()));
        let w = &snap.counters;
        assert_eq!(
            (total.stock, total.stock_left, total.accepted_orders),
            (w.stock, w.stock_left, w.accepted_orders)
        );
        assert_eq!(
            (total.accepted_units, total.released_units),
            (w.accepted_units, w.released_units)
        );
        for (b, p) in parts.iter().enumerate() {
            let c = &p.counters;
            assert_eq!(
                c.stock as i64,
                c.stock_left + c.accepted_units as i64 - c.released_units as i64,
                "bucket {b} conserves its units"
            );
            for (u, _, e) in &p.answers {
                assert_eq!(
                    home_bucket(u, 4) as usize,
                    b,
                    "each answer in its buyer's bucket"
                );
                assert!(p.next_sequence > e.answer.sequence);
            }
            for (u, _) in &p.units {
                assert_eq!(home_bucket(u, 4) as usize, b);
            }
        }
        let answers: usize = parts.iter().map(|p| p.answers.len()).sum();
        assert_eq!(answers, snap.answers.len());
        let released: usize = parts.iter().map(|p| p.released.len()).sum();
        assert_eq!(released, 5);
    }

    #[test]
    fn one_hot_bucket_sells_the_whole_stock_and_only_then_sold_out() {
        // Every buyer of the first 40 that lives in bucket 0 of 4: they alone buy it all.
        let mut sale = BucketedSale::new(rules(12, 100), 4);
        let hot: Vec<u32> = (0..400)
            .filter(|&u| home_bucket(&user(u), 4) == 0)
            .collect();
        let mut sold = 0;
        let mut seqs = std::collections::HashSet::new();
        for (i, &u) in hot.iter().enumerate() {
            match sale.admit(&req(u, &format!("k{i}"), 1), 1) {
                Decision::Accepted(a) => {
                    sold += 1;
                    assert!(seqs.insert(a.sequence));
                }
                Decision::Rejected(Rejection::SoldOut) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(sold, 12, "no unit stranded in the cold buckets");
        assert_eq!(sale.lefts(), vec![0, 0, 0, 0]);
        let c = sale.counters();
        assert_eq!((c.stock, c.stock_left, c.accepted_units), (12, 0, 12));
        assert_eq!(c.rejected, vec![("sold_out".to_owned(), 1)]);
    }

    #[test]
    fn an_order_for_more_than_any_bucket_holds_gathers_from_several() {
        let mut sale = BucketedSale::new(rules(4, 4), 4);
        let a = sale.admit(&req(1, "k", 4), 1);
        assert!(matches!(a, Decision::Accepted(_)), "{a:?}");
        assert_eq!(sale.counters().stock_left, 0);
        // A retry gets the same answer, from the buyer's bucket.
        let again = sale.admit(&req(1, "k", 4), 1);
        assert!(matches!(again, Decision::InProgress), "{again:?}");
    }

    #[test]
    fn a_released_unit_goes_back_to_the_buyers_bucket_and_sells_again() {
        let mut sale = BucketedSale::new(rules(2, 1), 2);
        let mut accepted = Vec::new();
        for u in 0..10 {
            let r = req(u, "k", 1);
            if let Decision::Accepted(_) = sale.admit(&r, 1) {
                accepted.push(r);
            }
        }
        assert_eq!(accepted.len(), 2);
        let first = OrderRef::from(&accepted[0]);
        assert!(sale.claim(&first.user, first.order_id));
        assert!(sale.release(&first));
        assert!(!sale.release(&first), "once");
        assert_eq!(sale.counters().stock_left, 1);
        let late = (10..40)
            .map(|u| sale.admit(&req(u, "k", 1), 1))
            .filter(|d| matches!(d, Decision::Accepted(_)))
            .count();
        assert_eq!(late, 1);
    }
}
