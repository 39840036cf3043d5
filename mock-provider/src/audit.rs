//! The audit: what the mock saw, for tests to prove "at most one successful charge per
//! order" and "one notification per order and outcome" from the provider's side.
//!
//! [`AuditBook`] keeps exact totals over every request, and per-order detail
//! ([`OrderAudit`]) for at most `audit_cap` orders: past the cap the detail of the order
//! seen first is dropped and counted in `pruned`, so the mock's memory does not grow with
//! the orders of a long run. `GET /v1/audit` reads the detail in pages ordered by order id
//! ([`AuditPage`], `?after=<order id>&limit=<n>`), copied under the lock a page at a time and
//! serialized outside it; [`crate::fetch_audit`] follows the pages into one [`Audit`].

use serde::{Deserialize, Serialize};
use settler::NotificationKind;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

/// Page size of `GET /v1/audit` without `limit`.
pub const DEFAULT_PAGE: usize = 1_000;
/// Largest page `GET /v1/audit` answers.
pub const MAX_PAGE: usize = 10_000;

/// What the mock saw of one order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OrderAudit {
    /// Charge requests answered 200, repeats of a key included (500s are not attempts).
    pub charge_attempts: u64,
    /// Distinct charges that succeeded.
    pub successful_charges: u64,
    /// Distinct charges that were declined.
    pub declined_charges: u64,
    /// Distinct refunds.
    pub refunds: u64,
    /// Notifications delivered, one entry per distinct key, in arrival order.
    pub notifications: Vec<NotificationKind>,
    /// Notifications whose key had been delivered before.
    pub duplicate_notifications: u64,
    /// Charge requests refused with 422 (`tok_reject` tokens).
    pub refused_charges: u64,
}

/// Totals over all orders (exact, whatever the audit's cap dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditTotals {
    /// Distinct charges created.
    pub charges: u64,
    /// Distinct charges that succeeded.
    pub successful_charges: u64,
    /// Distinct charges that were declined.
    pub declined_charges: u64,
    /// Requests answered 500 by error injection.
    pub errors: u64,
    /// Requests that hung (`timeout_rate`) and recorded nothing.
    pub timeouts: u64,
    /// Requests recorded whose answer was lost (`lost_answer_rate`).
    pub lost_answers: u64,
    /// Requests answered 503 because the mock was `down`.
    pub unavailable: u64,
    /// Charges refused with 422 (`tok_reject` tokens); nothing recorded.
    pub refused: u64,
    /// Distinct refunds.
    pub refunds: u64,
    /// Distinct notifications delivered.
    pub notifications: u64,
}

/// Everything the mock saw, as [`crate::fetch_audit`] assembles it from the pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// Per order, by order id (at most `audit_cap` orders).
    pub orders: BTreeMap<String, OrderAudit>,
    /// Over all orders.
    pub totals: AuditTotals,
    /// Orders whose detail was dropped at the cap (their requests stay in `totals`). While
    /// it is 0, an order missing from `orders` was never seen.
    #[serde(default)]
    pub pruned: u64,
}

/// One page of `GET /v1/audit`: the detail of the orders after the cursor, in order id
/// order, with the totals as they are now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    /// This page's orders, the totals and the count pruned.
    #[serde(flatten)]
    pub audit: Audit,
    /// The cursor of the next page (`?after=`), `None` on the last.
    pub next: Option<String>,
}

/// The audit as the mock keeps it: exact totals, per-order detail bounded by a cap.
#[derive(Debug)]
pub struct AuditBook {
    orders: BTreeMap<String, OrderAudit>,
    /// Order ids in the order first seen: who is dropped first at the cap.
    arrival: VecDeque<String>,
    /// Over all orders.
    pub totals: AuditTotals,
    pruned: u64,
    cap: usize,
}

impl AuditBook {
    /// An empty audit keeping detail of at most `cap` orders (at least 1).
    pub fn new(cap: usize) -> Self {
        AuditBook {
            orders: BTreeMap::new(),
            arrival: VecDeque::new(),
            totals: AuditTotals::default(),
            pruned: 0,
            cap: cap.max(1),
        }
    }

    /// The detail of `order_id`, created (dropping the oldest past the cap) if new.
    pub fn order(&mut self, order_id: &str) -> &mut OrderAudit {
        if !self.orders.contains_key(order_id) {
            self.prune_to(self.cap - 1);
            self.arrival.push_back(order_id.to_owned());
        }
        self.orders.entry(order_id.to_owned()).or_default()
    }

    /// Changes the cap, dropping the excess at once.
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        self.prune_to(self.cap);
    }

    fn prune_to(&mut self, keep: usize) {
        while self.orders.len() > keep {
            let Some(oldest) = self.arrival.pop_front() else {
                break;
            };
            if self.orders.remove(&oldest).is_some() {
                self.pruned += 1;
            }
        }
    }

    /// A copy of one order's detail.
    pub fn get(&self, order_id: &str) -> Option<OrderAudit> {
        self.orders.get(order_id).cloned()
    }

    /// Orders with detail now.
    pub fn len(&self) -> usize {
        self.orders.len()
    }

    /// Whether no order has detail now.
    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    /// A copy of at most `limit` (1 to [`MAX_PAGE`]) orders after `after`, with the totals.
    pub fn page(&self, after: Option<&str>, limit: usize) -> AuditPage {
        let limit = limit.clamp(1, MAX_PAGE);
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut rest = self.orders.range::<str, _>((from, Bound::Unbounded));
        let orders: BTreeMap<String, OrderAudit> = rest
            .by_ref()
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let next = match rest.next() {
            Some(_) => orders.keys().next_back().cloned(),
            None => None,
        };
        AuditPage {
            audit: Audit {
                orders,
                totals: self.totals.clone(),
                pruned: self.pruned,
            },
            next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_stays_within_the_cap_and_totals_stay_exact() {
        let mut book = AuditBook::new(3);
        for i in 0..10 {
            book.order(&format!("o-{i}")).successful_charges += 1;
            book.totals.successful_charges += 1;
            assert!(book.len() <= 3);
        }
        // Touching a kept order does not drop anything.
        book.order("o-9").refunds += 1;
        let page = book.page(None, MAX_PAGE);
        assert_eq!(
            page.audit.orders.keys().collect::<Vec<_>>(),
            ["o-7", "o-8", "o-9"]
        );
        assert_eq!(page.audit.pruned, 7);
        assert_eq!(page.audit.totals.successful_charges, 10);
        assert_eq!(page.next, None);
        book.set_cap(1);
        assert_eq!(book.len(), 1);
        assert!(book.get("o-9").is_some());
        assert_eq!(book.page(None, 10).audit.pruned, 9);
    }

    #[test]
    fn pages_follow_the_cursor_to_the_end() {
        let mut book = AuditBook::new(100);
        for i in 0..25 {
            book.order(&format!("o-{i:02}")).charge_attempts = i;
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = book.page(after.as_deref(), 10);
            assert!(page.audit.orders.len() <= 10);
            seen.extend(page.audit.orders.into_keys());
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let want: Vec<String> = (0..25).map(|i| format!("o-{i:02}")).collect();
        assert_eq!(seen, want);
        // Exactly a page's worth left: no empty page after it.
        assert_eq!(book.page(Some("o-14"), 10).next, None);
    }
}
