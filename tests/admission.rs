//! Admission: per-address rate and cap before TLS, the global cap's 503, slow clients dropped
//! at the handshake deadline, and client addresses from PROXY headers.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn with_server(extra_server: &str, limits: &str) -> String {
    let base = BASE.replace("[server]\n", &format!("[server]\n{extra_server}\n"));
    if limits.is_empty() {
        base
    } else {
        // Later keys of the same table would be duplicates: replace the whole [limits] table.
        let start = base.find("[limits]").unwrap();
        let end = base[start..].find("[admin]").unwrap() + start;
        format!("{}[limits]\n{limits}\n{}", &base[..start], &base[end..])
    }
}

#[tokio::test]
async fn rate_limit_refuses_after_the_burst_before_tls_and_admits_after_refill() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        &with_server(
            "",
            "per_ip_rate = 4\nper_ip_burst = 3\nper_ip_max_connections = 100",
        ),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(gate.tls(None).await);
        let _ = i;
    }
    // The fourth connection inside the burst window is closed before TLS: the gateway sends
    // not a byte (no ServerHello, no alert), even to a client that sent nothing yet.
    let mut refused = tokio::net::TcpStream::connect(gate.tls_addr).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), refused.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "closed at once, not left waiting for a handshake"
    );
    assert!(got.is_empty(), "the gateway sent {got:?}");
    // One token comes back every 250 ms: waiting that long is the point here.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admitted = tls_connect(gate.tls_addr, gate.pki.client_config(), "localhost").await;
    assert!(admitted.is_ok(), "admitted again once a token came back");
    let m = gate.metrics().await;
    assert!(
        m.contains("wsgate_handshake_rejections_total{reason=\"rate_limit\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn per_address_cap_counts_open_connections() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        &with_server("", "per_ip_rate = 0\nper_ip_max_connections = 2"),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let (a, _) = gate.ws("/chat", &[]).await.unwrap();
    let (_b, _) = gate.ws("/chat", &[]).await.unwrap();
    assert!(
        gate.ws("/chat", &[]).await.is_err(),
        "third concurrent connection refused"
    );
    drop(a);
    tokio::time::timeout(
        Duration::from_secs(5),
        gate.handle.wait_until(|a| a.connections == 1),
    )
    .await
    .expect("the closed connection gives its slot back");
    gate.ws("/chat", &[])
        .await
        .expect("the freed slot admits a new connection");
    let m = gate.metrics().await;
    assert!(
        m.contains("wsgate_handshake_rejections_total{reason=\"per_ip_cap\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn global_cap_answers_503_with_retry_after() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        &with_server("max_connections = 2", ""),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let (_a, _) = gate.ws("/chat", &[]).await.unwrap();
    let (_b, _) = gate.ws("/chat", &[]).await.unwrap();
    let resp = gate.raw(upgrade_request("/chat", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert!(resp.contains("Retry-After: "), "{resp}");
    let m = gate.metrics().await;
    assert!(
        m.contains("wsgate_handshake_rejections_total{reason=\"global_cap\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn slowloris_is_dropped_at_handshake_timeout_while_others_are_served() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        &with_server("handshake_timeout = \"600ms\"", "")
            .replace("handshake_timeout = \"5s\"\n", ""),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let mut slow = gate.tls(None).await;
    let started = Instant::now();
    let request = upgrade_request("/chat", "");
    let slow_client = async {
        for b in request.as_bytes() {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            let mut probe = [0u8; 1];
            // A read that ends (EOF or reset) means the gateway dropped us.
            if let Ok(r) =
                tokio::time::timeout(Duration::from_millis(100), slow.read(&mut probe)).await
            {
                assert!(!matches!(r, Ok(1)), "no answer is expected");
                break;
            }
        }
        started.elapsed()
    };
    let normal_client = async {
        let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
        ws.send(Message::text("served")).await.unwrap();
        next_data(&mut ws).await.into_text().unwrap().to_string()
    };
    let (dropped_after, served) = tokio::join!(slow_client, normal_client);
    assert_eq!(served, "served");
    assert!(
        dropped_after >= Duration::from_millis(550),
        "dropped at the deadline, not before: {dropped_after:?}"
    );
    assert!(
        dropped_after < Duration::from_secs(3),
        "dropped near the deadline: {dropped_after:?}"
    );
    let m = gate.metrics().await;
    assert!(
        m.contains("wsgate_handshake_rejections_total{reason=\"handshake_timeout\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn proxy_protocol_address_is_used_and_garbage_is_closed_at_once() {
    let mut backend = EchoBackend::start().await;
    let settings = with_server(
        "listen_plain = [\"127.0.0.1:0\"]\nproxy_protocol = true",
        "",
    );
    let gate = Gate::start(&settings, &route("/chat", backend.addr, "")).await;
    let plain = gate.plain_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(plain).await.unwrap();
    let mut bytes = b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 80\r\n".to_vec();
    bytes.extend_from_slice(upgrade_request("/chat", "").as_bytes());
    s.write_all(&bytes).await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let Seen::Request(h, _) = backend.next().await else {
        panic!("request")
    };
    assert_eq!(h["x-forwarded-for"], "203.0.113.9");
    assert_eq!(h["x-forwarded-proto"], "http");

    // A TCP4 line carrying IPv6 addresses is as invalid as any other malformed header.
    let mut v6 = tokio::net::TcpStream::connect(plain).await.unwrap();
    let mut bytes = b"PROXY TCP4 2001:db8::9 2001:db8::1 40000 80\r\n".to_vec();
    bytes.extend_from_slice(upgrade_request("/chat", "").as_bytes());
    v6.write_all(&bytes).await.unwrap();
    assert_eq!(read_all(&mut v6).await, "", "refused without an answer");
    let m = gate.metrics().await;
    assert!(
        m.contains("wsgate_handshake_rejections_total{reason=\"proxy_protocol\"} 1"),
        "{m}"
    );

    let started = Instant::now();
    let mut g = tokio::net::TcpStream::connect(plain).await.unwrap();
    g.write_all(upgrade_request("/chat", "").as_bytes())
        .await
        .unwrap();
    let text = read_all(&mut g).await;
    assert!(
        text.is_empty(),
        "no answer to a connection without a PROXY header: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed as soon as the header is invalid"
    );
}
