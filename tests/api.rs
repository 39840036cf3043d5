//! The HTTP API over real sockets: every error code, each leaving stock unchanged, and the
//! happy paths of every route.

mod common;

use common::{Backend, TestApp};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use std::time::Duration;
use testkit::eventually;

async fn post_raw(
    app: &TestApp,
    sale: &str,
    token: Option<&str>,
    key: Option<&str>,
    content_type: &str,
    body: String,
) -> common::Answer {
    let mut req = app
        .client
        .post(format!("{}/v1/sales/{sale}/orders", app.url))
        .header("content-type", content_type)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    TestApp::answer(req.send().await.expect("send")).await
}

fn forged(claims: Value, secret: &str, alg: jsonwebtoken::Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

async fn bad_input_gets_a_problem_with_a_stable_code_and_takes_no_stock(backend: Backend) {
    let app = TestApp::start_on(backend).await;
    let sale = app.sale("bad-input", 10, 2).await;
    let token = app.token("alice");
    let good = r#"{"quantity":1,"payment_token":"tok_visa"}"#.to_owned();
    let secret = {
        use secrecy::ExposeSecret;
        app.config.auth.jwt_secret.expose_secret().to_owned()
    };
    let claims = |exp: u64| json!({"sub": "alice", "exp": exp, "iat": now_s(), "iss": "flashsale", "aud": "flashsale-buyers"});
    let expired = forged(
        claims(now_s() - 3600),
        &secret,
        jsonwebtoken::Algorithm::HS256,
    );
    let wrong_sig = forged(
        claims(now_s() + 3600),
        "some-other-secret-xyz",
        jsonwebtoken::Algorithm::HS256,
    );
    let wrong_alg = forged(
        claims(now_s() + 3600),
        &secret,
        jsonwebtoken::Algorithm::HS512,
    );
    let wrong_aud = forged(
        json!({"sub": "alice", "exp": now_s() + 3600, "iss": "flashsale", "aud": "someone-else"}),
        &secret,
        jsonwebtoken::Algorithm::HS256,
    );
    // alg: none, unsigned.
    let b64 = |v: &Value| {
        use std::fmt::Write;
        let raw = serde_json::to_vec(v).expect("json");
        // base64url without padding, by hand to keep the test self-contained.
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in raw.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                let _ = write!(out, "{}", T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(now_s() + 3600))
    );

    let long_key = "k".repeat(200);
    let before = app.stock_left(&sale).await;
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        &'a str,
        String,
        u16,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "malformed json",
            Some(&token),
            Some("k1"),
            "application/json",
            "{\"quantity\": 1,".into(),
            400,
            "malformed_json",
        ),
        (
            "unknown field",
            Some(&token),
            Some("k2"),
            "application/json",
            r#"{"quantity":1,"payment_token":"t","coupon":"x"}"#.into(),
            422,
            "invalid_body",
        ),
        (
            "missing field",
            Some(&token),
            Some("k3"),
            "application/json",
            r#"{"quantity":1}"#.into(),
            422,
            "invalid_body",
        ),
        (
            // serde fills a struct from an array of its fields; found by the fuzz target.
            "array of the fields",
            Some(&token),
            Some("k3a"),
            "application/json",
            r#"[1,"tok_visa"]"#.into(),
            422,
            "invalid_body",
        ),
        (
            "quantity 0",
            Some(&token),
            Some("k4"),
            "application/json",
            r#"{"quantity":0,"payment_token":"t"}"#.into(),
            422,
            "invalid_quantity",
        ),
        (
            "quantity negative",
            Some(&token),
            Some("k5"),
            "application/json",
            r#"{"quantity":-3,"payment_token":"t"}"#.into(),
            422,
            "invalid_quantity",
        ),
        (
            "quantity over max",
            Some(&token),
            Some("k6"),
            "application/json",
            r#"{"quantity":3,"payment_token":"t"}"#.into(),
            422,
            "invalid_quantity",
        ),
        (
            "quantity huge",
            Some(&token),
            Some("k6b"),
            "application/json",
            r#"{"quantity":99999999999,"payment_token":"t"}"#.into(),
            422,
            "invalid_quantity",
        ),
        (
            "quantity 2^63 (past i64)",
            Some(&token),
            Some("k6c"),
            "application/json",
            r#"{"quantity":9223372036854775808,"payment_token":"t"}"#.into(),
            422,
            "invalid_quantity",
        ),
        (
            "quantity past 64 bits",
            Some(&token),
            Some("k6d"),
            "application/json",
            r#"{"quantity":-100000000000000000000000,"payment_token":"t"}"#.into(),
            422,
            "invalid_quantity",
        ),
        (
            "quantity with a fraction",
            Some(&token),
            Some("k6e"),
            "application/json",
            r#"{"quantity":1.5,"payment_token":"t"}"#.into(),
            422,
            "invalid_body",
        ),
        (
            "empty payment token",
            Some(&token),
            Some("k7"),
            "application/json",
            r#"{"quantity":1,"payment_token":""}"#.into(),
            422,
            "invalid_payment_token",
        ),
        (
            "missing token",
            None,
            Some("k8"),
            "application/json",
            good.clone(),
            401,
            "missing_token",
        ),
        (
            "expired token",
            Some(&expired),
            Some("k9"),
            "application/json",
            good.clone(),
            401,
            "token_expired",
        ),
        (
            "wrongly signed",
            Some(&wrong_sig),
            Some("k10"),
            "application/json",
            good.clone(),
            401,
            "invalid_token",
        ),
        (
            "algorithm not allowed",
            Some(&wrong_alg),
            Some("k11"),
            "application/json",
            good.clone(),
            401,
            "invalid_token",
        ),
        (
            "alg none",
            Some(&alg_none),
            Some("k12"),
            "application/json",
            good.clone(),
            401,
            "invalid_token",
        ),
        (
            "wrong audience",
            Some(&wrong_aud),
            Some("k13"),
            "application/json",
            good.clone(),
            401,
            "invalid_token",
        ),
        (
            "garbage token",
            Some("not.a.jwt"),
            Some("k14"),
            "application/json",
            good.clone(),
            401,
            "invalid_token",
        ),
        (
            "missing idempotency key",
            Some(&token),
            None,
            "application/json",
            good.clone(),
            400,
            "missing_idempotency_key",
        ),
        (
            "oversized idempotency key",
            Some(&token),
            Some(&long_key),
            "application/json",
            good.clone(),
            400,
            "invalid_idempotency_key",
        ),
        (
            "oversized body",
            Some(&token),
            Some("k15"),
            "application/json",
            format!(r#"{{"quantity":1,"payment_token":"{}"}}"#, "x".repeat(5000)),
            413,
            "body_too_large",
        ),
        (
            "not json content type",
            Some(&token),
            Some("k16"),
            "text/plain",
            good.clone(),
            415,
            "unsupported_media_type",
        ),
    ];
    for (what, tok, key, ct, body, status, code) in cases {
        let a = post_raw(&app, &sale, tok, key, ct, body).await;
        assert_eq!(a.status, status, "{what}: {}", a.body);
        assert_eq!(a.code(), code, "{what}: {}", a.body);
        assert_eq!(
            a.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{what}"
        );
        assert_eq!(a.body["status"].as_u64(), Some(u64::from(status)), "{what}");
        assert!(
            a.body["title"].is_string() && a.body["type"].is_string(),
            "{what}"
        );
        assert_eq!(
            app.stock_left(&sale).await,
            before,
            "{what} must take no stock"
        );
    }
    let unknown = app.order("no-such-sale", &token, "k20", 1).await;
    assert_eq!((unknown.status, unknown.code()), (404, "unknown_sale"));
    let stats = app.stats(&sale).await;
    assert_eq!(stats["accepted"], 0);
    app.stop().await;
}

async fn admission_outcomes_and_idempotency(backend: Backend) {
    let app = TestApp::start_on(backend).await;
    let sale = app.sale("outcomes", 3, 2).await;
    let alice = app.token("alice");
    let bob = app.token("bob");

    let first = app.order(&sale, &alice, "a-1", 2).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.body["status"], "accepted");
    assert_eq!(first.body["sequence"], 1);
    let order_id = first.body["order_id"]
        .as_str()
        .expect("order id")
        .to_owned();
    assert_eq!(
        uuid::Uuid::parse_str(&order_id)
            .expect("uuid")
            .get_version_num(),
        7
    );

    // Same key, same body: the same answer, no stock taken.
    let again = app.order(&sale, &alice, "a-1", 2).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.body["order_id"], first.body["order_id"]);
    assert_eq!(app.stock_left(&sale).await, 1);
    // Same key, different body: refused.
    let conflict = app.order(&sale, &alice, "a-1", 1).await;
    assert_eq!(
        (conflict.status, conflict.code()),
        (422, "idempotency_conflict")
    );
    // The same key from another user is another order.
    let other = app.order(&sale, &bob, "a-1", 1).await;
    assert_eq!(other.status, 202, "{}", other.body);
    assert_ne!(other.body["order_id"], first.body["order_id"]);

    let over = app.order(&sale, &alice, "a-2", 1).await;
    assert_eq!((over.status, over.code()), (403, "limit_exceeded"));
    let sold = app.order(&sale, &bob, "b-2", 1).await;
    assert_eq!((sold.status, sold.code()), (409, "sold_out"));
    assert_eq!(app.stock_left(&sale).await, 0);

    // Adding stock reopens the sale.
    let add = app
        .client
        .post(format!("{}/v1/sales/{sale}/stock", app.url))
        .bearer_auth(app.operator())
        .json(&json!({"quantity": 5}))
        .send()
        .await
        .expect("send");
    let add = TestApp::answer(add).await;
    assert_eq!(add.status, 200, "{}", add.body);
    assert_eq!(add.body["stock"], 8);
    let after = app.order(&sale, &bob, "b-3", 1).await;
    assert_eq!(after.status, 202, "{}", after.body);

    // Own orders only.
    let get = |token: String| {
        let client = app.client.clone();
        let url = format!("{}/v1/orders/{order_id}", app.url);
        async move {
            TestApp::answer(
                client
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("send"),
            )
            .await
        }
    };
    let mine = get(alice.clone()).await;
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert_eq!(mine.body["order_id"].as_str(), Some(order_id.as_str()));
    let theirs = get(bob.clone()).await;
    assert_eq!((theirs.status, theirs.code()), (404, "unknown_order"));

    // It settles: paid (the mock accepts tok_visa) and its history shows the way there.
    eventually("the order is paid", Duration::from_secs(30), || {
        let get = get(alice.clone());
        async move { get.await.body["status"] == "paid" }
    })
    .await;
    let paid = get(alice.clone()).await;
    let history: Vec<&str> = paid.body["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["status"].as_str())
        .collect();
    assert_eq!(
        history,
        ["accepted", "persisted", "payment_pending", "paid"]
    );
    app.stop().await;
}

async fn rate_limit_and_sale_window(backend: Backend) {
    let app = TestApp::start_on(backend).await;
    let a = app
        .create_sale(json!({
            "id": "rated", "sku": "s", "stock": 1000, "price_cents": 100, "currency": "EUR",
            "per_user_limit": 1000, "max_quantity_per_order": 1,
            "user_rate": {"per_second": 1, "burst": 3}
        }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let t = app.token("eager");
    let mut codes = Vec::new();
    for i in 0..6 {
        let a = app.order("rated", &t, &format!("r{i}"), 1).await;
        if a.status == 429 {
            assert_eq!(a.code(), "rate_limited");
            let retry: u64 = a.headers["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!(retry >= 1);
        }
        codes.push(a.status);
    }
    assert_eq!(&codes[..3], &[202, 202, 202], "the burst is admitted");
    assert!(codes[3..].iter().all(|c| *c == 429), "{codes:?}");

    let future = app
        .create_sale(json!({
            "id": "later", "sku": "s", "stock": 10, "price_cents": 100, "currency": "EUR",
            "starts_at": "2099-01-01T00:00:00Z", "ends_at": "2099-01-02T00:00:00Z"
        }))
        .await;
    assert_eq!(future.status, 201, "{}", future.body);
    let early = app.order("later", &t, "x", 1).await;
    assert_eq!((early.status, early.code()), (403, "sale_not_active"));
    assert_eq!(app.stock_left("later").await, 10);
    app.stop().await;
}

async fn operator_routes_are_guarded_and_validated(backend: Backend) {
    let app = TestApp::start_on(backend).await;
    let body = json!({"id": "op", "sku": "s", "stock": 5, "price_cents": 100, "currency": "EUR"});
    let no_token = app
        .client
        .post(format!("{}/v1/sales", app.url))
        .json(&body)
        .send()
        .await
        .expect("send");
    let no_token = TestApp::answer(no_token).await;
    assert_eq!(no_token.code(), "missing_token");
    assert_eq!(no_token.headers["www-authenticate"], "Bearer");
    let buyer = app
        .client
        .post(format!("{}/v1/sales", app.url))
        .bearer_auth(app.token("mallory"))
        .json(&body)
        .send()
        .await
        .expect("send");
    let buyer = TestApp::answer(buyer).await;
    assert_eq!((buyer.status, buyer.code()), (401, "invalid_token"));

    // An order for a sale that does not exist yet is refused; once the sale is created,
    // the refusal is not remembered.
    let early = app.order("op", &app.token("early"), "e1", 1).await;
    assert_eq!((early.status, early.code()), (404, "unknown_sale"));
    assert_eq!(app.create_sale(body.clone()).await.status, 201);
    let now = app.order("op", &app.token("early"), "e1", 1).await;
    assert_eq!(now.status, 202, "{}", now.body);
    let dup = app.create_sale(body).await;
    assert_eq!((dup.status, dup.code()), (409, "sale_exists"));
    for bad in [
        json!({"sku": "s", "stock": 0, "price_cents": 100, "currency": "EUR"}),
        json!({"sku": "s", "stock": 5, "price_cents": 100, "currency": "euro"}),
        json!({"id": "has space", "sku": "s", "stock": 5, "price_cents": 100, "currency": "EUR"}),
        json!({"sku": "s", "stock": 5, "price_cents": 100, "currency": "EUR", "per_user_limit": 1, "max_quantity_per_order": 2}),
        json!({"sku": "s", "stock": 5, "price_cents": 100, "currency": "EUR", "starts_at": "2030-01-02T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z"}),
        json!({"sku": "s", "stock": 5, "price_cents": 100, "currency": "EUR", "stock_buckets": 0}),
        json!({"sku": "s", "stock": 500, "price_cents": 100, "currency": "EUR", "stock_buckets": 65}),
        json!({"sku": "s", "stock": 5, "price_cents": 100, "currency": "EUR", "stock_buckets": 6}),
    ] {
        let a = app.create_sale(bad.clone()).await;
        assert_eq!(
            (a.status, a.code()),
            (422, "invalid_sale"),
            "{bad}: {}",
            a.body
        );
    }
    let extra = app
        .create_sale(
            json!({"sku": "s", "stock": 5, "price_cents": 100, "currency": "EUR", "colour": "red"}),
        )
        .await;
    assert_eq!((extra.status, extra.code()), (422, "invalid_body"));
    // A date whose UTC instant RFC 3339 cannot write (year -1 here) is refused; it used to
    // be stored, and answering the sale then panicked (found by the record fuzz target).
    let unwritable = app
        .create_sale(json!({"sku": "s", "stock": 5, "price_cents": 100, "currency": "EUR", "starts_at": "0000-01-01T00:00:00+01:00"}))
        .await;
    assert_eq!(
        (unwritable.status, unwritable.code()),
        (422, "invalid_body"),
        "{}",
        unwritable.body
    );

    let got = TestApp::answer(
        app.client
            .get(format!("{}/v1/sales/op", app.url))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["stock_left"], 4);
    assert_eq!(got.body["currency"], "EUR");
    let stats_as_buyer = TestApp::answer(
        app.client
            .get(format!("{}/v1/sales/op/stats", app.url))
            .bearer_auth(app.token("mallory"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(stats_as_buyer.status, 401);
    app.stop().await;
}

/// A sale of four stock buckets sells exactly its stock, whichever buckets its buyers live
/// in, answers `sold_out` only then, keeps each buyer's limit and answers, and gives a
/// released unit back to be sold again. (The embedded backend keeps one counter; the
/// answers are the same.)
async fn a_sale_of_stock_buckets_sells_exactly_its_stock(backend: Backend) {
    let app = TestApp::start_on(backend).await;
    let created = app
        .create_sale(json!({
            "id": "bk", "sku": "s", "stock": 9, "price_cents": 100, "currency": "EUR",
            "per_user_limit": 2, "max_quantity_per_order": 2, "stock_buckets": 4,
            "user_rate": {"per_second": 1000, "burst": 1000}
        }))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["stock_buckets"], 4);
    let mut units = 0;
    let mut first_sold_out = None;
    let mut sequences = std::collections::HashSet::new();
    for u in 0..40 {
        let token = app.token(&format!("b{u}"));
        let a = app.order("bk", &token, "k", 2).await;
        match (a.status, a.code()) {
            (202, _) => {
                assert!(
                    first_sold_out.is_none(),
                    "accepted after a sold_out: {}",
                    a.body
                );
                units += 2;
                let seq = a.body["sequence"].as_u64();
                assert!(sequences.insert(seq), "sequence {seq:?} twice");
                // A retry gets the same answer from the buyer's bucket.
                let again = app.order("bk", &token, "k", 2).await;
                assert_eq!(again.body["order_id"], a.body["order_id"]);
            }
            (409, "sold_out") => {
                first_sold_out.get_or_insert(u);
            }
            other => panic!("{other:?}: {}", a.body),
        }
    }
    // 9 units, orders of 2: four orders, one unit left that no order of 2 can take.
    assert_eq!(units, 8);
    let stats = app.stats("bk").await;
    assert_eq!(stats["stock_left"], 1, "{stats}");
    assert_eq!(stats["accepted"], 4, "{stats}");
    // One more unit for a buyer who wants one.
    let one = app.order("bk", &app.token("single"), "k", 1).await;
    assert_eq!(one.status, 202, "{}", one.body);
    assert_eq!(app.stock_left("bk").await, 0);
    app.stop().await;
}

async fn health_readiness_metrics_and_unknown_routes(backend: Backend) {
    let app = TestApp::start_on(backend).await;
    let get = |path: &str| {
        let client = app.client.clone();
        let url = format!("{}{path}", app.url);
        async move { TestApp::answer(client.get(url).send().await.expect("send")).await }
    };
    assert_eq!(get("/healthz").await.status, 200);
    let ready = get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let sale = app.sale("metered", 5, 1).await;
    let _ = app.order(&sale, &app.token("u"), "m1", 1).await;
    let metrics = get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains("flashsale_order_answers_total{outcome=\"accepted\",code=\"accepted\"} 1"),
        "{text}"
    );
    assert!(text.contains("flashsale_order_latency_seconds_bucket"));
    let nf = get("/v2/nothing").await;
    assert_eq!((nf.status, nf.code()), (404, "not_found"));
    let wrong_method = TestApp::answer(
        app.client
            .delete(format!("{}/v1/sales/metered", app.url))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(
        (wrong_method.status, wrong_method.code()),
        (405, "method_not_allowed")
    );
    app.stop().await;
}

async fn openapi_document_matches_the_server(backend: Backend) {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .expect("docs/openapi.json"),
    )
    .expect("valid JSON");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    // Every error code the server can answer is documented.
    let text = doc.to_string();
    for (code, status, _) in ingest::problem::ALL_CODES {
        assert!(
            text.contains(&format!("\"{code}\"")),
            "code {code} ({status}) is not in the OpenAPI document"
        );
    }
    // Every documented operation is routed by the server (answers something other than
    // not_found / method_not_allowed).
    let app = TestApp::start_on(backend).await;
    app.sale("spec", 5, 1).await;
    let paths = doc["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path
            .replace("{id}", "spec")
            .replace("{order_id}", "0190a0a0-0000-7000-8000-000000000000");
        for method in ops.as_object().expect("ops").keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let a = TestApp::answer(
                app.client
                    .request(m, format!("{}{concrete}", app.url))
                    .send()
                    .await
                    .expect("send"),
            )
            .await;
            assert!(
                !matches!(a.code(), "not_found" | "method_not_allowed"),
                "{method} {path} is documented but not routed: {}",
                a.body
            );
            checked += 1;
        }
    }
    assert!(checked >= 9, "only {checked} operations documented");
    app.stop().await;
}

/// Runs each scenario once per admission backend.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test]
            async fn embedded() {
                super::$name(Backend::Embedded).await
            }
            #[tokio::test]
            async fn redis() {
                super::$name(Backend::Redis).await
            }
            #[tokio::test]
            async fn redis_cluster() {
                super::$name(Backend::RedisCluster).await
            }
        }
    )*};
}

on_every_backend!(
    a_sale_of_stock_buckets_sells_exactly_its_stock,
    bad_input_gets_a_problem_with_a_stable_code_and_takes_no_stock,
    admission_outcomes_and_idempotency,
    rate_limit_and_sale_window,
    operator_routes_are_guarded_and_validated,
    health_readiness_metrics_and_unknown_routes,
    openapi_document_matches_the_server,
);
