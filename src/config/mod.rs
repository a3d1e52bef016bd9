//! The TOML configuration file, by stage: [`raw`] serde structs that keep source spans,
//! [`build`] turning them into the typed [`Config`] of durations, sizes, addresses and origin
//! rules, [`units`] for the duration and size syntax, and [`defaults`] holding every default.
//! Every problem is reported as a [`ConfigError`] naming the file, the line and the key.

mod build;
pub(crate) mod defaults;
mod raw;
mod units;

pub(crate) use units::parse_duration;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
pub(crate) struct Sourced<T> {
    /// The value.
    pub(crate) value: T,
    /// 1-based line of the key in the configuration file (0 for a default).
    pub(crate) line: usize,
    /// Dotted key name.
    pub(crate) key: String,
}

/// The whole typed configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from; relative paths inside it were resolved against its folder.
    pub(crate) path: PathBuf,
    /// `[server]`.
    pub(crate) server: Server,
    /// `[tls]`.
    pub(crate) tls: Tls,
    /// `[limits]`.
    pub(crate) limits: Limits,
    /// `[upstream]`.
    pub(crate) upstream: Upstream,
    /// `[admin]`.
    pub(crate) admin: Admin,
    /// `[cluster]`: budgets and control shared with other instances through Redis.
    pub(crate) cluster: Option<Cluster>,
    /// `[acme]`: certificates ordered from an ACME server.
    pub(crate) acme: Option<Acme>,
    /// `[log]`.
    pub(crate) log: Log,
    /// `[[auth]]`, in file order; routes refer to them by index.
    pub(crate) auth: Vec<Auth>,
    /// `[[routes]]`, in file order.
    pub(crate) routes: Vec<Route>,
}

/// `[server]`: listeners and connection-level bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Server {
    /// TLS listeners (wss, https).
    pub(crate) listen: Vec<SocketAddr>,
    /// Cleartext listeners (ws, http).
    pub(crate) listen_plain: Vec<SocketAddr>,
    /// Accept to complete request head (TLS and PROXY header included).
    pub(crate) handshake_timeout: Duration,
    /// Cap on concurrent client connections; above it clients get 503.
    pub(crate) max_connections: NonZeroUsize,
    /// How long tunnels may run on after SIGTERM.
    pub(crate) shutdown_grace: Duration,
    /// Window over which drain Close frames are spread (cut to the grace).
    pub(crate) drain_spread: Duration,
    /// Largest request head (request line and header lines) accepted.
    pub(crate) max_request_head: usize,
    /// Expect a PROXY protocol v1/v2 header on every listener.
    pub(crate) proxy_protocol: bool,
    /// Runtime worker threads; `None` means one per core.
    pub(crate) workers: Option<NonZeroUsize>,
    /// TLS listeners offer `h2` by ALPN beside `http/1.1`.
    pub(crate) http2: bool,
    /// Streams one HTTP/2 connection may have open at once.
    pub(crate) h2_max_concurrent_streams: u32,
    /// HTTP/2 connections announce `SETTINGS_ENABLE_CONNECT_PROTOCOL` and take WebSockets by
    /// extended CONNECT (RFC 8441). Only with `http2`.
    pub(crate) websocket_over_h2: bool,
}

/// `[tls]`: the default certificate and the SNI ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tls {
    /// Default PEM chain and key; `None` only with `[acme]` when neither key is set (names
    /// without a certificate then fail their handshakes with `unrecognized_name`).
    pub(crate) default: Option<(Sourced<PathBuf>, Sourced<PathBuf>)>,
    /// Further certificates picked by SNI.
    pub(crate) sni: Vec<SniCert>,
    /// Whether clients get session tickets to resume with a cheaper handshake.
    pub(crate) session_tickets: bool,
    /// Client certificates asked for on connections no `[[tls.sni]]` entry of its own
    /// settles.
    pub(crate) client_auth: Option<ClientAuth>,
}

/// `client_ca` and `client_auth`: which CAs issue client certificates and whether one is
/// needed to finish the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientAuth {
    /// PEM bundle of the issuing CAs.
    pub(crate) ca: Sourced<PathBuf>,
    /// `client_auth = "required"`: no certificate, no handshake.
    pub(crate) required: bool,
}

/// One `[[tls.sni]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SniCert {
    /// Lower-case server name, possibly `*.example.com`.
    pub(crate) server_name: String,
    /// PEM chain.
    pub(crate) cert: Sourced<PathBuf>,
    /// PEM key.
    pub(crate) key: Sourced<PathBuf>,
    /// This name's own client certificate settings; `None`: `[tls]`'s.
    pub(crate) client_auth: Option<ClientAuth>,
}

/// `[limits]`: per-address admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Limits {
    /// New connections per second per address, sustained; 0 disables the rate limit.
    pub(crate) per_ip_rate: u32,
    /// Burst allowance on top of the rate.
    pub(crate) per_ip_burst: u32,
    /// Concurrent connections per address; 0 disables the cap.
    pub(crate) per_ip_max_connections: u32,
    /// IPv6 clients are keyed by this many leading bits.
    pub(crate) ipv6_prefix: u8,
}

/// `[websocket]`: keepalive, timeouts and frame bounds of established tunnels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WebSocket {
    /// Gateway ping period; zero disables gateway pings.
    pub(crate) ping_interval: Duration,
    /// Time allowed for the pong to a gateway ping.
    pub(crate) pong_timeout: Duration,
    /// No data frame either way for this long closes the tunnel; zero disables.
    pub(crate) idle_timeout: Duration,
    /// Largest payload a client frame may declare.
    pub(crate) max_frame_size: u64,
    /// Tunnels older than this are closed; zero disables.
    pub(crate) max_lifetime: Duration,
    /// Largest client message, summed over its frames; zero disables.
    pub(crate) max_message_size: u64,
    /// Client messages (and pings) per second; zero disables.
    pub(crate) client_message_rate: u64,
    /// Burst of the message rate; zero means one second's worth.
    pub(crate) client_message_burst: u64,
    /// Client payload bytes per second; zero disables.
    pub(crate) client_byte_rate: u64,
    /// Burst of the byte rate; zero means one second's worth.
    pub(crate) client_byte_burst: u64,
    /// What an exhausted rate does.
    pub(crate) rate_limit_action: RateLimitAction,
    /// Each tunnel's `max_lifetime` is shortened by a random amount up to this.
    pub(crate) max_lifetime_jitter: Duration,
}

/// `rate_limit_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateLimitAction {
    /// Stop reading from the client until its bucket refills.
    Throttle,
    /// Close the tunnel with 1008.
    Close,
}

/// `[upstream]`: backend connection timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upstream {
    /// Per backend connect attempt.
    pub(crate) connect_timeout: Duration,
    /// Request sent to response head received.
    pub(crate) response_timeout: Duration,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cluster {
    /// The Redis URL as the client takes it (`redis://`, `rediss://`, `redis+unix://`).
    pub(crate) redis: String,
    /// This instance's name in the fleet.
    pub(crate) instance: String,
    pub(crate) sync_interval: Duration,
}

/// `[acme]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Acme {
    /// The directory URL (https).
    pub(crate) directory: String,
    /// Contact URIs for the account (`mailto:`).
    pub(crate) contact: Vec<String>,
    /// Lower-case DNS names, one certificate each.
    pub(crate) domains: Vec<String>,
    /// Folder for the account key, certificates and keys.
    pub(crate) storage: Sourced<PathBuf>,
    pub(crate) challenge: AcmeChallenge,
    pub(crate) renew_before: RenewBefore,
    /// Extra roots trusted for the ACME server's own certificate.
    pub(crate) directory_ca: Option<Sourced<PathBuf>>,
    /// External Account Binding: key id and the file holding the base64url HMAC key.
    pub(crate) eab: Option<(String, Sourced<PathBuf>)>,
}

/// `acme.challenge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcmeChallenge {
    /// RFC 8737, answered in the TLS handshake on `listen`.
    TlsAlpn01,
    /// Answered on `listen_plain` under `/.well-known/acme-challenge/`.
    Http01,
}

impl AcmeChallenge {
    /// The name the configuration and the logs use.
    pub(crate) fn name(self) -> &'static str {
        match self {
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
            AcmeChallenge::Http01 => "http-01",
        }
    }
}

/// `acme.renew_before`: when a certificate is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RenewBefore {
    /// When less than `num/den` of the lifetime is left.
    Fraction { num: u32, den: u32 },
    /// When less than this is left.
    Left(Duration),
}

/// `[admin]`: the metrics and health listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Admin {
    /// Where to serve `/metrics`, `/healthz`, `/readyz`, the API and the status page; `None`
    /// disables it.
    pub(crate) listen: Option<SocketAddr>,
    /// The file holding the bearer token the API needs.
    pub(crate) token_file: Option<Sourced<PathBuf>>,
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
pub(crate) struct Log {
    /// Output format.
    pub(crate) format: LogFormat,
    /// Default filter directive (`info`, `wsgate=debug`); `RUST_LOG` overrides it.
    pub(crate) level: String,
}

/// One backend address of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Backend {
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
pub(crate) enum Balance {
    /// Each connection or request takes the next backend, in proportion to the weights.
    RoundRobin,
    /// The backend with the fewest open tunnels plus requests in flight, per unit of weight.
    LeastConn,
}

/// What keeps a client on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sticky {
    None,
    /// A hash of the client address picks the backend.
    IpHash,
    /// A cookie of this name names the backend (an opaque keyed hash of its address).
    Cookie(String),
}

/// One entry of a route's `backends`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackendConf {
    pub(crate) target: Backend,
    /// The address as written: the `backend` label of metrics and the admin API.
    pub(crate) label: String,
    pub(crate) weight: u32,
    /// Open tunnels at most; zero is no cap.
    pub(crate) max_tunnels: u32,
}

/// `backend_tls` with its roots and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackendTls {
    pub(crate) ca: Option<Sourced<PathBuf>>,
    /// SNI and the name verified; `None`: each backend's host.
    pub(crate) server_name: Option<String>,
}

/// What a backend marked down does to its open tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnDown {
    Keep,
    /// Close 1012, spread over `[server] drain_spread`.
    Close,
}

/// `[routes.health]`: active checks of the route's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Health {
    /// HTTP GET expecting 2xx; `None`: a TCP connect is the check.
    pub(crate) path: Option<String>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) healthy_threshold: u32,
    pub(crate) unhealthy_threshold: u32,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// Index in the file, used as a stable label.
    pub(crate) index: usize,
    /// Path prefix matched on whole segments.
    pub(crate) path: String,
    /// Lower-case host without port, when the route is bound to one.
    pub(crate) host: Option<String>,
    /// Backends in the order given.
    pub(crate) backends: Vec<BackendConf>,
    /// Origin allowlist and the missing-Origin rule.
    pub(crate) origins: OriginPolicy,
    /// Backend choice.
    pub(crate) balance: Balance,
    pub(crate) sticky: Sticky,
    pub(crate) backend_tls: Option<BackendTls>,
    /// Each backend connection starts with a PROXY v2 header naming the client.
    pub(crate) send_proxy_protocol: bool,
    pub(crate) on_backend_down: OnDown,
    pub(crate) health: Option<Health>,
    /// `[websocket]` with this route's `[routes.websocket]` overrides.
    pub(crate) websocket: WebSocket,
    /// The index in [`Config::auth`] of the authenticator guarding the route.
    pub(crate) auth: Option<usize>,
    /// Requests without a verified client certificate get 403.
    pub(crate) require_client_cert: bool,
}

/// One `[[auth]]` entry.
#[derive(Debug, Clone)]
pub(crate) struct Auth {
    pub(crate) name: String,
    pub(crate) kind: AuthKind,
}

/// What an authenticator checks.
#[derive(Debug, Clone)]
pub(crate) enum AuthKind {
    Jwt(Jwt),
    Forward(Forward),
}

/// `type = "jwt"`.
#[derive(Debug, Clone)]
pub(crate) struct Jwt {
    /// Where the token is looked for, in order.
    pub(crate) token_from: Vec<TokenSource>,
    /// Where the public keys come from (`None` with only `secret_file`).
    pub(crate) keys: Option<JwksSource>,
    /// The HMAC secret for HS256/384/512.
    pub(crate) secret_file: Option<Sourced<PathBuf>>,
    pub(crate) issuer: Option<String>,
    /// The token's `aud` must hold one of these; empty: not checked.
    pub(crate) audience: Vec<String>,
    pub(crate) algorithms: Vec<jsonwebtoken::Algorithm>,
    pub(crate) leeway: Duration,
    pub(crate) require_exp: bool,
    /// Claim name to the header the backend gets it in.
    pub(crate) forward_claims: Vec<(String, http::HeaderName)>,
    pub(crate) strip_token: bool,
    pub(crate) expired_close_code: u16,
}

/// Where a token may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenSource {
    /// A header's value (`Authorization`: after `Bearer `).
    Header(http::HeaderName),
    Cookie(String),
    /// A query parameter, percent-decoded.
    Query(String),
    /// An offered `Sec-WebSocket-Protocol` entry starting with this prefix.
    Subprotocol(String),
}

/// Where a JWT authenticator's public keys come from.
#[derive(Debug, Clone)]
pub(crate) enum JwksSource {
    /// Read at start and at every reload.
    File(Sourced<PathBuf>),
    /// Fetched at start and every `refresh`.
    Url {
        url: http::Uri,
        /// Extra roots for an https URL.
        ca: Option<Sourced<PathBuf>>,
        refresh: Duration,
    },
}

/// `type = "forward"`.
#[derive(Debug, Clone)]
pub(crate) struct Forward {
    pub(crate) url: http::Uri,
    pub(crate) timeout: Duration,
    pub(crate) copy_headers: Vec<http::HeaderName>,
    pub(crate) expires_header: Option<http::HeaderName>,
    pub(crate) subject_header: Option<http::HeaderName>,
}

impl Route {
    /// A short label for logs and metrics: `host/path` or `path`.
    pub(crate) fn label(&self) -> String {
        match &self.host {
            Some(h) => format!("{h}{}", self.path),
            None => self.path.clone(),
        }
    }
}

impl Config {
    /// The log output format (`[log] format`).
    pub fn log_format(&self) -> LogFormat {
        self.log.format
    }

    /// The default log filter (`[log] level`; `RUST_LOG` overrides it).
    pub fn log_level(&self) -> &str {
        &self.log.level
    }

    /// Runtime worker threads (`[server] workers`); `None` means one per core.
    pub fn workers(&self) -> Option<usize> {
        self.server.workers.map(|n| n.get())
    }

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
        let raw: raw::Raw = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let err = ConfigError {
                    file: path.to_path_buf(),
                    line: units::line_of(text, span.start),
                    key: units::key_at(text, span.start),
                    message: e.message().trim().to_string(),
                };
                return (None, vec![err]);
            }
        };
        let (config, mut errors) = build::build(path, text, raw);
        // Report in file order; problems not tied to a line come last.
        errors.sort_by_key(|e| (e.line == 0, e.line));
        (Some(config), errors)
    }
}

#[cfg(test)]
mod tests;
