//! From the raw file to the typed [`Config`]: each table built by its own method, each value
//! checked and converted, every problem pushed with its line and key while the build goes on,
//! so one run reports them all.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Spanned, Value};

use super::defaults as d;
use super::raw::*;
use super::units::{line_of, parse_duration, parse_size};
use super::*;
use crate::origin::OriginPolicy;

/// Builds the typed configuration of `raw`, read from `file`, with every problem found.
pub(super) fn build(file: &Path, text: &str, raw: Raw) -> (Config, Vec<ConfigError>) {
    let mut cx = Cx {
        file,
        dir: file.parent().unwrap_or(Path::new(".")).to_path_buf(),
        text,
        errors: Vec::new(),
    };
    let config = cx.build(raw);
    (config, cx.errors)
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
        let tls = self.tls(raw.tls, raw.acme.is_some());
        let limits = self.limits(raw.limits);
        let websocket = self.websocket("websocket", &raw.websocket, &d::websocket());
        let upstream = Upstream {
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                &raw.upstream.connect_timeout,
                d::CONNECT_TIMEOUT,
                Zero::Invalid,
            ),
            response_timeout: self.duration(
                "upstream.response_timeout",
                &raw.upstream.response_timeout,
                d::RESPONSE_TIMEOUT,
                Zero::Invalid,
            ),
        };
        let listen = match &raw.admin.listen {
            None => d::ADMIN_LISTEN.parse().ok(),
            Some(s) if s.get_ref().trim().is_empty() => None,
            Some(s) => self.addr("admin.listen", s),
        };
        let token_file = raw
            .admin
            .token_file
            .as_ref()
            .map(|_| self.path_or("admin.token_file", &raw.admin.token_file, ""));
        // /tunnels shows client addresses: never beyond loopback without the token.
        if let Some(a) = listen
            && !a.ip().is_loopback()
            && token_file.is_none()
        {
            let line = raw.admin.listen.as_ref().map_or(0, |s| self.line(s.span()));
            self.push(
                line,
                "admin.listen",
                format!("{a} is not a loopback address: set admin.token_file too"),
            );
        }
        let admin = Admin { listen, token_file };
        let cluster = raw.cluster.map(|c| self.cluster(c));
        let acme = raw.acme.map(|a| self.acme(a, &server));
        let log = self.log(raw.log);
        let auth = self.auth(raw.auth);
        let routes = raw
            .routes
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| self.route(i, r, &websocket, &auth))
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
            upstream,
            admin,
            cluster: cluster.flatten(),
            acme: acme.flatten(),
            log,
            auth,
            routes,
        }
    }

    fn cluster(&mut self, c: Spanned<RawCluster>) -> Option<Cluster> {
        let line = self.line(c.span());
        let c = c.into_inner();
        let sync_interval = self.duration(
            "cluster.sync_interval",
            &c.sync_interval,
            d::SYNC_INTERVAL,
            Zero::Invalid,
        );
        if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&sync_interval) {
            let l = c
                .sync_interval
                .as_ref()
                .map_or(line, |v| self.line(v.span()));
            self.push(l, "cluster.sync_interval", "must be between 10ms and 10s");
        }
        let instance = match &c.instance {
            Some(i) if i.get_ref().trim().is_empty() => {
                let l = self.line(i.span());
                self.push(l, "cluster.instance", "must not be empty");
                String::new()
            }
            Some(i) => i.get_ref().trim().to_string(),
            None => rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
        };
        let Some(r) = &c.redis else {
            self.push(
                line,
                "cluster.redis",
                "required in [cluster] (a redis://, rediss:// or unix: URL)",
            );
            return None;
        };
        let url = r.get_ref().trim();
        let redis = if let Some(path) = url.strip_prefix("unix:") {
            format!("redis+unix://{}", path.trim_start_matches("//"))
        } else if url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://")
        {
            url.to_string()
        } else {
            let l = self.line(r.span());
            self.push(
                l,
                "cluster.redis",
                format!("\"{url}\" is not a redis://, rediss:// or unix:/path URL"),
            );
            return None;
        };
        if let Err(e) = redis::Client::open(redis.as_str()) {
            let l = self.line(r.span());
            self.push(l, "cluster.redis", format!("\"{url}\": {e}"));
            return None;
        }
        Some(Cluster {
            redis,
            instance,
            sync_interval,
        })
    }

    fn acme(&mut self, a: Spanned<RawAcme>, server: &Server) -> Option<Acme> {
        let line = self.line(a.span());
        let a = a.into_inner();
        let directory = match &a.directory {
            None => d::ACME_DIRECTORY.to_string(),
            Some(u) => {
                let v = u.get_ref().trim().to_string();
                if let Err(msg) = acme_directory(&v) {
                    let l = self.line(u.span());
                    self.push(l, "acme.directory", format!("\"{v}\" {msg}"));
                }
                v
            }
        };
        let mut contact = Vec::new();
        for c in a.contact.iter().flat_map(|l| l.get_ref()) {
            let v = c.get_ref().trim().to_string();
            let ok = match v.split_once(':') {
                Some(("mailto", addr)) => {
                    let at = addr.split_once('@');
                    at.is_some_and(|(u, h)| {
                        !u.is_empty() && !h.is_empty() && !h.contains(['@', ' ', '/'])
                    })
                }
                Some((scheme, rest)) => {
                    !rest.is_empty()
                        && scheme
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                }
                None => false,
            };
            if !ok {
                let l = self.line(c.span());
                self.push(
                    l,
                    "acme.contact",
                    format!("\"{v}\" is not a contact URI (write \"mailto:ops@example.com\")"),
                );
            }
            contact.push(v);
        }
        let mut domains: Vec<String> = Vec::new();
        match &a.domains {
            None => self.push(
                line,
                "acme.domains",
                "required in [acme] (the names to order)",
            ),
            Some(l) if l.get_ref().is_empty() => {
                let l = self.line(l.span());
                self.push(l, "acme.domains", "must name at least one domain");
            }
            Some(l) => {
                for n in l.get_ref() {
                    let v = n
                        .get_ref()
                        .trim()
                        .trim_end_matches('.')
                        .to_ascii_lowercase();
                    let problem = if v.starts_with("*.") {
                        Some(
                            "is a wildcard: wildcards need the dns-01 challenge, which wsgate does not answer",
                        )
                    } else if v.parse::<std::net::IpAddr>().is_ok() {
                        Some("is an IP address: ACME here orders DNS names")
                    } else if !is_dns_name(&v) {
                        Some("is not a DNS name")
                    } else if domains.contains(&v) {
                        Some("is listed twice")
                    } else {
                        None
                    };
                    let l = self.line(n.span());
                    match problem {
                        Some(p) => self.push(l, "acme.domains", format!("\"{v}\" {p}")),
                        None => domains.push(v),
                    }
                }
            }
        }
        let storage = self.path_or("acme.storage", &a.storage, d::ACME_STORAGE);
        if let Err(msg) = writable_dir(&storage.value) {
            let l = if storage.line == 0 {
                line
            } else {
                storage.line
            };
            self.push(l, "acme.storage", msg);
        }
        let challenge =
            match self.choice("acme.challenge", &a.challenge, &["tls-alpn-01", "http-01"]) {
                Some("http-01") => AcmeChallenge::Http01,
                _ => AcmeChallenge::TlsAlpn01,
            };
        let challenge_line = a.challenge.as_ref().map_or(line, |c| self.line(c.span()));
        match challenge {
            AcmeChallenge::Http01 if server.listen_plain.is_empty() => self.push(
                challenge_line,
                "acme.challenge",
                "http-01 is answered on the plain listeners: set server.listen_plain (port 80)",
            ),
            AcmeChallenge::TlsAlpn01 if server.listen.is_empty() => self.push(
                challenge_line,
                "acme.challenge",
                "tls-alpn-01 is answered on the TLS listeners: set server.listen (port 443)",
            ),
            _ => {}
        }
        let renew_before = match &a.renew_before {
            None => RenewBefore::Fraction { num: 1, den: 3 },
            Some(r) => match parse_renew_before(r.get_ref()) {
                Ok(v) => v,
                Err(msg) => {
                    let l = self.line(r.span());
                    self.push(l, "acme.renew_before", msg);
                    RenewBefore::Fraction { num: 1, den: 3 }
                }
            },
        };
        let directory_ca = a
            .directory_ca
            .as_ref()
            .map(|_| self.path_or("acme.directory_ca", &a.directory_ca, ""));
        let eab = match (&a.eab_kid, &a.eab_hmac_key_file) {
            (None, None) => None,
            (Some(k), Some(_)) => {
                let file = self.path_or("acme.eab_hmac_key_file", &a.eab_hmac_key_file, "");
                let kid = k.get_ref().trim().to_string();
                if kid.is_empty() {
                    let l = self.line(k.span());
                    self.push(l, "acme.eab_kid", "must not be empty");
                }
                Some((kid, file))
            }
            (Some(k), None) => {
                let l = self.line(k.span());
                self.push(
                    l,
                    "acme.eab_hmac_key_file",
                    "eab_kid is set: set eab_hmac_key_file too",
                );
                None
            }
            (None, Some(f)) => {
                let l = self.line(f.span());
                self.push(
                    l,
                    "acme.eab_kid",
                    "eab_hmac_key_file is set: set eab_kid too",
                );
                None
            }
        };
        Some(Acme {
            directory,
            contact,
            domains,
            storage,
            challenge,
            renew_before,
            directory_ca,
            eab,
        })
    }

    fn server(&mut self, r: RawServer) -> Server {
        let listen = match &r.listen {
            None => d::LISTEN.iter().filter_map(|a| a.parse().ok()).collect(),
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
                d::MAX_CONNECTIONS,
                1,
                u32::MAX as i64,
            )
            .max(1);
        let max_request_head = self.size(
            "server.max_request_head",
            &r.max_request_head,
            d::MAX_REQUEST_HEAD_BYTES,
            256..=16 * 1024 * 1024,
        ) as usize;
        let http2 = r.http2.unwrap_or(d::HTTP2);
        let h2_max_concurrent_streams = self.count(
            "server.h2_max_concurrent_streams",
            &r.h2_max_concurrent_streams,
            d::H2_MAX_CONCURRENT_STREAMS,
            1,
            10_000,
        ) as u32;
        let websocket_over_h2 = match &r.websocket_over_h2 {
            Some(w) if *w.get_ref() && !http2 => {
                let line = self.line(w.span());
                self.push(
                    line,
                    "server.websocket_over_h2",
                    "needs server.http2 = true: WebSockets over HTTP/2 ride HTTP/2 connections",
                );
                false
            }
            Some(w) => *w.get_ref(),
            None => d::WEBSOCKET_OVER_H2,
        };
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
                d::HANDSHAKE_TIMEOUT,
                Zero::Invalid,
            ),
            max_connections: NonZeroUsize::new(max_connections as usize)
                .unwrap_or(NonZeroUsize::MIN),
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                &r.shutdown_grace,
                d::SHUTDOWN_GRACE,
                Zero::Disables,
            ),
            drain_spread: self.duration(
                "server.drain_spread",
                &r.drain_spread,
                d::DRAIN_SPREAD,
                Zero::Disables,
            ),
            max_request_head,
            proxy_protocol: r.proxy_protocol.unwrap_or(d::PROXY_PROTOCOL),
            workers,
            http2,
            h2_max_concurrent_streams,
            websocket_over_h2,
        }
    }

    /// `[tls]`; with `[acme]` (`acme`) the default certificate is optional.
    fn tls(&mut self, r: RawTls, acme: bool) -> Tls {
        let default = match (&r.cert, &r.key) {
            (None, None) if acme => None,
            (Some(c), None) | (None, Some(c)) if acme => {
                let line = self.line(c.span());
                let (have, missing) = if r.cert.is_some() {
                    ("tls.cert", "tls.key")
                } else {
                    ("tls.key", "tls.cert")
                };
                self.push(line, missing, format!("{have} is set: set {missing} too"));
                None
            }
            _ => Some((
                self.path_or("tls.cert", &r.cert, d::TLS_CERT),
                self.path_or("tls.key", &r.key, d::TLS_KEY),
            )),
        };
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
            let client_auth = if s.client_ca.is_some() || s.client_auth.is_some() {
                // An entry's own mode with [tls]'s bundle, or its own bundle with [tls]'s mode
                // unless it names one (never quietly weaker than [tls]).
                let ca = s.client_ca.as_ref().or(r.client_ca.as_ref());
                let mode = s.client_auth.clone().or_else(|| r.client_auth.clone());
                let ca_key = if s.client_ca.is_some() {
                    format!("{base}.client_ca")
                } else {
                    "tls.client_ca".into()
                };
                self.client_auth(&ca_key, ca, &format!("{base}.client_auth"), &mode)
            } else {
                None
            };
            sni.push(SniCert {
                server_name: name,
                cert: self.path_or(&format!("{base}.cert"), &Some(s.cert), ""),
                key: self.path_or(&format!("{base}.key"), &Some(s.key), ""),
                client_auth,
            });
        }
        let client_auth = self.client_auth(
            "tls.client_ca",
            r.client_ca.as_ref(),
            "tls.client_auth",
            &r.client_auth,
        );
        Tls {
            default,
            sni,
            session_tickets: r.session_tickets.unwrap_or(d::SESSION_TICKETS),
            client_auth,
        }
    }

    /// `client_ca` with `client_auth` (`"optional"`, the default, or `"required"`); a mode
    /// without a bundle is an error.
    fn client_auth(
        &mut self,
        ca_key: &str,
        ca: Option<&Spanned<String>>,
        mode_key: &str,
        mode: &Opt<String>,
    ) -> Option<ClientAuth> {
        let required = self.choice(mode_key, mode, &["optional", "required"]) == Some("required");
        let Some(ca) = ca else {
            if let Some(m) = mode {
                let line = self.line(m.span());
                self.push(
                    line,
                    mode_key,
                    "client_auth needs a client_ca (the CAs that issue client certificates)",
                );
            }
            return None;
        };
        Some(ClientAuth {
            ca: self.path_or(ca_key, &Some(ca.clone()), ""),
            required,
        })
    }

    fn limits(&mut self, r: RawLimits) -> Limits {
        Limits {
            per_ip_rate: self.count(
                "limits.per_ip_rate",
                &r.per_ip_rate,
                d::PER_IP_RATE,
                0,
                1_000_000,
            ) as u32,
            per_ip_burst: self.count(
                "limits.per_ip_burst",
                &r.per_ip_burst,
                d::PER_IP_BURST,
                1,
                1_000_000,
            ) as u32,
            per_ip_max_connections: self.count(
                "limits.per_ip_max_connections",
                &r.per_ip_max_connections,
                d::PER_IP_MAX_CONNECTIONS,
                0,
                u32::MAX as i64,
            ) as u32,
            ipv6_prefix: self.count(
                "limits.ipv6_prefix",
                &r.ipv6_prefix,
                d::IPV6_PREFIX_BITS,
                1,
                128,
            ) as u8,
        }
    }

    /// The `[websocket]` keys of `r` (under `prefix`), each defaulting to `base`'s value: the
    /// built-in defaults for `[websocket]`, the global table for a route's.
    fn websocket(&mut self, prefix: &str, r: &RawWebSocket, base: &WebSocket) -> WebSocket {
        let k = |name: &str| format!("{prefix}.{name}");
        let action = match &r.rate_limit_action {
            None => base.rate_limit_action,
            Some(a) => match a.get_ref().as_str() {
                "throttle" => RateLimitAction::Throttle,
                "close" => RateLimitAction::Close,
                other => {
                    let line = self.line(a.span());
                    self.push(
                        line,
                        &k("rate_limit_action"),
                        format!("\"{other}\" is not an action; use \"throttle\" or \"close\""),
                    );
                    base.rate_limit_action
                }
            },
        };
        WebSocket {
            ping_interval: self.duration(
                &k("ping_interval"),
                &r.ping_interval,
                base.ping_interval,
                Zero::Disables,
            ),
            pong_timeout: self.duration(
                &k("pong_timeout"),
                &r.pong_timeout,
                base.pong_timeout,
                Zero::Invalid,
            ),
            idle_timeout: self.duration(
                &k("idle_timeout"),
                &r.idle_timeout,
                base.idle_timeout,
                Zero::Disables,
            ),
            max_frame_size: self.size(
                &k("max_frame_size"),
                &r.max_frame_size,
                base.max_frame_size,
                1..=(i64::MAX as u64),
            ),
            max_lifetime: self.duration(
                &k("max_lifetime"),
                &r.max_lifetime,
                base.max_lifetime,
                Zero::Disables,
            ),
            max_message_size: self.size(
                &k("max_message_size"),
                &r.max_message_size,
                base.max_message_size,
                0..=(i64::MAX as u64),
            ),
            client_message_rate: self.count(
                &k("client_message_rate"),
                &r.client_message_rate,
                base.client_message_rate as i64,
                0,
                1_000_000_000,
            ) as u64,
            client_message_burst: self.count(
                &k("client_message_burst"),
                &r.client_message_burst,
                base.client_message_burst as i64,
                0,
                1_000_000_000,
            ) as u64,
            client_byte_rate: self.size(
                &k("client_byte_rate"),
                &r.client_byte_rate,
                base.client_byte_rate,
                0..=(1 << 40),
            ),
            client_byte_burst: self.size(
                &k("client_byte_burst"),
                &r.client_byte_burst,
                base.client_byte_burst,
                0..=(1 << 40),
            ),
            rate_limit_action: action,
            max_lifetime_jitter: self.duration(
                &k("max_lifetime_jitter"),
                &r.max_lifetime_jitter,
                base.max_lifetime_jitter,
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
            None => d::LOG_LEVEL.to_string(),
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

    fn route(&mut self, index: usize, r: RawRoute, ws: &WebSocket, auth: &[Auth]) -> Option<Route> {
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
            match self.backend_entry(b.get_ref()) {
                Ok(be) if backends.iter().any(|x: &BackendConf| x.label == be.label) => {
                    let line = self.line(b.span());
                    self.push(
                        line,
                        &format!("{base}.backends"),
                        format!("{} is listed twice", be.label),
                    );
                }
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
        let balance = match self.choice(
            &format!("{base}.balance"),
            &r.balance,
            &["round_robin", "least_conn"],
        ) {
            Some("least_conn") => Balance::LeastConn,
            _ => Balance::RoundRobin,
        };
        let cookie = r
            .sticky_cookie
            .as_ref()
            .map_or(d::STICKY_COOKIE.to_string(), |c| {
                c.get_ref().trim().to_string()
            });
        if cookie.is_empty()
            || !cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            let line = r.sticky_cookie.as_ref().map_or(0, |c| self.line(c.span()));
            self.push(
                line,
                &format!("{base}.sticky_cookie"),
                format!("\"{cookie}\" is not a cookie name (letters, digits, _ - .)"),
            );
        }
        let sticky = match self.choice(&format!("{base}.sticky"), &r.sticky, &["ip_hash", "cookie"])
        {
            Some("ip_hash") => Sticky::IpHash,
            Some("cookie") => Sticky::Cookie(cookie),
            _ => Sticky::None,
        };
        let backend_tls = if r.backend_tls.unwrap_or(false) {
            if backends
                .iter()
                .any(|b| matches!(b.target, Backend::Unix(_)))
            {
                let line = self.line(r.backends.span());
                self.push(
                    line,
                    &format!("{base}.backend_tls"),
                    "backend_tls is for TCP backends; a unix: socket is local",
                );
            }
            Some(BackendTls {
                ca: r
                    .backend_ca
                    .as_ref()
                    .map(|_| self.path_or(&format!("{base}.backend_ca"), &r.backend_ca, "")),
                server_name: r.backend_server_name.as_ref().map(|s| {
                    let name = s.get_ref().trim().to_string();
                    if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                        let line = self.line(s.span());
                        self.push(
                            line,
                            &format!("{base}.backend_server_name"),
                            format!("\"{name}\" is not a DNS name or an IP address"),
                        );
                    }
                    name
                }),
            })
        } else {
            for (key, set) in [
                ("backend_ca", r.backend_ca.as_ref().map(|s| s.span())),
                (
                    "backend_server_name",
                    r.backend_server_name.as_ref().map(|s| s.span()),
                ),
            ] {
                if let Some(span) = set {
                    let line = self.line(span);
                    self.push(
                        line,
                        &format!("{base}.{key}"),
                        "only applies with backend_tls = true",
                    );
                }
            }
            None
        };
        let send_proxy_protocol = self
            .choice(
                &format!("{base}.send_proxy_protocol"),
                &r.send_proxy_protocol,
                &["v2"],
            )
            .is_some();
        let on_backend_down = match self.choice(
            &format!("{base}.on_backend_down"),
            &r.on_backend_down,
            &["keep", "close"],
        ) {
            Some("close") => OnDown::Close,
            _ => OnDown::Keep,
        };
        let health = r
            .health
            .as_ref()
            .map(|h| self.health(&format!("{base}.health"), h));
        let websocket = match &r.websocket {
            Some(w) => self.websocket(&format!("{base}.websocket"), w, ws),
            None => ws.clone(),
        };
        let auth = match &r.auth {
            None => None,
            Some(name) => match auth.iter().position(|a| a.name == *name.get_ref()) {
                Some(i) => Some(i),
                None => {
                    let line = self.line(name.span());
                    self.push(
                        line,
                        &format!("{base}.auth"),
                        format!("no [[auth]] is named \"{}\"", name.get_ref()),
                    );
                    None
                }
            },
        };
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Route {
            websocket,
            auth,
            index,
            path,
            host,
            backends,
            origins: OriginPolicy::new(
                rules,
                r.allow_missing_origin.unwrap_or(d::ALLOW_MISSING_ORIGIN),
            ),
            balance,
            sticky,
            backend_tls,
            send_proxy_protocol,
            on_backend_down,
            health,
            require_client_cert: r.require_client_cert.unwrap_or(false),
        })
    }

    /// A string key that must be one of `allowed`; `None` when absent (or wrong, reported).
    fn choice(
        &mut self,
        key: &str,
        v: &Opt<String>,
        allowed: &[&'static str],
    ) -> Option<&'static str> {
        let s = v.as_ref()?;
        match allowed.iter().find(|a| **a == s.get_ref().trim()) {
            Some(a) => Some(*a),
            None => {
                let line = self.line(s.span());
                let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
                self.push(
                    line,
                    key,
                    format!("\"{}\" is not one of {}", s.get_ref(), list.join(", ")),
                );
                None
            }
        }
    }

    fn health(&mut self, base: &str, h: &RawHealth) -> Health {
        let k = |n: &str| format!("{base}.{n}");
        let path = h.path.as_ref().map(|p| {
            let v = p.get_ref().trim().to_string();
            if !v.starts_with('/') || v.contains(' ') {
                let line = self.line(p.span());
                self.push(line, &k("path"), format!("\"{v}\" is not a request path"));
            }
            v
        });
        let interval = self.duration(
            &k("interval"),
            &h.interval,
            d::HEALTH_INTERVAL,
            Zero::Invalid,
        );
        let timeout = self.duration(&k("timeout"), &h.timeout, d::HEALTH_TIMEOUT, Zero::Invalid);
        Health {
            path,
            interval,
            timeout,
            healthy_threshold: self.count(
                &k("healthy_threshold"),
                &h.healthy_threshold,
                d::HEALTHY_THRESHOLD,
                1,
                100,
            ) as u32,
            unhealthy_threshold: self.count(
                &k("unhealthy_threshold"),
                &h.unhealthy_threshold,
                d::UNHEALTHY_THRESHOLD,
                1,
                100,
            ) as u32,
        }
    }

    /// One entry of `backends`: an address string, or a table with `address`, `weight` and
    /// `max_tunnels`.
    fn backend_entry(&self, v: &Value) -> Result<BackendConf, String> {
        match v {
            Value::String(s) => Ok(BackendConf {
                target: self.backend(s)?,
                label: s.trim().to_string(),
                weight: 1,
                max_tunnels: 0,
            }),
            Value::Table(t) => {
                let mut conf = None;
                let (mut weight, mut max_tunnels) = (1u32, 0u32);
                for (key, value) in t {
                    match (key.as_str(), value) {
                        ("address", Value::String(s)) => {
                            conf = Some((self.backend(s)?, s.trim().to_string()))
                        }
                        ("weight", Value::Integer(n)) if (1..=1000).contains(n) => {
                            weight = *n as u32
                        }
                        ("weight", other) => {
                            return Err(format!("weight {other} is out of range (1 to 1000)"));
                        }
                        ("max_tunnels", Value::Integer(n)) if (0..=u32::MAX as i64).contains(n) => {
                            max_tunnels = *n as u32
                        }
                        ("max_tunnels", other) => {
                            return Err(format!("max_tunnels {other} is not a count"));
                        }
                        (other, _) => {
                            return Err(format!(
                                "unknown backend key \"{other}\"; use address, weight, max_tunnels"
                            ));
                        }
                    }
                }
                let (target, label) = conf.ok_or("a backend table needs an address")?;
                Ok(BackendConf {
                    target,
                    label,
                    weight,
                    max_tunnels,
                })
            }
            other => Err(format!(
                "expected \"host:port\", \"unix:/path\" or a table, found {}",
                other.type_str()
            )),
        }
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

/// `[[auth]]` entries.
impl Cx<'_> {
    fn auth(&mut self, raw: Vec<Spanned<RawAuth>>) -> Vec<Auth> {
        let mut out: Vec<Auth> = Vec::new();
        for (i, a) in raw.into_iter().enumerate() {
            let a = a.into_inner();
            let base = format!("auth[{i}]");
            let name = a.name.get_ref().trim().to_string();
            if name.is_empty() || out.iter().any(|o| o.name == name) {
                let line = self.line(a.name.span());
                let msg = if name.is_empty() {
                    "an authenticator needs a name".to_string()
                } else {
                    format!("\"{name}\" is defined twice")
                };
                self.push(line, &format!("{base}.name"), msg);
            }
            let kind = match a.kind.get_ref().as_str() {
                "jwt" => {
                    self.refuse_keys(&base, "jwt", &a.forward_keys());
                    AuthKind::Jwt(self.jwt(&base, &a))
                }
                "forward" => {
                    self.refuse_keys(&base, "forward", &a.jwt_keys());
                    AuthKind::Forward(self.forward(&base, &a))
                }
                other => {
                    let line = self.line(a.kind.span());
                    self.push(
                        line,
                        &format!("{base}.type"),
                        format!(
                            "\"{other}\" is not an authenticator type; use \"jwt\" or \"forward\""
                        ),
                    );
                    continue;
                }
            };
            out.push(Auth { name, kind });
        }
        out
    }

    /// Keys set that belong to the other type.
    fn refuse_keys(
        &mut self,
        base: &str,
        kind: &str,
        set: &[(&'static str, Option<Range<usize>>)],
    ) {
        for (key, span) in set {
            if let Some(span) = span {
                let line = self.line(span.clone());
                self.push(
                    line,
                    &format!("{base}.{key}"),
                    format!("not a key of type = \"{kind}\""),
                );
            }
        }
    }

    fn jwt(&mut self, base: &str, a: &RawAuth) -> Jwt {
        let k = |n: &str| format!("{base}.{n}");
        let mut token_from = Vec::new();
        match &a.token_from {
            None => token_from.push(TokenSource::Header(http::header::AUTHORIZATION)),
            Some(list) => {
                for s in list.get_ref() {
                    match token_source(s.get_ref()) {
                        Ok(t) => token_from.push(t),
                        Err(msg) => {
                            let line = self.line(s.span());
                            self.push(line, &k("token_from"), msg);
                        }
                    }
                }
            }
        }
        let keys = match (&a.jwks_file, &a.jwks_url) {
            (Some(_), Some(u)) => {
                let line = self.line(u.span());
                self.push(line, &k("jwks_url"), "give jwks_file or jwks_url, not both");
                None
            }
            (Some(f), None) => Some(JwksSource::File(self.path_or(
                &k("jwks_file"),
                &a.jwks_file,
                &f.get_ref().clone(),
            ))),
            (None, Some(u)) => match u.get_ref().parse::<http::Uri>() {
                Ok(url)
                    if matches!(url.scheme_str(), Some("http" | "https"))
                        && url.host().is_some() =>
                {
                    Some(JwksSource::Url {
                        url,
                        ca: a
                            .jwks_ca
                            .as_ref()
                            .map(|_| self.path_or(&k("jwks_ca"), &a.jwks_ca, "")),
                        refresh: self.duration(
                            &k("jwks_refresh"),
                            &a.jwks_refresh,
                            d::JWKS_REFRESH,
                            Zero::Invalid,
                        ),
                    })
                }
                _ => {
                    let line = self.line(u.span());
                    self.push(
                        line,
                        &k("jwks_url"),
                        format!("\"{}\" is not an http:// or https:// URL", u.get_ref()),
                    );
                    None
                }
            },
            (None, None) => None,
        };
        if a.jwks_ca.is_some() && !matches!(keys, Some(JwksSource::Url { .. })) {
            let line = a.jwks_ca.as_ref().map_or(0, |s| self.line(s.span()));
            self.push(line, &k("jwks_ca"), "jwks_ca only applies with jwks_url");
        }
        let secret_file = a
            .secret_file
            .as_ref()
            .map(|_| self.path_or(&k("secret_file"), &a.secret_file, ""));
        let mut algorithms = Vec::new();
        match &a.algorithms {
            None => algorithms.extend(d::JWT_ALGORITHMS),
            Some(list) => {
                for s in list.get_ref() {
                    let line = self.line(s.span());
                    match s.get_ref().trim() {
                        n if n.eq_ignore_ascii_case("none") => self.push(
                            line,
                            &k("algorithms"),
                            "\"none\" accepts unsigned tokens; it is never allowed",
                        ),
                        n => match n.parse::<jsonwebtoken::Algorithm>() {
                            Ok(alg) => algorithms.push(alg),
                            Err(_) => self.push(
                                line,
                                &k("algorithms"),
                                format!("\"{n}\" is not a JWS algorithm (RS256, ES256, EdDSA, HS256, ...)"),
                            ),
                        },
                    }
                }
                if list.get_ref().is_empty() {
                    let line = self.line(list.span());
                    self.push(line, &k("algorithms"), "at least one algorithm is needed");
                }
            }
        }
        let hmac = |a: &jsonwebtoken::Algorithm| {
            use jsonwebtoken::Algorithm::*;
            matches!(a, HS256 | HS384 | HS512)
        };
        let line_of_algs = a.algorithms.as_ref().map_or(0, |l| self.line(l.span()));
        if algorithms.iter().any(hmac) && secret_file.is_none() {
            self.push(
                line_of_algs,
                &k("algorithms"),
                "HS256, HS384 and HS512 need secret_file",
            );
        }
        if algorithms.iter().any(|x| !hmac(x))
            && keys.is_none()
            && a.jwks_file.is_none()
            && a.jwks_url.is_none()
        {
            self.push(
                line_of_algs,
                &k("algorithms"),
                "public-key algorithms need jwks_file or jwks_url",
            );
        }
        if keys.is_none() && secret_file.is_none() && a.jwks_file.is_none() && a.jwks_url.is_none()
        {
            let line = self.line(a.name.span());
            self.push(
                line,
                &k("jwks_file"),
                "give jwks_file, jwks_url or secret_file",
            );
        }
        let code = match &a.expired_close_code {
            None => d::EXPIRED_CLOSE_CODE,
            Some(c) => {
                let n = *c.get_ref();
                if !(1000..=4999).contains(&n) {
                    let line = self.line(c.span());
                    self.push(
                        line,
                        &k("expired_close_code"),
                        format!("{n} is not a close code (1000 to 4999)"),
                    );
                }
                n.clamp(1000, 4999) as u16
            }
        };
        let mut forward_claims = Vec::new();
        if let Some(map) = &a.forward_claims {
            for (claim, header) in map.get_ref() {
                match http::HeaderName::from_bytes(header.get_ref().trim().as_bytes()) {
                    Ok(h) => forward_claims.push((claim.clone(), h)),
                    Err(_) => {
                        let line = self.line(header.span());
                        self.push(
                            line,
                            &k("forward_claims"),
                            format!("\"{}\" is not a header name", header.get_ref()),
                        );
                    }
                }
            }
        }
        Jwt {
            token_from,
            keys,
            secret_file,
            issuer: a.issuer.as_ref().map(|s| s.get_ref().clone()),
            audience: a
                .audience
                .as_ref()
                .map(|l| l.get_ref().iter().map(|s| s.get_ref().clone()).collect())
                .unwrap_or_default(),
            algorithms,
            leeway: self.duration(&k("leeway"), &a.leeway, d::JWT_LEEWAY, Zero::Disables),
            require_exp: a.require_exp.unwrap_or(d::REQUIRE_EXP),
            forward_claims,
            strip_token: a.strip_token.unwrap_or(d::STRIP_TOKEN),
            expired_close_code: code,
        }
    }

    fn forward(&mut self, base: &str, a: &RawAuth) -> Forward {
        let k = |n: &str| format!("{base}.{n}");
        let url = match &a.url {
            None => {
                let line = self.line(a.name.span());
                self.push(
                    line,
                    &k("url"),
                    "forward auth needs the url of its auth service",
                );
                http::Uri::from_static("http://127.0.0.1/")
            }
            Some(u) => match u.get_ref().parse::<http::Uri>() {
                Ok(url) if url.scheme_str() == Some("http") && url.host().is_some() => url,
                _ => {
                    let line = self.line(u.span());
                    self.push(
                        line,
                        &k("url"),
                        format!("\"{}\" is not an http:// URL", u.get_ref()),
                    );
                    http::Uri::from_static("http://127.0.0.1/")
                }
            },
        };
        let header =
            |cx: &mut Self, key: &str, s: &Spanned<String>| match http::HeaderName::from_bytes(
                s.get_ref().trim().as_bytes(),
            ) {
                Ok(h) => Some(h),
                Err(_) => {
                    let line = cx.line(s.span());
                    cx.push(
                        line,
                        &k(key),
                        format!("\"{}\" is not a header name", s.get_ref()),
                    );
                    None
                }
            };
        let mut copy_headers = Vec::new();
        if let Some(list) = &a.copy_headers {
            for s in list.get_ref() {
                if let Some(h) = header(self, "copy_headers", s) {
                    copy_headers.push(h);
                }
            }
        }
        Forward {
            url,
            timeout: self.duration(
                &k("timeout"),
                &a.timeout,
                d::FORWARD_AUTH_TIMEOUT,
                Zero::Invalid,
            ),
            copy_headers,
            expires_header: a
                .expires_header
                .as_ref()
                .and_then(|s| header(self, "expires_header", s)),
            subject_header: a
                .subject_header
                .as_ref()
                .and_then(|s| header(self, "subject_header", s)),
        }
    }
}

impl RawAuth {
    fn jwt_keys(&self) -> Vec<(&'static str, Option<Range<usize>>)> {
        vec![
            ("token_from", self.token_from.as_ref().map(|s| s.span())),
            ("jwks_file", self.jwks_file.as_ref().map(|s| s.span())),
            ("jwks_url", self.jwks_url.as_ref().map(|s| s.span())),
            ("jwks_ca", self.jwks_ca.as_ref().map(|s| s.span())),
            ("jwks_refresh", self.jwks_refresh.as_ref().map(|s| s.span())),
            ("secret_file", self.secret_file.as_ref().map(|s| s.span())),
            ("issuer", self.issuer.as_ref().map(|s| s.span())),
            ("audience", self.audience.as_ref().map(|s| s.span())),
            ("algorithms", self.algorithms.as_ref().map(|s| s.span())),
            ("leeway", self.leeway.as_ref().map(|s| s.span())),
            (
                "forward_claims",
                self.forward_claims.as_ref().map(|s| s.span()),
            ),
            (
                "expired_close_code",
                self.expired_close_code.as_ref().map(|s| s.span()),
            ),
        ]
    }

    fn forward_keys(&self) -> Vec<(&'static str, Option<Range<usize>>)> {
        vec![
            ("url", self.url.as_ref().map(|s| s.span())),
            ("timeout", self.timeout.as_ref().map(|s| s.span())),
            ("copy_headers", self.copy_headers.as_ref().map(|s| s.span())),
            (
                "expires_header",
                self.expires_header.as_ref().map(|s| s.span()),
            ),
            (
                "subject_header",
                self.subject_header.as_ref().map(|s| s.span()),
            ),
        ]
    }
}

/// `header:NAME`, `cookie:NAME`, `query:NAME` or `subprotocol:PREFIX`.
fn token_source(s: &str) -> Result<TokenSource, String> {
    let bad = || {
        format!(
            "\"{s}\" is not a token source; use header:NAME, cookie:NAME, query:NAME or subprotocol:PREFIX"
        )
    };
    let (kind, arg) = s.split_once(':').ok_or_else(bad)?;
    if arg.is_empty() {
        return Err(bad());
    }
    Ok(match kind {
        "header" => {
            TokenSource::Header(http::HeaderName::from_bytes(arg.as_bytes()).map_err(|_| bad())?)
        }
        "cookie" => TokenSource::Cookie(arg.to_string()),
        "query" => TokenSource::Query(arg.to_string()),
        "subprotocol" => TokenSource::Subprotocol(arg.to_string()),
        _ => return Err(bad()),
    })
}

/// Why `url` cannot be an ACME directory, if it cannot.
fn acme_directory(url: &str) -> Result<(), &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "is not a URL")?;
    if uri.scheme_str() != Some("https") {
        return Err("is not an https:// URL (ACME servers are reached over HTTPS)");
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host");
    }
    Ok(())
}

/// A host name as ACME orders it: dot-separated labels of letters, digits and inner hyphens.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `renew_before`: a fraction of the lifetime (`"1/3"`) or a duration (`"30d"`).
pub(super) fn parse_renew_before(s: &str) -> Result<RenewBefore, String> {
    let t = s.trim();
    if let Some((n, dd)) = t.split_once('/') {
        let (Ok(num), Ok(den)) = (n.trim().parse::<u32>(), dd.trim().parse::<u32>()) else {
            return Err(format!("\"{t}\" is not a fraction like \"1/3\""));
        };
        if num == 0 || den == 0 || num >= den {
            return Err(format!(
                "\"{t}\" must be a fraction between 0 and 1, like \"1/3\""
            ));
        }
        return Ok(RenewBefore::Fraction { num, den });
    }
    match parse_duration(t) {
        Ok(d) if d.is_zero() => Err(format!("\"{t}\" is zero: nothing would ever be renewed")),
        Ok(d) => Ok(RenewBefore::Left(d)),
        Err(e) => Err(format!(
            "{e}; or write a fraction of the lifetime like \"1/3\""
        )),
    }
}

/// Whether wsgate could keep its ACME files in `dir`: the folder, or the nearest existing
/// folder above it (wsgate creates the rest), must be a writable directory.
fn writable_dir(dir: &Path) -> Result<(), String> {
    let mut p = dir;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => {
                return rustix::fs::access(p, rustix::fs::Access::WRITE_OK)
                    .map_err(|e| format!("{} is not writable: {e}", p.display()));
            }
            Ok(_) => return Err(format!("{} is not a directory", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match p.parent() {
                Some(up) if !up.as_os_str().is_empty() => p = up,
                _ => return Err(format!("{}: no existing folder above it", dir.display())),
            },
            Err(e) => return Err(format!("{}: {e}", p.display())),
        }
    }
}
