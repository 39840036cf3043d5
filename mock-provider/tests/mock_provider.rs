//! The mock provider over real HTTP, and the provider clients against it.

use mock_provider::{MockConfig, MockProvider};
use settler::provider::{
    ChargeOutcome, NotificationKind, PaymentClient, ProviderError, RetryPolicy,
};
use settler::NotificationClient;
use std::time::Duration;
use storage::{Currency, Money, NewOrder, OrderId, SaleId, Timestamp, UserId};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn post(url: String, key: Option<&str>, body: serde_json::Value) -> (u16, serde_json::Value) {
    let mut req = http().post(url).json(&body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

fn charge_body(order_id: &str, token: &str) -> serde_json::Value {
    serde_json::json!({
        "order_id": order_id,
        "amount_minor": 1999,
        "currency": "EUR",
        "payment_token": token,
    })
}

fn new_order(token: &str) -> NewOrder {
    NewOrder {
        order_id: OrderId::new(),
        sale_id: SaleId::parse("sale-1").expect("sale"),
        user_id: UserId::parse("user-1").expect("user"),
        quantity: 1,
        amount: Money {
            minor: 500,
            currency: Currency::parse("EUR").expect("eur"),
        },
        sequence: 1,
        idempotency_key: "k".into(),
        payment_token: token.into(),
        accepted_at: Timestamp::now(),
    }
}

fn quick_retry(max_attempts: usize) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    }
}

#[tokio::test]
async fn a_repeated_charge_key_charges_once() {
    let m = MockProvider::start(MockConfig::default())
        .await
        .expect("start");
    let url = format!("{}/v1/charges", m.url());
    let (s1, b1) = post(
        url.clone(),
        Some("order-1"),
        charge_body("order-1", "tok_visa"),
    )
    .await;
    let (s2, b2) = post(url, Some("order-1"), charge_body("order-1", "tok_visa")).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1["status"], "succeeded");
    assert_eq!(b1["charge_id"], b2["charge_id"]);
    let a = mock_provider::fetch_order_audit(&m.url(), "order-1")
        .await
        .expect("audit")
        .expect("order seen");
    assert_eq!(a.successful_charges, 1);
    assert_eq!(a.charge_attempts, 2);
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.totals.charges, 1);
    assert_eq!(audit.totals.successful_charges, 1);
    m.stop().await;
}

#[tokio::test]
async fn reusing_a_key_for_another_charge_is_refused() {
    let m = MockProvider::start(MockConfig::default())
        .await
        .expect("start");
    let url = format!("{}/v1/charges", m.url());
    let (s1, _) = post(url.clone(), Some("k1"), charge_body("order-1", "tok_visa")).await;
    let (s2, b2) = post(url, Some("k1"), charge_body("order-2", "tok_visa")).await;
    assert_eq!((s1, s2), (200, 422));
    assert_eq!(b2["code"], "idempotency_key_reused");
}

#[tokio::test]
async fn declines_by_token_and_by_rate() {
    let m = MockProvider::start(MockConfig::default())
        .await
        .expect("start");
    let url = format!("{}/v1/charges", m.url());
    let (s, b) = post(
        url.clone(),
        Some("o-d"),
        charge_body("o-d", "tok_decline_insufficient"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(b["status"], "declined");
    mock_provider::update_config(
        &m.url(),
        &MockConfig {
            decline_rate: 1.0,
            ..MockConfig::default()
        },
    )
    .await
    .expect("config");
    let (_, b) = post(url, Some("o-r"), charge_body("o-r", "tok_visa")).await;
    assert_eq!(b["status"], "declined");
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.totals.declined_charges, 2);
    assert_eq!(audit.totals.successful_charges, 0);
    assert_eq!(audit.orders["o-d"].declined_charges, 1);
}

#[tokio::test]
async fn injected_errors_record_nothing_and_lookup_tells() {
    let m = MockProvider::start(MockConfig {
        error_rate: 1.0,
        ..MockConfig::default()
    })
    .await
    .expect("start");
    let url = format!("{}/v1/charges", m.url());
    let (s, b) = post(url.clone(), Some("o-1"), charge_body("o-1", "tok_visa")).await;
    assert_eq!(s, 500);
    assert_eq!(b["code"], "injected_error");
    let lookup = http()
        .get(format!("{url}/o-1"))
        .send()
        .await
        .expect("lookup");
    assert_eq!(lookup.status().as_u16(), 404);

    mock_provider::update_config(&m.url(), &MockConfig::default())
        .await
        .expect("config");
    let (s, b) = post(url.clone(), Some("o-1"), charge_body("o-1", "tok_visa")).await;
    assert_eq!(s, 200);
    let found: serde_json::Value = http()
        .get(format!("{url}/o-1"))
        .send()
        .await
        .expect("lookup")
        .json()
        .await
        .expect("json");
    assert_eq!(found["charge_id"], b["charge_id"]);
    assert_eq!(found["status"], "succeeded");
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.totals.errors, 1);
    assert_eq!(audit.totals.charges, 1);
}

#[tokio::test]
async fn refuses_bad_requests_with_problem_json() {
    let m = MockProvider::start(MockConfig::default())
        .await
        .expect("start");
    let url = format!("{}/v1/charges", m.url());
    let resp = http()
        .post(&url)
        .json(&charge_body("o", "tok"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(
        resp.headers()["content-type"].to_str().ok(),
        Some("application/problem+json")
    );
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "missing_idempotency_key");
    let (s, b) = post(url, Some("k"), serde_json::json!({"order_id": "o"})).await;
    assert_eq!(s, 400);
    assert_eq!(b["code"], "invalid_body");
    let health = http()
        .get(format!("{}/healthz", m.url()))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);
    assert!(mock_provider::update_config(
        &m.url(),
        &MockConfig {
            error_rate: 2.0,
            ..MockConfig::default()
        }
    )
    .await
    .is_err());
}

#[tokio::test]
async fn notifications_are_deduplicated_by_key() {
    let m = MockProvider::start(MockConfig::default())
        .await
        .expect("start");
    let url = format!("{}/v1/notifications", m.url());
    let body = serde_json::json!({"order_id": "o-1", "user_id": "u-1", "kind": "order_paid"});
    let (s1, _) = post(url.clone(), Some("o-1:order_paid"), body.clone()).await;
    let (s2, b2) = post(url, Some("o-1:order_paid"), body).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(b2["duplicate"], true);
    let a = mock_provider::fetch_order_audit(&m.url(), "o-1")
        .await
        .expect("audit")
        .expect("seen");
    assert_eq!(a.notifications, vec![NotificationKind::OrderPaid]);
    assert_eq!(a.duplicate_notifications, 1);
    assert_eq!(
        mock_provider::fetch_order_audit(&m.url(), "nobody")
            .await
            .expect("audit"),
        None
    );
}

#[tokio::test]
async fn clients_charge_refund_and_notify_idempotently() {
    let m = MockProvider::start(MockConfig::default())
        .await
        .expect("start");
    let pay = PaymentClient::new(&m.url(), Duration::from_secs(2), quick_retry(3)).expect("client");
    let order = new_order("tok_visa");
    let first = pay.charge(&order).await.expect("charge");
    let again = pay.charge(&order).await.expect("charge again");
    assert_eq!(first, again);
    let ChargeOutcome::Succeeded { charge_id } = first else {
        panic!("expected a success, got {first:?}");
    };
    let key = PaymentClient::charge_key(order.order_id);
    assert_eq!(pay.lookup(&key).await.expect("lookup"), Some(again));
    assert_eq!(pay.lookup("never-charged").await.expect("lookup"), None);
    let declined = pay
        .charge(&new_order("tok_decline_x"))
        .await
        .expect("charge");
    assert_eq!(declined, ChargeOutcome::Declined);

    let r1 = pay
        .refund(order.order_id, &charge_id)
        .await
        .expect("refund");
    let r2 = pay
        .refund(order.order_id, &charge_id)
        .await
        .expect("refund again");
    assert_eq!(r1, r2);

    let notify =
        NotificationClient::new(&m.url(), Duration::from_secs(2), quick_retry(3)).expect("client");
    for _ in 0..2 {
        notify
            .notify(order.order_id, &order.user_id, NotificationKind::OrderPaid)
            .await
            .expect("notify");
    }
    let a = mock_provider::fetch_order_audit(&m.url(), &order.order_id.to_string())
        .await
        .expect("audit")
        .expect("seen");
    assert_eq!(a.successful_charges, 1);
    assert_eq!(a.charge_attempts, 2);
    assert_eq!(a.refunds, 1);
    assert_eq!(a.notifications, vec![NotificationKind::OrderPaid]);
    assert_eq!(a.duplicate_notifications, 1);
}

#[tokio::test]
async fn the_client_retries_5xx_but_not_4xx() {
    let m = MockProvider::start(MockConfig {
        error_rate: 1.0,
        ..MockConfig::default()
    })
    .await
    .expect("start");
    let pay = PaymentClient::new(&m.url(), Duration::from_secs(2), quick_retry(3)).expect("client");
    let err = pay
        .charge(&new_order("tok_visa"))
        .await
        .expect_err("provider down");
    assert!(
        matches!(err, ProviderError::Unavailable(s) if s.as_u16() == 500),
        "{err:?}"
    );
    assert!(err.is_retryable());
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.totals.errors, 3, "three attempts in all");
    assert_eq!(audit.totals.charges, 0);

    // A refund of an unknown charge is a 404: refused at once, not retried.
    let err = pay
        .refund(OrderId::new(), "ch_unknown")
        .await
        .expect_err("unknown charge");
    assert!(
        matches!(&err, ProviderError::Rejected { status, code } if status.as_u16() == 404 && code == "unknown_charge"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_timed_out_charge_is_looked_up_before_it_is_sent_again() {
    // The mock records the charge, then answers after 400 ms; the client gives up after
    // 100 ms, looks the charge up and finds it.
    let m = MockProvider::start(MockConfig {
        latency: Duration::from_millis(400),
        ..MockConfig::default()
    })
    .await
    .expect("start");
    let pay =
        PaymentClient::new(&m.url(), Duration::from_millis(100), quick_retry(3)).expect("client");
    let order = new_order("tok_visa");
    let outcome = pay.charge(&order).await.expect("charge");
    assert!(matches!(outcome, ChargeOutcome::Succeeded { .. }));
    let a = mock_provider::fetch_order_audit(&m.url(), &order.order_id.to_string())
        .await
        .expect("audit")
        .expect("seen");
    assert_eq!(
        a.charge_attempts, 1,
        "the lookup found it: no second charge request"
    );
    assert_eq!(a.successful_charges, 1);
}

#[tokio::test]
async fn a_stopped_mock_refuses_connections() {
    let m = MockProvider::start(MockConfig::default())
        .await
        .expect("start");
    let url = m.url();
    m.stop().await;
    let pay = PaymentClient::new(&url, Duration::from_millis(500), quick_retry(2)).expect("client");
    let err = pay.lookup("x").await.expect_err("no server");
    assert!(matches!(err, ProviderError::Transport(_)), "{err:?}");
}

#[tokio::test]
async fn a_down_provider_answers_503_to_everything_and_records_nothing() {
    let m = MockProvider::start(MockConfig {
        down: true,
        ..MockConfig::default()
    })
    .await
    .expect("start");
    let url = format!("{}/v1/charges", m.url());
    let (s, b) = post(url.clone(), Some("o-1"), charge_body("o-1", "tok_visa")).await;
    assert_eq!(s, 503);
    assert_eq!(b["code"], "provider_down");
    let lookup = http()
        .get(format!("{url}/o-1"))
        .send()
        .await
        .expect("lookup");
    assert_eq!(lookup.status().as_u16(), 503);
    let (s, _) = post(
        format!("{}/v1/refunds", m.url()),
        Some("o-1:refund"),
        serde_json::json!({"order_id": "o-1", "charge_id": "ch_x"}),
    )
    .await;
    assert_eq!(s, 503);
    let (s, _) = post(
        format!("{}/v1/notifications", m.url()),
        Some("o-1:order_paid"),
        serde_json::json!({"order_id": "o-1", "user_id": "u", "kind": "order_paid"}),
    )
    .await;
    assert_eq!(s, 503);
    // The admin routes still work: the outage ends at run time.
    mock_provider::update_config(&m.url(), &MockConfig::default())
        .await
        .expect("config");
    let (s, _) = post(url, Some("o-1"), charge_body("o-1", "tok_visa")).await;
    assert_eq!(s, 200);
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.totals.unavailable, 4);
    assert_eq!(audit.totals.charges, 1);
    assert_eq!(audit.totals.notifications, 0);
}

#[tokio::test]
async fn a_lost_answer_is_charged_and_a_retry_gets_the_same_charge() {
    let m = MockProvider::start(MockConfig {
        lost_answer_rate: 1.0,
        ..MockConfig::default()
    })
    .await
    .expect("start");
    let url = format!("{}/v1/charges", m.url());
    let err = http()
        .post(&url)
        .header("Idempotency-Key", "o-1")
        .json(&charge_body("o-1", "tok_visa"))
        .send()
        .await
        .expect_err("the connection closes without an answer");
    assert!(!err.is_timeout(), "{err:?}");
    let found: serde_json::Value = http()
        .get(format!("{url}/o-1"))
        .send()
        .await
        .expect("lookup")
        .json()
        .await
        .expect("json");
    assert_eq!(found["status"], "succeeded", "charged all the same");

    // The client retries the lost answer under the same key: one charge, found again.
    let pay = PaymentClient::new(&m.url(), Duration::from_secs(2), quick_retry(3)).expect("client");
    let order = new_order("tok_visa");
    let err = pay.charge(&order).await.expect_err("every answer is lost");
    assert!(matches!(err, ProviderError::Transport(_)), "{err:?}");
    assert!(err.is_retryable());
    mock_provider::update_config(&m.url(), &MockConfig::default())
        .await
        .expect("config");
    let outcome = pay.charge(&order).await.expect("charge");
    assert!(matches!(outcome, ChargeOutcome::Succeeded { .. }));
    let a = mock_provider::fetch_order_audit(&m.url(), &order.order_id.to_string())
        .await
        .expect("audit")
        .expect("seen");
    assert_eq!(a.successful_charges, 1, "one charge whatever the retries");
    assert_eq!(a.charge_attempts, 4);
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.totals.lost_answers, 4);
}

#[tokio::test]
async fn a_hung_request_times_out_records_nothing_and_does_not_hold_up_stop() {
    let m = MockProvider::start(MockConfig {
        timeout_rate: 1.0,
        hang: Duration::from_secs(120),
        ..MockConfig::default()
    })
    .await
    .expect("start");
    let pay =
        PaymentClient::new(&m.url(), Duration::from_millis(100), quick_retry(2)).expect("client");
    let order = new_order("tok_visa");
    let err = pay.charge(&order).await.expect_err("hangs");
    assert!(matches!(err, ProviderError::Timeout), "{err:?}");
    // The second attempt looked the charge up first (the first timed out): nothing there.
    let key = PaymentClient::charge_key(order.order_id);
    assert_eq!(pay.lookup(&key).await.expect("lookup"), None);
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.totals.charges, 0);
    assert_eq!(audit.totals.timeouts, 2, "two attempts, both hung");
    // A request still hanging does not keep the mock from stopping.
    let url = m.url();
    let hanging = tokio::spawn(async move {
        http()
            .post(format!("{url}/v1/charges"))
            .header("Idempotency-Key", "o-h")
            .json(&charge_body("o-h", "tok_visa"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = mock_provider::fetch_audit(&m.url()).await.expect("audit");
        if now.totals.timeouts > audit.totals.timeouts {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), m.stop())
        .await
        .expect("the mock stops promptly");
    let answered = hanging.await.expect("join");
    assert_eq!(answered.ok(), Some(504));
}

#[tokio::test]
async fn a_rejected_token_is_a_4xx_refusal_not_a_decline() {
    let m = MockProvider::start(MockConfig::default())
        .await
        .expect("start");
    let pay = PaymentClient::new(&m.url(), Duration::from_secs(2), quick_retry(3)).expect("client");
    let order = new_order("tok_reject_expired");
    let err = pay.charge(&order).await.expect_err("refused");
    assert!(
        matches!(&err, ProviderError::Rejected { status, code } if status.as_u16() == 422 && code == "invalid_payment_token"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let a = mock_provider::fetch_order_audit(&m.url(), &order.order_id.to_string())
        .await
        .expect("audit")
        .expect("seen");
    assert_eq!(a.refused_charges, 1, "refused once: a 4xx is not retried");
    assert_eq!(a.charge_attempts, 0);
    assert_eq!(
        pay.lookup(&PaymentClient::charge_key(order.order_id))
            .await
            .expect("lookup"),
        None
    );
}

#[tokio::test]
async fn the_audit_stays_bounded_past_its_cap_and_pages_by_cursor() {
    let cap = 40;
    let m = MockProvider::start(MockConfig {
        audit_cap: cap,
        ..MockConfig::default()
    })
    .await
    .expect("start");
    let url = format!("{}/v1/charges", m.url());
    let orders = 100;
    for i in 0..orders {
        let id = format!("o-{i:03}");
        let (status, _) = post(url.clone(), Some(&id), charge_body(&id, "tok_visa")).await;
        assert_eq!(status, 200);
    }
    // Totals count every order; detail is kept for the last `cap` orders seen.
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.totals.charges, orders);
    assert_eq!(audit.totals.successful_charges, orders);
    assert_eq!(audit.orders.len(), cap);
    assert_eq!(audit.pruned, orders - cap as u64);
    let kept: Vec<String> = (orders - cap as u64..orders)
        .map(|i| format!("o-{i:03}"))
        .collect();
    assert_eq!(audit.orders.keys().cloned().collect::<Vec<_>>(), kept);
    assert!(mock_provider::fetch_order_audit(&m.url(), "o-000")
        .await
        .expect("audit")
        .is_none());
    // A retry of a pruned order still finds its charge (the ledger keeps it).
    let (status, body) = post(url.clone(), Some("o-000"), charge_body("o-000", "tok_visa")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("succeeded")));
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.totals.charges, orders);
    assert_eq!(audit.orders.len(), cap);

    // Pages of 15 by cursor: every kept order once, in order id order.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = http()
            .get(format!("{}/v1/audit", m.url()))
            .query(&[("limit", "15")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let page: serde_json::Value = req.send().await.expect("send").json().await.expect("json");
        let keys = page["orders"].as_object().expect("orders");
        assert!(keys.len() <= 15);
        seen.extend(keys.keys().cloned());
        assert_eq!(page["totals"]["charges"], orders);
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let mut want: Vec<String> = audit.orders.keys().cloned().collect();
    want.sort();
    assert_eq!(seen, want);
    let bad = http()
        .get(format!("{}/v1/audit?limit=0", m.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(bad.status().as_u16(), 400);

    // Lowering the cap at run time drops the excess at once.
    mock_provider::update_config(
        &m.url(),
        &MockConfig {
            audit_cap: 5,
            ..MockConfig::default()
        },
    )
    .await
    .expect("config");
    let audit = mock_provider::fetch_audit(&m.url()).await.expect("audit");
    assert_eq!(audit.orders.len(), 5);
    assert_eq!(audit.totals.charges, orders);
    m.stop().await;
}
