//! The backend side of a request: connecting (TCP or Unix socket, connect timeout, next backend
//! on failure), the forwarding headers, sending the Upgrade with hyper's client and checking the
//! backend's 101 (`Sec-WebSocket-Accept`, subprotocol and extensions) before it reaches the client.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

use crate::config::Backend;
use crate::handshake::{Reject, has_token};

/// The GUID of RFC 6455 section 1.3.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What the gateway knows of a client connection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The client's address (from the PROXY header when one is expected).
    pub addr: SocketAddr,
    /// Whether the client came over TLS.
    pub tls: bool,
    /// Connection number, for logs.
    pub id: u64,
}

/// A connection to a backend: TCP (left) or a Unix domain socket (right).
pub type BackendStream = Either<TcpStream, UnixStream>;

/// Connects to one backend within `timeout`.
pub async fn connect(backend: &Backend, timeout: Duration) -> io::Result<BackendStream> {
    let fut = async {
        match backend {
            Backend::Tcp(addr) => {
                let s = TcpStream::connect(addr.as_str()).await?;
                s.set_nodelay(true)?;
                Ok(Either::Left(s))
            }
            Backend::Unix(path) => Ok(Either::Right(UnixStream::connect(path).await?)),
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Connects to the first backend of `order` that accepts within `timeout` each.
pub async fn connect_any<'a>(
    order: impl Iterator<Item = &'a Backend>,
    timeout: Duration,
) -> Result<(BackendStream, &'a Backend), Reject> {
    for backend in order {
        match connect(backend, timeout).await {
            Ok(s) => return Ok((s, backend)),
            Err(e) => tracing::warn!(backend = %backend, error = %e, "backend connect failed"),
        }
    }
    Err(Reject::BackendUnavailable)
}

/// The request headers sent to a backend: hop-by-hop headers removed, forwarding headers added.
pub fn forward_headers(src: &HeaderMap, client: &ClientInfo) -> HeaderMap {
    let mut out = src.clone();
    strip_hop_by_hop(&mut out);
    let ip = client.addr.ip();
    let proto = if client.tls { "https" } else { "http" };
    let xff = join_values(src, "x-forwarded-for", &ip.to_string());
    let host = src
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let for_param = match ip {
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        v4 => format!("for={v4}"),
    };
    let mut element = format!("{for_param};proto={proto}");
    if let Some(h) = &host {
        if h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            element.push_str(&format!(";host={h}"));
        } else {
            element.push_str(&format!(";host=\"{}\"", h.replace(['"', '\\'], "")));
        }
    }
    let forwarded = join_values(src, "forwarded", &element);
    set(&mut out, "x-forwarded-for", &xff);
    set(&mut out, "forwarded", &forwarded);
    set(&mut out, "x-real-ip", &ip.to_string());
    set(&mut out, "x-forwarded-proto", proto);
    match &host {
        Some(h) => set(&mut out, "x-forwarded-host", h),
        None => {
            out.remove("x-forwarded-host");
        }
    }
    out
}

/// Removes the hop-by-hop headers of RFC 9110 section 7.6.1, and those named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        // The WebSocket headers are end-to-end whatever a client lists.
        .filter(|n| !n.as_str().starts_with("sec-websocket-"))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        h.remove(n);
    }
}

fn join_values(src: &HeaderMap, name: &str, append: &str) -> String {
    let mut v: Vec<&str> = src
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    v.push(append);
    v.join(", ")
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// An Upgrade the backend accepted: its 101 (to pass down) and the raw connection.
pub struct Tunnel {
    /// The 101 response for the client (hop-by-hop headers already replaced).
    pub response: Response<()>,
    /// The backend connection, out of hyper's hands.
    pub stream: BackendStream,
    /// Bytes the backend sent after its 101, to relay first.
    pub leftover: Bytes,
}

/// What the backend made of the Upgrade.
pub enum Answer {
    /// 101 with a valid handshake.
    Switched(Tunnel),
    /// Any other status, relayed to the client as it is.
    Refused(Response<Incoming>),
}

/// Sends the client's Upgrade over `stream` and checks the backend's answer.
pub async fn upgrade(
    stream: BackendStream,
    client_req: &http::request::Parts,
    client: &ClientInfo,
    response_timeout: Duration,
) -> Result<Answer, Reject> {
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|_| Reject::BackendUnavailable)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut headers = forward_headers(&client_req.headers, client);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let mut req = Request::new(Empty::new());
    *req.method_mut() = client_req.method.clone();
    *req.uri_mut() = origin_form(&client_req.uri);
    *req.headers_mut() = headers;
    *req.extensions_mut() = client_req.extensions.clone();
    let mut resp = match tokio::time::timeout(response_timeout, sender.send_request(req)).await {
        Err(_) => return Err(Reject::BackendTimeout),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "backend failed during the upgrade");
            return Err(Reject::BackendUnavailable);
        }
        Ok(Ok(r)) => r,
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Answer::Refused(resp));
    }
    check_101(&client_req.headers, resp.headers())?;
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|_| Reject::BadBackendHandshake("backend connection failed after 101"))?;
    let parts = upgraded
        .downcast::<TokioIo<BackendStream>>()
        .map_err(|_| Reject::BadBackendHandshake("unexpected upgrade type"))?;
    let mut down = Response::new(());
    *down.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let mut h = resp.headers().clone();
    strip_hop_by_hop(&mut h);
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    *down.headers_mut() = h;
    Ok(Answer::Switched(Tunnel {
        response: down,
        stream: parts.io.into_inner(),
        leftover: parts.read_buf,
    }))
}

/// The target as origin-form (`/path?query`), as backends expect it.
pub fn origin_form(uri: &http::Uri) -> http::Uri {
    uri.path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"))
}

/// The `Sec-WebSocket-Accept` value for a key.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Checks a backend's 101 against the client's request.
pub fn check_101(req: &HeaderMap, resp: &HeaderMap) -> Result<(), Reject> {
    let bad = Reject::BadBackendHandshake;
    if !has_token(resp, &header::UPGRADE, "websocket") {
        return Err(bad("backend's 101 lacks Upgrade: websocket"));
    }
    let key = req
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().trim_ascii())
        .unwrap_or_default();
    let accept = resp
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(|a| a.as_bytes().trim_ascii());
    if accept != Some(accept_key(key).as_bytes()) {
        return Err(bad("backend sent a wrong Sec-WebSocket-Accept"));
    }
    let offered = |name: &HeaderName| -> Vec<String> {
        req.get_all(name)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .filter(|t| !t.is_empty())
            .collect()
    };
    let mut chosen = resp.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter();
    if let Some(p) = chosen.next() {
        let p = p.to_str().unwrap_or("").trim().to_ascii_lowercase();
        if chosen.next().is_some()
            || p.contains(',')
            || !offered(&header::SEC_WEBSOCKET_PROTOCOL).contains(&p)
        {
            return Err(bad("backend chose a subprotocol the client did not offer"));
        }
    }
    let offered_ext = offered(&header::SEC_WEBSOCKET_EXTENSIONS);
    for ext in resp.get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter() {
        for e in ext.to_str().unwrap_or("\u{0}").split(',') {
            let name = e
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if !offered_ext.contains(&name) {
                return Err(bad("backend chose an extension the client did not offer"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn forwarding_headers_append_and_replace() {
        let mut h = HeaderMap::new();
        h.insert("host", "chat.example.com".parse().unwrap());
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert("x-real-ip", "6.6.6.6".parse().unwrap());
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        let c = ClientInfo {
            addr: "[2001:db8::1]:5000".parse().unwrap(),
            tls: true,
            id: 1,
        };
        let out = forward_headers(&h, &c);
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 2001:db8::1");
        assert_eq!(out["x-real-ip"], "2001:db8::1");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "chat.example.com");
        assert_eq!(
            out["forwarded"],
            "for=\"[2001:db8::1]\";proto=https;host=chat.example.com"
        );
        assert!(out.get("x-secret").is_none() && out.get("connection").is_none());
        assert_eq!(out["host"], "chat.example.com");
    }

    #[test]
    fn backend_101_checks() {
        let mut req = HeaderMap::new();
        req.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        req.insert("sec-websocket-protocol", "chat, superchat".parse().unwrap());
        req.insert(
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits"
                .parse()
                .unwrap(),
        );
        let mut resp = HeaderMap::new();
        resp.insert("upgrade", "websocket".parse().unwrap());
        resp.insert(
            "sec-websocket-accept",
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".parse().unwrap(),
        );
        assert_eq!(check_101(&req, &resp), Ok(()));
        resp.insert("sec-websocket-protocol", "superchat".parse().unwrap());
        resp.insert(
            "sec-websocket-extensions",
            "permessage-deflate; server_no_context_takeover"
                .parse()
                .unwrap(),
        );
        assert_eq!(check_101(&req, &resp), Ok(()));
        resp.insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        assert!(check_101(&req, &resp).is_err());
        resp.insert("sec-websocket-protocol", "chat".parse().unwrap());
        resp.insert(
            "sec-websocket-extensions",
            "x-webkit-deflate-frame".parse().unwrap(),
        );
        assert!(check_101(&req, &resp).is_err());
        resp.remove("sec-websocket-extensions");
        resp.insert("sec-websocket-accept", "AAAA".parse().unwrap());
        assert!(check_101(&req, &resp).is_err());
    }
}
