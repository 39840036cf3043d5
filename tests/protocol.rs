//! The HTTP/1.1 protocol edge over raw sockets: request heads over the size and field-count
//! limits, heads hyper cannot parse, an over-long request target, a body too large or too
//! slow. Every such answer is problem+json with a stable code (also those hyper writes on
//! its own), and none places an order.

mod common;

use common::TestApp;
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response as read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a problem+json answer with `status` and `code`.
    fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let body: Value = serde_json::from_slice(&self.body).expect("a JSON body");
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(body["status"], status, "{body}");
        assert_eq!(body["type"], format!("urn:flashsale:problem:{code}"));
        assert!(body["title"].is_string() && body["detail"].is_string());
    }
}

/// Splits what the server sent into responses (each framed by its Content-Length; none for
/// an interim `1xx` head or an answer to `HEAD`, as `heads` says in request order).
fn parse_responses(mut bytes: &[u8], heads: &[bool]) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut finals = 0;
    while !bytes.is_empty() {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("an incomplete head: {:?}", String::from_utf8_lossy(bytes)))
            + 4;
        let head = std::str::from_utf8(&bytes[..end]).expect("an ASCII head");
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a status line: {head}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').expect("a header field");
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        bytes = &bytes[end..];
        let mut raw = Raw {
            status,
            headers,
            body: Vec::new(),
        };
        if status >= 200 {
            let head_request = heads.get(finals).copied().unwrap_or(false);
            finals += 1;
            let len: usize = raw
                .header("content-length")
                .map(|v| v.parse().expect("a length"))
                .unwrap_or(0);
            if !head_request {
                assert!(bytes.len() >= len, "a short body: {raw:?}");
                raw.body = bytes[..len].to_vec();
                bytes = &bytes[len..];
            }
        }
        out.push(raw);
    }
    out
}

/// Sends `request` on a new connection and reads every response until the server closes.
async fn exchange(app: &TestApp, request: &[u8], heads: &[bool]) -> Vec<Raw> {
    let mut s = TcpStream::connect(app.running().addr)
        .await
        .expect("connect");
    // The server may answer (and close) before it read all of an over-long head: a reset
    // on our write is then expected, and the answer is still there to read.
    let _ = s.write_all(request).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server did not close within 10 s; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    parse_responses(&got, heads)
}

fn order_request(app: &TestApp, sale: &str, key: &str, extra_headers: &str) -> Vec<u8> {
    let key = key.replace(' ', "-");
    let body = r#"{"quantity":1,"payment_token":"tok_visa"}"#;
    format!(
        "POST /v1/sales/{sale}/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Idempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         {extra_headers}Connection: close\r\n\r\n{body}",
        app.token("buyer"),
        body.len()
    )
    .into_bytes()
}

/// `n` header fields of `size` bytes each.
fn filler(n: usize, size: usize) -> String {
    (0..n)
        .map(|i| format!("X-Filler-{i}: {}\r\n", "a".repeat(size)))
        .collect()
}

async fn accepted(app: &TestApp, sale: &str) -> u64 {
    app.stats(sale).await["accepted"]
        .as_u64()
        .expect("accepted")
}

#[tokio::test]
async fn heads_over_the_default_limits_get_431_problems_and_place_no_order() {
    let app = TestApp::start().await;
    let sale = app.sale("heads", 10, 5).await;
    // One 64 KiB header field, one of 400 KiB (hyper's own buffer limit), and 200 fields:
    // each refused before any order is placed.
    for (what, extra) in [
        ("a 64 KiB field", filler(1, 64 * 1024)),
        ("a 400 KiB field", filler(1, 400 * 1024)),
        ("200 fields", filler(200, 4)),
        ("101 fields", filler(101 - 6, 4)),
    ] {
        let answers = exchange(&app, &order_request(&app, &sale, what, &extra), &[]).await;
        assert_eq!(answers.len(), 1, "{what}: {answers:?}");
        answers[0].assert_problem(431, "headers_too_large");
        assert_eq!(answers[0].header("connection"), Some("close"), "{what}");
    }
    assert_eq!(accepted(&app, &sale).await, 0, "no order was placed");
    assert_eq!(app.stock_left(&sale).await, 10);
    // Just under both limits (100 fields with the 6 of the order; under 16 KiB): placed.
    let answers = exchange(
        &app,
        &order_request(&app, &sale, "fits", &filler(100 - 6, 100)),
        &[],
    )
    .await;
    assert_eq!(answers[0].status, 202, "{answers:?}");
    assert_eq!(accepted(&app, &sale).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn the_head_limits_are_configurable() {
    let app = TestApp::start_with(|c| {
        c.server.max_header_bytes = 2048;
        c.server.max_headers = 12;
    })
    .await;
    let sale = app.sale("small-heads", 10, 5).await;
    for (what, extra, status) in [
        ("13 fields", filler(13 - 6, 4), 431),
        ("a 3 KiB head", filler(1, 3 * 1024), 431),
        ("12 fields, under 2 KiB", filler(12 - 6, 100), 202),
    ] {
        let answers = exchange(&app, &order_request(&app, &sale, what, &extra), &[]).await;
        assert_eq!(answers[0].status, status, "{what}: {answers:?}");
        if status == 431 {
            answers[0].assert_problem(431, "headers_too_large");
            let detail = serde_json::from_slice::<Value>(&answers[0].body).expect("json")["detail"]
                .to_string();
            assert!(detail.contains("2048") && detail.contains("12"), "{detail}");
        }
    }
    assert_eq!(accepted(&app, &sale).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn heads_hyper_cannot_parse_get_400_problems() {
    let app = TestApp::start().await;
    let sale = app.sale("garbled", 10, 5).await;
    let token = app.token("buyer");
    let order_head = |line: &str, field: &str| {
        format!(
            "{line}\r\nHost: x\r\nAuthorization: Bearer {token}\r\nIdempotency-Key: g\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\n{field}\r\n{{}}"
        )
    };
    let orders = format!("/v1/sales/{sale}/orders");
    for (what, request) in [
        (
            "HTTP/2.0 in the request line",
            order_head(&format!("POST {orders} HTTP/2.0"), ""),
        ),
        (
            "HTTP/1.2",
            order_head(&format!("POST {orders} HTTP/1.2"), ""),
        ),
        (
            "a bad method",
            order_head(&format!("P(ST {orders} HTTP/1.1"), ""),
        ),
        (
            "a space in the target",
            order_head(&format!("POST {orders} x HTTP/1.1"), ""),
        ),
        (
            "a field without a colon",
            order_head(&format!("POST {orders} HTTP/1.1"), "Broken\r\n"),
        ),
        (
            "a space before the colon",
            order_head(&format!("POST {orders} HTTP/1.1"), "X-Bad : 1\r\n"),
        ),
        (
            "a control character in a value",
            order_head(&format!("POST {orders} HTTP/1.1"), "X-Bad: a\u{1}b\r\n"),
        ),
        ("not HTTP at all", "hello\r\n\r\n".to_owned()),
    ] {
        let answers = exchange(&app, request.as_bytes(), &[]).await;
        assert_eq!(answers.len(), 1, "{what}: {answers:?}");
        answers[0].assert_problem(400, "malformed_request");
    }
    assert_eq!(accepted(&app, &sale).await, 0, "no order was placed");
    app.stop().await;
}

#[tokio::test]
async fn hyper_answers_after_service_answers_on_one_connection_are_framed_right() {
    let app = TestApp::start().await;
    let sale = app.sale("pipelined", 10, 5).await;
    let token = app.token("buyer");
    let body = r#"{"quantity":1,"payment_token":"tok_visa"}"#;
    // Keep-alive: a HEAD (answered without a body), an order sent with Expect:
    // 100-continue (an interim head first), a GET, then a head over the limit.
    let request = format!(
        "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
         POST /v1/sales/{sale}/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: p1\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n\
         Content-Length: {}\r\n\r\n{body}\
         GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
        body.len(),
        filler(1, 20 * 1024),
    );
    let answers = exchange(&app, request.as_bytes(), &[true, false, false, false]).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    // The interim 100 is sent only if the server reads the body before it is all there;
    // here it arrived with the head, so either is right.
    let finals: Vec<&Raw> = answers.iter().filter(|a| a.status >= 200).collect();
    assert_eq!(
        finals.iter().map(|a| a.status).collect::<Vec<_>>(),
        [405, 202, 200, 431],
        "{statuses:?}"
    );
    assert!(finals[0].body.is_empty(), "HEAD gets no body");
    assert_eq!(
        serde_json::from_slice::<Value>(&finals[2].body).expect("json")["status"],
        "ok"
    );
    finals[3].assert_problem(431, "headers_too_large");
    assert_eq!(accepted(&app, &sale).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_request_target_over_64_kib_gets_a_414_problem() {
    // hyper refuses a target over 64 KiB with 414 when the head limit lets it through.
    let app = TestApp::start_with(|c| c.server.max_header_bytes = 128 * 1024).await;
    let request = format!(
        "GET /v1/sales/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "s".repeat(70 * 1024)
    );
    let answers = exchange(&app, request.as_bytes(), &[]).await;
    answers[0].assert_problem(414, "uri_too_long");
    app.stop().await;
}

#[tokio::test]
async fn bodies_too_large_or_too_slow_get_problems() {
    let app =
        TestApp::start_with(|c| c.server.body_read_timeout = Duration::from_millis(300)).await;
    let sale = app.sale("bodies", 10, 5).await;
    let token = app.token("buyer");
    // Announced larger than the order limit: 413 before the body is read.
    let big = format!(
        "POST /v1/sales/{sale}/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: b1\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\
         Connection: close\r\n\r\n{{"
    );
    exchange(&app, big.as_bytes(), &[]).await[0].assert_problem(413, "body_too_large");
    // Chunked, past the limit as it arrives: 413 too.
    let chunk = "a".repeat(5000);
    let chunked = format!(
        "POST /v1/sales/{sale}/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: b2\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    exchange(&app, chunked.as_bytes(), &[]).await[0].assert_problem(413, "body_too_large");
    // Announced and never sent: 408 once the body deadline passes.
    let slow = format!(
        "POST /v1/sales/{sale}/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: b3\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\
         Connection: close\r\n\r\n{{"
    );
    exchange(&app, slow.as_bytes(), &[]).await[0].assert_problem(408, "request_timeout");
    assert_eq!(accepted(&app, &sale).await, 0, "no order was placed");
    app.stop().await;
}
