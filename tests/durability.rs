//! The binary as a child process, `kill -9` mid-burst, restarted on the same data: every
//! order that got 202 is persisted exactly once and settles, and its Idempotency-Key still
//! answers with the same order.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_flashsale");

/// A child process killed when the test ends, pass or fail.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary and returns it with the URL it printed.
fn spawn(args: &[&str], env: &[(&str, String)]) -> (Child, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("FLASHSALE_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn flashsale");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    (child, url)
}

fn serve(data: &Path, provider: &str) -> (Child, String) {
    spawn(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.display().to_string(),
        ],
        &[
            ("FLASHSALE_PROVIDERS__PAYMENT_URL", provider.to_owned()),
            ("FLASHSALE_PROVIDERS__NOTIFICATION_URL", provider.to_owned()),
            // Small segments and frequent admission checkpoints, so the kill lands amid
            // segment rolls, checkpoints and segment deletions.
            ("FLASHSALE_LOG__SEGMENT_BYTES", "65536".to_owned()),
            ("FLASHSALE_LOG__CHECKPOINT_INTERVAL", "100ms".to_owned()),
        ],
    )
}

fn token(user: &str) -> String {
    let out = Command::new(BIN)
        .args(["token", "--user", user])
        .env_remove("FLASHSALE_CONFIG")
        .output()
        .expect("token");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_orders_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (provider, provider_url) = spawn(&["mock-provider", "--listen", "127.0.0.1:0"], &[]);
    let _provider = Guard(provider);
    let (server, url) = serve(dir.path(), &provider_url);
    let mut server = Guard(server);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let operator = "flashsale-dev-operator-token";
    let created = client
        .post(format!("{url}/v1/sales"))
        .bearer_auth(operator)
        .json(
            &json!({"id": "durable", "sku": "s", "stock": 100000, "price_cents": 100,
                      "currency": "EUR", "per_user_limit": 1000, "max_quantity_per_order": 1,
                      "user_rate": {"per_second": 100000, "burst": 100000}}),
        )
        .send()
        .await
        .expect("create");
    assert_eq!(created.status().as_u16(), 201);

    let users: Arc<Vec<String>> = Arc::new((0..8).map(|u| token(&format!("d{u}"))).collect());
    let acked = Arc::new(parking_lot::Mutex::new(
        Vec::<(usize, String, String)>::new(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (client, url, users, acked, stop, next) = (
            client.clone(),
            url.clone(),
            Arc::clone(&users),
            Arc::clone(&acked),
            Arc::clone(&stop),
            Arc::clone(&next),
        );
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let u = i % users.len();
                let key = format!("dur-{i}");
                let resp = client
                    .post(format!("{url}/v1/sales/durable/orders"))
                    .bearer_auth(&users[u])
                    .header("idempotency-key", &key)
                    .json(&json!({"quantity": 1, "payment_token": "tok_visa"}))
                    .send()
                    .await;
                let Ok(resp) = resp else { continue };
                if resp.status().as_u16() == 202 {
                    if let Ok(v) = resp.json::<Value>().await {
                        if let Some(id) = v["order_id"].as_str() {
                            acked.lock().push((u, key, id.to_owned()));
                        }
                    }
                }
            }
        });
    }
    testkit::eventually("500 acknowledged orders", Duration::from_secs(60), || {
        let n = acked.lock().len();
        async move { n >= 500 }
    })
    .await;
    // SIGKILL mid-burst: no chance to flush or drain.
    server.0.kill().expect("kill -9");
    server.0.wait().expect("reap");
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let acked = acked.lock().clone();
    assert!(acked.len() >= 500);

    let (server, url) = serve(dir.path(), &provider_url);
    let mut server = Guard(server);
    // Every acknowledged order is there and settles.
    for (u, key, id) in &acked {
        let (client, url, tok) = (client.clone(), url.clone(), users[*u].clone());
        testkit::eventually(&format!("order {id} paid"), Duration::from_secs(60), || {
            let (client, url, tok) = (client.clone(), url.clone(), tok.clone());
            async move {
                match client
                    .get(format!("{url}/v1/orders/{id}"))
                    .bearer_auth(&tok)
                    .send()
                    .await
                {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .map(|v| v["status"] == "paid")
                        .unwrap_or(false),
                    Err(_) => false,
                }
            }
        })
        .await;
        let _ = key;
    }
    // The idempotency answers survived: a retry gets the same order and takes nothing.
    let (u, key, id) = &acked[acked.len() / 2];
    let retry: Value = client
        .post(format!("{url}/v1/sales/durable/orders"))
        .bearer_auth(&users[*u])
        .header("idempotency-key", key)
        .json(&json!({"quantity": 1, "payment_token": "tok_visa"}))
        .send()
        .await
        .expect("retry")
        .json()
        .await
        .expect("json");
    assert_eq!(retry["order_id"].as_str(), Some(id.as_str()));

    // Exactly once: the store holds as many orders as the log accepted (acknowledged ones
    // plus any that were durable when the process died), and stock is conserved.
    let stats: Value = client
        .get(format!("{url}/v1/sales/durable/stats"))
        .bearer_auth(operator)
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    let accepted = stats["accepted"].as_u64().expect("accepted");
    assert!(accepted >= acked.len() as u64);
    testkit::eventually("everything persisted", Duration::from_secs(60), || {
        let client = client.clone();
        let url = url.clone();
        async move {
            let s: Value = match client
                .get(format!("{url}/v1/sales/durable/stats"))
                .bearer_auth(operator)
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => return false,
            };
            s["persisted"].as_u64() == Some(accepted) && s["paid"].as_u64() == Some(accepted)
        }
    })
    .await;
    assert_eq!(
        stats["stock_left"].as_i64().expect("left") + accepted as i64,
        100_000
    );
    // Settled segments are deleted once a checkpoint covers them.
    let first_segment = dir.path().join("log").join("00000000000000000000.seg");
    testkit::eventually("the first segment deleted", Duration::from_secs(30), || {
        let gone = !first_segment.exists();
        async move { gone }
    })
    .await;
    // One successful charge per acknowledged order at the provider.
    let audit = mock_provider::fetch_audit(&provider_url)
        .await
        .expect("audit");
    for (_, _, id) in &acked {
        let charges = audit.orders.get(id).map(|a| a.successful_charges);
        assert_eq!(charges, Some(1), "order {id}");
    }
    let _ = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status();
    let status = server.0.wait().expect("wait");
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
}
