//! A fleet through a real `redis-server` (started here on a free loopback port): per-address
//! budgets shared by three instances (and three times the budget without `[cluster]`), the
//! concurrent cap across instances, Redis stopped and restarted under traffic, fleet-wide
//! close by subject and backend drain, `GET /cluster`, and no keys left in Redis by a spray.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rcgen::ExtendedKeyUsagePurpose as Eku;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// A redis-server on a loopback port, killed on drop.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    async fn start(port: Option<u16>) -> Redis {
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package)");
        let r = Redis { port, child };
        // Up once it answers PING.
        let client = redis::Client::open(r.url()).unwrap();
        for _ in 0..500 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server did not come up");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn dbsize(&self) -> i64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("DBSIZE").query_async(&mut c).await.unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Settings for instance `name` of a fleet on `redis` (none: alone), with `limits`.
fn settings(redis: Option<&Redis>, name: &str, limits: &str) -> String {
    let cluster = redis.map_or(String::new(), |r| {
        format!(
            "[cluster]\nredis = \"{}\"\ninstance = \"{name}\"\nsync_interval = \"100ms\"\n",
            r.url()
        )
    });
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhandshake_timeout = \"5s\"\nshutdown_grace = \"1s\"\n\
         drain_spread = \"0s\"\n[limits]\n{limits}\n[admin]\nlisten = \"127.0.0.1:0\"\n{cluster}"
    )
}

async fn fleet(redis: Option<&Redis>, limits: &str, routes: &str) -> Vec<Gate> {
    let mut gates = Vec::new();
    for i in 1..=3 {
        gates.push(Gate::start(&settings(redis, &format!("gw-{i}"), limits), routes).await);
    }
    gates
}

async fn metric(g: &Gate, prefix: &str) -> Option<String> {
    g.metrics()
        .await
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().to_string())
}

/// Waits until `pred` holds for the gate's `GET /cluster` (the fleet's heartbeats arrive every
/// interval).
async fn until_cluster(g: &Gate, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(g.admin.unwrap(), "/cluster").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if pred(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "cluster never got there: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_metric(g: &Gate, prefix: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(g, prefix).await.as_deref() != Some(value) {
        assert!(Instant::now() < deadline, "{prefix} never became {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// TLS handshakes as fast as one client manages, round robin over `gates`, for `secs`:
/// how many were admitted (a refused connection is closed before TLS).
async fn hammer(gates: &[Gate], secs: u64) -> usize {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut admitted = 0;
    let mut i = 0;
    while Instant::now() < until {
        let g = &gates[i % gates.len()];
        i += 1;
        if tls_connect(g.tls_addr, g.pki.client_config(), "localhost")
            .await
            .is_ok()
        {
            admitted += 1;
        }
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_address_budget_and_alone_they_would_triple_it() {
    let backend = EchoBackend::start().await;
    let redis = Redis::start(None).await;
    let limits = "per_ip_rate = 10\nper_ip_burst = 10\nper_ip_max_connections = 0";
    let routes = route("/chat", backend.addr, "");
    // One instance alone admits rate × 3 s + burst = 40 in 3 s.
    let one = 10 * 3 + 10;
    let shared = fleet(Some(&redis), limits, &routes).await;
    for g in &shared {
        until_cluster(g, |v| v["instances"].as_array().unwrap().len() == 3).await;
    }
    let together = hammer(&shared, 3).await;
    eprintln!("fleet of three with [cluster]: {together} admitted in 3 s (one alone: {one})");
    assert!(
        together as f64 <= 1.25 * one as f64,
        "fleet-wide {together} admitted, more than 1.25 × {one}"
    );
    assert!(
        together >= one / 2,
        "the fleet still admits its budget: {together}"
    );
    let alone = fleet(None, limits, &routes).await;
    let tripled = hammer(&alone, 3).await;
    eprintln!("three without [cluster]: {tripled} admitted in 3 s");
    assert!(
        tripled as f64 >= 2.5 * one as f64,
        "without [cluster] each instance spends its own budget: {tripled}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrent_cap_counts_the_other_instances_tunnels() {
    let backend = EchoBackend::start().await;
    let redis = Redis::start(None).await;
    let limits = "per_ip_rate = 0\nper_ip_max_connections = 4";
    let gates = fleet(Some(&redis), limits, &route("/chat", backend.addr, "")).await;
    until_cluster(&gates[0], |v| v["instances"].as_array().unwrap().len() == 3).await;
    let mut open = Vec::new();
    let mut per = [0u64; 3];
    for i in 0..4 {
        let g = &gates[i % 3];
        open.push(g.ws("/chat", &[]).await.unwrap().0);
        per[i % 3] += 1;
        until_heard(&gates, i % 3, per[i % 3]).await;
    }
    for g in &gates {
        assert!(
            g.ws("/chat", &[]).await.is_err(),
            "a fifth tunnel from the address is refused on every instance"
        );
        assert_eq!(
            metric(
                g,
                "wsgate_handshake_rejections_total{reason=\"per_ip_cap\"}"
            )
            .await
            .as_deref(),
            Some("1"),
            "refused by the per-address cap"
        );
    }
    drop(open.pop());
    // Freed on one instance, admitted again on another once the others heard.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if gates[2].ws("/chat", &[]).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every other instance has folded in `opener`'s heartbeat that reports its
/// `n`-th tunnel: that message carries the address's open count too (admitted before the
/// tunnel existed), so from then on every instance counts it.
async fn until_heard(gates: &[Gate], opener: usize, n: u64) {
    let name = format!("gw-{}", opener + 1);
    for (i, g) in gates.iter().enumerate() {
        if i == opener {
            continue;
        }
        until_cluster(g, |v| {
            v["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["instance"] == name.as_str() && e["tunnels"].as_u64() == Some(n))
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_changes_nothing_on_the_handshake_path_and_sharing_resumes() {
    let backend = EchoBackend::start().await;
    let mut redis = Redis::start(None).await;
    let port = redis.port;
    let limits = "per_ip_rate = 1000\nper_ip_burst = 1000\nper_ip_max_connections = 0";
    let gates = fleet(Some(&redis), limits, &route("/chat", backend.addr, "")).await;
    for g in &gates {
        until_metric(g, "wsgate_cluster_redis_up", "1").await;
    }
    redis.stop();
    for g in &gates {
        until_metric(g, "wsgate_cluster_redis_up", "0").await;
    }
    // Admission goes on, locally.
    for g in &gates {
        let (mut ws, _) = g.ws("/chat", &[]).await.unwrap();
        ws.send(Message::text("redis is away")).await.unwrap();
        assert_eq!(
            next_data(&mut ws).await.into_text().unwrap().as_str(),
            "redis is away"
        );
    }
    until_cluster(&gates[0], |v| v["instances"].as_array().unwrap().len() == 1).await;
    let _redis = Redis::start(Some(port)).await;
    for g in &gates {
        until_metric(g, "wsgate_cluster_redis_up", "1").await;
    }
    until_cluster(&gates[0], |v| v["instances"].as_array().unwrap().len() == 3).await;
}

async fn post(admin: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let text = read_all(&mut s).await;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (
        status_of(&text),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_subject_with_cluster_true_closes_its_tunnels_on_every_instance() {
    let backend = EchoBackend::start().await;
    let redis = Redis::start(None).await;
    let ca = Pki::named("devices CA");
    let mut gates = Vec::new();
    for i in 1..=3 {
        let pki = Pki::new();
        let (cert, key) = pki.issue("localhost", &["localhost"]);
        let bundle = pki.dir.path().join("devices.pem");
        std::fs::write(&bundle, &ca.ca_pem).unwrap();
        let text = format!(
            "{}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n{}",
            settings(
                Some(&redis),
                &format!("gw-{i}"),
                "per_ip_rate = 0\nper_ip_max_connections = 0"
            ),
            cert.display(),
            key.display(),
            bundle.display(),
            route("/chat", backend.addr, "")
        );
        gates.push(Gate::start_with(pki, &text).await);
    }
    for g in &gates {
        until_cluster(g, |v| v["instances"].as_array().unwrap().len() == 3).await;
    }
    let alice = ca.issue_client("alice", vec![Eku::ClientAuth], false);
    let bob = ca.issue_client("bob", vec![Eku::ClientAuth], false);
    let mut alices = Vec::new();
    let mut bobs = Vec::new();
    for g in &gates {
        for (who, list) in [(&alice, &mut alices), (&bob, &mut bobs)] {
            let tls = tls_connect(
                g.tls_addr,
                g.pki
                    .client_config_presenting(Some((who.0.clone(), who.1.clone_key()))),
                "localhost",
            )
            .await
            .unwrap();
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let req = format!("wss://localhost:{}/chat", g.tls_addr.port())
                .into_client_request()
                .unwrap();
            list.push(tokio_tungstenite::client_async(req, tls).await.unwrap().0);
        }
    }
    let (status, answer) = post(
        gates[0].admin.unwrap(),
        "/tunnels/close?subject=alice&cluster=true&code=4001&reason=revoked",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut per: Vec<(String, u64, u64)> = answer["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["instance"].as_str().unwrap().to_string(),
                i["matched"].as_u64().unwrap(),
                i["closing"].as_u64().unwrap(),
            )
        })
        .collect();
    per.sort();
    assert_eq!(
        per,
        vec![
            ("gw-1".to_string(), 1, 1),
            ("gw-2".to_string(), 1, 1),
            ("gw-3".to_string(), 1, 1)
        ],
        "{answer}"
    );
    for ws in &mut alices {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(c)))) => {
                    assert_eq!(u16::from(c.code), 4001);
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected Close 4001, got {other:?}"),
            }
        }
    }
    for ws in &mut bobs {
        ws.send(Message::text("still here")).await.unwrap();
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(t.as_str(), "still here");
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("bob's tunnel: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_drained_with_cluster_true_gets_no_tunnels_on_any_instance() {
    let backend = EchoBackend::start().await;
    let redis = Redis::start(None).await;
    let gates = fleet(
        Some(&redis),
        "per_ip_rate = 0\nper_ip_max_connections = 0",
        &route("/chat", backend.addr, ""),
    )
    .await;
    for g in &gates {
        until_cluster(g, |v| v["instances"].as_array().unwrap().len() == 3).await;
    }
    let (status, answer) = post(
        gates[1].admin.unwrap(),
        &format!(
            "/backends/drain?route=/chat&backend={}&cluster=true",
            backend.addr
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["instances"].as_array().unwrap().len(), 3, "{answer}");
    for g in &gates {
        let err = g.ws("/chat", &[]).await.unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
    }
    let (status, _) = post(
        gates[2].admin.unwrap(),
        &format!(
            "/backends/enable?route=/chat&backend={}&cluster=true",
            backend.addr
        ),
    )
    .await;
    assert_eq!(status, 200);
    for g in &gates {
        assert!(g.ws("/chat", &[]).await.is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_spray_leaves_no_keys_in_redis() {
    let redis = Redis::start(None).await;
    let backend = EchoBackend::start().await;
    let gates = fleet(
        Some(&redis),
        "per_ip_rate = 5\nper_ip_burst = 5\nper_ip_max_connections = 10",
        &route("/chat", backend.addr, ""),
    )
    .await;
    until_cluster(&gates[0], |v| v["instances"].as_array().unwrap().len() == 3).await;
    // 3,000 distinct loopback source addresses, each opening one connection.
    let mut tasks = Vec::new();
    for i in 0..3000u32 {
        let addr = gates[(i % 3) as usize].tls_addr;
        tasks.push(tokio::spawn(async move {
            let ip = std::net::Ipv4Addr::new(127, 1, (i >> 8) as u8, i as u8);
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::from((ip, 0))).unwrap();
            let _ = s.connect(addr).await;
        }));
        if tasks.len() >= 200 {
            for t in tasks.drain(..) {
                t.await.unwrap();
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The usage travels as messages: nothing stays behind in Redis.
    assert_eq!(redis.dbsize().await, 0, "no per-address keys in Redis");
    for g in &gates {
        assert_eq!(
            metric(g, "wsgate_cluster_redis_up").await.as_deref(),
            Some("1")
        );
    }
}

#[test]
fn check_names_the_line_of_a_redis_url_it_cannot_use() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("localhost", &["localhost"]);
    let path = pki.dir.path().join("wsgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [cluster]\nredis = \"http://127.0.0.1:6379\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let errors = wsgate::check(&path);
    let want = format!("{}:7: cluster.redis:", path.display());
    assert!(errors.iter().any(|e| e.starts_with(&want)), "{errors:?}");
}
