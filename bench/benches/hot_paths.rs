//! Criterion benchmarks of the hot paths that do no I/O: the admission decision, the order
//! body fingerprint, buyer JWT verification, request parsing and validation, record
//! encode/decode, batch building (the embedded log's group commit, the settler's persist
//! batch) and the partitioner.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ingest::model::{AdmitRequest, SaleRules, SaleState};
use sequencer::partition::partition_for;
use sequencer::{decode, encode, OrderRecord, RECORD_VERSION};
use storage::{Currency, OrderId, SaleId, Timestamp, UserId};

fn admission(c: &mut Criterion) {
    let rules = SaleRules {
        stock: u64::MAX / 4,
        per_user_limit: u32::MAX,
        rate_per_second: 1_000_000,
        burst: 1_000_000,
        starts_at_us: 0,
        ends_at_us: i64::MAX,
    };
    let users: Vec<UserId> = (0..10_000)
        .map(|u| UserId::parse(format!("user-{u}")).expect("user"))
        .collect();
    c.bench_function("admission/accept", |b| {
        let mut state = SaleState::new(rules);
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let req = AdmitRequest {
                user: users[(i % 10_000) as usize].clone(),
                quantity: 1,
                key: i.to_string(),
                fingerprint: "f".into(),
                order_id: OrderId::new(),
            };
            black_box(state.admit(&req, 1_000_000 + i as i64))
        })
    });
    c.bench_function("fingerprint", |b| {
        b.iter(|| ingest::api::fingerprint(black_box(2), black_box("tok_visa_4242")))
    });
}

/// HS256 buyer authentication as ingest configures it, and a valid buyer token.
fn buyer_auth() -> (ingest::auth::Auth, String) {
    let config = ingest::auth::AuthConfig {
        jwt_secret: secrecy::SecretString::from("bench-secret-of-enough-length"),
        issuer: "flashsale".into(),
        audience: "flashsale-buyers".into(),
        algorithms: vec![jsonwebtoken::Algorithm::HS256],
        leeway: std::time::Duration::from_secs(5),
        operator_token: secrecy::SecretString::from("operator"),
    };
    let auth = ingest::auth::Auth::new(&config).expect("auth");
    let token = ingest::auth::issue_token(&config, "buyer-1", std::time::Duration::from_secs(3600))
        .expect("token");
    (auth, token)
}

fn jwt(c: &mut Criterion) {
    let (auth, token) = buyer_auth();
    c.bench_function("jwt/verify_hs256", |b| {
        b.iter(|| auth.verify(black_box(&token)).expect("valid"))
    });
}

fn record(c: &mut Criterion) {
    let r = OrderRecord {
        v: RECORD_VERSION,
        order_id: OrderId::new(),
        sale_id: SaleId::parse("bench-sale").expect("id"),
        user_id: UserId::parse("buyer-1").expect("user"),
        quantity: 2,
        amount_minor: 3998,
        currency: Currency::parse("EUR").expect("eur"),
        sequence: 17,
        idempotency_key: "c3f1d2".into(),
        fingerprint: "5d41402abc4b2a76b9719d911017c592".into(),
        payment_token: "tok_visa".into(),
        accepted_at: Timestamp::now(),
    };
    let bytes = encode(&r).expect("encode");
    c.bench_function("record/encode", |b| b.iter(|| encode(black_box(&r))));
    c.bench_function("record/decode", |b| b.iter(|| decode(black_box(&bytes))));
    let key = r.key();
    c.bench_function("partition/murmur2", |b| {
        b.iter(|| partition_for(black_box(key.as_bytes()), black_box(12)))
    });
}

/// `ingest::api`'s header checks (`idempotency_key`, `require_json`) are private, so these
/// are copies of the same checks, in the order `post_order` runs them; the body parser is
/// the real `parse_order_body` and the JWT check the real `Auth::buyer`.
fn idempotency_key(headers: &http::HeaderMap) -> Option<String> {
    let s = headers.get("idempotency-key")?.to_str().ok()?;
    (!s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| s.to_owned())
}

fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

fn parse_order(body: &[u8]) -> Option<(u32, String)> {
    let b = ingest::api::parse_order_body(body).ok()?;
    let q = b.quantity_within(u32::MAX).ok()?;
    Some((q, ingest::api::fingerprint(q, &b.payment_token)))
}

fn request(c: &mut Criterion) {
    let (auth, token) = buyer_auth();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("header"),
    );
    headers.insert(
        "idempotency-key",
        "c3f1d2e4-5b6a-4c7d-8e9f-0a1b2c3d4e5f"
            .parse()
            .expect("header"),
    );
    let body = br#"{"quantity":1,"payment_token":"tok_visa"}"#;
    c.bench_function("request/parse_body", |b| {
        b.iter(|| parse_order(black_box(body)).expect("valid"))
    });
    c.bench_function("request/headers_and_body", |b| {
        b.iter(|| {
            let headers = black_box(&headers);
            let user = auth.buyer(headers).expect("buyer");
            let key = idempotency_key(headers).expect("key");
            assert!(is_json(headers));
            (user, key, parse_order(black_box(body)).expect("valid"))
        })
    });
    let unknown = br#"{"quantity":1,"payment_token":"tok_visa","coupon":"x"}"#;
    c.bench_function("request/parse_body_refused", |b| {
        b.iter(|| parse_order(black_box(unknown)).is_none())
    });
}

fn batch(c: &mut Criterion) {
    const N: usize = 512;
    let records: Vec<OrderRecord> = (0..N as u64)
        .map(|i| OrderRecord {
            v: RECORD_VERSION,
            order_id: OrderId::new(),
            sale_id: SaleId::parse("bench-sale").expect("id"),
            user_id: UserId::parse(format!("buyer-{i}")).expect("user"),
            quantity: 1,
            amount_minor: 1999,
            currency: Currency::parse("EUR").expect("eur"),
            sequence: i,
            idempotency_key: format!("key-{i}"),
            fingerprint: "5d41402abc4b2a76b9719d911017c592".into(),
            payment_token: "tok_visa".into(),
            accepted_at: Timestamp::now(),
        })
        .collect();
    let mut group = c.benchmark_group("batch");
    group.throughput(Throughput::Elements(N as u64));
    // The embedded log's group commit: each record encoded, framed `len | crc32 | payload`
    // into one buffer written at once.
    group.bench_function("encode_frame_512", |b| {
        let mut buf = Vec::with_capacity(N * 400);
        b.iter(|| {
            buf.clear();
            for r in &records {
                let payload = encode(black_box(r)).expect("encode");
                buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
                buf.extend_from_slice(&payload);
            }
            buf.len()
        })
    });
    // The settler's persist batch: each log entry decoded and turned into a `NewOrder`.
    let payloads: Vec<Vec<u8>> = records.iter().map(|r| encode(r).expect("encode")).collect();
    group.bench_function("decode_to_new_order_512", |b| {
        b.iter(|| {
            payloads
                .iter()
                .map(|p| decode(black_box(p)).expect("decode").to_new_order())
                .collect::<Vec<_>>()
        })
    });
    group.finish();
}

/// plotters is built with `ab_glyph` (for the e2e chart) and criterion shares it, so its
/// plots need a registered font; without one on this machine, criterion runs without plots.
fn config() -> Criterion {
    if bench::chart::register_font() {
        Criterion::default()
    } else {
        Criterion::default().without_plots()
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = admission, jwt, request, record, batch
}
criterion_main!(benches);
