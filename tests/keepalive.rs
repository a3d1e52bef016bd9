//! Keepalive, timeouts and frame limits of established tunnels, with short intervals.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn ws_settings(extra: &str) -> String {
    format!("{BASE}\n[websocket]\n{extra}\n")
}

#[tokio::test]
async fn silent_client_is_closed_after_ping_and_pong_timeout_and_backend_gets_1001() {
    let mut backend = EchoBackend::start().await;
    let gate = Gate::start(
        &ws_settings("ping_interval = \"200ms\"\npong_timeout = \"200ms\""),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let started = Instant::now();
    let mut raw = RawWs::connect(&gate, "/chat").await;
    // The client reads but never answers pings.
    let (op, payload) = raw.frame().await.expect("a gateway ping");
    assert_eq!(op, 0x9);
    let close = loop {
        let (op, payload) = raw.frame().await.expect("a close frame before EOF");
        if op == 0x8 {
            break payload;
        }
    };
    assert_eq!(code_of(&close), 1001);
    assert_eq!(&close[2..], b"ping timeout");
    assert!(
        started.elapsed() < Duration::from_millis(400 + 1500),
        "closed within interval + timeout + slack"
    );
    assert_eq!(payload.len(), 8);
    let c = backend
        .next_close()
        .await
        .expect("backend told with a Close frame");
    assert_eq!(u16::from(c.code), 1001);
    assert_eq!(c.reason.as_str(), "ping timeout");
    let m = metrics_when_no_tunnel_is_open(&gate).await;
    assert!(
        m.lines().any(|l| l == "wsgate_ping_timeouts_total 1"),
        "{m}"
    );
}

#[tokio::test]
async fn answering_client_stays_connected_and_backend_never_sees_gateway_pongs() {
    let mut backend = EchoBackend::start().await;
    let gate = Gate::start(
        &ws_settings("ping_interval = \"100ms\"\npong_timeout = \"300ms\""),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    let mut pings = 0;
    let mut echoed = 0;
    let until = Instant::now() + Duration::from_millis(900);
    let mut i = 0;
    while Instant::now() < until {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(2), ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
            {
                Message::Ping(_) => pings += 1,
                Message::Text(t) => {
                    assert_eq!(t.as_str(), format!("m{i}"));
                    echoed += 1;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(pings >= 4, "several gateway pings answered ({pings})");
    assert_eq!(echoed, i);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    // Everything the backend saw: the request, the data messages, the close. No pongs.
    loop {
        match backend.next().await {
            Seen::Message(Message::Pong(p)) => panic!("backend saw a gateway pong {p:?}"),
            Seen::Close(_) | Seen::Gone => break,
            _ => {}
        }
    }
}

#[tokio::test]
async fn idle_tunnel_is_closed_with_1001_idle_timeout_both_ways() {
    let mut backend = EchoBackend::start().await;
    let gate = Gate::start(
        &ws_settings("ping_interval = \"0s\"\nidle_timeout = \"300ms\""),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    ws.send(Message::text("one")).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await.into_text().unwrap().as_str(),
        "one"
    );
    let started = Instant::now();
    match next_data(&mut ws).await {
        Message::Close(Some(c)) => {
            assert_eq!(u16::from(c.code), 1001);
            assert_eq!(c.reason.as_str(), "idle timeout");
        }
        other => panic!("expected close, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
    let c = backend.next_close().await.expect("backend close");
    assert_eq!(
        (u16::from(c.code), c.reason.as_str()),
        (1001, "idle timeout")
    );
}

#[tokio::test]
async fn control_frames_do_not_count_as_activity() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        &ws_settings("ping_interval = \"0s\"\nidle_timeout = \"400ms\""),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let mut raw = RawWs::connect(&gate, "/chat").await;
    let started = Instant::now();
    let pinger = async {
        loop {
            raw.send(&client_frame(0x9, b"keep")).await;
            match tokio::time::timeout(Duration::from_millis(100), raw.frame()).await {
                Ok(Some((0x8, p))) => return p,
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => panic!("closed without a close frame"),
            }
        }
    };
    let close = tokio::time::timeout(Duration::from_secs(5), pinger)
        .await
        .expect("idle close despite pings");
    assert_eq!(code_of(&close), 1001);
    assert!(started.elapsed() >= Duration::from_millis(350));
}

#[tokio::test]
async fn frame_over_max_frame_size_gets_1009_and_backend_1001() {
    let mut backend = EchoBackend::start().await;
    let gate = Gate::start(
        &ws_settings("max_frame_size = \"1KiB\""),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    ws.send(Message::binary(vec![1u8; 1024])).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await.into_data().len(),
        1024,
        "a frame at the limit passes"
    );
    ws.send(Message::binary(vec![1u8; 1025])).await.unwrap();
    match next_data(&mut ws).await {
        Message::Close(Some(c)) => assert_eq!(u16::from(c.code), 1009),
        other => panic!("expected 1009, got {other:?}"),
    }
    let c = backend.next_close().await.expect("backend close");
    assert_eq!(u16::from(c.code), 1001);
}

#[tokio::test]
async fn unmasked_client_frame_gets_1002() {
    let mut backend = EchoBackend::start().await;
    let gate = Gate::start(BASE, &route("/chat", backend.addr, "")).await;
    let mut raw = RawWs::connect(&gate, "/chat").await;
    raw.send(&[0x81, 0x02, b'h', b'i']).await;
    let (op, p) = raw.frame().await.expect("close frame");
    assert_eq!((op, code_of(&p)), (0x8, 1002));
    let c = backend.next_close().await.expect("backend close");
    assert_eq!(u16::from(c.code), 1001);
    assert_eq!(c.reason.as_str(), "client protocol error: unmasked frame");
}

#[tokio::test]
async fn tunnel_older_than_max_lifetime_is_closed() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        &ws_settings("max_lifetime = \"300ms\""),
        &route("/chat", backend.addr, ""),
    )
    .await;
    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    match next_data(&mut ws).await {
        Message::Close(Some(c)) => assert_eq!(
            (u16::from(c.code), c.reason.as_str()),
            (1001, "max lifetime")
        ),
        other => panic!("expected close, got {other:?}"),
    }
}

#[tokio::test]
async fn the_gateways_close_frames_to_backends_carry_random_mask_keys() {
    let (addr, mut frames) = raw_ws_backend().await;
    let gate = Gate::start(
        &ws_settings("ping_interval = \"0s\"\nidle_timeout = \"200ms\""),
        &route("/chat", addr, ""),
    )
    .await;
    // Tunnels that relay nothing and idle out: the case where a counter-derived key was zero.
    let mut keys = Vec::new();
    for _ in 0..2 {
        let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
        let f = tokio::time::timeout(Duration::from_secs(5), frames.recv())
            .await
            .expect("the backend gets the gateway's close")
            .unwrap();
        assert_eq!(f.opcode, 8);
        assert_eq!(&f.payload[..2], &1001u16.to_be_bytes());
        keys.push(f.mask.expect("frames to a backend are masked"));
        while let Some(Ok(_)) = ws.next().await {}
    }
    assert!(keys.iter().all(|k| *k != [0; 4]), "{keys:?}");
    assert_ne!(keys[0], keys[1], "each close has its own key");
}
