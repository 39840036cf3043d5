//! Recovery paths: a charge found at the provider after a crash, and a late success for an
//! order that was voided meanwhile.

mod common;

use async_trait::async_trait;
use common::{eventually, record, Harness, DEADLINE};
use mock_provider::MockConfig;
use settler::provider::{ChargeOutcome, NotificationKind, PaymentClient, RetryPolicy};
use settler::{FileDeadLetter, Settler, StockRelease};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage::sqlite::SqliteStore;
use storage::{
    Change, Checkpoint, NewOrder, Order, OrderEvent, OrderId, OrderStatus, OrderStore, RefundState,
    Sale, SaleId, SaleTotals, Timestamp,
};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_order_charged_before_a_crash_is_looked_up_not_charged_again() {
    let h = Harness::new(MockConfig::default()).await;
    let order = record(1, "tok_visa").to_new_order();
    let id = order.order_id;
    // A previous settler persisted the order, moved it to payment_pending and charged it,
    // then died before recording the outcome.
    h.store
        .persist_batch(std::slice::from_ref(&order), None)
        .await
        .expect("persist");
    assert!(h
        .store
        .transition(
            id,
            OrderStatus::Persisted,
            OrderStatus::PaymentPending,
            None
        )
        .await
        .expect("pending"));
    let pay = PaymentClient::new(
        &h.mock.url(),
        Duration::from_secs(2),
        RetryPolicy::default(),
    )
    .expect("client");
    let ChargeOutcome::Succeeded { charge_id } = pay.charge(&order).await.expect("charge") else {
        panic!("expected a successful charge");
    };

    let running = h.start(h.config()).await;
    h.wait_settled(1).await;
    running.stop().await;

    let stored = h.store.get_order(id).await.expect("get").expect("order");
    assert_eq!(stored.status, OrderStatus::Paid);
    assert_eq!(stored.charge_id.as_deref(), Some(charge_id.as_str()));
    let a = mock_provider::fetch_order_audit(&h.mock.url(), &id.to_string())
        .await
        .expect("audit")
        .expect("seen");
    assert_eq!(a.charge_attempts, 1, "found by lookup, not charged again");
    assert_eq!(a.successful_charges, 1);
    assert_eq!(a.notifications, vec![NotificationKind::OrderPaid]);
}

/// A store in which every order expires (as if by another settler's expiry sweeper) just
/// before the settler records its successful charge. With a mock URL, it also takes the
/// provider down right then (once), so the refund that follows fails.
struct ExpiresBeforePaid(Arc<SqliteStore>, Option<String>, AtomicBool);

impl ExpiresBeforePaid {
    fn new(store: Arc<SqliteStore>) -> Self {
        ExpiresBeforePaid(store, None, AtomicBool::new(false))
    }

    /// Expires the order (and takes the provider down, once, if asked to).
    async fn expire(&self, id: OrderId) -> storage::Result<()> {
        self.0
            .transition(id, OrderStatus::PaymentPending, OrderStatus::Expired, None)
            .await?;
        if let Some(url) = &self.1 {
            if !self.2.swap(true, Ordering::SeqCst) {
                let down = MockConfig {
                    down: true,
                    ..MockConfig::default()
                };
                mock_provider::update_config(url, &down)
                    .await
                    .expect("mock down");
            }
        }
        Ok(())
    }
}

#[async_trait]
impl OrderStore for ExpiresBeforePaid {
    async fn create_sale(&self, sale: &Sale) -> storage::Result<()> {
        self.0.create_sale(sale).await
    }
    async fn get_sale(&self, id: &SaleId) -> storage::Result<Option<Sale>> {
        self.0.get_sale(id).await
    }
    async fn list_sales(&self) -> storage::Result<Vec<Sale>> {
        self.0.list_sales().await
    }
    async fn add_stock(&self, id: &SaleId, units: u32) -> storage::Result<Sale> {
        self.0.add_stock(id, units).await
    }
    async fn persist_batch(
        &self,
        orders: &[NewOrder],
        checkpoint: Option<&Checkpoint>,
    ) -> storage::Result<usize> {
        self.0.persist_batch(orders, checkpoint).await
    }
    async fn checkpoint(&self, consumer: &str, partition: u32) -> storage::Result<Option<u64>> {
        self.0.checkpoint(consumer, partition).await
    }
    async fn transition(
        &self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        charge_id: Option<&str>,
    ) -> storage::Result<bool> {
        if (from, to) == (OrderStatus::PaymentPending, OrderStatus::Paid) {
            self.expire(id).await?;
        }
        self.0.transition(id, from, to, charge_id).await
    }
    async fn apply_batch(&self, changes: &[Change]) -> storage::Result<Vec<bool>> {
        for change in changes {
            if let Change::Status {
                id,
                from: OrderStatus::PaymentPending,
                to: OrderStatus::Paid,
                ..
            } = change
            {
                self.expire(*id).await?;
            }
        }
        self.0.apply_batch(changes).await
    }
    async fn mark_released(&self, id: OrderId) -> storage::Result<bool> {
        self.0.mark_released(id).await
    }
    async fn mark_notified(&self, id: OrderId) -> storage::Result<bool> {
        self.0.mark_notified(id).await
    }
    async fn get_order(&self, id: OrderId) -> storage::Result<Option<Order>> {
        self.0.get_order(id).await
    }
    async fn orders_in_status(
        &self,
        statuses: &[OrderStatus],
        limit: usize,
    ) -> storage::Result<Vec<Order>> {
        self.0.orders_in_status(statuses, limit).await
    }
    async fn orders_due(
        &self,
        statuses: &[OrderStatus],
        now: Timestamp,
        limit: usize,
    ) -> storage::Result<Vec<Order>> {
        self.0.orders_due(statuses, now, limit).await
    }
    async fn refunds_owed(&self, limit: usize) -> storage::Result<Vec<Order>> {
        self.0.refunds_owed(limit).await
    }
    async fn documents_owed(&self, limit: usize) -> storage::Result<Vec<Order>> {
        self.0.documents_owed(limit).await
    }
    async fn unfinished_followups(&self, limit: usize) -> storage::Result<Vec<Order>> {
        self.0.unfinished_followups(limit).await
    }
    async fn orders_of_sale(&self, sale: &SaleId) -> storage::Result<Vec<Order>> {
        self.0.orders_of_sale(sale).await
    }
    async fn sale_totals(&self, sale: &SaleId) -> storage::Result<SaleTotals> {
        self.0.sale_totals(sale).await
    }
    async fn pending_since(&self, before: Timestamp, limit: usize) -> storage::Result<Vec<Order>> {
        self.0.pending_since(before, limit).await
    }
    async fn unpublished_events(&self, limit: usize) -> storage::Result<Vec<OrderEvent>> {
        self.0.unpublished_events(limit).await
    }
    async fn mark_published(&self, events: &[(OrderId, OrderStatus)]) -> storage::Result<usize> {
        self.0.mark_published(events).await
    }
    async fn ping(&self) -> storage::Result<()> {
        self.0.ping().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_success_for_an_expired_order_is_refunded_and_its_stock_released() {
    let h = Harness::new(MockConfig::default()).await;
    let records = h
        .append(vec![record(1, "tok_visa"), record(2, "tok_visa")])
        .await;
    let settler = Settler::new(
        Arc::new(ExpiresBeforePaid::new(Arc::clone(&h.store))),
        Box::new(h.log.consumer(0)),
        Arc::clone(&h.release) as Arc<dyn StockRelease>,
        Arc::new(FileDeadLetter::open(h.dir.path().join("dl")).expect("dead letter")),
        h.config(),
    )
    .expect("settler");
    let stats = settler.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(settler.run(shutdown.clone()));
    h.wait_settled(records.len()).await;
    shutdown.cancel();
    task.await.expect("join").expect("run");

    let snapshot = stats.snapshot();
    assert_eq!(snapshot.refunded, 2);
    assert_eq!(snapshot.paid, 0);
    assert_eq!(snapshot.released, 2);
    let releases = h.release.calls();
    let audit = mock_provider::fetch_audit(&h.mock.url())
        .await
        .expect("audit");
    for r in &records {
        let order = h
            .store
            .get_order(r.order_id)
            .await
            .expect("get")
            .expect("order");
        assert_eq!(order.status, OrderStatus::Expired);
        assert!(order.released_at.is_some());
        assert_eq!(releases.get(&r.order_id), Some(&1));
        let a = &audit.orders[&r.order_id.to_string()];
        assert_eq!(a.successful_charges, 1);
        assert_eq!(a.refunds, 1);
        assert_eq!(a.notifications, vec![NotificationKind::OrderExpired]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refund_of_a_late_charge_is_retried_until_it_lands() {
    let h = Harness::new(MockConfig::default()).await;
    let records = h.append(vec![record(1, "tok_visa")]).await;
    let id = records[0].order_id;
    let config = settler::SettlerConfig {
        circuit_failure_threshold: 2,
        circuit_cool_down: Duration::from_millis(200),
        ..h.config()
    };
    let settler = Settler::new(
        Arc::new(ExpiresBeforePaid(
            Arc::clone(&h.store),
            Some(h.mock.url()),
            AtomicBool::new(false),
        )),
        Box::new(h.log.consumer(0)),
        Arc::clone(&h.release) as Arc<dyn StockRelease>,
        Arc::new(FileDeadLetter::open(h.dir.path().join("dl")).expect("dead letter")),
        config,
    )
    .expect("settler");
    let stats = settler.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(settler.run(shutdown.clone()));

    // The refund fails while the provider is down, and keeps failing until the circuit
    // opens; then the provider comes back and the refund is the probe that closes it.
    eventually("the refund owed and the circuit open", DEADLINE, || async {
        let s = stats.snapshot();
        s.refunds_owed == 1 && s.circuit_open
    })
    .await;
    assert_eq!(stats.snapshot().refunded, 0);
    mock_provider::update_config(&h.mock.url(), &MockConfig::default())
        .await
        .expect("provider back");
    eventually("the refund landed", DEADLINE, || async {
        let s = stats.snapshot();
        s.refunded == 1 && s.refunds_owed == 0 && !s.circuit_open
    })
    .await;
    h.wait_settled(1).await;
    shutdown.cancel();
    task.await.expect("join").expect("run");

    let order = h.store.get_order(id).await.expect("get").expect("order");
    assert_eq!(order.status, OrderStatus::Expired);
    assert_eq!(h.release.calls().get(&id), Some(&1));
    let a = mock_provider::fetch_order_audit(&h.mock.url(), &id.to_string())
        .await
        .expect("audit")
        .expect("seen");
    assert_eq!(a.successful_charges, 1);
    assert_eq!(a.refunds, 1);
    assert_eq!(a.notifications, vec![NotificationKind::OrderExpired]);
}

/// A refund owed for a late charge is recorded on the order before the provider is asked,
/// so a settler that stops while the provider refuses it does not take it along: the next
/// settler finds it in the store and refunds it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_owed_survives_a_settler_restart() {
    let h = Harness::new(MockConfig::default()).await;
    let records = h.append(vec![record(1, "tok_visa")]).await;
    let id = records[0].order_id;
    // The order expires just before its successful charge is recorded, and the provider goes
    // down right then: the refund of the late charge fails.
    let settler = Settler::new(
        Arc::new(ExpiresBeforePaid(
            Arc::clone(&h.store),
            Some(h.mock.url()),
            AtomicBool::new(false),
        )),
        Box::new(h.log.consumer(0)),
        Arc::clone(&h.release) as Arc<dyn StockRelease>,
        Arc::new(FileDeadLetter::open(h.dir.path().join("dl")).expect("dead letter")),
        h.config(),
    )
    .expect("settler");
    let stats = settler.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(settler.run(shutdown.clone()));
    eventually("the refund owed and failed", DEADLINE, || async {
        let order = h.store.get_order(id).await.expect("get");
        order.is_some_and(|o| o.refund == Some(RefundState::Owed))
            && stats.snapshot().provider_errors > 0
    })
    .await;
    shutdown.cancel();
    task.await.expect("join").expect("run");
    let order = h.store.get_order(id).await.expect("get").expect("order");
    assert_eq!(order.status, OrderStatus::Expired);
    assert_eq!(order.refund, Some(RefundState::Owed));
    let late = mock_provider::fetch_order_audit(&h.mock.url(), &id.to_string())
        .await
        .expect("audit")
        .expect("seen");
    assert_eq!((late.successful_charges, late.refunds), (1, 0));
    let charge_id = order
        .charge_id
        .clone()
        .expect("the late charge's id is kept");

    // The provider is back; a new settler (the plain store) finishes the refund.
    mock_provider::update_config(&h.mock.url(), &MockConfig::default())
        .await
        .expect("provider back");
    let running = h.start(h.config()).await;
    eventually("the refund landed", DEADLINE, || async {
        let order = h.store.get_order(id).await.expect("get").expect("order");
        order.refund == Some(RefundState::Refunded)
    })
    .await;
    h.wait_settled(1).await;
    let refunded = running.stats.snapshot().refunded;
    running.stop().await;
    assert_eq!(refunded, 1);
    let order = h.store.get_order(id).await.expect("get").expect("order");
    assert_eq!(order.charge_id.as_deref(), Some(charge_id.as_str()));
    assert!(h.store.refunds_owed(10).await.expect("owed").is_empty());
    let a = mock_provider::fetch_order_audit(&h.mock.url(), &id.to_string())
        .await
        .expect("audit")
        .expect("seen");
    assert_eq!((a.successful_charges, a.refunds), (1, 1));
    assert_eq!(a.notifications, vec![NotificationKind::OrderExpired]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refunded_late_charge_gets_one_refund_note_and_no_receipt() {
    let h = Harness::new(MockConfig::default()).await;
    h.store.create_sale(&common::sale_1()).await.expect("sale");
    let records = h
        .append(vec![record(1, "tok_visa"), record(2, "tok_visa")])
        .await;
    let archive = Arc::new(
        receipts::Archive::open(&receipts::ArchiveConfig {
            url: "memory://".into(),
            ..receipts::ArchiveConfig::default()
        })
        .expect("archive"),
    );
    let settler = Settler::new(
        Arc::new(ExpiresBeforePaid::new(Arc::clone(&h.store))),
        Box::new(h.log.consumer(0)),
        Arc::clone(&h.release) as Arc<dyn StockRelease>,
        Arc::new(FileDeadLetter::open(h.dir.path().join("dl")).expect("dead letter")),
        settler::SettlerConfig {
            receipts_interval: Duration::from_millis(50),
            ..h.config()
        },
    )
    .expect("settler")
    .with_documents(settler::Documents {
        archive: Arc::clone(&archive),
        seller: "Flashsale Test Shop".into(),
    });
    let stats = settler.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(settler.run(shutdown.clone()));
    h.wait_settled(records.len()).await;
    eventually("every refund documented", DEADLINE, || async {
        h.store.documents_owed(100).await.expect("owed").is_empty()
    })
    .await;
    shutdown.cancel();
    task.await.expect("join").expect("run");

    assert_eq!(stats.snapshot().refunded, 2);
    assert_eq!(stats.snapshot().documents, 2);
    assert!(archive.keys("receipts").await.expect("keys").is_empty());
    assert_eq!(archive.keys("refund-notes").await.expect("keys").len(), 2);
    for r in &records {
        let order = h
            .store
            .get_order(r.order_id)
            .await
            .expect("get")
            .expect("order");
        assert_eq!(order.refund, Some(RefundState::Refunded));
        assert_eq!(order.receipt_key, None);
        let key = receipts::object_key(r.order_id, receipts::Kind::RefundNote);
        assert_eq!(order.refund_note_key.as_deref(), Some(key.as_str()));
        let pdf = archive.get(&key).await.expect("get").expect("object");
        assert!(pdf.starts_with(b"%PDF-"));
    }
}
