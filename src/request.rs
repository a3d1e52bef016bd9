//! The one decision path every request walks, whatever carried it: admit (global cap,
//! draining), check the target (dot segments) and, for a WebSocket Upgrade, the handshake
//! (RFC 6455 section 4.2.1), find the route, check the Origin, then authenticate (local checks
//! first, so a request the gateway refuses anyway costs the auth service nothing). The answer
//! is a [`Decision`] or a refusal; nothing here touches the client's socket, so nothing is
//! decided anywhere else.

use base64::Engine;
use http::header::{self, HeaderMap};
use http::{Method, Version};

use crate::auth::{Denied, Identity};
use crate::conn::Conn;
use crate::reject::{Refusal, UpgradeDefect};
use crate::route::RouteEntry;
use crate::route::has_dot_segment;
use crate::server::Runtime;
use crate::upstream::headers::has_token;

/// What a request is, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A valid WebSocket Upgrade.
    Upgrade,
    /// A plain request to forward.
    Forward,
}

/// What a request that passed every check becomes.
pub(crate) struct Decision<'r> {
    pub(crate) kind: Kind,
    pub(crate) route: &'r RouteEntry,
    /// Who it is, when the route authenticates.
    pub(crate) identity: Identity,
}

/// The header naming the verified client certificate to the backend (Envoy's).
pub(crate) const XFCC: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

/// Decides about one request; on admission `req` holds what the backend is to receive.
pub(crate) async fn decide<'r>(
    conn: &Conn,
    rt: &'r Runtime,
    req: &mut http::request::Parts,
) -> Result<Decision<'r>, Denied> {
    if conn.permit.over_capacity {
        return Err(Refusal::Overloaded.into());
    }
    if conn.shared.drain.refuses_new() {
        return Err(Refusal::Draining.into());
    }
    let (kind, route) = route_request(rt, req)?;
    // Names with client certificate settings of their own are one TLS configuration each:
    // a request for such a name on a connection made under another (no SNI, another SNI)
    // would skip that name's certificate check.
    if let (Some(used), Some(configs)) = (&conn.tls_config, &rt.tls) {
        let host = host_of(req).map(crate::route::strip_port);
        if !std::sync::Arc::ptr_eq(used, configs.pick(host)) {
            return Err(Refusal::Misdirected.into());
        }
    }
    // Only the gateway says who presented a certificate: whatever the client sent under that
    // name is dropped, certificate or not.
    req.headers.remove(XFCC);
    match &conn.client_cert {
        Some(c) => {
            req.headers.insert(XFCC, c.xfcc.clone());
        }
        None if route.require_client_cert => return Err(Refusal::ClientCert.into()),
        None => {}
    }
    let identity = match route.auth.and_then(|i| rt.auth.get(i)) {
        Some(auth) => crate::auth::authenticate(conn, auth, req, kind == Kind::Upgrade).await?,
        None => Identity::default(),
    };
    Ok(Decision {
        kind,
        route,
        identity,
    })
}

/// The checks that depend on the request alone (and the routes): the fuzz target drives this.
pub(crate) fn route_request<'r>(
    rt: &'r Runtime,
    req: &http::request::Parts,
) -> Result<(Kind, &'r RouteEntry), Refusal> {
    let path = req.uri.path();
    if has_dot_segment(path) {
        return Err(Refusal::DotSegment);
    }
    let upgrade = wants_websocket(&req.headers);
    if upgrade {
        check_upgrade(req)?;
    }
    let route = rt
        .routes
        .lookup(host_of(req), path)
        .ok_or(Refusal::NoRoute)?;
    if upgrade {
        route
            .origins
            .check(req.headers.get_all(header::ORIGIN).iter())
            .map_err(Refusal::Origin)?;
        return Ok((Kind::Upgrade, route));
    }
    Ok((Kind::Forward, route))
}

/// True when the request asks for a WebSocket upgrade (an `Upgrade` header naming websocket).
pub(crate) fn wants_websocket(headers: &HeaderMap) -> bool {
    has_token(headers, &header::UPGRADE, "websocket")
}

fn check_upgrade(req: &http::request::Parts) -> Result<(), Refusal> {
    let bad = |d| Err(Refusal::BadUpgrade(d));
    if req.version != Version::HTTP_11 {
        return bad(UpgradeDefect::NotHttp11);
    }
    if req.method != Method::GET {
        return Err(Refusal::UpgradeMethod);
    }
    if req.headers.get_all(header::HOST).iter().count() != 1 {
        return bad(UpgradeDefect::HostCount);
    }
    if !has_token(&req.headers, &header::CONNECTION, "upgrade") {
        return bad(UpgradeDefect::NoUpgradeToken);
    }
    let mut versions = req.headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => {}
        _ => return Err(Refusal::WebSocketVersion),
    }
    let mut keys = req.headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key_ok = match (keys.next(), keys.next()) {
        (Some(k), None) => base64::engine::general_purpose::STANDARD
            .decode(k.as_bytes().trim_ascii())
            .is_ok_and(|d| d.len() == 16),
        _ => false,
    };
    if !key_ok {
        return bad(UpgradeDefect::BadKey);
    }
    Ok(())
}

/// The Host header, or the authority of an absolute-form target.
pub(crate) fn host_of(req: &http::request::Parts) -> Option<&str> {
    req.headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
}

/// Fuzz entry: arbitrary bytes as a request head through the parser and the decision path
/// over a fixed route table. Nothing may panic; a head that parses is never longer than the
/// input, and parsing it again from its own bytes gives the same head.
#[doc(hidden)]
pub fn fuzz_head(data: &[u8]) {
    use std::sync::OnceLock;
    static RT: OnceLock<Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        let text = "[server]\nlisten = []\nlisten_plain = [\"127.0.0.1:1\"]\n\
                    [[routes]]\npath = \"/\"\nbackends = [\"127.0.0.1:1\"]\n\
                    [[routes]]\npath = \"/chat\"\nhost = \"chat.example\"\nbackends = [\"127.0.0.1:2\"]\n\
                    allowed_origins = [\"https://*.example\"]\n";
        let config = crate::config::Config::parse(std::path::Path::new("/fuzz.toml"), text)
            .expect("the fuzz configuration is valid");
        Runtime::build(
            config,
            &crate::server::Registries {
                keys: &crate::auth::jwks::Registry::default(),
                certs: &Default::default(),
                backends: &crate::backends::Registry::default(),
                metrics: &crate::metrics::Metrics::new(),
            },
        )
        .expect("the fuzz runtime builds")
    });
    let Ok(Some((parts, len))) = crate::downstream::head::parse_head(data, 1 << 16) else {
        return;
    };
    assert!(len <= data.len());
    let again = crate::downstream::head::parse_head(&data[..len], 1 << 16);
    let Ok(Some((p2, len2))) = again else {
        panic!("a parsed head does not parse from its own bytes");
    };
    assert_eq!(
        (len2, &p2.method, &p2.uri, &p2.headers),
        (len, &parts.method, &parts.uri, &parts.headers)
    );
    let _ = route_request(rt, &parts);
    let _ = crate::downstream::body::request_framing(&parts.headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(raw: &str) -> http::request::Parts {
        crate::downstream::head::parse_head(raw.as_bytes(), 1 << 16)
            .unwrap()
            .unwrap()
            .0
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
    fn each_defect_gets_its_refusal() {
        let cases = [
            (GOOD.replace("GET", "POST"), Refusal::UpgradeMethod),
            (
                GOOD.replace("HTTP/1.1", "HTTP/1.0"),
                Refusal::BadUpgrade(UpgradeDefect::NotHttp11),
            ),
            (
                GOOD.replace("Version: 13", "Version: 8"),
                Refusal::WebSocketVersion,
            ),
            (
                GOOD.replace("Sec-WebSocket-Version: 13\r\n", ""),
                Refusal::WebSocketVersion,
            ),
            (
                GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
                Refusal::BadUpgrade(UpgradeDefect::BadKey),
            ),
            (
                GOOD.replace("keep-alive, Upgrade", "keep-alive"),
                Refusal::BadUpgrade(UpgradeDefect::NoUpgradeToken),
            ),
            (
                GOOD.replace("Host: x\r\n", ""),
                Refusal::BadUpgrade(UpgradeDefect::HostCount),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(check_upgrade(&parts(&raw)), Err(want), "{raw}");
        }
    }

    #[test]
    fn fuzz_entry_takes_heads_and_garbage() {
        fuzz_head(GOOD.as_bytes());
        fuzz_head(b"GET /../x HTTP/1.1\r\nHost: chat.example\r\n\r\n");
        fuzz_head(b"\x00\x01garbage");
    }
}
