//! What the Kafka tests share.

use sequencer::{OrderRecord, RECORD_VERSION};
use storage::{Currency, OrderId, SaleId, Timestamp, UserId};

/// The `i`th order record of sale `sale`: one unit, its own user and idempotency key.
pub fn record(sale: &str, i: u64) -> OrderRecord {
    OrderRecord {
        v: RECORD_VERSION,
        order_id: OrderId::new(),
        sale_id: SaleId::parse(sale).expect("id"),
        user_id: UserId::parse(format!("u{i}")).expect("user"),
        quantity: 1,
        amount_minor: 100,
        currency: Currency::parse("EUR").expect("eur"),
        sequence: i,
        idempotency_key: format!("k{i}"),
        fingerprint: "f".into(),
        payment_token: "tok".into(),
        accepted_at: Timestamp::now(),
    }
}
