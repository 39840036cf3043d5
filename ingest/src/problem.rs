//! RFC 9457 problem details: every error the API returns, with its stable `code`.
//!
//! Handlers return [`ApiError`], the API's [`httpd::Problem`] (the one problem+json type and
//! its rendering); this module is the one list of the API's codes, each with its
//! constructor. Codes are part of the API contract: never rename.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use httpd::problem::{Code, Problem};
use std::borrow::Cow;

/// An error answer of the API: a [`Problem`] whose code is one of [`ALL_CODES`] (the
/// constructors below are the only way to make one). Reads of its fields go to the
/// problem.
#[derive(Debug, Clone)]
pub struct ApiError(pub Problem);

impl std::ops::Deref for ApiError {
    type Target = Problem;

    fn deref(&self) -> &Problem {
        &self.0
    }
}

impl From<ApiError> for Problem {
    fn from(e: ApiError) -> Problem {
        e.0
    }
}

macro_rules! codes {
    (
        $($fn:ident => $status:ident, $code:literal, $title:literal;)*
        @httpd: $($hfn:ident => $hcode:ident;)*
    ) => {
        impl ApiError {
            $(
                #[doc = concat!("`", $code, "`: ", $title)]
                pub fn $fn(detail: impl Into<Cow<'static, str>>) -> Self {
                    ApiError(Code { status: StatusCode::$status, code: $code, title: $title }.problem(detail))
                }
            )*
            $(
                #[doc = concat!("[`httpd::problem::", stringify!($hcode), "`], a code the HTTP layer also answers by itself")]
                pub fn $hfn(detail: impl Into<Cow<'static, str>>) -> Self {
                    ApiError(httpd::problem::$hcode.problem(detail))
                }
            )*
        }

        /// Every code the API can return, with its status and title (for the docs test).
        pub const ALL_CODES: &[(&str, u16, &str)] = &[
            $(($code, StatusCode::$status.as_u16(), $title),)*
            $((httpd::problem::$hcode.code, httpd::problem::$hcode.status.as_u16(), httpd::problem::$hcode.title),)*
        ];
    };
}

codes! {
    malformed_json => BAD_REQUEST, "malformed_json", "The body is not valid JSON";
    missing_idempotency_key => BAD_REQUEST, "missing_idempotency_key", "The Idempotency-Key header is required";
    invalid_idempotency_key => BAD_REQUEST, "invalid_idempotency_key", "The Idempotency-Key header is invalid";
    missing_token => UNAUTHORIZED, "missing_token", "A bearer token is required";
    invalid_token => UNAUTHORIZED, "invalid_token", "The bearer token is invalid";
    token_expired => UNAUTHORIZED, "token_expired", "The bearer token has expired";
    limit_exceeded => FORBIDDEN, "limit_exceeded", "The order would exceed the per-user limit";
    sale_not_active => FORBIDDEN, "sale_not_active", "The sale is not open";
    unknown_sale => NOT_FOUND, "unknown_sale", "No such sale";
    unknown_order => NOT_FOUND, "unknown_order", "No such order";
    receipt_not_ready => NOT_FOUND, "receipt_not_ready", "The order has no receipt yet";
    not_found => NOT_FOUND, "not_found", "No such resource";
    method_not_allowed => METHOD_NOT_ALLOWED, "method_not_allowed", "Method not allowed on this resource";
    sold_out => CONFLICT, "sold_out", "The sale is sold out";
    sale_exists => CONFLICT, "sale_exists", "A sale with this id exists";
    request_in_progress => CONFLICT, "request_in_progress", "A request with this Idempotency-Key is still in progress";
    request_timeout => REQUEST_TIMEOUT, "request_timeout", "The request body did not arrive in time";
    body_too_large => PAYLOAD_TOO_LARGE, "body_too_large", "The request body is too large";
    unsupported_media_type => UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "The body must be application/json";
    invalid_body => UNPROCESSABLE_ENTITY, "invalid_body", "The body does not match the schema";
    invalid_quantity => UNPROCESSABLE_ENTITY, "invalid_quantity", "The quantity is out of range";
    invalid_payment_token => UNPROCESSABLE_ENTITY, "invalid_payment_token", "The payment token is invalid";
    invalid_sale => UNPROCESSABLE_ENTITY, "invalid_sale", "The sale definition is invalid";
    idempotency_conflict => UNPROCESSABLE_ENTITY, "idempotency_conflict", "The Idempotency-Key was used with a different body";
    rate_limited => TOO_MANY_REQUESTS, "rate_limited", "Too many requests";
    unavailable => SERVICE_UNAVAILABLE, "unavailable", "A backend is unavailable; nothing was taken";
    capacity_exceeded => SERVICE_UNAVAILABLE, "capacity_exceeded", "The sale's admission state is at its cap; nothing was taken";
    settler_stage_down => SERVICE_UNAVAILABLE, "settler_stage_down", "A stage of the in-process settler is down";
    internal => INTERNAL_SERVER_ERROR, "internal", "Internal error";
    @httpd:
    malformed_request => MALFORMED_REQUEST;
    headers_too_large => HEADERS_TOO_LARGE;
    uri_too_long => URI_TOO_LONG;
}

impl ApiError {
    /// Adds a `Retry-After` in seconds.
    pub fn retry_after(self, seconds: u32) -> Self {
        ApiError(self.0.retry_after(seconds))
    }

    /// Adds the extension member `name` to the problem body.
    pub fn member(self, name: &'static str, value: &'static str) -> Self {
        ApiError(self.0.member(name, value))
    }

    /// Adds the `Allow` header of a 405.
    pub fn allow(self, methods: &'static str) -> Self {
        ApiError(self.0.allow(methods))
    }

    /// The problem+json response.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        self.0.into_response()
    }
}

// Refusals of the layers below, as problems: each error of admission, the store, the log
// and the body parser, and each admission rejection, has its answer here, so every handler
// answers the same refusal the same way.

impl From<crate::admission::Error> for ApiError {
    fn from(e: crate::admission::Error) -> Self {
        use crate::admission::Error;
        match e {
            Error::Unavailable { .. } => {
                ApiError::unavailable("admission backend unavailable").retry_after(1)
            }
            Error::UnknownSale(_) => ApiError::no_such_sale(),
            Error::SaleExists(_) => ApiError::sale_exists("the sale exists"),
        }
    }
}

impl From<storage::Error> for ApiError {
    fn from(e: storage::Error) -> Self {
        match e {
            storage::Error::SaleExists(_) => ApiError::sale_exists("a sale with this id exists"),
            storage::Error::UnknownSale(_) => ApiError::no_such_sale(),
            storage::Error::Invalid(e) => ApiError::invalid_quantity(e.to_string()),
            other => {
                tracing::warn!(error = %storage::ErrorChain(&other), "store error");
                ApiError::unavailable("order store unavailable").retry_after(1)
            }
        }
    }
}

impl From<std::sync::Arc<storage::Error>> for ApiError {
    /// A store error shared by every request that waited for the same load (the sale
    /// cache's): the error itself when this is its last holder, else as unavailable.
    fn from(e: std::sync::Arc<storage::Error>) -> Self {
        match std::sync::Arc::try_unwrap(e) {
            Ok(e) => e.into(),
            Err(shared) => storage::Error::unavailable("loading the sale", shared).into(),
        }
    }
}

impl From<serde_json::Error> for ApiError {
    /// A body that is not JSON is `malformed_json`; JSON of the wrong shape `invalid_body`.
    fn from(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::malformed_json(format!("malformed JSON: {e}"))
            }
            Category::Data => ApiError::invalid_body(e.to_string()),
        }
    }
}

impl ApiError {
    /// `unknown_sale`: no sale with this id (or an id no sale can have).
    pub fn no_such_sale() -> Self {
        ApiError::unknown_sale("no such sale")
    }

    /// What admission's refusal of an order answers; `per_user_limit` is the sale's.
    pub fn rejected(rejection: crate::model::Rejection, per_user_limit: u32) -> Self {
        use crate::model::Rejection;
        match rejection {
            Rejection::IdempotencyConflict => ApiError::idempotency_conflict(
                "this Idempotency-Key was used with a different body",
            ),
            Rejection::UnknownSale => ApiError::no_such_sale(),
            Rejection::NotActive => ApiError::sale_not_active("the sale is not open"),
            Rejection::RateLimited { retry_after_s } => {
                ApiError::rate_limited("slow down").retry_after(retry_after_s)
            }
            Rejection::LimitExceeded => {
                ApiError::limit_exceeded(format!("at most {per_user_limit} units per user"))
            }
            Rejection::SoldOut => ApiError::sold_out("no stock left"),
            Rejection::Capacity { retry_after_s: 0 } => ApiError::capacity_exceeded(
                "the sale has taken the most orders this server holds for one sale",
            ),
            Rejection::Capacity { retry_after_s } => {
                ApiError::capacity_exceeded("too many buyers at once for this server; retry later")
                    .retry_after(retry_after_s)
            }
        }
    }

    /// An admission decision that passed its deadline (it may still run: it is aborted).
    pub fn decision_timed_out() -> Self {
        ApiError::unavailable("admission decision timed out").retry_after(1)
    }

    /// The order log refused an accepted order's record (its admission was aborted).
    pub fn log_unavailable() -> Self {
        ApiError::unavailable("order log unavailable").retry_after(1)
    }

    /// A retry of an order whose record is not known to be durable yet.
    pub fn in_progress() -> Self {
        ApiError::request_in_progress("the first request with this key is still being processed")
            .retry_after(1)
    }
}
