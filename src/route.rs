//! Routing: the longest whole-segment path prefix (host-bound routes first on a tie), refusal
//! of dot-segment paths, and the order in which a route's backends are tried.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{Backend, Balance, Route};

/// The routes of one configuration, with their round-robin counters.
#[derive(Debug)]
pub(crate) struct RouteTable {
    routes: Vec<(Route, AtomicUsize)>,
}

impl RouteTable {
    /// Builds the table from the configured routes.
    pub(crate) fn new(routes: &[Route]) -> Self {
        RouteTable {
            routes: routes
                .iter()
                .map(|r| (r.clone(), AtomicUsize::new(0)))
                .collect(),
        }
    }

    /// The route for `host` (a Host header, port allowed) and `path`, if any.
    pub(crate) fn lookup(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.map(strip_port);
        self.routes
            .iter()
            .map(|(r, _)| r)
            .filter(|r| match (&r.host, host) {
                (None, _) => true,
                (Some(want), Some(h)) => want.eq_ignore_ascii_case(h),
                (Some(_), None) => false,
            })
            .filter(|r| prefix_matches(&r.path, path))
            .max_by_key(|r| (r.path.len(), r.host.is_some(), usize::MAX - r.index))
    }

    /// The route's backends in the order to try them for this client: round robin or
    /// client-address hash first, then the rest in turn.
    pub(crate) fn backends<'a>(
        &self,
        route: &'a Route,
        client: IpAddr,
    ) -> impl Iterator<Item = &'a Backend> + 'a {
        let n = route.backends.len();
        let start = match route.balance {
            Balance::RoundRobin => self
                .routes
                .get(route.index)
                .filter(|(r, _)| r.path == route.path)
                .map_or(0, |(_, c)| c.fetch_add(1, Ordering::Relaxed)),
            Balance::IpHash => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                client.hash(&mut h);
                h.finish() as usize
            }
        };
        (0..n).map(move |i| &route.backends[(start.wrapping_add(i)) % n.max(1)])
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

fn strip_port(host: &str) -> &str {
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
        RouteTable::new(&Config::parse(Path::new("/t.toml"), text).unwrap().routes)
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
        let first: Vec<_> = t.backends(r, ip).cloned().collect();
        let second: Vec<_> = t.backends(r, ip).cloned().collect();
        assert_ne!(first[0], second[0]);
        assert_eq!(first.len(), 2);
        let t = table("[[routes]]\npath=\"/\"\nsticky=\"ip_hash\"\nbackends=[\"a:1\",\"b:1\"]\n");
        let r = t.lookup(None, "/").unwrap();
        let a = t.backends(r, ip).next().cloned();
        assert!((0..5).all(|_| t.backends(r, ip).next().cloned() == a));
    }
}
