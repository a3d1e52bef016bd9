//! Plain HTTP through the gateway: forwarding headers, streamed bodies both ways, Server-Sent
//! Events arriving event by event, keep-alive on both sides.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};

type Events = Arc<Mutex<Option<mpsc::Receiver<String>>>>;

/// A hyper backend: `/sse` streams the events the test feeds it; `/headers` returns the
/// request headers; anything else echoes the request body with the method and path.
async fn http_backend() -> (
    SocketAddr,
    mpsc::Sender<String>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel::<String>(8);
    let events: Events = Arc::new(Mutex::new(Some(rx)));
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
    (addr, tx, conns)
}

type AnyBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(req: http::Request<Incoming>, events: Events) -> http::Response<AnyBody> {
    match req.uri().path() {
        "/app/sse" => {
            let rx = events.lock().await.take().expect("one SSE stream per test");
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let ev = rx.recv().await?;
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {ev}\n\n")))),
                    rx,
                ))
            });
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        "/app/headers" => {
            let mut text = String::new();
            for (k, v) in req.headers() {
                text.push_str(&format!("{k}: {}\n", v.to_str().unwrap()));
            }
            http::Response::new(Full::new(Bytes::from(text)).boxed())
        }
        _ => {
            let head = format!("{} {}\n", req.method(), req.uri());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut out = head.into_bytes();
            out.extend_from_slice(&body);
            http::Response::builder()
                .header("connection", "keep-alive")
                .header("x-backend", "yes")
                .body(Full::new(Bytes::from(out)).boxed())
                .unwrap()
        }
    }
}

async fn client(gate: &Gate) -> hyper::client::conn::http1::SendRequest<AnyBody> {
    let tls = gate.tls(None).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn get(path: &str) -> http::Request<AnyBody> {
    http::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let (addr, events, _) = http_backend().await;
    let gate = Gate::start(BASE, &route("/app", addr, "")).await;
    let mut c = client(&gate).await;
    let resp = c.send_request(get("/app/sse")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    for i in 0..3 {
        // The next event is produced only after the previous one arrived: nothing is buffered whole.
        events.send(format!("event {i}")).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("event arrives while the stream is still open")
            .unwrap()
            .unwrap();
        assert_eq!(
            frame.into_data().unwrap(),
            Bytes::from(format!("data: event {i}\n\n"))
        );
    }
}

#[tokio::test]
async fn bodies_stream_both_ways_and_connections_are_kept_alive() {
    let (addr, _events, conns) = http_backend().await;
    let gate = Gate::start(BASE, &route("/app", addr, "")).await;
    let mut c = client(&gate).await;
    for i in 0..5 {
        let payload = format!("payload {i} ").repeat(10_000);
        let req = http::Request::post(format!("/app/echo?i={i}"))
            .header("host", "localhost")
            .body(Full::new(Bytes::from(payload.clone())).boxed())
            .unwrap();
        c.ready().await.unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], "yes");
        assert!(
            resp.headers().get("connection").is_none(),
            "hop-by-hop header removed"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            Bytes::from(format!("POST /app/echo?i={i}\n{payload}"))
        );
    }
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one pooled backend connection served all"
    );
}

#[tokio::test]
async fn plain_requests_carry_forwarding_headers_whatever_their_origin() {
    let (addr, _events, _) = http_backend().await;
    let gate = Gate::start(BASE, &route("/app", addr, "")).await;
    let mut c = client(&gate).await;
    let mut req = get("/app/headers");
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    req.headers_mut()
        .insert("x-forwarded-for", "192.0.2.1".parse().unwrap());
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("x-forwarded-for: 192.0.2.1, 127.0.0.1\n"),
        "{text}"
    );
    assert!(text.contains("x-forwarded-proto: https\n"), "{text}");
    assert!(
        text.contains("forwarded: for=127.0.0.1;proto=https;host=localhost\n"),
        "{text}"
    );
    assert!(text.contains("host: localhost\n"), "{text}");
}

#[tokio::test]
async fn plain_request_to_a_dead_backend_gets_502_and_unknown_path_404() {
    let dead = dead_addr().await;
    let gate = Gate::start(BASE, &route("/app", dead, "")).await;
    let resp = gate
        .raw(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status_of(&resp), 502, "{resp}");
    let resp = gate
        .raw(b"GET /other HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status_of(&resp), 404, "{resp}");
    let resp = gate
        .raw(b"GET /app/../secret HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert_eq!(status_of(&resp), 400, "{resp}");
}

/// Reads one HTTP/1.1 response with a Content-Length body off `s`; `None` when the
/// connection closed first.
async fn one_response<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                buf.drain(..end + 4 + len);
                return Some(head + &body);
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// A GET whose head is exactly `len` bytes long (request line, headers, blank line).
fn get_of_length(path: &str, len: usize) -> String {
    let base = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Pad: \r\n\r\n");
    let pad = "p".repeat(len - base.len());
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Pad: {pad}\r\n\r\n")
}

#[tokio::test]
async fn later_requests_on_a_keep_alive_connection_meet_the_same_limits_as_the_first() {
    use tokio::io::AsyncWriteExt;
    let (addr, _events, _) = http_backend().await;
    let settings = BASE.replace("[server]\n", "[server]\nmax_request_head = \"1KiB\"\n");
    let gate = Gate::start(&settings, &route("/app", addr, "")).await;
    for first in [true, false] {
        // At the limit: served; one byte over: 431, whether it is the first request or not.
        for (len, status) in [(1024, 200), (1025, 431)] {
            let mut s = gate.tls(None).await;
            let mut buf = Vec::new();
            if !first {
                s.write_all(get_of_length("/app/warm-up", 200).as_bytes())
                    .await
                    .unwrap();
                let warm = one_response(&mut s, &mut buf).await.expect("first answer");
                assert_eq!(status_of(&warm), 200, "{warm}");
            }
            s.write_all(get_of_length("/app/x", len).as_bytes())
                .await
                .unwrap();
            let resp = one_response(&mut s, &mut buf).await.expect("an answer");
            assert_eq!(status_of(&resp), status, "first={first} len={len}: {resp}");
        }
        let mut s = gate.tls(None).await;
        let mut buf = Vec::new();
        if !first {
            s.write_all(get_of_length("/app/warm-up", 200).as_bytes())
                .await
                .unwrap();
            one_response(&mut s, &mut buf).await.expect("first answer");
        }
        s.write_all(b"GET /app/%2e%2e/secret HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let resp = one_response(&mut s, &mut buf).await.expect("an answer");
        assert_eq!(status_of(&resp), 400, "first={first}: {resp}");
        assert!(resp.contains("dot segments"), "{resp}");
    }
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_fault() {
    let (addr, _events, _) = http_backend().await;
    let gate = Gate::start(BASE, &route("/app", addr, "")).await;
    let rejections = |m: &str, reason: &str| {
        m.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "wsgate_handshake_rejections_total{{reason=\"{reason}\"}}"
                ))
            })
            .map_or(0, |l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
    };
    let before = gate.metrics().await;
    let resp = gate
        .raw(
            b"POST /app/upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n\
              ffffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        )
        .await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert!(resp.contains("chunk size"), "{resp}");
    let after = gate.metrics().await;
    assert_eq!(
        rejections(&after, "bad_request"),
        rejections(&before, "bad_request") + 1,
        "{after}"
    );
    assert_eq!(
        rejections(&after, "backend_error"),
        rejections(&before, "backend_error"),
        "{after}"
    );
}
