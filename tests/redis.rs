//! Redis admission across instances and over time: two ingest instances sharing one Redis
//! never oversell and answer every retry with its first answer; a user over the token
//! bucket gets 429 with Retry-After.

mod common;

use common::{Backend, TestApp};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use testkit::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_one_redis_never_oversell() {
    const CLIENTS: usize = 256;
    const ATTEMPTS: usize = 20_000;
    const STOCK: u64 = 1_000;
    const USERS: usize = 1_500;
    const LIMIT: u64 = 2;

    let first = TestApp::start_on(Backend::Redis).await;
    let url = first.redis.as_ref().expect("redis").url();
    let second = TestApp::start_with(|c| c.admission.url = url).await;
    let apps = Arc::new([first, second]);
    // Each instance has its own embedded store (its own catalog); the counters are shared.
    for app in apps.iter() {
        let a = app
            .create_sale(json!({
                "id": "shared", "sku": "s", "stock": STOCK, "price_cents": 500, "currency": "EUR",
                "per_user_limit": LIMIT, "max_quantity_per_order": 1,
                "user_rate": {"per_second": 10000, "burst": 10000}
            }))
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
    }
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..USERS)
            .map(|u| apps[0].token(&format!("u{u}")))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (apps, tokens, next) = (Arc::clone(&apps), Arc::clone(&tokens), Arc::clone(&next));
        tasks.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ATTEMPTS {
                    break;
                }
                let user = i % USERS;
                // Every tenth attempt retries an earlier key of the same user, on the other
                // instance.
                let key = if i % 10 == 9 && i >= USERS {
                    format!("k{}", i - USERS)
                } else {
                    format!("k{i}")
                };
                let app = &apps[(i + c) % 2];
                let a = app.order("shared", &tokens[user], &key, 1).await;
                assert!(
                    matches!(a.status, 202 | 409 | 403),
                    "unexpected answer {} {}",
                    a.status,
                    a.body
                );
                answers.push((
                    user,
                    key,
                    a.status,
                    a.body["order_id"].as_str().map(str::to_owned),
                ));
            }
            answers
        });
    }
    let mut by_key: HashMap<(usize, String), Vec<String>> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        for (user, key, status, order) in r.expect("client") {
            if status == 202 {
                by_key
                    .entry((user, key))
                    .or_default()
                    .push(order.expect("order id"));
            }
        }
    }
    // Retries got their first answer: one order id per (user, key).
    for (k, ids) in &by_key {
        assert!(
            ids.iter().all(|id| *id == ids[0]),
            "key {k:?} answered {ids:?}"
        );
    }
    let orders: HashMap<&str, usize> = by_key
        .iter()
        .map(|((u, _), ids)| (ids[0].as_str(), *u))
        .collect();
    assert_eq!(
        orders.len() as u64,
        STOCK,
        "exactly the stock is sold across both instances"
    );
    let mut per_user: HashMap<usize, u64> = HashMap::new();
    for u in orders.values() {
        *per_user.entry(*u).or_default() += 1;
    }
    assert!(
        per_user.values().all(|n| *n <= LIMIT),
        "a user went over the limit"
    );
    let stats = apps[0].stats("shared").await;
    assert_eq!(stats["accepted_units"], STOCK);
    assert_eq!(stats["stock_left"], 0);
    // Each instance persists what it acknowledged; together, every order once.
    eventually(
        "both stores persisted every order",
        Duration::from_secs(60),
        || {
            let apps = Arc::clone(&apps);
            async move {
                let a = apps[0].stats("shared").await["persisted"]
                    .as_u64()
                    .unwrap_or(0);
                let b = apps[1].stats("shared").await["persisted"]
                    .as_u64()
                    .unwrap_or(0);
                a + b == STOCK
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_user_over_the_token_bucket_gets_429() {
    let app = TestApp::start_on(Backend::Redis).await;
    let a = app
        .create_sale(json!({
            "id": "paced", "sku": "s", "stock": 100000, "price_cents": 100, "currency": "EUR",
            "per_user_limit": 1000, "max_quantity_per_order": 1,
            "user_rate": {"per_second": 5, "burst": 10}
        }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let token = app.token("eager");
    // 50 requests a second for two seconds.
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let started = tokio::time::Instant::now();
    let mut admitted = 0u32;
    let mut limited = 0u32;
    for i in 0..100 {
        ticker.tick().await;
        let a = app.order("paced", &token, &format!("p{i}"), 1).await;
        match a.status {
            202 => admitted += 1,
            429 => {
                assert_eq!(a.code(), "rate_limited");
                let retry: u64 = a.headers["retry-after"]
                    .to_str()
                    .expect("ascii")
                    .parse()
                    .expect("seconds");
                assert!(retry >= 1);
                limited += 1;
            }
            other => panic!("unexpected {other}: {}", a.body),
        }
    }
    let seconds = started.elapsed().as_secs_f64().ceil() as u32;
    assert!(admitted >= 10, "the burst is admitted: {admitted}");
    assert!(
        admitted <= 10 + 5 * seconds,
        "{admitted} admitted in {seconds} s against 5/s with burst 10"
    );
    assert_eq!(admitted + limited, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_burst_gives_503_and_reconcile_restores_selling() {
    const STOCK: u64 = 100_000;
    let mut app = TestApp::start_on_with(Backend::Redis, |c| {
        c.admission.decision_timeout = Duration::from_millis(250);
    })
    .await;
    let a = app
        .create_sale(json!({
            "id": "outage", "sku": "s", "stock": STOCK, "price_cents": 100, "currency": "EUR",
            "per_user_limit": 1000, "max_quantity_per_order": 1,
            "user_rate": {"per_second": 100000, "burst": 100000}
        }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let app_ref = Arc::new(parking_lot::Mutex::new(Vec::<(
        u16,
        Duration,
        Option<String>,
        usize,
    )>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let tokens: Arc<Vec<String>> = Arc::new((0..50).map(|u| app.token(&format!("o{u}"))).collect());
    let client = app.client.clone();
    let url = app.url.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (answers, stop, next, tokens, client, url) = (
            Arc::clone(&app_ref),
            Arc::clone(&stop),
            Arc::clone(&next),
            Arc::clone(&tokens),
            client.clone(),
            url.clone(),
        );
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let resp = client
                    .post(format!("{url}/v1/sales/outage/orders"))
                    .bearer_auth(&tokens[i % tokens.len()])
                    .header("idempotency-key", format!("o{i}"))
                    .json(&json!({"quantity": 1, "payment_token": "tok_visa"}))
                    .send()
                    .await
                    .expect("the server answers even with Redis down");
                let status = resp.status().as_u16();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                let order = body["order_id"].as_str().map(str::to_owned);
                answers.lock().push((status, started.elapsed(), order, i));
            }
        });
    }
    eventually("300 orders accepted", Duration::from_secs(30), || {
        let n = app_ref.lock().iter().filter(|a| a.0 == 202).count();
        async move { n >= 300 }
    })
    .await;
    app.redis.as_mut().expect("redis").kill();
    let killed_at = app_ref.lock().len();
    eventually("answers turn into 503", Duration::from_secs(10), || {
        let n = app_ref
            .lock()
            .iter()
            .skip(killed_at)
            .filter(|a| a.0 == 503)
            .count();
        async move { n >= 100 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let answers = app_ref.lock().clone();
    // After the kill, every answer is 202 (decided before it) or 503, and comes back within
    // the decision deadline plus slack.
    for (status, took, _, _) in answers.iter().skip(killed_at + 32) {
        assert!(matches!(status, 202 | 503), "status {status}");
        if *status == 503 {
            assert!(*took < Duration::from_secs(2), "a 503 took {took:?}");
        }
    }
    let acked: Vec<String> = answers
        .iter()
        .filter(|a| a.0 == 202)
        .filter_map(|a| a.2.clone())
        .collect();

    // Redis comes back empty: the sale is unavailable, never full stock.
    app.redis.as_mut().expect("redis").restart();
    let sale = storage::SaleId::parse("outage").expect("id");
    let store = std::sync::Arc::clone(&app.running().store);
    eventually(
        "every acknowledged order persisted",
        Duration::from_secs(30),
        || {
            let store = std::sync::Arc::clone(&store);
            let sale = sale.clone();
            let n = acked.len() as u64;
            async move {
                store
                    .sale_totals(&sale)
                    .await
                    .map(|t| t.orders >= n)
                    .unwrap_or(false)
            }
        },
    )
    .await;
    let token = app.token("after");
    eventually(
        "a missing sale answers 503",
        Duration::from_secs(10),
        || {
            let a = app.order("outage", &token, "after-1", 1);
            async move {
                let a = a.await;
                a.status == 503 && a.code() == "unavailable"
            }
        },
    )
    .await;

    // Reconcile rebuilds the counters from the store.
    let out = reconcile(&app, "outage").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("repaired"), "{text}");

    let orders = store.orders_of_sale(&sale).await.expect("orders");
    let ids: std::collections::HashSet<String> =
        orders.iter().map(|o| o.new.order_id.to_string()).collect();
    assert!(
        acked.iter().all(|id| ids.contains(id)),
        "every 202 is in the store"
    );
    let stats = app.stats("outage").await;
    assert_eq!(
        stats["accepted"].as_u64(),
        Some(orders.len() as u64),
        "nothing over-admitted"
    );
    let held: u64 = orders
        .iter()
        .filter(|o| !o.status.releases_stock())
        .map(|o| u64::from(o.new.quantity))
        .sum();
    assert_eq!(stats["stock_left"].as_u64(), Some(STOCK - held));
    // Selling resumes, and a retry of an acknowledged order still gets its answer.
    let resumed = app.order("outage", &token, "after-2", 1).await;
    assert_eq!(resumed.status, 202, "{}", resumed.body);
    let (_, _, first_id, i) = answers
        .iter()
        .find(|a| a.0 == 202)
        .expect("an acknowledged order");
    let retry = app
        .order("outage", &tokens[i % tokens.len()], &format!("o{i}"), 1)
        .await;
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert_eq!(
        retry.body["order_id"].as_str(),
        first_id.as_deref(),
        "the rebuilt answer"
    );
    // Once the settler has caught up, a second reconcile finds nothing to do.
    let accepted = app.stats("outage").await["accepted"]
        .as_u64()
        .expect("accepted");
    eventually("the new order persisted", Duration::from_secs(30), || {
        let store = std::sync::Arc::clone(&store);
        let sale = sale.clone();
        async move {
            store
                .sale_totals(&sale)
                .await
                .map(|t| t.orders == accepted)
                .unwrap_or(false)
        }
    })
    .await;
    let out = reconcile(&app, "outage").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("consistent"), "{text}");
    app.stop().await;
}

/// EVALSHA calls the Redis nodes at `urls` have served so far.
async fn evalsha_calls(urls: &[String]) -> u64 {
    let mut calls = 0;
    for url in urls {
        calls += node_evalsha_calls(url).await;
    }
    calls
}

async fn node_evalsha_calls(url: &str) -> u64 {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Buyers who never bought before, one new user and key per order.
struct Strangers {
    next: AtomicUsize,
    sale: String,
}

impl Strangers {
    fn of(sale: &str) -> Strangers {
        Strangers {
            next: AtomicUsize::new(0),
            sale: sale.to_owned(),
        }
    }

    async fn order(&self, app: &TestApp) -> common::Answer {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let token = app.token(&format!("s{i}"));
        app.order(&self.sale, &token, &format!("s{i}"), 1).await
    }
}

/// Waits until `app` answers a stranger `sold_out` without an EVALSHA.
async fn wait_flagged(app: &TestApp, url: &[String], strangers: &Strangers) {
    eventually(
        "the instance answers sold_out without Redis",
        Duration::from_secs(10),
        || async {
            let before = evalsha_calls(url).await;
            let a = strangers.order(app).await;
            assert_eq!((a.status, a.code()), (409, "sold_out"), "{}", a.body);
            evalsha_calls(url).await == before
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sold_out_flag_answers_locally_but_never_hides_an_answer_or_returned_stock() {
    sold_out_flag(Backend::Redis, 1).await;
}

/// On a cluster the sale lives on a node other than the first seed, where each instance
/// subscribes: the events reach it through the cluster bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sold_out_flag_works_on_a_redis_cluster() {
    sold_out_flag(Backend::RedisCluster, 1).await;
}

/// A sale in three stock buckets (over the cluster's nodes) is flagged once every bucket is
/// empty; stock added to one bucket clears the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sold_out_flag_works_for_a_sale_in_stock_buckets() {
    sold_out_flag(Backend::RedisCluster, 3).await;
}

async fn sold_out_flag(backend: Backend, buckets: u32) {
    // Flags live ten minutes here: only the events channel can clear them in this test.
    let ttl = Duration::from_secs(600);
    let mut first = TestApp::start_on_with(backend, |c| c.admission.sold_out_ttl = ttl).await;
    let admission = first.config.admission.url.clone();
    // The nodes that decide the sale's orders (whose EVALSHA calls are counted).
    let (sale, url) = match &first.redis_cluster {
        None => (
            "flag".to_owned(),
            vec![first.redis.as_ref().expect("redis").url()],
        ),
        Some(cluster) if buckets > 1 => (
            "flag".to_owned(),
            (0..cluster.len()).map(|i| cluster.node_url(i)).collect(),
        ),
        Some(cluster) => {
            let sale = (0..)
                .map(|i| format!("flag-{i}"))
                .find(|s| cluster.node_of(&format!("fs:{{{s}}}:sale")) != 0)
                .expect("a sale off the first node");
            let node = cluster.node_of(&format!("fs:{{{sale}}}:sale"));
            (sale, vec![cluster.node_url(node)])
        }
    };
    let (sale, url) = (sale.as_str(), url.as_slice());
    let second = TestApp::start_with(|c| {
        c.admission.url = admission.clone();
        c.admission.sold_out_ttl = ttl;
    })
    .await;
    for app in [&first, &second] {
        let a = app
            .create_sale(json!({
                "id": sale, "sku": "s", "stock": 3, "price_cents": 100, "currency": "EUR",
                "per_user_limit": 1, "max_quantity_per_order": 1, "stock_buckets": buckets,
                "user_rate": {"per_second": 100000, "burst": 100000}
            }))
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
    }
    // Sold out on the first instance.
    let buyers: Vec<String> = (0..3).map(|u| first.token(&format!("b{u}"))).collect();
    let mut ids = Vec::new();
    for (u, token) in buyers.iter().enumerate() {
        let a = first.order(sale, token, &format!("k{u}"), 1).await;
        assert_eq!(a.status, 202, "{}", a.body);
        ids.push(a.body["order_id"].as_str().expect("id").to_owned());
    }
    // The second instance learns it from Redis's answer, then answers by itself.
    let strangers = Strangers::of(sale);
    wait_flagged(&second, url, &strangers).await;
    let before = evalsha_calls(url).await;
    for _ in 0..50 {
        let a = strangers.order(&second).await;
        assert_eq!((a.status, a.code()), (409, "sold_out"), "{}", a.body);
    }
    let calls = evalsha_calls(url).await - before;
    assert!(
        calls < 10,
        "50 sold-out answers took {calls} Redis decisions"
    );
    // Buyers who hold answers still reach Redis: a retry gets its first answer, a new key
    // gets the per-user limit (a local flag would have said sold_out).
    for (u, token) in buyers.iter().enumerate() {
        let retry = second.order(sale, token, &format!("k{u}"), 1).await;
        assert_eq!(retry.status, 202, "{}", retry.body);
        assert_eq!(retry.body["order_id"].as_str(), Some(ids[u].as_str()));
    }
    let more = second.order(sale, &buyers[0], "k-more", 1).await;
    assert_eq!((more.status, more.code()), (403, "limit_exceeded"));
    // Local answers reach the shared counters.
    eventually(
        "local sold-out answers counted in Redis",
        Duration::from_secs(10),
        || async {
            first.stats(sale).await["rejected"]["sold_out"]
                .as_u64()
                .unwrap_or(0)
                >= 51
        },
    )
    .await;
    // Stock added on the first instance reaches the second at once, not after the TTL.
    let add = first
        .client
        .post(format!("{}/v1/sales/{sale}/stock", first.url))
        .bearer_auth(first.operator())
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .expect("send");
    assert_eq!(add.status().as_u16(), 200);
    eventually(
        "the second instance sells the added unit",
        Duration::from_secs(10),
        || async { strangers.order(&second).await.status == 202 },
    )
    .await;
    // Sold out again, and flagged again.
    wait_flagged(&second, url, &strangers).await;
    // Redis gone: the subscription is lost, the flag with it, and buyers get 503.
    if let Some(redis) = first.redis.as_mut() {
        redis.kill();
    }
    if let Some(cluster) = first.redis_cluster.as_mut() {
        for i in 0..cluster.len() {
            cluster.kill(i);
        }
    }
    eventually(
        "503 instead of a local sold_out once Redis is gone",
        Duration::from_secs(10),
        || async {
            let a = strangers.order(&second).await;
            assert!(matches!(a.status, 409 | 503), "{}", a.body);
            a.status == 503
        },
    )
    .await;
    second.stop().await;
    first.stop().await;
}

/// Runs `flashsale reconcile --sale SALE` against the app's store and Redis.
async fn reconcile(app: &TestApp, sale: &str) -> std::process::Output {
    let data = app.config.data_dir.display().to_string();
    let redis_url = app.redis.as_ref().expect("redis").url();
    let sale = sale.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
            .args([
                "reconcile",
                "--sale",
                &sale,
                "--data-dir",
                &data,
                "--admission",
                &redis_url,
            ])
            .env_remove("FLASHSALE_CONFIG")
            .output()
            .expect("reconcile")
    })
    .await
    .expect("join")
}
