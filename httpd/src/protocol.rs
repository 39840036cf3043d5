//! hyper's own answers as problem+json: the connection wrapper of [`crate::server`].
//!
//! hyper answers a request head it cannot parse before any service sees it, with a bare
//! head and no body: 400 for bad syntax (a bad method, URI, header or version, `HTTP/2.0`
//! included), 431 for a head longer than `max_header_size` or with more fields than
//! `max_headers`, 414 for a request target over 64 KiB; then it closes the connection. It
//! has no hook to change that answer, so [`ProblemIo`] wraps the connection's socket,
//! follows the responses written on it, and replaces such an answer with the problem+json
//! of its status (`malformed_request`, `headers_too_large`, `uri_too_long`) before it
//! reaches the client.
//!
//! It tells hyper's answers from the service's by counting: the service announces every
//! response it returns ([`Announced::push`]) before hyper can write it, and HTTP/1.1
//! answers in request order, so a final response head written when no announcement is
//! waiting is hyper's own. Framing follows `Content-Length` (every response of the service
//! has one: its body is a `Full`), no body for an answer to `HEAD` (the announcement says
//! so) and for `1xx` heads (`100 Continue`). Anything it cannot follow (a head it cannot
//! parse, a body without a length) switches the connection to plain pass-through, so the
//! wrapper can never corrupt an answer, only fail to rewrite one.
//!
//! After such an answer hyper closes the connection, often with the rest of an over-long
//! head still arriving; closing a socket with unread data makes the kernel send a reset,
//! which can destroy the answer before the client reads it. So the shutdown after a
//! rewritten answer lingers: it sends FIN, then reads and discards what still arrives until
//! the client closes, for at most [`LINGER`] and [`LINGER_BYTES`].

use crate::problem::{Problem, HEADERS_TOO_LARGE, MALFORMED_REQUEST, URI_TOO_LONG};
use http::StatusCode;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest response head followed; a longer one switches to pass-through.
const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in a response head followed.
const MAX_FIELDS: usize = 64;

/// Longest a connection lingers after hyper's own answer (see the module).
pub const LINGER: Duration = Duration::from_secs(1);
/// Most bytes read and discarded while lingering.
pub const LINGER_BYTES: usize = 1024 * 1024;

/// The request head limits, for the detail of a 431.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Most bytes in a request head (request line and header fields).
    pub max_bytes: usize,
    /// Most header fields.
    pub max_fields: usize,
}

/// The responses the service returned on one connection and hyper has not written yet,
/// oldest first: `true` for an answer to `HEAD` (written without its body).
#[derive(Debug, Default)]
pub struct Announced(Mutex<VecDeque<bool>>);

impl Announced {
    /// Announces a response of the service; call it before handing the response to hyper.
    pub fn push(&self, head_request: bool) {
        self.0.lock().push_back(head_request);
    }

    fn pop(&self) -> Option<bool> {
        self.0.lock().pop_front()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// At the start of, or inside, a response head (bytes gathered in `head`).
    Head,
    /// Inside a body: this many bytes left.
    Body(u64),
    /// Not followed any more: bytes go through unchanged.
    Pass,
}

/// A connection's socket whose writes are followed response by response; see the module.
#[derive(Debug)]
pub struct ProblemIo<T> {
    inner: T,
    announced: Arc<Announced>,
    limits: HeadLimits,
    writing: Writing,
    /// The response head being gathered.
    head: Vec<u8>,
    /// Bytes taken from hyper and not yet written to `inner`.
    out: Vec<u8>,
    out_pos: usize,
    /// Whether one of hyper's answers was rewritten: the connection is closing after it.
    rewrote: bool,
    /// The lingering close, once the write side is shut.
    linger: Option<Linger>,
}

#[derive(Debug)]
struct Linger {
    until: Pin<Box<tokio::time::Sleep>>,
    left: usize,
}

impl<T> ProblemIo<T> {
    /// Wraps `inner`; `announced` is shared with the connection's service.
    pub fn new(inner: T, announced: Arc<Announced>, limits: HeadLimits) -> Self {
        ProblemIo {
            inner,
            announced,
            limits,
            writing: Writing::Head,
            head: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            rewrote: false,
            linger: None,
        }
    }
}

/// What a complete response head says.
enum Head {
    /// An interim `1xx` head: no body, the final head follows.
    Interim,
    /// A final head and its `Content-Length`, if it has one (and no `Transfer-Encoding`).
    Final { status: u16, length: Option<u64> },
}

fn parse_head(head: &[u8]) -> Option<Head> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let status = resp.code?;
    if (100..200).contains(&status) {
        return Some(Head::Interim);
    }
    let mut length = None;
    for f in resp.headers.iter() {
        if f.name.eq_ignore_ascii_case("content-length") {
            length = Some(std::str::from_utf8(f.value).ok()?.trim().parse().ok()?);
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
    }
    Some(Head::Final { status, length })
}

/// The problem that replaces hyper's own answer with `status`, if it is one hyper gives.
fn problem_for(status: u16, limits: HeadLimits) -> Option<Problem> {
    match StatusCode::from_u16(status).ok()? {
        StatusCode::BAD_REQUEST => {
            Some(MALFORMED_REQUEST.problem(
                "the request is not valid HTTP/1.1 (request line, header fields or version)",
            ))
        }
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Some(HEADERS_TOO_LARGE.problem(format!(
            "the request head must be at most {} bytes with at most {} header fields",
            limits.max_bytes, limits.max_fields
        ))),
        StatusCode::URI_TOO_LONG => {
            Some(URI_TOO_LONG.problem("the request target must be shorter than 64 KiB"))
        }
        _ => None,
    }
}

/// hyper's head `head` (status line, its fields, blank line) rewritten to carry `problem`:
/// its fields but `Content-Length`, then the problem's type, length and body.
fn rewrite(head: &[u8], problem: &Problem) -> Vec<u8> {
    let body = problem.body();
    let mut out = Vec::with_capacity(head.len() + body.len() + 64);
    let mut lines = head.split(|b| *b == b'\n');
    if let Some(status_line) = lines.next() {
        out.extend_from_slice(status_line);
        out.push(b'\n');
    }
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"content-type")
        {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-type: application/problem+json\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    out
}

impl<T: AsyncWrite + Unpin> ProblemIo<T> {
    /// Writes what is held in `out`; ready once it is all written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes bytes of a response head from `buf`; returns how many it took.
    fn take_head(&mut self, buf: &[u8]) -> usize {
        let searched_from = self.head.len().saturating_sub(3);
        let room = MAX_HEAD.saturating_sub(self.head.len());
        let chunk = &buf[..buf.len().min(room)];
        self.head.extend_from_slice(chunk);
        let Some(end) = self.head[searched_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| searched_from + i + 4)
        else {
            if self.head.len() >= MAX_HEAD {
                self.give_up();
            }
            return chunk.len();
        };
        // Bytes past the head's end go back to hyper's next write.
        let taken = chunk.len() - (self.head.len() - end);
        self.head.truncate(end);
        let head = std::mem::take(&mut self.head);
        match parse_head(&head) {
            Some(Head::Interim) => self.out.extend_from_slice(&head),
            Some(Head::Final { status, length }) => match self.announced.pop() {
                // The service's answer: its body follows unless it answers HEAD.
                Some(head_request) => {
                    self.out.extend_from_slice(&head);
                    match (head_request, length) {
                        (true, _) | (false, Some(0)) => {}
                        (false, Some(n)) => self.writing = Writing::Body(n),
                        (false, None) => self.writing = Writing::Pass,
                    }
                }
                // hyper's own, bodiless answer.
                None => match problem_for(status, self.limits).filter(|_| length.unwrap_or(0) == 0)
                {
                    Some(problem) => {
                        tracing::debug!(
                            status,
                            code = problem.code,
                            "hyper's own answer sent as problem+json"
                        );
                        self.out.extend_from_slice(&rewrite(&head, &problem));
                        self.rewrote = true;
                    }
                    None => {
                        self.out.extend_from_slice(&head);
                        self.writing = Writing::Pass;
                    }
                },
            },
            None => {
                self.out.extend_from_slice(&head);
                self.writing = Writing::Pass;
            }
        }
        taken
    }

    fn give_up(&mut self) {
        self.out.append(&mut self.head);
        self.writing = Writing::Pass;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ProblemIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ProblemIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let taken = match this.writing {
            Writing::Pass => return Pin::new(&mut this.inner).poll_write(cx, buf),
            Writing::Body(left) => {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                this.out.extend_from_slice(&buf[..n]);
                this.writing = match left - n as u64 {
                    0 => Writing::Head,
                    more => Writing::Body(more),
                };
                n
            }
            Writing::Head => {
                let mut taken = this.take_head(buf);
                // The body usually comes in the same write: send head and body together.
                if let Writing::Body(left) = this.writing {
                    let rest = &buf[taken..];
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    this.out.extend_from_slice(&rest[..n]);
                    this.writing = match left - n as u64 {
                        0 => Writing::Head,
                        more => Writing::Body(more),
                    };
                    taken += n;
                }
                taken
            }
        };
        // Start sending now; what the socket does not take yet is sent by the next write or
        // flush, which wait for it.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A head still gathered (never completed) goes out as it is.
        if !this.head.is_empty() {
            this.give_up();
        }
        ready!(this.poll_drain(cx))?;
        if !this.rewrote {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some(Linger {
                until: Box::pin(tokio::time::sleep(LINGER)),
                left: LINGER_BYTES,
            });
        }
        let Some(linger) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 8192];
        while linger.left > 0 && linger.until.as_mut().poll(cx).is_pending() {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
                Poll::Ready(Ok(())) => linger.left = linger.left.saturating_sub(buf.filled().len()),
                Poll::Ready(Err(_)) => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 16384,
        max_fields: 100,
    };

    async fn written(announced: &[bool], writes: &[&[u8]]) -> String {
        let queue = Arc::new(Announced::default());
        for a in announced {
            queue.push(*a);
        }
        let socket = tokio::io::join(tokio::io::empty(), Vec::new());
        let mut io = ProblemIo::new(socket, queue, LIMITS);
        for w in writes {
            io.write_all(w).await.expect("write");
        }
        io.shutdown().await.expect("shutdown");
        String::from_utf8(io.inner.into_inner().1).expect("utf8")
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ndate: x\r\n\r\nok";
    const BARE_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";

    #[tokio::test]
    async fn hyper_answers_become_problems_and_service_answers_pass_unchanged() {
        // The service's answer goes through byte for byte, also split anywhere.
        let ok = String::from_utf8_lossy(OK).into_owned();
        assert_eq!(written(&[false], &[OK]).await, ok);
        for cut in 1..OK.len() {
            assert_eq!(written(&[false], &[&OK[..cut], &OK[cut..]]).await, ok);
        }
        // A 431 of the service (announced) is left alone; hyper's (not announced) is rewritten.
        let out = written(&[false], &[OK, BARE_431]).await;
        let (first, second) = out.split_at(ok.len());
        assert_eq!(first, ok);
        assert!(second.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(second.contains("connection: close\r\n"));
        assert!(second.contains("content-type: application/problem+json\r\n"));
        let body: serde_json::Value =
            serde_json::from_str(second.split("\r\n\r\n").nth(1).expect("body")).expect("json");
        assert_eq!(body["code"], "headers_too_large");
        assert_eq!(body["status"], 431);
        // Both in one write, and hyper's 400.
        let bare_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        let both = [OK, &bare_400[..]].concat();
        let out = written(&[false], &[&both]).await;
        assert!(out.starts_with(&ok));
        assert!(out.contains("\"code\":\"malformed_request\""), "{out}");
    }

    #[tokio::test]
    async fn interim_heads_and_answers_to_head_requests_are_framed() {
        // 100 Continue before the service's answer; an answer to HEAD has no body, so the
        // next head is found right after it.
        let head_answer = b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 120\r\n\r\n";
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        let out = written(&[true, false], &[cont, head_answer, cont, OK, BARE_431]).await;
        assert!(out.ends_with("\"}"), "{out}");
        assert!(out.contains("headers_too_large"));
        assert_eq!(out.matches("HTTP/1.1 ").count(), 5);
    }

    #[tokio::test]
    async fn what_cannot_be_followed_passes_through() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let out = written(&[false], &[chunked, BARE_431]).await;
        assert_eq!(out.as_bytes(), [&chunked[..], BARE_431].concat());
    }
}
