//! Forward auth: before a route's request goes anywhere, a plain `GET` to the auth service with
//! the client's credentials (cookies, `Authorization`), its `Origin` and `User-Agent`, the
//! forwarding headers and the original method and target. Never the upgrade headers or a
//! body: the auth service answers it like any page. Its 2xx admits, its 401, 403 and 3xx go to
//! the client as they are (a login redirect works), anything else is 503.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config;
use crate::upstream::headers::forward_headers;

/// Largest auth-service answer body relayed to the client.
const MAX_BODY: usize = 64 * 1024;

/// The request headers of the client passed to the auth service.
const PASSED: [HeaderName; 5] = [
    header::COOKIE,
    header::AUTHORIZATION,
    header::ORIGIN,
    header::USER_AGENT,
    crate::request::XFCC,
];

/// The forwarding headers of the gateway passed to the auth service.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// A forward-auth authenticator with its keep-alive connections to the auth service.
pub(crate) struct ForwardAuth {
    cfg: config::Forward,
    client: Client<HttpConnector, Empty<Bytes>>,
}

/// What the auth service said.
pub(crate) enum Verdict {
    /// 2xx: the headers to set on the backend request, the subject and the expiry it named.
    Allow {
        copy: Vec<(HeaderName, HeaderValue)>,
        subject: Option<String>,
        expires_at: Option<SystemTime>,
    },
    /// 401, 403 or 3xx: the answer for the client.
    Deny(Response<Bytes>),
    /// Any other status, a timeout or a connection failure.
    Unavailable(String),
}

impl ForwardAuth {
    pub(crate) fn new(cfg: config::Forward) -> ForwardAuth {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(http);
        ForwardAuth { cfg, client }
    }

    /// The headers the backend gets from the auth answer; client-sent ones of these names are
    /// removed first.
    pub(crate) fn copied_names(&self) -> &[HeaderName] {
        &self.cfg.copy_headers
    }

    /// Asks the auth service about a request.
    pub(crate) async fn check(
        &self,
        req: &http::request::Parts,
        client: SocketAddr,
        proto: &str,
    ) -> Verdict {
        let mut headers = HeaderMap::new();
        for name in &PASSED {
            for v in req.headers.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let fwd = forward_headers(&req.headers, client, proto);
        for name in FORWARDING {
            if let Some(v) = fwd.get(name) {
                headers.insert(HeaderName::from_static(name), v.clone());
            }
        }
        if let Ok(m) = HeaderValue::from_str(req.method.as_str()) {
            headers.insert(HeaderName::from_static("x-forwarded-method"), m);
        }
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Ok(u) = HeaderValue::from_str(target) {
            headers.insert(HeaderName::from_static("x-forwarded-uri"), u);
        }
        let mut ask = Request::new(Empty::new());
        *ask.uri_mut() = self.cfg.url.clone();
        *ask.headers_mut() = headers;
        let answer = match tokio::time::timeout(self.cfg.timeout, self.client.request(ask)).await {
            Err(_) => return Verdict::Unavailable("timed out".into()),
            Ok(Err(e)) => return Verdict::Unavailable(format!("request failed: {e}")),
            Ok(Ok(r)) => r,
        };
        let status = answer.status();
        let (parts, body) = answer.into_parts();
        let body =
            tokio::time::timeout(self.cfg.timeout, Limited::new(body, MAX_BODY).collect()).await;
        let body = match body {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return Verdict::Unavailable(format!("answer body: {e}")),
            Err(_) => return Verdict::Unavailable("answer body timed out".into()),
        };
        if status.is_success() {
            let mut copy = Vec::new();
            for name in &self.cfg.copy_headers {
                for v in parts.headers.get_all(name) {
                    copy.push((name.clone(), v.clone()));
                }
            }
            let text = |h: &Option<HeaderName>| {
                h.as_ref()
                    .and_then(|n| parts.headers.get(n))
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.trim().to_string())
            };
            let expires_at = text(&self.cfg.expires_header)
                .and_then(|s| s.parse::<u64>().ok())
                .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
            return Verdict::Allow {
                copy,
                subject: text(&self.cfg.subject_header).filter(|s| !s.is_empty()),
                expires_at,
            };
        }
        if status == StatusCode::UNAUTHORIZED
            || status == StatusCode::FORBIDDEN
            || status.is_redirection()
        {
            let mut out = Response::new(body);
            *out.status_mut() = status;
            for name in [
                header::LOCATION,
                header::WWW_AUTHENTICATE,
                header::SET_COOKIE,
                header::CONTENT_TYPE,
                header::CACHE_CONTROL,
            ] {
                for v in parts.headers.get_all(&name) {
                    out.headers_mut().append(name.clone(), v.clone());
                }
            }
            return Verdict::Deny(out);
        }
        Verdict::Unavailable(format!("answered {status}"))
    }
}
