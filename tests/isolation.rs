//! The order path does not wait on settlement: with the settler blocked, orders are still
//! answered 202, and they are settled once the block is lifted.

mod common;

use common::TestApp;
use futures_util::stream::{self, StreamExt};
use mock_provider::{self as mock, MockConfig, MockProvider};
use std::time::Duration;
use storage::{OrderStatus, SaleId};
use testkit::eventually;

const ORDERS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_answered_while_the_provider_hangs_and_settle_after() {
    let hanging = MockConfig {
        timeout_rate: 1.0,
        hang: Duration::from_secs(120),
        ..MockConfig::default()
    };
    let provider = MockProvider::start(hanging).await.expect("mock provider");
    let app = TestApp::start_with(|c| {
        c.providers.payment_url = provider.url();
        c.providers.notification_url = provider.url();
        c.providers.timeout = Duration::from_millis(300);
        c.settler.retry_max_attempts = 1;
        c.settler.circuit_failure_threshold = 2;
        c.settler.circuit_cool_down = Duration::from_millis(500);
        c.settler.sweep_interval = Duration::from_millis(200);
    })
    .await;
    let sale = app.sale("isolation", ORDERS as u32 + 10, 1).await;
    let stats = app
        .running()
        .settler_stats
        .clone()
        .expect("settler runs here");

    // The settler is blocked: its first charges hang until the circuit opens.
    let first = app
        .order(&sale, &app.token("user-first"), "k-first", 1)
        .await;
    assert_eq!(first.status, 202, "{}", first.body);
    eventually("the payment circuit opens", Duration::from_secs(30), || {
        let stats = stats.clone();
        async move { stats.snapshot().circuit_open }
    })
    .await;

    let answers: Vec<u16> = stream::iter(0..ORDERS)
        .map(|i| {
            let app = &app;
            let sale = &sale;
            async move {
                app.order(sale, &app.token(&format!("user-{i}")), &format!("k-{i}"), 1)
                    .await
                    .status
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let accepted = answers.iter().filter(|s| **s == 202).count();
    assert_eq!(accepted, ORDERS, "answers: {answers:?}");
    assert_eq!(
        stats.snapshot().paid,
        0,
        "nothing is paid while the provider hangs"
    );

    mock::update_config(&provider.url(), &MockConfig::default())
        .await
        .expect("provider back");
    let store = std::sync::Arc::clone(&app.running().store);
    let sale_id = SaleId::parse(&sale).expect("sale id");
    eventually(
        "every order paid and its buyer notified",
        Duration::from_secs(120),
        || {
            let (store, sale_id) = (std::sync::Arc::clone(&store), sale_id.clone());
            async move {
                let orders = store.orders_of_sale(&sale_id).await.expect("orders");
                orders.len() == ORDERS + 1
                    && orders
                        .iter()
                        .all(|o| o.status == OrderStatus::Paid && o.notified_at.is_some())
            }
        },
    )
    .await;
    let audit = mock::fetch_audit(&provider.url()).await.expect("audit");
    for (id, a) in &audit.orders {
        assert!(a.successful_charges <= 1, "order {id} charged twice");
    }
    app.stop().await;
    provider.stop().await;
}

/// The settler's threads run at a lower priority than the threads that answer orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settler_runs_on_its_own_lower_priority_threads() {
    let app = TestApp::start().await;
    let mut settler_threads = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != "fs-settler" {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).expect("stat");
        // Fields after the parenthesised name: state is field 3, nice is field 19.
        let after = &stat[stat.rfind(')').expect("stat name") + 2..];
        let nice: i32 = after
            .split(' ')
            .nth(16)
            .and_then(|n| n.parse().ok())
            .expect("nice");
        settler_threads.push(nice);
    }
    assert!(!settler_threads.is_empty(), "no settler thread found");
    assert!(
        settler_threads.iter().all(|n| *n >= 9),
        "settler threads' nice values: {settler_threads:?}"
    );
    app.stop().await;
}
