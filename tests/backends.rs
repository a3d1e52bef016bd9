//! Backends for long-lived connections: least connections and weights over live tunnel counts
//! that survive reloads, caps, health checks that mark backends down and up (and close their
//! tunnels when asked), TLS to the backend, and PROXY v2 toward it.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A WebSocket echo backend that also answers `GET /healthz` with a status the test sets,
/// counts the tunnels it accepted, optionally speaks TLS, and records the PROXY v2 header a
/// connection starts with.
struct Backend {
    addr: SocketAddr,
    health: Arc<AtomicU16>,
    tunnels: Arc<AtomicUsize>,
    proxied: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Backend {
    async fn start() -> Backend {
        Backend::start_with(None, false).await
    }

    async fn start_with(tls: Option<Arc<rustls::ServerConfig>>, proxy: bool) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let health = Arc::new(AtomicU16::new(200));
        let tunnels = Arc::new(AtomicUsize::new(0));
        let proxied = Arc::new(Mutex::new(Vec::new()));
        let (h, t, p) = (health.clone(), tunnels.clone(), proxied.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (h, t, p, tls) = (h.clone(), t.clone(), p.clone(), tls.clone());
                tokio::spawn(async move {
                    if proxy {
                        match read_proxy_v2(&mut s).await {
                            Some(Some(a)) => p.lock().unwrap().push(a),
                            Some(None) => {}
                            None => return,
                        }
                    }
                    match tls {
                        Some(cfg) => {
                            let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await else {
                                return;
                            };
                            serve(s, h, t).await;
                        }
                        None => serve(s, h, t).await,
                    }
                });
            }
        });
        Backend {
            addr,
            health,
            tunnels,
            proxied,
        }
    }

    fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }
}

/// Reads a PROXY v2 header: `Some(Some(addr))` for PROXY, `Some(None)` for LOCAL.
async fn read_proxy_v2(s: &mut tokio::net::TcpStream) -> Option<Option<SocketAddr>> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).await.ok()?;
    assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n", "a PROXY v2 signature");
    let mut body = vec![0u8; u16::from_be_bytes([head[14], head[15]]) as usize];
    s.read_exact(&mut body).await.ok()?;
    if head[12] == 0x20 {
        return Some(None);
    }
    assert_eq!(head[13], 0x11, "TCP over IPv4");
    let ip = std::net::Ipv4Addr::new(body[0], body[1], body[2], body[3]);
    Some(Some(SocketAddr::new(
        ip.into(),
        u16::from_be_bytes([body[8], body[9]]),
    )))
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    health: Arc<AtomicU16>,
    tunnels: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    if head.starts_with("GET /healthz ") {
        let code = health.load(Ordering::SeqCst);
        let _ = s
            .write_all(
                format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
        return;
    }
    if !head.to_ascii_lowercase().contains("upgrade: websocket") {
        let body = "plain";
        let _ = s
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let _ = s.flush().await;
        let _ = read_all(&mut s).await;
        return;
    }
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    use base64::Engine;
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(h.finalize());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if s.write_all(resp.as_bytes()).await.is_err() {
        return;
    }
    tunnels.fetch_add(1, Ordering::SeqCst);
    let mut ws = tokio_tungstenite::WebSocketStream::from_partially_read(
        s,
        buf[end..].to_vec(),
        Role::Server,
        None,
    )
    .await;
    while let Some(Ok(m)) = ws.next().await {
        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
            break;
        }
    }
}

fn backends_route(path: &str, backends: &str, extra: &str) -> String {
    format!(
        "[[routes]]\npath = \"{path}\"\nbackends = [{backends}]\nallow_missing_origin = true\n{extra}\n"
    )
}

async fn echo_once(ws: &mut Ws) {
    ws.send(Message::text("ping?")).await.unwrap();
    assert_eq!(next_data(ws).await.into_text().unwrap().as_str(), "ping?");
}

/// Opens `n` tunnels on `path`, each echoing once.
async fn open(gate: &Gate, path: &str, n: usize) -> Vec<Ws> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (mut ws, _) = gate.ws(path, &[]).await.unwrap();
        echo_once(&mut ws).await;
        out.push(ws);
    }
    out
}

/// The value of a metric line, 0 when absent.
fn metric(m: &str, line: &str) -> f64 {
    m.lines()
        .find(|l| l.starts_with(line))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `/metrics` has `line` with `value` (health is decided in the background).
async fn until_metric(gate: &Gate, line: &str, value: f64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if metric(&gate.metrics().await, line) == value {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{line} never became {value}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn least_conn_sends_new_tunnels_to_the_idle_backend_and_counts_survive_a_reload() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let only_a = backends_route(
        "/chat",
        &format!("\"{}\"", a.addr),
        "balance = \"least_conn\"",
    );
    let gate = Gate::start(BASE, &only_a).await;
    let held = open(&gate, "/chat", 20).await;
    assert_eq!(a.tunnels(), 20);
    let text = std::fs::read_to_string(&gate.config_path).unwrap();
    std::fs::write(
        &gate.config_path,
        text.replace(
            &format!("\"{}\"]", a.addr),
            &format!("\"{}\", \"{}\"]", a.addr, b.addr),
        ),
    )
    .unwrap();
    gate.handle.reload().await.unwrap();
    let more = open(&gate, "/chat", 20).await;
    assert_eq!(
        (a.tunnels(), b.tunnels()),
        (20, 20),
        "A kept its count across the reload"
    );
    let m = gate.metrics().await;
    for (backend, n) in [(a.addr, 20.0), (b.addr, 20.0)] {
        let line = format!("wsgate_backend_tunnels_open{{route=\"/chat\",backend=\"{backend}\"}}");
        assert_eq!(metric(&m, &line), n, "{m}");
    }
    drop((held, more));
}

#[tokio::test]
async fn weights_split_tunnels_in_proportion() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let r = backends_route(
        "/w",
        &format!("\"{}\", {{ address = \"{}\", weight = 3 }}", a.addr, b.addr),
        "balance = \"least_conn\"",
    );
    let gate = Gate::start(BASE, &r).await;
    let _held = open(&gate, "/w", 40).await;
    assert_eq!((a.tunnels(), b.tunnels()), (10, 30));
}

#[tokio::test]
async fn a_backend_at_its_cap_gets_no_tunnel_and_all_full_is_503() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let r = backends_route(
        "/cap",
        &format!(
            "{{ address = \"{}\", max_tunnels = 1 }}, {{ address = \"{}\", max_tunnels = 2 }}",
            a.addr, b.addr
        ),
        "",
    );
    let gate = Gate::start(BASE, &r).await;
    let _held = open(&gate, "/cap", 3).await;
    assert_eq!((a.tunnels(), b.tunnels()), (1, 2));
    let resp = gate.raw(upgrade_request("/cap", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert!(resp.contains("Retry-After: "), "{resp}");
    let m = gate.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wsgate_handshake_rejections_total{reason=\"backend_full\"}"
        ),
        1.0,
        "{m}"
    );
}

const HEALTH: &str = "[routes.health]\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n\
                      healthy_threshold = 2\nunhealthy_threshold = 2\n";

#[tokio::test]
async fn a_failing_backend_is_marked_down_skipped_and_marked_up_again() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let r = backends_route("/h", &format!("\"{}\", \"{}\"", a.addr, b.addr), HEALTH);
    let gate = Gate::start(BASE, &r).await;
    let up_b = format!("wsgate_backend_up{{route=\"/h\",backend=\"{}\"}}", b.addr);
    until_metric(
        &gate,
        &format!(
            "wsgate_backend_health_checks_total{{route=\"/h\",backend=\"{}\",result=\"ok\"}}",
            b.addr
        ),
        1.0,
        Duration::from_secs(3),
    )
    .await;
    b.health.store(500, Ordering::SeqCst);
    let took = until_metric(&gate, &up_b, 0.0, Duration::from_secs(3)).await;
    assert!(
        took < Duration::from_millis(2 * 200 + 800),
        "marked down after {took:?}"
    );
    let before = b.tunnels();
    let _held = open(&gate, "/h", 6).await;
    assert_eq!(b.tunnels(), before, "a down backend gets no new tunnel");
    b.health.store(200, Ordering::SeqCst);
    until_metric(&gate, &up_b, 1.0, Duration::from_secs(3)).await;
    let _more = open(&gate, "/h", 6).await;
    assert!(b.tunnels() > before, "back in rotation once up");
}

#[tokio::test]
async fn on_backend_down_close_ends_its_tunnels_with_1012_spread_and_leaves_the_others() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let settings = BASE.replace("drain_spread = \"0s\"", "drain_spread = \"1s\"");
    let r = backends_route(
        "/h",
        &format!("\"{}\", \"{}\"", a.addr, b.addr),
        &format!("on_backend_down = \"close\"\n{HEALTH}"),
    );
    let gate = Gate::start(&settings, &r).await;
    let held = open(&gate, "/h", 12).await;
    assert_eq!((a.tunnels(), b.tunnels()), (6, 6));
    b.health.store(500, Ordering::SeqCst);
    // Every tunnel waits for a Close at once: the down backend's come spread over the window.
    let waits = held.into_iter().map(|mut ws| async move {
        match tokio::time::timeout(Duration::from_secs(3), next_data(&mut ws)).await {
            Ok(Message::Close(Some(c))) => {
                Err((Instant::now(), u16::from(c.code), c.reason.to_string()))
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => Ok(ws),
        }
    });
    let (mut still, mut closes) = (Vec::new(), Vec::new());
    for r in futures_util::future::join_all(waits).await {
        match r {
            Ok(ws) => still.push(ws),
            Err(c) => closes.push(c),
        }
    }
    assert_eq!(closes.len(), 6, "the down backend's six tunnels closed");
    assert!(
        closes
            .iter()
            .all(|(_, c, r)| *c == 1012 && r == "service restart"),
        "{closes:?}"
    );
    let first = closes.iter().map(|c| c.0).min().unwrap();
    let last = closes.iter().map(|c| c.0).max().unwrap();
    assert!(
        last - first > Duration::from_millis(150),
        "spread over the window: {:?}",
        last - first
    );
    assert_eq!(still.len(), 6, "the healthy backend's tunnels stay");
    for ws in &mut still {
        echo_once(ws).await;
    }
}

#[tokio::test]
async fn every_backend_down_is_503_at_once_without_a_connect() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let settings = format!("{BASE}\n[upstream]\nconnect_timeout = \"5s\"\n");
    let r = backends_route("/h", &format!("\"{}\", \"{}\"", a.addr, b.addr), HEALTH);
    let gate = Gate::start(&settings, &r).await;
    a.health.store(503, Ordering::SeqCst);
    b.health.store(503, Ordering::SeqCst);
    for x in [a.addr, b.addr] {
        until_metric(
            &gate,
            &format!("wsgate_backend_up{{route=\"/h\",backend=\"{x}\"}}"),
            0.0,
            Duration::from_secs(3),
        )
        .await;
    }
    let started = Instant::now();
    let resp = gate.raw(upgrade_request("/h", "").as_bytes()).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert!(resp.contains("Retry-After: "), "{resp}");
    let m = gate.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wsgate_handshake_rejections_total{reason=\"no_healthy_backend\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn tcp_health_checks_mark_a_dead_backend_down() {
    let live = Backend::start().await;
    let dead = dead_addr().await;
    let r = backends_route(
        "/t",
        &format!("\"{}\", \"{dead}\"", live.addr),
        "[routes.health]\ninterval = \"200ms\"\nunhealthy_threshold = 1\n",
    );
    let gate = Gate::start(BASE, &r).await;
    until_metric(
        &gate,
        &format!("wsgate_backend_up{{route=\"/t\",backend=\"{dead}\"}}"),
        0.0,
        Duration::from_secs(3),
    )
    .await;
    let _held = open(&gate, "/t", 4).await;
    assert_eq!(live.tunnels(), 4);
}

fn backend_tls(pki: &Pki, name: &str) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    let (cert, key) = pki.issue(name, &[name]);
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
async fn tls_to_the_backend_verifies_its_certificate_and_name() {
    let backend_pki = Pki::new();
    let tls = backend_tls(&backend_pki, "chat.internal");
    let backend = Backend::start_with(Some(tls), false).await;
    let ca = backend_pki.dir.path().join("backend-ca.pem");
    let ca_pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64_lines(&backend_pki.ca_der)
    );
    std::fs::write(&ca, ca_pem).unwrap();
    let other = Pki::new();
    let wrong_ca = other.dir.path().join("other-ca.pem");
    std::fs::write(
        &wrong_ca,
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64_lines(&other.ca_der)
        ),
    )
    .unwrap();
    let tls_route = |path: &str, ca: &std::path::Path, name: &str| {
        backends_route(
            path,
            &format!("\"{}\"", backend.addr),
            &format!(
                "backend_tls = true\nbackend_ca = \"{}\"\nbackend_server_name = \"{name}\"",
                ca.display()
            ),
        )
    };
    let routes = format!(
        "{}{}{}",
        tls_route("/good", &ca, "chat.internal"),
        tls_route("/wrong-ca", &wrong_ca, "chat.internal"),
        tls_route("/wrong-name", &ca, "other.internal"),
    );
    let gate = Gate::start(BASE, &routes).await;
    let (mut ws, _) = gate.ws("/good", &[]).await.unwrap();
    echo_once(&mut ws).await;
    for path in ["/wrong-ca", "/wrong-name"] {
        let resp = gate.raw(upgrade_request(path, "").as_bytes()).await;
        assert_eq!(status_of(&resp), 502, "{path}: {resp}");
    }
    let m = gate.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wsgate_handshake_rejections_total{reason=\"backend_tls\"}"
        ),
        2.0,
        "{m}"
    );
    let resp = gate
        .raw(b"GET /good/page HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(
        status_of(&resp),
        200,
        "plain HTTP over the same TLS: {resp}"
    );
    assert!(resp.ends_with("plain"), "{resp}");
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    b.as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_proxy_v2_header_names_the_client_to_the_backend() {
    let backend = Backend::start_with(None, true).await;
    let r = backends_route(
        "/p",
        &format!("\"{}\"", backend.addr),
        "send_proxy_protocol = \"v2\"",
    );
    let gate = Gate::start(BASE, &r).await;
    let mut s = gate.tls(None).await;
    let me = s.get_ref().0.local_addr().unwrap();
    s.write_all(upgrade_request("/p", "").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let mut s2 = gate.tls(None).await;
    let me2 = s2.get_ref().0.local_addr().unwrap();
    s2.write_all(b"GET /p/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_all(&mut s2).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    let seen = backend.proxied.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![me, me2],
        "the tunnel's and the request's client, address and port"
    );
}

#[tokio::test]
async fn a_backend_that_stalls_its_tls_handshake_is_a_tls_failure() {
    // Accepts and then says nothing: the TCP connect succeeds, the TLS handshake never ends.
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = stall.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stall.accept().await {
            held.push(s);
        }
    });
    let settings = format!("{BASE}[upstream]\nconnect_timeout = \"300ms\"\n");
    let r = backends_route("/stall", &format!("\"{addr}\""), "backend_tls = true");
    let gate = Gate::start(&settings, &r).await;
    let started = std::time::Instant::now();
    let resp = gate.raw(upgrade_request("/stall", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 502, "{resp}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by connect_timeout"
    );
    let m = gate.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wsgate_handshake_rejections_total{reason=\"backend_tls\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_backend_marked_down_is_up_again_when_a_reload_removes_the_checks() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let both = format!("\"{}\", \"{}\"", a.addr, b.addr);
    let gate = Gate::start(BASE, &backends_route("/h", &both, HEALTH)).await;
    let up_b = format!("wsgate_backend_up{{route=\"/h\",backend=\"{}\"}}", b.addr);
    b.health.store(500, Ordering::SeqCst);
    until_metric(&gate, &up_b, 0.0, Duration::from_secs(3)).await;
    let text = std::fs::read_to_string(&gate.config_path)
        .unwrap()
        .replace(HEALTH, "");
    std::fs::write(&gate.config_path, text).unwrap();
    gate.handle.reload().await.unwrap();
    // Nothing checks it any more, so nothing else would ever bring it back.
    assert_eq!(metric(&gate.metrics().await, &up_b), 1.0);
    let before = b.tunnels();
    let _held = open(&gate, "/h", 6).await;
    assert!(b.tunnels() > before, "in rotation again");
    let (_, list) = http_get(gate.admin.unwrap(), "/backends").await;
    assert!(
        list.contains("\"health\":null") && !list.contains("\"down\""),
        "{list}"
    );
}
