//! Routing: the longest whole-segment path prefix (host-bound routes first on a tie), refusal
//! of dot-segment paths, and each route's entry in a snapshot: its backends' long-lived state
//! (from [`crate::backends`]), its turn counter and its TLS client for `backend_tls`.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use crate::backends::balance::{self, Pick};
use crate::backends::{self, BackendState, sticky};
use crate::config::{ConfigError, Route, Sticky};
use crate::metrics::Metrics;
use crate::reject::Refusal;

/// A route of one snapshot.
pub(crate) struct RouteEntry {
    pub(crate) route: Route,
    /// The state of each of `route.backends`, in the same order.
    pub(crate) states: Vec<Arc<BackendState>>,
    /// Turns of round robin (and of ties under `least_conn`).
    rr: AtomicUsize,
    /// The TLS client for `backend_tls`.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::ops::Deref for RouteEntry {
    type Target = Route;
    fn deref(&self) -> &Route {
        &self.route
    }
}

impl RouteEntry {
    /// The order to try the backends in for one tunnel (`tunnel`) or plain request.
    pub(crate) fn pick(
        &self,
        client: IpAddr,
        headers: &http::HeaderMap,
        tunnel: bool,
    ) -> Result<Pick, Refusal> {
        let cookie = match &self.route.sticky {
            Sticky::Cookie(name) => sticky::from_request(headers, name),
            _ => None,
        };
        balance::pick(&self.route, &self.states, &self.rr, client, cookie, tunnel)
    }
}

/// The routes of one configuration.
pub(crate) struct RouteTable {
    routes: Vec<RouteEntry>,
}

impl RouteTable {
    /// Builds the table, taking each backend's state from `registry` (the existing one for a
    /// backend a reload keeps).
    pub(crate) fn new(
        routes: &[Route],
        registry: &backends::Registry,
        metrics: &Metrics,
        file: &std::path::Path,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for r in routes {
            let label = r.label();
            let states = r
                .backends
                .iter()
                .map(|b| registry.state(&label, &b.label, &b.target, metrics))
                .collect();
            let tls = match &r.backend_tls {
                None => None,
                Some(t) => match crate::upstream::tls::client_config(
                    t.ca.as_ref().map(|c| c.value.as_path()),
                ) {
                    Ok(c) => Some(c),
                    Err(message) => {
                        let (line, key) =
                            t.ca.as_ref()
                                .map_or((0, format!("routes[{}].backend_ca", r.index)), |c| {
                                    (c.line, c.key.clone())
                                });
                        errors.push(ConfigError {
                            file: file.to_path_buf(),
                            line,
                            key,
                            message,
                        });
                        None
                    }
                },
            };
            out.push(RouteEntry {
                route: r.clone(),
                states,
                rr: AtomicUsize::new(0),
                tls,
            });
        }
        if errors.is_empty() {
            Ok(RouteTable { routes: out })
        } else {
            Err(errors)
        }
    }

    /// The route for `host` (a Host header, port allowed) and `path`, if any.
    pub(crate) fn lookup(&self, host: Option<&str>, path: &str) -> Option<&RouteEntry> {
        let host = host.map(strip_port);
        self.routes
            .iter()
            .filter(|r| match (&r.host, host) {
                (None, _) => true,
                (Some(want), Some(h)) => want.eq_ignore_ascii_case(h),
                (Some(_), None) => false,
            })
            .filter(|r| prefix_matches(&r.path, path))
            .max_by_key(|r| (r.path.len(), r.host.is_some(), usize::MAX - r.index))
    }

    /// Every route, in configuration order.
    pub(crate) fn entries(&self) -> &[RouteEntry] {
        &self.routes
    }
}

/// True when `prefix` matches `path` on whole segments (`/chat` matches `/chat/x`, not `/chatx`).
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

/// True when the path has a `.` or `..` segment, literally or percent-encoded (and with
/// encoded slashes or backslashes counted as separators, as some backends decode them).
pub(crate) fn has_dot_segment(path: &str) -> bool {
    let b = path.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            match [b[i + 1].to_ascii_lowercase(), b[i + 2].to_ascii_lowercase()] {
                [b'2', b'e'] => decoded.push(b'.'),
                [b'2', b'f'] | [b'5', b'c'] => decoded.push(b'/'),
                _ => decoded.extend_from_slice(&b[i..i + 3]),
            }
            i += 3;
            continue;
        }
        decoded.push(if b[i] == b'\\' { b'/' } else { b[i] });
        i += 1;
    }
    decoded
        .split(|&c| c == b'/')
        .any(|seg| seg == b"." || seg == b"..")
}

pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn table(text: &str) -> RouteTable {
        let routes = Config::parse(Path::new("/t.toml"), text).unwrap().routes;
        let registry = crate::backends::Registry::default();
        RouteTable::new(&routes, &registry, &Metrics::new(), Path::new("/t.toml")).unwrap()
    }

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let t = table(
            "[[routes]]\npath=\"/\"\nbackends=[\"a:1\"]\n[[routes]]\npath=\"/chat\"\nbackends=[\"b:1\"]\n\
             [[routes]]\npath=\"/chat/admin\"\nbackends=[\"c:1\"]\n",
        );
        assert_eq!(t.lookup(None, "/chat").unwrap().path, "/chat");
        assert_eq!(t.lookup(None, "/chat/room").unwrap().path, "/chat");
        assert_eq!(t.lookup(None, "/chatroom").unwrap().path, "/");
        assert_eq!(t.lookup(None, "/chat/admin/x").unwrap().path, "/chat/admin");
    }

    #[test]
    fn host_routes_match_their_host_only() {
        let t = table(
            "[[routes]]\npath=\"/chat\"\nbackends=[\"a:1\"]\n[[routes]]\npath=\"/chat\"\nhost=\"chat.example.com\"\nbackends=[\"b:1\"]\n",
        );
        let r = t.lookup(Some("Chat.Example.com:443"), "/chat").unwrap();
        assert_eq!(r.host.as_deref(), Some("chat.example.com"));
        assert!(t.lookup(Some("other"), "/chat").unwrap().host.is_none());
        assert!(t.lookup(None, "/nope").is_none());
    }

    #[test]
    fn dot_segments_are_found_in_any_spelling() {
        for p in [
            "/a/../b",
            "/./x",
            "/a/%2e%2E/b",
            "/a/.%2e",
            "/a/..%2fb",
            "/a/..\\b",
            "/..",
        ] {
            assert!(has_dot_segment(p), "{p}");
        }
        for p in ["/a/b", "/a..b/c", "/.well-known/x", "/a/%2"] {
            assert!(!has_dot_segment(p), "{p}");
        }
    }

    #[test]
    fn round_robin_rotates_and_ip_hash_is_stable() {
        let t = table("[[routes]]\npath=\"/\"\nbackends=[\"a:1\",\"b:1\"]\n");
        let r = t.lookup(None, "/").unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let none = http::HeaderMap::new();
        let first = r.pick(ip, &none, true).unwrap().order;
        let second = r.pick(ip, &none, true).unwrap().order;
        assert_ne!(first[0], second[0]);
        assert_eq!(first.len(), 2);
        let t = table("[[routes]]\npath=\"/\"\nsticky=\"ip_hash\"\nbackends=[\"a:1\",\"b:1\"]\n");
        let r = t.lookup(None, "/").unwrap();
        let a = r.pick(ip, &none, true).unwrap().order[0];
        assert!((0..5).all(|_| r.pick(ip, &none, true).unwrap().order[0] == a));
    }

    #[test]
    fn weights_split_round_robin_and_least_conn_follows_the_counts() {
        let t = table(
            "[[routes]]\npath=\"/\"\nbackends=[\"a:1\", { address = \"b:1\", weight = 3 }]\n\
             [[routes]]\npath=\"/lc\"\nbalance = \"least_conn\"\nbackends=[\"a:1\", \"b:1\"]\n",
        );
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let none = http::HeaderMap::new();
        let r = t.lookup(None, "/").unwrap();
        let mut n = [0; 2];
        for _ in 0..40 {
            n[r.pick(ip, &none, true).unwrap().order[0]] += 1;
        }
        assert_eq!(n, [10, 30]);
        let lc = t.lookup(None, "/lc").unwrap();
        let held: Vec<_> = (0..5).map(|_| lc.states[0].tunnel_slot()).collect();
        assert!((0..5).all(|_| lc.pick(ip, &none, true).unwrap().order[0] == 1));
        drop(held);
    }

    #[test]
    fn a_full_backend_takes_no_tunnel_and_all_full_is_refused() {
        let t = table(
            "[[routes]]\npath=\"/\"\nbackends=[{ address = \"a:1\", max_tunnels = 1 }, { address = \"b:1\", max_tunnels = 1 }]\n",
        );
        let r = t.lookup(None, "/").unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let none = http::HeaderMap::new();
        let _a = r.states[0].tunnel_slot();
        assert_eq!(r.pick(ip, &none, true).unwrap().order, vec![1]);
        let _b = r.states[1].tunnel_slot();
        assert_eq!(r.pick(ip, &none, true), Err(Refusal::BackendFull));
        assert!(
            r.pick(ip, &none, false).is_ok(),
            "plain requests are not capped"
        );
    }
}
