//! Operations, against the real binary with real signals: systemd notifications, reloads that
//! swap certificates without touching tunnels, a broken reload kept out, draining with Close
//! frames and `/readyz`, metrics that move with traffic.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixDatagram;
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;

/// The wsgate binary running a config, with its notify socket and log stream.
struct Daemon {
    child: Child,
    notify: UnixDatagram,
    tls: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    pki: Pki,
    _logs: tokio::task::JoinHandle<()>,
}

impl Daemon {
    async fn start(settings: &str, routes: &str) -> Daemon {
        let pki = Pki::new();
        let (cert, key) = pki.issue("localhost", &["localhost"]);
        let config = pki.dir.path().join("wsgate.toml");
        let text = format!(
            "{settings}\n[log]\nformat = \"json\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{routes}",
            cert.display(),
            key.display()
        );
        std::fs::write(&config, text).unwrap();
        Daemon::start_with(pki, config, &[]).await
    }

    /// Runs the binary on `config` (through `sh -c` with `shell_prefix` when given, for
    /// `ulimit`), with a notify socket, and waits for its listeners and `READY=1`.
    async fn start_with(pki: Pki, config: PathBuf, shell_prefix: &[&str]) -> Daemon {
        let sock_path = pki.dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock_path).unwrap();
        let bin = env!("CARGO_BIN_EXE_wsgate");
        let mut cmd = if shell_prefix.is_empty() {
            let mut c = tokio::process::Command::new(bin);
            c.arg("--config").arg(&config);
            c
        } else {
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c").arg(format!(
                "{}; exec \"$0\" --config \"$1\"",
                shell_prefix.join("; ")
            ));
            c.arg(bin).arg(&config);
            c
        };
        let mut child = cmd
            .env("NOTIFY_SOCKET", &sock_path)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let logs = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let msg = v["fields"]["message"].as_str().unwrap_or("").to_string();
                    let addr = v["fields"]["addr"].as_str().unwrap_or("").to_string();
                    let tls = v["fields"]["tls"].as_bool().unwrap_or(false);
                    let _ = tx.send((msg, addr, tls));
                }
            }
        });
        let (mut tls, mut plain, mut admin) = (None, None, None);
        while (tls.is_none() && plain.is_none()) || admin.is_none() {
            let (msg, addr, is_tls) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
            match msg.as_str() {
                "listening" if is_tls => tls = Some(addr.parse().unwrap()),
                "listening" => plain = Some(addr.parse().unwrap()),
                "admin listening" => admin = Some(addr.parse().unwrap()),
                _ => {}
            }
        }
        let d = Daemon {
            child,
            notify,
            tls: tls.or(plain).unwrap(),
            admin: admin.unwrap(),
            config,
            pki,
            _logs: logs,
        };
        assert_eq!(d.next_notify().await, "READY=1");
        d
    }

    async fn next_notify(&self) -> String {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), self.notify.recv(&mut buf))
            .await
            .expect("a notify message in time")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().unwrap().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    async fn ws(&self, path: &str) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let req = format!("wss://localhost:{}{path}", self.tls.port())
            .into_client_request()
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(self.tls).await.unwrap();
        let connector = tokio_tungstenite::Connector::Rustls(self.pki.client_config());
        tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector))
            .await
            .unwrap()
            .0
    }

    async fn leaf(&self) -> Vec<u8> {
        let s = tls_connect(self.tls, self.pki.client_config(), "localhost")
            .await
            .unwrap();
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    /// Waits for the process to exit within `limit`; returns its status.
    async fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running after {limit:?}"))
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

const SETTINGS: &str = "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"1500ms\"\ndrain_spread = \"500ms\"\n\
                        [admin]\nlisten = \"127.0.0.1:0\"\n";

async fn echo_roundtrip(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_data(ws).await.into_text().unwrap().as_str(), text);
}

#[tokio::test]
async fn reload_swaps_the_certificate_while_an_open_tunnel_keeps_echoing() {
    let backend = EchoBackend::start().await;
    let d = Daemon::start(SETTINGS, &route("/chat", backend.addr, "")).await;
    let mut tunnel = d.ws("/chat").await;
    echo_roundtrip(&mut tunnel, "before").await;
    let old = d.leaf().await;
    // certbot renews in place; the deploy hook reloads.
    d.pki.issue("localhost", &["localhost"]);
    d.signal("HUP");
    let reloading = d.next_notify().await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(d.next_notify().await, "READY=1");
    let new = d.leaf().await;
    assert_ne!(old, new, "new connections get the new certificate");
    echo_roundtrip(&mut tunnel, "after").await;
    let (status, body) = http_get(d.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("wsgate_config_reloads_total{result=\"ok\"} 1"),
        "{body}"
    );
}

/// Opens a TLS connection with `cfg` (which keeps the tickets it receives), echoes once over
/// a tunnel so the post-handshake tickets are read, and returns how the handshake went.
async fn echo_with(
    d: &Daemon,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
) -> rustls::HandshakeKind {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tls = tls_connect(d.tls, cfg.clone(), "localhost").await.unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let req = format!("wss://localhost:{}/chat", d.tls.port())
        .into_client_request()
        .unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Rustls(tls);
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    echo_roundtrip(&mut ws, "ticket").await;
    ws.close(None).await.unwrap();
    kind
}

#[tokio::test]
async fn session_tickets_issued_before_a_reload_still_resume_after_it() {
    let backend = EchoBackend::start().await;
    let d = Daemon::start(SETTINGS, &route("/chat", backend.addr, "")).await;
    let cfg = d.pki.client_config();
    assert_eq!(echo_with(&d, &cfg).await, rustls::HandshakeKind::Full);
    // A reload that changes the TLS set-up (a renewed certificate) builds a new ServerConfig.
    d.pki.issue("localhost", &["localhost"]);
    d.signal("HUP");
    assert!(d.next_notify().await.starts_with("RELOADING=1"));
    assert_eq!(d.next_notify().await, "READY=1");
    assert_eq!(
        echo_with(&d, &cfg).await,
        rustls::HandshakeKind::Resumed,
        "a client returning after a reload resumes with its old ticket"
    );
}

#[tokio::test]
async fn broken_reload_keeps_the_old_configuration_and_shows_in_metrics() {
    let backend = EchoBackend::start().await;
    let d = Daemon::start(SETTINGS, &route("/chat", backend.addr, "")).await;
    let good = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        good.replace("[[routes]]", "[[routes]]\nbogus_key = 1"),
    )
    .unwrap();
    d.signal("HUP");
    assert!(d.next_notify().await.starts_with("RELOADING=1"));
    assert_eq!(
        d.next_notify().await,
        "READY=1",
        "still up after a failed reload"
    );
    let mut ws = d.ws("/chat").await;
    echo_roundtrip(&mut ws, "old routes still served").await;
    let (_, body) = http_get(d.admin, "/metrics").await;
    assert!(
        body.contains("wsgate_config_reloads_total{result=\"failed\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("wsgate_config_last_reload_successful 0"),
        "{body}"
    );
}

#[tokio::test]
async fn reload_adds_and_removes_listeners() {
    let backend = EchoBackend::start().await;
    let d = Daemon::start(SETTINGS, &route("/chat", backend.addr, "")).await;
    let free = dead_addr().await;
    let text = std::fs::read_to_string(&d.config).unwrap();
    let with_plain = text.replace(
        "[server]\n",
        &format!("[server]\nlisten_plain = [\"{free}\"]\n"),
    );
    std::fs::write(&d.config, &with_plain).unwrap();
    d.signal("HUP");
    d.next_notify().await;
    assert_eq!(d.next_notify().await, "READY=1");
    let (status, _) = http_get(free, "/nowhere").await;
    assert_eq!(status, 404, "the new plain listener answers");
    std::fs::write(&d.config, &text).unwrap();
    d.signal("HUP");
    d.next_notify().await;
    d.next_notify().await;
    assert!(
        tokio::net::TcpStream::connect(free).await.is_err(),
        "the removed listener is closed"
    );
}

#[tokio::test]
async fn sigterm_drains_with_close_1001_and_exits_zero_within_grace() {
    let mut backend = EchoBackend::start().await;
    let mut d = Daemon::start(SETTINGS, &route("/chat", backend.addr, "")).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut ws = d.ws("/chat").await;
        echo_roundtrip(&mut ws, &format!("client {i}")).await;
        clients.push(ws);
    }
    let (status, _) = http_get(d.admin, "/readyz").await;
    assert_eq!(status, 200);
    let started = Instant::now();
    d.signal("TERM");
    assert_eq!(d.next_notify().await, "STOPPING=1");
    let (status, _) = http_get(d.admin, "/readyz").await;
    assert_eq!(status, 503, "readyz turns 503 while draining");
    assert!(
        tokio::net::TcpStream::connect(d.tls).await.is_err(),
        "new connections are refused at once"
    );
    // Tunnels keep working during the grace period.
    echo_roundtrip(&mut clients[0], "still here").await;
    for ws in &mut clients {
        match next_data(ws).await {
            Message::Close(Some(c)) => {
                assert_eq!((u16::from(c.code), c.reason.as_str()), (1001, "going away"))
            }
            other => panic!("expected Close 1001, got {other:?}"),
        }
        while let Some(Ok(_)) = ws.next().await {}
    }
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(900),
        "tunnels ran until the spread window: {closed_after:?}"
    );
    for _ in 0..3 {
        let c = backend.next_close().await.expect("backend told too");
        assert_eq!(u16::from(c.code), 1001);
    }
    let status = d.wait(Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}");
    let exited_after = started.elapsed();
    assert!(
        exited_after < Duration::from_millis(1500 + 700),
        "exited within the grace: {exited_after:?}"
    );
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    let backend = EchoBackend::start().await;
    let settings = SETTINGS.replace("1500ms", "60s");
    let mut d = Daemon::start(&settings, &route("/chat", backend.addr, "")).await;
    let _ws = d.ws("/chat").await;
    d.signal("TERM");
    assert_eq!(d.next_notify().await, "STOPPING=1");
    d.signal("TERM");
    // The grace is a minute: an exit within three seconds is the second signal's doing.
    d.wait(Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_refused_origin_raises_the_origin_counter_by_one() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(BASE, &route("/chat", backend.addr, "")).await;
    let count = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("wsgate_handshake_rejections_total{reason=\"origin\"}"))
            .map_or(0, |l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
    };
    let before = count(&gate.metrics().await);
    let resp = gate
        .raw(upgrade_request("/chat", "Origin: https://evil.example\r\n").as_bytes())
        .await;
    assert_eq!(status_of(&resp), 403);
    assert_eq!(count(&gate.metrics().await), before + 1);
    let (mut ws, _) = gate
        .ws("/chat", &[("Origin", "https://good.example")])
        .await
        .unwrap();
    echo_roundtrip(&mut ws, "x").await;
    let normal = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 1000.into(),
        reason: "done".into(),
    };
    ws.close(Some(normal)).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let m = metrics_when_no_tunnel_is_open(&gate).await;
    assert!(
        m.contains("wsgate_connections_open{route=\"/chat\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("wsgate_connections_total{route=\"/chat\",protocol=\"http1\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("wsgate_closes_total{code=\"1000\",side=\"client\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("wsgate_relayed_frames_total{direction=\"client_to_backend\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn traffic_counters_move_while_the_tunnel_is_still_open() {
    let backend = EchoBackend::start().await;
    let gate = Gate::start(BASE, &route("/chat", backend.addr, "")).await;
    let (mut ws, _) = gate
        .ws("/chat", &[("Origin", "https://good.example")])
        .await
        .unwrap();
    // Client frames are masked (2 + 4 header bytes), the backend's are not (2).
    echo_roundtrip(&mut ws, "first").await;
    echo_roundtrip(&mut ws, "second").await;
    let m = gate.metrics().await;
    for line in [
        "wsgate_relayed_bytes_total{direction=\"client_to_backend\"} 23",
        "wsgate_relayed_frames_total{direction=\"client_to_backend\"} 2",
        "wsgate_connections_open{route=\"/chat\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
    // A pass reports after it wrote to the client, so the second echo's report may trail the
    // client's read; once a third echo is back, the pass that wrote the second has reported.
    echo_roundtrip(&mut ws, "still open").await;
    let m = gate.metrics().await;
    let value = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        value("wsgate_relayed_bytes_total{direction=\"backend_to_client\"}") >= 15,
        "{m}"
    );
    assert!(
        value("wsgate_relayed_frames_total{direction=\"backend_to_client\"}") >= 2,
        "{m}"
    );
    assert!(
        m.contains("wsgate_connections_open{route=\"/chat\"} 1"),
        "{m}"
    );
}

#[test]
fn check_flag_prints_ok_or_every_error_with_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = [\"127.0.0.1:1\"]\nhandshake_timeout = 10\n[websocket]\nidle_timeout = \"forever\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("bad.toml:3: server.handshake_timeout: 10 has no unit"),
        "{text}"
    );
    assert!(
        text.contains("bad.toml:5: websocket.idle_timeout"),
        "{text}"
    );
    assert!(
        text.contains("tls.cert"),
        "missing certificate reported too: {text}"
    );
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--check", "--config", example])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "ok\n");
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_added_by_a_reload_serves_tls_from_its_first_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let backend = EchoBackend::start().await;
    let tls_addr = dead_addr().await;
    let plain_only = "[server]\nlisten = []\nlisten_plain = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n\
                      [admin]\nlisten = \"127.0.0.1:0\"\n";
    let with_tls = plain_only.replace("listen = []", &format!("listen = [\"{tls_addr}\"]"));
    let d = Daemon::start(plain_only, &route("/chat", backend.addr, "")).await;
    let base = std::fs::read_to_string(&d.config).unwrap();
    let cfg = d.pki.client_config();
    for round in 0..10 {
        std::fs::write(&d.config, base.replace(plain_only, &with_tls)).unwrap();
        // Knock on the new port from before the reload: the first connection the new listener
        // accepts is the one most likely to meet a configuration that is not its own.
        let go = Arc::new(AtomicBool::new(true));
        let knocker = {
            let (go, cfg) = (go.clone(), cfg.clone());
            tokio::spawn(async move {
                let mut served = 0;
                while go.load(Ordering::Relaxed) || served == 0 {
                    let Ok(tcp) = tokio::net::TcpStream::connect(tls_addr).await else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
                    let req = format!("wss://localhost:{}/chat", tls_addr.port())
                        .into_client_request()
                        .unwrap();
                    let connector = tokio_tungstenite::Connector::Rustls(cfg.clone());
                    let r = tokio_tungstenite::client_async_tls_with_config(
                        req,
                        tcp,
                        None,
                        Some(connector),
                    )
                    .await;
                    let (mut ws, resp) = r.unwrap_or_else(|e| {
                        panic!("round {round}: connection {served} to the new listener failed: {e}")
                    });
                    assert_eq!(resp.status(), 101);
                    echo_roundtrip(&mut ws, "new listener").await;
                    served += 1;
                }
                served
            })
        };
        d.signal("HUP");
        assert!(d.next_notify().await.starts_with("RELOADING=1"));
        assert_eq!(d.next_notify().await, "READY=1");
        go.store(false, Ordering::Relaxed);
        let served = tokio::time::timeout(Duration::from_secs(10), knocker)
            .await
            .expect("the new listener serves")
            .unwrap();
        assert!(served >= 1);
        std::fs::write(&d.config, &base).unwrap();
        d.signal("HUP");
        assert!(d.next_notify().await.starts_with("RELOADING=1"));
        assert_eq!(d.next_notify().await, "READY=1");
    }
}

/// User plus system CPU time of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports these in USER_HZ, 100 per second on every architecture it runs on.
    Duration::from_millis(ticks * 10)
}

#[tokio::test]
async fn accept_loops_back_off_instead_of_spinning_when_out_of_file_descriptors() {
    let backend = EchoBackend::start().await;
    let pki = Pki::new();
    let (cert, key) = pki.issue("localhost", &["localhost"]);
    let config = pki.dir.path().join("wsgate.toml");
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhandshake_timeout = \"60s\"\nworkers = 1\n\
         [limits]\nper_ip_rate = 0\nper_ip_max_connections = 0\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [log]\nformat = \"json\"\nlevel = \"error\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{}",
        cert.display(),
        key.display(),
        route("/chat", backend.addr, "")
    );
    std::fs::write(&config, text).unwrap();
    let d = Daemon::start_with(pki, config, &["ulimit -n 48"]).await;
    // Silent clients hold descriptors until the process has none left; more wait in the
    // listeners' queues, the admin listener's included.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(tokio::net::TcpStream::connect(d.tls).await.unwrap());
    }
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(d.admin).await.unwrap());
    }
    let pid = d.child.id().unwrap();
    // Let the first accept failures and their first back-off steps pass, then measure.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(300),
        "{used:?} of CPU in a second with every accept failing: a loop spins"
    );
    drop(held);
}
