//! The opening handshake as the client sends it: reading a request head within
//! `max_request_head`, checking an Upgrade request (RFC 6455 section 4.2.1) before any backend
//! is contacted, and every early refusal as a [`Reject`] with its one status mapping. Early
//! answers are written, the write side shut, and what the client still sends read off before
//! closing, so the kernel's reset does not eat the answer (RFC 9112 section 9.6).

use std::io;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Route;
use crate::origin::OriginDenied;
use crate::route::{RouteTable, has_dot_segment};

/// Most header lines accepted in one request head.
pub const MAX_HEADERS: usize = 128;
/// How long an early answer waits for the client to stop sending before closing.
const LINGER: Duration = Duration::from_secs(2);
/// How much an early answer reads off the client at most before closing.
const LINGER_BYTES: usize = 1 << 20;

/// A refusal, classified by who caused it; each maps to one status and one metric reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The request head exceeded `max_request_head` (or had too many lines).
    HeadTooLarge,
    /// Malformed request; the text says what is wrong.
    BadRequest(&'static str),
    /// An Upgrade with a method other than GET.
    MethodNotAllowed,
    /// Missing or unsupported `Sec-WebSocket-Version`.
    UpgradeRequired,
    /// No route matches host and path.
    NoRoute,
    /// The route's Origin policy refused the request.
    Origin(OriginDenied),
    /// `max_connections` reached.
    Overloaded,
    /// No backend accepted a connection.
    BackendUnavailable,
    /// The backend did not answer within `response_timeout`.
    BackendTimeout,
    /// The backend answered the Upgrade wrongly; the text says how.
    BadBackendHandshake(&'static str),
    /// The process is draining and takes no new requests.
    Draining,
}

impl Reject {
    /// The HTTP status sent to the client.
    pub fn status(self) -> StatusCode {
        match self {
            Reject::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
            Reject::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reject::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Reject::NoRoute => StatusCode::NOT_FOUND,
            Reject::Origin(_) => StatusCode::FORBIDDEN,
            Reject::Overloaded | Reject::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Reject::BackendUnavailable | Reject::BadBackendHandshake(_) => StatusCode::BAD_GATEWAY,
            Reject::BackendTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// One line saying why, sent as the body and logged.
    pub fn reason(self) -> &'static str {
        match self {
            Reject::HeadTooLarge => "request head too large",
            Reject::BadRequest(r) => r,
            Reject::MethodNotAllowed => "WebSocket upgrade requires GET",
            Reject::UpgradeRequired => "unsupported WebSocket version; use 13",
            Reject::NoRoute => "no route for this host and path",
            Reject::Origin(OriginDenied::Missing) => "Origin header required",
            Reject::Origin(OriginDenied::NotAllowed) => "Origin not allowed",
            Reject::Overloaded => "gateway at capacity, retry later",
            Reject::Draining => "gateway shutting down",
            Reject::BackendUnavailable => "no backend available",
            Reject::BackendTimeout => "backend timed out",
            Reject::BadBackendHandshake(r) => r,
        }
    }

    /// The `reason` label of the rejection counter.
    pub fn metric_reason(self) -> &'static str {
        match self {
            Reject::HeadTooLarge
            | Reject::BadRequest(_)
            | Reject::MethodNotAllowed
            | Reject::UpgradeRequired => "bad_request",
            Reject::NoRoute => "no_route",
            Reject::Origin(_) => "origin",
            Reject::Overloaded => "global_cap",
            Reject::Draining => "draining",
            Reject::BackendUnavailable | Reject::BadBackendHandshake(_) => "backend_error",
            Reject::BackendTimeout => "backend_timeout",
        }
    }

    /// Extra headers the status calls for.
    fn extra_headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Reject::UpgradeRequired => &[("Sec-WebSocket-Version", "13")],
            Reject::MethodNotAllowed => &[("Allow", "GET")],
            Reject::Overloaded | Reject::Draining => &[("Retry-After", "5")],
            _ => &[],
        }
    }

    /// The whole HTTP/1.1 answer, for connections hyper does not serve yet.
    pub fn to_bytes(self) -> Vec<u8> {
        let status = self.status();
        let body = self.reason();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len() + 1
        );
        for (k, v) in self.extra_headers() {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(body);
        out.push('\n');
        out.into_bytes()
    }

    /// The same answer as a hyper response.
    pub fn to_response(self) -> http::Response<Full<Bytes>> {
        let mut resp = http::Response::new(Full::new(Bytes::from(format!("{}\n", self.reason()))));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        for (k, v) in self.extra_headers() {
            h.insert(
                HeaderName::from_static(lower(k)),
                HeaderValue::from_static(v),
            );
        }
        resp
    }
}

fn lower(k: &'static str) -> &'static str {
    match k {
        "Sec-WebSocket-Version" => "sec-websocket-version",
        "Allow" => "allow",
        _ => "retry-after",
    }
}

/// Why reading a request head stopped.
#[derive(Debug)]
pub enum HeadError {
    /// The client closed (or sent nothing) before a whole head arrived.
    Closed,
    /// The head is refused; answer with this.
    Reject(Reject),
    /// The connection failed.
    Io(io::Error),
}

/// Reads one request head into `buf` (which may already hold bytes); returns the parsed head
/// and its length. Bytes after the head stay in `buf`.
pub async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Result<(http::request::Parts, usize), HeadError> {
    let mut scanned: usize = 0;
    loop {
        // Only a blank line can end a head, so parse only when one may have arrived.
        let from = scanned.saturating_sub(3);
        if buf.len() > from && (memchr_blank(&buf[from..]) || buf.len() > limit) {
            match parse_head(buf, limit)? {
                Some(done) => return Ok(done),
                None if buf.len() > limit => return Err(HeadError::Reject(Reject::HeadTooLarge)),
                None => {}
            }
        }
        scanned = buf.len();
        let want = (limit + 1).saturating_sub(buf.len()).clamp(1, 4096);
        buf.reserve(want);
        let n = (&mut *io)
            .take(want as u64)
            .read_buf(buf)
            .await
            .map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
    }
}

fn memchr_blank(b: &[u8]) -> bool {
    b.windows(2).any(|w| w == b"\n\n") || b.windows(3).any(|w| w == b"\n\r\n")
}

/// Parses a complete head at the start of `buf`, `None` if it is not complete yet.
fn parse_head(
    buf: &[u8],
    limit: usize,
) -> Result<Option<(http::request::Parts, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Reject(Reject::HeadTooLarge));
        }
        Err(_) => {
            return Err(HeadError::Reject(Reject::BadRequest(
                "malformed request head",
            )));
        }
    };
    if len > limit {
        return Err(HeadError::Reject(Reject::HeadTooLarge));
    }
    let bad = |r| HeadError::Reject(Reject::BadRequest(r));
    let method =
        Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| bad("bad method"))?;
    let uri: http::Uri = req
        .path
        .unwrap_or("")
        .parse()
        .map_err(|_| bad("bad request target"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut builder = http::Request::builder()
        .method(method)
        .uri(uri)
        .version(version);
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("bad header value"))?;
        builder = builder.header(name, value);
    }
    let (parts, ()) = builder
        .body(())
        .map_err(|_| bad("malformed request head"))?
        .into_parts();
    Ok(Some((parts, len)))
}

/// What a checked request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// A valid WebSocket Upgrade.
    Upgrade,
    /// Any other request, to be reverse-proxied.
    Plain,
}

/// True when the request asks for a WebSocket upgrade (an `Upgrade` header naming websocket).
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    has_token(headers, &header::UPGRADE, "websocket")
}

/// Checks a request head and finds its route; Upgrade requests are checked in full.
pub fn check<'t>(
    parts: &http::request::Parts,
    routes: &'t RouteTable,
) -> Result<(Kind, &'t Route), Reject> {
    let path = parts.uri.path();
    if has_dot_segment(path) {
        return Err(Reject::BadRequest(
            "dot segments are not allowed in the path",
        ));
    }
    let upgrade = wants_websocket(&parts.headers);
    if upgrade {
        check_upgrade(parts)?;
    }
    let host = host_of(parts);
    let route = routes.lookup(host, path).ok_or(Reject::NoRoute)?;
    if upgrade {
        route
            .origins
            .check(parts.headers.get_all(header::ORIGIN).iter())
            .map_err(Reject::Origin)?;
        return Ok((Kind::Upgrade, route));
    }
    Ok((Kind::Plain, route))
}

fn check_upgrade(parts: &http::request::Parts) -> Result<(), Reject> {
    if parts.version != Version::HTTP_11 {
        return Err(Reject::BadRequest("WebSocket upgrade requires HTTP/1.1"));
    }
    if parts.method != Method::GET {
        return Err(Reject::MethodNotAllowed);
    }
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts != 1 {
        return Err(Reject::BadRequest("exactly one Host header is required"));
    }
    if !has_token(&parts.headers, &header::CONNECTION, "upgrade") {
        return Err(Reject::BadRequest(
            "Connection header lacks the upgrade token",
        ));
    }
    let mut versions = parts.headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => {}
        _ => return Err(Reject::UpgradeRequired),
    }
    let mut keys = parts.headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key_ok = match (keys.next(), keys.next()) {
        (Some(k), None) => base64::engine::general_purpose::STANDARD
            .decode(k.as_bytes().trim_ascii())
            .is_ok_and(|d| d.len() == 16),
        _ => false,
    };
    if !key_ok {
        return Err(Reject::BadRequest(
            "Sec-WebSocket-Key must be base64 of 16 bytes",
        ));
    }
    Ok(())
}

/// The Host header, or the authority of an absolute-form target.
pub fn host_of(parts: &http::request::Parts) -> Option<&str> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

/// True when any value of header `name` holds `token` in its comma list (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Writes `answer`, shuts the write side, reads off what the client still sends (bounded in
/// time and bytes), then drops the connection.
pub async fn answer_and_close<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, answer: &[u8]) {
    let sent = async {
        io.write_all(answer).await?;
        io.flush().await?;
        io.shutdown().await
    };
    if tokio::time::timeout(LINGER, sent).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(raw: &str) -> http::request::Parts {
        parse_head(raw.as_bytes(), 1 << 16).unwrap().unwrap().0
    }

    const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
                        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn a_valid_upgrade_passes_and_tokens_are_case_insensitive() {
        assert_eq!(check_upgrade(&parts(GOOD)), Ok(()));
        let p = parts(&GOOD.replace("Upgrade: websocket", "upgrade: WebSocket"));
        assert!(wants_websocket(&p.headers));
    }

    #[test]
    fn each_defect_gets_its_status() {
        let cases = [
            (GOOD.replace("GET", "POST"), StatusCode::METHOD_NOT_ALLOWED),
            (
                GOOD.replace("HTTP/1.1", "HTTP/1.0"),
                StatusCode::BAD_REQUEST,
            ),
            (
                GOOD.replace("Version: 13", "Version: 8"),
                StatusCode::UPGRADE_REQUIRED,
            ),
            (
                GOOD.replace("Sec-WebSocket-Version: 13\r\n", ""),
                StatusCode::UPGRADE_REQUIRED,
            ),
            (
                GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
                StatusCode::BAD_REQUEST,
            ),
            (
                GOOD.replace("keep-alive, Upgrade", "keep-alive"),
                StatusCode::BAD_REQUEST,
            ),
            (GOOD.replace("Host: x\r\n", ""), StatusCode::BAD_REQUEST),
        ];
        for (raw, status) in cases {
            assert_eq!(
                check_upgrade(&parts(&raw)).unwrap_err().status(),
                status,
                "{raw}"
            );
        }
    }

    #[tokio::test]
    async fn head_limit_counts_request_line_and_headers() {
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(100)
        );
        let mut io = std::io::Cursor::new(raw.clone().into_bytes());
        let mut buf = Vec::new();
        assert!(read_head(&mut io, &mut buf, raw.len()).await.is_ok());
        let mut io = std::io::Cursor::new(raw.clone().into_bytes());
        let mut buf = Vec::new();
        let err = read_head(&mut io, &mut buf, raw.len() - 10)
            .await
            .unwrap_err();
        assert!(matches!(err, HeadError::Reject(Reject::HeadTooLarge)));
    }

    #[tokio::test]
    async fn head_split_into_single_bytes_parses() {
        let mut b = tokio_test_builder(GOOD.as_bytes());
        let mut buf = Vec::new();
        let (p, n) = read_head(&mut b, &mut buf, 4096).await.unwrap();
        assert_eq!(n, GOOD.len());
        assert_eq!(p.uri.path(), "/chat");
    }

    /// A reader that hands out one byte per read, as a slow client would.
    fn tokio_test_builder(data: &[u8]) -> impl AsyncRead + Unpin {
        struct OneByte(Vec<u8>, usize);
        impl AsyncRead for OneByte {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                if self.1 < self.0.len() {
                    let b = self.0[self.1];
                    buf.put_slice(&[b]);
                    self.1 += 1;
                }
                std::task::Poll::Ready(Ok(()))
            }
        }
        OneByte(data.to_vec(), 0)
    }
}
