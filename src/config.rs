//! The TOML configuration file: parsed into raw serde structs that keep source spans, then
//! turned into a typed [`Config`] of durations, sizes, addresses and origin rules. Every
//! problem is reported as a [`ConfigError`] naming the file, the line and the key.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Spanned, Value};

use crate::origin::OriginPolicy;

/// Where wsgate looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/wsgate/wsgate.toml";

/// One problem found in the configuration, with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line number, 0 when the problem is not tied to a line.
    pub line: usize,
    /// Dotted key the problem is about (`websocket.ping_interval`), may be empty.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found while loading a configuration.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A value together with the place in the file it came from, for errors found after parsing
/// (a certificate that does not load, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// 1-based line of the key in the configuration file (0 for a default).
    pub line: usize,
    /// Dotted key name.
    pub key: String,
}

/// The whole typed configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from; relative paths inside it were resolved against its folder.
    pub path: PathBuf,
    /// `[server]`.
    pub server: Server,
    /// `[tls]`.
    pub tls: Tls,
    /// `[limits]`.
    pub limits: Limits,
    /// `[websocket]`.
    pub websocket: WebSocket,
    /// `[upstream]`.
    pub upstream: Upstream,
    /// `[admin]`.
    pub admin: Admin,
    /// `[log]`.
    pub log: Log,
    /// `[[routes]]`, in file order.
    pub routes: Vec<Route>,
}

/// `[server]`: listeners and connection-level bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// TLS listeners (wss, https).
    pub listen: Vec<SocketAddr>,
    /// Cleartext listeners (ws, http).
    pub listen_plain: Vec<SocketAddr>,
    /// Accept to complete request head (TLS and PROXY header included).
    pub handshake_timeout: Duration,
    /// Cap on concurrent client connections; above it clients get 503.
    pub max_connections: NonZeroUsize,
    /// How long tunnels may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// Window over which drain Close frames are spread (cut to the grace).
    pub drain_spread: Duration,
    /// Largest request head (request line and header lines) accepted.
    pub max_request_head: usize,
    /// Expect a PROXY protocol v1/v2 header on every listener.
    pub proxy_protocol: bool,
    /// Runtime worker threads; `None` means one per core.
    pub workers: Option<NonZeroUsize>,
}

/// `[tls]`: the default certificate and the SNI ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// Default PEM chain.
    pub cert: Sourced<PathBuf>,
    /// Default PEM key.
    pub key: Sourced<PathBuf>,
    /// Further certificates picked by SNI.
    pub sni: Vec<SniCert>,
    /// Whether clients get session tickets to resume with a cheaper handshake.
    pub session_tickets: bool,
}

/// One `[[tls.sni]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCert {
    /// Lower-case server name, possibly `*.example.com`.
    pub server_name: String,
    /// PEM chain.
    pub cert: Sourced<PathBuf>,
    /// PEM key.
    pub key: Sourced<PathBuf>,
}

/// `[limits]`: per-address admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// New connections per second per address, sustained; 0 disables the rate limit.
    pub per_ip_rate: u32,
    /// Burst allowance on top of the rate.
    pub per_ip_burst: u32,
    /// Concurrent connections per address; 0 disables the cap.
    pub per_ip_max_connections: u32,
    /// IPv6 clients are keyed by this many leading bits.
    pub ipv6_prefix: u8,
}

/// `[websocket]`: keepalive, timeouts and frame bounds of established tunnels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSocket {
    /// Gateway ping period; zero disables gateway pings.
    pub ping_interval: Duration,
    /// Time allowed for the pong to a gateway ping.
    pub pong_timeout: Duration,
    /// No data frame either way for this long closes the tunnel; zero disables.
    pub idle_timeout: Duration,
    /// Largest payload a client frame may declare.
    pub max_frame_size: u64,
    /// Tunnels older than this are closed; zero disables.
    pub max_lifetime: Duration,
}

/// `[upstream]`: backend connection timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Per backend connect attempt.
    pub connect_timeout: Duration,
    /// Request sent to response head received.
    pub response_timeout: Duration,
}

/// `[admin]`: the metrics and health listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Where to serve `/metrics`, `/healthz`, `/readyz`; `None` disables it.
    pub listen: Option<SocketAddr>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// Output format.
    pub format: LogFormat,
    /// Default filter directive (`info`, `wsgate=debug`); `RUST_LOG` overrides it.
    pub level: String,
}

/// One backend address of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `host:port`, resolved at connect time.
    Tcp(String),
    /// `unix:/path` socket.
    Unix(PathBuf),
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Tcp(a) => f.write_str(a),
            Backend::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How a route spreads clients over its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Each connection or request takes the next backend.
    RoundRobin,
    /// A hash of the client address picks the backend, so a client keeps its backend.
    IpHash,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct Route {
    /// Index in the file, used as a stable label.
    pub index: usize,
    /// Path prefix matched on whole segments.
    pub path: String,
    /// Lower-case host without port, when the route is bound to one.
    pub host: Option<String>,
    /// Backends in the order given.
    pub backends: Vec<Backend>,
    /// Origin allowlist and the missing-Origin rule.
    pub origins: OriginPolicy,
    /// Backend choice.
    pub balance: Balance,
}

impl Route {
    /// A short label for logs and metrics: `host/path` or `path`.
    pub fn label(&self) -> String {
        match &self.host {
            Some(h) => format!("{h}{}", self.path),
            None => self.path.clone(),
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                key: String::new(),
                message: format!("cannot read the configuration file: {e}"),
            }])
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its folder).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        match Config::parse_all(path, text) {
            (Some(c), e) if e.is_empty() => Ok(c),
            (_, e) => Err(ConfigErrors(e)),
        }
    }

    /// Like [`Config::parse`], but also returns the configuration built despite semantic
    /// errors (with defaults in their place), so that later checks can report theirs too.
    pub fn parse_all(path: &Path, text: &str) -> (Option<Config>, Vec<ConfigError>) {
        let raw: Raw = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let err = ConfigError {
                    file: path.to_path_buf(),
                    line: line_of(text, span.start),
                    key: key_at(text, span.start),
                    message: e.message().trim().to_string(),
                };
                return (None, vec![err]);
            }
        };
        let mut cx = Cx {
            file: path,
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            text,
            errors: Vec::new(),
        };
        let config = cx.build(raw);
        // Report in file order; problems not tied to a line come last.
        cx.errors.sort_by_key(|e| (e.line == 0, e.line));
        (Some(config), cx.errors)
    }
}

/// Parses a duration that must carry a unit (`500ms`, `30s`, `10m`, `1h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("a duration is empty; write one like \"30s\"".into());
    }
    if t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "\"{t}\" has no unit; write a duration like \"{t}s\" or \"{t}ms\""
        ));
    }
    humantime::parse_duration(t).map_err(|e| format!("\"{t}\" is not a duration ({e})"))
}

/// Parses a size: bytes as an integer, or a string such as `64KiB`, `16MiB`, `1MB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("\"{t}\" is not a size; write bytes or one like \"64KiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit \"{other}\" in \"{t}\"; use B, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("\"{t}\" is too large"))
}

fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Best guess of the dotted key at `offset`, for parse errors that only carry a span.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    if line.starts_with('[') {
        return line
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string();
    }
    let key = line.split('=').next().unwrap_or("").trim().to_string();
    match (table, key.is_empty()) {
        (Some(t), false) => format!("{t}.{key}"),
        (Some(t), true) => t,
        (None, _) => key,
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    server: RawServer,
    tls: RawTls,
    limits: RawLimits,
    websocket: RawWebSocket,
    upstream: RawUpstream,
    admin: RawAdmin,
    log: RawLog,
    routes: Vec<RawRoute>,
}

type Opt<T> = Option<Spanned<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: Opt<Vec<Spanned<String>>>,
    listen_plain: Opt<Vec<Spanned<String>>>,
    handshake_timeout: Opt<Value>,
    max_connections: Opt<i64>,
    shutdown_grace: Opt<Value>,
    drain_spread: Opt<Value>,
    max_request_head: Opt<Value>,
    proxy_protocol: Option<bool>,
    workers: Opt<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert: Opt<String>,
    key: Opt<String>,
    sni: Vec<Spanned<RawSni>>,
    session_tickets: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSni {
    server_name: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    per_ip_rate: Opt<i64>,
    per_ip_burst: Opt<i64>,
    per_ip_max_connections: Opt<i64>,
    ipv6_prefix: Opt<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawWebSocket {
    ping_interval: Opt<Value>,
    pong_timeout: Opt<Value>,
    idle_timeout: Opt<Value>,
    max_frame_size: Opt<Value>,
    max_lifetime: Opt<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    connect_timeout: Opt<Value>,
    response_timeout: Opt<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: Opt<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: Opt<String>,
    level: Opt<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: Spanned<String>,
    host: Opt<String>,
    backends: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    allowed_origins: Opt<Vec<Spanned<String>>>,
    #[serde(default)]
    allow_missing_origin: Option<bool>,
    #[serde(default)]
    sticky: Opt<String>,
}

/// Whether a duration key accepts `"0s"` as "off".
#[derive(Clone, Copy, PartialEq)]
enum Zero {
    Disables,
    Invalid,
}

struct Cx<'a> {
    file: &'a Path,
    dir: PathBuf,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Cx<'_> {
    fn build(&mut self, raw: Raw) -> Config {
        let server = self.server(raw.server);
        let tls = self.tls(raw.tls);
        let limits = self.limits(raw.limits);
        let websocket = self.websocket(raw.websocket);
        let upstream = Upstream {
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                &raw.upstream.connect_timeout,
                Duration::from_secs(5),
                Zero::Invalid,
            ),
            response_timeout: self.duration(
                "upstream.response_timeout",
                &raw.upstream.response_timeout,
                Duration::from_secs(60),
                Zero::Invalid,
            ),
        };
        let admin = Admin {
            listen: match &raw.admin.listen {
                None => Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
                Some(s) if s.get_ref().trim().is_empty() => None,
                Some(s) => self.addr("admin.listen", s),
            },
        };
        let log = self.log(raw.log);
        let routes = raw
            .routes
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| self.route(i, r))
            .collect::<Vec<_>>();
        for (i, a) in routes.iter().enumerate() {
            if routes[..i]
                .iter()
                .any(|b| b.path == a.path && b.host == a.host)
            {
                self.errors.push(ConfigError {
                    file: self.file.to_path_buf(),
                    line: 0,
                    key: format!("routes[{}].path", a.index),
                    message: format!("route {} is defined twice", a.label()),
                });
            }
        }
        Config {
            path: self.file.to_path_buf(),
            server,
            tls,
            limits,
            websocket,
            upstream,
            admin,
            log,
            routes,
        }
    }

    fn server(&mut self, r: RawServer) -> Server {
        let listen = match &r.listen {
            None => vec![
                SocketAddr::from(([0, 0, 0, 0], 443)),
                SocketAddr::from(([0u16; 8], 443)),
            ],
            Some(v) => self.addrs("server.listen", v),
        };
        let listen_plain = match &r.listen_plain {
            None => Vec::new(),
            Some(v) => self.addrs("server.listen_plain", v),
        };
        let listed =
            |v: &Opt<Vec<Spanned<String>>>| v.as_ref().is_some_and(|l| !l.get_ref().is_empty());
        if r.listen.is_some() && !listed(&r.listen) && !listed(&r.listen_plain) {
            let line = r.listen.as_ref().map_or(0, |s| self.line(s.span()));
            self.push(
                line,
                "server.listen",
                "no listener: give server.listen or server.listen_plain",
            );
        }
        let max_connections = self
            .count(
                "server.max_connections",
                &r.max_connections,
                50_000,
                1,
                u32::MAX as i64,
            )
            .max(1);
        let max_request_head = self.size(
            "server.max_request_head",
            &r.max_request_head,
            32 * 1024,
            256..=16 * 1024 * 1024,
        ) as usize;
        let workers = r.workers.as_ref().map(|w| {
            let n = self.count("server.workers", &Some(w.clone()), 1, 1, 1024);
            NonZeroUsize::new(n as usize).unwrap_or(NonZeroUsize::MIN)
        });
        Server {
            listen,
            listen_plain,
            handshake_timeout: self.duration(
                "server.handshake_timeout",
                &r.handshake_timeout,
                Duration::from_secs(10),
                Zero::Invalid,
            ),
            max_connections: NonZeroUsize::new(max_connections as usize)
                .unwrap_or(NonZeroUsize::MIN),
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                &r.shutdown_grace,
                Duration::from_secs(30),
                Zero::Disables,
            ),
            drain_spread: self.duration(
                "server.drain_spread",
                &r.drain_spread,
                Duration::from_secs(5),
                Zero::Disables,
            ),
            max_request_head,
            proxy_protocol: r.proxy_protocol.unwrap_or(false),
            workers,
        }
    }

    fn tls(&mut self, r: RawTls) -> Tls {
        let cert = self.path_or("tls.cert", &r.cert, "certs/localhost.pem");
        let key = self.path_or("tls.key", &r.key, "certs/localhost-key.pem");
        let mut sni = Vec::new();
        for (i, s) in r.sni.into_iter().enumerate() {
            let s = s.into_inner();
            let name = s.server_name.get_ref().trim().to_ascii_lowercase();
            let base = format!("tls.sni[{i}]");
            if name.is_empty() || name.contains(['/', ':', ' ']) {
                let line = self.line(s.server_name.span());
                self.push(
                    line,
                    &format!("{base}.server_name"),
                    format!("\"{name}\" is not a DNS name"),
                );
            }
            sni.push(SniCert {
                server_name: name,
                cert: self.path_or(&format!("{base}.cert"), &Some(s.cert), ""),
                key: self.path_or(&format!("{base}.key"), &Some(s.key), ""),
            });
        }
        Tls {
            cert,
            key,
            sni,
            session_tickets: r.session_tickets.unwrap_or(true),
        }
    }

    fn limits(&mut self, r: RawLimits) -> Limits {
        Limits {
            per_ip_rate: self.count("limits.per_ip_rate", &r.per_ip_rate, 20, 0, 1_000_000) as u32,
            per_ip_burst: self.count("limits.per_ip_burst", &r.per_ip_burst, 40, 1, 1_000_000)
                as u32,
            per_ip_max_connections: self.count(
                "limits.per_ip_max_connections",
                &r.per_ip_max_connections,
                256,
                0,
                u32::MAX as i64,
            ) as u32,
            ipv6_prefix: self.count("limits.ipv6_prefix", &r.ipv6_prefix, 64, 1, 128) as u8,
        }
    }

    fn websocket(&mut self, r: RawWebSocket) -> WebSocket {
        WebSocket {
            ping_interval: self.duration(
                "websocket.ping_interval",
                &r.ping_interval,
                Duration::from_secs(30),
                Zero::Disables,
            ),
            pong_timeout: self.duration(
                "websocket.pong_timeout",
                &r.pong_timeout,
                Duration::from_secs(10),
                Zero::Invalid,
            ),
            idle_timeout: self.duration(
                "websocket.idle_timeout",
                &r.idle_timeout,
                Duration::from_secs(600),
                Zero::Disables,
            ),
            max_frame_size: self.size(
                "websocket.max_frame_size",
                &r.max_frame_size,
                16 * 1024 * 1024,
                1..=(i64::MAX as u64),
            ),
            max_lifetime: self.duration(
                "websocket.max_lifetime",
                &r.max_lifetime,
                Duration::ZERO,
                Zero::Disables,
            ),
        }
    }

    fn log(&mut self, r: RawLog) -> Log {
        let format = match &r.format {
            None => LogFormat::Text,
            Some(f) => match f.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    let line = self.line(f.span());
                    self.push(
                        line,
                        "log.format",
                        format!("\"{other}\" is not a log format; use \"text\" or \"json\""),
                    );
                    LogFormat::Text
                }
            },
        };
        let level = match &r.level {
            None => "info".to_string(),
            Some(l) => {
                if tracing_subscriber::EnvFilter::try_new(l.get_ref()).is_err() {
                    let line = self.line(l.span());
                    self.push(
                        line,
                        "log.level",
                        format!("\"{}\" is not a log filter (try \"info\")", l.get_ref()),
                    );
                }
                l.get_ref().clone()
            }
        };
        Log { format, level }
    }

    fn route(&mut self, index: usize, r: RawRoute) -> Option<Route> {
        let base = format!("routes[{index}]");
        let errors_before = self.errors.len();
        let path = r.path.get_ref().clone();
        if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
            let line = self.line(r.path.span());
            self.push(
                line,
                &format!("{base}.path"),
                format!("\"{path}\" is not a path prefix; it must start with / and hold no query"),
            );
        }
        let host = r.host.as_ref().map(|h| {
            let v = h.get_ref().trim().to_ascii_lowercase();
            if v.is_empty() || v.contains(['/', ' ']) {
                let line = self.line(h.span());
                self.push(
                    line,
                    &format!("{base}.host"),
                    format!("\"{v}\" is not a host name"),
                );
            }
            v
        });
        let mut backends = Vec::new();
        if r.backends.get_ref().is_empty() {
            let line = self.line(r.backends.span());
            self.push(
                line,
                &format!("{base}.backends"),
                "a route needs at least one backend",
            );
        }
        for b in r.backends.get_ref() {
            match self.backend(b.get_ref()) {
                Ok(be) => backends.push(be),
                Err(msg) => {
                    let line = self.line(b.span());
                    self.push(line, &format!("{base}.backends"), msg);
                }
            }
        }
        let mut rules = Vec::new();
        if let Some(list) = &r.allowed_origins {
            for o in list.get_ref() {
                match crate::origin::OriginRule::parse(o.get_ref()) {
                    Ok(rule) => rules.push(rule),
                    Err(msg) => {
                        let line = self.line(o.span());
                        self.push(line, &format!("{base}.allowed_origins"), msg);
                    }
                }
            }
        }
        let balance = match &r.sticky {
            None => Balance::RoundRobin,
            Some(s) => match s.get_ref().as_str() {
                "ip_hash" => Balance::IpHash,
                "" | "none" => Balance::RoundRobin,
                other => {
                    let line = self.line(s.span());
                    self.push(
                        line,
                        &format!("{base}.sticky"),
                        format!("\"{other}\" is not a stickiness mode; use \"ip_hash\""),
                    );
                    Balance::RoundRobin
                }
            },
        };
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Route {
            index,
            path,
            host,
            backends,
            origins: OriginPolicy::new(rules, r.allow_missing_origin.unwrap_or(false)),
            balance,
        })
    }

    fn backend(&self, s: &str) -> Result<Backend, String> {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("\"unix:\" needs a socket path".into());
            }
            return Ok(Backend::Unix(self.dir.join(p)));
        }
        let bad = || format!("\"{s}\" is not host:port or unix:/path");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad());
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(format!("\"{s}\": write IPv6 backends as [addr]:port"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(Backend::Tcp(s.to_string())),
            _ => Err(format!("\"{s}\" has no valid port")),
        }
    }

    fn line(&self, span: Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    fn push(&mut self, line: usize, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, v: &Opt<Value>, default: Duration, zero: Zero) -> Duration {
        let Some(v) = v else { return default };
        let line = self.line(v.span());
        let parsed = match v.get_ref() {
            Value::String(s) => parse_duration(s),
            Value::Integer(n) => Err(format!(
                "{n} has no unit; write a duration like \"{n}s\" or \"{n}ms\""
            )),
            other => Err(format!(
                "expected a duration string like \"30s\", found {}",
                other.type_str()
            )),
        };
        match parsed {
            Ok(d) if d.is_zero() && zero == Zero::Invalid => {
                self.push(line, key, "must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(msg) => {
                self.push(line, key, msg);
                default
            }
        }
    }

    fn size(
        &mut self,
        key: &str,
        v: &Opt<Value>,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        let Some(v) = v else { return default };
        let line = self.line(v.span());
        let parsed = match v.get_ref() {
            Value::Integer(n) if *n >= 0 => Ok(*n as u64),
            Value::Integer(n) => Err(format!("{n} is negative")),
            Value::String(s) => parse_size(s),
            other => Err(format!(
                "expected a size (bytes, or a string like \"64KiB\"), found {}",
                other.type_str()
            )),
        };
        match parsed {
            Ok(n) if range.contains(&n) => n,
            Ok(n) => {
                self.push(
                    line,
                    key,
                    format!(
                        "{n} bytes is out of range ({} to {})",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
            Err(msg) => {
                self.push(line, key, msg);
                default
            }
        }
    }

    fn count(&mut self, key: &str, v: &Opt<i64>, default: i64, min: i64, max: i64) -> i64 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < min || n > max {
            let line = self.line(v.span());
            self.push(line, key, format!("{n} is out of range ({min} to {max})"));
            return default;
        }
        n
    }

    fn addr(&mut self, key: &str, s: &Spanned<String>) -> Option<SocketAddr> {
        match s.get_ref().trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let line = self.line(s.span());
                self.push(
                    line,
                    key,
                    format!(
                        "\"{}\" is not an address like \"0.0.0.0:443\" or \"[::]:443\"",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn addrs(&mut self, key: &str, v: &Spanned<Vec<Spanned<String>>>) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for s in v.get_ref() {
            if let Some(a) = self.addr(key, s) {
                if out.contains(&a) {
                    let line = self.line(s.span());
                    self.push(line, key, format!("{a} is listed twice"));
                } else {
                    out.push(a);
                }
            }
        }
        out
    }

    fn path_or(&mut self, key: &str, v: &Opt<String>, default: &str) -> Sourced<PathBuf> {
        let (s, line) = match v {
            Some(s) => (s.get_ref().as_str(), self.line(s.span())),
            None => (default, 0),
        };
        if s.trim().is_empty() {
            self.push(line, key, "a file path is required");
        }
        Sourced {
            value: self.dir.join(s),
            line,
            key: key.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(Path::new("/etc/wsgate/test.toml"), text)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen.len(), 2);
        assert_eq!(c.server.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.server.max_connections.get(), 50_000);
        assert_eq!(c.server.max_request_head, 32 * 1024);
        assert_eq!(c.websocket.max_frame_size, 16 * 1024 * 1024);
        assert_eq!(c.websocket.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.limits.per_ip_burst, 40);
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(60));
        assert_eq!(
            c.tls.cert.value,
            PathBuf::from("/etc/wsgate/certs/localhost.pem")
        );
    }

    #[test]
    fn bare_number_duration_is_an_error_naming_line_and_key() {
        let e = parse("[websocket]\n\nping_interval = 30\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("test.toml:3: websocket.ping_interval: 30 has no unit"),
            "{s}"
        );
        let e = parse("[websocket]\nping_interval = \"30\"\n").unwrap_err();
        assert!(e.to_string().contains(":2: websocket.ping_interval"), "{e}");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("[limits]\nper_ip_rat = 3\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("test.toml:2: limits.per_ip_rat"), "{s}");
        assert!(s.contains("unknown field"), "{s}");
    }

    #[test]
    fn every_semantic_error_is_reported() {
        let text = "[server]\nhandshake_timeout = \"soon\"\nmax_request_head = \"12 parsecs\"\n\
                    [[routes]]\npath = \"chat\"\nbackends = [\"nowhere\"]\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.0.len(), 4, "{e}");
        assert_eq!(e.0[0].line, 2);
        assert_eq!(e.0[1].line, 3);
        assert_eq!(e.0[2].key, "routes[0].path");
        assert_eq!(e.0[3].key, "routes[0].backends");
    }

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("3 furlongs").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("10").is_err());
    }

    #[test]
    fn relative_paths_resolve_against_config_folder() {
        let c = parse("[[routes]]\npath = \"/s\"\nbackends = [\"unix:run/app.sock\"]\n").unwrap();
        assert_eq!(
            c.routes[0].backends[0],
            Backend::Unix(PathBuf::from("/etc/wsgate/run/app.sock"))
        );
    }
}
