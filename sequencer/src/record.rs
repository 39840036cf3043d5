//! The order record, format v1: one JSON object per accepted order.
//!
//! Documented field by field in `docs/record-format.md`. Readers ignore fields they do not
//! know, so a producer may add fields without a version bump; removing or changing the
//! meaning of a field needs `v: 2`. The producer and the settler share this one codec.

use serde::{Deserialize, Serialize};
use storage::{Currency, Money, NewOrder, OrderId, SaleId, Timestamp, UserId};

/// The record version this codec writes.
pub const RECORD_VERSION: u32 = 1;

/// Value of the `content-type` header carried by every record.
pub const CONTENT_TYPE: &str = "application/vnd.flashsale.order.v1+json";

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not JSON, or a field is missing or of the wrong type.
    #[error("undecodable order record: {0}")]
    Malformed(String),
    /// A version this reader does not know.
    #[error("unsupported order record version {0}")]
    UnsupportedVersion(u32),
}

/// An accepted order, as admission wrote it to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// Format version; always [`RECORD_VERSION`] when written by this codec.
    pub v: u32,
    /// The order's id (UUIDv7); also the record key.
    pub order_id: OrderId,
    /// The sale.
    pub sale_id: SaleId,
    /// The buyer (JWT `sub`).
    pub user_id: UserId,
    /// Units ordered.
    pub quantity: u32,
    /// Total price in minor units.
    pub amount_minor: i64,
    /// ISO 4217 currency of the amount.
    pub currency: Currency,
    /// Position of the order in its sale, from admission.
    pub sequence: u64,
    /// The buyer's Idempotency-Key.
    pub idempotency_key: String,
    /// Digest of the request body, to tell a retry from a conflicting reuse of the key.
    pub fingerprint: String,
    /// Opaque token for the payment provider.
    pub payment_token: String,
    /// When admission accepted the order (RFC 3339).
    pub accepted_at: Timestamp,
}

impl OrderRecord {
    /// The order as the store persists it.
    pub fn to_new_order(&self) -> NewOrder {
        NewOrder {
            order_id: self.order_id,
            sale_id: self.sale_id.clone(),
            user_id: self.user_id.clone(),
            quantity: self.quantity,
            amount: Money {
                minor: self.amount_minor,
                currency: self.currency,
            },
            sequence: self.sequence,
            idempotency_key: self.idempotency_key.clone(),
            payment_token: self.payment_token.clone(),
            accepted_at: self.accepted_at,
        }
    }

    /// The record key: the order id's text, so Kafka's partitioner spreads orders evenly.
    pub fn key(&self) -> String {
        self.order_id.to_string()
    }
}

/// Encodes a record as v1 JSON.
pub fn encode(record: &OrderRecord) -> Result<Vec<u8>, RecordError> {
    serde_json::to_vec(record).map_err(|e| RecordError::Malformed(e.to_string()))
}

#[derive(Deserialize)]
struct Version {
    v: u32,
}

/// Decodes a record, refusing versions it does not know and ignoring unknown fields.
pub fn decode(bytes: &[u8]) -> Result<OrderRecord, RecordError> {
    let Version { v } =
        serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
    if v != RECORD_VERSION {
        return Err(RecordError::UnsupportedVersion(v));
    }
    serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))
}

#[cfg(test)]
pub(crate) fn sample(seq: u64) -> OrderRecord {
    OrderRecord {
        v: RECORD_VERSION,
        order_id: OrderId::new(),
        sale_id: SaleId::parse("sale-1").expect("id"),
        user_id: UserId::parse(format!("user-{seq}")).expect("user"),
        quantity: 1,
        amount_minor: 1999,
        currency: Currency::parse("EUR").expect("eur"),
        sequence: seq,
        idempotency_key: format!("key-{seq}"),
        fingerprint: "f".repeat(32),
        payment_token: "tok_visa".into(),
        accepted_at: Timestamp(1_790_000_000_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_unknown_fields() {
        let r = sample(7);
        let bytes = encode(&r).expect("encode");
        assert_eq!(decode(&bytes).expect("decode"), r);
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        v["added_later"] = serde_json::json!({"x": 1});
        let bytes = serde_json::to_vec(&v).expect("json");
        assert_eq!(decode(&bytes).expect("decode"), r);
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let mut v = serde_json::to_value(sample(1)).expect("json");
        v["v"] = 2.into();
        let bytes = serde_json::to_vec(&v).expect("json");
        assert!(matches!(
            decode(&bytes),
            Err(RecordError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            decode(b"{not json"),
            Err(RecordError::Malformed(_))
        ));
        assert!(matches!(
            decode(br#"{"v":1}"#),
            Err(RecordError::Malformed(_))
        ));
    }
}
