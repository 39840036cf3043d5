//! What requests carry, read and checked: the bodies (read within a size limit and a
//! deadline, JSON objects only), the `Idempotency-Key` and `Content-Type` headers, and the
//! fingerprint of an order body. Every refusal is a problem with its stable code.

use crate::problem::ApiError;
use bytes::Bytes;
use http::{header, HeaderMap, Request};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::time::Duration;
use storage::{Currency, Money, Sale, SaleId, Timestamp, UserRate};

/// Body of `POST /v1/sales/{id}/orders`, as [`parse_order_body`] accepts it.
#[derive(Debug)]
pub struct OrderBody {
    /// Units ordered: at least 1 (the sale's maximum is checked by
    /// [`OrderBody::quantity_within`]).
    pub quantity: i64,
    /// Opaque token for the payment provider: 1 to 256 visible ASCII characters.
    pub payment_token: String,
}

/// The order body as sent, before its quantity is known to be an `i64`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrderBody {
    quantity: Quantity,
    payment_token: String,
}

impl OrderBody {
    /// The quantity as units, refused with `invalid_quantity` above the sale's
    /// `max_quantity_per_order`.
    pub fn quantity_within(&self, max_per_order: u32) -> Result<u32, ApiError> {
        u32::try_from(self.quantity)
            .ok()
            .filter(|q| (1..=max_per_order).contains(q))
            .ok_or_else(|| {
                ApiError::invalid_quantity(format!(
                    "quantity must be between 1 and {max_per_order}"
                ))
            })
    }
}

/// Parses and checks an order body with everything that needs no sale: JSON with exactly
/// `quantity` and `payment_token` (`malformed_json`, `invalid_body`), the payment token
/// (`invalid_payment_token`), a quantity of at least 1 (`invalid_quantity`; so is any
/// integer beyond 64 bits, a fraction is `invalid_body`). The order route and the fuzz
/// target (`crate::fuzzing`) both call it.
pub fn parse_order_body(body: &[u8]) -> Result<OrderBody, ApiError> {
    let body: RawOrderBody = parse_json(body)?;
    if body.payment_token.is_empty()
        || body.payment_token.len() > 256
        || !body.payment_token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::invalid_payment_token(
            "payment_token must be 1 to 256 visible ASCII characters",
        ));
    }
    let quantity = body.quantity.integer()?;
    if quantity < 1 {
        return Err(ApiError::invalid_quantity("quantity must be at least 1"));
    }
    let quantity = i64::try_from(quantity).map_err(|_| {
        ApiError::invalid_quantity("quantity is beyond any sale's max_quantity_per_order")
    })?;
    Ok(OrderBody {
        quantity,
        payment_token: body.payment_token,
    })
}

/// A quantity as sent: any JSON number, so that an integer too large for 64 bits is refused
/// as out of range (`invalid_quantity`) like any other, not as a body that does not parse.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub(super) struct Quantity(serde_json::Number);

impl Quantity {
    /// The integer sent (saturated at the bounds of `i128`: only compared with a range);
    /// `invalid_body` for a number with a fraction or an exponent that is not an integer.
    fn integer(&self) -> Result<i128, ApiError> {
        let n = &self.0;
        if let Some(i) = n.as_i64() {
            return Ok(i128::from(i));
        }
        if let Some(u) = n.as_u64() {
            return Ok(i128::from(u));
        }
        // serde_json reads an integer beyond 64 bits as a float; so is 1.5 or 1e3.
        match n.as_f64() {
            // 2^63: below it, an integer fits an i64 and is read as one.
            Some(f)
                if f.is_finite() && f.fract() == 0.0 && f.abs() >= 9_223_372_036_854_775_808.0 =>
            {
                Ok(f as i128)
            }
            _ => Err(ApiError::invalid_body("quantity must be an integer")),
        }
    }

    /// The quantity if it is an integer in `1..=max`; `invalid_quantity` for any other
    /// integer.
    pub(super) fn within(&self, max: u32) -> Result<u32, ApiError> {
        u32::try_from(self.integer()?)
            .ok()
            .filter(|q| (1..=max).contains(q))
            .ok_or_else(|| {
                ApiError::invalid_quantity(format!("quantity must be between 1 and {max}"))
            })
    }
}

/// Body of `POST /v1/sales`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSale {
    /// Sale id; generated (UUIDv7) when absent.
    pub id: Option<String>,
    /// Item on sale.
    pub sku: String,
    /// Initial stock.
    pub stock: u32,
    /// Unit price in minor units.
    pub price_cents: i64,
    /// ISO 4217 currency.
    pub currency: String,
    /// Opening instant (default: now).
    pub starts_at: Option<Timestamp>,
    /// Closing instant (default: 24 hours after opening).
    pub ends_at: Option<Timestamp>,
    /// Most units per user (default 1).
    pub per_user_limit: Option<u32>,
    /// Most units per order (default: the per-user limit).
    pub max_quantity_per_order: Option<u32>,
    /// Per-user rate (default 5/s, burst 10).
    pub user_rate: Option<UserRate>,
    /// Stock buckets of the distributed admission backend (default 1).
    pub stock_buckets: Option<u32>,
}

impl CreateSale {
    /// The sale this body defines, with defaults applied, validated.
    pub fn into_sale(self, now: Timestamp) -> Result<Sale, ApiError> {
        let invalid = |e: storage::InvalidValue| ApiError::invalid_sale(e.to_string());
        let id = match self.id {
            Some(id) => SaleId::parse(id).map_err(invalid)?,
            None => SaleId::generate(),
        };
        let starts_at = self.starts_at.unwrap_or(now);
        let per_user_limit = self.per_user_limit.unwrap_or(1);
        let sale = Sale {
            stock_buckets: self.stock_buckets.unwrap_or(1),
            id,
            sku: self.sku,
            stock: self.stock,
            price: Money {
                minor: self.price_cents,
                currency: Currency::parse(&self.currency).map_err(invalid)?,
            },
            starts_at,
            ends_at: self
                .ends_at
                .unwrap_or(starts_at.plus_millis(24 * 3600 * 1000)),
            per_user_limit,
            max_quantity_per_order: self.max_quantity_per_order.unwrap_or(per_user_limit),
            user_rate: self.user_rate.unwrap_or_default(),
            created_at: now,
        };
        sale.validate().map_err(invalid)?;
        Ok(sale)
    }
}

/// Body of `POST /v1/sales/{id}/stock`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddStock {
    pub(super) quantity: Quantity,
}

/// `unsupported_media_type` unless the body is declared `application/json`.
pub(super) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(
            "send Content-Type: application/json",
        ))
    }
}

/// Reads at most `limit` bytes of body within `deadline`.
pub(super) async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::body_too_large(format!("the body must be at most {limit} bytes"));
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    match tokio::time::timeout(deadline, Limited::new(req.into_body(), limit).collect()).await {
        Err(_) => Err(ApiError::request_timeout(format!(
            "the body must arrive within {deadline:?}"
        ))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::malformed_json("the body could not be read")),
    }
}

/// Checks the content type, reads at most `limit` bytes within `deadline`, and parses.
pub(super) async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    deadline: Duration,
) -> Result<T, ApiError> {
    require_json(req.headers())?;
    let body = read_body(req, limit, deadline).await?;
    parse_json(&body)
}

/// Parses a JSON object into `T`. serde also fills a struct from a JSON array of its
/// fields in order (`[1, "tok_visa"]`), which the API does not accept: every body is an
/// object, and any other JSON value is `invalid_body` (found by the `order_body` fuzz
/// target, as was `[1,"",""]`, which serde calls a syntax error).
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => ApiError::invalid_body("the body must be a JSON object"),
                Err(e) => e.into(),
            },
        );
    }
    Ok(serde_json::from_slice(body)?)
}

/// The `Idempotency-Key` header: 1 to 128 visible ASCII characters.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let v = headers
        .get("idempotency-key")
        .ok_or_else(|| ApiError::missing_idempotency_key("send an Idempotency-Key header"))?;
    let s = v
        .to_str()
        .map_err(|_| ApiError::invalid_idempotency_key("the key must be visible ASCII"))?;
    if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid_idempotency_key(
            "the key must be 1 to 128 visible ASCII characters",
        ));
    }
    Ok(s.to_owned())
}

/// Digest of an order body's meaningful content: a retry with the same key must carry the
/// same quantity and payment token.
pub fn fingerprint(quantity: u32, payment_token: &str) -> String {
    let mut h = Sha256::new();
    h.update(quantity.to_le_bytes());
    h.update(payment_token.as_bytes());
    let digest = h.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for b in &digest[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_integer_out_of_range_is_an_invalid_quantity() {
        let code = |json: &str| match serde_json::from_str::<Quantity>(json)
            .expect("a number")
            .within(10)
        {
            Ok(q) => format!("ok {q}"),
            Err(e) => e.code.to_owned(),
        };
        assert_eq!(code("1"), "ok 1");
        assert_eq!(code("10"), "ok 10");
        for out in [
            "0",
            "-1",
            "11",
            "4294967297",
            "9223372036854775807",
            "9223372036854775808",
            "18446744073709551616",
            "-9223372036854775809",
            "100000000000000000000000000000000000000000000",
            "1e30",
        ] {
            assert_eq!(code(out), "invalid_quantity", "{out}");
        }
        for not_integer in ["1.5", "2.0", "1e2"] {
            assert_eq!(code(not_integer), "invalid_body", "{not_integer}");
        }
    }

    #[test]
    fn fingerprint_is_the_hex_of_the_first_half_of_sha256() {
        let mut h = Sha256::new();
        h.update(2u32.to_le_bytes());
        h.update(b"tok_visa");
        let want: String = h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(fingerprint(2, "tok_visa"), want);
        assert_eq!(fingerprint(2, "tok_visa").len(), 32);
        assert_ne!(fingerprint(1, "tok_visa"), fingerprint(2, "tok_visa"));
    }

    #[test]
    fn bodies_must_be_objects_not_arrays_of_the_fields() {
        let code = |r: Result<OrderBody, ApiError>| r.map(|_| ()).map_err(|e| e.code);
        assert_eq!(
            code(parse_order_body(br#"[1,"tok_visa"]"#)),
            Err("invalid_body")
        );
        assert_eq!(code(parse_order_body(br#"[1,"",""]"#)), Err("invalid_body"));
        assert_eq!(code(parse_order_body(b"42")), Err("invalid_body"));
        assert_eq!(code(parse_order_body(b" [1,")), Err("malformed_json"));
        assert_eq!(
            code(parse_order_body(
                br#" {"quantity":1,"payment_token":"tok_visa"}"#
            )),
            Ok(())
        );
        let sale = br#"[null,"sku",10,100,"EUR",null,null,null,null,null]"#;
        assert_eq!(
            parse_json::<CreateSale>(sale)
                .map(|_| ())
                .map_err(|e| e.code),
            Err("invalid_body")
        );
    }
}
