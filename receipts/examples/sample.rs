//! Writes a sample receipt (or, with `refund`, a refund note) to the path given, and says
//! how long one rendering takes and how large the PDF is:
//!
//! ```sh
//! cargo run --release -p receipts --example sample -- receipt.pdf [refund]
//! ```

use std::time::Instant;

use receipts::{object_key, render, Document};
use storage::{
    Currency, HistoryEntry, Money, NewOrder, Order, OrderStatus, RefundState, Sale, SaleId,
    Timestamp, UserId, UserRate,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "receipt.pdf".to_owned());
    let refund = args.next().as_deref() == Some("refund");

    let at = |text: &str| text.parse::<Timestamp>();
    let eur = Currency::parse("EUR")?;
    let sale = Sale {
        stock_buckets: 1,
        id: SaleId::parse("spring-drop_1")?,
        sku: "SNEAKER-42-RED".to_owned(),
        stock: 100,
        price: Money {
            minor: 1250,
            currency: eur,
        },
        starts_at: at("2026-11-23T10:00:00Z")?,
        ends_at: at("2026-11-23T11:00:00Z")?,
        per_user_limit: 4,
        max_quantity_per_order: 2,
        user_rate: UserRate::default(),
        created_at: at("2026-11-01T09:00:00Z")?,
    };
    let mut history = vec![
        HistoryEntry {
            status: OrderStatus::Accepted,
            at: at("2026-11-23T10:00:00.120Z")?,
        },
        HistoryEntry {
            status: OrderStatus::Persisted,
            at: at("2026-11-23T10:00:00.180Z")?,
        },
        HistoryEntry {
            status: OrderStatus::PaymentPending,
            at: at("2026-11-23T10:00:00.200Z")?,
        },
    ];
    let status = if refund {
        OrderStatus::Expired
    } else {
        OrderStatus::Paid
    };
    history.push(HistoryEntry {
        status,
        at: at("2026-11-23T10:00:01.250Z")?,
    });
    let order = Order {
        new: NewOrder {
            order_id: "01936d3a-7b2c-7cde-9a41-8f0e2d3c4b5a".parse()?,
            sale_id: sale.id.clone(),
            user_id: UserId::parse("zoë.müller@example.com")?,
            quantity: 2,
            amount: Money {
                minor: 2500,
                currency: eur,
            },
            sequence: 7,
            idempotency_key: "key-1".to_owned(),
            payment_token: "tok_visa".to_owned(),
            accepted_at: at("2026-11-23T10:00:00.120Z")?,
        },
        status,
        history,
        charge_id: Some("ch_3Pq9XyZ".to_owned()),
        released_at: None,
        notified_at: None,
        refund: refund.then_some(RefundState::Refunded),
        failed_attempts: 0,
        retry_after: None,
        receipt_key: None,
        refund_note_key: None,
    };

    let doc = Document::for_order(&order, &sale, "Acme Flash GmbH")?;
    let pdf = render(&doc);
    let rounds = 2000u32;
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(render(std::hint::black_box(&doc)));
    }
    let each = start.elapsed() / rounds;
    std::fs::write(&path, &pdf)?;
    println!(
        "{path}: {} bytes, {each:?} per rendering (mean of {rounds}); stored as {}",
        pdf.len(),
        object_key(doc.order_id, doc.kind)
    );
    Ok(())
}
