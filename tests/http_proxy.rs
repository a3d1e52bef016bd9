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
