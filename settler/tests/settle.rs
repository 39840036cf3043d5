//! The settle loop end to end on real components: SQLite store, file log, mock provider
//! over HTTP.

mod common;

use common::{eventually, record, Harness, DEADLINE};
use mock_provider::MockConfig;
use std::time::Duration;
use storage::{OrderStatus, OrderStore};

fn records(n: u64) -> Vec<sequencer::OrderRecord> {
    (0..n)
        .map(|i| {
            record(
                i,
                if i % 7 == 3 {
                    "tok_decline_card"
                } else {
                    "tok_visa"
                },
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_every_order_exactly_once() {
    let h = Harness::new(MockConfig::default()).await;
    let records = h.append(records(300)).await;
    let running = h.start(h.config()).await;
    h.wait_settled(records.len()).await;
    let stats = running.stats.snapshot();
    running.stop().await;

    h.check_exactly_once(&records).await;
    let failed = records
        .iter()
        .filter(|r| r.payment_token.starts_with("tok_decline"))
        .count() as u64;
    assert_eq!(stats.persisted, 300);
    assert_eq!(stats.paid + stats.payment_failed, 300);
    assert_eq!(stats.payment_failed, failed);
    assert_eq!(stats.released, failed);
    assert_eq!(stats.notified, 300);
    assert_eq!(stats.dead_lettered, 0);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(
        h.store.checkpoint("settler", 0).await.expect("checkpoint"),
        Some(300)
    );
    let audit = mock_provider::fetch_audit(&h.mock.url())
        .await
        .expect("audit");
    assert_eq!(audit.totals.charges, 300);
    assert_eq!(audit.totals.successful_charges, 300 - failed);
    assert_eq!(audit.totals.notifications, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_a_poison_record_and_moves_on() {
    let h = Harness::new(MockConfig::default()).await;
    let mut all = h.append(records(10)).await;
    h.log
        .append_raw(b"not json".to_vec())
        .await
        .expect("append poison");
    all.extend(h.append(records(10)).await);
    let running = h.start(h.config()).await;
    h.wait_settled(all.len()).await;
    let stats = running.stats.snapshot();
    running.stop().await;

    h.check_exactly_once(&all).await;
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(h.dead_letter.count(), 1);
    let text = std::fs::read_to_string(h.dead_letter.path()).expect("dead-letter file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["offset"], 10);
    assert_eq!(lines[0]["payload"], "not json");
    assert_eq!(
        h.store.checkpoint("settler", 0).await.expect("checkpoint"),
        Some(21),
        "the checkpoint moves past the poison record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_opens_the_circuit_and_fails_no_order() {
    let h = Harness::new(MockConfig {
        down: true,
        ..MockConfig::default()
    })
    .await;
    let records = h.append(records(200)).await;
    let config = settler::SettlerConfig {
        circuit_failure_threshold: 3,
        circuit_cool_down: Duration::from_millis(300),
        ..h.config()
    };
    let running = h.start(config).await;

    // The circuit opens; every order is persisted all the same and none is failed.
    eventually(
        "circuit open and every order persisted",
        DEADLINE,
        || async {
            let s = running.stats.snapshot();
            s.circuit_open && s.persisted == records.len() as u64
        },
    )
    .await;
    // While it is open the provider is left alone: one probe per cool-down, not a charge
    // per order per sweep (that would be 200 orders x 2 attempts x 10 sweeps here).
    let seen = |a: mock_provider::Audit| a.totals.unavailable;
    let before = seen(
        mock_provider::fetch_audit(&h.mock.url())
            .await
            .expect("audit"),
    );
    let sweeps = running.stats.snapshot().sweeps;
    eventually("ten sweeps while the circuit is open", DEADLINE, || async {
        running.stats.snapshot().sweeps >= sweeps + 10
    })
    .await;
    let after = seen(
        mock_provider::fetch_audit(&h.mock.url())
            .await
            .expect("audit"),
    );
    assert!(
        after - before <= 60,
        "{} provider requests during ten sweeps of an open circuit",
        after - before
    );
    let orders = h.orders().await;
    assert_eq!(orders.len(), records.len());
    assert!(
        orders.iter().all(|o| matches!(
            o.status,
            OrderStatus::Persisted | OrderStatus::PaymentPending
        )),
        "no order may be failed or expired because the provider is down"
    );
    let stats = running.stats.snapshot();
    assert_eq!(stats.paid + stats.payment_failed + stats.expired, 0);
    assert!(stats.circuit_opened_total >= 1);
    let audit = mock_provider::fetch_audit(&h.mock.url())
        .await
        .expect("audit");
    assert_eq!(audit.totals.charges, 0, "a 503 records no charge");

    mock_provider::update_config(&h.mock.url(), &MockConfig::default())
        .await
        .expect("end the outage");
    h.wait_settled(records.len()).await;
    let stats = running.stats.snapshot();
    running.stop().await;
    assert!(
        !stats.circuit_open,
        "the circuit closed once the provider answered"
    );
    h.check_exactly_once(&records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_settler_finishes_the_work_exactly_once() {
    let h = Harness::new(MockConfig {
        latency: Duration::from_millis(2),
        latency_jitter: Duration::from_millis(4),
        seed: Some(11),
        ..MockConfig::default()
    })
    .await;
    let records = h.append(records(300)).await;
    let config = settler::SettlerConfig {
        batch_size: 32,
        charge_concurrency: 8,
        ..h.config()
    };

    let first = h.start(config.clone()).await;
    eventually("some orders settled", DEADLINE, || async {
        let s = first.stats.snapshot();
        s.paid + s.payment_failed >= 60
    })
    .await;
    let first_stats = first.stats.clone();
    first.stop().await;
    let first_stats = first_stats.snapshot();
    assert_eq!(first_stats.in_flight, 0, "claims are released on shutdown");
    let settled_before = h
        .orders()
        .await
        .iter()
        .filter(|o| o.status.is_final())
        .count();
    assert!(settled_before < records.len(), "stopped mid-way");

    let second = h.start(config).await;
    h.wait_settled(records.len()).await;
    let second_stats = second.stats.snapshot();
    second.stop().await;

    h.check_exactly_once(&records).await;
    assert_eq!(
        first_stats.persisted + second_stats.persisted,
        records.len() as u64,
        "each record persisted once across both runs"
    );
    assert_eq!(
        first_stats.paid
            + first_stats.payment_failed
            + second_stats.paid
            + second_stats.payment_failed,
        records.len() as u64,
        "each order moved to a final status once across both runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_aborted_before_its_record_landed_is_cancelled_not_charged() {
    let h = Harness::new(MockConfig::default()).await;
    let records = records(20);
    let aborted: Vec<_> = records.iter().step_by(5).map(|r| r.order_id).collect();
    for id in &aborted {
        h.release.abort(*id);
    }
    let records = h.append(records).await;
    let running = h.start(h.config()).await;
    h.wait_settled(records.len()).await;
    running.stop().await;
    let audit = mock_provider::fetch_audit(&h.mock.url())
        .await
        .expect("audit");
    for id in &aborted {
        let order = h.store.get_order(*id).await.expect("get").expect("stored");
        assert_eq!(order.status, OrderStatus::Expired, "aborted order {id}");
        assert!(order.released_at.is_some());
        let a = audit.orders.get(&id.to_string());
        assert_eq!(a.map_or(0, |a| a.charge_attempts), 0, "never charged");
    }
    let charged = audit
        .orders
        .values()
        .filter(|a| a.charge_attempts > 0)
        .count();
    assert_eq!(charged, records.len() - aborted.len());
}
