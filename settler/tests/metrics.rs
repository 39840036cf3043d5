//! The settler's and the mock provider's metrics move with what they do, read from the
//! encoded exposition: settled orders count their events, transitions, provider calls and
//! paid delay; a provider that is down opens the breaker (state gauge 2); the mock's
//! `GET /metrics` counts its requests.
//!
//! The settler's families are process-global. nextest runs each test in a process of its
//! own; under plain `cargo test` other tests of this binary may add to them meanwhile, so
//! counts are compared as "at least".

mod common;

use common::{eventually, record, Harness, DEADLINE};
use mock_provider::MockConfig;
use sequencer::OrderRecord;
use settler::provider::{ChargeOutcome, PaymentClient, RetryPolicy};
use settler::SettlerConfig;
use std::time::Duration;

/// The settler's exposition, from a fresh registry (as a process registers it).
fn scrape() -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    settler::metrics::register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
    text
}

/// The value of `series` (name and labels exactly as encoded) in `text`; `None` if absent.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn at_least(text: &str, series: &str, min: f64) {
    let v = value(text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
    assert!(v >= min, "{series} = {v}, want at least {min}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_orders_move_the_settler_and_provider_families() {
    let h = Harness::new(MockConfig::default()).await;
    let mut records: Vec<OrderRecord> = (0..10).map(|i| record(i, "tok_visa")).collect();
    records.extend((10..15).map(|i| record(i, "tok_decline_card")));
    let records = h.append(records).await;
    let running = h.start(h.config()).await;
    h.wait_settled(records.len()).await;
    h.check_exactly_once(&records).await;

    let text = scrape();
    for (event, n) in [
        ("persisted", 15.0),
        ("charged", 15.0),
        ("paid", 10.0),
        ("payment_failed", 5.0),
        ("released", 5.0),
        ("notified", 15.0),
    ] {
        at_least(
            &text,
            &format!("flashsale_settler_orders_total{{event=\"{event}\"}}"),
            n,
        );
    }
    for (from, to, n) in [
        ("accepted", "persisted", 15.0),
        ("persisted", "payment_pending", 15.0),
        ("payment_pending", "paid", 10.0),
        ("payment_pending", "payment_failed", 5.0),
    ] {
        at_least(
            &text,
            &format!("flashsale_settler_transitions_total{{from=\"{from}\",to=\"{to}\"}}"),
            n,
        );
    }
    let calls = "flashsale_provider_calls_total";
    at_least(
        &text,
        &format!("{calls}{{provider=\"payment\",op=\"charge\",outcome=\"succeeded\"}}"),
        10.0,
    );
    at_least(
        &text,
        &format!("{calls}{{provider=\"payment\",op=\"charge\",outcome=\"declined\"}}"),
        5.0,
    );
    at_least(
        &text,
        &format!("{calls}{{provider=\"notification\",op=\"notify\",outcome=\"succeeded\"}}"),
        15.0,
    );
    at_least(
        &text,
        "flashsale_provider_call_duration_seconds_count{provider=\"payment\",op=\"charge\"}",
        15.0,
    );
    at_least(&text, "flashsale_order_paid_delay_seconds_count", 10.0);
    at_least(&text, "flashsale_settler_write_batch_changes_count", 1.0);
    at_least(&text, "flashsale_settler_write_batch_changes_sum", 15.0);
    at_least(&text, "flashsale_breaker_state{provider=\"payment\"}", 0.0);
    at_least(
        &text,
        "flashsale_breaker_state{provider=\"notification\"}",
        0.0,
    );
    at_least(
        &text,
        "flashsale_settler_queue_depth{queue=\"charge\"}",
        0.0,
    );
    assert!(
        value(&text, "flashsale_settler_dead_letters_total").is_some(),
        "{text}"
    );

    // Sampled on their own ticks (the lag once a second, the outbox by the publisher and
    // the sweep): each settles at 0 once everything is done.
    eventually(
        "lag, backlogs and charges in flight at 0",
        DEADLINE,
        || async {
            let text = scrape();
            [
                "flashsale_settler_lag_records{partition=\"0\"}",
                "flashsale_settler_outbox_backlog{kind=\"events\"}",
                "flashsale_settler_outbox_backlog{kind=\"notifications\"}",
                "flashsale_settler_charges_in_flight",
            ]
            .iter()
            .all(|series| value(&text, series) == Some(0.0))
        },
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_provider_opens_the_breaker_and_its_gauge_reads_open() {
    let h = Harness::new(MockConfig {
        down: true,
        ..MockConfig::default()
    })
    .await;
    h.append((0..5).map(|i| record(i, "tok_visa")).collect())
        .await;
    let config = SettlerConfig {
        circuit_failure_threshold: 2,
        // Long enough that the breaker stays open while the test reads it.
        circuit_cool_down: Duration::from_secs(600),
        ..h.config()
    };
    let running = h.start(config).await;
    let state = "flashsale_breaker_state{provider=\"payment\"}";
    eventually("the payment breaker reads open", DEADLINE, || async {
        value(&scrape(), state) == Some(2.0)
    })
    .await;
    let text = scrape();
    at_least(
        &text,
        "flashsale_breaker_openings_total{provider=\"payment\"}",
        1.0,
    );
    at_least(
        &text,
        "flashsale_provider_calls_total{provider=\"payment\",op=\"charge\",outcome=\"server_error\"}",
        2.0,
    );
    assert_eq!(
        running.stats.snapshot().paid,
        0,
        "nothing is paid while the provider is down"
    );

    // Orders read while the circuit is open are persisted and left for the sweep.
    h.append((5..12).map(|i| record(i, "tok_visa")).collect())
        .await;
    eventually("orders deferred while open", DEADLINE, || async {
        value(
            &scrape(),
            "flashsale_settler_orders_total{event=\"deferred\"}",
        )
        .is_some_and(|v| v >= 7.0)
    })
    .await;
    assert_eq!(value(&scrape(), state), Some(2.0));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_serves_its_own_metrics_and_counts_a_charge() {
    let h = Harness::new(MockConfig::default()).await;
    let http = reqwest::Client::new();
    let mock_metrics = || {
        let http = http.clone();
        let url = format!("{}/metrics", h.mock.url());
        async move {
            // As Prometheus asks; without it the text format 0.0.4 comes back.
            let response = http
                .get(url)
                .header("accept", "application/openmetrics-text; version=1.0.0")
                .send()
                .await
                .expect("GET /metrics");
            assert!(response.status().is_success());
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert!(
                content_type.starts_with("application/openmetrics-text"),
                "{content_type}"
            );
            response.text().await.expect("body")
        }
    };
    let charges = "flashsale_mock_requests_total{route=\"charge\",outcome=\"ok\"}";
    assert_eq!(value(&mock_metrics().await, charges), None);

    let pay = PaymentClient::new(
        &h.mock.url(),
        Duration::from_secs(2),
        RetryPolicy::default(),
    )
    .expect("client");
    let outcome = pay
        .charge(&record(1, "tok_visa").to_new_order())
        .await
        .expect("charge");
    assert!(matches!(outcome, ChargeOutcome::Succeeded { .. }));
    let missing = http
        .get(format!("{}/no/such/route", h.mock.url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(missing.status(), 404);

    let text = mock_metrics().await;
    assert_eq!(value(&text, charges), Some(1.0), "{text}");
    assert_eq!(
        value(
            &text,
            "flashsale_mock_request_duration_seconds_count{route=\"charge\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "flashsale_mock_requests_total{route=\"not_found\",outcome=\"not_found\"}"
        ),
        Some(1.0)
    );
    assert!(
        text.contains("route=\"metrics\""),
        "the scrape before counts"
    );
    assert!(
        !text.contains("flashsale_settler_"),
        "the mock serves its own registry"
    );
}
