//! Criterion benchmarks of the hot paths that do no I/O: the admission decision, the order
//! body fingerprint, buyer JWT verification, record encode/decode and the partitioner.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
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

fn jwt(c: &mut Criterion) {
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

criterion_group!(benches, admission, jwt, record);
criterion_main!(benches);
