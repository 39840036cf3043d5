//! RFC 9457 problem details: the one error answer of every flashsale HTTP server.
//!
//! A [`Problem`] is an HTTP status, a stable machine-readable `code`, a title and the
//! detail of this occurrence; [`Problem::body`] and [`Problem::into_response`] are the one
//! place it becomes `application/problem+json`. Which codes exist is up to each server
//! (`ingest::problem` lists the API's); the codes of the answers the HTTP layer gives itself
//! (hyper's refusals of a request head, see [`crate::protocol`]) are defined here.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use std::borrow::Cow;

/// A stable error code with its status and title.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// HTTP status of every problem with this code.
    pub status: StatusCode,
    /// The machine-readable code: part of a server's contract, never renamed.
    pub code: &'static str,
    /// Short human-readable summary, the same for every occurrence.
    pub title: &'static str,
}

impl Code {
    /// A problem with this code and `detail`.
    pub fn problem(self, detail: impl Into<Cow<'static, str>>) -> Problem {
        Problem {
            status: self.status,
            code: self.code,
            title: self.title,
            detail: detail.into(),
            retry_after: None,
            allow: None,
            member: None,
        }
    }
}

/// `malformed_request` (400): hyper refused the request line, a header field or the version.
pub const MALFORMED_REQUEST: Code = Code {
    status: StatusCode::BAD_REQUEST,
    code: "malformed_request",
    title: "The request is not valid HTTP/1.1",
};

/// `headers_too_large` (431): the request head is over the server's limits.
pub const HEADERS_TOO_LARGE: Code = Code {
    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    code: "headers_too_large",
    title: "The request head is too large or has too many header fields",
};

/// `uri_too_long` (414): the request target is over hyper's 64 KiB.
pub const URI_TOO_LONG: Code = Code {
    status: StatusCode::URI_TOO_LONG,
    code: "uri_too_long",
    title: "The request target is too long",
};

/// An error answer: `application/problem+json` with a stable `code`.
#[derive(Debug, Clone)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable summary of the code.
    pub title: &'static str,
    /// Human-readable explanation of this occurrence.
    pub detail: Cow<'static, str>,
    /// Seconds to wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u32>,
    /// Methods the resource allows (sent as `Allow` with 405).
    pub allow: Option<&'static str>,
    /// One extension member of the problem body (name, value), such as the `stage` of
    /// `settler_stage_down`.
    pub member: Option<(&'static str, &'static str)>,
}

impl Problem {
    /// A problem whose title is the reason phrase of `status`, for a code with no title of
    /// its own.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        detail: impl Into<Cow<'static, str>>,
    ) -> Problem {
        let title = status.canonical_reason().unwrap_or("Error");
        Code {
            status,
            code,
            title,
        }
        .problem(detail)
    }

    /// Adds a `Retry-After` in seconds.
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Adds the extension member `name` to the problem body.
    pub fn member(mut self, name: &'static str, value: &'static str) -> Self {
        self.member = Some((name, value));
        self
    }

    /// Adds the `Allow` header of a 405.
    pub fn allow(mut self, methods: &'static str) -> Self {
        self.allow = Some(methods);
        self
    }

    /// The problem+json body.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(rename = "type")]
            kind: String,
            title: &'a str,
            status: u16,
            code: &'a str,
            detail: &'a str,
            #[serde(flatten)]
            member: Option<std::collections::BTreeMap<&'a str, &'a str>>,
        }
        serde_json::to_vec(&Body {
            kind: format!("urn:flashsale:problem:{}", self.code),
            title: self.title,
            status: self.status.as_u16(),
            code: self.code,
            detail: &self.detail,
            member: self.member.map(|(k, v)| std::iter::once((k, v)).collect()),
        })
        .unwrap_or_default()
    }

    /// The problem+json response (with `Retry-After`, `Allow`, and for a 401 the
    /// `WWW-Authenticate: Bearer` challenge).
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(self.body())));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(methods) = self.allow {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(methods));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_problem_json_with_headers() {
        let p = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "provider_down", "down")
            .retry_after(2)
            .member("stage", "charge");
        let body: serde_json::Value = serde_json::from_slice(&p.body()).expect("json");
        assert_eq!(body["type"], "urn:flashsale:problem:provider_down");
        assert_eq!(body["title"], "Service Unavailable");
        assert_eq!(body["status"], 503);
        assert_eq!(body["code"], "provider_down");
        assert_eq!(body["detail"], "down");
        assert_eq!(body["stage"], "charge");
        let resp = p.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let unauthorized = MALFORMED_REQUEST.problem("x");
        assert_eq!(unauthorized.title, "The request is not valid HTTP/1.1");
        let resp = Code {
            status: StatusCode::UNAUTHORIZED,
            code: "missing_token",
            title: "A bearer token is required",
        }
        .problem("no token")
        .into_response();
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
