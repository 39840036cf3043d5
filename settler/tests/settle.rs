//! The settle loop end to end on real components: SQLite store, file log, mock provider
//! over HTTP.

mod common;

use common::{record, wait_until, Harness, DEADLINE};
use settler::mock::{self, MockConfig};
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
    let audit = mock::fetch_audit(&h.mock.url()).await.expect("audit");
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
async fn a_provider_outage_leaves_orders_pending_until_it_ends() {
    let h = Harness::new(MockConfig {
        error_rate: 1.0,
        ..MockConfig::default()
    })
    .await;
    let records = h.append(records(50)).await;
    let running = h.start(h.config()).await;

    // Every order reaches payment_pending and the provider keeps failing: nothing may be
    // failed because the provider is down. Wait for a second round of charges (the sweep).
    wait_until("all orders pending and charged twice", DEADLINE, || async {
        let pending = h
            .store
            .orders_in_status(&[OrderStatus::PaymentPending], 1000)
            .await
            .expect("orders")
            .len();
        let errors = mock::fetch_audit(&h.mock.url())
            .await
            .map(|a| a.totals.errors)
            .unwrap_or(0);
        pending == records.len() && errors >= 2 * 2 * records.len() as u64
    })
    .await;
    let orders = h.orders().await;
    assert!(orders
        .iter()
        .all(|o| o.status == OrderStatus::PaymentPending));
    let stats = running.stats.snapshot();
    assert_eq!(stats.paid + stats.payment_failed, 0);
    assert!(stats.provider_errors >= records.len() as u64);
    let audit = mock::fetch_audit(&h.mock.url()).await.expect("audit");
    assert_eq!(audit.totals.charges, 0, "a 500 records no charge");

    mock::update_config(&h.mock.url(), &MockConfig::default())
        .await
        .expect("end the outage");
    h.wait_settled(records.len()).await;
    running.stop().await;
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
    wait_until("some orders settled", DEADLINE, || async {
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
    let audit = mock::fetch_audit(&h.mock.url()).await.expect("audit");
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
