//! HTTP/2 at the edge, from real HTTP/2 clients (the `h2` crate's client, and raw frames for
//! the abuse cases): plain requests routed and forwarded to HTTP/1.1 backends with their
//! forwarding headers, SSE event by event, 1 MiB both ways, 100 streams on one connection;
//! WebSockets over HTTP/2 (RFC 8441) bridged to HTTP/1.1 backends with the backend's Accept
//! checked, refusals with their statuses, a reset closing the backend side with 1001, ten
//! tunnels on one connection, reload and drain; and the floods that end a connection with
//! GOAWAY while another client is served.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};

type Events = Arc<Mutex<Option<mpsc::Receiver<String>>>>;
type AnyBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A hyper HTTP/1.1 backend: `/app/sse` streams the events the test feeds it, `/app/headers`
/// returns the request headers, `/app/bytes/N` returns N bytes, anything else echoes the
/// method, target and body length.
async fn http_backend() -> (SocketAddr, mpsc::Sender<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel::<String>(8);
    let events: Events = Arc::new(Mutex::new(Some(rx)));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let events = events.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let events = events.clone();
                    async move { Ok::<_, Infallible>(answer(req, events).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, tx)
}

async fn answer(req: http::Request<Incoming>, events: Events) -> http::Response<AnyBody> {
    let path = req.uri().path().to_string();
    if path == "/app/sse" {
        let rx = events.lock().await.take().expect("one SSE stream per test");
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let ev = rx.recv().await?;
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {ev}\n\n")))),
                rx,
            ))
        });
        return http::Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(stream).boxed())
            .unwrap();
    }
    if path == "/app/headers" {
        let mut text = String::new();
        for (k, v) in req.headers() {
            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap()));
        }
        return http::Response::new(Full::new(Bytes::from(text)).boxed());
    }
    if let Some(n) = path.strip_prefix("/app/bytes/") {
        let n: usize = n.parse().unwrap();
        return http::Response::builder()
            .header("connection", "keep-alive")
            .body(Full::new(Bytes::from(vec![b'x'; n])).boxed())
            .unwrap();
    }
    let head = format!("{} {}", req.method(), req.uri());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    http::Response::builder()
        .header("x-backend", "yes")
        .body(Full::new(Bytes::from(format!("{head} {}", body.len()))).boxed())
        .unwrap()
}

/// A TLS connection offering `alpn`, and the protocol the gateway chose.
async fn tls_with_alpn(
    gate: &Gate,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<Vec<u8>>,
) {
    let mut cfg = (*gate.pki.client_config()).clone();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let s = tls_connect(gate.tls_addr, Arc::new(cfg), "localhost")
        .await
        .unwrap();
    let chosen = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    (s, chosen)
}

/// An HTTP/2 client connection to the gateway; the task driving it ends with the connection.
async fn h2_client(gate: &Gate) -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let (tls, chosen) = tls_with_alpn(gate, &[b"h2", b"http/1.1"]).await;
    assert_eq!(chosen.as_deref(), Some(&b"h2"[..]));
    // A connection window large enough that one stream left unread cannot stall the others.
    let (send, conn) = h2::client::Builder::new()
        .initial_connection_window_size(8 << 20)
        .handshake(tls)
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

fn get(gate: &Gate, path: &str) -> http::Request<()> {
    http::Request::get(format!("https://localhost:{}{path}", gate.tls_addr.port()))
        .body(())
        .unwrap()
}

/// Sends `req` on a new stream and waits (10 s at most) for the answer's head.
async fn request_head(
    c: &SendRequest<Bytes>,
    req: http::Request<()>,
    end: bool,
) -> (http::Response<RecvStream>, SendStream<Bytes>) {
    let mut c = c.clone().ready().await.unwrap();
    let (resp, send) = c.send_request(req, end).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("answer in time")
        .unwrap();
    (resp, send)
}

/// Sends a bodiless request and reads the whole answer.
async fn fetch(
    send: &mut SendRequest<Bytes>,
    req: http::Request<()>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let (resp, _) = request_head(send, req, true).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = read_body(resp.into_body()).await;
    (status, headers, body)
}

async fn read_body(mut body: RecvStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.data())
        .await
        .expect("body in time")
    {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    out
}

/// The test settings with `lines` added to `[server]`.
fn settings(lines: &str) -> String {
    BASE.replace("[limits]", &format!("{lines}\n[limits]"))
}

const WS_OVER_H2: &str = "websocket_over_h2 = true";

#[tokio::test]
async fn plain_requests_over_h2_are_routed_with_forwarding_headers() {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let (mut c, _d) = h2_client(&gate).await;
    let (status, headers, body) = fetch(&mut c, get(&gate, "/app/headers")).await;
    assert_eq!(status, 200);
    assert!(headers.get("connection").is_none());
    let text = String::from_utf8(body).unwrap();
    let port = gate.tls_addr.port();
    assert!(
        text.contains(&format!("host: localhost:{port}\n")),
        "{text}"
    );
    assert!(text.contains("x-forwarded-proto: https\n"), "{text}");
    assert!(text.contains("proto=https"), "{text}");
    assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
    let (status, _, body) = fetch(&mut c, get(&gate, "/app/some?q=1")).await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(body).unwrap(), "GET /app/some?q=1 0");
    // Early answers keep their meaning.
    let (status, _, _) = fetch(&mut c, get(&gate, "/nowhere")).await;
    assert_eq!(status, 404);
    let (status, _, _) = fetch(&mut c, get(&gate, "/app/../etc")).await;
    assert_eq!(status, 400);
    // A refusal to a HEAD has its head only.
    let mut head = get(&gate, "/nowhere");
    *head.method_mut() = http::Method::HEAD;
    let (status, headers, body) = fetch(&mut c, head).await;
    assert_eq!(status, 404);
    assert!(body.is_empty());
    assert!(headers.get("content-length").is_some());
    // The same connection still serves.
    let (status, _, _) = fetch(&mut c, get(&gate, "/app/x")).await;
    assert_eq!(status, 200);
    // Clients that offer only HTTP/1.1 still get it.
    let (_, chosen) = tls_with_alpn(&gate, &[b"http/1.1"]).await;
    assert_eq!(chosen.as_deref(), Some(&b"http/1.1"[..]));
    gate.stop().await;
}

#[tokio::test]
async fn http2_off_offers_only_http1() {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(&settings("http2 = false"), &route("/app", addr, "")).await;
    let (_, chosen) = tls_with_alpn(&gate, &[b"h2", b"http/1.1"]).await;
    assert_eq!(chosen.as_deref(), Some(&b"http/1.1"[..]));
    gate.stop().await;
}

#[tokio::test]
async fn server_sent_events_over_h2_arrive_one_by_one() {
    let (addr, events) = http_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let (c, _d) = h2_client(&gate).await;
    let mut c = c.ready().await.unwrap();
    let (resp, _) = c.send_request(get(&gate, "/app/sse"), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    for i in 0..3 {
        // The next event is produced only after the previous one arrived.
        events.send(format!("event {i}")).await.unwrap();
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .expect("event arrives while the stream is open")
            .unwrap()
            .unwrap();
        assert_eq!(chunk, Bytes::from(format!("data: event {i}\n\n")));
    }
    gate.stop().await;
}

#[tokio::test]
async fn a_mebibyte_goes_up_and_down() {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let (c, _d) = h2_client(&gate).await;
    let mut c = c.ready().await.unwrap();
    let req = http::Request::post(format!(
        "https://localhost:{}/app/upload",
        gate.tls_addr.port()
    ))
    .body(())
    .unwrap();
    let (resp, mut up) = c.send_request(req, false).unwrap();
    let total = 1 << 20;
    let mut sent = 0;
    while sent < total {
        let want = (total - sent).min(64 * 1024);
        up.reserve_capacity(want);
        let cap = std::future::poll_fn(|cx| up.poll_capacity(cx))
            .await
            .unwrap()
            .unwrap();
        let n = cap.min(want);
        up.send_data(Bytes::from(vec![b'u'; n]), sent + n == total)
            .unwrap();
        sent += n;
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = read_body(resp.into_body()).await;
    assert_eq!(
        String::from_utf8(body).unwrap(),
        format!("POST /app/upload {total}")
    );
    let (status, _, body) = fetch(&mut c, get(&gate, &format!("/app/bytes/{total}"))).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), total);
    assert!(body.iter().all(|&b| b == b'x'));
    gate.stop().await;
}

#[tokio::test]
async fn a_hundred_concurrent_streams_on_one_connection() {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let (c, _d) = h2_client(&gate).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut c = c.clone();
        let req = get(&gate, &format!("/app/n/{i}"));
        tasks.push(tokio::spawn(async move {
            let (status, _, body) = fetch(&mut c, req).await;
            (status, String::from_utf8(body).unwrap())
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, format!("GET /app/n/{i} 0"));
    }
    gate.stop().await;
}

/// A WebSocket on an HTTP/2 stream: raw frames, masked going out.
struct H2Ws {
    send: SendStream<Bytes>,
    recv: RecvStream,
    buf: Vec<u8>,
}

impl H2Ws {
    async fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.send
            .send_data(Bytes::from(client_frame(opcode, payload)), false)
            .unwrap();
    }

    /// The next frame (opcode, payload), `None` once the stream ended.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(f) = take_frame(&mut self.buf) {
                return Some(f);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.recv.data())
                .await
                .expect("frame in time")?
                .ok()?;
            let _ = self.recv.flow_control().release_capacity(chunk.len());
            self.buf.extend_from_slice(&chunk);
        }
    }

    async fn echo(&mut self, text: &str) {
        self.send(1, text.as_bytes()).await;
        let (op, payload) = self.frame().await.expect("echo");
        assert_eq!(
            (op, String::from_utf8(payload).unwrap().as_str()),
            (1, text)
        );
    }
}

fn connect_req(gate: &Gate, path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost:{}{path}", gate.tls_addr.port()))
        .extension(h2::ext::Protocol::from_static("websocket"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

/// An extended CONNECT: the answer's status and headers, and the WebSocket when it is 200.
async fn ws_over_h2(
    c: &SendRequest<Bytes>,
    req: http::Request<()>,
) -> (u16, http::HeaderMap, Option<H2Ws>) {
    let (resp, send) = request_head(c, req, false).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let ws = (status == 200).then(|| H2Ws {
        send,
        recv: resp.into_body(),
        buf: Vec::new(),
    });
    (status, headers, ws)
}

const V13: (&str, &str) = ("sec-websocket-version", "13");

#[tokio::test]
async fn websocket_over_h2_echoes_and_negotiates_with_the_backend() {
    let mut backend = EchoBackend::start().await;
    let gate = Gate::start(&settings(WS_OVER_H2), &route("/chat", backend.addr, "")).await;
    let (mut c, _d) = h2_client(&gate).await;
    // The server's SETTINGS have arrived once a first answer has.
    assert_eq!(fetch(&mut c, get(&gate, "/nowhere")).await.0, 404);
    assert!(c.is_extended_connect_protocol_enabled());
    let (status, headers, ws) = ws_over_h2(
        &c,
        connect_req(
            &gate,
            "/chat",
            &[
                V13,
                ("origin", "https://good.example"),
                ("sec-websocket-protocol", "chat.v2, chat.v1"),
                (
                    "sec-websocket-extensions",
                    "permessage-deflate; client_max_window_bits",
                ),
            ],
        ),
    )
    .await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(headers["sec-websocket-protocol"], "chat.v2");
    assert!(headers.get("sec-websocket-accept").is_none());
    let mut ws = ws.unwrap();
    // The backend got an HTTP/1.1 Upgrade with a key of the gateway's and what was offered.
    let seen = loop {
        if let Seen::Request(h, _) = backend.next().await {
            break h;
        }
    };
    assert_eq!(seen["upgrade"], "websocket");
    assert_eq!(seen["sec-websocket-version"], "13");
    assert!(seen.get("sec-websocket-key").is_some());
    assert_eq!(seen["sec-websocket-protocol"], "chat.v2, chat.v1");
    assert!(
        seen["sec-websocket-extensions"]
            .to_str()
            .unwrap()
            .starts_with("permessage-deflate")
    );
    assert_eq!(seen["x-forwarded-proto"], "https");
    ws.echo("over h2").await;
    ws.echo(&"y".repeat(70_000)[..60_000]).await;
    let m = gate.metrics().await;
    assert!(
        m.contains("wsgate_connections_total{route=\"/chat\",protocol=\"h2\"} 1"),
        "{m}"
    );
    // The admin API says which protocol carries it.
    let (status, list) = http_get(gate.admin.unwrap(), "/tunnels").await;
    assert_eq!(status, 200, "{list}");
    assert!(list.contains("\"protocol\":\"h2\""), "{list}");
    // The client closes: the Close goes through and the backend answers it.
    ws.send(8, &1000u16.to_be_bytes()).await;
    let (op, payload) = ws.frame().await.expect("close answered");
    assert_eq!((op, code_of(&payload)), (8, 1000));
    gate.stop().await;
}

#[tokio::test]
async fn extended_connect_refusals_keep_their_statuses() {
    let backend = EchoBackend::start().await;
    let bad_accept = raw_backend(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    )
    .await;
    let page = raw_backend("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").await;
    let routes = format!(
        "{}{}{}",
        route("/chat", backend.addr, ""),
        route("/bad", bad_accept, ""),
        route("/page", page, "")
    );
    let gate = Gate::start(&settings(WS_OVER_H2), &routes).await;
    let (c, _d) = h2_client(&gate).await;
    let (status, _, _) = ws_over_h2(
        &c,
        connect_req(&gate, "/chat", &[V13, ("origin", "https://evil.example")]),
    )
    .await;
    assert_eq!(status, 403);
    let (status, headers, _) = ws_over_h2(
        &c,
        connect_req(&gate, "/chat", &[("sec-websocket-version", "8")]),
    )
    .await;
    assert_eq!(status, 426);
    assert_eq!(headers["sec-websocket-version"], "13");
    let (status, _, _) = ws_over_h2(&c, connect_req(&gate, "/bad", &[V13])).await;
    assert_eq!(status, 502);
    let (status, _, _) = ws_over_h2(&c, connect_req(&gate, "/nowhere", &[V13])).await;
    assert_eq!(status, 404);
    // A backend that answers a WebSocket with a plain success is not passed on: the client
    // would take the page for an open WebSocket.
    let (status, _, _) = ws_over_h2(&c, connect_req(&gate, "/page", &[V13])).await;
    assert_eq!(status, 502);
    // The connection serves on after every refusal.
    let (status, _, ws) = ws_over_h2(&c, connect_req(&gate, "/chat", &[V13])).await;
    assert_eq!(status, 200);
    ws.unwrap().echo("still here").await;
    gate.stop().await;
}

#[tokio::test]
async fn a_stream_reset_closes_the_backend_side_with_1001() {
    let mut backend = EchoBackend::start().await;
    let gate = Gate::start(&settings(WS_OVER_H2), &route("/chat", backend.addr, "")).await;
    let (c, _d) = h2_client(&gate).await;
    let (_, _, ws) = ws_over_h2(&c, connect_req(&gate, "/chat", &[V13])).await;
    let mut ws = ws.unwrap();
    ws.echo("before the reset").await;
    ws.send.send_reset(h2::Reason::CANCEL);
    let close = backend.next_close().await.expect("a Close frame");
    assert_eq!(u16::from(close.code), 1001);
    let m = metrics_when_no_tunnel_is_open(&gate).await;
    assert!(
        m.contains("wsgate_connections_open{route=\"/chat\"} 0"),
        "{m}"
    );
    gate.stop().await;
}

#[tokio::test]
async fn ten_tunnels_on_one_connection_live_through_reload_and_drain_with_1001() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(&settings(WS_OVER_H2), &route("/chat", backend.addr, "")).await;
    let (c, driver) = h2_client(&gate).await;
    let mut all = Vec::new();
    for _ in 0..10 {
        let (status, _, ws) = ws_over_h2(&c, connect_req(&gate, "/chat", &[V13])).await;
        assert_eq!(status, 200);
        all.push(ws.unwrap());
    }
    // A slow reader: one stream's client stops reading with more echoed to it than its
    // window holds, while the others echo on.
    for _ in 0..4 {
        all[0].send(2, &vec![7u8; 60_000]).await;
    }
    for (i, ws) in all.iter_mut().enumerate().skip(1) {
        ws.echo(&format!("stream {i}")).await;
    }
    for _ in 0..4 {
        let (op, payload) = all[0].frame().await.unwrap();
        assert_eq!((op, payload.len()), (2, 60_000));
    }
    // A reload leaves every tunnel (and the connection) as it was.
    gate.handle.reload().await.unwrap();
    for (i, ws) in all.iter_mut().enumerate() {
        ws.echo(&format!("after reload {i}")).await;
    }
    // A drain closes each with 1001 and the connection after them.
    let stop = tokio::spawn(gate.stop());
    for ws in &mut all {
        let (op, payload) = loop {
            let f = ws.frame().await.expect("a Close frame");
            if f.0 == 8 {
                break f;
            }
        };
        assert_eq!((op, code_of(&payload)), (8, 1001));
        ws.send(8, &1001u16.to_be_bytes()).await;
    }
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("drained in time")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the connection ends")
        .unwrap();
}

#[tokio::test]
async fn without_websocket_over_h2_the_setting_is_absent() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(&settings(""), &route("/chat", backend.addr, "")).await;
    let (mut c, _d) = h2_client(&gate).await;
    assert_eq!(fetch(&mut c, get(&gate, "/nowhere")).await.0, 404);
    assert!(!c.is_extended_connect_protocol_enabled());
    // The h2 client itself refuses to send `:protocol` then; a raw one is reset by the
    // gateway's h2 (a PROTOCOL_ERROR), never tunnelled.
    let mut raw = raw_h2(&gate).await;
    // `:method CONNECT` as a literal on the static table's name, then the GET's other fields.
    let mut head = vec![0x02, 7];
    head.extend_from_slice(b"CONNECT");
    head.extend_from_slice(&hpack_get("/chat")[1..]);
    // `:protocol: websocket` as a literal with a new name.
    head.extend_from_slice(&[0x00, 9]);
    head.extend_from_slice(b":protocol");
    head.push(9);
    head.extend_from_slice(b"websocket");
    raw.write_all(&h2_frame(1, 0x4, 1, &head)).await.unwrap();
    let frames = read_frames(&mut raw, |t, _| t == 3 || t == 7).await;
    assert!(
        frames.iter().any(|(t, _)| *t == 3 || *t == 7),
        "reset or GOAWAY: {frames:?}"
    );
    assert!(
        frames.iter().all(|(t, _)| *t != 1),
        "no response: {frames:?}"
    );
    gate.stop().await;
}

#[test]
fn websocket_over_h2_needs_http2() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("localhost", &["localhost"]);
    let path = pki.dir.path().join("wsgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nhttp2 = false\nwebsocket_over_h2 = true\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let errors = wsgate::check(&path);
    let file = path.display().to_string();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&format!("{file}:4: server.websocket_over_h2:"))),
        "{errors:?}"
    );
}

// Raw HTTP/2 for the abuse cases.

async fn raw_h2(gate: &Gate) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let (mut s, chosen) = tls_with_alpn(gate, &[b"h2"]).await;
    assert_eq!(chosen.as_deref(), Some(&b"h2"[..]));
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
    s
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A GET's header block from the static table: `:method GET`, `:scheme https`, the path and
/// `:authority localhost` as literals.
fn hpack_get(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x04, path.len() as u8];
    b.extend_from_slice(path.as_bytes());
    b.extend_from_slice(&[0x01, 9]);
    b.extend_from_slice(b"localhost");
    b
}

/// Reads frames (type, stream) until `stop` says so, the connection ends, or 10 s pass.
async fn read_frames<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    stop: impl Fn(u8, u32) -> bool,
) -> Vec<(u8, u32)> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let kind = buf[3];
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                buf.drain(..9 + len);
                out.push((kind, stream));
                if stop(kind, stream) {
                    return;
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    out
}

/// A flood on one connection ends it with GOAWAY, and a client on another connection is
/// served before and after.
async fn flood_ends_with_goaway(flood: impl Fn(&mut Vec<u8>)) {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let (mut good, _d) = h2_client(&gate).await;
    assert_eq!(fetch(&mut good, get(&gate, "/app/a")).await.0, 200);
    let raw = raw_h2(&gate).await;
    let mut bytes = Vec::new();
    flood(&mut bytes);
    // Written from a task: the gateway may stop reading half way.
    let (mut rd, mut wr) = tokio::io::split(raw);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
    });
    let frames = read_frames(&mut rd, |t, _| t == 7).await;
    assert!(
        frames.iter().any(|(t, _)| *t == 7),
        "GOAWAY expected, got {} frames: {:?}",
        frames.len(),
        &frames[frames.len().saturating_sub(5)..]
    );
    writer.abort();
    drop(rd);
    assert_eq!(fetch(&mut good, get(&gate, "/app/b")).await.0, 200);
    gate.stop().await;
}

#[tokio::test]
async fn rapid_reset_ends_the_connection() {
    flood_ends_with_goaway(|out| {
        for i in 0..2000u32 {
            let id = 1 + 2 * i;
            out.extend(h2_frame(1, 0x4 | 0x1, id, &hpack_get("/app/r")));
            out.extend(h2_frame(3, 0, id, &8u32.to_be_bytes()));
        }
    })
    .await;
}

#[tokio::test]
async fn a_continuation_flood_ends_the_connection() {
    flood_ends_with_goaway(|out| {
        // HEADERS without END_HEADERS, then CONTINUATION frames that never end the block.
        out.extend(h2_frame(1, 0x1, 1, &hpack_get("/app/c")));
        let mut filler = vec![0x00, 5];
        filler.extend_from_slice(b"x-pad");
        filler.push(100);
        filler.extend_from_slice(&[b'p'; 100]);
        for _ in 0..10_000 {
            out.extend(h2_frame(9, 0, 1, &filler));
        }
    })
    .await;
}

#[tokio::test]
async fn an_empty_data_flood_ends_the_connection() {
    flood_ends_with_goaway(|out| {
        // A POST whose body is nothing but empty DATA frames.
        let mut block = hpack_get("/app/e");
        block[0] = 0x83;
        out.extend(h2_frame(1, 0x4, 1, &block));
        for _ in 0..100_000 {
            out.extend(h2_frame(0, 0, 1, &[]));
        }
    })
    .await;
}

#[tokio::test]
async fn a_settings_flood_ends_the_connection() {
    flood_ends_with_goaway(|out| {
        for _ in 0..100_000 {
            out.extend(h2_frame(4, 0, 0, &[0, 4, 0, 1, 0, 0]));
        }
    })
    .await;
}

#[tokio::test]
async fn a_ping_flood_ends_the_connection() {
    flood_ends_with_goaway(|out| {
        for i in 0..100_000u64 {
            out.extend(h2_frame(6, 0, 0, &i.to_be_bytes()));
        }
    })
    .await;
}

#[tokio::test]
async fn a_response_the_client_never_reads_ends_the_connection() {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let (mut good, _d) = h2_client(&gate).await;
    // A client whose stream window is tiny and never reopened: the 1 MiB answer stalls.
    let (tls, _) = tls_with_alpn(&gate, &[b"h2"]).await;
    let (bad, conn) = h2::client::Builder::new()
        .initial_window_size(1024)
        .handshake::<_, Bytes>(tls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut bad = bad.ready().await.unwrap();
    let (resp, _) = bad
        .send_request(get(&gate, &format!("/app/bytes/{}", 1 << 20)), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let _unread = resp.into_body();
    // Others are served while it stalls.
    assert_eq!(fetch(&mut good, get(&gate, "/app/during")).await.0, 200);
    // The gateway ends that connection with GOAWAY once the stall outlasts the bound.
    let ended = tokio::time::timeout(Duration::from_secs(20), driver)
        .await
        .expect("the stalled connection ends")
        .unwrap();
    let e = ended.unwrap_err();
    assert!(e.is_go_away(), "{e:?}");
    assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM));
    // (The first good connection may have idled out meanwhile, as keep-alive ones do.)
    let (mut after, _d2) = h2_client(&gate).await;
    assert_eq!(fetch(&mut after, get(&gate, "/app/ok")).await.0, 200);
    gate.stop().await;
}

#[tokio::test]
async fn a_header_list_over_max_request_head_gets_431() {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let (mut c, _d) = h2_client(&gate).await;
    assert_eq!(fetch(&mut c, get(&gate, "/app/a")).await.0, 200);
    let mut req = get(&gate, "/app/big");
    req.headers_mut().insert(
        "x-big",
        http::HeaderValue::from_str(&"b".repeat(40_000)).unwrap(),
    );
    let mut s = c.clone().ready().await.unwrap();
    match s.send_request(req, true) {
        Ok((resp, _)) => {
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .expect("answer in time")
                .unwrap();
            assert_eq!(resp.status(), 431);
        }
        // The h2 client may refuse to send what the server's SETTINGS said it would not take.
        Err(e) => panic!("the client refused to send it: {e:?}"),
    }
    assert_eq!(fetch(&mut c, get(&gate, "/app/b")).await.0, 200);
    // Counted like every refusal.
    let m = gate.metrics().await;
    assert!(
        m.contains("wsgate_handshake_rejections_total{reason=\"bad_request\"} 1"),
        "{m}"
    );
    gate.stop().await;
}

/// A backend whose every answer is a head and a body that never ends; `live` counts the
/// bodies still held (the gateway still reading them), `dropped` rings as each goes.
async fn hanging_backend() -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<tokio::sync::Notify>,
) {
    struct Held(
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<tokio::sync::Notify>,
    );
    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            self.1.notify_one();
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dropped = Arc::new(tokio::sync::Notify::new());
    let (live2, dropped2) = (live.clone(), dropped.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (live, dropped) = (live2.clone(), dropped2.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                    live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let held = Held(live.clone(), dropped.clone());
                    let stream = futures_util::stream::unfold(held, |held| async move {
                        std::future::pending::<()>().await;
                        Some((Ok::<_, Infallible>(Frame::data(Bytes::new())), held))
                    });
                    async move {
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(StreamBody::new(stream).boxed())
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
    (addr, live, dropped)
}

#[tokio::test]
async fn a_client_reset_ends_a_waiting_response_and_its_backend_request() {
    let (addr, live, dropped) = hanging_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let (c, _d) = h2_client(&gate).await;
    let mut c = c.ready().await.unwrap();
    let (resp, _) = c.send_request(get(&gate, "/app/wait"), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(live.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Dropping the client's last handle of a stream still open sends RST_STREAM (CANCEL).
    drop(resp);
    tokio::time::timeout(Duration::from_secs(10), async {
        while live.load(std::sync::atomic::Ordering::SeqCst) != 0 {
            dropped.notified().await;
        }
    })
    .await
    .expect("the backend's response is dropped once the client resets");
    gate.stop().await;
}

#[tokio::test]
async fn resetting_answered_streams_past_the_budget_ends_the_connection() {
    let (addr, _, _) = hanging_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let (c, driver) = h2_client(&gate).await;
    let mut served = 0;
    for _ in 0..300 {
        let Ok(mut s) = c.clone().ready().await else {
            break;
        };
        let Ok((resp, _)) = s.send_request(get(&gate, "/app/r"), true) else {
            break;
        };
        // Each reset comes after the gateway took the stream up and answered its head.
        let Ok(resp) = resp.await else { break };
        served += 1;
        drop(resp);
    }
    assert!(served > 200 && served < 300, "served {served}");
    let ended = tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("the connection ends");
    drop(ended);
    gate.stop().await;
}

#[tokio::test]
async fn curl_speaks_http2_through_the_gateway() {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(&settings(""), &route("/app", addr, "")).await;
    let ca = gate.pki.dir.path().join("curl-ca.pem");
    std::fs::write(&ca, &gate.pki.ca_pem).unwrap();
    let port = gate.tls_addr.port();
    let url = format!("https://localhost:{port}/app/headers");
    let out = tokio::process::Command::new("curl")
        .args(["--http2", "-sS", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-w", "\nversion=%{http_version} status=%{http_code}"])
        .arg(&url)
        .output()
        .await
        .expect("curl runs (Debian's curl, built with nghttp2)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("version=2 status=200"), "{text}");
    assert!(text.contains("x-forwarded-proto: https\n"), "{text}");
    assert!(
        text.contains(&format!("host: localhost:{port}\n")),
        "{text}"
    );
    gate.stop().await;
}

#[tokio::test]
async fn the_stream_limit_is_announced() {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(
        &settings("h2_max_concurrent_streams = 7"),
        &route("/app", addr, ""),
    )
    .await;
    let mut raw = raw_h2(&gate).await;
    // The server's first frame is its SETTINGS: MAX_CONCURRENT_STREAMS (0x3) is in it.
    let mut head = [0u8; 9];
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], 4, "SETTINGS first");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    raw.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(settings.contains(&(0x3, 7)), "{settings:?}");
    // ENABLE_CONNECT_PROTOCOL (0x8) only with websocket_over_h2.
    assert!(
        !settings.iter().any(|s| s.0 == 0x8 && s.1 == 1),
        "{settings:?}"
    );
    gate.stop().await;
}

#[tokio::test]
async fn over_max_connections_a_stream_gets_503_with_retry_after() {
    let (addr, _) = http_backend().await;
    let gate = Gate::start(
        &settings("").replace("[server]\n", "[server]\nmax_connections = 1\n"),
        &route("/app", addr, ""),
    )
    .await;
    let (mut first, _d1) = h2_client(&gate).await;
    assert_eq!(fetch(&mut first, get(&gate, "/app/a")).await.0, 200);
    let (mut second, _d2) = h2_client(&gate).await;
    let (status, headers, _) = fetch(&mut second, get(&gate, "/app/b")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "5");
    gate.stop().await;
}
