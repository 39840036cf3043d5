//! The checks of the ingest fuzz targets (`fuzz/fuzz_targets/order_body.rs` and `jwt.rs`).
//!
//! Each takes arbitrary bytes, runs them through the real parser and panics when a property
//! fails, not only when the parser does. The fuzz targets call them under libFuzzer on
//! nightly; `tests/fuzz_corpus.rs` replays the checked-in corpus through the same functions
//! on stable, so a finding stays fixed. No I/O.

use crate::api::{fingerprint, parse_order_body};
use crate::auth::{Auth, AuthConfig};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{header, HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey};
use secrecy::SecretString;
use std::sync::OnceLock;
use std::time::Duration;

/// The codes an order body can be refused with before a sale is looked up.
const BODY_CODES: [&str; 4] = [
    "malformed_json",
    "invalid_body",
    "invalid_payment_token",
    "invalid_quantity",
];

/// Order body parsing ([`parse_order_body`]): an accepted body is a JSON object with
/// exactly `quantity` and `payment_token`, holding the values parsed, and satisfies the
/// validation rules (quantity at least 1, token 1 to 256 visible ASCII); a refused one gets
/// one of the body codes, and `malformed_json` only when the bytes are not JSON. Found: an
/// array of the two values was accepted (`fuzz/corpus/order_body/array`).
pub fn order_body(data: &[u8]) {
    let body = match parse_order_body(data) {
        Ok(body) => body,
        Err(e) => {
            assert!(BODY_CODES.contains(&e.code), "unexpected code {}", e.code);
            if e.code == "malformed_json" {
                // serde_json's reading of "JSON": a number out of f64 range (1e400) is
                // malformed to it, as to the parser.
                assert!(
                    serde_json::from_slice::<serde_json::Value>(data).is_err(),
                    "valid JSON refused as malformed: {}",
                    e.detail
                );
            }
            return;
        }
    };
    assert!(body.quantity >= 1, "quantity {} accepted", body.quantity);
    let token = &body.payment_token;
    assert!(
        (1..=256).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic()),
        "payment token {token:?} accepted"
    );
    let json: serde_json::Value = serde_json::from_slice(data).expect("an accepted body is JSON");
    let object = json.as_object().expect("an accepted body is an object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["payment_token", "quantity"]);
    assert_eq!(object["quantity"].as_i64(), Some(body.quantity));
    assert_eq!(object["payment_token"].as_str(), Some(token.as_str()));
    for max in [1, 2, 10, u32::MAX] {
        match body.quantity_within(max) {
            Ok(q) => {
                assert!((1..=max).contains(&q) && i64::from(q) == body.quantity);
                let f = fingerprint(q, token);
                assert!(f.len() == 32 && f.bytes().all(|b| b.is_ascii_hexdigit()));
            }
            Err(e) => {
                assert_eq!(e.code, "invalid_quantity");
                assert!(body.quantity > i64::from(max));
            }
        }
    }
}

/// Secret of the JWT target's verifier (the corpus's valid tokens are signed with it).
pub const JWT_SECRET: &str = "fuzzing-secret-of-32-bytes-long!";
/// Required `iss` of the JWT target.
pub const JWT_ISSUER: &str = "flashsale";
/// Required `aud` of the JWT target.
pub const JWT_AUDIENCE: &str = "flashsale-buyers";
/// Operator token of the JWT target.
pub const OPERATOR_TOKEN: &str = "fuzzing-operator-token";
/// Leeway on `exp` of the JWT target, seconds.
const LEEWAY: u64 = 5;
/// The allowlist of the JWT target (HS512 stays outside it on purpose).
const ALGORITHMS: [Algorithm; 2] = [Algorithm::HS256, Algorithm::HS384];

/// The verifier configuration the JWT target checks against.
pub fn jwt_config() -> AuthConfig {
    AuthConfig {
        jwt_secret: SecretString::from(JWT_SECRET),
        issuer: JWT_ISSUER.into(),
        audience: JWT_AUDIENCE.into(),
        algorithms: ALGORITHMS.to_vec(),
        leeway: Duration::from_secs(LEEWAY),
        operator_token: SecretString::from(OPERATOR_TOKEN),
    }
}

fn auth() -> &'static Auth {
    static AUTH: OnceLock<Auth> = OnceLock::new();
    AUTH.get_or_init(|| Auth::new(&jwt_config()).expect("the fuzzing auth config is valid"))
}

/// The JWT check ([`Auth::buyer`], [`Auth::verify`], [`Auth::operator`]). The first byte
/// picks the mode: the rest is an `Authorization` header value (`% 3 == 0`), a bare token
/// (`1`), or `header JSON \0 claims JSON` that the target encodes and signs itself (`2`),
/// with the verifier's secret when bit 2 of the first byte is clear and another secret
/// when it is set; so the claim checks are fuzzed behind a valid signature, which mutation
/// alone never produces. Properties: an accepted token was signed with the secret by an
/// allowlisted algorithm and has the required claims (`sub` equal to the user returned,
/// `iss`, `aud`, an `exp` not past); refusals are `missing_token`, `invalid_token` or
/// `token_expired`; the operator check accepts exactly the operator token.
pub fn jwt(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = jsonwebtoken::get_current_timestamp();
    match mode % 3 {
        0 => {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(rest) {
                headers.insert(header::AUTHORIZATION, value);
            }
            let token = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim);
            match auth().buyer(&headers) {
                Ok(user) => {
                    let token = token.expect("accepted without a bearer token");
                    check_accepted(token, user.as_str(), now);
                }
                Err(e) => check_refused(&e),
            }
            let operator = auth().operator(&headers);
            assert_eq!(
                operator.is_ok(),
                token == Some(OPERATOR_TOKEN),
                "operator check on {token:?}"
            );
        }
        1 => {
            let token = String::from_utf8_lossy(rest);
            match auth().verify(&token) {
                Ok(user) => check_accepted(&token, user.as_str(), now),
                Err(e) => check_refused(&e),
            }
        }
        _ => {
            let (header_json, claims_json) = match rest.iter().position(|&b| b == 0) {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], rest),
            };
            let foreign = mode & 4 != 0;
            let secret: &[u8] = if foreign {
                b"another-secret-of-32-bytes-long!"
            } else {
                JWT_SECRET.as_bytes()
            };
            let message = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header_json),
                URL_SAFE_NO_PAD.encode(claims_json)
            );
            let alg = jsonwebtoken::decode_header(format!("{message}.x"))
                .map(|h| h.alg)
                .unwrap_or(Algorithm::HS256);
            let signature = jsonwebtoken::crypto::sign(
                message.as_bytes(),
                &EncodingKey::from_secret(secret),
                alg,
            )
            .unwrap_or_default();
            let token = format!("{message}.{signature}");
            match auth().verify(&token) {
                Ok(user) => {
                    assert!(!foreign, "a token signed with another secret was accepted");
                    check_accepted(&token, user.as_str(), now);
                }
                Err(e) => check_refused(&e),
            }
        }
    }
}

fn check_refused(e: &crate::problem::ApiError) {
    assert!(
        matches!(e.code, "missing_token" | "invalid_token" | "token_expired"),
        "unexpected code {}",
        e.code
    );
}

/// The claims an accepted token must hold, read back here without `jsonwebtoken`.
#[derive(serde::Deserialize)]
struct Required {
    sub: String,
    iss: String,
    aud: String,
    exp: u64,
}

/// What an accepted token must hold, read back without verification. The claims are read
/// as serde reads them (other claims skipped), not as a `serde_json::Value`: a skipped
/// string is not checked for UTF-8, so a signed token may carry invalid UTF-8 in a claim
/// nobody reads (`fuzz/regressions/jwt/non_utf8_in_an_unknown_claim`), which is harmless.
fn check_accepted(token: &str, user: &str, now: u64) {
    let header = jsonwebtoken::decode_header(token).expect("an accepted token has a header");
    assert!(
        ALGORITHMS.contains(&header.alg),
        "algorithm {:?} accepted",
        header.alg
    );
    let payload = token.split('.').nth(1).expect("a payload");
    let (message, signature) = token.rsplit_once('.').expect("three parts");
    let expected = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        header.alg,
    )
    .expect("sign");
    assert_eq!(signature, expected, "accepted a signature that is not ours");
    let claims = URL_SAFE_NO_PAD
        .decode(payload)
        .expect("an accepted payload is base64url");
    let claims: Required =
        serde_json::from_slice(&claims).expect("an accepted token has the required claims");
    assert_eq!(claims.sub, user);
    assert_eq!(claims.iss, JWT_ISSUER);
    assert_eq!(claims.aud, JWT_AUDIENCE);
    assert!(
        claims.exp.saturating_add(LEEWAY) >= now,
        "expired token accepted: exp {}, now {now}",
        claims.exp
    );
}
