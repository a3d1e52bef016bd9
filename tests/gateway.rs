//! End-to-end behaviour of the core gateway over real sockets: wss clients, real backends.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::{self, Message};

async fn gate_with_echo() -> (Gate, EchoBackend) {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(BASE, &route("/chat", backend.addr, "")).await;
    (gate, backend)
}

#[tokio::test]
async fn echoes_text_and_binary_from_empty_to_16_mib() {
    let (gate, _b) = gate_with_echo().await;
    let cfg = tungstenite::protocol::WebSocketConfig::default().max_frame_size(Some(32 << 20));
    let (mut ws, resp) = gate.ws_with("/chat", &[], Some(cfg)).await.unwrap();
    assert_eq!(resp.status(), 101);
    for size in [0usize, 1, 125, 126, 65535, 65536, 1 << 20, 16 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        ws.send(Message::binary(data.clone())).await.unwrap();
        assert_eq!(
            next_data(&mut ws).await.into_data(),
            data,
            "binary of {size} bytes"
        );
        let text = "é".repeat(size / 2);
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(
            next_data(&mut ws).await.into_text().unwrap().as_str(),
            text,
            "text of {size} bytes"
        );
    }
}

#[tokio::test]
async fn fragmented_message_with_ping_between_fragments_arrives_whole() {
    let (gate, _b) = gate_with_echo().await;
    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    ws.send(Message::Frame(Frame::message(
        b"hel".to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Ping(b"between".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Frame(Frame::message(
        b"lo ".to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        b"world".to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    let mut got_pong = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"between");
                got_pong = true;
            }
            Message::Text(t) => {
                assert_eq!(t.as_str(), "hello world");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        got_pong,
        "the backend's pong to the client's ping is relayed"
    );
}

#[tokio::test]
async fn close_codes_and_reasons_pass_both_ways() {
    let (gate, mut b) = gate_with_echo().await;
    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye now".into(),
    }))
    .await
    .unwrap();
    let c = b.next_close().await.expect("backend saw a close frame");
    assert_eq!((u16::from(c.code), c.reason.as_str()), (4001, "bye now"));

    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    ws.send(Message::text("close:4002:see you later"))
        .await
        .unwrap();
    match next_data(&mut ws).await {
        Message::Close(Some(c)) => assert_eq!(
            (u16::from(c.code), c.reason.as_str()),
            (4002, "see you later")
        ),
        other => panic!("expected the backend's close, got {other:?}"),
    }
}

#[tokio::test]
async fn rejections_get_their_statuses_and_never_reach_the_backend() {
    let mut backend = EchoBackend::start().await;
    let routes = format!(
        "{}[[routes]]\npath = \"/strict\"\nbackends = [\"{}\"]\nallowed_origins = [\"https://*.example.com\"]\n",
        route("/chat", backend.addr, ""),
        backend.addr
    );
    let gate = Gate::start(BASE, &routes).await;
    let cases: Vec<(String, u16, &str)> = vec![
        (
            upgrade_request("/chat", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "bad"),
            400,
            "Sec-WebSocket-Key",
        ),
        (
            upgrade_request("/chat", "").replace("HTTP/1.1", "HTTP/1.0"),
            400,
            "HTTP/1.1",
        ),
        (upgrade_request("/chat/../strict", ""), 400, "dot segments"),
        (
            upgrade_request("/chat/%2e%2e/strict", ""),
            400,
            "dot segments",
        ),
        (
            upgrade_request("/chat", "").replace("Version: 13", "Version: 8"),
            426,
            "unsupported WebSocket version",
        ),
        (
            upgrade_request("/chat", "").replace("GET", "POST"),
            405,
            "requires GET",
        ),
        (upgrade_request("/nowhere", ""), 404, "no route"),
        (upgrade_request("/chatroom", ""), 404, "no route"),
        (upgrade_request("/strict", ""), 403, "Origin"),
        (
            upgrade_request("/strict", "Origin: https://example.com\r\n"),
            403,
            "Origin",
        ),
        (
            upgrade_request("/strict", "Origin: https://example.com.attacker.net\r\n"),
            403,
            "Origin",
        ),
        (
            upgrade_request("/strict", "Origin: null\r\n"),
            403,
            "Origin",
        ),
        (
            upgrade_request("/chat", "Origin: https://evil.example\r\n"),
            403,
            "Origin",
        ),
        (
            upgrade_request("/chat", &format!("X-Big: {}\r\n", "a".repeat(40_000))),
            431,
            "too large",
        ),
    ];
    for (req, status, body) in cases {
        let resp = gate.raw(req.as_bytes()).await;
        assert_eq!(
            status_of(&resp),
            status,
            "request:\n{}\nresponse:\n{resp}",
            &req[..req.len().min(200)]
        );
        assert!(resp.contains(body), "{resp}");
        if status == 426 {
            assert!(resp.contains("Sec-WebSocket-Version: 13"), "{resp}");
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), backend.seen.recv())
            .await
            .is_err(),
        "no refused request reached the backend"
    );
    // The allowed ones pass.
    for origin in ["https://a.example.com", "https://a.b.example.com:443"] {
        let (_ws, resp) = gate.ws("/strict", &[("Origin", origin)]).await.unwrap();
        assert_eq!(resp.status(), 101, "{origin}");
    }
}

#[tokio::test]
async fn head_over_the_limit_gets_431_even_while_the_client_keeps_sending() {
    let backend = EchoBackend::start().await;
    let settings =
        format!("{BASE}\n").replace("[server]\n", "[server]\nmax_request_head = \"1KiB\"\n");
    let gate = Gate::start(&settings, &route("/chat", backend.addr, "")).await;
    let mut s = gate.tls(None).await;
    let big = format!(
        "GET /chat HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(300_000)
    );
    let (mut r, mut w) = tokio::io::split(&mut s);
    let writer = async {
        let _ = w.write_all(big.as_bytes()).await;
    };
    let reader = async { read_all(&mut r).await };
    let (_, resp) = tokio::join!(writer, reader);
    assert_eq!(status_of(&resp), 431, "{resp}");
}

#[tokio::test]
async fn backend_refusal_is_relayed_as_it_is() {
    let addr = raw_backend(
        "HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nWWW-Authenticate: Bearer\r\nContent-Length: 12\r\n\r\nlog in first",
    )
    .await;
    let gate = Gate::start(BASE, &route("/chat", addr, "")).await;
    let resp = gate.raw(upgrade_request("/chat", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 401, "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{resp}"
    );
    assert!(resp.ends_with("log in first"), "{resp}");
}

#[tokio::test]
async fn wrong_accept_from_backend_gives_502() {
    let addr = raw_backend(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n",
    )
    .await;
    let gate = Gate::start(BASE, &route("/chat", addr, "")).await;
    let resp = gate.raw(upgrade_request("/chat", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 502, "{resp}");
}

#[tokio::test]
async fn unoffered_subprotocol_from_backend_gives_502() {
    let addr = raw_backend(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await;
    let gate = Gate::start(BASE, &route("/chat", addr, "")).await;
    let resp = gate
        .raw(upgrade_request("/chat", "Sec-WebSocket-Protocol: chat\r\n").as_bytes())
        .await;
    assert_eq!(status_of(&resp), 502, "{resp}");
}

#[tokio::test]
async fn backend_down_gives_502_and_the_next_backend_is_tried() {
    let dead = dead_addr().await;
    let gate = Gate::start(BASE, &route("/chat", dead, "")).await;
    let resp = gate.raw(upgrade_request("/chat", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 502, "{resp}");

    let backend = EchoBackend::start().await;
    let r = format!(
        "[[routes]]\npath = \"/chat\"\nbackends = [\"{dead}\", \"{}\"]\nallow_missing_origin = true\n",
        backend.addr
    );
    let gate = Gate::start(BASE, &r).await;
    for _ in 0..4 {
        let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(next_data(&mut ws).await.into_text().unwrap().as_str(), "hi");
    }
}

#[tokio::test]
async fn backend_that_never_answers_gives_504() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            conns.push(s);
        }
    });
    let settings = format!("{BASE}\n[upstream]\nresponse_timeout = \"300ms\"\n");
    let gate = Gate::start(&settings, &route("/chat", addr, "")).await;
    let resp = gate.raw(upgrade_request("/chat", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 504, "{resp}");
}

#[tokio::test]
async fn forwarding_headers_and_path_reach_the_backend() {
    let (gate, mut b) = gate_with_echo().await;
    let (_ws, _) = gate
        .ws(
            "/chat/room?x=1",
            &[
                ("X-Forwarded-For", "10.9.9.9"),
                ("X-Real-IP", "6.6.6.6"),
                ("Cookie", "a=b"),
                ("Origin", "https://good.example"),
            ],
        )
        .await
        .unwrap();
    let Seen::Request(h, uri) = b.next().await else {
        panic!("request first")
    };
    assert_eq!(uri, "/chat/room?x=1");
    assert_eq!(h["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["x-forwarded-host"],
        format!("localhost:{}", gate.tls_addr.port())
    );
    assert_eq!(h["host"], format!("localhost:{}", gate.tls_addr.port()));
    assert_eq!(h["cookie"], "a=b");
    assert_eq!(h["origin"], "https://good.example");
    assert!(
        h["forwarded"]
            .to_str()
            .unwrap()
            .starts_with("for=127.0.0.1;proto=https;host=")
    );
}

#[tokio::test]
async fn subprotocol_is_negotiated_through_the_gateway() {
    let (gate, _b) = gate_with_echo().await;
    let (_ws, resp) = gate
        .ws("/chat", &[("Sec-WebSocket-Protocol", "v2.chat, v1.chat")])
        .await
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "v2.chat");
}

#[tokio::test]
async fn sni_picks_the_matching_certificate() {
    let backend = EchoBackend::start().await;
    let pki = Pki::new();
    let (c1, k1) = pki.issue("default", &["localhost"]);
    let (c2, k2) = pki.issue("other", &["other.test"]);
    let text = format!(
        "{BASE}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[[tls.sni]]\nserver_name = \"other.test\"\ncert = \"{}\"\nkey = \"{}\"\n{}",
        c1.display(),
        k1.display(),
        c2.display(),
        k2.display(),
        route("/chat", backend.addr, "")
    );
    let gate = Gate::start_with(pki, &text).await;
    for (name, expect) in [("other.test", &c2), ("localhost", &c1)] {
        let s = gate.tls(Some(name)).await;
        let leaf = s.get_ref().1.peer_certificates().unwrap()[0].clone();
        let pem = std::fs::read(expect).unwrap();
        let want = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(
            leaf.as_ref(),
            want.as_ref() as &[u8],
            "certificate for {name}"
        );
    }
}

#[tokio::test]
async fn a_thousand_concurrent_tunnels_echo_without_loss() {
    let (gate, _b) = gate_with_echo().await;
    let gate = std::sync::Arc::new(gate);
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
            let mut echoed = 0;
            for j in 0..5u32 {
                let msg = format!("{i}:{j}");
                ws.send(Message::text(msg.clone())).await.unwrap();
                if next_data(&mut ws).await.into_text().unwrap().as_str() == msg {
                    echoed += 1;
                }
            }
            (ws, echoed)
        }));
    }
    let mut open = Vec::new();
    let mut echoed = 0;
    for t in tasks {
        let (ws, n) = t.await.unwrap();
        echoed += n;
        open.push(ws);
    }
    assert_eq!(echoed, 5000, "every message of every tunnel came back");
    assert_eq!(
        gate.handle.activity().tunnels,
        1000,
        "all of them open at once"
    );
}

#[tokio::test]
async fn data_sent_right_after_the_handshake_is_not_lost() {
    let (gate, _b) = gate_with_echo().await;
    let mut s = gate.tls(None).await;
    // Handshake and a masked text frame "hi" in one write.
    let mut bytes = upgrade_request("/chat", "").into_bytes();
    bytes.extend_from_slice(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
    s.write_all(&bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(&[0x81, 2, b'h', b'i']) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 101"));
}

#[tokio::test]
async fn unix_socket_backend_serves_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let mut seen = unix_echo_backend(&sock).await;
    let r = format!(
        "[[routes]]\npath = \"/chat\"\nbackends = [\"unix:{}\"]\nallow_missing_origin = true\n",
        sock.display()
    );
    let gate = Gate::start(BASE, &r).await;
    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    ws.send(Message::text("over a unix socket")).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await.into_text().unwrap().as_str(),
        "over a unix socket"
    );
    let Some(Seen::Request(h, _)) = seen.recv().await else {
        panic!("request first")
    };
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_readable_400() {
    let (gate, _b) = gate_with_echo().await;
    let mut s = tokio::net::TcpStream::connect(gate.tls_addr).await.unwrap();
    s.write_all(upgrade_request("/chat", "").as_bytes())
        .await
        .unwrap();
    let resp = read_all(&mut s).await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert!(resp.contains("TLS port"), "{resp}");
}

#[tokio::test]
async fn ipv6_clients_are_served_and_forwarded_with_quoted_addresses() {
    let mut backend = EchoBackend::start().await;
    let settings = BASE.replace("listen = [\"127.0.0.1:0\"]", "listen = [\"[::1]:0\"]");
    let gate = Gate::start(&settings, &route("/chat", backend.addr, "")).await;
    assert!(gate.tls_addr.is_ipv6());
    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    ws.send(Message::text("v6")).await.unwrap();
    assert_eq!(next_data(&mut ws).await.into_text().unwrap().as_str(), "v6");
    let Seen::Request(h, _) = backend.next().await else {
        panic!("request first")
    };
    assert_eq!(h["x-forwarded-for"], "::1");
    assert_eq!(h["x-real-ip"], "::1");
    assert!(
        h["forwarded"]
            .to_str()
            .unwrap()
            .starts_with("for=\"[::1]\";proto=https"),
        "{:?}",
        h["forwarded"]
    );
}

/// A rustls client driven by hand over a blocking socket (5 s read timeout), for tests that
/// control exactly which TLS records go out in which write.
fn blocking_tls_client(
    addr: std::net::SocketAddr,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> (rustls::ClientConnection, std::net::TcpStream) {
    let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (conn, tcp)
}

#[tokio::test]
async fn request_sent_in_the_same_write_as_the_client_finished_is_served() {
    let (gate, _b) = gate_with_echo().await;
    let (addr, cfg) = (gate.tls_addr, gate.pki.client_config());
    let resp = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let (mut conn, mut tcp) = blocking_tls_client(addr, cfg);
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut tcp).unwrap();
            }
            if conn.is_handshaking() {
                conn.read_tls(&mut tcp).unwrap();
                conn.process_new_packets().unwrap();
            }
        }
        // The client Finished is still queued: the request joins it in one write.
        conn.writer()
            .write_all(upgrade_request("/chat", "").as_bytes())
            .unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        tcp.write_all(&out).unwrap();
        let mut text = Vec::new();
        while !text.windows(4).any(|w| w == b"\r\n\r\n") {
            if conn.read_tls(&mut tcp).unwrap() == 0 {
                break;
            }
            conn.process_new_packets().unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.reader().read(&mut buf) {
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    })
    .await
    .unwrap();
    assert_eq!(status_of(&resp), 101, "{resp}");
}

#[tokio::test]
async fn tunnel_survives_a_client_key_update() {
    let (gate, _b) = gate_with_echo().await;
    let (addr, cfg) = (gate.tls_addr, gate.pki.client_config());
    let echoed = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let (mut conn, mut tcp) = blocking_tls_client(addr, cfg);
        let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
        tls.write_all(upgrade_request("/chat", "").as_bytes())
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        let mut echoed = Vec::new();
        for round in 0..3u8 {
            // TLS 1.3 KeyUpdate, asking the gateway to update its keys too.
            tls.conn.refresh_traffic_keys().unwrap();
            let payload = [b'k', b'u', b'0' + round];
            tls.write_all(&client_frame(0x1, &payload)).unwrap();
            let mut frame = Vec::new();
            while frame.len() < 2 + payload.len() {
                let n = tls.read(&mut buf).unwrap();
                assert!(n > 0, "closed after a key update");
                frame.extend_from_slice(&buf[..n]);
            }
            echoed.push(String::from_utf8_lossy(&frame[2..]).into_owned());
        }
        echoed
    })
    .await
    .unwrap();
    assert_eq!(echoed, ["ku0", "ku1", "ku2"]);
}

#[tokio::test]
async fn tls13_prefers_aes_128_gcm_over_the_clients_order() {
    let (gate, _b) = gate_with_echo().await;
    let s = gate.tls(None).await;
    let conn = s.get_ref().1;
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        conn.negotiated_cipher_suite().map(|c| c.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519)
    );
}

#[tokio::test]
async fn post_quantum_key_exchange_is_offered_and_tunnels_work_over_it() {
    use tungstenite::client::IntoClientRequest;
    let (gate, _b) = gate_with_echo().await;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768];
    let cfg = gate.pki.client_config_with(provider);
    let tls = tls_connect(gate.tls_addr, cfg, "localhost").await.unwrap();
    assert_eq!(
        tls.get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    let req = gate.url("/chat").into_client_request().unwrap();
    let tls = tokio_tungstenite::MaybeTlsStream::Rustls(tls);
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over ML-KEM")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("over ML-KEM"));
}

/// Connects twice with one client config (which keeps tickets) and echoes once each time;
/// returns how the second TLS handshake went.
async fn second_handshake_kind(gate: &Gate) -> rustls::HandshakeKind {
    use tungstenite::client::IntoClientRequest;
    let cfg = gate.pki.client_config();
    let mut kind = None;
    for _ in 0..2 {
        let tls = tls_connect(gate.tls_addr, cfg.clone(), "localhost")
            .await
            .unwrap();
        let req = gate.url("/chat").into_client_request().unwrap();
        let tls = tokio_tungstenite::MaybeTlsStream::Rustls(tls);
        let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text("hi"));
        if let tokio_tungstenite::MaybeTlsStream::Rustls(s) = ws.get_ref() {
            kind = s.get_ref().1.handshake_kind();
        }
        ws.close(None).await.unwrap();
    }
    kind.unwrap()
}

#[tokio::test]
async fn session_tickets_let_a_returning_client_resume() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(BASE, &route("/chat", backend.addr, "")).await;
    assert_eq!(
        second_handshake_kind(&gate).await,
        rustls::HandshakeKind::Resumed
    );
}

#[tokio::test]
async fn session_tickets_off_means_every_handshake_is_full() {
    let backend = EchoBackend::start().await;
    let routes = format!(
        "session_tickets = false\n{}",
        route("/chat", backend.addr, "")
    );
    let gate = Gate::start(BASE, &routes).await;
    assert_eq!(
        second_handshake_kind(&gate).await,
        rustls::HandshakeKind::Full
    );
}
