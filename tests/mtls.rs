//! Client certificates: verified at the handshake (required and optional modes, per SNI),
//! required per route, the identity forwarded in `X-Forwarded-Client-Cert` and never taken
//! from the client, a reload that swaps the CA bundle, and resumption keeping the identity.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rcgen::ExtendedKeyUsagePurpose as Eku;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};

type Cert = (CertificateDer<'static>, PrivateKeyDer<'static>);
type TlsWs = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

fn hex_sha256(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `pem` as a bundle in the gateway's folder.
fn bundle(pki: &Pki, name: &str, pem: &str) -> std::path::PathBuf {
    let p = pki.dir.path().join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

/// A gateway whose `[tls]` gets `tls_extra` (client CA settings) and whose config ends with
/// `rest` (SNI entries, routes).
async fn gate(pki: Pki, tls_extra: &str, rest: &str) -> Gate {
    let (cert, key) = pki.issue("localhost", &["localhost", "devices.localhost"]);
    let text = format!(
        "{BASE}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{tls_extra}\n{rest}\n",
        cert.display(),
        key.display()
    );
    Gate::start_with(pki, &text).await
}

/// A gateway requiring client certificates of its own CA on every connection, with `/chat`
/// on `backend`; also the bundle's path.
async fn required_gate(backend: SocketAddr) -> (Gate, std::path::PathBuf) {
    let pki = Pki::new();
    let ca = bundle(&pki, "devices-ca.pem", &pki.ca_pem.clone());
    let g = gate(
        pki,
        &format!(
            "client_ca = \"{}\"\nclient_auth = \"required\"",
            ca.display()
        ),
        &route("/chat", backend, ""),
    )
    .await;
    (g, ca)
}

/// TLS with `client` to the gateway under `sni`, then a WebSocket upgrade of `path` with
/// `headers`.
async fn ws(
    gate: &Gate,
    client: Arc<rustls::ClientConfig>,
    sni: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<TlsWs, String> {
    use tungstenite::client::IntoClientRequest;
    let tls = tls_connect(gate.tls_addr, client, sni)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let mut req = format!("wss://{sni}:{}{path}", gate.tls_addr.port())
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    tokio_tungstenite::client_async(req, tls)
        .await
        .map(|x| x.0)
        .map_err(|e| format!("{e:?}"))
}

async fn echo(ws: &mut TlsWs, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), text);
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected the echo, got {other:?}"),
        }
    }
}

/// The `X-Forwarded-Client-Cert` values the backend saw on its next upgrade.
async fn xfcc_seen(backend: &mut EchoBackend) -> Vec<String> {
    loop {
        if let Seen::Request(h, _) = backend.next().await {
            return h
                .get_all("x-forwarded-client-cert")
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
        }
    }
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().unwrap())
}

fn valid(pki: &Pki, cn: &str) -> Cert {
    pki.issue_client(cn, vec![Eku::ClientAuth], false)
}

#[tokio::test]
async fn required_mode_refuses_bad_certificates_and_forwards_the_valid_ones_identity() {
    let mut backend = EchoBackend::start().await;
    let (g, _) = required_gate(backend.addr).await;
    let foreign = Pki::named("another CA");
    let cases: Vec<(&str, Option<Cert>, rustls::AlertDescription)> = vec![
        ("none", None, rustls::AlertDescription::CertificateRequired),
        (
            "expired",
            Some(g.pki.issue_client("old", vec![Eku::ClientAuth], true)),
            rustls::AlertDescription::CertificateExpired,
        ),
        (
            "foreign",
            Some(valid(&foreign, "stranger")),
            rustls::AlertDescription::UnknownCA,
        ),
        (
            "server usage only",
            Some(g.pki.issue_client("server", vec![Eku::ServerAuth], false)),
            rustls::AlertDescription::UnsupportedCertificate,
        ),
    ];
    for (what, cert, alert) in cases {
        let err = ws(
            &g,
            g.pki.client_config_presenting(cert),
            "localhost",
            "/chat",
            &[],
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{what}: served"));
        assert!(
            err.contains(&format!("AlertReceived({alert:?})")),
            "{what}: expected the {alert:?} alert, got {err}"
        );
    }
    let m = g.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wsgate_tls_handshake_failures_total{reason=\"client_cert\"}"
        ),
        4,
        "{m}"
    );

    let (leaf, key) = valid(&g.pki, "device-1");
    let hash = hex_sha256(&leaf);
    let mut ok = ws(
        &g,
        g.pki.client_config_presenting(Some((leaf, key))),
        "localhost",
        "/chat",
        &[(
            "X-Forwarded-Client-Cert",
            "Hash=forged;Subject=\"CN=admin\"",
        )],
    )
    .await
    .unwrap();
    echo(&mut ok, "from a device").await;
    assert_eq!(
        xfcc_seen(&mut backend).await,
        vec![format!("Hash={hash};Subject=\"CN=device-1\"")],
        "the gateway's header only, never the client's"
    );
}

/// A plain HTTP backend answering every request with the `X-Forwarded-Client-Cert` values it
/// got, one per line, in its body.
async fn xfcc_http_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let body: String = head
                    .lines()
                    .filter_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
                    .map(|v| format!("{v}\n"))
                    .collect();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

async fn plain_get(g: &Gate, client: Arc<rustls::ClientConfig>, path: &str) -> String {
    let mut s = tls_connect(g.tls_addr, client, "localhost").await.unwrap();
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Client-Cert: Hash=forged\r\nConnection: close, X-Forwarded-Client-Cert\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    read_all(&mut s).await
}

#[tokio::test]
async fn optional_mode_serves_without_a_certificate_but_not_where_a_route_requires_one() {
    let mut open = EchoBackend::start().await;
    let mut telemetry = EchoBackend::start().await;
    let http = xfcc_http_backend().await;
    let pki = Pki::new();
    let ca = bundle(&pki, "devices-ca.pem", &pki.ca_pem.clone());
    let g = gate(
        pki,
        &format!("client_ca = \"{}\"", ca.display()),
        &format!(
            "{}{}{}",
            route("/open", open.addr, ""),
            route("/telemetry", telemetry.addr, "require_client_cert = true"),
            route("/plain", http, ""),
        ),
    )
    .await;
    let anonymous = g.pki.client_config_presenting(None);
    let mut ws1 = ws(
        &g,
        anonymous.clone(),
        "localhost",
        "/open",
        &[("X-Forwarded-Client-Cert", "Hash=forged")],
    )
    .await
    .unwrap();
    echo(&mut ws1, "no certificate needed here").await;
    assert!(
        xfcc_seen(&mut open).await.is_empty(),
        "a client-sent header is removed"
    );

    let err = ws(&g, anonymous.clone(), "localhost", "/telemetry", &[])
        .await
        .unwrap_err();
    assert!(err.contains("403"), "{err}");
    let m = g.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wsgate_handshake_rejections_total{reason=\"client_cert\"}"
        ),
        1,
        "{m}"
    );
    assert!(
        telemetry.seen.try_recv().is_err(),
        "the backend was not contacted"
    );
    let body = plain_get(&g, anonymous, "/plain").await;
    assert_eq!(status_of(&body), 200);
    assert!(!body.contains("forged"), "{body}");

    // Optional means a certificate may be missing, not that a bad one passes.
    let expired = g.pki.issue_client("old", vec![Eku::ClientAuth], true);
    let err = ws(
        &g,
        g.pki.client_config_presenting(Some(expired)),
        "localhost",
        "/open",
        &[],
    )
    .await
    .unwrap_err();
    assert!(err.contains("AlertReceived(CertificateExpired)"), "{err}");

    let (leaf, key) = valid(&g.pki, "sensor-7");
    let hash = hex_sha256(&leaf);
    let device = g.pki.client_config_presenting(Some((leaf, key)));
    let mut ws2 = ws(&g, device.clone(), "localhost", "/telemetry", &[])
        .await
        .unwrap();
    echo(&mut ws2, "telemetry").await;
    assert_eq!(
        xfcc_seen(&mut telemetry).await,
        vec![format!("Hash={hash};Subject=\"CN=sensor-7\"")]
    );
    // Plain requests carry it too, the client's own removed (and its `Connection` naming the
    // header cannot take the gateway's away).
    let body = plain_get(&g, device, "/plain").await;
    assert!(
        body.ends_with(&format!("hash={hash};subject=\"cn=sensor-7\"\n")),
        "{body}"
    );
    assert!(!body.contains("forged"), "{body}");
    // The control plane names the tunnel by the certificate's common name.
    let (_, list) = http_get(g.admin.unwrap(), "/tunnels?route=/telemetry").await;
    assert!(list.contains("\"subject\":\"sensor-7\""), "{list}");
}

#[tokio::test]
async fn a_name_of_its_own_can_require_certificates_another_does_not() {
    let backend = EchoBackend::start().await;
    let pki = Pki::new();
    let ca = bundle(&pki, "devices-ca.pem", &pki.ca_pem.clone());
    let (dcert, dkey) = pki.issue("devices", &["devices.localhost"]);
    let g = gate(
        pki,
        "",
        &format!(
            "[[tls.sni]]\nserver_name = \"devices.localhost\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nclient_auth = \"required\"\n{}",
            dcert.display(),
            dkey.display(),
            ca.display(),
            route("/chat", backend.addr, "")
        ),
    )
    .await;
    let anonymous = g.pki.client_config_presenting(None);
    let mut www = ws(&g, anonymous.clone(), "localhost", "/chat", &[])
        .await
        .unwrap();
    echo(&mut www, "served without a certificate").await;
    let err = ws(&g, anonymous, "devices.localhost", "/chat", &[])
        .await
        .unwrap_err();
    assert!(err.contains("CertificateRequired"), "{err}");
    let device = g
        .pki
        .client_config_presenting(Some(valid(&g.pki, "device-2")));
    let mut d = ws(&g, device, "devices.localhost", "/chat", &[])
        .await
        .unwrap();
    echo(&mut d, "a device on its name").await;
    // The name's requirement cannot be skipped by naming it in Host only.
    let mut s = tls_connect(
        g.tls_addr,
        g.pki.client_config_presenting(None),
        "localhost",
    )
    .await
    .unwrap();
    s.write_all(
        upgrade_request("/chat", "")
            .replace("Host: localhost", "Host: devices.localhost")
            .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_all(&mut s).await;
    assert_eq!(status_of(&answer), 421, "{answer}");
}

#[tokio::test]
async fn a_reload_that_swaps_the_bundle_refuses_the_old_cas_certificates_and_keeps_tunnels() {
    let backend = EchoBackend::start().await;
    let next = Pki::named("next devices CA");
    let (g, ca) = required_gate(backend.addr).await;
    let old_device = g
        .pki
        .client_config_presenting(Some(valid(&g.pki, "old-device")));
    let mut tunnel = ws(&g, old_device.clone(), "localhost", "/chat", &[])
        .await
        .unwrap();
    echo(&mut tunnel, "before the reload").await;
    let resumed = tls_connect(g.tls_addr, old_device.clone(), "localhost")
        .await
        .unwrap();
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the old device holds a session that resumes before the reload"
    );
    drop(resumed);

    std::fs::write(&ca, &next.ca_pem).unwrap();
    g.handle.reload().await.unwrap();
    // The session the old device holds (its ticket arrived with the echo) does not carry it
    // past the new bundle: the resumption is refused and the full handshake fails.
    let err = ws(&g, old_device, "localhost", "/chat", &[])
        .await
        .unwrap_err();
    assert!(err.contains("AlertReceived(UnknownCA)"), "{err}");
    // A client of the new CA (trusting the gateway's CA as before).
    let (c, k) = valid(&next, "new-device");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(g.pki.ca_der.clone()).unwrap();
    let trusted = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![c], k)
        .unwrap(),
    );
    let mut fresh = ws(&g, trusted, "localhost", "/chat", &[]).await.unwrap();
    echo(&mut fresh, "after the reload").await;
    echo(&mut tunnel, "the open tunnel keeps echoing").await;
}

#[tokio::test]
async fn a_resumed_session_forwards_the_same_identity() {
    let mut backend = EchoBackend::start().await;
    let (g, _) = required_gate(backend.addr).await;
    let device = g
        .pki
        .client_config_presenting(Some(valid(&g.pki, "device-3")));
    let mut first = ws(&g, device.clone(), "localhost", "/chat", &[])
        .await
        .unwrap();
    echo(&mut first, "full handshake").await;
    let full = xfcc_seen(&mut backend).await;
    first.close(None).await.unwrap();

    let tls = tls_connect(g.tls_addr, device, "localhost").await.unwrap();
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the second connection resumes with the ticket"
    );
    use tungstenite::client::IntoClientRequest;
    let req = format!("wss://localhost:{}/chat", g.tls_addr.port())
        .into_client_request()
        .unwrap();
    let (mut second, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    echo(&mut second, "resumed").await;
    assert_eq!(xfcc_seen(&mut backend).await, full);
    assert_eq!(full.len(), 1);
}

#[test]
fn check_refuses_a_mode_without_a_bundle_and_an_empty_bundle_with_their_lines() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("localhost", &["localhost"]);
    let empty = bundle(&pki, "empty.pem", "");
    let path = pki.dir.path().join("wsgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_auth = \"required\"\n\
             [[tls.sni]]\nserver_name = \"devices.localhost\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            cert.display(),
            key.display(),
            cert.display(),
            key.display(),
            empty.display()
        ),
    )
    .unwrap();
    let errors = wsgate::check(&path);
    let file = path.display().to_string();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&format!("{file}:6: tls.client_auth:"))),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(
            |e| e.starts_with(&format!("{file}:11: tls.sni[0].client_ca:"))
                && e.contains("no CERTIFICATE")
        ),
        "{errors:?}"
    );
}
