//! The control plane: tunnels listed with their fields and narrowed by every filter, closed by
//! share, subject or id with the operator's code, backends drained and enabled, the token, the
//! lifetime jitter and the tunnel-duration histogram.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// An auth service that names the subject the client claims in `X-Who`.
async fn who_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let who = req
                            .headers()
                            .get("x-forwarded-uri")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|u| u.split("who=").nth(1))
                            .unwrap_or("nobody")
                            .to_string();
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("x-user-id", who)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Admin API call: method, path with query, optional JSON body, optional token.
async fn call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let text = read_all(&mut s).await;
    let status = status_of(&text);
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

struct Fleet {
    gate: Gate,
    a: EchoBackend,
    b: EchoBackend,
    /// Each tunnel with the client address the gateway saw.
    tunnels: Vec<(Ws, SocketAddr, &'static str, &'static str)>,
}

/// 40 tunnels: routes /a and /b, backends A and B each, subjects alice and bob.
async fn fleet(extra_settings: &str) -> Fleet {
    let auth = who_service().await;
    let (a, b) = (EchoBackend::start().await, EchoBackend::start().await);
    let route = |p: &str| {
        format!(
            "[[routes]]\npath = \"{p}\"\nbackends = [\"{}\", \"{}\"]\nallow_missing_origin = true\nauth = \"who\"\n",
            a.addr, b.addr
        )
    };
    let routes = format!(
        "[[auth]]\nname = \"who\"\ntype = \"forward\"\nurl = \"http://{auth}/\"\nsubject_header = \"X-User-Id\"\n{}{}",
        route("/a"),
        route("/b")
    );
    let settings = format!("{BASE}\n{extra_settings}");
    let gate = Gate::start(&settings, &routes).await;
    let mut tunnels = Vec::new();
    for i in 0..40 {
        let path = if i < 20 { "/a" } else { "/b" };
        let who = if i % 4 < 2 { "alice" } else { "bob" };
        let (ws, local) = ws_from(&gate, &format!("{path}?who={who}")).await;
        tunnels.push((ws, local, path, who));
    }
    for (ws, ..) in &mut tunnels {
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(next_data(ws).await.into_text().unwrap().as_str(), "hi");
    }
    Fleet {
        gate,
        a,
        b,
        tunnels,
    }
}

/// A tunnel and the local address its client connected from.
async fn ws_from(gate: &Gate, path: &str) -> (Ws, SocketAddr) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let req = gate.url(path).into_client_request().unwrap();
    let tcp = tokio::net::TcpStream::connect(gate.tls_addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let connector = tokio_tungstenite::Connector::Rustls(gate.pki.client_config());
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector))
        .await
        .unwrap();
    (ws, local)
}

#[tokio::test]
async fn tunnels_are_listed_with_their_fields_and_every_filter_narrows_them() {
    let f = fleet("").await;
    let admin = f.gate.admin.unwrap();
    let (status, all) = call(admin, "GET", "/tunnels", None, None).await;
    assert_eq!(status, 200, "{all}");
    let list = all["tunnels"].as_array().unwrap();
    assert_eq!(list.len(), 40);
    assert_eq!(all["truncated"], false);
    let by_client: std::collections::HashMap<String, &Value> = list
        .iter()
        .map(|t| (t["client"].as_str().unwrap().to_string(), t))
        .collect();
    for (_, local, path, who) in &f.tunnels {
        let t = by_client[&local.to_string()];
        assert_eq!(t["route"], *path);
        assert_eq!(t["subject"], *who);
        assert!(
            [f.a.addr.to_string(), f.b.addr.to_string()]
                .contains(&t["backend"].as_str().unwrap().to_string())
        );
        assert!(t["id"].is_string());
        assert!(
            humantime::parse_rfc3339(t["opened_at"].as_str().unwrap()).is_ok(),
            "{t}"
        );
        assert!(t["age_seconds"].as_f64().unwrap() > 0.0);
        // One echo of "hi": a masked frame of 2 + 4 + 2 bytes in, an unmasked one of 4 out.
        assert_eq!(
            (
                t["frames_from_client"].as_u64(),
                t["bytes_from_client"].as_u64()
            ),
            (Some(1), Some(8))
        );
        assert_eq!(
            (
                t["frames_to_client"].as_u64(),
                t["bytes_to_client"].as_u64()
            ),
            (Some(1), Some(4))
        );
    }
    let n = |q: &str| {
        let q = q.to_string();
        async move {
            let (s, v) = call(admin, "GET", &format!("/tunnels?{q}"), None, None).await;
            assert_eq!(s, 200, "{q}: {v}");
            v["tunnels"].as_array().unwrap().len()
        }
    };
    assert_eq!(n("route=/a").await, 20);
    assert_eq!(n(&format!("backend={}", f.a.addr)).await, 20);
    assert_eq!(n("subject=alice").await, 20);
    assert_eq!(n("subject=alice&route=/b").await, 10);
    assert_eq!(n(&format!("client={}", f.tunnels[3].1)).await, 1);
    assert_eq!(n("client=127.0.0.0/8").await, 40);
    assert_eq!(n("client=10.0.0.0/8").await, 0);
    assert_eq!(n("older_than=1h").await, 0);
    assert_eq!(n("older_than=0s").await, 40);
    let (_, five) = call(admin, "GET", "/tunnels?limit=5", None, None).await;
    assert_eq!(
        (
            five["tunnels"].as_array().unwrap().len(),
            &five["truncated"]
        ),
        (5, &Value::Bool(true))
    );
    let (s, bad) = call(admin, "GET", "/tunnels?older_than=soon", None, None).await;
    assert_eq!(s, 400);
    assert!(
        bad["error"].as_str().unwrap().starts_with("older_than"),
        "{bad}"
    );
}

#[tokio::test]
async fn closing_half_of_a_route_spreads_its_closes_and_leaves_the_other_route() {
    let mut f = fleet("").await;
    let admin = f.gate.admin.unwrap();
    let started = Instant::now();
    let (s, v) = call(
        admin,
        "POST",
        "/tunnels/close?route=/a&percent=50&spread=2s&code=1012",
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["matched"].as_u64(), v["closing"].as_u64()),
        (Some(20), Some(10))
    );
    let waits = f.tunnels.drain(..).map(|(mut ws, _, path, _)| async move {
        let got = tokio::time::timeout(Duration::from_secs(4), next_data(&mut ws)).await;
        (path, got.ok().map(|m| (m, Instant::now())))
    });
    let results = futures_util::future::join_all(waits).await;
    let mut closes = Vec::new();
    for (path, r) in results {
        match r {
            Some((Message::Close(Some(c)), at)) => {
                assert_eq!(path, "/a", "only route /a is closed");
                assert_eq!(
                    (u16::from(c.code), c.reason.as_str()),
                    (1012, "closed by operator")
                );
                closes.push(at - started);
            }
            Some((other, _)) => panic!("unexpected {other:?}"),
            None => {}
        }
    }
    assert_eq!(closes.len(), 10);
    let (first, last) = (closes.iter().min().unwrap(), closes.iter().max().unwrap());
    assert!(
        *last - *first >= Duration::from_millis(1200),
        "spread over 2 s: {first:?}..{last:?}"
    );
    assert!(*last < Duration::from_millis(3000));
    let mut backend_closes = 0;
    for b in [&mut f.a, &mut f.b] {
        while let Ok(Some(ev)) =
            tokio::time::timeout(Duration::from_millis(300), b.seen.recv()).await
        {
            if let Seen::Close(Some(c)) = ev {
                assert_eq!(
                    (u16::from(c.code), c.reason.as_str()),
                    (1001, "closed by operator")
                );
                backend_closes += 1;
            }
        }
    }
    assert_eq!(backend_closes, 10, "the backends got a masked 1001 each");
    let m = f.gate.metrics().await;
    assert!(
        m.contains("wsgate_admin_actions_total{action=\"close_tunnels\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn closing_by_subject_and_by_id() {
    let f = fleet("").await;
    let admin = f.gate.admin.unwrap();
    let (s, v) = call(
        admin,
        "POST",
        "/tunnels/close",
        Some(r#"{"subject": "bob", "code": 4001, "reason": "revoked"}"#),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["matched"].as_u64(), v["closing"].as_u64()),
        (Some(20), Some(20))
    );
    let mut alices = Vec::new();
    for (mut ws, local, _, who) in f.tunnels {
        if who == "bob" {
            match next_data(&mut ws).await {
                Message::Close(Some(c)) => {
                    assert_eq!((u16::from(c.code), c.reason.as_str()), (4001, "revoked"))
                }
                other => panic!("expected bob's close, got {other:?}"),
            }
        } else {
            alices.push((ws, local));
        }
    }
    f.gate.handle.wait_until(|a| a.tunnels == 20).await;
    let (_, left) = call(admin, "GET", "/tunnels", None, None).await;
    assert_eq!(left["tunnels"].as_array().unwrap().len(), 20);
    assert!(
        left["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["subject"] == "alice")
    );
    let (mut ws, local) = alices.pop().unwrap();
    let id = left["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["client"] == local.to_string())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _) = call(
        admin,
        "POST",
        &format!("/tunnels/{id}/close?code=1000&reason=bye"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    match next_data(&mut ws).await {
        Message::Close(Some(c)) => {
            assert_eq!((u16::from(c.code), c.reason.as_str()), (1000, "bye"))
        }
        other => panic!("expected the close, got {other:?}"),
    }
    for (other, _) in &mut alices {
        other.send(Message::text("still")).await.unwrap();
        assert_eq!(
            next_data(other).await.into_text().unwrap().as_str(),
            "still"
        );
    }
    // The other nineteen are still open (and held here, so none closes on its own).
    f.gate.handle.wait_until(|a| a.tunnels == 19).await;
    let (_, left) = call(admin, "GET", "/tunnels", None, None).await;
    assert_eq!(left["tunnels"].as_array().unwrap().len(), 19);
    let (s, v) = call(admin, "POST", &format!("/tunnels/{id}/close"), None, None).await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test]
async fn a_drained_backend_gets_nothing_new_its_tunnels_close_and_enable_brings_it_back() {
    let mut f = fleet("").await;
    let admin = f.gate.admin.unwrap();
    let q = format!("/backends/drain?route=/a&backend={}&spread=500ms", f.a.addr);
    let (s, v) = call(admin, "POST", &q, None, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["closing"].as_u64(), Some(10));
    let (_, list) = call(admin, "GET", "/backends", None, None).await;
    let entry = |list: &Value, route: &str, backend: SocketAddr| {
        list["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["route"] == route && b["backend"] == backend.to_string())
            .cloned()
            .unwrap()
    };
    assert_eq!(entry(&list, "/a", f.a.addr)["state"], "draining");
    assert_eq!(
        entry(&list, "/b", f.a.addr)["state"],
        "up",
        "a drain is per route"
    );
    assert_eq!(
        entry(&list, "/a", f.b.addr)["health"],
        Value::Null,
        "no checks configured"
    );
    let mut closed = 0;
    for (ws, ..) in f.tunnels.iter_mut().filter(|t| t.2 == "/a") {
        if let Ok(Message::Close(Some(c))) =
            tokio::time::timeout(Duration::from_millis(1500), next_data(ws)).await
        {
            assert_eq!(u16::from(c.code), 1012);
            closed += 1;
        }
    }
    assert_eq!(closed, 10);
    // The drain outlives a reload that keeps the backend.
    f.gate.handle.reload().await.unwrap();
    let (_, list) = call(admin, "GET", "/backends", None, None).await;
    assert_eq!(entry(&list, "/a", f.a.addr)["state"], "draining", "{list}");
    // New tunnels of /a all go to B while A drains (what A saw so far is set aside first).
    while tokio::time::timeout(Duration::from_millis(200), f.a.seen.recv())
        .await
        .is_ok()
    {}
    for _ in 0..6 {
        let (mut ws, _) = ws_from(&f.gate, "/a?who=carol").await;
        ws.send(Message::text("x")).await.unwrap();
        next_data(&mut ws).await;
    }
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), f.a.seen.recv()).await
    {
        assert!(
            !matches!(ev, Seen::Request(..)),
            "the drained backend got a new tunnel"
        );
    }
    let (s, v) = call(admin, "POST", &q.replace("drain", "enable"), None, None).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("up")));
    let mut to_a = 0;
    for _ in 0..6 {
        let (mut ws, _) = ws_from(&f.gate, "/a?who=dave").await;
        ws.send(Message::text("x")).await.unwrap();
        next_data(&mut ws).await;
    }
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), f.a.seen.recv()).await
    {
        if let Seen::Request(..) = ev {
            to_a += 1;
        }
    }
    assert!(to_a > 0, "enabled again");
}

#[tokio::test]
async fn the_token_guards_the_api_and_mutating_endpoints_take_post_only() {
    let pki = Pki::new();
    let token = pki.dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-admin-token\n").unwrap();
    let backend = EchoBackend::start().await;
    let settings = BASE.replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    );
    let (cert, key) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
    let text = format!(
        "{settings}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{}",
        cert.display(),
        key.display(),
        route("/chat", backend.addr, "")
    );
    let gate = Gate::start_with(pki, &text).await;
    let admin = gate.admin.unwrap();
    for path in ["/tunnels", "/backends"] {
        assert_eq!(call(admin, "GET", path, None, None).await.0, 401);
        assert_eq!(call(admin, "GET", path, None, Some("wrong")).await.0, 401);
        assert_eq!(
            call(admin, "GET", path, None, Some("s3cret-admin-token"))
                .await
                .0,
            200
        );
    }
    assert_eq!(
        call(admin, "POST", "/tunnels/close", None, None).await.0,
        401
    );
    for (path, open) in [
        ("/metrics", 200),
        ("/healthz", 200),
        ("/readyz", 200),
        ("/", 200),
    ] {
        assert_eq!(
            call(admin, "GET", path, None, None).await.0,
            open,
            "{path} needs no token"
        );
    }
    for path in [
        "/tunnels/close",
        "/tunnels/7/close",
        "/backends/drain",
        "/backends/enable",
    ] {
        let (s, v) = call(admin, "GET", path, None, Some("s3cret-admin-token")).await;
        assert_eq!(s, 405, "{path}: {v}");
    }
    let (s, v) = call(
        admin,
        "POST",
        "/tunnels/close?code=1006",
        None,
        Some("s3cret-admin-token"),
    )
    .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().starts_with("code:"), "{v}");
    let (s, v) = call(
        admin,
        "POST",
        "/backends/drain?route=/chat",
        None,
        Some("s3cret-admin-token"),
    )
    .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().starts_with("backend:"), "{v}");
    // Every bad parameter is named: a misspelt filter must not widen a close to every tunnel.
    let tok = Some("s3cret-admin-token");
    let unknown_backend = format!("/backends/drain?route=/chat&backend={}", dead_addr().await);
    for (path, body, param) in [
        ("/tunnels/close?subjet=alice", None, "subjet:"),
        ("/tunnels/close", Some(r#"{"rout": "/chat"}"#), "rout:"),
        ("/tunnels?limit=5&colour=red", None, "colour:"),
        ("/tunnels/close?spread=100000000y", None, "spread:"),
        ("/tunnels/close?percent=0", None, "percent:"),
        ("/tunnels/close?client=300.1.1.1", None, "client:"),
        (
            "/backends/drain?route=/nowhere&backend=127.0.0.1:1",
            None,
            "route:",
        ),
        (unknown_backend.as_str(), None, "backend:"),
    ] {
        let method = if path.starts_with("/tunnels?") {
            "GET"
        } else {
            "POST"
        };
        let (s, v) = call(admin, method, path, body, tok).await;
        assert_eq!(s, 400, "{path}: {v}");
        assert!(
            v["error"].as_str().unwrap().starts_with(param),
            "{path}: {v}"
        );
    }
    let m = gate.metrics().await;
    assert!(
        !m.contains("wsgate_admin_actions_total{action=\"close_tunnels\"}"),
        "refused calls are not actions: {m}"
    );
}

#[test]
fn check_refuses_an_admin_listener_beyond_loopback_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = []\nlisten_plain = [\"127.0.0.1:1\"]\n[admin]\nlisten = \"0.0.0.0:9090\"\n",
    )
    .unwrap();
    let text = check_refuses(&path);
    assert!(
        text.contains("admin.toml:5: admin.listen: 0.0.0.0:9090 is not a loopback address"),
        "{text}"
    );
}

#[test]
fn check_loads_backend_ca_bundles_and_checks_backend_server_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tls.toml");
    let bundle = dir.path().join("not-a-ca.pem");
    std::fs::write(&bundle, "this is not PEM\n").unwrap();
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = []\nlisten_plain = [\"127.0.0.1:1\"]\n[[routes]]\npath = \"/a\"\nbackends = [\"127.0.0.1:2\"]\n\
             backend_tls = true\nbackend_ca = \"{}\"\n[[routes]]\npath = \"/b\"\nbackends = [\"127.0.0.1:3\"]\n\
             backend_tls = true\nbackend_server_name = \"not a name!\"\n",
            bundle.display()
        ),
    )
    .unwrap();
    let text = check_refuses(&path);
    assert!(text.contains("tls.toml:8: routes[0].backend_ca:"), "{text}");
    assert!(
        text.contains(
            "tls.toml:13: routes[1].backend_server_name: \"not a name!\" is not a DNS name"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn lifetime_jitter_spreads_the_ends_of_tunnels_opened_together_and_durations_are_counted() {
    let backend = EchoBackend::start().await;
    let r = route(
        "/j",
        backend.addr,
        "[routes.websocket]\nmax_lifetime = \"3s\"\nmax_lifetime_jitter = \"2s\"\nping_interval = \"0s\"",
    );
    let gate = Gate::start(BASE, &r).await;
    let mut tunnels = Vec::new();
    for _ in 0..20 {
        tunnels.push(gate.ws("/j", &[]).await.unwrap().0);
    }
    let started = Instant::now();
    let waits = tunnels.into_iter().map(|mut ws| async move {
        match next_data(&mut ws).await {
            Message::Close(Some(c)) => {
                assert_eq!(
                    (u16::from(c.code), c.reason.as_str()),
                    (1001, "max lifetime")
                );
                Instant::now()
            }
            other => panic!("expected the lifetime close, got {other:?}"),
        }
    });
    let ends: Vec<Duration> = futures_util::future::join_all(waits)
        .await
        .into_iter()
        .map(|t| t - started)
        .collect();
    let (first, last) = (ends.iter().min().unwrap(), ends.iter().max().unwrap());
    assert!(
        *first >= Duration::from_millis(900),
        "never before max_lifetime - jitter: {first:?}"
    );
    assert!(
        *last <= Duration::from_millis(3500),
        "never after max_lifetime: {last:?}"
    );
    assert!(
        *last - *first >= Duration::from_millis(700),
        "spread: {first:?}..{last:?}"
    );
    let m = metrics_when_no_tunnel_is_open(&gate).await;
    assert!(
        m.contains("wsgate_tunnel_duration_seconds_count{route=\"/j\"} 20"),
        "{m}"
    );
    assert!(
        m.contains("wsgate_tunnel_duration_seconds_bucket{le=\"5.0\",route=\"/j\"} 20"),
        "{m}"
    );
}

/// Every series name in an expression: `wsgate_` identifiers not followed by `(` (functions).
fn series_names(expr: &str, out: &mut std::collections::BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("wsgate_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.insert(expr[start..end].to_string());
        i = end;
    }
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_grafana_dashboard_queries_only_metrics_wsgate_exports() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/grafana/wsgate.json"
    ))
    .unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    assert!(
        dash["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "the Prometheus data source is a variable"
    );
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    let mut queried = std::collections::BTreeSet::new();
    for e in &all {
        series_names(e, &mut queried);
    }
    assert!(queried.len() >= 12, "{queried:?}");

    // The names a scrape holds, from the `# TYPE` lines of a live gateway that has seen a
    // tunnel open and end, a policy close, a refusal and an admin action (a family prints
    // nothing until it has a series).
    let backend = EchoBackend::start().await;
    let gate = Gate::start(
        BASE,
        &route(
            "/chat",
            backend.addr,
            "[routes.websocket]\nmax_message_size = \"1KiB\"",
        ),
    )
    .await;
    let (mut ws, _) = gate.ws("/chat", &[]).await.unwrap();
    ws.send(Message::binary(vec![0u8; 4096])).await.unwrap();
    assert!(matches!(next_data(&mut ws).await, Message::Close(Some(_))));
    assert_eq!(
        status_of(&gate.raw(upgrade_request("/nowhere", "").as_bytes()).await),
        404
    );
    let (s, _) = call(
        gate.admin.unwrap(),
        "POST",
        "/tunnels/close?route=/none",
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let metrics = metrics_when_no_tunnel_is_open(&gate).await;
    let mut exported = std::collections::BTreeSet::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_count", "_sum"],
            _ => &[""],
        };
        for s in suffixes {
            exported.insert(format!("{name}{s}"));
        }
    }
    let missing: Vec<_> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {exported:?}"
    );
    for panel in dash["panels"].as_array().unwrap() {
        assert!(
            !panel["targets"].as_array().unwrap().is_empty(),
            "{}",
            panel["title"]
        );
    }
}
