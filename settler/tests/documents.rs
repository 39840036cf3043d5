//! The receipts stage: every paid order gets exactly one receipt in the archive, failed
//! orders none, and an archive outage delays documents but never settlement.

mod common;

use common::{eventually, record, sale_1, Harness, Running, DEADLINE};
use mock_provider::MockConfig;
use receipts::{Archive, ArchiveConfig};
use settler::{Documents, SettlerConfig};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use storage::{OrderId, OrderStatus, OrderStore};
use testkit::S3Server;
use tokio_util::sync::CancellationToken;

const SELLER: &str = "Flashsale Test Shop";

async fn start(h: &Harness, config: SettlerConfig, archive: &Arc<Archive>) -> Running {
    let settler = h.settler(config, None).await.with_documents(Documents {
        archive: Arc::clone(archive),
        seller: SELLER.into(),
    });
    let stats = settler.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(settler.run(shutdown.clone()));
    Running {
        shutdown,
        task,
        stats,
    }
}

fn config(h: &Harness) -> SettlerConfig {
    SettlerConfig {
        receipts_interval: Duration::from_millis(50),
        receipts_batch: 8,
        ..h.config()
    }
}

/// Orders `first..first + n`, every third one declined.
fn records(first: u64, n: u64) -> Vec<sequencer::OrderRecord> {
    (first..first + n)
        .map(|i| {
            record(
                i,
                if i % 3 == 0 {
                    "tok_decline"
                } else {
                    "tok_visa"
                },
            )
        })
        .collect()
}

/// Waits until no order is owed a document any more.
async fn wait_documented(h: &Harness) {
    eventually("no order owed a document", DEADLINE, || async {
        h.store.documents_owed(1000).await.expect("owed").is_empty()
    })
    .await;
}

/// One receipt per paid order, its key recorded on the order and its bytes a PDF; no
/// object for any other order.
async fn check_receipts(h: &Harness, archive: &Archive, expected: usize) {
    let orders = h.orders().await;
    let keys: Vec<String> = archive.keys("receipts").await.expect("keys");
    let unique: HashSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "no key twice: {keys:?}");
    let paid: Vec<_> = orders
        .iter()
        .filter(|o| o.status == OrderStatus::Paid)
        .collect();
    assert_eq!(paid.len(), expected, "paid orders");
    assert_eq!(
        keys.len(),
        paid.len(),
        "one object per paid order: {keys:?}"
    );
    for o in &orders {
        let id: OrderId = o.new.order_id;
        let key = receipts::object_key(id, receipts::Kind::Receipt);
        if o.status == OrderStatus::Paid {
            assert_eq!(o.receipt_key.as_deref(), Some(key.as_str()), "order {id}");
            let bytes = archive.get(&key).await.expect("get").expect("object");
            assert!(bytes.starts_with(b"%PDF-"), "order {id}");
        } else {
            assert_eq!(o.receipt_key, None, "order {id} in {}", o.status);
            assert!(!unique.contains(&key), "order {id} in {}", o.status);
        }
        assert_eq!(o.refund_note_key, None);
    }
    assert!(archive.keys("refund-notes").await.expect("keys").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_paid_order_gets_one_receipt_in_a_local_archive() {
    let h = Harness::new(MockConfig::default()).await;
    h.store.create_sale(&sale_1()).await.expect("sale");
    let url = format!("file://{}", h.dir.path().join("archive").display());
    let archive = Arc::new(
        Archive::open(&ArchiveConfig {
            url,
            ..ArchiveConfig::default()
        })
        .expect("archive"),
    );
    let records = h.append(records(1, 20)).await;
    let running = start(&h, config(&h), &archive).await;
    h.wait_settled(records.len()).await;
    wait_documented(&h).await;
    let stats = running.stats.clone();
    running.stop().await;
    h.check_exactly_once(&records).await;
    check_receipts(&h, &archive, 14).await;
    assert_eq!(stats.snapshot().documents, 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_in_s3_wait_out_an_outage_without_holding_up_settlement() {
    let mut s3 = S3Server::start();
    let h = Harness::new(MockConfig::default()).await;
    h.store.create_sale(&sale_1()).await.expect("sale");
    let archive = Arc::new(
        Archive::open(&ArchiveConfig {
            url: format!("s3://{}", s3.bucket()),
            endpoint: s3.endpoint(),
            region: s3.region().into(),
            access_key_id: s3.access_key().into(),
            secret_access_key: s3.secret_key().into(),
            allow_http: true,
        })
        .expect("archive"),
    );
    let mut all = h.append(records(1, 12)).await;
    let running = start(&h, config(&h), &archive).await;
    h.wait_settled(all.len()).await;
    wait_documented(&h).await;
    check_receipts(&h, &archive, 8).await;

    // The object store goes down; more orders come in and settle all the same.
    s3.kill();
    all.extend(h.append(records(13, 12)).await);
    h.wait_settled(all.len()).await;
    let owed = h.store.documents_owed(1000).await.expect("owed");
    assert!(!owed.is_empty(), "documents wait for the archive");
    assert!(owed.iter().all(|o| o.status == OrderStatus::Paid));

    // Back: every receipt is written, once.
    s3.restart();
    wait_documented(&h).await;
    let stats = running.stats.clone();
    running.stop().await;
    h.check_exactly_once(&all).await;
    check_receipts(&h, &archive, 16).await;
    assert_eq!(stats.snapshot().documents, 16);
}
