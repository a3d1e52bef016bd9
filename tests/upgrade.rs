//! Binary upgrades and socket activation, against the real binary: SIGUSR2 under a steady
//! stream of new connections, an upgrade whose configuration is broken, and sockets passed by
//! `systemd-socket-activate`.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixDatagram;
use tokio_tungstenite::tungstenite::Message;

/// A port free on loopback right now (the configuration names ports explicitly: the new
/// process matches inherited sockets to its entries by address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills a process this test started indirectly (the upgraded one is not its child).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

/// An installed wsgate: its own copy of the binary, a configuration, a notify socket, the
/// messages of its (and its successors') log.
struct Installed {
    pki: Pki,
    bin: PathBuf,
    config: PathBuf,
    tls: SocketAddr,
    admin: SocketAddr,
    notify: UnixDatagram,
    notify_path: PathBuf,
}

impl Installed {
    fn new(backend: SocketAddr) -> Installed {
        let pki = Pki::new();
        let (cert, key) = pki.issue("localhost", &["localhost"]);
        let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = pki.dir.path().join("wsgate.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = [\"{tls}\"]\nshutdown_grace = \"3s\"\ndrain_spread = \"1s\"\n\
                 [limits]\nper_ip_rate = 0\n[admin]\nlisten = \"{admin}\"\n[log]\nformat = \"json\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n{}",
                cert.display(),
                key.display(),
                route("/chat", backend, "")
            ),
        )
        .unwrap();
        let bin = pki.dir.path().join("wsgate");
        install(&bin);
        let notify_path = pki.dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        Installed {
            pki,
            bin,
            config,
            tls,
            admin,
            notify,
            notify_path,
        }
    }

    async fn next_notify(&self) -> String {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(35), self.notify.recv(&mut buf))
            .await
            .expect("a notify message in time")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Runs the installed binary on its configuration, with the notify socket and a log
    /// reader.
    fn run(
        &self,
    ) -> (
        tokio::process::Child,
        tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    ) {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("--config").arg(&self.config);
        spawn_logged(cmd, &self.notify_path)
    }

    /// The pid of the process that took over: its `MAINPID` and `READY=1`, in one message.
    async fn new_main_pid(&self) -> u32 {
        let msg = self.next_notify().await;
        msg.strip_prefix("MAINPID=")
            .and_then(|m| m.strip_suffix("\nREADY=1"))
            .unwrap_or_else(|| panic!("MAINPID and READY=1 in one message, got {msg:?}"))
            .parse()
            .unwrap()
    }

    async fn ws(&self) -> Result<Ws, String> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let req = format!("wss://localhost:{}/chat", self.tls.port())
            .into_client_request()
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(self.tls)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let connector = tokio_tungstenite::Connector::Rustls(self.pki.client_config());
        tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector))
            .await
            .map(|x| x.0)
            .map_err(|e| format!("handshake: {e}"))
    }
}

/// Copies the built binary to `to` the way a package upgrade does: a new file renamed over
/// the old one, so a running process keeps its (now deleted) inode.
fn install(to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(env!("CARGO_BIN_EXE_wsgate"), &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// Starts `cmd` with the notify socket and a log reader; returns the child and its log's
/// messages (the successors' too: they inherit the stderr pipe).
fn spawn_logged(
    mut cmd: tokio::process::Command,
    notify: &Path,
) -> (
    tokio::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    cmd.env("NOTIFY_SOCKET", notify)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A binary just copied can be "busy" for a moment: another test's fork may hold the
    // copy's descriptor until its exec (the usual ETXTBSY race of tests that copy programs).
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => break r.unwrap(),
        }
    };
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    (child, rx)
}

/// Waits for a log line whose message is `msg`.
async fn logged(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    msg: &str,
) -> serde_json::Value {
    loop {
        let v = tokio::time::timeout(Duration::from_secs(35), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {msg:?} logged"))
            .expect("log open");
        if v["fields"]["message"] == msg {
            return v;
        }
    }
}

async fn echo(ws: &mut Ws, text: &str) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => return Ok(()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => return Err(format!("echo: {other:?}")),
        }
    }
}

fn metric_line(metrics: &str, prefix: &str) -> Option<String> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_over_to_the_new_binary_without_refusing_a_connection() {
    let _backend = EchoBackend::start().await;
    let w = Installed::new(_backend.addr);
    let (mut old, mut logs) = w.run();
    let old_pid = old.id().unwrap();
    assert_eq!(w.next_notify().await, "READY=1");

    let mut before = Vec::new();
    for i in 0..3 {
        let mut ws = w.ws().await.unwrap();
        echo(&mut ws, &format!("before {i}")).await.unwrap();
        before.push(ws);
    }

    // 100 new connections a second for 5 s, each upgrading and echoing once.
    let w = std::sync::Arc::new(w);
    let load = {
        let w = w.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut tasks = Vec::new();
            for i in 0..500 {
                tick.tick().await;
                let w = w.clone();
                tasks.push(tokio::spawn(async move {
                    let mut ws = w.ws().await?;
                    echo(&mut ws, &format!("load {i}")).await?;
                    let _ = ws.close(None).await;
                    Ok::<(), String>(())
                }));
            }
            let mut failures = Vec::new();
            for t in tasks {
                if let Err(e) = t.await.unwrap() {
                    failures.push(e);
                }
            }
            failures
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await; // let the stream run before the upgrade
    install(&w.bin);
    signal(old_pid, "USR2");
    let new_pid = w.new_main_pid().await;
    let _kill = KillOnDrop(new_pid);
    assert_ne!(new_pid, old_pid);
    let exe = std::fs::read_link(format!("/proc/{new_pid}/exe")).unwrap();
    assert_eq!(exe, w.bin, "the new process runs the file now on disk");
    logged(&mut logs, "upgrade: the new process serves; draining").await;

    // The old tunnels keep echoing until their spread Close 1001.
    let upgraded = Instant::now();
    for (i, ws) in before.iter_mut().enumerate() {
        echo(ws, &format!("after {i}")).await.unwrap();
    }
    for ws in &mut before {
        match next_data(ws).await {
            Message::Close(Some(c)) => assert_eq!(u16::from(c.code), 1001),
            other => panic!("expected Close 1001, got {other:?}"),
        }
    }
    assert!(
        upgraded.elapsed() >= Duration::from_millis(1000),
        "closed in the spread window, not at the hand-over: {:?}",
        upgraded.elapsed()
    );
    let status = tokio::time::timeout(Duration::from_secs(10), old.wait())
        .await
        .expect("the old process exits after its grace")
        .unwrap();
    assert!(status.success(), "old process: {status:?}");

    let failures = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of 500 connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    let (status, _) = http_get(w.admin, "/readyz").await;
    assert_eq!(status, 200, "the new process answers /readyz");
    let (_, metrics) = http_get(w.admin, "/metrics").await;
    assert_eq!(
        metric_line(&metrics, "wsgate_upgrades_total{result=\"ok\"}").as_deref(),
        Some("wsgate_upgrades_total{result=\"ok\"} 1"),
        "the new process counts the upgrade it completed"
    );
    signal(new_pid, "HUP");
    assert!(w.next_notify().await.starts_with("RELOADING=1"));
    assert_eq!(w.next_notify().await, "READY=1");
    let (_, metrics) = http_get(w.admin, "/metrics").await;
    assert_eq!(
        metric_line(&metrics, "wsgate_config_reloads_total{result=\"ok\"}").as_deref(),
        Some("wsgate_config_reloads_total{result=\"ok\"} 1"),
        "a reload works in the new process"
    );
    let mut ws = w.ws().await.unwrap();
    echo(&mut ws, "after the reload").await.unwrap();
}

#[tokio::test]
async fn an_upgrade_with_a_broken_configuration_leaves_the_old_process_serving() {
    let backend = EchoBackend::start().await;
    let w = Installed::new(backend.addr);
    let (mut old, mut logs) = w.run();
    let old_pid = old.id().unwrap();
    assert_eq!(w.next_notify().await, "READY=1");
    let mut ws = w.ws().await.unwrap();
    echo(&mut ws, "before").await.unwrap();

    let good = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        good.replace("[server]", "[server]\nlisten_plain = 5"),
    )
    .unwrap();
    signal(old_pid, "USR2");
    logged(&mut logs, "upgrade failed; serving on").await;

    let (_, metrics) = http_get(w.admin, "/metrics").await;
    assert_eq!(
        metric_line(&metrics, "wsgate_upgrades_total{result=\"failed\"}").as_deref(),
        Some("wsgate_upgrades_total{result=\"failed\"} 1")
    );
    let (status, _) = http_get(w.admin, "/readyz").await;
    assert_eq!(status, 200);
    echo(&mut ws, "the open tunnel is untouched").await.unwrap();
    let mut fresh = w.ws().await.unwrap();
    echo(&mut fresh, "new connections are served")
        .await
        .unwrap();
    assert!(old.try_wait().unwrap().is_none(), "the old process runs on");

    // A new binary that dies before it is ready: a second SIGUSR2 meanwhile is ignored.
    std::fs::write(&w.config, &good).unwrap();
    let tmp = w.bin.with_extension("new");
    std::fs::write(&tmp, "#!/bin/sh\nsleep 1\nexit 3\n").unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &w.bin).unwrap();
    signal(old_pid, "USR2");
    logged(&mut logs, "upgrade: starting the new process").await;
    signal(old_pid, "USR2");
    logged(&mut logs, "upgrade already in progress; SIGUSR2 ignored").await;
    let v = logged(&mut logs, "upgrade failed; serving on").await;
    assert!(
        v["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("exit status: 3"),
        "{v}"
    );
    let (_, metrics) = http_get(w.admin, "/metrics").await;
    assert_eq!(
        metric_line(&metrics, "wsgate_upgrades_total{result=\"failed\"}").as_deref(),
        Some("wsgate_upgrades_total{result=\"failed\"} 2")
    );
    echo(&mut ws, "still untouched").await.unwrap();

    // Fixed, the next upgrade goes through.
    install(&w.bin);
    signal(old_pid, "USR2");
    let new_pid = w.new_main_pid().await;
    let _kill = KillOnDrop(new_pid);
    let status = tokio::time::timeout(Duration::from_secs(10), old.wait())
        .await
        .expect("the old process exits")
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sockets_passed_by_systemd_socket_activate_are_served_without_binding() {
    let backend = EchoBackend::start().await;
    let w = Installed::new(backend.addr);
    let stray: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let plain: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let text = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        text.replace(
            "[server]",
            &format!("[server]\nlisten_plain = [\"{plain}\"]"),
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new("systemd-socket-activate");
    cmd.arg("-l")
        .arg(w.tls.to_string())
        .arg("-l")
        .arg(stray.to_string())
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", w.notify_path.display()))
        .arg("-E")
        .arg("RUST_LOG=info")
        .arg(&w.bin)
        .arg("--config")
        .arg(&w.config);
    let (activator, mut logs) = spawn_logged(cmd, &w.notify_path);
    // systemd-socket-activate starts the service on the first connection; that connection
    // waits in the queue of the socket it passes and is served by wsgate.
    let first = loop {
        match w.ws().await {
            Ok(ws) => break ws,
            // Not listening yet: the activator has not bound its sockets.
            Err(e) if e.starts_with("connect") => tokio::task::yield_now().await,
            Err(e) => panic!("{e}"),
        }
    };
    let mut first = first;
    echo(&mut first, "through an inherited socket")
        .await
        .unwrap();
    assert_eq!(w.next_notify().await, "READY=1");

    let mut inherited = Vec::new();
    let mut stray_logged = false;
    while inherited.len() < 2 || !stray_logged {
        let v = tokio::time::timeout(Duration::from_secs(10), logs.recv())
            .await
            .unwrap()
            .unwrap();
        let f = &v["fields"];
        match f["message"].as_str().unwrap_or("") {
            "listening" => inherited.push((
                f["addr"].as_str().unwrap().to_string(),
                f["inherited"].as_bool().unwrap(),
            )),
            "inherited socket matches no listener; closed" => {
                assert_eq!(f["addr"].as_str(), Some(stray.to_string().as_str()));
                stray_logged = true;
            }
            _ => {}
        }
    }
    inherited.sort();
    let mut want = vec![(w.tls.to_string(), true), (plain.to_string(), false)];
    want.sort();
    assert_eq!(
        inherited, want,
        "the passed socket is taken, the other bound"
    );
    let (status, _) = http_get(plain, "/chat").await;
    assert_ne!(status, 0, "the listener with no inherited socket was bound");
    assert!(
        tokio::net::TcpStream::connect(stray).await.is_err(),
        "the unmatched socket was closed"
    );

    // A reload that drops the inherited listener closes it; one that lists it again binds it
    // afresh.
    let pid = activator.id().unwrap();
    let with_tls = std::fs::read_to_string(&w.config).unwrap();
    let listen_line = format!("listen = [\"{}\"]", w.tls);
    assert!(with_tls.contains(&listen_line));
    std::fs::write(&w.config, with_tls.replace(&listen_line, "listen = []")).unwrap();
    signal(pid, "HUP");
    assert!(w.next_notify().await.starts_with("RELOADING=1"));
    assert_eq!(w.next_notify().await, "READY=1");
    assert!(
        tokio::net::TcpStream::connect(w.tls).await.is_err(),
        "the removed inherited listener is closed"
    );
    echo(&mut first, "the tunnel outlives its listener")
        .await
        .unwrap();
    std::fs::write(&w.config, &with_tls).unwrap();
    signal(pid, "HUP");
    assert!(w.next_notify().await.starts_with("RELOADING=1"));
    assert_eq!(w.next_notify().await, "READY=1");
    let v = logged(&mut logs, "listening").await;
    assert_eq!(
        v["fields"]["addr"].as_str(),
        Some(w.tls.to_string().as_str())
    );
    assert_eq!(
        v["fields"]["inherited"].as_bool(),
        Some(false),
        "bound afresh"
    );
    let mut again = w.ws().await.unwrap();
    echo(&mut again, "on the listener bound again")
        .await
        .unwrap();
}

#[tokio::test]
async fn listeners_on_port_zero_keep_their_ports_across_an_upgrade() {
    let backend = EchoBackend::start().await;
    let mut w = Installed::new(backend.addr);
    let text = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        text.replace(&w.tls.to_string(), "127.0.0.1:0")
            .replace(&w.admin.to_string(), "127.0.0.1:0"),
    )
    .unwrap();
    let (mut old, mut logs) = w.run();
    w.tls = logged(&mut logs, "listening").await["fields"]["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    w.admin = logged(&mut logs, "admin listening").await["fields"]["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(w.next_notify().await, "READY=1");
    let mut before = w.ws().await.unwrap();
    echo(&mut before, "before").await.unwrap();

    install(&w.bin);
    signal(old.id().unwrap(), "USR2");
    let new_pid = w.new_main_pid().await;
    let _kill = KillOnDrop(new_pid);
    // The new process took the very sockets (an entry with port 0 finds its own again).
    let v = logged(&mut logs, "listening").await;
    assert_eq!(
        v["fields"]["addr"].as_str(),
        Some(w.tls.to_string().as_str())
    );
    assert_eq!(v["fields"]["inherited"].as_bool(), Some(true));
    let status = tokio::time::timeout(Duration::from_secs(10), old.wait())
        .await
        .expect("the old process exits")
        .unwrap();
    assert!(status.success());
    let mut after = w.ws().await.unwrap();
    echo(&mut after, "same port, new process").await.unwrap();
    let (status, _) = http_get(w.admin, "/readyz").await;
    assert_eq!(status, 200, "the admin listener kept its port too");
}
