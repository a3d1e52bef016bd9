//! Test support: a test CA and certificates, a gateway on ephemeral loopback ports, real
//! backends (a tungstenite echo server, raw TCP servers, a hyper HTTP server) and real clients
//! (tungstenite over rustls trusting the test CA, and a raw TLS client for exact bytes).
#![allow(dead_code, missing_docs, unreachable_pub, clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A test CA with leaf certificates written to a temporary folder.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_der: CertificateDer<'static>,
    /// The CA certificate in PEM, for `client_ca` bundles.
    pub ca_pem: String,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new() -> Pki {
        Pki::named("wsgate test CA")
    }

    /// A CA with its own name (two CAs of one name differ only by key: a certificate of one
    /// then fails the other's signature check rather than its issuer lookup).
    pub fn named(cn: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Pki {
            dir,
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            ca_params: params,
            ca_key,
        }
    }

    /// Issues a leaf for `names` and writes `<stem>.pem` and `<stem>-key.pem`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.path().join(format!("{stem}.pem"));
        let key_path = self.dir.path().join(format!("{stem}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// A client certificate for `cn` signed by this CA: with `eku` as its extended key
    /// usages (none: no extension), expired when `expired`.
    pub fn issue_client(
        &self,
        cn: &str,
        eku: Vec<rcgen::ExtendedKeyUsagePurpose>,
        expired: bool,
    ) -> (
        CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = eku;
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (
            cert.der().clone(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    /// A client trusting this CA that presents `cert` when asked.
    pub fn client_config_presenting(
        &self,
        cert: Option<(
            CertificateDer<'static>,
            rustls::pki_types::PrivateKeyDer<'static>,
        )>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        Arc::new(match cert {
            Some((c, k)) => b.with_client_auth_cert(vec![c], k).unwrap(),
            None => b.with_no_client_auth(),
        })
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config_with(rustls::crypto::ring::default_provider())
    }

    /// A client trusting the test CA with the given crypto (key exchange groups, suites).
    pub fn client_config_with(
        &self,
        provider: rustls::crypto::CryptoProvider,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }
}

/// A running gateway on ephemeral ports.
pub struct Gate {
    pub pki: Pki,
    pub tls_addr: SocketAddr,
    pub plain_addr: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub handle: wsgate::Handle,
    pub config_path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
}

/// Default test settings: generous limits so tests are not throttled by accident.
pub const BASE: &str = r#"
[server]
listen = ["127.0.0.1:0"]
handshake_timeout = "5s"
shutdown_grace = "2s"
drain_spread = "0s"
[limits]
per_ip_rate = 100000
per_ip_burst = 100000
per_ip_max_connections = 100000
[admin]
listen = "127.0.0.1:0"
"#;

impl Gate {
    /// Starts a gateway whose config is `BASE`-like text given whole (with `{cert}`/`{key}`
    /// filled in) plus `routes`.
    pub async fn start(settings: &str, routes: &str) -> Gate {
        let pki = Pki::new();
        let (cert, key) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
        let text = format!(
            "{settings}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{routes}\n",
            cert.display(),
            key.display()
        );
        Gate::start_with(pki, &text).await
    }

    pub async fn start_with(pki: Pki, text: &str) -> Gate {
        let config_path = pki.dir.path().join("wsgate.toml");
        std::fs::write(&config_path, text).unwrap();
        let config =
            wsgate::config::Config::load(&config_path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let gw = wsgate::Gateway::bind(config).await.unwrap();
        let addrs = gw.local_addrs();
        let tls_addr = addrs
            .iter()
            .find(|a| a.1)
            .map(|a| a.0)
            .unwrap_or(addrs[0].0);
        let plain_addr = addrs.iter().find(|a| !a.1).map(|a| a.0);
        let admin = gw.admin_addr();
        let handle = gw.handle();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done = tokio::spawn(gw.run(async move {
            let _ = rx.await;
        }));
        Gate {
            pki,
            tls_addr,
            plain_addr,
            admin,
            handle,
            config_path,
            stop: Some(tx),
            done: Some(done),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("wss://localhost:{}{path}", self.tls_addr.port())
    }

    /// Opens a wss connection with the given extra headers.
    pub async fn ws(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
        self.ws_with(path, headers, None).await
    }

    pub async fn ws_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        config: Option<tungstenite::protocol::WebSocketConfig>,
    ) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let mut req = self.url(path).into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let tcp = TcpStream::connect(self.tls_addr).await.unwrap();
        let connector = tokio_tungstenite::Connector::Rustls(self.pki.client_config());
        tokio_tungstenite::client_async_tls_with_config(req, tcp, config, Some(connector)).await
    }

    /// Sends raw bytes over TLS and reads until the gateway closes (or `limit` elapses).
    pub async fn raw(&self, bytes: &[u8]) -> String {
        let mut s = self.tls(None).await;
        s.write_all(bytes).await.unwrap();
        read_all(&mut s).await
    }

    pub async fn tls(&self, sni: Option<&str>) -> tokio_rustls::client::TlsStream<TcpStream> {
        tls_connect(
            self.tls_addr,
            self.pki.client_config(),
            sni.unwrap_or("localhost"),
        )
        .await
        .unwrap()
    }

    /// Starts draining with the given grace (as SIGTERM would) and returns when the gateway is done.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(d) = self.done.take() {
            d.await.unwrap();
        }
    }

    pub async fn metrics(&self) -> String {
        let addr = self.admin.expect("admin listener");
        http_get(addr, "/metrics").await.1
    }
}

pub async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

/// Reads until EOF, a reset, or 5 s.
pub async fn read_all<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `wsgate --check` on `path`, which must refuse it (exit 1); returns what it printed.
pub fn check_refuses(path: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    text
}

/// A plain HTTP/1.1 GET, returning status and body (closes the connection after).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let text = read_all(&mut s).await;
    (
        status_of(&text),
        text.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    )
}

pub fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A handshake request for `path` with the given extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// What an echo backend saw.
#[derive(Debug)]
pub enum Seen {
    Request(http::HeaderMap, String),
    Message(Message),
    Close(Option<CloseFrame>),
    Gone,
}

/// A tungstenite echo backend. It echoes text and binary messages, picks the first offered
/// subprotocol, reports what it saw, closes with the code it is sent `close:<code>:<reason>`,
/// and answers `burst:<n>` with n messages `b0`, `b1`... of its own.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub seen: mpsc::UnboundedReceiver<Seen>,
}

impl EchoBackend {
    pub async fn start() -> EchoBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(echo_conn(s, tx));
            }
        });
        EchoBackend { addr, seen }
    }

    /// The next event other than messages and requests filtered by `pred`.
    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
            .await
            .expect("backend event in time")
            .expect("backend alive")
    }

    /// Waits for the next Close (or disconnect) the backend sees, skipping other events.
    pub async fn next_close(&mut self) -> Option<CloseFrame> {
        loop {
            match self.next().await {
                Seen::Close(c) => return c,
                Seen::Gone => return None,
                _ => {}
            }
        }
    }
}

/// A tungstenite echo backend on a Unix socket at `path`.
pub async fn unix_echo_backend(path: &std::path::Path) -> mpsc::UnboundedReceiver<Seen> {
    let l = tokio::net::UnixListener::bind(path).unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(echo_conn(s, tx.clone()));
        }
    });
    seen
}

async fn echo_conn<S>(s: S, tx: mpsc::UnboundedSender<Seen>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let tx2 = tx.clone();
    let cb = move |req: &Request, mut resp: Response| {
        let _ = tx2.send(Seen::Request(req.headers().clone(), req.uri().to_string()));
        if let Some(p) = req.headers().get("sec-websocket-protocol") {
            let first = p
                .to_str()
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .trim()
                .to_string();
            resp.headers_mut()
                .insert("sec-websocket-protocol", first.parse().unwrap());
        }
        Ok(resp)
    };
    let cfg = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(32 << 20));
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(s, cb, Some(cfg)).await else {
        return;
    };
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Close(c)) => {
                let _ = tx.send(Seen::Close(c));
                // tungstenite answers the close itself; drain until it is done.
                while ws.next().await.is_some() {}
                return;
            }
            Ok(Message::Text(t)) if t.starts_with("close:") => {
                let mut it = t.splitn(3, ':').skip(1);
                let code: u16 = it.next().unwrap().parse().unwrap();
                let reason = it.next().unwrap_or("").to_string();
                let _ = ws
                    .send(Message::Close(Some(CloseFrame {
                        code: code.into(),
                        reason: reason.into(),
                    })))
                    .await;
                while let Some(m) = ws.next().await {
                    if let Ok(Message::Close(c)) = m {
                        let _ = tx.send(Seen::Close(c));
                    }
                }
                return;
            }
            Ok(Message::Text(t)) if t.starts_with("burst:") => {
                // The backend talks on its own: N messages at once.
                let n: usize = t[6..].parse().unwrap();
                for i in 0..n {
                    if ws.send(Message::text(format!("b{i}"))).await.is_err() {
                        break;
                    }
                }
            }
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                let _ = tx.send(Seen::Message(m.clone()));
                if ws.send(m).await.is_err() {
                    break;
                }
            }
            Ok(m) => {
                let _ = tx.send(Seen::Message(m));
            }
            Err(_) => break,
        }
    }
    let _ = tx.send(Seen::Gone);
}

/// A raw TCP backend that reads a request head and answers with `response` verbatim.
pub async fn raw_backend(response: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(response.as_bytes()).await;
                let _ = read_all(&mut s).await;
            });
        }
    });
    addr
}

/// An address nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Reads the next data message, answering nothing else.
pub async fn next_data(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("message in time")
            .expect("stream open")
            .expect("no error");
        if m.is_text() || m.is_binary() || m.is_close() {
            return m;
        }
    }
}

pub fn route(path: &str, backend: SocketAddr, extra: &str) -> String {
    format!(
        "[[routes]]\npath = \"{path}\"\nbackends = [\"{backend}\"]\nallow_missing_origin = true\nallowed_origins = [\"https://good.example\"]\n{extra}\n"
    )
}

/// A wss connection past a raw handshake, for clients that misbehave on purpose.
pub struct RawWs {
    pub s: tokio_rustls::client::TlsStream<TcpStream>,
    pub buf: Vec<u8>,
}

impl RawWs {
    pub async fn connect(gate: &Gate, path: &str) -> RawWs {
        let mut s = gate.tls(None).await;
        s.write_all(upgrade_request(path, "").as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed during handshake: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..end);
        RawWs { s, buf }
    }

    /// Reads the next frame (server frames are unmasked): opcode and payload; `None` at EOF.
    pub async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(f) = take_frame(&mut self.buf) {
                return Some(f);
            }
            match self.s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }
}

/// The first whole server frame (unmasked) in `buf`, taken off it: opcode and payload.
pub fn take_frame(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, hl) = match (buf[1] & 0x7f) as usize {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        n if n < 126 => (n, 2),
        _ => return None,
    };
    if buf.len() < hl + len {
        return None;
    }
    let op = buf[0] & 0x0f;
    let payload = buf[hl..hl + len].to_vec();
    buf.drain(..hl + len);
    Some((op, payload))
}

/// A masked client frame.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// The close code in a Close frame's payload.
pub fn code_of(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// The metrics once every tunnel has ended (a tunnel's close counters are added as it ends).
pub async fn metrics_when_no_tunnel_is_open(gate: &Gate) -> String {
    tokio::time::timeout(
        Duration::from_secs(10),
        gate.handle.wait_until(|a| a.tunnels == 0),
    )
    .await
    .expect("every tunnel ends");
    gate.metrics().await
}

/// A frame as a raw backend saw it: opcode, mask key, unmasked payload.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload: Vec<u8>,
}

/// A backend that answers the Upgrade by hand and reports every frame exactly as it arrived,
/// mask keys included (tungstenite hides them).
pub async fn raw_ws_backend() -> (SocketAddr, mpsc::UnboundedReceiver<RawFrame>) {
    use base64::Engine;
    use sha1::Digest;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
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
                buf.drain(..end);
                let key = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| v.trim().to_string())
                    })
                    .unwrap_or_default();
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
                loop {
                    while let Some((frame, used)) = parse_raw_frame(&buf) {
                        buf.drain(..used);
                        let _ = tx.send(frame);
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn parse_raw_frame(b: &[u8]) -> Option<(RawFrame, usize)> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask = if masked {
        let m: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let mut payload = b.get(at..at + len)?.to_vec();
    if let Some(m) = mask {
        for (i, x) in payload.iter_mut().enumerate() {
            *x ^= m[i % 4];
        }
    }
    Some((
        RawFrame {
            opcode: b[0] & 0x0f,
            mask,
            payload,
        },
        at + len,
    ))
}
