//! 256 concurrent clients, 20,000 attempts, stock 1,000: exactly the stock is sold, no
//! user goes over the limit, and every accepted order is persisted.

mod common;

use common::TestApp;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use testkit::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_buyers_never_oversell() {
    const CLIENTS: usize = 256;
    const ATTEMPTS: usize = 20_000;
    const STOCK: u64 = 1_000;
    const USERS: usize = 1_500;
    const LIMIT: u64 = 2;

    let app = Arc::new(TestApp::start().await);
    let a = app
        .create_sale(json!({
            "id": "rush", "sku": "s", "stock": STOCK, "price_cents": 500, "currency": "EUR",
            "per_user_limit": LIMIT, "max_quantity_per_order": 1,
            "user_rate": {"per_second": 10000, "burst": 10000}
        }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let tokens: Arc<Vec<String>> =
        Arc::new((0..USERS).map(|u| app.token(&format!("u{u}"))).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let app = Arc::clone(&app);
        let tokens = Arc::clone(&tokens);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ATTEMPTS {
                    break;
                }
                let user = i % USERS;
                let a = app.order("rush", &tokens[user], &format!("k{i}"), 1).await;
                assert!(
                    matches!(a.status, 202 | 409 | 403),
                    "unexpected answer {} {}",
                    a.status,
                    a.body
                );
                if a.status == 202 {
                    mine.push((user, a.body["order_id"].as_str().expect("id").to_owned()));
                }
            }
            mine
        });
    }
    let mut accepted = Vec::new();
    while let Some(r) = tasks.join_next().await {
        accepted.extend(r.expect("client task"));
    }
    assert_eq!(accepted.len() as u64, STOCK, "exactly the stock is sold");
    let mut per_user: HashMap<usize, u64> = HashMap::new();
    for (u, _) in &accepted {
        *per_user.entry(*u).or_default() += 1;
    }
    assert!(
        per_user.values().all(|n| *n <= LIMIT),
        "a user went over the limit"
    );
    let stats = app.stats("rush").await;
    assert_eq!(stats["accepted_units"], STOCK);
    assert_eq!(stats["stock_left"], 0);
    let rejected: u64 = stats["rejected"]
        .as_object()
        .expect("rejected")
        .values()
        .filter_map(|v| v.as_u64())
        .sum();
    assert_eq!(rejected + STOCK, ATTEMPTS as u64);

    eventually("persisted == accepted", Duration::from_secs(60), || {
        let app = Arc::clone(&app);
        async move { app.stats("rush").await["persisted"] == STOCK }
    })
    .await;
    let ids: std::collections::HashSet<_> = accepted.iter().map(|(_, id)| id.clone()).collect();
    let stored = app
        .running()
        .store
        .orders_of_sale(&storage::SaleId::parse("rush").expect("id"))
        .await
        .expect("orders");
    assert_eq!(stored.len(), ids.len());
    assert!(stored
        .iter()
        .all(|o| ids.contains(&o.new.order_id.to_string())));
    match Arc::try_unwrap(app) {
        Ok(app) => app.stop().await,
        Err(_) => panic!("app still shared"),
    }
}
