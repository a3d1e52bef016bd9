//! Refusals, tagged by who caused them. Every way a connection or request is turned away before
//! a tunnel or a response exists is a [`Refusal`] variant; this module alone maps a variant to
//! its HTTP answer (status, extra headers, one-line body), its metric reason, its log level and
//! its words, and [`record`] is the one place that counts and logs them.

use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;

use crate::origin::OriginDenied;
use crate::server::Shared;

/// Who caused a refusal: the client (bad input, limits), the backend, or the gateway itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Culprit {
    Client,
    Backend,
    Gateway,
}

impl Culprit {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Culprit::Client => "client",
            Culprit::Backend => "backend",
            Culprit::Gateway => "gateway",
        }
    }
}

/// A connection or request turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Over `per_ip_rate` / `per_ip_burst` (socket closed before TLS).
    RateLimit,
    /// Over `per_ip_max_connections` (socket closed before TLS).
    PerIpCap,
    /// No valid PROXY header where one is required (socket closed).
    ProxyHeader,
    /// The PROXY header, TLS or the request head did not arrive within `handshake_timeout`.
    HandshakeTimeout,
    /// Cleartext HTTP sent to a TLS listener.
    PlainHttpOnTls,
    /// The request head exceeded `max_request_head` (or had too many lines).
    HeadTooLarge,
    /// The request head is not valid HTTP/1.1.
    Malformed(Malformed),
    /// A `.` or `..` path segment, in any spelling.
    DotSegment,
    /// An Upgrade request that breaks RFC 6455 section 4.2.1.
    BadUpgrade(UpgradeDefect),
    /// An Upgrade with a method other than GET.
    UpgradeMethod,
    /// Missing or unsupported `Sec-WebSocket-Version`.
    WebSocketVersion,
    /// No route for this host and path.
    NoRoute,
    /// The route's Origin policy refused the upgrade.
    Origin(OriginDenied),
    /// The route has `require_client_cert` and the connection has no verified certificate.
    ClientCert,
    /// The Host names a server name whose TLS settings (client certificates) differ from
    /// those the connection's handshake used.
    Misdirected,
    /// The request body's framing is broken.
    BadBody(BodyError),
    /// The route needs a JWT and there was none, or it did not verify.
    Auth(AuthFailure),
    /// The route's auth service refused (its answer is relayed instead of this one's).
    AuthDenied,
    /// The route's keys are not fetched yet, or its auth service failed.
    AuthUnavailable,
    /// `max_connections` reached.
    Overloaded,
    /// The process is draining.
    Draining,
    /// No backend accepted a connection, or the backend failed mid-request.
    BackendUnavailable,
    /// The backend did not answer within `response_timeout`.
    BackendTimeout,
    /// The backend answered the Upgrade with an invalid 101.
    BadBackendHandshake(BadHandshake),
    /// Every backend of the route is down (or drained): no connect is even tried.
    NoHealthyBackend,
    /// Every healthy backend of the route is at its `max_tunnels`.
    BackendFull,
    /// The TLS handshake with the backend, or its certificate, failed.
    BackendTls,
}

/// What is malformed in a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    Syntax,
    Method,
    Target,
    HeaderName,
    HeaderValue,
}

/// How an Upgrade request breaks RFC 6455 section 4.2.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpgradeDefect {
    NotHttp11,
    HostCount,
    NoUpgradeToken,
    BadKey,
}

/// How a request body's framing is broken (RFC 9112 sections 6 and 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// A chunk-size line that is not hex, overflows, or runs on.
    ChunkSize,
    /// The CRLF after a chunk's data is missing.
    ChunkEnd,
    /// The trailer section is malformed or too large.
    Trailers,
    /// Content-Length is not a number, or several disagree.
    ContentLength,
    /// Both Transfer-Encoding and Content-Length.
    LengthAndChunked,
    /// A transfer coding other than a final `chunked`.
    TransferCoding,
    /// The client closed before the body ended.
    Truncated,
}

/// Why a JWT was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// No token at any of the route's sources.
    Missing,
    /// A token that failed this check.
    Invalid(crate::auth::jwt::Invalid),
}

/// How a backend's 101 is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadHandshake {
    NoUpgradeHeader,
    WrongAccept,
    UnofferedSubprotocol,
    UnofferedExtension,
    LostAfter101,
    /// A 1xx or 2xx other than 101 to a WebSocket over HTTP/2: passed on, the client would
    /// take it for an open WebSocket (RFC 8441 section 5) and read a page as frames.
    NotSwitched,
}

/// The HTTP answer to a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: &'static [(&'static str, &'static str)],
    pub(crate) body: &'static str,
}

impl Refusal {
    pub(crate) fn culprit(self) -> Culprit {
        match self {
            Refusal::Overloaded | Refusal::Draining | Refusal::AuthUnavailable => Culprit::Gateway,
            Refusal::BackendUnavailable
            | Refusal::BackendTimeout
            | Refusal::BadBackendHandshake(_)
            | Refusal::NoHealthyBackend
            | Refusal::BackendFull
            | Refusal::BackendTls => Culprit::Backend,
            _ => Culprit::Client,
        }
    }

    /// The answer sent before closing; `None` where the socket is closed without one (the
    /// refusal happened before TLS, or the client is too slow to be answered).
    pub(crate) fn answer(self) -> Option<Answer> {
        let status = match self {
            Refusal::RateLimit
            | Refusal::PerIpCap
            | Refusal::ProxyHeader
            | Refusal::HandshakeTimeout => return None,
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::PlainHttpOnTls
            | Refusal::Malformed(_)
            | Refusal::DotSegment
            | Refusal::BadUpgrade(_)
            | Refusal::BadBody(_) => StatusCode::BAD_REQUEST,
            Refusal::UpgradeMethod => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::Auth(_) | Refusal::AuthDenied => StatusCode::UNAUTHORIZED,
            Refusal::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::WebSocketVersion => StatusCode::UPGRADE_REQUIRED,
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::Origin(_) | Refusal::ClientCert => StatusCode::FORBIDDEN,
            Refusal::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Refusal::Overloaded | Refusal::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BackendUnavailable | Refusal::BadBackendHandshake(_) | Refusal::BackendTls => {
                StatusCode::BAD_GATEWAY
            }
            Refusal::NoHealthyBackend | Refusal::BackendFull => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BackendTimeout => StatusCode::GATEWAY_TIMEOUT,
        };
        let headers: &'static [(&'static str, &'static str)] = match self {
            Refusal::WebSocketVersion => &[("Sec-WebSocket-Version", "13")],
            Refusal::UpgradeMethod => &[("Allow", "GET")],
            Refusal::Overloaded
            | Refusal::Draining
            | Refusal::AuthUnavailable
            | Refusal::NoHealthyBackend
            | Refusal::BackendFull => &[("Retry-After", "5")],
            Refusal::Auth(AuthFailure::Missing) => {
                &[("WWW-Authenticate", "Bearer realm=\"wsgate\"")]
            }
            Refusal::Auth(AuthFailure::Invalid(_)) => &[(
                "WWW-Authenticate",
                "Bearer realm=\"wsgate\", error=\"invalid_token\"",
            )],
            _ => &[],
        };
        Some(Answer {
            status,
            headers,
            body: self.reason(),
        })
    }

    /// The `reason` label of `wsgate_handshake_rejections_total`.
    pub(crate) fn metric_reason(self) -> &'static str {
        match self {
            Refusal::RateLimit => "rate_limit",
            Refusal::PerIpCap => "per_ip_cap",
            Refusal::ProxyHeader => "proxy_protocol",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::PlainHttpOnTls
            | Refusal::HeadTooLarge
            | Refusal::Malformed(_)
            | Refusal::DotSegment
            | Refusal::BadUpgrade(_)
            | Refusal::UpgradeMethod
            | Refusal::WebSocketVersion
            | Refusal::BadBody(_) => "bad_request",
            Refusal::NoRoute => "no_route",
            Refusal::Auth(_) | Refusal::AuthDenied => "auth",
            Refusal::AuthUnavailable => "auth_unavailable",
            Refusal::Origin(_) => "origin",
            Refusal::ClientCert => "client_cert",
            Refusal::Misdirected => "misdirected",
            Refusal::Overloaded => "global_cap",
            Refusal::Draining => "draining",
            Refusal::BackendUnavailable | Refusal::BadBackendHandshake(_) => "backend_error",
            Refusal::BackendTimeout => "backend_timeout",
            Refusal::NoHealthyBackend => "no_healthy_backend",
            Refusal::BackendFull => "backend_full",
            Refusal::BackendTls => "backend_tls",
        }
    }

    /// One line saying why, for the answer's body and the log.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::RateLimit => "connection rate limit",
            Refusal::PerIpCap => "too many connections from this address",
            Refusal::ProxyHeader => "invalid PROXY header",
            Refusal::HandshakeTimeout => "handshake timed out",
            Refusal::PlainHttpOnTls => "plain HTTP sent to the TLS port; use https:// or wss://",
            Refusal::HeadTooLarge => "request head too large",
            Refusal::Malformed(m) => match m {
                Malformed::Syntax => "malformed request head",
                Malformed::Method => "bad method",
                Malformed::Target => "bad request target",
                Malformed::HeaderName => "bad header name",
                Malformed::HeaderValue => "bad header value",
            },
            Refusal::DotSegment => "dot segments are not allowed in the path",
            Refusal::BadUpgrade(d) => match d {
                UpgradeDefect::NotHttp11 => "WebSocket upgrade requires HTTP/1.1",
                UpgradeDefect::HostCount => "exactly one Host header is required",
                UpgradeDefect::NoUpgradeToken => "Connection header lacks the upgrade token",
                UpgradeDefect::BadKey => "Sec-WebSocket-Key must be base64 of 16 bytes",
            },
            Refusal::UpgradeMethod => "WebSocket upgrade requires GET",
            Refusal::WebSocketVersion => "unsupported WebSocket version; use 13",
            Refusal::NoRoute => "no route for this host and path",
            Refusal::Origin(OriginDenied::Missing) => "Origin header required",
            Refusal::Origin(OriginDenied::NotAllowed) => "Origin not allowed",
            Refusal::ClientCert => "a client certificate is required",
            Refusal::Misdirected => {
                "this host needs a TLS connection of its own (use its name as SNI)"
            }
            Refusal::BadBody(b) => match b {
                BodyError::ChunkSize => "malformed chunk size in the request body",
                BodyError::ChunkEnd => "malformed chunk in the request body",
                BodyError::Trailers => "malformed trailer section in the request body",
                BodyError::ContentLength => "invalid Content-Length",
                BodyError::LengthAndChunked => "both Content-Length and Transfer-Encoding",
                BodyError::TransferCoding => "unsupported Transfer-Encoding",
                BodyError::Truncated => "request body ended early",
            },
            Refusal::Auth(AuthFailure::Missing) => "authentication required",
            Refusal::Auth(AuthFailure::Invalid(_)) => "invalid token",
            Refusal::AuthDenied => "authentication refused",
            Refusal::AuthUnavailable => "authentication unavailable, retry later",
            Refusal::Overloaded => "gateway at capacity, retry later",
            Refusal::Draining => "gateway shutting down",
            Refusal::BackendUnavailable => "no backend available",
            Refusal::BackendTimeout => "backend timed out",
            Refusal::NoHealthyBackend => "no healthy backend, retry later",
            Refusal::BackendFull => "every backend is full, retry later",
            Refusal::BackendTls => "TLS to the backend failed",
            Refusal::BadBackendHandshake(b) => match b {
                BadHandshake::NoUpgradeHeader => "backend's 101 lacks Upgrade: websocket",
                BadHandshake::WrongAccept => "backend sent a wrong Sec-WebSocket-Accept",
                BadHandshake::UnofferedSubprotocol => {
                    "backend chose a subprotocol the client did not offer"
                }
                BadHandshake::UnofferedExtension => {
                    "backend chose an extension the client did not offer"
                }
                BadHandshake::LostAfter101 => "backend connection failed after 101",
                BadHandshake::NotSwitched => {
                    "backend answered a WebSocket with a success that is not 101"
                }
            },
        }
    }

    /// What the log adds to the answer's words: the check a token failed (never the token).
    pub(crate) fn detail(self) -> &'static str {
        match self {
            Refusal::Auth(AuthFailure::Invalid(i)) => i.as_str(),
            Refusal::Auth(AuthFailure::Missing) => "no token",
            _ => "",
        }
    }

    /// The whole HTTP/1.1 answer, `Connection: close` included.
    pub(crate) fn to_http1(self) -> Option<Vec<u8>> {
        let a = self.answer()?;
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
            a.status.as_u16(),
            a.status.canonical_reason().unwrap_or(""),
            a.body.len() + 1
        );
        for (k, v) in a.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.push_str(a.body);
        out.push('\n');
        Some(out.into_bytes())
    }
}

/// Counts a refusal and logs it (at most a few lines a second, so a flood cannot fill the
/// disk). Called inside the connection's span, so the line carries its id and client.
pub(crate) fn record(shared: &Shared, r: Refusal) {
    shared.metrics.reject(r.metric_reason());
    if !log_budget() {
        return;
    }
    let status = r.answer().map_or(0, |a| a.status.as_u16());
    let culprit = r.culprit().as_str();
    let detail = r.detail();
    match r.culprit() {
        Culprit::Client => {
            tracing::info!(status, culprit, reason = r.reason(), detail, "refused")
        }
        Culprit::Backend | Culprit::Gateway => {
            tracing::warn!(status, culprit, reason = r.reason(), detail, "refused")
        }
    }
}

/// True while this second's budget of refusal log lines lasts; reports what was suppressed.
pub(crate) fn log_budget() -> bool {
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        COUNT.store(0, Ordering::Relaxed);
        let s = SUPPRESSED.swap(0, Ordering::Relaxed);
        if s > 0 {
            tracing::warn!(suppressed = s, "refusals not logged in the last second");
        }
    }
    if COUNT.fetch_add(1, Ordering::Relaxed) < 20 {
        true
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn culprits_and_statuses_follow_the_table() {
        let cases = [
            (Refusal::HeadTooLarge, Culprit::Client, Some(431)),
            (
                Refusal::BadBody(BodyError::ChunkSize),
                Culprit::Client,
                Some(400),
            ),
            (Refusal::WebSocketVersion, Culprit::Client, Some(426)),
            (Refusal::Overloaded, Culprit::Gateway, Some(503)),
            (Refusal::BackendTimeout, Culprit::Backend, Some(504)),
            (Refusal::RateLimit, Culprit::Client, None),
        ];
        for (r, culprit, status) in cases {
            assert_eq!(r.culprit(), culprit, "{r:?}");
            assert_eq!(r.answer().map(|a| a.status.as_u16()), status, "{r:?}");
        }
    }

    #[test]
    fn answers_carry_their_extra_headers() {
        let a = String::from_utf8(Refusal::WebSocketVersion.to_http1().unwrap()).unwrap();
        assert!(a.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{a}");
        assert!(a.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{a}");
        let a = String::from_utf8(Refusal::Draining.to_http1().unwrap()).unwrap();
        assert!(a.contains("\r\nRetry-After: 5\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\ngateway shutting down\n"), "{a}");
    }
}
