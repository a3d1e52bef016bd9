//! Authentication at the edge: JWTs from every source verified against a JWKS of RSA, EC and
//! Ed25519 keys, each kind of bad token refused with 401 before any backend is contacted,
//! claims forwarded and tokens stripped, tunnels closed when their token expires, key rotation
//! through a served `jwks_url`, and forward auth allowing, denying, redirecting and timing out.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// Signing keys and the JWKS that publishes their public halves.
struct Keys {
    rsa: EncodingKey,
    ec: EncodingKey,
    ed: EncodingKey,
    /// An RSA key the JWKS does not hold (signs "bad signature" and "unknown kid" tokens).
    stranger: EncodingKey,
    jwks: Value,
    /// The PEM of the published RSA public key, for the HS256 confusion attack.
    rsa_public_pem: String,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Keys {
    fn new() -> Keys {
        let rsa_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let ec_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ed_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let stranger_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let rsa = EncodingKey::from_rsa_pem(rsa_pair.serialize_pem().as_bytes()).unwrap();
        let ec = EncodingKey::from_ec_pem(ec_pair.serialize_pem().as_bytes()).unwrap();
        let ed = EncodingKey::from_ed_pem(ed_pair.serialize_pem().as_bytes()).unwrap();
        let stranger = EncodingKey::from_rsa_pem(stranger_pair.serialize_pem().as_bytes()).unwrap();
        let mut rsa_jwk = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap(),
        )
        .unwrap();
        rsa_jwk["kid"] = json!("rsa");
        let mut ec_jwk = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&ec, Algorithm::ES256).unwrap(),
        )
        .unwrap();
        ec_jwk["kid"] = json!("ec");
        let ed_jwk = json!({
            "kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "EdDSA",
            "x": b64(ed_pair.public_key_raw()),
        });
        Keys {
            rsa,
            ec,
            ed,
            stranger,
            jwks: json!({ "keys": [rsa_jwk, ec_jwk, ed_jwk] }),
            rsa_public_pem: rsa_pair.public_key_pem(),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mint(key: &EncodingKey, alg: Algorithm, kid: Option<&str>, claims: Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

fn good_claims() -> Value {
    json!({ "sub": "alice", "email": "alice@example.com", "iss": "https://id.test/",
            "aud": ["chat"], "exp": now() + 600, "roles": ["admin", "ops"], "level": 7 })
}

/// A gateway with one JWT-guarded route `/chat` (and an unguarded `/open`).
async fn jwt_gate(keys: &Keys, auth_extra: &str, backend: SocketAddr) -> Gate {
    let pki = Pki::new();
    let jwks = pki.dir.path().join("jwks.json");
    std::fs::write(&jwks, keys.jwks.to_string()).unwrap();
    let secret = pki.dir.path().join("hs.secret");
    std::fs::write(&secret, "a shared secret of the HS256 tokens\n").unwrap();
    let (cert, key) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
    let text = format!(
        "{BASE}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[auth]]\nname = \"users\"\ntype = \"jwt\"\njwks_file = \"{}\"\nsecret_file = \"{}\"\n\
         token_from = [\"header:Authorization\", \"cookie:access_token\", \"query:access_token\", \"subprotocol:access_token.\"]\n\
         issuer = \"https://id.test/\"\naudience = [\"chat\"]\nalgorithms = [\"RS256\", \"ES256\", \"EdDSA\", \"HS256\"]\n\
         forward_claims = {{ sub = \"X-Auth-Subject\", email = \"X-Auth-Email\", roles = \"X-Auth-Roles\", level = \"X-Auth-Level\" }}\n\
         {auth_extra}\n{}auth = \"users\"\n{}",
        cert.display(),
        key.display(),
        jwks.display(),
        secret.display(),
        route("/chat", backend, ""),
        route("/open", backend, ""),
    );
    Gate::start_with(pki, &text).await
}

/// The request the echo backend saw for the next tunnel.
async fn request_seen(b: &mut EchoBackend) -> (http::HeaderMap, String) {
    loop {
        if let Seen::Request(h, uri) = b.next().await {
            return (h, uri);
        }
    }
}

async fn nothing_reached(b: &mut EchoBackend) {
    assert!(
        tokio::time::timeout(Duration::from_millis(200), b.seen.recv())
            .await
            .is_err(),
        "no refused request reached the backend"
    );
}

#[tokio::test]
async fn a_token_from_each_source_is_accepted() {
    let keys = Keys::new();
    let mut backend = EchoBackend::start().await;
    let gate = jwt_gate(&keys, "", backend.addr).await;
    let tokens = [
        mint(&keys.rsa, Algorithm::RS256, Some("rsa"), good_claims()),
        mint(&keys.ec, Algorithm::ES256, Some("ec"), good_claims()),
        mint(&keys.ed, Algorithm::EdDSA, Some("ed"), good_claims()),
        // Without a kid, the key is found by the algorithm's family.
        mint(&keys.ec, Algorithm::ES256, None, good_claims()),
    ];
    for t in &tokens {
        let bearer = format!("Bearer {t}");
        let (mut ws, resp) = gate
            .ws("/chat", &[("Authorization", &bearer)])
            .await
            .unwrap();
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(next_data(&mut ws).await.into_text().unwrap().as_str(), "hi");
        request_seen(&mut backend).await;
    }
    let t = &tokens[1];
    let cookie = format!("theme=dark; access_token={t}");
    let (_ws, resp) = gate.ws("/chat", &[("Cookie", &cookie)]).await.unwrap();
    assert_eq!(resp.status(), 101, "cookie");
    let (_ws, resp) = gate
        .ws(&format!("/chat?room=1&access_token={t}"), &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), 101, "query");
    let offer = format!("chat, access_token.{t}");
    let (_ws, resp) = gate
        .ws("/chat", &[("Sec-WebSocket-Protocol", &offer)])
        .await
        .unwrap();
    assert_eq!(resp.status(), 101, "subprotocol");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
}

#[tokio::test]
async fn every_kind_of_bad_token_is_refused_with_401_before_any_backend() {
    let keys = Keys::new();
    let mut backend = EchoBackend::start().await;
    let gate = jwt_gate(&keys, "", backend.addr).await;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good_claims();
        f(&mut c);
        c
    };
    // HS256 signed with the published RSA public key as the secret: alg confusion.
    let confused = mint(
        &EncodingKey::from_secret(keys.rsa_public_pem.as_bytes()),
        Algorithm::HS256,
        Some("rsa"),
        good_claims(),
    );
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(good_claims().to_string().as_bytes())
    );
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        (
            "expired",
            Some(mint(
                &keys.ec,
                Algorithm::ES256,
                Some("ec"),
                with(&|c| c["exp"] = json!(now() - 120)),
            )),
        ),
        (
            "not yet valid",
            Some(mint(
                &keys.ec,
                Algorithm::ES256,
                Some("ec"),
                with(&|c| c["nbf"] = json!(now() + 600)),
            )),
        ),
        (
            "wrong issuer",
            Some(mint(
                &keys.ec,
                Algorithm::ES256,
                Some("ec"),
                with(&|c| c["iss"] = json!("https://evil/")),
            )),
        ),
        (
            "wrong audience",
            Some(mint(
                &keys.ec,
                Algorithm::ES256,
                Some("ec"),
                with(&|c| c["aud"] = json!(["billing"])),
            )),
        ),
        (
            "no exp",
            Some(mint(
                &keys.ec,
                Algorithm::ES256,
                Some("ec"),
                with(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            )),
        ),
        (
            "bad signature",
            Some(mint(
                &keys.stranger,
                Algorithm::RS256,
                Some("rsa"),
                good_claims(),
            )),
        ),
        (
            "unknown kid",
            Some(mint(
                &keys.stranger,
                Algorithm::RS256,
                Some("other"),
                good_claims(),
            )),
        ),
        ("alg none", Some(none)),
        ("HS256 with the RSA public key", Some(confused)),
    ];
    for (what, token) in cases {
        let extra = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let resp = gate.raw(upgrade_request("/chat", &extra).as_bytes()).await;
        assert_eq!(status_of(&resp), 401, "{what}: {resp}");
        let challenge = resp
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("www-authenticate:"))
            .unwrap_or_else(|| panic!("{what}: no challenge in {resp}"));
        if what == "no token" {
            assert_eq!(challenge, "WWW-Authenticate: Bearer realm=\"wsgate\"");
        } else {
            assert_eq!(
                challenge, "WWW-Authenticate: Bearer realm=\"wsgate\", error=\"invalid_token\"",
                "{what}"
            );
        }
    }
    nothing_reached(&mut backend).await;
    let m = gate.metrics().await;
    assert!(
        m.contains("wsgate_handshake_rejections_total{reason=\"auth\"} 10"),
        "{m}"
    );
    // A valid HS256 token (signed with the configured secret) passes.
    let hs = mint(
        &EncodingKey::from_secret(b"a shared secret of the HS256 tokens"),
        Algorithm::HS256,
        None,
        good_claims(),
    );
    let (_ws, resp) = gate
        .ws("/chat", &[("Authorization", &format!("Bearer {hs}"))])
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
}

#[tokio::test]
async fn claims_are_forwarded_and_client_sent_identity_headers_removed() {
    let keys = Keys::new();
    let mut backend = EchoBackend::start().await;
    let gate = jwt_gate(&keys, "", backend.addr).await;
    let t = mint(&keys.rsa, Algorithm::RS256, Some("rsa"), good_claims());
    let (_ws, _) = gate
        .ws(
            "/chat",
            &[
                ("Authorization", &format!("Bearer {t}")),
                ("X-Auth-Subject", "mallory"),
                ("X-Auth-Email", "mallory@evil"),
            ],
        )
        .await
        .unwrap();
    let (h, _) = request_seen(&mut backend).await;
    assert_eq!(
        h.get_all("x-auth-subject").iter().collect::<Vec<_>>(),
        ["alice"]
    );
    assert_eq!(h["x-auth-email"], "alice@example.com");
    assert_eq!(h["x-auth-roles"], "admin,ops");
    assert_eq!(h["x-auth-level"], "7");
    // Without strip_token the token passes on.
    assert_eq!(h["authorization"], format!("Bearer {t}"));
    // An unguarded route does not touch identity headers (nothing to forward there).
    let (_ws, _) = gate
        .ws("/open", &[("X-Auth-Subject", "whoever")])
        .await
        .unwrap();
    let (h, _) = request_seen(&mut backend).await;
    assert_eq!(h["x-auth-subject"], "whoever");
}

#[tokio::test]
async fn strip_token_removes_it_from_header_cookie_query_and_subprotocol() {
    let keys = Keys::new();
    let mut backend = EchoBackend::start().await;
    let gate = jwt_gate(&keys, "strip_token = true", backend.addr).await;
    let t = mint(&keys.ec, Algorithm::ES256, Some("ec"), good_claims());
    let (_ws, _) = gate
        .ws("/chat", &[("Authorization", &format!("Bearer {t}"))])
        .await
        .unwrap();
    let (h, _) = request_seen(&mut backend).await;
    assert!(h.get("authorization").is_none());
    let (_ws, _) = gate
        .ws(
            "/chat",
            &[("Cookie", &format!("theme=dark; access_token={t}; lang=en"))],
        )
        .await
        .unwrap();
    let (h, _) = request_seen(&mut backend).await;
    assert_eq!(h["cookie"], "theme=dark; lang=en");
    let (_ws, _) = gate
        .ws(&format!("/chat/room?a=1&access_token={t}&b=2"), &[])
        .await
        .unwrap();
    let (_, uri) = request_seen(&mut backend).await;
    assert_eq!(uri, "/chat/room?a=1&b=2");
    let (_ws, resp) = gate
        .ws(
            "/chat",
            &[("Sec-WebSocket-Protocol", &format!("access_token.{t}, chat"))],
        )
        .await
        .unwrap();
    let (h, _) = request_seen(&mut backend).await;
    assert_eq!(h["sec-websocket-protocol"], "chat");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
}

#[tokio::test]
async fn a_subprotocol_token_is_never_offered_to_the_backend_even_without_strip_token() {
    let keys = Keys::new();
    let mut backend = EchoBackend::start().await;
    let gate = jwt_gate(&keys, "", backend.addr).await;
    let t = mint(&keys.ec, Algorithm::ES256, Some("ec"), good_claims());
    let (_ws, resp) = gate
        .ws(
            "/chat",
            &[(
                "Sec-WebSocket-Protocol",
                &format!("access_token.{t}, v2.chat"),
            )],
        )
        .await
        .unwrap();
    let (h, _) = request_seen(&mut backend).await;
    assert_eq!(h["sec-websocket-protocol"], "v2.chat");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "v2.chat");
}

#[tokio::test]
async fn a_tunnel_is_closed_when_its_token_expires() {
    let keys = Keys::new();
    let mut backend = EchoBackend::start().await;
    let gate = jwt_gate(&keys, "", backend.addr).await;
    let exp = now() + 2;
    let t = mint(
        &keys.ec,
        Algorithm::ES256,
        Some("ec"),
        json!({ "sub": "alice", "iss": "https://id.test/", "aud": "chat", "exp": exp }),
    );
    let (mut ws, _) = gate
        .ws("/chat", &[("Authorization", &format!("Bearer {t}"))])
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await.into_text().unwrap().as_str(),
        "before"
    );
    match next_data(&mut ws).await {
        Message::Close(Some(c)) => {
            assert_eq!(
                (u16::from(c.code), c.reason.as_str()),
                (1008, "token expired")
            );
        }
        other => panic!("expected the expiry close, got {other:?}"),
    }
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        at >= exp as f64 && at < exp as f64 + 1.5,
        "closed at {at}, the token expired at {exp}"
    );
    let c = backend.next_close().await.expect("the backend is told");
    assert_eq!(
        (u16::from(c.code), c.reason.as_str()),
        (1001, "token expired")
    );
    while let Some(Ok(_)) = ws.next().await {}
    let m = metrics_when_no_tunnel_is_open(&gate).await;
    assert!(
        m.contains("wsgate_auth_expiries_total{route=\"/chat\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("wsgate_closes_total{code=\"1008\",side=\"gateway\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn plain_http_on_a_protected_route_is_guarded_too() {
    let keys = Keys::new();
    let mut backend = EchoBackend::start().await;
    let gate = jwt_gate(&keys, "", backend.addr).await;
    let resp = gate
        .raw(b"GET /chat/socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status_of(&resp), 401, "{resp}");
    nothing_reached(&mut backend).await;
}

/// A JWKS server whose document the test can change; counts the fetches.
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start_on(l: TcpListener, doc: String) -> JwksServer {
        let addr = l.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(doc));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (d, f) = (doc.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (d, f) = (d.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let body = d.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        JwksServer { addr, doc, fetches }
    }
}

fn url_gate_text(pki: &Pki, url: &str, backend: SocketAddr) -> String {
    let (cert, key) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
    format!(
        "{BASE}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[auth]]\nname = \"users\"\ntype = \"jwt\"\njwks_url = \"{url}\"\njwks_refresh = \"1h\"\n\
         {}auth = \"users\"\n",
        cert.display(),
        key.display(),
        route("/chat", backend, ""),
    )
}

#[tokio::test]
async fn a_new_kid_is_accepted_after_the_early_refresh_of_a_jwks_url() {
    let old = Keys::new();
    let new = Keys::new();
    let backend = EchoBackend::start().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = JwksServer::start_on(l, old.jwks.to_string()).await;
    let pki = Pki::new();
    let text = url_gate_text(
        &pki,
        &format!("http://{}/jwks.json", server.addr),
        backend.addr,
    );
    let gate = Gate::start_with(pki, &text).await;
    let claims = json!({ "sub": "bob", "exp": now() + 600 });
    let first = mint(&old.ec, Algorithm::ES256, Some("ec"), claims.clone());
    // The first fetch happens at start, in the background: the route answers 503 until then.
    let started = Instant::now();
    loop {
        let r = gate
            .ws("/chat", &[("Authorization", &format!("Bearer {first}"))])
            .await;
        if r.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never admitted"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(server.fetches.load(Ordering::SeqCst), 1);
    // The identity provider rotates: the new key set publishes kid "ec2".
    let mut rotated = new.jwks.clone();
    rotated["keys"][1]["kid"] = json!("ec2");
    *server.doc.lock().unwrap() = rotated.to_string();
    let second = mint(&new.ec, Algorithm::ES256, Some("ec2"), claims);
    let bearer = format!("Bearer {second}");
    let resp = gate
        .raw(upgrade_request("/chat", &format!("Authorization: {bearer}\r\n")).as_bytes())
        .await;
    assert_eq!(
        status_of(&resp),
        401,
        "unknown until the early refresh: {resp}"
    );
    let started = Instant::now();
    loop {
        if gate
            .ws("/chat", &[("Authorization", &bearer)])
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new kid is never known"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        server.fetches.load(Ordering::SeqCst),
        2,
        "one early refresh, not a wait for jwks_refresh"
    );
}

#[tokio::test]
async fn a_jwks_server_down_at_start_gives_503_until_it_comes_up() {
    let keys = Keys::new();
    let backend = EchoBackend::start().await;
    let addr = dead_addr().await;
    let pki = Pki::new();
    let text = url_gate_text(&pki, &format!("http://{addr}/jwks.json"), backend.addr);
    let gate = Gate::start_with(pki, &text).await;
    let t = mint(
        &keys.rsa,
        Algorithm::RS256,
        Some("rsa"),
        json!({ "sub": "c", "exp": now() + 600 }),
    );
    let req = upgrade_request("/chat", &format!("Authorization: Bearer {t}\r\n"));
    let resp = gate.raw(req.as_bytes()).await;
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert!(resp.contains("Retry-After: "), "{resp}");
    let m = gate.metrics().await;
    assert!(
        m.contains("wsgate_handshake_rejections_total{reason=\"auth_unavailable\"} 1"),
        "{m}"
    );
    let l = TcpListener::bind(addr).await.unwrap();
    let _server = JwksServer::start_on(l, keys.jwks.to_string()).await;
    let started = Instant::now();
    loop {
        if gate
            .ws("/chat", &[("Authorization", &format!("Bearer {t}"))])
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the keys never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What an auth service saw, and how it answers: by the client's `Authorization`.
async fn auth_service(seen: Arc<Mutex<Vec<http::HeaderMap>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            seen.lock().unwrap().push(req.headers().clone());
                            let who = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let b = http::Response::builder();
                            let resp = match who.as_str() {
                                "Bearer allow" => b
                                    .header("x-user-id", "carol")
                                    .header("x-user-roles", "reader")
                                    .body(Full::new(Bytes::new())),
                                "Bearer brief" => b
                                    .header("x-user-id", "dave")
                                    .header("x-auth-expires", (now() + 2).to_string())
                                    .body(Full::new(Bytes::new())),
                                "Bearer redirect" => b
                                    .status(302)
                                    .header("location", "https://login.test/?next=/sso")
                                    .header("set-cookie", "state=xyz; Path=/")
                                    .body(Full::new(Bytes::new())),
                                "Bearer slow" => {
                                    tokio::time::sleep(Duration::from_secs(3)).await;
                                    b.body(Full::new(Bytes::new()))
                                }
                                "Bearer broken" => b.status(500).body(Full::new(Bytes::new())),
                                _ => b
                                    .status(401)
                                    .header("www-authenticate", "Cookie realm=\"sso\"")
                                    .body(Full::new(Bytes::from_static(b"please log in"))),
                            };
                            Ok::<_, Infallible>(resp.unwrap())
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn forward_gate(auth: SocketAddr, backend: SocketAddr) -> Gate {
    let routes = format!(
        "[[auth]]\nname = \"sso\"\ntype = \"forward\"\nurl = \"http://{auth}/check\"\ntimeout = \"500ms\"\n\
         copy_headers = [\"X-User-Id\", \"X-User-Roles\"]\nexpires_header = \"X-Auth-Expires\"\nsubject_header = \"X-User-Id\"\n\
         {}auth = \"sso\"\n",
        route("/sso", backend, "")
    );
    Gate::start(BASE, &routes).await
}

#[tokio::test]
async fn forward_auth_allows_with_copied_headers_and_asks_with_a_plain_get() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let auth = auth_service(seen.clone()).await;
    let mut backend = EchoBackend::start().await;
    let gate = forward_gate(auth, backend.addr).await;
    let (mut ws, resp) = gate
        .ws(
            "/sso/room?x=1",
            &[
                ("Authorization", "Bearer allow"),
                ("Cookie", "session=s1"),
                ("Origin", "https://good.example"),
                ("X-User-Id", "mallory"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("in")).await.unwrap();
    assert_eq!(next_data(&mut ws).await.into_text().unwrap().as_str(), "in");
    let (h, _) = request_seen(&mut backend).await;
    assert_eq!(h.get_all("x-user-id").iter().collect::<Vec<_>>(), ["carol"]);
    assert_eq!(h["x-user-roles"], "reader");
    let asked = seen.lock().unwrap()[0].clone();
    assert_eq!(asked["authorization"], "Bearer allow");
    assert_eq!(asked["cookie"], "session=s1");
    assert_eq!(asked["origin"], "https://good.example");
    assert_eq!(asked["x-forwarded-method"], "GET");
    assert_eq!(asked["x-forwarded-uri"], "/sso/room?x=1");
    assert_eq!(asked["x-forwarded-for"], "127.0.0.1");
    for h in [
        "upgrade",
        "sec-websocket-key",
        "sec-websocket-version",
        "x-user-id",
    ] {
        assert!(asked.get(h).is_none(), "{h} sent to the auth service");
    }
    assert!(
        !asked.get_all("connection").iter().any(|v| v
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("upgrade")),
        "{asked:?}"
    );
}

#[tokio::test]
async fn forward_auth_denials_and_redirects_reach_the_client_as_they_are() {
    let auth = auth_service(Arc::new(Mutex::new(Vec::new()))).await;
    let mut backend = EchoBackend::start().await;
    let gate = forward_gate(auth, backend.addr).await;
    let resp = gate
        .raw(upgrade_request("/sso", "Authorization: Bearer nobody\r\n").as_bytes())
        .await;
    assert_eq!(status_of(&resp), 401, "{resp}");
    assert!(
        resp.contains("Www-Authenticate: Cookie realm=\"sso\""),
        "{resp}"
    );
    assert!(resp.ends_with("please log in"), "{resp}");
    let resp = gate
        .raw(upgrade_request("/sso", "Authorization: Bearer redirect\r\n").as_bytes())
        .await;
    assert_eq!(status_of(&resp), 302, "{resp}");
    assert!(
        resp.contains("Location: https://login.test/?next=/sso\r\n"),
        "{resp}"
    );
    assert!(resp.contains("Set-Cookie: state=xyz; Path=/\r\n"), "{resp}");
    for who in ["slow", "broken"] {
        let resp = gate
            .raw(upgrade_request("/sso", &format!("Authorization: Bearer {who}\r\n")).as_bytes())
            .await;
        assert_eq!(status_of(&resp), 503, "{who}: {resp}");
        assert!(resp.contains("Retry-After: "), "{resp}");
    }
    nothing_reached(&mut backend).await;
    let resp = gate
        .raw(b"GET /sso/page HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer nobody\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(
        status_of(&resp),
        401,
        "plain requests are guarded too: {resp}"
    );
}

#[tokio::test]
async fn forward_auth_expires_header_closes_the_tunnel() {
    let auth = auth_service(Arc::new(Mutex::new(Vec::new()))).await;
    let mut backend = EchoBackend::start().await;
    let gate = forward_gate(auth, backend.addr).await;
    let (mut ws, _) = gate
        .ws("/sso", &[("Authorization", "Bearer brief")])
        .await
        .unwrap();
    let started = Instant::now();
    match next_data(&mut ws).await {
        Message::Close(Some(c)) => {
            assert_eq!(
                (u16::from(c.code), c.reason.as_str()),
                (1008, "token expired")
            );
        }
        other => panic!("expected the expiry close, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    let c = backend.next_close().await.expect("the backend is told");
    assert_eq!(
        (u16::from(c.code), c.reason.as_str()),
        (1001, "token expired")
    );
}

#[test]
fn check_refuses_broken_auth_configurations_with_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = []\nlisten_plain = [\"127.0.0.1:1\"]\n\
         [[auth]]\nname = \"a\"\ntype = \"jwt\"\njwks_file = \"k.json\"\njwks_url = \"https://id/jwks\"\n\
         [[auth]]\nname = \"b\"\ntype = \"jwt\"\njwks_file = \"k.json\"\nalgorithms = [\"RS256\", \"none\"]\n\
         [[auth]]\nname = \"c\"\ntype = \"jwt\"\njwks_file = \"k.json\"\nalgorithms = [\"HS256\"]\n\
         [[auth]]\nname = \"d\"\ntype = \"jwt\"\njwks_file = \"k.json\"\nexpired_close_code = 999\n\
         [[routes]]\npath = \"/x\"\nbackends = [\"127.0.0.1:2\"]\nauth = \"nobody\"\n",
    )
    .unwrap();
    let text = check_refuses(&path);
    for want in [
        "auth.toml:8: auth[0].jwks_url: give jwks_file or jwks_url, not both",
        "auth.toml:13: auth[1].algorithms: \"none\"",
        "auth[2].algorithms: HS256, HS384 and HS512 need secret_file",
        "auth.toml:23: auth[3].expired_close_code: 999 is not a close code",
        "auth.toml:27: routes[0].auth: no [[auth]] is named \"nobody\"",
        "k.json: cannot read",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
}
