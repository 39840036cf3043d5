//! Receipts end to end on the default local-disk archive: the demo's `receipts` invariant,
//! a buyer downloading the PDF of a paid order (another buyer learning nothing), an order
//! that gets no receipt; and start-up refusing S3 credentials the store does not take.

mod common;

use common::TestApp;
use serde_json::{json, Value};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use storage::OrderId;

#[test]
fn the_demo_writes_one_receipt_per_paid_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args([
            "demo",
            "--json",
            "--stock",
            "100",
            "--users",
            "200",
            "--requests",
            "500",
            "--concurrency",
            "16",
            "--decline-rate",
            "0.2",
        ])
        .current_dir(dir.path())
        .env_remove("FLASHSALE_CONFIG")
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(r["invariants"]["receipts"], Value::Bool(true), "{r}");
    assert!(r["paid"].as_u64().unwrap_or(0) > 0, "{r}");
    assert_eq!(r["receipts"], r["paid"], "{r}");
}

async fn get_receipt(app: &TestApp, order_id: &str, token: &str) -> reqwest::Response {
    app.client
        .get(format!("{}/v1/orders/{order_id}/receipt", app.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("send")
}

#[tokio::test]
async fn a_buyer_downloads_the_receipt_of_a_paid_order_and_nobody_else_can() {
    let app = TestApp::start().await;
    let sale = app.sale("receipted", 10, 2).await;
    let (alice, bob) = (app.token("alice"), app.token("bob"));

    let placed = app.order(&sale, &alice, "a-1", 1).await;
    assert_eq!(placed.status, 202, "{}", placed.body);
    let order_id = placed.body["order_id"]
        .as_str()
        .expect("order_id")
        .to_owned();
    let id: OrderId = order_id.parse().expect("uuid");

    // A declined order is never paid: it never gets a receipt.
    let declined = app
        .client
        .post(format!("{}/v1/sales/{sale}/orders", app.url))
        .bearer_auth(&alice)
        .header("idempotency-key", "a-2")
        .json(&json!({"quantity": 1, "payment_token": "tok_decline_always"}))
        .send()
        .await
        .expect("send");
    let declined = TestApp::answer(declined).await;
    assert_eq!(declined.status, 202, "{}", declined.body);
    let declined_id = declined.body["order_id"]
        .as_str()
        .expect("order_id")
        .to_owned();

    // Paid, and its receipt recorded.
    let store = std::sync::Arc::clone(&app.running().store);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let order = store.get_order(id).await.expect("store");
        if order.is_some_and(|o| o.receipt_key.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "no receipt recorded within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mine = get_receipt(&app, &order_id, &alice).await;
    assert_eq!(mine.status(), 200);
    assert_eq!(
        mine.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/pdf")
    );
    let pdf = mine.bytes().await.expect("body");
    assert!(pdf.starts_with(b"%PDF-"), "not a PDF");
    assert!(
        pdf.windows(order_id.len())
            .any(|w| w == order_id.as_bytes()),
        "the PDF does not name the order"
    );

    // Another buyer: the same 404 as an order that does not exist.
    let theirs = TestApp::answer(get_receipt(&app, &order_id, &bob).await).await;
    assert_eq!((theirs.status, theirs.code()), (404, "unknown_order"));
    let unknown =
        TestApp::answer(get_receipt(&app, "0190a0a0-0000-7000-8000-000000000000", &alice).await)
            .await;
    assert_eq!((unknown.status, unknown.code()), (404, "unknown_order"));
    assert_eq!(theirs.body["detail"], unknown.body["detail"]);

    // The declined order (once settled): no receipt, ever.
    let declined_oid: OrderId = declined_id.parse().expect("uuid");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !store
        .get_order(declined_oid)
        .await
        .expect("store")
        .is_some_and(|o| o.status.is_final())
    {
        assert!(
            Instant::now() < deadline,
            "the declined order did not settle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let none = TestApp::answer(get_receipt(&app, &declined_id, &alice).await).await;
    assert_eq!(
        (none.status, none.code()),
        (404, "receipt_not_ready"),
        "{}",
        none.body
    );
    let none_theirs = TestApp::answer(get_receipt(&app, &declined_id, &bob).await).await;
    assert_eq!(
        (none_theirs.status, none_theirs.code()),
        (404, "unknown_order")
    );
    // No token at all.
    let anonymous = app
        .client
        .get(format!("{}/v1/orders/{order_id}/receipt", app.url))
        .send()
        .await
        .expect("send");
    assert_eq!(anonymous.status(), 401);

    // The CLI writes the same bytes; a receipt the order does not have exits non-zero.
    let data_dir = app.config.data_dir.clone();
    let out_file = data_dir.join("receipt.pdf");
    let cli = Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["receipt", &order_id, "-o"])
        .arg(&out_file)
        .arg("--data-dir")
        .arg(&data_dir)
        .env("FLASHSALE_CONFIG", "/dev/null")
        .output()
        .expect("run receipt");
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert_eq!(std::fs::read(&out_file).expect("written"), pdf.to_vec());
    let cli = Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["receipt", &declined_id, "-o"])
        .arg(data_dir.join("none.pdf"))
        .arg("--data-dir")
        .arg(&data_dir)
        .env("FLASHSALE_CONFIG", "/dev/null")
        .output()
        .expect("run receipt");
    assert_eq!(cli.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&cli.stderr).contains("no receipt yet"),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    app.stop().await;
}

#[test]
fn serve_refuses_to_start_with_credentials_the_object_store_refuses() {
    let s3 = testkit::S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("FLASHSALE_CONFIG", "/dev/null")
        .env(
            "FLASHSALE_RECEIPTS__URL",
            format!("s3://{}/receipts", s3.bucket()),
        )
        .env("FLASHSALE_RECEIPTS__ENDPOINT", s3.endpoint())
        .env("FLASHSALE_RECEIPTS__REGION", s3.region())
        .env("FLASHSALE_RECEIPTS__ALLOW_HTTP", "true")
        .env("FLASHSALE_RECEIPTS__ACCESS_KEY_ID", s3.access_key())
        .env("FLASHSALE_RECEIPTS__SECRET_ACCESS_KEY", "not-the-secret")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve did not exit with refused credentials");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("receipts.secret_access_key"), "{stderr}");
}
