//! The benchmark's load generator. One thread (it is pinned to the rig's CPU). Modes:
//!
//! - `idle URL N`: open N tunnels, print `ready`, hold them until stdin closes or says `go`.
//! - `echo URL N SIZE COUNT`: open N tunnels, print `ready`, wait for `go`, then each tunnel does
//!   COUNT closed-loop round trips of SIZE-byte binary messages.
//! - `paced URL N SIZE RATE SECS`: like echo, but all tunnels together send RATE messages a
//!   second for SECS seconds.
//! - `handshake URL CONC COUNT`: print `ready`, wait for `go`, then COUNT fresh TLS 1.3
//!   connections (no resumption) each do the WebSocket handshake and close, CONC at a time.
//! - `h2idle URL N PER_CONN` and `h2echo URL N SIZE COUNT PER_CONN`: `idle` and `echo` with
//!   the tunnels opened as WebSockets over HTTP/2 (RFC 8441 extended CONNECT), PER_CONN
//!   streams on each HTTP/2 connection.
//!
//! Results are one JSON line: counts, elapsed seconds and round-trip percentiles in µs.
//! `CA` in the environment names the PEM the proxies' certificate is trusted through; `TOKEN`,
//! when set, is sent as `Authorization: Bearer TOKEN` with every upgrade.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rustls_pki_types::pem::PemObject;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type H2Ws = WebSocketStream<h2io::H2Io>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(args));
}

async fn run(args: Vec<String>) {
    let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| usage());
    let num = |i: usize| arg(i).parse::<u64>().unwrap_or_else(|_| usage());
    let connector = connector();
    match arg(0).as_str() {
        "idle" => hold_idle("idle", open_many(&arg(1), num(2), &connector).await).await,
        "echo" => {
            let tunnels = open_many(&arg(1), num(2), &connector).await;
            echo_all("echo", tunnels, num(3) as usize, num(4)).await;
        }
        "paced" => {
            let n = num(2);
            let tunnels = open_many(&arg(1), n, &connector).await;
            let (size, rate, secs) = (num(3) as usize, num(4), num(5));
            println!("ready");
            wait_go().await;
            let started = Instant::now();
            let period = Duration::from_secs_f64(n as f64 / rate as f64);
            let until = started + Duration::from_secs(secs);
            let hists = join_all(tunnels.into_iter().enumerate().map(|(i, ws)| {
                // Stagger the tunnels evenly over one period.
                let offset = period.mul_f64(i as f64 / n as f64);
                tokio::task::spawn_local(paced_loop(ws, size, period, started + offset, until))
            }))
            .await;
            report("paced", started, hists);
        }
        "handshake" => {
            let (conc, count) = (num(2), num(3));
            let url = arg(1);
            println!("ready");
            wait_go().await;
            let started = Instant::now();
            let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let workers = (0..conc).map(|_| {
                let (url, next, connector) = (url.clone(), next.clone(), connector.clone());
                tokio::task::spawn_local(async move {
                    let mut h = hist();
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                        let t = Instant::now();
                        let mut ws = open(&url, &connector).await;
                        let _ = ws.close(None).await;
                        while let Some(Ok(_)) = ws.next().await {}
                        let _ = h.record(t.elapsed().as_micros() as u64);
                    }
                    h
                })
            });
            let hists = join_all(workers).await;
            report("handshake", started, hists);
        }
        "h2idle" => hold_idle("h2idle", h2io::open_many(&arg(1), num(2), num(3)).await).await,
        "h2echo" => {
            let tunnels = h2io::open_many(&arg(1), num(2), num(5)).await;
            echo_all("h2echo", tunnels, num(3) as usize, num(4)).await;
        }
        _ => usage(),
    }
}

/// After `go`, every tunnel does `count` closed-loop round trips of `size` bytes.
async fn echo_all<S>(mode: &str, tunnels: Vec<WebSocketStream<S>>, size: usize, count: u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    println!("ready");
    wait_go().await;
    let started = Instant::now();
    let hists = join_all(
        tunnels
            .into_iter()
            .map(|ws| tokio::task::spawn_local(closed_loop(ws, size, count))),
    )
    .await;
    report(mode, started, hists);
}

/// Holds the tunnels until `go`, then says how many are still open.
async fn hold_idle<S>(mode: &str, tunnels: Vec<WebSocketStream<S>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let n = tunnels.len();
    // Idle tunnels still read, so gateway pings are answered as a real client would.
    let readers: Vec<_> = tunnels
        .into_iter()
        .map(|mut ws| {
            tokio::task::spawn_local(async move { while let Some(Ok(_)) = ws.next().await {} })
        })
        .collect();
    println!("ready");
    wait_go().await;
    let alive = readers.iter().filter(|r| !r.is_finished()).count();
    println!(
        "{}",
        serde_json::json!({"mode": mode, "tunnels": n, "alive": alive})
    );
}

fn usage() -> ! {
    eprintln!("usage: wsbench idle|echo|paced|handshake URL ... (see the source header)");
    std::process::exit(2)
}

/// TLS 1.3 trusting `CA`, with no resumption: every handshake is a full one, as when a fleet
/// of new clients arrives.
fn client_config() -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(path) = std::env::var("CA") {
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(&path).expect("CA file") {
            roots.add(cert.expect("CA cert")).expect("CA cert");
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg
}

fn connector() -> Connector {
    Connector::Rustls(Arc::new(client_config()))
}

async fn open(url: &str, connector: &Connector) -> Ws {
    let u: tokio_tungstenite::tungstenite::http::Uri = url.parse().expect("url");
    let host = u.host().expect("host");
    let port = u.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((
        if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        },
        port,
    ))
    .await
    .expect("connect");
    let _ = tcp.set_nodelay(true);
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().expect("request");
    if let Ok(token) = std::env::var("TOKEN") {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("token header"),
        );
    }
    let (ws, _) =
        tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector.clone()))
            .await
            .expect("handshake");
    ws
}

async fn open_many(url: &str, n: u64, connector: &Connector) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n as usize);
    // A few at a time, so the proxies' accept queues and rate limits are not what is measured.
    let mut pending = Vec::new();
    for i in 0..n {
        let (url, c) = (url.to_string(), connector.clone());
        pending.push(tokio::task::spawn_local(
            async move { open(&url, &c).await },
        ));
        if pending.len() == 64 || i + 1 == n {
            out.extend(join_all(pending.drain(..)).await);
        }
    }
    out
}

async fn closed_loop<S>(mut ws: WebSocketStream<S>, size: usize, count: u64) -> Histogram<u64>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut h = hist();
    let payload = vec![0x5a; size];
    for _ in 0..count {
        let t = Instant::now();
        ws.send(Message::binary(payload.clone()))
            .await
            .expect("send");
        next_data(&mut ws).await;
        let _ = h.record(t.elapsed().as_micros() as u64);
    }
    h
}

async fn paced_loop(
    mut ws: Ws,
    size: usize,
    period: Duration,
    first: Instant,
    until: Instant,
) -> Histogram<u64> {
    let mut h = hist();
    let payload = vec![0x5a; size];
    let mut tick = tokio::time::interval_at(first.into(), period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        if Instant::now() >= until {
            break;
        }
        let t = Instant::now();
        ws.send(Message::binary(payload.clone()))
            .await
            .expect("send");
        next_data(&mut ws).await;
        let _ = h.record(t.elapsed().as_micros() as u64);
    }
    h
}

async fn next_data<S>(ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(m)) if m.is_binary() || m.is_text() => return,
            Some(Ok(_)) => {}
            other => panic!("tunnel ended: {other:?}"),
        }
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

async fn join_all<T: 'static>(
    handles: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    // Spawn everything first: awaiting a lazy iterator would start each task after the last.
    let handles: Vec<_> = handles.into_iter().collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

async fn wait_go() {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        if l.trim() == "go" {
            return;
        }
    }
}

fn report(mode: &str, started: Instant, hists: Vec<Histogram<u64>>) {
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = hist();
    for h in &hists {
        all.add(h).expect("merge");
    }
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "count": all.len(),
            "elapsed_s": elapsed,
            "per_s": all.len() as f64 / elapsed,
            "p50_us": all.value_at_quantile(0.5),
            "p90_us": all.value_at_quantile(0.9),
            "p99_us": all.value_at_quantile(0.99),
            "max_us": all.max(),
        })
    );
}

/// WebSockets over HTTP/2 streams, from the client side.
mod h2io {
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, ready};

    use bytes::Bytes;
    use h2::{RecvStream, SendStream};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::H2Ws;

    /// One stream as a byte stream: DATA in (window reopened as read), DATA out within the
    /// window.
    pub(crate) struct H2Io {
        send: SendStream<Bytes>,
        recv: RecvStream,
        pending: Bytes,
    }

    impl AsyncRead for H2Io {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            loop {
                if !this.pending.is_empty() {
                    let n = this.pending.len().min(buf.remaining());
                    buf.put_slice(&this.pending.split_to(n));
                    let _ = this.recv.flow_control().release_capacity(n);
                    return Poll::Ready(Ok(()));
                }
                match ready!(this.recv.poll_data(cx)) {
                    Some(Ok(b)) => this.pending = b,
                    Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                    None => return Poll::Ready(Ok(())),
                }
            }
        }
    }

    impl AsyncWrite for H2Io {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            loop {
                let cap = this.send.capacity();
                if cap > 0 {
                    let n = cap.min(buf.len());
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(io::Error::other)?;
                    return Poll::Ready(Ok(n));
                }
                this.send.reserve_capacity(buf.len());
                match ready!(this.send.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    _ => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                }
            }
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            let _ = self.send.send_data(Bytes::new(), true);
            Poll::Ready(Ok(()))
        }
    }

    fn tls() -> tokio_rustls::TlsConnector {
        let mut cfg = super::client_config();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    /// `n` tunnels, `per_conn` on each HTTP/2 connection.
    pub(crate) async fn open_many(url: &str, n: u64, per_conn: u64) -> Vec<H2Ws> {
        let u: http::Uri = url.parse().expect("url");
        let port = u.port_u16().unwrap_or(443);
        let tls = tls();
        let mut out = Vec::with_capacity(n as usize);
        let per_conn = per_conn.max(1);
        while (out.len() as u64) < n {
            let tcp = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let _ = tcp.set_nodelay(true);
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let s = tls.connect(name, tcp).await.expect("TLS");
            let (send, conn) = h2::client::Builder::new()
                .initial_connection_window_size(4 << 20)
                .handshake::<_, Bytes>(s)
                .await
                .expect("h2 handshake");
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            let mut send = send.ready().await.expect("h2 ready");
            let here = per_conn.min(n - out.len() as u64);
            let mut pending = Vec::new();
            for _ in 0..here {
                let req = http::Request::builder()
                    .method("CONNECT")
                    .uri(url.replacen("wss://", "https://", 1))
                    .header("sec-websocket-version", "13")
                    .extension(h2::ext::Protocol::from_static("websocket"))
                    .body(())
                    .expect("request");
                send = send.ready().await.expect("h2 ready");
                let (resp, body) = send.send_request(req, false).expect("CONNECT");
                pending.push((resp, body));
            }
            for (resp, body) in pending {
                let resp = resp.await.expect("CONNECT answer");
                assert_eq!(resp.status(), 200, "extended CONNECT refused");
                let io = H2Io {
                    send: body,
                    recv: resp.into_body(),
                    pending: Bytes::new(),
                };
                out.push(WebSocketStream::from_raw_socket(io, Role::Client, None).await);
            }
        }
        out
    }
}
