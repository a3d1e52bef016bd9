//! Certificates by ACME against Debian's `pebble`, with `pebble-challtestsrv` as its DNS (every
//! name resolves to 127.0.0.1), both started here on loopback ports: TLS-ALPN-01 on the TLS
//! listener for two names, HTTP-01 on a plain listener, a restart that serves the stored
//! certificate with the server gone, a renewal under a running tunnel, a server that is down
//! at start and comes back, `unrecognized_name` without a `[tls]` certificate, and the expiry
//! gauge for file and ACME certificates.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use rustls::pki_types::CertificateDer;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// pebble and its DNS, killed on drop. Its HTTPS certificate comes from `pki`.
struct Pebble {
    port: u16,
    http_port: u16,
    mgmt: u16,
    dir: PathBuf,
    pebble: Child,
    dns: Child,
}

impl Pebble {
    /// Validates challenges on `http_port` (HTTP-01) and `tls_port` (TLS-ALPN-01); issued
    /// certificates live `validity` seconds.
    async fn start(pki: &Pki, port: u16, http_port: u16, tls_port: u16, validity: u64) -> Pebble {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = pki.dir.path().join(format!("pebble-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = pki.issue(&format!("pebble-{port}"), &["localhost", "127.0.0.1"]);
        let mgmt = free_port();
        let dns_port = free_port();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt}"),
                "certificate": cert,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity,
            }
        });
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let dns = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port())])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (Debian's pebble package)");
        let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pebble (Debian's pebble package)");
        let p = Pebble {
            port,
            http_port,
            mgmt,
            dir,
            pebble,
            dns,
        };
        for _ in 0..1000 {
            // The DNS answers over UDP: its port is taken once it listens.
            let up = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
                && tokio::net::TcpStream::connect(("127.0.0.1", mgmt))
                    .await
                    .is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", dns_port)).is_err();
            if up {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("pebble did not come up");
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The root pebble issues under (new at each start).
    async fn root(&self, pki: &Pki) -> CertificateDer<'static> {
        let mut s = tls_connect(
            SocketAddr::from(([127, 0, 0, 1], self.mgmt)),
            pki.client_config(),
            "localhost",
        )
        .await
        .unwrap();
        s.write_all(b"GET /roots/0 HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let text = read_all(&mut s).await;
        let pem = text.split_once("\r\n\r\n").unwrap().1;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn stop(&mut self) {
        for c in [&mut self.pebble, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.dir.join("pebble.log"))
        {
            eprintln!("--- pebble log ---\n{log}");
        }
    }
}

/// A gateway's configuration with `[acme]` on pebble, listeners on the given ports.
struct Setup {
    tls_port: u16,
    plain_port: u16,
    storage: PathBuf,
    /// Outlives the gateways (and their Pki folders) a test starts on this storage.
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        Setup {
            tls_port: free_port(),
            plain_port: free_port(),
            // A folder wsgate creates.
            storage: dir.path().join("acme"),
            _dir: dir,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn text(
        &self,
        pki: &Pki,
        directory: &str,
        domains: &[&str],
        challenge: &str,
        renew_before: &str,
        with_tls_cert: bool,
        routes: &str,
    ) -> String {
        let tls = if with_tls_cert {
            let (cert, key) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
            format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                cert.display(),
                key.display()
            )
        } else {
            String::new()
        };
        let ca = pki.dir.path().join("test-ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let domains: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
        format!(
            r#"
[server]
listen = ["127.0.0.1:{tls}"]
listen_plain = ["127.0.0.1:{plain}"]
handshake_timeout = "5s"
shutdown_grace = "1s"
drain_spread = "0s"
[limits]
per_ip_rate = 100000
per_ip_burst = 100000
per_ip_max_connections = 100000
[admin]
listen = "127.0.0.1:0"
{tls_section}
[acme]
directory = "{directory}"
contact = ["mailto:ops@example.com"]
domains = [{domains}]
storage = "{storage}"
challenge = "{challenge}"
renew_before = "{renew_before}"
directory_ca = "{ca}"
{routes}
"#,
            tls = self.tls_port,
            plain = self.plain_port,
            tls_section = tls,
            domains = domains.join(", "),
            storage = self.storage.display(),
            ca = ca.display(),
        )
    }
}

/// A client trusting only `root`.
fn trusting(root: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// The leaf a verified handshake naming `name` gets.
async fn leaf_for(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<Vec<u8>> {
    let s = tls_connect(addr, cfg, name).await?;
    Ok(s.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

fn not_after(der: &[u8]) -> i64 {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.validity().not_after.timestamp()
}

fn serial(der: &[u8]) -> Vec<u8> {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.raw_serial().to_vec()
}

/// The value of the series starting with `prefix`, if there is one.
fn series(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits (bounded) until the gateway's metrics satisfy `pred`.
async fn metrics_until(g: &Gate, within: Duration, pred: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + within;
    loop {
        let m = g.metrics().await;
        if pred(&m) {
            return m;
        }
        assert!(Instant::now() < end, "metrics never got there:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const OK: &str = "wsgate_acme_orders_total{result=\"ok\"}";
const FAILED: &str = "wsgate_acme_orders_total{result=\"failed\"}";

fn expiry(name: &str, source: &str) -> String {
    format!("wsgate_certificate_expiry_timestamp_seconds{{name=\"{name}\",source=\"{source}\"}}")
}

fn storage_is_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "storage folder mode");
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} mode", e.path().display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_orders_two_names_serves_them_and_a_restart_uses_storage() {
    let pki = Pki::new();
    let setup = Setup::new();
    let mut pebble = Pebble::start(&pki, free_port(), free_port(), setup.tls_port, 3600).await;
    let root = pebble.root(&pki).await;
    let names = ["chat.wsgate.test", "api.wsgate.test"];
    let text = setup.text(
        &pki,
        &pebble.directory(),
        &names,
        "tls-alpn-01",
        "1/3",
        true,
        "",
    );
    let gate = Gate::start_with(pki, &text).await;
    let m = metrics_until(&gate, Duration::from_secs(60), |m| {
        series(m, OK) == Some(2.0)
    })
    .await;
    assert_eq!(series(&m, FAILED), None, "{m}");
    let mut served = Vec::new();
    for n in names {
        let leaf = leaf_for(gate.tls_addr, trusting(&root), n)
            .await
            .unwrap_or_else(|e| panic!("{n}: {e}"));
        assert_eq!(
            series(&m, &expiry(n, "acme")),
            Some(not_after(&leaf) as f64),
            "{m}"
        );
        served.push(leaf);
    }
    // The file certificate keeps serving other names, and has its gauge too.
    let file_leaf = leaf_for(gate.tls_addr, gate.pki.client_config(), "localhost")
        .await
        .unwrap();
    assert_eq!(
        series(&m, &expiry("localhost", "file")),
        Some(not_after(&file_leaf) as f64),
        "{m}"
    );
    storage_is_private(&setup.storage);

    // Restart with the ACME server gone: the stored certificates serve from the first
    // handshake, and nothing is ordered (they are far from due).
    let pki = Pki::new();
    gate.stop().await;
    pebble.stop();
    let text = setup.text(
        &pki,
        &pebble.directory(),
        &names,
        "tls-alpn-01",
        "1/3",
        true,
        "",
    );
    let gate = Gate::start_with(pki, &text).await;
    for (n, before) in names.iter().zip(&served) {
        let leaf = leaf_for(gate.tls_addr, trusting(&root), n).await.unwrap();
        assert_eq!(serial(&leaf), serial(before), "{n} is served from storage");
    }
    let m = gate.metrics().await;
    assert_eq!(series(&m, OK), None, "{m}");
    assert_eq!(series(&m, FAILED), None, "{m}");
    assert_eq!(
        series(&m, &expiry(names[0], "acme")),
        Some(not_after(&served[0]) as f64)
    );
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_on_the_plain_listener() {
    let pki = Pki::new();
    let setup = Setup::new();
    let pebble = Pebble::start(&pki, free_port(), setup.plain_port, free_port(), 3600).await;
    let root = pebble.root(&pki).await;
    let backend = EchoBackend::start().await;
    let text = setup.text(
        &pki,
        &pebble.directory(),
        &["live.wsgate.test"],
        "http-01",
        "1/3",
        false,
        &route("/", backend.addr, ""),
    );
    let gate = Gate::start_with(pki, &text).await;
    metrics_until(&gate, Duration::from_secs(60), |m| {
        series(m, OK) == Some(1.0)
    })
    .await;
    leaf_for(gate.tls_addr, trusting(&root), "live.wsgate.test")
        .await
        .unwrap();
    // Other paths under the prefix are routed as usual, tokens no longer out are not answered.
    let plain = gate.plain_addr.unwrap();
    let (status, _) = http_get(plain, "/.well-known/acme-challenge/unknown-token").await;
    assert_ne!(status, 200);

    // A reload that adds a name orders it; one that removes a name stops serving it (its
    // files stay in storage).
    let routes = route("/", backend.addr, "");
    let both = ["live.wsgate.test", "more.wsgate.test"];
    let text = setup.text(
        &gate.pki,
        &pebble.directory(),
        &both,
        "http-01",
        "1/3",
        false,
        &routes,
    );
    std::fs::write(&gate.config_path, text).unwrap();
    gate.handle.reload().await.unwrap();
    metrics_until(&gate, Duration::from_secs(60), |m| {
        series(m, OK) == Some(2.0)
    })
    .await;
    leaf_for(gate.tls_addr, trusting(&root), "more.wsgate.test")
        .await
        .unwrap();
    let text = setup.text(
        &gate.pki,
        &pebble.directory(),
        &both[1..],
        "http-01",
        "1/3",
        false,
        &routes,
    );
    std::fs::write(&gate.config_path, text).unwrap();
    gate.handle.reload().await.unwrap();
    let err = leaf_for(gate.tls_addr, trusting(&root), "live.wsgate.test")
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("Unrecogni"), "{err:?}");
    let m = gate.metrics().await;
    assert_eq!(series(&m, &expiry("live.wsgate.test", "acme")), None, "{m}");
    assert!(
        series(&m, &expiry("more.wsgate.test", "acme")).is_some(),
        "{m}"
    );
    assert!(setup.storage.join("live.wsgate.test.pem").exists());
    drop(pebble);
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_serves_new_handshakes_and_keeps_the_tunnel() {
    let pki = Pki::new();
    let setup = Setup::new();
    let pebble = Pebble::start(&pki, free_port(), free_port(), setup.tls_port, 3600).await;
    let root = pebble.root(&pki).await;
    let backend = EchoBackend::start().await;
    let name = "renew.wsgate.test";
    // renew_before longer than the lifetime: every certificate is due as soon as it is
    // issued, and wsgate renews at its least spacing.
    let text = setup.text(
        &pki,
        &pebble.directory(),
        &[name],
        "tls-alpn-01",
        "2h",
        true,
        &route("/echo", backend.addr, ""),
    );
    let gate = Gate::start_with(pki, &text).await;
    metrics_until(&gate, Duration::from_secs(60), |m| {
        series(m, OK) == Some(1.0)
    })
    .await;
    let first = leaf_for(gate.tls_addr, trusting(&root), name)
        .await
        .unwrap();
    // A tunnel over the first certificate.
    let tcp = tokio::net::TcpStream::connect(gate.tls_addr).await.unwrap();
    let url = format!("wss://{name}:{}/echo", setup.tls_port);
    let (mut ws, _) = tokio_tungstenite::client_async_tls_with_config(
        url,
        tcp,
        None,
        Some(tokio_tungstenite::Connector::Rustls(trusting(&root))),
    )
    .await
    .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("before"));
    metrics_until(&gate, Duration::from_secs(60), |m| {
        series(m, OK) == Some(2.0)
    })
    .await;
    let second = leaf_for(gate.tls_addr, trusting(&root), name)
        .await
        .unwrap();
    assert_ne!(
        serial(&first),
        serial(&second),
        "new handshakes get the renewal"
    );
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("after"));
    let m = gate.metrics().await;
    assert_eq!(
        series(&m, &expiry(name, "acme")),
        Some(not_after(&second) as f64)
    );
    // A new server (one that forgot the account, as pebble does on restart): the next
    // renewal makes a new account and goes through.
    let (port, http_port) = (pebble.port, pebble.http_port);
    drop(pebble);
    let pebble = Pebble::start(&gate.pki, port, http_port, setup.tls_port, 3600).await;
    let root = pebble.root(&gate.pki).await;
    metrics_until(&gate, Duration::from_secs(60), |m| {
        series(m, OK) == Some(3.0)
    })
    .await;
    leaf_for(gate.tls_addr, trusting(&root), name)
        .await
        .unwrap();
    ws.send(Message::text("still")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("still"));
    drop(pebble);
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_at_start_changes_nothing_until_it_is_back() {
    let pki = Pki::new();
    let setup = Setup::new();
    let acme_port = free_port();
    let name = "late.wsgate.test";
    let directory = format!("https://127.0.0.1:{acme_port}/dir");

    // Without a [tls] certificate the name has none yet: unrecognized_name.
    let bare = Setup::new();
    let text = bare.text(&pki, &directory, &[name], "tls-alpn-01", "1/3", false, "");
    let bare_pki = Pki::new();
    let g = Gate::start_with(bare_pki, &text).await;
    let err = leaf_for(g.tls_addr, g.pki.client_config(), name)
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("UnrecognisedName")
            || format!("{err:?}").contains("UnrecognizedName"),
        "{err:?}"
    );
    g.stop().await;

    // With one, it serves the [tls] certificate and counts the failed order.
    let text = setup.text(&pki, &directory, &[name], "tls-alpn-01", "1/3", true, "");
    let gate = Gate::start_with(pki, &text).await;
    leaf_for(gate.tls_addr, gate.pki.client_config(), "localhost")
        .await
        .unwrap();
    metrics_until(&gate, Duration::from_secs(20), |m| {
        series(m, FAILED) == Some(1.0)
    })
    .await;
    // The first retry comes a minute later; pebble is there by then.
    let pebble = Pebble::start(&gate.pki, acme_port, free_port(), setup.tls_port, 3600).await;
    let root = pebble.root(&gate.pki).await;
    metrics_until(&gate, Duration::from_secs(120), |m| {
        series(m, OK) == Some(1.0)
    })
    .await;
    leaf_for(gate.tls_addr, trusting(&root), name)
        .await
        .unwrap();
    gate.stop().await;
}

#[test]
fn check_reads_the_directory_ca_and_the_eab_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(dir.path().join("eab.key"), "not base64url!\n").unwrap();
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[acme]\ndomains = [\"chat.example.com\"]\n\
             storage = \"{}\"\ndirectory_ca = \"{}\"\neab_kid = \"kid\"\neab_hmac_key_file = \"{}\"\n",
            dir.path().join("acme").display(),
            dir.path().join("missing-ca.pem").display(),
            dir.path().join("eab.key").display(),
        ),
    )
    .unwrap();
    let errors = wsgate::check(&path);
    let file = path.display().to_string();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&format!("{file}:6: acme.directory_ca:"))),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(
            |e| e.starts_with(&format!("{file}:8: acme.eab_hmac_key_file:"))
                && e.contains("not base64url")
        ),
        "{errors:?}"
    );
}
