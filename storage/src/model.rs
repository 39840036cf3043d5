//! The domain model: sales, orders, order status and its transition function, ids and money.
//!
//! Everything here is plain data and pure functions; no I/O. Every backend (embedded or
//! distributed) and the HTTP layer speak these types.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use time::OffsetDateTime;
use uuid::Uuid;

/// Wall-clock instant in milliseconds since the Unix epoch, serialized as RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The earliest instant RFC 3339 can write: 0000-01-01T00:00:00Z.
    pub const MIN: Timestamp = Timestamp(-62_167_219_200_000);
    /// The latest instant RFC 3339 can write: 9999-12-31T23:59:59.999Z.
    pub const MAX: Timestamp = Timestamp(253_402_300_799_999);

    /// The current wall-clock time.
    pub fn now() -> Self {
        Timestamp((OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64)
    }

    /// Milliseconds since the Unix epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// Microseconds since the Unix epoch (the unit of the admission model's clock).
    pub fn micros(self) -> i64 {
        self.0.saturating_mul(1000)
    }

    /// This instant plus `ms` milliseconds.
    pub fn plus_millis(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Clamped to [`Timestamp::MIN`, `Timestamp::MAX`] so that formatting never fails (a
    /// `Display` error panics inside `serde_json` and `to_string`).
    fn to_datetime(self) -> OffsetDateTime {
        let ms = self.0.clamp(Self::MIN.0, Self::MAX.0);
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self
            .to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// Why a text is not a [`Timestamp`].
#[derive(Debug, thiserror::Error)]
pub enum InvalidTimestamp {
    /// Not an RFC 3339 date-time.
    #[error(transparent)]
    Syntax(#[from] time::error::Parse),
    /// A date-time whose UTC instant RFC 3339 cannot write back (before year 0000 or after
    /// 9999 once the offset is applied, e.g. `9999-12-31T23:00:00-02:00`).
    #[error("the instant must lie between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z")]
    OutOfRange,
}

impl FromStr for Timestamp {
    type Err = InvalidTimestamp;
    /// Parses RFC 3339, refusing instants outside [`Timestamp::MIN`, `Timestamp::MAX`]:
    /// every timestamp read is one that writes back as the same text's instant.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let dt = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)?;
        let ms = dt.unix_timestamp_nanos().div_euclid(1_000_000);
        i64::try_from(ms)
            .ok()
            .filter(|ms| (Self::MIN.0..=Self::MAX.0).contains(ms))
            .map(Timestamp)
            .ok_or(InvalidTimestamp::OutOfRange)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Identifier of an order: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(pub Uuid);

impl OrderId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        OrderId(Uuid::now_v7())
    }
}

impl Default for OrderId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for OrderId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(OrderId)
    }
}

/// Error for an identifier or value that does not meet the model's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidValue {
    /// The field that was refused.
    pub field: &'static str,
    /// Why, in words a caller can show.
    pub reason: &'static str,
}

fn check_token(field: &'static str, s: &str, max: usize) -> Result<(), InvalidValue> {
    if s.is_empty() || s.len() > max {
        return Err(InvalidValue {
            field,
            reason: "must be 1 to 64 characters",
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(InvalidValue {
            field,
            reason: "may hold only letters, digits, '-', '_', '.' and ':'",
        });
    }
    Ok(())
}

/// Identifier of a sale. Chosen by the operator (or generated as a UUIDv7), limited to
/// `[A-Za-z0-9._:-]{1,64}` so it is safe inside Redis key hash tags and URLs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SaleId(String);

impl SaleId {
    /// Validates and wraps a sale id.
    pub fn parse(s: impl Into<String>) -> Result<Self, InvalidValue> {
        let s = s.into();
        check_token("id", &s, 64)?;
        Ok(SaleId(s))
    }

    /// A fresh UUIDv7 sale id.
    pub fn generate() -> Self {
        SaleId(Uuid::now_v7().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SaleId {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        SaleId::parse(s)
    }
}

impl From<SaleId> for String {
    fn from(s: SaleId) -> String {
        s.0
    }
}

impl fmt::Display for SaleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of a buyer: the `sub` claim of the buyer's JWT (1 to 128 bytes, no control
/// characters).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    /// Validates and wraps a user id.
    pub fn parse(s: impl Into<String>) -> Result<Self, InvalidValue> {
        let s = s.into();
        if s.is_empty() || s.len() > 128 || s.chars().any(char::is_control) {
            return Err(InvalidValue {
                field: "sub",
                reason: "must be 1 to 128 bytes without control characters",
            });
        }
        Ok(UserId(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        UserId::parse(s)
    }
}

impl From<UserId> for String {
    fn from(s: UserId) -> String {
        s.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// ISO 4217 currency code: three upper-case ASCII letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// Validates a currency code such as `EUR`.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        let b = s.as_bytes();
        if b.len() != 3 || !b.iter().all(u8::is_ascii_uppercase) {
            return Err(InvalidValue {
                field: "currency",
                reason: "must be a three-letter upper-case ISO 4217 code",
            });
        }
        Ok(Currency([b[0], b[1], b[2]]))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl TryFrom<String> for Currency {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Currency::parse(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount of money in minor units (cents) of a currency. Never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    /// Amount in minor units.
    pub minor: i64,
    /// Currency of the amount.
    pub currency: Currency,
}

impl Money {
    /// `self` times `n`, or `None` on overflow.
    pub fn times(self, n: u32) -> Option<Money> {
        self.minor.checked_mul(i64::from(n)).map(|minor| Money {
            minor,
            currency: self.currency,
        })
    }
}

/// Per-user token bucket: `per_second` requests refill, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRate {
    /// Sustained requests per second per user.
    pub per_second: u32,
    /// Bucket capacity: requests a user may send at once.
    pub burst: u32,
}

impl Default for UserRate {
    fn default() -> Self {
        UserRate {
            per_second: 5,
            burst: 10,
        }
    }
}

/// Most units a sale may ever hold, additions included.
pub const MAX_STOCK: u32 = 100_000_000;

/// A sale: a fixed stock of one item on sale in a time window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sale {
    /// The sale's id.
    pub id: SaleId,
    /// Stock-keeping unit of the item on sale.
    pub sku: String,
    /// Total units ever put on sale: the initial stock plus operator additions.
    pub stock: u32,
    /// Price of one unit.
    pub price: Money,
    /// First instant orders are accepted.
    pub starts_at: Timestamp,
    /// First instant orders are no longer accepted.
    pub ends_at: Timestamp,
    /// Most units one user may hold.
    pub per_user_limit: u32,
    /// Most units in one order.
    pub max_quantity_per_order: u32,
    /// Per-user request rate.
    pub user_rate: UserRate,
    /// Stock buckets of the distributed admission backend: the sale's stock and buyers are
    /// split over this many independent counters (each its own Redis Cluster slot), so one
    /// hot sale's decisions spread over the cluster's nodes. 1 (the default) is one counter.
    #[serde(default = "one_bucket")]
    pub stock_buckets: u32,
    /// When the sale was created.
    pub created_at: Timestamp,
}

/// Most stock buckets a sale may have.
pub const MAX_STOCK_BUCKETS: u32 = 64;

fn one_bucket() -> u32 {
    1
}

impl Sale {
    /// Checks the rules every sale must meet; the first broken one is returned.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        let bad = |field, reason| Err(InvalidValue { field, reason });
        // Characters, as the message and the OpenAPI document say (not UTF-8 bytes).
        if self.sku.is_empty() || self.sku.chars().count() > 64 {
            return bad("sku", "must be 1 to 64 characters");
        }
        if self.stock == 0 || self.stock > MAX_STOCK {
            return bad("stock", "must be between 1 and 100000000");
        }
        if self.price.minor < 0 {
            return bad("price_cents", "must not be negative");
        }
        if self.ends_at <= self.starts_at {
            return bad("ends_at", "must be after starts_at");
        }
        if self.per_user_limit == 0 || self.per_user_limit > 1000 {
            return bad("per_user_limit", "must be between 1 and 1000");
        }
        if self.max_quantity_per_order == 0 || self.max_quantity_per_order > self.per_user_limit {
            return bad(
                "max_quantity_per_order",
                "must be between 1 and per_user_limit",
            );
        }
        if self.user_rate.per_second == 0 || self.user_rate.per_second > 1_000_000 {
            return bad("user_rate.per_second", "must be between 1 and 1000000");
        }
        if self.user_rate.burst == 0 || self.user_rate.burst > 1_000_000 {
            return bad("user_rate.burst", "must be between 1 and 1000000");
        }
        if self.price.times(self.max_quantity_per_order).is_none() {
            return bad("price_cents", "too large");
        }
        if self.stock_buckets == 0
            || self.stock_buckets > MAX_STOCK_BUCKETS
            || self.stock_buckets > self.stock
        {
            return bad(
                "stock_buckets",
                "must be between 1 and 64, and at most the stock",
            );
        }
        Ok(())
    }

    /// Whether orders are accepted at `now`.
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.starts_at <= now && now < self.ends_at
    }
}

/// Where an order is in its life. See [`transition`] for the legal moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Admitted and durable in the log; the buyer got 202.
    Accepted,
    /// Written to the order store.
    Persisted,
    /// A charge is under way at the payment provider.
    PaymentPending,
    /// Charged. Final.
    Paid,
    /// The charge was declined; the stock went back. Final.
    PaymentFailed,
    /// Not paid in time; the stock went back. Final.
    Expired,
}

impl OrderStatus {
    /// Every status, in life order.
    pub const ALL: [OrderStatus; 6] = [
        OrderStatus::Accepted,
        OrderStatus::Persisted,
        OrderStatus::PaymentPending,
        OrderStatus::Paid,
        OrderStatus::PaymentFailed,
        OrderStatus::Expired,
    ];

    /// The status as its wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Accepted => "accepted",
            OrderStatus::Persisted => "persisted",
            OrderStatus::PaymentPending => "payment_pending",
            OrderStatus::Paid => "paid",
            OrderStatus::PaymentFailed => "payment_failed",
            OrderStatus::Expired => "expired",
        }
    }

    /// No move leaves a final status.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OrderStatus::Paid | OrderStatus::PaymentFailed | OrderStatus::Expired
        )
    }

    /// Final statuses that give the order's units back to the sale.
    pub fn releases_stock(self) -> bool {
        matches!(self, OrderStatus::PaymentFailed | OrderStatus::Expired)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OrderStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(InvalidValue {
                field: "status",
                reason: "unknown order status",
            })
    }
}

/// A move the status machine refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal order status move {from} -> {to}")]
pub struct IllegalTransition {
    /// Where the order was.
    pub from: OrderStatus,
    /// Where it was asked to go.
    pub to: OrderStatus,
}

/// The status machine: `accepted -> persisted -> payment_pending -> paid | payment_failed |
/// expired`, plus `persisted -> expired` for an order never charged before its deadline.
/// Every other move, including any move out of a final status, is refused.
pub fn transition(from: OrderStatus, to: OrderStatus) -> Result<OrderStatus, IllegalTransition> {
    use OrderStatus::*;
    let legal = matches!(
        (from, to),
        (Accepted, Persisted)
            | (Persisted, PaymentPending)
            | (Persisted, Expired)
            | (PaymentPending, Paid)
            | (PaymentPending, PaymentFailed)
            | (PaymentPending, Expired)
    );
    if legal {
        Ok(to)
    } else {
        Err(IllegalTransition { from, to })
    }
}

/// An accepted order as the settler persists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    /// The order's id.
    pub order_id: OrderId,
    /// The sale it belongs to.
    pub sale_id: SaleId,
    /// The buyer.
    pub user_id: UserId,
    /// Units ordered.
    pub quantity: u32,
    /// Total price (unit price times quantity).
    pub amount: Money,
    /// Position of the order in its sale, assigned by admission.
    pub sequence: u64,
    /// The buyer's Idempotency-Key.
    pub idempotency_key: String,
    /// Opaque token the payment provider charges.
    pub payment_token: String,
    /// When admission accepted the order.
    pub accepted_at: Timestamp,
}

/// One entry of an order's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The status entered.
    pub status: OrderStatus,
    /// When.
    pub at: Timestamp,
}

/// An order as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// What was accepted.
    #[serde(flatten)]
    pub new: NewOrder,
    /// Current status.
    pub status: OrderStatus,
    /// Statuses entered, oldest first.
    pub history: Vec<HistoryEntry>,
    /// The provider's charge id, once charged.
    pub charge_id: Option<String>,
    /// When the admission backend confirmed the stock release (failed or expired orders).
    pub released_at: Option<Timestamp>,
    /// When the buyer was notified of the final outcome.
    pub notified_at: Option<Timestamp>,
    /// The refund of a charge that landed after the order was void (`payment_failed` or
    /// `expired`), once one is owed; the charge refunded is `charge_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund: Option<RefundState>,
    /// Charge attempts of this unsettled order that failed at the provider (an error, not
    /// a decline).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_attempts: u32,
    /// After a failed attempt: the sweep does not try the order's charge before this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Timestamp>,
    /// The object key of the order's receipt, once stored (a `paid` order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt_key: Option<String>,
    /// The object key of the refund note, once stored (an order whose late charge was
    /// refunded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_note_key: Option<String>,
}

impl Order {
    /// The document this order is owed and does not have yet, if any: a receipt once
    /// `paid`, a refund note once its late charge is refunded.
    pub fn document_owed(&self) -> Option<DocumentKind> {
        if self.status == OrderStatus::Paid && self.receipt_key.is_none() {
            Some(DocumentKind::Receipt)
        } else if self.refund == Some(RefundState::Refunded) && self.refund_note_key.is_none() {
            Some(DocumentKind::RefundNote)
        } else {
            None
        }
    }
}

/// A document stored for an order in object storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentKind {
    /// The receipt of a paid order.
    Receipt,
    /// The note of a refunded late charge.
    RefundNote,
}

impl DocumentKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentKind::Receipt => "receipt",
            DocumentKind::RefundNote => "refund_note",
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Where the refund of a late charge stands. A charge that succeeds for an order already
/// void (its stock given back) is owed back to the buyer: the settler records `owed` with
/// the charge id before it asks the provider, and `refunded` or `refused` after, so a
/// refund owed survives a restart and the sweep finishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundState {
    /// Not refunded yet: the sweep retries it.
    Owed,
    /// The provider refunded the charge.
    Refunded,
    /// The provider refused the refund: an operator must settle it (reconcile reports it).
    Refused,
}

impl RefundState {
    /// Every state.
    pub const ALL: [RefundState; 3] = [
        RefundState::Owed,
        RefundState::Refunded,
        RefundState::Refused,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RefundState::Owed => "owed",
            RefundState::Refunded => "refunded",
            RefundState::Refused => "refused",
        }
    }
}

impl fmt::Display for RefundState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RefundState {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RefundState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(InvalidValue {
                field: "refund_state",
                reason: "unknown refund state",
            })
    }
}

/// A status change of an order, as published to `flashsale.order-events.v1`. Its identity
/// is `(order_id, status)`: an order enters each status at most once, so a consumer drops
/// a repeated event by that pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    /// The order.
    pub order_id: OrderId,
    /// Its sale.
    pub sale_id: SaleId,
    /// The buyer.
    pub user_id: UserId,
    /// Units of the order.
    pub quantity: u32,
    /// The status entered.
    pub status: OrderStatus,
    /// When.
    pub at: Timestamp,
    /// The provider's charge id, on `paid`.
    pub charge_id: Option<String>,
}

/// Units and orders of a sale by status, as the store sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleTotals {
    /// Orders persisted (any status).
    pub orders: u64,
    /// Units persisted (any status).
    pub units: u64,
    /// Orders and units per status.
    pub by_status: Vec<StatusCount>,
    /// Units whose release the admission backend confirmed.
    pub released_units: u64,
    /// Orders whose release the admission backend confirmed.
    pub released_orders: u64,
}

impl SaleTotals {
    /// Orders and units in `status`.
    pub fn get(&self, status: OrderStatus) -> StatusCount {
        self.by_status
            .iter()
            .find(|c| c.status == status)
            .cloned()
            .unwrap_or(StatusCount {
                status,
                orders: 0,
                units: 0,
            })
    }
}

/// Orders and units in one status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCount {
    /// The status.
    pub status: OrderStatus,
    /// Orders in it.
    pub orders: u64,
    /// Units in it.
    pub units: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_life_of_an_order() {
        use OrderStatus::*;
        assert_eq!(transition(Accepted, Persisted), Ok(Persisted));
        assert_eq!(transition(PaymentPending, Paid), Ok(Paid));
        assert!(transition(Accepted, Paid).is_err());
        assert!(transition(Paid, PaymentFailed).is_err());
        assert!(transition(PaymentFailed, Paid).is_err());
        assert!(transition(Expired, PaymentPending).is_err());
        for s in OrderStatus::ALL {
            if s.is_final() {
                for t in OrderStatus::ALL {
                    assert!(transition(s, t).is_err(), "{s} -> {t} must be refused");
                }
            }
        }
    }

    #[test]
    fn timestamps_outside_what_rfc3339_writes_are_refused_and_never_fail_to_format() {
        for text in [
            "0000-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "0000-01-01T00:30:00+00:59",
        ] {
            assert!(
                matches!(text.parse::<Timestamp>(), Err(InvalidTimestamp::OutOfRange)),
                "{text}"
            );
        }
        for ts in [Timestamp::MIN, Timestamp::MAX, Timestamp(0)] {
            assert_eq!(ts.to_string().parse::<Timestamp>().expect("round trip"), ts);
        }
        assert_eq!(
            "1969-12-31T23:59:59.9995Z"
                .parse::<Timestamp>()
                .expect("parse"),
            Timestamp(-1)
        );
        // Built in code past the range (plus_millis): formats clamped instead of failing.
        assert_eq!(
            Timestamp::MAX.plus_millis(1).to_string(),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(Timestamp(i64::MIN).to_string(), "0000-01-01T00:00:00Z");
    }

    #[test]
    fn ids_and_money_validate() {
        assert!(SaleId::parse("spring-drop_1").is_ok());
        assert!(SaleId::parse("a{b}").is_err());
        assert!(SaleId::parse("").is_err());
        assert!(UserId::parse("u\n1").is_err());
        assert!(Currency::parse("eur").is_err());
        let eur = Currency::parse("EUR").expect("valid");
        assert_eq!(
            Money {
                minor: 250,
                currency: eur
            }
            .times(3),
            Some(Money {
                minor: 750,
                currency: eur
            })
        );
        let id = OrderId::new();
        assert_eq!(id.0.get_version_num(), 7);
        assert_eq!(id.to_string().parse::<OrderId>().ok(), Some(id));
    }

    #[test]
    fn timestamps_round_trip_rfc3339() {
        let t: Timestamp = "2026-11-23T10:00:00.250Z".parse().expect("parse");
        assert_eq!(t.to_string(), "2026-11-23T10:00:00.25Z");
        let u: Timestamp = "2026-11-23T11:00:00.250+01:00".parse().expect("parse");
        assert_eq!(t, u);
    }
}
