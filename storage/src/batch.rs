//! The planning of [`OrderStore::apply_batch`](crate::OrderStore::apply_batch), shared by
//! every backend so they cannot disagree on what a batch does.
//!
//! A backend locks and reads the rows a batch touches ([`Current`]: status, whether it is
//! released, whether it is notified), calls [`plan`], and writes what the plan says: one
//! update per changed order carrying its final values ([`RowUpdate`]), and the history
//! (outbox) rows of the applied status changes ([`HistoryRow`]), in batch order. The plan
//! folds the changes in order, each seeing the earlier ones of the batch, and skips (never
//! fails) a change whose precondition does not hold:
//!
//! - `Status { from, to }`: the order is in `from` and [`transition`]`(from, to)` allows the
//!   move; the charge id, when given, is recorded (the last one given wins), as
//!   `coalesce(new, stored)`.
//! - `Released`: the order is in a status that releases stock (`payment_failed`,
//!   `expired`) and is not released yet.
//! - `Notified`: the order is not notified yet.
//!
//! A change about an order the store does not hold is skipped.
//!
//! # Sale totals
//!
//! Each database keeps a `sale_totals` table: orders and units per sale and status, and how
//! many of them were released, so that `sale_totals` reads a few rows instead of every
//! order of the sale. Every write of orders updates it in the same transaction: the
//! backends collect the changes as [`TotalsDelta`]s ([`persisted`] for new orders,
//! [`totals_of_plan`] for a batch) and write them last, one upsert per (sale, status), in
//! the sorted order of [`Deltas`], so two transactions lock those rows in the same order
//! and cannot deadlock on them.

use crate::{transition, Change, DocumentKind, OrderId, OrderStatus, RefundState};
use std::collections::{BTreeMap, HashMap};

/// What the store holds of an order, as far as a batch's preconditions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Current {
    /// Its status.
    pub status: OrderStatus,
    /// `released_at IS NOT NULL`.
    pub released: bool,
    /// `notified_at IS NOT NULL`.
    pub notified: bool,
    /// `refund_state`.
    pub refund: Option<RefundState>,
    /// `failed_attempts`.
    pub failed_attempts: u32,
    /// `receipt_key IS NOT NULL`.
    pub receipt: bool,
    /// `refund_note_key IS NOT NULL`.
    pub refund_note: bool,
}

/// The final values of one order changed by a batch. `None` keeps the stored value (the
/// backends write `coalesce(new, stored)`), so one statement updates every changed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowUpdate {
    /// The order.
    pub id: OrderId,
    /// Its status after the batch.
    pub status: OrderStatus,
    /// `now` if its status changed (the instant `pending_since` compares).
    pub updated_at: Option<i64>,
    /// The charge id of the last applied status change that carried one.
    pub charge_id: Option<String>,
    /// `now` if the batch released it.
    pub released_at: Option<i64>,
    /// `now` if the batch marked it notified.
    pub notified_at: Option<i64>,
    /// Its refund state, if the batch changed it.
    pub refund: Option<RefundState>,
    /// Its failed attempts, if the batch deferred it.
    pub failed_attempts: Option<i64>,
    /// Its `retry_after` (milliseconds), if the batch deferred it.
    pub retry_after: Option<i64>,
    /// Its receipt's object key, if the batch recorded one.
    pub receipt_key: Option<String>,
    /// Its refund note's object key, if the batch recorded one.
    pub refund_note_key: Option<String>,
}

impl RowUpdate {
    /// The stored name of the refund state written, if any.
    pub fn refund_str(&self) -> Option<&'static str> {
        self.refund.map(RefundState::as_str)
    }
}

/// One history (outbox) row: the order entered `status` at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HistoryRow {
    /// The order.
    pub id: OrderId,
    /// The status entered.
    pub status: OrderStatus,
    /// When (milliseconds).
    pub at: i64,
}

/// What a batch does.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Per change, in input order: whether it applies.
    pub applied: Vec<bool>,
    /// One entry per order that at least one change applies to, in the order of each
    /// order's first applied change.
    pub updates: Vec<RowUpdate>,
    /// One row per applied status change, in batch order.
    pub history: Vec<HistoryRow>,
}

/// A change of one sale's totals in one status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TotalsDelta {
    /// Orders.
    pub orders: i64,
    /// Units.
    pub units: i64,
    /// Orders released.
    pub released_orders: i64,
    /// Units released.
    pub released_units: i64,
}

impl TotalsDelta {
    fn is_zero(&self) -> bool {
        *self == TotalsDelta::default()
    }
}

/// Totals changes by (sale id, status name), sorted: the order backends write them in.
pub(crate) type Deltas = BTreeMap<(String, &'static str), TotalsDelta>;

/// Adds (`sign` = 1) or removes (`sign` = -1) one order of `quantity` units in `status`.
fn count(
    deltas: &mut Deltas,
    sale: &str,
    status: OrderStatus,
    quantity: u32,
    released: bool,
    sign: i64,
) {
    let d = deltas
        .entry((sale.to_owned(), status.as_str()))
        .or_default();
    let units = i64::from(quantity) * sign;
    d.orders += sign;
    d.units += units;
    if released {
        d.released_orders += sign;
        d.released_units += units;
    }
}

/// Counts a new order (status `persisted`, not released).
pub(crate) fn persisted(deltas: &mut Deltas, sale: &str, quantity: u32) {
    count(deltas, sale, OrderStatus::Persisted, quantity, false, 1);
}

/// The totals changes of a planned batch: each updated order leaves its stored status
/// (and release state) and enters its final one. `orders` holds the sale id and the
/// quantity of every order in `current`.
pub(crate) fn totals_of_plan(
    plan: &Plan,
    current: &HashMap<OrderId, Current>,
    orders: &HashMap<OrderId, (String, u32)>,
) -> Deltas {
    let mut deltas = Deltas::new();
    for u in &plan.updates {
        let (Some(cur), Some((sale, quantity))) = (current.get(&u.id), orders.get(&u.id)) else {
            continue;
        };
        let released = cur.released || u.released_at.is_some();
        if (cur.status, cur.released) == (u.status, released) {
            continue;
        }
        count(&mut deltas, sale, cur.status, *quantity, cur.released, -1);
        count(&mut deltas, sale, u.status, *quantity, released, 1);
    }
    deltas.retain(|_, d| !d.is_zero());
    deltas
}

/// Refuses a batch carrying a document key that is empty or longer than
/// [`MAX_DOCUMENT_KEY`](crate::MAX_DOCUMENT_KEY), before it writes anything.
pub(crate) fn check_document_keys(changes: &[Change]) -> crate::Result<()> {
    let bad = changes.iter().any(|c| {
        matches!(c, Change::Document { key, .. } if key.is_empty() || key.len() > crate::MAX_DOCUMENT_KEY)
    });
    if bad {
        return Err(crate::Error::Invalid(crate::InvalidValue {
            field: "document_key",
            reason: "must be 1 to 512 bytes",
        }));
    }
    Ok(())
}

/// The distinct orders of a batch, in order of first appearance (what a backend reads).
pub(crate) fn touched<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Vec<OrderId> {
    let mut seen = std::collections::HashSet::new();
    changes
        .into_iter()
        .map(Change::order_id)
        .filter(|id| seen.insert(*id))
        .collect()
}

/// Folds `changes` over the stored rows `current` (orders absent from it are unknown) at
/// instant `now` (milliseconds).
pub(crate) fn plan<'a>(
    changes: impl IntoIterator<Item = &'a Change>,
    current: &HashMap<OrderId, Current>,
    now: i64,
) -> Plan {
    let mut plan = Plan::default();
    // The working state of each order touched so far, and its index in `plan.updates`.
    let mut state: HashMap<OrderId, (Current, Option<usize>)> = HashMap::new();
    for change in changes {
        let id = change.order_id();
        let Some((cur, slot)) = (match state.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => Some(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                current.get(&id).map(|c| e.insert((*c, None)))
            }
        }) else {
            plan.applied.push(false);
            continue;
        };
        let applies = match change {
            Change::Status { from, to, .. } => {
                cur.status == *from && transition(*from, *to).is_ok()
            }
            Change::Released(_) => cur.status.releases_stock() && !cur.released,
            Change::Notified(_) => !cur.notified,
            Change::Refund {
                state: RefundState::Owed,
                charge_id,
                ..
            } => cur.status.releases_stock() && cur.refund.is_none() && charge_id.is_some(),
            Change::Refund { .. } => cur.refund == Some(RefundState::Owed),
            Change::Deferred { .. } => !cur.status.is_final(),
            Change::Document {
                kind: DocumentKind::Receipt,
                ..
            } => cur.status == OrderStatus::Paid && !cur.receipt,
            Change::Document {
                kind: DocumentKind::RefundNote,
                ..
            } => cur.refund == Some(RefundState::Refunded) && !cur.refund_note,
        };
        plan.applied.push(applies);
        if !applies {
            continue;
        }
        let index = *slot.get_or_insert_with(|| {
            plan.updates.push(RowUpdate {
                id,
                status: cur.status,
                updated_at: None,
                charge_id: None,
                released_at: None,
                notified_at: None,
                refund: None,
                failed_attempts: None,
                retry_after: None,
                receipt_key: None,
                refund_note_key: None,
            });
            plan.updates.len() - 1
        });
        let update = &mut plan.updates[index];
        match change {
            Change::Status { to, charge_id, .. } => {
                cur.status = *to;
                update.status = *to;
                update.updated_at = Some(now);
                if charge_id.is_some() {
                    update.charge_id.clone_from(charge_id);
                }
                plan.history.push(HistoryRow {
                    id,
                    status: *to,
                    at: now,
                });
            }
            Change::Released(_) => {
                cur.released = true;
                update.released_at = Some(now);
            }
            Change::Notified(_) => {
                cur.notified = true;
                update.notified_at = Some(now);
            }
            Change::Refund {
                state, charge_id, ..
            } => {
                cur.refund = Some(*state);
                update.refund = Some(*state);
                if *state == RefundState::Owed {
                    update.charge_id.clone_from(charge_id);
                }
            }
            Change::Deferred { retry_after, .. } => {
                cur.failed_attempts = cur.failed_attempts.saturating_add(1);
                update.failed_attempts = Some(i64::from(cur.failed_attempts));
                update.retry_after = Some(retry_after.millis());
            }
            Change::Document { kind, key, .. } => match kind {
                DocumentKind::Receipt => {
                    cur.receipt = true;
                    update.receipt_key = Some(key.clone());
                }
                DocumentKind::RefundNote => {
                    cur.refund_note = true;
                    update.refund_note_key = Some(key.clone());
                }
            },
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    fn status(id: OrderId, from: OrderStatus, to: OrderStatus, charge: Option<&str>) -> Change {
        Change::Status {
            id,
            from,
            to,
            charge_id: charge.map(str::to_owned),
        }
    }

    fn row(status: OrderStatus) -> Current {
        Current {
            status,
            released: false,
            notified: false,
            refund: None,
            failed_attempts: 0,
            receipt: false,
            refund_note: false,
        }
    }

    #[test]
    fn an_order_moved_several_times_is_one_update() {
        let a = OrderId::new();
        let changes = vec![
            status(a, Persisted, PaymentPending, None),
            status(a, PaymentPending, Paid, Some("ch_1")),
            Change::Notified(a),
            Change::Notified(a),
            Change::Released(a),
        ];
        let current = HashMap::from([(a, row(Persisted))]);
        let plan = plan(&changes, &current, 7);
        assert_eq!(plan.applied, vec![true, true, true, false, false]);
        assert_eq!(
            plan.updates,
            vec![RowUpdate {
                id: a,
                status: Paid,
                updated_at: Some(7),
                charge_id: Some("ch_1".into()),
                released_at: None,
                notified_at: Some(7),
                refund: None,
                failed_attempts: None,
                retry_after: None,
                receipt_key: None,
                refund_note_key: None,
            }]
        );
        assert_eq!(
            plan.history,
            vec![
                HistoryRow {
                    id: a,
                    status: PaymentPending,
                    at: 7
                },
                HistoryRow {
                    id: a,
                    status: Paid,
                    at: 7
                },
            ]
        );
    }

    #[test]
    fn preconditions_and_illegal_moves_skip() {
        let (a, b, c, unknown) = (
            OrderId::new(),
            OrderId::new(),
            OrderId::new(),
            OrderId::new(),
        );
        let current = HashMap::from([
            (a, row(Persisted)),
            (
                b,
                Current {
                    released: true,
                    ..row(Expired)
                },
            ),
            (c, row(PaymentFailed)),
        ]);
        let changes = vec![
            status(a, PaymentPending, Paid, None), // a is persisted
            status(a, Persisted, Paid, None),      // illegal
            status(a, Accepted, Persisted, None),  // wrong from
            Change::Released(a),                   // not final
            Change::Released(b),                   // already released
            Change::Notified(b),                   // applies
            status(unknown, Persisted, PaymentPending, None),
            Change::Notified(unknown),
            Change::Released(c),                     // applies
            status(c, PaymentFailed, Expired, None), // final
        ];
        let plan = plan(&changes, &current, 1);
        assert_eq!(
            plan.applied,
            vec![false, false, false, false, false, true, false, false, true, false]
        );
        assert!(plan.history.is_empty());
        let ids: Vec<_> = plan.updates.iter().map(|u| u.id).collect();
        assert_eq!(ids, vec![b, c]);
        assert_eq!(plan.updates[0].status, Expired);
        assert_eq!(plan.updates[0].updated_at, None);
        assert_eq!(plan.updates[1].released_at, Some(1));
        assert_eq!(touched(&changes), vec![a, b, unknown, c]);
    }

    #[test]
    fn a_refund_is_owed_once_then_settled_once_and_a_deferral_counts_attempts() {
        let (void, paid, open) = (OrderId::new(), OrderId::new(), OrderId::new());
        let current = HashMap::from([
            (void, row(Expired)),
            (paid, row(Paid)),
            (open, row(PaymentPending)),
        ]);
        let refund = |id, state, charge: Option<&str>| Change::Refund {
            id,
            state,
            charge_id: charge.map(str::to_owned),
        };
        let later = crate::Timestamp(500);
        let changes = vec![
            refund(void, RefundState::Refunded, None), // not owed yet
            refund(void, RefundState::Owed, None),     // no charge id
            refund(void, RefundState::Owed, Some("ch_late")),
            refund(void, RefundState::Owed, Some("ch_other")), // owed already
            refund(paid, RefundState::Owed, Some("ch_paid")),  // not void
            refund(void, RefundState::Refused, None),
            refund(void, RefundState::Refunded, None), // settled already
            Change::Deferred {
                id: open,
                retry_after: later,
            },
            Change::Deferred {
                id: open,
                retry_after: later,
            },
            Change::Deferred {
                id: paid,
                retry_after: later,
            }, // final
        ];
        let plan = plan(&changes, &current, 1);
        assert_eq!(
            plan.applied,
            vec![false, false, true, false, false, true, false, true, true, false]
        );
        assert!(plan.history.is_empty(), "no status changed");
        assert_eq!(plan.updates.len(), 2);
        let v = &plan.updates[0];
        assert_eq!((v.id, v.status), (void, Expired));
        assert_eq!(v.refund, Some(RefundState::Refused));
        assert_eq!(v.charge_id.as_deref(), Some("ch_late"));
        let o = &plan.updates[1];
        assert_eq!(
            (o.id, o.failed_attempts, o.retry_after),
            (open, Some(2), Some(500))
        );
        assert_eq!(o.updated_at, None, "a deferral is not a status change");
    }

    #[test]
    fn totals_follow_each_order_from_its_stored_state_to_its_final_one() {
        let (a, b, c) = (OrderId::new(), OrderId::new(), OrderId::new());
        let current = HashMap::from([
            (a, row(Persisted)),
            (b, row(PaymentPending)),
            (c, row(PaymentPending)),
        ]);
        let orders = HashMap::from([
            (a, ("s1".to_owned(), 2)),
            (b, ("s1".to_owned(), 1)),
            (c, ("s2".to_owned(), 3)),
        ]);
        let changes = vec![
            status(a, Persisted, PaymentPending, None),
            status(a, PaymentPending, Paid, Some("ch")),
            Change::Notified(a),
            status(b, PaymentPending, PaymentFailed, None),
            Change::Released(b),
            Change::Notified(c), // no status change: no totals change
        ];
        let plan = plan(&changes, &current, 1);
        let deltas = totals_of_plan(&plan, &current, &orders);
        let d = |orders, units, released_orders, released_units| TotalsDelta {
            orders,
            units,
            released_orders,
            released_units,
        };
        let want: Deltas = [
            (("s1".to_owned(), "paid"), d(1, 2, 0, 0)),
            (("s1".to_owned(), "payment_failed"), d(1, 1, 1, 1)),
            (("s1".to_owned(), "payment_pending"), d(-1, -1, 0, 0)),
            (("s1".to_owned(), "persisted"), d(-1, -2, 0, 0)),
        ]
        .into_iter()
        .collect();
        assert_eq!(deltas, want);
        let mut new = Deltas::new();
        persisted(&mut new, "s2", 3);
        persisted(&mut new, "s2", 1);
        assert_eq!(new[&("s2".to_owned(), "persisted")], d(2, 4, 0, 0));
    }

    #[test]
    fn a_release_sees_the_failure_before_it() {
        let a = OrderId::new();
        let changes = vec![
            Change::Released(a),
            status(a, PaymentPending, PaymentFailed, None),
            Change::Released(a),
            Change::Released(a),
        ];
        let current = HashMap::from([(a, row(PaymentPending))]);
        assert_eq!(
            plan(&changes, &current, 1).applied,
            vec![false, true, true, false]
        );
    }
}
