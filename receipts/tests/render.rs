//! Receipts and refund notes end to end: from an order to a PDF whose text is read back
//! with pdf-extract (and with poppler's `pdftotext` too where it is installed).

use receipts::{object_key, render, Document, Kind, NotReceiptable};
use storage::{
    Currency, HistoryEntry, Money, NewOrder, Order, OrderId, OrderStatus, RefundState, Sale,
    SaleId, Timestamp, UserId, UserRate,
};

const SELLER: &str = "Acme Flash GmbH";

fn ts(text: &str) -> Timestamp {
    text.parse().expect("timestamp")
}

fn money(minor: i64, code: &str) -> Money {
    Money {
        minor,
        currency: Currency::parse(code).expect("currency"),
    }
}

fn sale(price: Money) -> Sale {
    Sale {
        stock_buckets: 1,
        id: SaleId::parse("spring-drop_1").expect("sale id"),
        sku: "SNEAKER-42-RED".to_owned(),
        stock: 100,
        price,
        starts_at: ts("2026-11-23T10:00:00Z"),
        ends_at: ts("2026-11-23T11:00:00Z"),
        per_user_limit: 4,
        max_quantity_per_order: 2,
        user_rate: UserRate::default(),
        created_at: ts("2026-11-01T09:00:00Z"),
    }
}

/// A paid order of `quantity` units of `sale`, with its full history.
fn paid_order(id: &str, buyer: &str, sale: &Sale, quantity: u32) -> Order {
    let entries = [
        (OrderStatus::Accepted, "2026-11-23T10:00:00.120Z"),
        (OrderStatus::Persisted, "2026-11-23T10:00:00.180Z"),
        (OrderStatus::PaymentPending, "2026-11-23T10:00:00.200Z"),
        (OrderStatus::Paid, "2026-11-23T10:00:01.250Z"),
    ];
    Order {
        new: NewOrder {
            order_id: id.parse().expect("order id"),
            sale_id: sale.id.clone(),
            user_id: UserId::parse(buyer).expect("user id"),
            quantity,
            amount: sale.price.times(quantity).expect("amount"),
            sequence: 7,
            idempotency_key: "key-1".to_owned(),
            payment_token: "tok_visa".to_owned(),
            accepted_at: ts(entries[0].1),
        },
        status: OrderStatus::Paid,
        history: entries
            .iter()
            .map(|&(status, at)| HistoryEntry { status, at: ts(at) })
            .collect(),
        charge_id: Some("ch_3Pq9XyZ".to_owned()),
        released_at: None,
        notified_at: Some(ts("2026-11-23T10:00:01.400Z")),
        refund: None,
        failed_attempts: 0,
        retry_after: None,
        receipt_key: None,
        refund_note_key: None,
    }
}

/// An order that expired before its charge landed; the late charge was refunded.
fn refunded_order(sale: &Sale) -> Order {
    let mut order = paid_order(ID_A, "buyer-7", sale, 2);
    order.status = OrderStatus::Expired;
    order.history.truncate(3);
    order.history.push(HistoryEntry {
        status: OrderStatus::Expired,
        at: ts("2026-11-23T10:15:00Z"),
    });
    order.charge_id = Some("ch_late_1".to_owned());
    order.released_at = Some(ts("2026-11-23T10:15:00.100Z"));
    order.refund = Some(RefundState::Refunded);
    order
}

const ID_A: &str = "01936d3a-7b2c-7cde-9a41-8f0e2d3c4b5a";
const ID_B: &str = "01936d3a-7b2c-7cde-9a41-8f0e2d3c4b5b";

fn text_of(pdf: &[u8]) -> String {
    pdf_extract::extract_text_from_mem(pdf).expect("pdf-extract reads the PDF")
}

/// The text with every run of whitespace as one space (extractors differ in line breaks).
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn receipt(order: &Order, sale: &Sale) -> Document {
    Document::for_order(order, sale, SELLER).expect("receiptable")
}

#[test]
fn the_same_document_renders_to_the_same_bytes() {
    let sale = sale(money(1250, "EUR"));
    let doc = receipt(&paid_order(ID_A, "buyer-7", &sale, 2), &sale);
    let first = render(&doc);
    let second = render(&doc.clone());
    assert_eq!(first, second);
    // In another thread too (nothing is drawn from process state).
    let third = std::thread::spawn(move || render(&doc))
        .join()
        .expect("thread");
    assert_eq!(first, third);
    assert!(first.starts_with(b"%PDF-1."));
    let tail = String::from_utf8_lossy(&first[first.len() - 32..]).into_owned();
    assert!(tail.trim_end().ends_with("%%EOF"), "{tail}");
}

#[test]
fn different_orders_render_to_different_bytes() {
    let sale = sale(money(1250, "EUR"));
    let a = render(&receipt(&paid_order(ID_A, "buyer-7", &sale, 2), &sale));
    let b = render(&receipt(&paid_order(ID_B, "buyer-7", &sale, 2), &sale));
    let c = render(&receipt(&paid_order(ID_A, "buyer-8", &sale, 2), &sale));
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_ne!(b, c);
}

#[test]
fn nothing_of_the_moment_is_in_the_file() {
    let sale = sale(money(1250, "EUR"));
    let pdf = render(&receipt(&paid_order(ID_A, "buyer-7", &sale, 2), &sale));
    let raw = String::from_utf8_lossy(&pdf);
    for key in ["/CreationDate", "/ModDate", "D:19", "D:20"] {
        assert!(!raw.contains(key), "{key} in the PDF");
    }
    // A file id is written, as two 16-byte hex strings.
    let id = raw.split("/ID").nth(1).expect("a file id in the trailer");
    assert!(id.starts_with("[<"), "{}", &id[..40.min(id.len())]);
}

#[test]
fn the_text_holds_the_order_the_buyer_the_amounts_and_the_seller() {
    let sale = sale(money(1250, "EUR"));
    let order = paid_order(ID_A, "buyer-7", &sale, 2);
    let pdf = render(&receipt(&order, &sale));
    let text = flat(&text_of(&pdf));
    for needle in [
        "Receipt",
        SELLER,
        ID_A,
        "buyer-7",
        "EUR 12.50",
        "EUR 25.00",
        "SNEAKER-42-RED",
        "spring-drop_1",
        "ch_3Pq9XyZ",
        "2026-11-23T10:00:01.25Z",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
    assert!(!text.contains("Refund"), "{text}");
}

#[test]
fn amounts_use_the_currencys_minor_unit() {
    for (price, unit, total) in [
        (money(1250, "JPY"), "JPY 1250", "JPY 2500"),
        (money(1250, "BHD"), "BHD 1.250", "BHD 2.500"),
        (money(1250, "QQQ"), "QQQ 12.50", "QQQ 25.00"),
    ] {
        let sale = sale(price);
        let doc = receipt(&paid_order(ID_A, "buyer-7", &sale, 2), &sale);
        let text = flat(&text_of(&render(&doc)));
        assert!(text.contains(unit), "{unit:?} not in {text:?}");
        assert!(text.contains(total), "{total:?} not in {text:?}");
    }
}

#[test]
fn non_ascii_buyers_skus_and_sellers_neither_panic_nor_break_the_pdf() {
    let mut sale = sale(money(999, "EUR"));
    sale.sku = "Ünïcødé-Schuh “Größe 42” — 靴".to_owned();
    for buyer in [
        "zoë.müller@example.com",
        "用户-42",
        "пользователь",
        "🙂🙃",
        "e\u{0301}",
        // 128 bytes, the longest a buyer id may be, with no space to break at.
        &"W".repeat(128),
        &"é".repeat(64),
    ] {
        let order = paid_order(ID_A, buyer, &sale, 1);
        let doc = Document::for_order(&order, &sale, "Händler – Ελληνικά").expect("doc");
        let pdf = render(&doc);
        assert_eq!(render(&doc), pdf, "deterministic for {buyer:?}");
        let text = text_of(&pdf);
        let flat_text = flat(&text);
        assert!(flat_text.contains(ID_A), "{buyer:?}: {flat_text}");
        assert!(flat_text.contains("EUR 9.99"), "{buyer:?}: {flat_text}");
        // Latin-1 characters come through; the others are question marks.
        assert!(flat_text.contains("Händler – ????????"), "{flat_text}");
        assert!(
            flat_text.contains("Ünïcødé-Schuh “Größe 42” — ?"),
            "{flat_text}"
        );
        let expected = match buyer {
            "用户-42" => "??-42".to_owned(),
            "пользователь" => "????????????".to_owned(),
            "🙂🙃" => "??".to_owned(),
            "e\u{0301}" => "e?".to_owned(),
            other => other.to_owned(),
        };
        let joined: String = text.split_whitespace().collect();
        assert!(joined.contains(&expected), "{expected:?} not in {joined:?}");
    }
}

#[test]
fn an_unpaid_order_gets_no_document() {
    let sale = sale(money(1250, "EUR"));
    for status in [
        OrderStatus::Accepted,
        OrderStatus::Persisted,
        OrderStatus::PaymentPending,
        OrderStatus::PaymentFailed,
        OrderStatus::Expired,
    ] {
        let mut order = paid_order(ID_A, "buyer-7", &sale, 1);
        order.status = status;
        order.history.retain(|h| h.status != OrderStatus::Paid);
        let err = Document::for_order(&order, &sale, SELLER).expect_err("refused");
        assert_eq!(
            err,
            NotReceiptable::NotSettled {
                order_id: order.new.order_id,
                status,
                refund: None
            }
        );
        assert!(err.to_string().contains(ID_A), "{err}");
        assert_eq!(Kind::of(&order), None);
    }
    // A late charge whose refund is still owed, or was refused: no refund note yet.
    for state in [RefundState::Owed, RefundState::Refused] {
        let mut order = refunded_order(&sale);
        order.refund = Some(state);
        let err = Document::for_order(&order, &sale, SELLER).expect_err("refused");
        assert!(
            err.to_string()
                .ends_with(&format!("is expired with its refund {state}: only a paid order gets a receipt and only a refunded one a refund note")),
            "{err}"
        );
    }
}

#[test]
fn incomplete_orders_are_refused_with_the_reason() {
    let sale = sale(money(1250, "EUR"));
    let order = paid_order(ID_A, "buyer-7", &sale, 1);
    let id: OrderId = ID_A.parse().expect("id");

    let mut listed = order.clone();
    listed.history.clear(); // as orders_of_sale returns it
    assert_eq!(
        Document::for_order(&listed, &sale, SELLER),
        Err(NotReceiptable::NoPaidEntry { order_id: id })
    );

    let mut no_charge = order.clone();
    no_charge.charge_id = None;
    assert_eq!(
        Document::for_order(&no_charge, &sale, SELLER),
        Err(NotReceiptable::NoChargeId { order_id: id })
    );

    let mut other = sale.clone();
    other.id = SaleId::parse("another").expect("sale id");
    assert!(matches!(
        Document::for_order(&order, &other, SELLER),
        Err(NotReceiptable::WrongSale { .. })
    ));
}

#[test]
fn a_refunded_order_gets_a_refund_note() {
    let sale = sale(money(1250, "EUR"));
    let order = refunded_order(&sale);
    let doc = Document::for_order(&order, &sale, SELLER).expect("refund note");
    assert_eq!(doc.kind, Kind::RefundNote);
    assert_eq!(doc.paid_at, None);
    let text = flat(&text_of(&render(&doc)));
    for needle in [
        "Refund note",
        SELLER,
        ID_A,
        "buyer-7",
        "Amount refunded EUR 25.00",
        "Charge refunded ch_late_1",
        "Order closed expired at 2026-11-23T10:15:00Z",
        "Refund refunded in full",
        "The charge ch_late_1 of EUR 25.00 was refunded to the buyer in full.",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
    assert!(!text.contains("Total paid"), "{text}");
    assert!(!text.contains("Charged at"), "{text}");

    // A store that keeps the paid that lost to the void status (Scylla) shows when it
    // was charged.
    let mut racing = order.clone();
    racing.history.push(HistoryEntry {
        status: OrderStatus::Paid,
        at: ts("2026-11-23T10:15:00.050Z"),
    });
    let doc = Document::for_order(&racing, &sale, SELLER).expect("refund note");
    let text = flat(&text_of(&render(&doc)));
    assert!(
        text.contains("Charged at 2026-11-23T10:15:00.05Z"),
        "{text}"
    );

    // Receipt and refund note of one order differ, in bytes and in key.
    let paid = paid_order(ID_A, "buyer-7", &sale, 2);
    assert_ne!(render(&receipt(&paid, &sale)), render(&doc));
    let id = order.new.order_id;
    assert_ne!(
        object_key(id, Kind::Receipt),
        object_key(id, Kind::RefundNote)
    );
}

#[test]
fn the_pdf_is_one_page_however_long_the_values() {
    let sale = sale(money(1250, "EUR"));
    let mut order = paid_order(ID_A, &"W".repeat(128), &sale, 2);
    order.charge_id = Some("ch_".repeat(200));
    let doc = Document::for_order(&order, &sale, &"Seller ".repeat(100)).expect("doc");
    let pages = pdf_extract::extract_text_from_mem_by_pages(&render(&doc)).expect("pages");
    assert_eq!(pages.len(), 1);
    let text = flat(&pages[0]);
    assert!(text.contains(ID_A), "{text}");
    assert!(text.contains("..."), "a cut value ends in ...: {text}");
}

/// Poppler reads the same text, where `pdftotext` is installed (Debian: poppler-utils).
/// Skipped, saying so, where it is not: the test command needs no system package.
#[test]
fn pdftotext_reads_it_too_where_installed() {
    let sale = sale(money(1250, "EUR"));
    let order = paid_order(ID_A, "zoë.müller", &sale, 2);
    let pdf = render(&receipt(&order, &sale));
    let dir = std::env::temp_dir().join(format!("receipts-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("receipt.pdf");
    std::fs::write(&path, &pdf).expect("write");
    let out = std::process::Command::new("pdftotext")
        .arg("-enc")
        .arg("UTF-8")
        .arg(&path)
        .arg("-")
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let Ok(out) = out else {
        eprintln!("pdftotext not installed: skipped");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = flat(&String::from_utf8_lossy(&out.stdout));
    for needle in [ID_A, "zoë.müller", "EUR 25.00", SELLER] {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
}
