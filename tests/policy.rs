//! Per-tunnel policies over what a client sends: message size (decided from frame headers,
//! the crossing frame never forwarded), message and byte rates (throttled by backpressure, or
//! closed with 1008), per-route overrides, and reloads that leave open tunnels as they were.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// A masked client frame with FIN as given.
fn fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = client_frame(opcode, payload);
    if !fin {
        f[0] &= 0x7f;
    }
    f
}

fn limited(path: &str, backend: std::net::SocketAddr, websocket: &str) -> String {
    format!(
        "{}[routes.websocket]\n{websocket}\n",
        route(path, backend, "")
    )
}

/// The next frame a raw backend saw, within a few seconds.
async fn seen(frames: &mut tokio::sync::mpsc::UnboundedReceiver<RawFrame>) -> RawFrame {
    tokio::time::timeout(Duration::from_secs(5), frames.recv())
        .await
        .expect("a frame in time")
        .expect("backend alive")
}

/// Reads frames off a raw client until a Close; its code and reason.
async fn close_of(raw: &mut RawWs) -> (u16, String) {
    loop {
        let (op, payload) = raw.frame().await.expect("a Close before EOF");
        if op == 0x8 {
            return (
                code_of(&payload),
                String::from_utf8_lossy(&payload[2..]).into_owned(),
            );
        }
    }
}

#[tokio::test]
async fn a_64_kib_message_passes_and_one_byte_more_in_one_frame_is_refused_before_its_payload() {
    let (addr, mut frames) = raw_ws_backend().await;
    let gate = Gate::start(
        BASE,
        &limited("/game", addr, "max_message_size = \"64KiB\""),
    )
    .await;
    let mut raw = RawWs::connect(&gate, "/game").await;
    raw.send(&client_frame(0x2, &vec![7u8; 65536])).await;
    let f = seen(&mut frames).await;
    assert_eq!(
        (f.opcode, f.payload.len()),
        (0x2, 65536),
        "exactly 64 KiB passes"
    );

    let mut big = fragment(true, 0x2, &vec![7u8; 65537]);
    // Only the header and a little of the payload go out before the gateway's answer.
    big.truncate(64);
    raw.send(&big).await;
    assert_eq!(close_of(&mut raw).await, (1009, "message too big".into()));
    let f = seen(&mut frames).await;
    assert_eq!(
        f.opcode, 0x8,
        "the backend gets the Close and nothing of the frame"
    );
    assert_eq!(code_of(&f.payload), 1001);
    assert_eq!(&f.payload[2..], b"message too big");
    assert!(f.mask.is_some());
}

#[tokio::test]
async fn a_fragmented_message_is_refused_at_the_frame_that_crosses_the_limit() {
    let (addr, mut frames) = raw_ws_backend().await;
    let gate = Gate::start(
        BASE,
        &limited("/game", addr, "max_message_size = \"64KiB\""),
    )
    .await;
    let mut raw = RawWs::connect(&gate, "/game").await;
    let mut wire = Vec::new();
    for i in 0..64 {
        wire.extend(fragment(
            false,
            if i == 0 { 0x2 } else { 0x0 },
            &[1u8; 1024],
        ));
        // Control frames between fragments do not count toward the message.
        wire.extend(fragment(true, 0x9, &[0u8; 125]));
    }
    wire.extend(fragment(true, 0x0, &[2u8; 1]));
    raw.send(&wire).await;
    assert_eq!(close_of(&mut raw).await, (1009, "message too big".into()));
    let mut data = 0;
    loop {
        let f = seen(&mut frames).await;
        match f.opcode {
            0x0 | 0x2 => {
                assert_eq!(
                    f.payload,
                    vec![1u8; 1024],
                    "only the 64 fragments before the crossing one"
                );
                data += 1;
            }
            0x9 => {}
            0x8 => {
                assert_eq!(code_of(&f.payload), 1001);
                break;
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
    assert_eq!(data, 64);
}

#[tokio::test]
async fn pings_between_fragments_do_not_count_toward_the_message() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        BASE,
        &limited("/game", backend.addr, "max_message_size = \"64KiB\""),
    )
    .await;
    let mut raw = RawWs::connect(&gate, "/game").await;
    let mut wire = Vec::new();
    for i in 0..64 {
        wire.extend(fragment(
            i == 63,
            if i == 0 { 0x2 } else { 0x0 },
            &[3u8; 1024],
        ));
        wire.extend(fragment(true, 0x9, &[0u8; 125]));
    }
    raw.send(&wire).await;
    // The backend answers the pings and echoes the 64 KiB message whole.
    loop {
        let (op, payload) = raw.frame().await.expect("the echo");
        if op == 0x2 {
            assert_eq!(payload.len(), 65536);
            break;
        }
        assert_eq!(op, 0xA, "pongs before the echo");
    }
}

#[tokio::test]
async fn a_message_rate_throttles_the_client_while_the_backend_keeps_talking() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        BASE,
        &limited(
            "/r",
            backend.addr,
            "client_message_rate = 10\nclient_message_burst = 10\nping_interval = \"1s\"\npong_timeout = \"1s\"",
        ),
    )
    .await;
    let (ws, _) = gate.ws("/r", &[]).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let started = Instant::now();
    tx.send(Message::text("burst:100")).await.unwrap();
    for i in 0..100 {
        tx.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    let (mut echoes, mut own) = (0, 0);
    let mut backend_done = None;
    while echoes < 100 {
        let m = tokio::time::timeout(Duration::from_secs(20), rx.next())
            .await
            .expect("messages keep coming")
            .expect("open")
            .expect("no error");
        match m {
            Message::Text(t) if t.starts_with('m') => {
                assert_eq!(t.as_str(), format!("m{echoes}"), "in order");
                echoes += 1;
            }
            Message::Text(t) => {
                assert_eq!(t.as_str(), format!("b{own}"));
                own += 1;
                if own == 100 {
                    backend_done = Some(started.elapsed());
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}, the tunnel must stay open"),
        }
    }
    let took = started.elapsed();
    // 101 messages with a burst of 10 at 10 per second: the last after about nine seconds.
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(15),
        "{took:?}"
    );
    let backend_done = backend_done.expect("the backend's messages all arrived first");
    assert!(
        backend_done < Duration::from_secs(2),
        "the backend-to-client direction kept full speed: {backend_done:?}"
    );
    let mut ws = tx.reunite(rx).unwrap();
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let m = metrics_when_no_tunnel_is_open(&gate).await;
    let throttled: f64 = m
        .lines()
        .find(|l| l.starts_with("wsgate_throttled_seconds_total{route=\"/r\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(throttled > 5.0, "{m}");
}

#[tokio::test]
async fn a_message_rate_with_close_ends_the_tunnel_after_the_burst() {
    let mut backend = EchoBackend::start().await;
    let gate = Gate::start(
        BASE,
        &limited(
            "/r",
            backend.addr,
            "client_message_rate = 10\nclient_message_burst = 10\nrate_limit_action = \"close\"",
        ),
    )
    .await;
    let (mut ws, _) = gate.ws("/r", &[]).await.unwrap();
    for i in 0..11 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    loop {
        match next_data(&mut ws).await {
            Message::Text(_) => {}
            Message::Close(Some(c)) => {
                assert_eq!(
                    (u16::from(c.code), c.reason.as_str()),
                    (1008, "message rate exceeded")
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // The backend got the burst, then the gateway's Close instead of the eleventh message.
    let mut received = 0;
    let c = loop {
        match backend.next().await {
            Seen::Message(Message::Text(_)) => received += 1,
            Seen::Close(c) => break c.expect("a close frame"),
            Seen::Gone => panic!("the backend was not told"),
            _ => {}
        }
    };
    assert_eq!(
        received, 10,
        "the burst passes, the eleventh message does not"
    );
    assert_eq!(
        (u16::from(c.code), c.reason.as_str()),
        (1001, "message rate exceeded")
    );
    while let Some(Ok(_)) = ws.next().await {}
    let m = metrics_when_no_tunnel_is_open(&gate).await;
    assert!(
        m.contains("wsgate_policy_closes_total{route=\"/r\",policy=\"message_rate\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_byte_rate_throttles_and_with_close_ends_the_tunnel() {
    let backend = EchoBackend::start().await;
    let routes = format!(
        "{}{}",
        limited(
            "/slow",
            backend.addr,
            "client_byte_rate = 1000\nclient_byte_burst = 1000"
        ),
        limited(
            "/strict",
            backend.addr,
            "client_byte_rate = \"1000B\"\nclient_byte_burst = 1000\nrate_limit_action = \"close\""
        )
    );
    let gate = Gate::start(BASE, &routes).await;
    let (mut ws, _) = gate.ws("/slow", &[]).await.unwrap();
    let started = Instant::now();
    let payload = "x".repeat(100);
    for _ in 0..30 {
        ws.send(Message::text(payload.clone())).await.unwrap();
    }
    for _ in 0..30 {
        assert_eq!(
            next_data(&mut ws).await.into_text().unwrap().as_str(),
            payload
        );
    }
    // 3000 bytes with a burst of 1000 at 1000 per second: about two seconds.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );

    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}

    let (mut ws, _) = gate.ws("/strict", &[]).await.unwrap();
    for _ in 0..11 {
        ws.send(Message::text(payload.clone())).await.unwrap();
    }
    let close = loop {
        match next_data(&mut ws).await {
            Message::Text(_) => {}
            Message::Close(c) => break c.unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1008, "byte rate exceeded")
    );
    while let Some(Ok(_)) = ws.next().await {}
    let m = metrics_when_no_tunnel_is_open(&gate).await;
    assert!(
        m.contains("wsgate_policy_closes_total{route=\"/strict\",policy=\"byte_rate\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_route_override_applies_to_that_route_only() {
    let backend = EchoBackend::start().await;
    let routes = format!(
        "{}{}",
        route("/chat", backend.addr, ""),
        limited("/game", backend.addr, "max_message_size = \"1KiB\"")
    );
    let gate = Gate::start(BASE, &routes).await;
    let big = "y".repeat(2048);
    let (mut chat, _) = gate.ws("/chat", &[]).await.unwrap();
    chat.send(Message::text(big.clone())).await.unwrap();
    assert_eq!(
        next_data(&mut chat).await.into_text().unwrap().as_str(),
        big
    );
    let (mut game, _) = gate.ws("/game", &[]).await.unwrap();
    game.send(Message::text(big.clone())).await.unwrap();
    match next_data(&mut game).await {
        Message::Close(Some(c)) => assert_eq!(u16::from(c.code), 1009),
        other => panic!("expected 1009, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reload_that_changes_a_routes_limits_applies_to_new_tunnels_only() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        BASE,
        &limited("/game", backend.addr, "max_message_size = \"1KiB\""),
    )
    .await;
    let (mut old, _) = gate.ws("/game", &[]).await.unwrap();
    let text = std::fs::read_to_string(&gate.config_path).unwrap();
    std::fs::write(
        &gate.config_path,
        text.replace("max_message_size = \"1KiB\"", "max_message_size = \"4KiB\""),
    )
    .unwrap();
    gate.handle.reload().await.unwrap();
    let big = "z".repeat(2048);
    let (mut new, _) = gate.ws("/game", &[]).await.unwrap();
    new.send(Message::text(big.clone())).await.unwrap();
    assert_eq!(next_data(&mut new).await.into_text().unwrap().as_str(), big);
    old.send(Message::text(big)).await.unwrap();
    match next_data(&mut old).await {
        Message::Close(Some(c)) => assert_eq!(u16::from(c.code), 1009, "kept its 1 KiB limit"),
        other => panic!("expected 1009, got {other:?}"),
    }
}

#[test]
fn unknown_keys_in_a_routes_websocket_table_are_refused_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten_plain = [\"127.0.0.1:1\"]\nlisten = []\n[[routes]]\npath = \"/g\"\n\
         backends = [\"127.0.0.1:2\"]\n[routes.websocket]\nmax_mesage_size = 10\n",
    )
    .unwrap();
    let text = check_refuses(&path);
    assert!(text.contains("bad.toml:8:"), "{text}");
    assert!(text.contains("max_mesage_size"), "{text}");
}
