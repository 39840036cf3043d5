//! An order as append-only facts, and the fold that reads an order back from them.
//!
//! Every write about an order inserts rows under a clustering key of its own, `(order_id,
//! kind, rank)`, and never updates one (the published mark aside): the order itself
//! ([`Kind::Order`]), each status entered ([`Kind::Status`], rank = the status's place in
//! the order's life), its release, its notification (rank = the status it was for), each
//! refund state and each deferred charge attempt (rank = the attempt's number). So a replay
//! writes the same row again (idempotent), and no write can move an order backwards: what
//! the order *is* is [`fold`] of its rows, and the fold only ever sees more of them.

use crate::batch::Current;
use crate::{
    Currency, HistoryEntry, InvalidValue, Money, NewOrder, Order, OrderEvent, OrderId, OrderStatus,
    RefundState, SaleId, Timestamp, UserId,
};
use uuid::Uuid;

/// The partitions per sale: orders of one sale spread over this many partitions
/// `(sale_id, bucket)`, so a hot sale's writes land on several replicas' shards and no
/// partition holds more than a sixteenth of a sale.
pub(crate) const BUCKETS: i32 = 16;

/// The bucket of an order: from its id's random low bits (UUIDv7), stable forever.
pub(crate) fn bucket_of(id: OrderId) -> i32 {
    (id.0.as_u128() as u32 % BUCKETS as u32) as i32
}

/// What a fact row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// The accepted order (its immutable fields).
    Order = 0,
    /// A status entered.
    Status = 1,
    /// The admission backend took its stock back.
    Released = 2,
    /// The buyer was told the outcome `rank`.
    Notified = 3,
    /// A refund state (rank = its place in [`RefundState::ALL`]).
    Refund = 4,
    /// A failed charge attempt (rank = attempts so far, `at` = retry after).
    Deferred = 5,
    /// A document stored (rank 0 receipt, 1 refund note; its object key in `idem_key`,
    /// the column of keys).
    Document = 6,
}

impl Kind {
    fn from_i32(k: i32) -> Option<Kind> {
        Some(match k {
            0 => Kind::Order,
            1 => Kind::Status,
            2 => Kind::Released,
            3 => Kind::Notified,
            4 => Kind::Refund,
            5 => Kind::Deferred,
            6 => Kind::Document,
            _ => return None,
        })
    }
}

/// The rank of a status: its place in the order's life ([`OrderStatus::ALL`]).
pub(crate) fn status_rank(s: OrderStatus) -> i32 {
    OrderStatus::ALL.iter().position(|x| *x == s).unwrap_or(0) as i32
}

fn status_of_rank(rank: i32) -> Option<OrderStatus> {
    usize::try_from(rank)
        .ok()
        .and_then(|r| OrderStatus::ALL.get(r).copied())
}

pub(crate) fn refund_rank(s: RefundState) -> i32 {
    RefundState::ALL.iter().position(|x| *x == s).unwrap_or(0) as i32
}

/// One row of `order_facts` as read (the partition key is known to the reader).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct FactRow {
    pub order_id: Uuid,
    pub kind: i32,
    pub rank: i32,
    pub user_id: Option<String>,
    pub quantity: Option<i32>,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub seq: Option<i64>,
    pub idem_key: Option<String>,
    pub payment_token: Option<String>,
    pub at: Option<i64>,
    pub charge_id: Option<String>,
    pub published: Option<bool>,
}

/// The columns of a [`FactRow`], in order, for `SELECT`.
pub(crate) const FACT_COLUMNS: &str = "order_id, kind, rank, user_id, quantity, amount, \
     currency, seq, idem_key, payment_token, at, charge_id, published";

/// A [`FactRow`] as the driver decodes it.
pub(crate) type RawFact = (
    Uuid,
    i32,
    i32,
    Option<String>,
    Option<i32>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<bool>,
);

impl From<RawFact> for FactRow {
    fn from(r: RawFact) -> Self {
        FactRow {
            order_id: r.0,
            kind: r.1,
            rank: r.2,
            user_id: r.3,
            quantity: r.4,
            amount: r.5,
            currency: r.6,
            seq: r.7,
            idem_key: r.8,
            payment_token: r.9,
            at: r.10,
            charge_id: r.11,
            published: r.12,
        }
    }
}

/// An order read back from its facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Folded {
    /// The order as the trait returns it.
    pub order: Order,
    /// When it entered its current status (what `pending_since` compares).
    pub entered_at: Timestamp,
    /// Its status changes not published yet: (status, at, charge id on `paid`).
    pub unpublished: Vec<(OrderStatus, Timestamp, Option<String>)>,
}

impl Folded {
    /// What a batch's preconditions look at.
    pub fn current(&self) -> Current {
        Current {
            status: self.order.status,
            released: self.order.released_at.is_some(),
            notified: self.order.notified_at.is_some(),
            refund: self.order.refund,
            failed_attempts: self.order.failed_attempts,
            receipt: self.order.receipt_key.is_some(),
            refund_note: self.order.refund_note_key.is_some(),
        }
    }

    /// The order's unpublished status changes as events.
    pub fn events(&self) -> impl Iterator<Item = OrderEvent> + '_ {
        self.unpublished
            .iter()
            .map(|(status, at, charge)| OrderEvent {
                order_id: self.order.new.order_id,
                sale_id: self.order.new.sale_id.clone(),
                user_id: self.order.new.user_id.clone(),
                quantity: self.order.new.quantity,
                status: *status,
                at: *at,
                charge_id: charge.clone(),
            })
    }
}

fn corrupt(what: &'static str) -> InvalidValue {
    InvalidValue {
        field: "order_facts",
        reason: what,
    }
}

/// The current status of an order entering `entered` (ranks of the statuses with a fact).
///
/// Normally one final status at most has a fact. Two can only if two settler processes
/// raced on the order (a charge succeeding while another process's sweep expired it); then
/// the void one wins (`expired` over `payment_failed` over `paid`), whatever the order the
/// facts landed in, so every reader and every later writer agrees, and the charge of the
/// losing `paid` is owed back to the buyer (see [`fold`]).
pub(crate) fn resolve(entered: &[OrderStatus]) -> Option<OrderStatus> {
    use OrderStatus::*;
    [
        Expired,
        PaymentFailed,
        Paid,
        PaymentPending,
        Persisted,
        Accepted,
    ]
    .into_iter()
    .find(|s| entered.contains(s))
}

/// Reads one order back from its rows (any order; other orders' rows are ignored).
/// `Ok(None)` if the order's own row is missing (not persisted, or not yet visible).
pub(crate) fn fold(
    sale: &SaleId,
    id: OrderId,
    rows: &[FactRow],
) -> Result<Option<Folded>, InvalidValue> {
    let mine = || rows.iter().filter(|r| r.order_id == id.0);
    let Some(head) = mine().find(|r| r.kind == Kind::Order as i32) else {
        return Ok(None);
    };
    let quantity = head
        .quantity
        .and_then(|q| u32::try_from(q).ok())
        .ok_or(corrupt("quantity"))?;
    let currency = Currency::parse(head.currency.as_deref().unwrap_or_default())?;
    let new = NewOrder {
        order_id: id,
        sale_id: sale.clone(),
        user_id: UserId::parse(head.user_id.clone().unwrap_or_default())?,
        quantity,
        amount: Money {
            minor: head.amount.ok_or(corrupt("amount"))?,
            currency,
        },
        sequence: head
            .seq
            .and_then(|s| u64::try_from(s).ok())
            .ok_or(corrupt("seq"))?,
        idempotency_key: head.idem_key.clone().unwrap_or_default(),
        payment_token: head.payment_token.clone().unwrap_or_default(),
        accepted_at: Timestamp(head.at.ok_or(corrupt("at"))?),
    };

    let mut history: Vec<(i32, HistoryEntry, Option<String>, bool)> = Vec::new();
    let mut released_at = None;
    let mut notified: Vec<(i32, Timestamp)> = Vec::new();
    let mut refund: Option<(i32, Option<String>)> = None;
    let mut deferred: Option<(i32, Timestamp)> = None;
    let (mut receipt_key, mut refund_note_key) = (None, None);
    for r in mine() {
        let at = r.at.map(Timestamp);
        match Kind::from_i32(r.kind).ok_or(corrupt("kind"))? {
            Kind::Order => {}
            Kind::Status => {
                let status = status_of_rank(r.rank).ok_or(corrupt("status rank"))?;
                let entry = HistoryEntry {
                    status,
                    at: at.ok_or(corrupt("status at"))?,
                };
                history.push((
                    r.rank,
                    entry,
                    r.charge_id.clone(),
                    r.published == Some(true),
                ));
            }
            Kind::Released => released_at = released_at.or(at),
            Kind::Notified => notified.push((r.rank, at.ok_or(corrupt("notified at"))?)),
            Kind::Refund => {
                if refund.as_ref().is_none_or(|(rank, _)| r.rank > *rank) {
                    // The charge id is on the `owed` row; a later state keeps it.
                    let charge = r
                        .charge_id
                        .clone()
                        .or_else(|| refund.as_ref().and_then(|(_, c)| c.clone()));
                    refund = Some((r.rank, charge));
                } else if let Some((_, charge)) = refund.as_mut() {
                    if charge.is_none() {
                        charge.clone_from(&r.charge_id);
                    }
                }
            }
            Kind::Deferred => {
                if deferred.is_none_or(|(n, _)| r.rank > n) {
                    deferred = Some((r.rank, at.ok_or(corrupt("retry after"))?));
                }
            }
            Kind::Document => {
                let key = r.idem_key.clone().ok_or(corrupt("document key"))?;
                match r.rank {
                    0 => receipt_key = Some(key),
                    1 => refund_note_key = Some(key),
                    _ => return Err(corrupt("document rank")),
                }
            }
        }
    }
    history.sort_by_key(|(rank, e, ..)| (*rank, e.at));
    let entered: Vec<OrderStatus> = history.iter().map(|(_, e, ..)| e.status).collect();
    let status = resolve(&entered).ok_or(corrupt("no status"))?;
    let entered_at = history
        .iter()
        .find(|(_, e, ..)| e.status == status)
        .map_or(new.accepted_at, |(_, e, ..)| e.at);
    let paid_charge = history
        .iter()
        .find(|(_, e, ..)| e.status == OrderStatus::Paid)
        .and_then(|(_, _, c, _)| c.clone());

    // The refund: as recorded, or, for an order whose `paid` lost to a void status (two
    // processes raced), owed with the paid charge's id.
    let (refund_state, refund_charge) = match refund {
        Some((rank, charge)) => (
            Some(
                usize::try_from(rank)
                    .ok()
                    .and_then(|r| RefundState::ALL.get(r).copied())
                    .ok_or(corrupt("refund rank"))?,
            ),
            charge,
        ),
        None if status.releases_stock() && paid_charge.is_some() => (Some(RefundState::Owed), None),
        None => (None, None),
    };
    let charge_id = refund_charge.or(paid_charge);
    // A notification counts unless it was for another final status (the `paid` that lost).
    let notified_at = notified
        .iter()
        .filter(|(rank, _)| {
            *rank == status_rank(status) || status_of_rank(*rank).is_some_and(|s| !s.is_final())
        })
        .map(|(_, at)| *at)
        .min();
    let (failed_attempts, retry_after) = match deferred {
        Some((n, at)) if !status.is_final() => (u32::try_from(n).unwrap_or(0), Some(at)),
        Some((n, _)) => (u32::try_from(n).unwrap_or(0), None),
        None => (0, None),
    };
    let unpublished = history
        .iter()
        .filter(|(.., published)| !published)
        .map(|(_, e, charge, _)| {
            let charge = (e.status == OrderStatus::Paid)
                .then(|| charge.clone())
                .flatten();
            (e.status, e.at, charge)
        })
        .collect();
    Ok(Some(Folded {
        order: Order {
            new,
            status,
            history: history.into_iter().map(|(_, e, ..)| e).collect(),
            charge_id,
            released_at,
            notified_at,
            refund: refund_state,
            failed_attempts,
            retry_after,
            receipt_key,
            refund_note_key,
        },
        entered_at,
        unpublished,
    }))
}

/// Every order in `rows` (one partition's worth), folded; the rows come sorted by order id.
pub(crate) fn fold_all(sale: &SaleId, rows: &[FactRow]) -> Result<Vec<Folded>, InvalidValue> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let id = rows[start].order_id;
        let end = rows[start..]
            .iter()
            .position(|r| r.order_id != id)
            .map_or(rows.len(), |n| start + n);
        if let Some(f) = fold(sale, OrderId(id), &rows[start..end])? {
            out.push(f);
        }
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    fn head(id: OrderId) -> FactRow {
        FactRow {
            order_id: id.0,
            kind: Kind::Order as i32,
            rank: 0,
            user_id: Some("u1".into()),
            quantity: Some(2),
            amount: Some(500),
            currency: Some("EUR".into()),
            seq: Some(7),
            idem_key: Some("k".into()),
            payment_token: Some("tok".into()),
            at: Some(1_000),
            ..FactRow::default()
        }
    }

    fn fact(id: OrderId, kind: Kind, rank: i32, at: i64, charge: Option<&str>) -> FactRow {
        FactRow {
            order_id: id.0,
            kind: kind as i32,
            rank,
            at: Some(at),
            charge_id: charge.map(str::to_owned),
            ..FactRow::default()
        }
    }

    fn entered(id: OrderId, s: OrderStatus, at: i64, charge: Option<&str>) -> FactRow {
        fact(id, Kind::Status, status_rank(s), at, charge)
    }

    fn sale() -> SaleId {
        SaleId::parse("s").expect("id")
    }

    #[test]
    fn an_order_is_the_fold_of_its_facts_in_any_order() {
        let id = OrderId::new();
        let mut rows = vec![
            entered(id, Paid, 1_004, Some("ch_1")),
            head(id),
            entered(id, Accepted, 1_000, None),
            entered(id, PaymentPending, 1_003, None),
            entered(id, Persisted, 1_002, None),
            fact(id, Kind::Notified, status_rank(Paid), 1_005, None),
        ];
        let a = fold(&sale(), id, &rows).expect("fold").expect("order");
        rows.reverse();
        let b = fold(&sale(), id, &rows).expect("fold").expect("order");
        assert_eq!(a, b);
        assert_eq!(a.order.status, Paid);
        assert_eq!(a.order.charge_id.as_deref(), Some("ch_1"));
        assert_eq!(a.order.notified_at, Some(Timestamp(1_005)));
        assert_eq!(
            a.order.history.iter().map(|h| h.status).collect::<Vec<_>>(),
            vec![Accepted, Persisted, PaymentPending, Paid]
        );
        assert_eq!(a.entered_at, Timestamp(1_004));
        assert_eq!(a.unpublished.len(), 4);
        assert_eq!(
            a.unpublished[3],
            (Paid, Timestamp(1_004), Some("ch_1".into()))
        );
        assert_eq!(a.order.new.quantity, 2);
        // Without its own row the order is not there (yet).
        let headless: Vec<FactRow> = rows
            .into_iter()
            .filter(|r| r.kind != Kind::Order as i32)
            .collect();
        assert_eq!(fold(&sale(), id, &headless).expect("fold"), None);
    }

    #[test]
    fn a_void_status_beats_a_racing_paid_and_owes_its_charge_back() {
        let id = OrderId::new();
        let rows = vec![
            head(id),
            entered(id, Accepted, 1_000, None),
            entered(id, Persisted, 1_001, None),
            entered(id, PaymentPending, 1_002, None),
            entered(id, Paid, 1_003, Some("ch_late")),
            fact(id, Kind::Notified, status_rank(Paid), 1_004, None),
            entered(id, Expired, 1_005, None),
        ];
        let f = fold(&sale(), id, &rows).expect("fold").expect("order");
        assert_eq!(f.order.status, Expired);
        assert_eq!(f.order.refund, Some(RefundState::Owed));
        assert_eq!(f.order.charge_id.as_deref(), Some("ch_late"));
        // Told "paid", not yet told "expired": the follow-up is owed.
        assert_eq!(f.order.notified_at, None);
        assert_eq!(f.current().refund, Some(RefundState::Owed));
        // Once refunded, the refund row decides.
        let mut more = rows.clone();
        more.push(fact(
            id,
            Kind::Refund,
            refund_rank(RefundState::Refunded),
            1_006,
            None,
        ));
        let f = fold(&sale(), id, &more).expect("fold").expect("order");
        assert_eq!(f.order.refund, Some(RefundState::Refunded));
        assert_eq!(f.order.charge_id.as_deref(), Some("ch_late"));
        // Whatever order the statuses arrive in, the void one wins.
        assert_eq!(resolve(&[Paid, Expired]), Some(Expired));
        assert_eq!(resolve(&[Expired, Paid]), Some(Expired));
        assert_eq!(resolve(&[PaymentFailed, Paid]), Some(PaymentFailed));
        assert_eq!(resolve(&[Persisted, PaymentPending]), Some(PaymentPending));
    }

    #[test]
    fn refunds_and_deferrals_fold_to_their_latest_state() {
        let id = OrderId::new();
        let rows = vec![
            head(id),
            entered(id, Accepted, 1_000, None),
            entered(id, Persisted, 1_001, None),
            fact(id, Kind::Deferred, 1, 5_000, None),
            fact(id, Kind::Deferred, 2, 9_000, None),
        ];
        let f = fold(&sale(), id, &rows).expect("fold").expect("order");
        assert_eq!(
            (f.order.failed_attempts, f.order.retry_after),
            (2, Some(Timestamp(9_000)))
        );
        let mut void = rows.clone();
        void.push(entered(id, Expired, 1_002, None));
        void.push(fact(
            id,
            Kind::Refund,
            refund_rank(RefundState::Owed),
            1_003,
            Some("ch_x"),
        ));
        void.push(fact(
            id,
            Kind::Refund,
            refund_rank(RefundState::Refused),
            1_004,
            None,
        ));
        let f = fold(&sale(), id, &void).expect("fold").expect("order");
        assert_eq!(f.order.refund, Some(RefundState::Refused));
        assert_eq!(f.order.charge_id.as_deref(), Some("ch_x"));
        assert_eq!(f.order.retry_after, None, "a final order waits for nothing");
    }

    #[test]
    fn buckets_spread_orders_and_never_change() {
        let mut seen = [0u32; BUCKETS as usize];
        for _ in 0..1_600 {
            let id = OrderId::new();
            let b = bucket_of(id);
            assert_eq!(b, bucket_of(id));
            seen[b as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 40), "{seen:?}");
    }
}
