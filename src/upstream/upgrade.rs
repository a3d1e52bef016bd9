//! The WebSocket Upgrade toward the backend: the client's request with forwarding headers, sent
//! with hyper's client, and the backend's 101 checked (`Sec-WebSocket-Accept`, subprotocol,
//! extensions) before anything reaches the client. Any other status is handed back to be
//! relayed as it is.

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

use super::BackendStream;
use super::headers::{forward_headers, has_token, origin_form};
use crate::reject::{BadHandshake, Refusal};

/// The GUID of RFC 6455 section 1.3.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// An Upgrade the backend accepted.
pub(crate) struct Switched {
    /// The backend's 101 headers (hop-by-hop fields still in).
    pub(crate) headers: HeaderMap,
    /// The backend connection, out of hyper's hands.
    pub(crate) stream: BackendStream,
    /// Bytes the backend sent after its 101, to relay first.
    pub(crate) leftover: Bytes,
}

/// What the backend made of the Upgrade.
pub(crate) enum Answer {
    /// 101 with a valid handshake.
    Switched(Switched),
    /// Any other status, relayed to the client as it is.
    Refused(Response<Incoming>),
}

/// Sends the client's Upgrade over `stream` and checks the backend's answer.
pub(crate) async fn upgrade(
    stream: BackendStream,
    client_req: &http::request::Parts,
    client: SocketAddr,
    proto: &str,
    response_timeout: Duration,
) -> Result<Answer, Refusal> {
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|_| Refusal::BackendUnavailable)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut headers = forward_headers(&client_req.headers, client, proto);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let mut req = Request::new(Empty::new());
    *req.method_mut() = client_req.method.clone();
    *req.uri_mut() = origin_form(&client_req.uri);
    *req.headers_mut() = headers;
    let mut resp = match tokio::time::timeout(response_timeout, sender.send_request(req)).await {
        Err(_) => return Err(Refusal::BackendTimeout),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "backend failed during the upgrade");
            return Err(Refusal::BackendUnavailable);
        }
        Ok(Ok(r)) => r,
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Answer::Refused(resp));
    }
    check_101(&client_req.headers, resp.headers()).map_err(Refusal::BadBackendHandshake)?;
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|_| Refusal::BadBackendHandshake(BadHandshake::LostAfter101))?;
    let parts = upgraded
        .downcast::<TokioIo<BackendStream>>()
        .map_err(|_| Refusal::BadBackendHandshake(BadHandshake::LostAfter101))?;
    Ok(Answer::Switched(Switched {
        headers: resp.headers().clone(),
        stream: parts.io.into_inner(),
        // Only what the backend sent past its 101 is kept, not hyper's whole read buffer.
        leftover: Bytes::copy_from_slice(&parts.read_buf),
    }))
}

/// The `Sec-WebSocket-Accept` value for a key.
pub(crate) fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Checks a backend's 101 against the client's request.
pub(crate) fn check_101(req: &HeaderMap, resp: &HeaderMap) -> Result<(), BadHandshake> {
    if !has_token(resp, &header::UPGRADE, "websocket") {
        return Err(BadHandshake::NoUpgradeHeader);
    }
    let key = req
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().trim_ascii())
        .unwrap_or_default();
    let accept = resp
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(|a| a.as_bytes().trim_ascii());
    if accept != Some(accept_key(key).as_bytes()) {
        return Err(BadHandshake::WrongAccept);
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
            return Err(BadHandshake::UnofferedSubprotocol);
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
                return Err(BadHandshake::UnofferedExtension);
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
        assert_eq!(
            check_101(&req, &resp),
            Err(BadHandshake::UnofferedSubprotocol)
        );
        resp.insert("sec-websocket-protocol", "chat".parse().unwrap());
        resp.insert(
            "sec-websocket-extensions",
            "x-webkit-deflate-frame".parse().unwrap(),
        );
        assert_eq!(
            check_101(&req, &resp),
            Err(BadHandshake::UnofferedExtension)
        );
        resp.remove("sec-websocket-extensions");
        resp.insert("sec-websocket-accept", "AAAA".parse().unwrap());
        assert_eq!(check_101(&req, &resp), Err(BadHandshake::WrongAccept));
    }
}
