//! The settler against a misbehaving provider: hangs, lost answers, refusals, stale orders,
//! crashes; and the publishing of status changes.

mod common;

use common::{eventually, record, Harness, DEADLINE};
use mock_provider::MockConfig;
use sequencer::OrderRecord;
use settler::provider::{ChargeOutcome, NotificationKind, PaymentClient, RetryPolicy};
use settler::{RecordingEventSink, SettlerConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use storage::{NewOrder, OrderId, OrderStatus, OrderStore, Timestamp};
use tokio_util::sync::CancellationToken;

fn visa(n: u64) -> Vec<OrderRecord> {
    (0..n).map(|i| record(i, "tok_visa")).collect()
}

/// An order as a previous settler left it: persisted and moved to `payment_pending`.
async fn seed_pending(h: &Harness, order: &NewOrder) {
    h.store
        .persist_batch(std::slice::from_ref(order), None)
        .await
        .expect("persist");
    assert!(h
        .store
        .transition(
            order.order_id,
            OrderStatus::Persisted,
            OrderStatus::PaymentPending,
            None
        )
        .await
        .expect("pending"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intake_waits_for_a_slow_provider_and_keeps_persisting_while_it_hangs() {
    // First the provider is slow but healthy (the circuit stays closed): charging two at a
    // time at 250 ms each. The intake waits for room in the charge queue instead of
    // persisting everything and leaving what does not fit to the sweep: it stays at most a
    // poll batch, the queue and the orders under way ahead of charging.
    let h = Harness::new(MockConfig {
        latency: Duration::from_millis(250),
        ..MockConfig::default()
    })
    .await;
    let mut records = h.append(visa(300)).await;
    let (batch_size, charge_queue, charge_concurrency) = (16, 8, 2);
    let config = SettlerConfig {
        batch_size,
        charge_queue,
        charge_concurrency,
        provider_timeout: Duration::from_millis(400),
        circuit_failure_threshold: 3,
        circuit_cool_down: Duration::from_millis(500),
        ..h.config()
    };
    let running = h.start(config).await;
    let persisted = |n: usize| {
        let stats = running.stats.clone();
        move || {
            let stats = stats.clone();
            async move { stats.snapshot().persisted == n as u64 }
        }
    };
    eventually("ten orders charged", DEADLINE, || async {
        let s = running.stats.snapshot();
        s.paid + s.payment_failed >= 10
    })
    .await;
    let stats = running.stats.snapshot();
    // What was read from the log and not yet settled: the batch being handed over, the
    // queue, the charges under way (and the orders between those places).
    let ahead = stats.persisted - (stats.paid + stats.payment_failed);
    let bound = (2 * batch_size + charge_queue + charge_concurrency) as u64;
    assert!(
        ahead <= bound,
        "{ahead} orders persisted ahead of charging (at most {bound}): the intake did not wait"
    );
    assert_eq!(stats.deferred, 0, "nothing was left for the sweep");
    assert_eq!(stats.circuit_opened_total, 0, "slow is not down");

    // Then every charge hangs past the client timeout: the circuit opens, persisting goes on.
    mock_provider::update_config(
        &h.mock.url(),
        &MockConfig {
            timeout_rate: 1.0,
            hang: Duration::from_secs(30),
            ..MockConfig::default()
        },
    )
    .await
    .expect("the provider hangs");
    eventually("the circuit opens", DEADLINE, || async {
        running.stats.snapshot().circuit_open
    })
    .await;
    records.extend(h.append(visa(300)).await);
    eventually(
        "every order persisted while the provider hangs",
        Duration::from_secs(10),
        persisted(records.len()),
    )
    .await;
    assert_eq!(
        h.store.checkpoint("settler", 0).await.expect("checkpoint"),
        Some(records.len() as u64)
    );
    let stats = running.stats.snapshot();
    assert_eq!(stats.payment_failed + stats.expired, 0);

    mock_provider::update_config(&h.mock.url(), &MockConfig::default())
        .await
        .expect("the provider answers again");
    h.wait_settled(records.len()).await;
    running.stop().await;
    h.check_exactly_once(&records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_errors_timeouts_and_lost_answers_charge_each_paid_order_once() {
    let h = Harness::new(MockConfig {
        latency: Duration::from_millis(1),
        latency_jitter: Duration::from_millis(2),
        slow_rate: 0.05,
        slow_latency: Duration::from_millis(40),
        decline_rate: 0.1,
        error_rate: 0.05,
        timeout_rate: 0.02,
        hang: Duration::from_secs(10),
        lost_answer_rate: 0.1,
        seed: Some(5),
        ..MockConfig::default()
    })
    .await;
    let records = h.append(visa(300)).await;
    let config = SettlerConfig {
        provider_timeout: Duration::from_millis(300),
        retry_max_attempts: 4,
        ..h.config()
    };
    let running = h.start(config).await;
    h.wait_settled(records.len()).await;
    let stats = running.stats.snapshot();
    running.stop().await;

    let audit = mock_provider::fetch_audit(&h.mock.url())
        .await
        .expect("audit");
    assert!(audit.totals.lost_answers > 0, "some answers were lost");
    assert!(audit.totals.timeouts > 0, "some requests hung");
    assert!(audit.totals.errors > 0, "some requests failed");
    let releases = h.release.calls();
    let (mut paid, mut failed) = (0u64, 0u64);
    for r in &records {
        let order = h
            .store
            .get_order(r.order_id)
            .await
            .expect("get")
            .expect("stored");
        let a = &audit.orders[&r.order_id.to_string()];
        assert_eq!(a.refunds, 0);
        match order.status {
            OrderStatus::Paid => {
                paid += 1;
                assert_eq!(a.successful_charges, 1, "order {}", r.order_id);
                assert_eq!(a.declined_charges, 0);
                assert!(order.charge_id.is_some());
                assert_eq!(
                    releases.get(&r.order_id),
                    None,
                    "a paid order keeps its stock"
                );
                assert_eq!(a.notifications, vec![NotificationKind::OrderPaid]);
            }
            OrderStatus::PaymentFailed => {
                failed += 1;
                assert_eq!(a.successful_charges, 0, "order {}", r.order_id);
                assert_eq!(a.declined_charges, 1);
                assert_eq!(releases.get(&r.order_id), Some(&1), "released once");
                assert_eq!(a.notifications, vec![NotificationKind::PaymentFailed]);
            }
            other => panic!("order {} ended {other}", r.order_id),
        }
    }
    assert!(failed > 0 && paid > failed, "paid {paid}, failed {failed}");
    assert_eq!((stats.paid, stats.payment_failed), (paid, failed));
    assert_eq!(audit.totals.successful_charges, paid);
    assert_eq!(audit.totals.notifications, records.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pending_orders_are_looked_up_then_expired_and_released_once() {
    let h = Harness::new(MockConfig::default()).await;
    let ttl = Duration::from_millis(300);
    // Left pending by a previous settler: one charged at the provider, one not.
    let charged = record(1, "tok_visa").to_new_order();
    let uncharged = record(2, "tok_visa").to_new_order();
    seed_pending(&h, &charged).await;
    seed_pending(&h, &uncharged).await;
    let pay = PaymentClient::new(
        &h.mock.url(),
        Duration::from_secs(2),
        RetryPolicy::default(),
    )
    .expect("client");
    let ChargeOutcome::Succeeded { charge_id } = pay.charge(&charged).await.expect("charge") else {
        panic!("expected a successful charge");
    };
    eventually("both orders pending past the TTL", DEADLINE, || async {
        let cutoff = Timestamp::now().plus_millis(-(ttl.as_millis() as i64));
        h.store
            .pending_since(cutoff, 10)
            .await
            .expect("stale")
            .len()
            == 2
    })
    .await;
    // And one the provider refuses: it stays pending until it expires.
    let refused = h.append(vec![record(3, "tok_reject_card")]).await;

    let config = SettlerConfig {
        payment_ttl: ttl,
        ..h.config()
    };
    let running = h.start(config).await;
    h.wait_settled(3).await;
    let stats = running.stats.snapshot();
    running.stop().await;

    let audit = mock_provider::fetch_audit(&h.mock.url())
        .await
        .expect("audit");
    let releases = h.release.calls();
    let order = |id: OrderId| {
        let store = Arc::clone(&h.store);
        async move { store.get_order(id).await.expect("get").expect("stored") }
    };

    let paid = order(charged.order_id).await;
    assert_eq!(
        paid.status,
        OrderStatus::Paid,
        "the charge found by lookup counts"
    );
    assert_eq!(paid.charge_id.as_deref(), Some(charge_id.as_str()));
    let a = &audit.orders[&charged.order_id.to_string()];
    assert_eq!(a.charge_attempts, 1, "looked up, not charged again");

    for id in [uncharged.order_id, refused[0].order_id] {
        let expired = order(id).await;
        assert_eq!(expired.status, OrderStatus::Expired, "order {id}");
        assert_eq!(releases.get(&id), Some(&1), "released once");
        let a = audit.orders[&id.to_string()].clone();
        assert_eq!(a.successful_charges, 0);
        assert_eq!(a.notifications, vec![NotificationKind::OrderExpired]);
    }
    let a = audit
        .orders
        .get(&uncharged.order_id.to_string())
        .cloned()
        .unwrap_or_default();
    assert_eq!(a.charge_attempts, 0, "a stale order is never charged");
    assert!(audit.orders[&refused[0].order_id.to_string()].refused_charges >= 1);
    assert_eq!(stats.expired, 2);
    assert_eq!(stats.released, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_the_provider_refuses_do_not_starve_the_sweep() {
    // The 10 oldest orders are refused (422) and stay pending; the sweep reads 5 at a time.
    let h = Harness::new(MockConfig::default()).await;
    let refused: Vec<NewOrder> = (0..10)
        .map(|i| record(i, "tok_reject_card").to_new_order())
        .collect();
    let good: Vec<NewOrder> = (10..30)
        .map(|i| record(i, "tok_visa").to_new_order())
        .collect();
    h.store
        .persist_batch(&refused, None)
        .await
        .expect("persist");
    h.store.persist_batch(&good, None).await.expect("persist");
    let config = SettlerConfig {
        sweep_limit: 5,
        sweep_interval: Duration::from_millis(50),
        ..h.config()
    };
    let running = h.start(config).await;
    eventually(
        "every order the provider accepts is paid",
        Duration::from_secs(20),
        || async {
            let paid = h
                .store
                .orders_in_status(&[OrderStatus::Paid], 100)
                .await
                .expect("orders");
            paid.len() == good.len() && paid.iter().all(|o| o.notified_at.is_some())
        },
    )
    .await;
    running.stop().await;
    let audit = mock_provider::fetch_audit(&h.mock.url())
        .await
        .expect("audit");
    for o in &refused {
        let stored = h
            .store
            .get_order(o.order_id)
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(stored.status, OrderStatus::PaymentPending);
        let tries = audit.orders[&o.order_id.to_string()].refused_charges;
        assert!(
            (1..=10).contains(&tries),
            "a refused order backs off: {tries} tries"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_change_is_published_once_in_order() {
    let h = Harness::new(MockConfig::default()).await;
    let records: Vec<OrderRecord> = (0..60)
        .map(|i| {
            record(
                i,
                if i % 5 == 0 {
                    "tok_decline"
                } else {
                    "tok_visa"
                },
            )
        })
        .collect();
    let records = h.append(records).await;
    let sink = Arc::new(RecordingEventSink::default());
    // The sink fails at first: nothing is marked published, everything comes again.
    sink.set_failing(true);
    let config = SettlerConfig {
        publish_interval: Duration::from_millis(50),
        publish_batch: 7,
        ..h.config()
    };
    let running = h
        .start_with_sink(
            config,
            Some(Arc::clone(&sink) as Arc<dyn settler::EventSink>),
        )
        .await;
    h.wait_settled(records.len()).await;
    assert!(sink.events().is_empty());
    assert_eq!(running.stats.snapshot().events_published, 0);
    sink.set_failing(false);
    let expected = records.len() * 4;
    // The counter moves after the sink has the batch and the outbox has marked it.
    eventually("every change published and counted", DEADLINE, || async {
        sink.events().len() >= expected
            && running.stats.snapshot().events_published >= expected as u64
    })
    .await;
    let stats = running.stats.snapshot();
    running.stop().await;

    let events = sink.events();
    assert_eq!(events.len(), expected, "each change once");
    assert_eq!(stats.events_published, expected as u64);
    assert!(h
        .store
        .unpublished_events(1000)
        .await
        .expect("outbox")
        .is_empty());
    let mut by_order: HashMap<OrderId, Vec<OrderStatus>> = HashMap::new();
    for e in &events {
        by_order.entry(e.order_id).or_default().push(e.status);
    }
    for r in &records {
        let last = if r.payment_token.starts_with("tok_decline") {
            OrderStatus::PaymentFailed
        } else {
            OrderStatus::Paid
        };
        assert_eq!(
            by_order[&r.order_id],
            vec![
                OrderStatus::Accepted,
                OrderStatus::Persisted,
                OrderStatus::PaymentPending,
                last
            ],
            "events of {}",
            r.order_id
        );
        let stored = h
            .store
            .get_order(r.order_id)
            .await
            .expect("get")
            .expect("stored");
        let final_event = events
            .iter()
            .find(|e| e.order_id == r.order_id && e.status == last)
            .expect("final event");
        assert_eq!(final_event.charge_id, stored.charge_id);
        let json: serde_json::Value =
            serde_json::from_slice(&settler::encode_event(final_event)).expect("json");
        assert_eq!(json["v"], 1);
        assert_eq!(json["status"], last.as_str());
    }
}

/// Runs a settler on a runtime of its own and throws the runtime away mid-work: every task
/// stops where it is, with no grace, as under `kill -9`.
async fn run_then_kill(h: &Harness, config: SettlerConfig, until_settled: u64) {
    let settler = h.settler(config, None).await;
    let stats = settler.stats();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.spawn(settler.run(CancellationToken::new()));
    eventually("some orders settled before the kill", DEADLINE, || async {
        let s = stats.snapshot();
        s.paid + s.payment_failed >= until_settled
    })
    .await;
    runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settler_killed_three_times_still_charges_and_releases_once() {
    let h = Harness::new(MockConfig {
        latency: Duration::from_millis(2),
        latency_jitter: Duration::from_millis(4),
        decline_rate: 0.1,
        error_rate: 0.05,
        lost_answer_rate: 0.02,
        seed: Some(9),
        ..MockConfig::default()
    })
    .await;
    let records = h.append(visa(400)).await;
    let config = SettlerConfig {
        batch_size: 32,
        charge_concurrency: 8,
        ..h.config()
    };
    for _ in 0..3 {
        run_then_kill(&h, config.clone(), 40).await;
    }
    let last = h.start(config).await;
    h.wait_settled(records.len()).await;
    last.stop().await;

    let audit = mock_provider::fetch_audit(&h.mock.url())
        .await
        .expect("audit");
    let releases = h.release.calls();
    for r in &records {
        let order = h
            .store
            .get_order(r.order_id)
            .await
            .expect("get")
            .expect("stored");
        let a = &audit.orders[&r.order_id.to_string()];
        assert!(a.successful_charges <= 1, "order {}", r.order_id);
        assert_eq!(a.refunds, 0);
        assert_eq!(a.notifications.len(), 1, "one notification per order");
        match order.status {
            OrderStatus::Paid => {
                assert_eq!(a.successful_charges, 1);
                assert_eq!(releases.get(&r.order_id), None);
            }
            OrderStatus::PaymentFailed => {
                assert_eq!(a.successful_charges, 0);
                // The release is idempotent per order; a kill between it and its record
                // repeats the call, never the release.
                assert!(releases.contains_key(&r.order_id));
                assert!(order.released_at.is_some());
            }
            other => panic!("order {} ended {other}", r.order_id),
        }
    }
}

/// A refused order's backoff is kept on the order: a restarted settler neither charges it
/// again before the recorded `retry_after` nor starts the doubling over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_orders_backoff_survives_a_settler_restart() {
    let h = Harness::new(MockConfig::default()).await;
    let order = record(1, "tok_reject_card").to_new_order();
    let id = order.order_id;
    h.store
        .persist_batch(std::slice::from_ref(&order), None)
        .await
        .expect("persist");
    // Waits of 50 ms doubling per refusal: the 7th refusal makes it wait 1.6 to 3.2 s.
    let config = SettlerConfig {
        sweep_interval: Duration::from_millis(50),
        order_retry_max: Duration::from_secs(3_600),
        ..h.config()
    };
    let stored = || async { h.store.get_order(id).await.expect("get").expect("order") };
    let refusals = || async {
        mock_provider::fetch_order_audit(&h.mock.url(), &id.to_string())
            .await
            .expect("audit")
            .map_or(0, |a| a.refused_charges)
    };
    let running = h.start(config.clone()).await;
    eventually("seven refusals recorded", DEADLINE, || async {
        stored().await.failed_attempts >= 7
    })
    .await;
    running.stop().await;
    let before = stored().await;
    let retry_after = before.retry_after.expect("retry_after recorded");
    assert_eq!(before.status, OrderStatus::PaymentPending);
    let refused = refusals().await;
    assert_eq!(
        refused,
        u64::from(before.failed_attempts),
        "one refusal per recorded attempt"
    );

    let running = h.start(config).await;
    eventually("three sweeps of the new settler", DEADLINE, || async {
        running.stats.snapshot().sweeps >= 3
    })
    .await;
    assert!(
        Timestamp::now() < retry_after,
        "the check ran within the recorded backoff"
    );
    assert_eq!(
        refusals().await,
        refused,
        "not charged again before its retry_after"
    );
    // Once it is due, it is tried again, and its attempts count on from the stored ones.
    eventually("the next attempt after the backoff", DEADLINE, || async {
        stored().await.failed_attempts > before.failed_attempts
    })
    .await;
    running.stop().await;
    let after = stored().await;
    assert!(Timestamp::now() >= retry_after);
    assert_eq!(after.failed_attempts, before.failed_attempts + 1);
    assert_eq!(refusals().await, refused + 1);
    // The doubling went on from the 7th wait (1.6 to 3.2 s), not from the first (25 to 50 ms).
    let waited = after.retry_after.expect("retry_after").millis() - Timestamp::now().millis();
    assert!(waited > 1_000, "next wait {waited} ms");
}
