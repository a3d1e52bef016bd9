//! The control API: its endpoints, their parameters (from the query string or a JSON body,
//! each checked and refused with the parameter's name), and what they do to the tunnel and
//! backend registries. Every action is logged with the admin peer and counted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{error, json};
use crate::backends::{BackendState, health};
use crate::metrics::ActionLabel;
use crate::relay::orders::{Order, Why};
use crate::server::Shared;
use crate::tunnels::TunnelEntry;

/// The longest `spread` or `older_than` taken.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Tunnels listed at most unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 1000;

/// An API endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Endpoint {
    Tunnels,
    CloseTunnels,
    CloseTunnel(u64),
    Backends,
    Drain,
    Enable,
    Cluster,
}

impl Endpoint {
    pub(super) fn of(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/tunnels" => Endpoint::Tunnels,
            "/tunnels/close" => Endpoint::CloseTunnels,
            "/backends" => Endpoint::Backends,
            "/backends/drain" => Endpoint::Drain,
            "/backends/enable" => Endpoint::Enable,
            "/cluster" => Endpoint::Cluster,
            p => {
                let id = p.strip_prefix("/tunnels/")?.strip_suffix("/close")?;
                Endpoint::CloseTunnel(id.parse().ok()?)
            }
        })
    }

    /// The parameters it takes: any other is refused, so a misspelt filter never widens a
    /// close to every tunnel.
    fn params(&self) -> &'static [&'static str] {
        match self {
            Endpoint::Tunnels => &[
                "route",
                "backend",
                "subject",
                "client",
                "older_than",
                "limit",
            ],
            Endpoint::CloseTunnels => &[
                "route",
                "backend",
                "subject",
                "client",
                "older_than",
                "code",
                "reason",
                "percent",
                "spread",
            ],
            Endpoint::CloseTunnel(_) => &["code", "reason"],
            Endpoint::Backends | Endpoint::Cluster => &[],
            Endpoint::Drain => &["route", "backend", "spread"],
            // The same query as the drain it ends is accepted (its `spread` means nothing here).
            Endpoint::Enable => &["route", "backend", "spread"],
        }
    }

    /// The one method it answers.
    pub(super) fn method(&self) -> Method {
        match self {
            Endpoint::Tunnels | Endpoint::Backends | Endpoint::Cluster => Method::GET,
            _ => Method::POST,
        }
    }
}

/// The parameters of a call, as strings until an endpoint asks for one.
pub(super) struct Params(HashMap<String, String>);

impl Params {
    /// The query string's parameters, then a JSON object body's (which win).
    pub(super) fn parse(query: &str, body: &Bytes) -> Result<Params, String> {
        let mut out = HashMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            out.insert(dec(k), dec(v));
        }
        if !body.trim_ascii().is_empty() {
            let v: Value =
                serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
            let Value::Object(map) = v else {
                return Err("the body must be a JSON object".into());
            };
            for (k, v) in map {
                let s = match v {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(format!("{k}: expected a string or a number, got {other}"));
                    }
                };
                out.insert(k, s);
            }
        }
        Ok(Params(out))
    }

    /// Takes a parameter out (one that is not the endpoint's own, like `cluster`).
    pub(super) fn take(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// The parameters as strings, to send to other instances.
    pub(super) fn to_map(&self) -> HashMap<String, String> {
        self.0.clone()
    }

    /// Parameters received from another instance.
    pub(super) fn from_map(m: HashMap<String, String>) -> Params {
        Params(m)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A duration of at most [`MAX_DURATION`] (a week: past that it is a typo, and instants
    /// that far ahead would overflow).
    fn duration(&self, key: &str) -> Result<Option<Duration>, String> {
        let Some(s) = self.get(key) else {
            return Ok(None);
        };
        match crate::config::parse_duration(s) {
            Ok(d) if d <= MAX_DURATION => Ok(Some(d)),
            Ok(_) => Err(format!("{key}: \"{s}\" is longer than 7d")),
            Err(e) => Err(format!("{key}: {e}")),
        }
    }

    fn number(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, String> {
        let Some(s) = self.get(key) else {
            return Ok(None);
        };
        match s.trim().parse::<u64>() {
            Ok(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "{key}: \"{s}\" is not a number from {} to {}",
                range.start(),
                range.end()
            )),
        }
    }
}

/// Which tunnels a call is about.
struct Filter {
    route: Option<String>,
    backend: Option<String>,
    subject: Option<String>,
    client: Option<ClientMatch>,
    older_than: Option<Duration>,
}

enum ClientMatch {
    Exact(SocketAddr),
    Net(IpAddr, u8),
}

impl Filter {
    fn parse(p: &Params) -> Result<Filter, String> {
        let client = match p.get("client") {
            None => None,
            Some(s) => Some(parse_client(s).ok_or_else(|| {
                format!("client: \"{s}\" is not an address (ip, ip:port) or a CIDR prefix")
            })?),
        };
        Ok(Filter {
            route: p.get("route").map(str::to_string),
            backend: p.get("backend").map(str::to_string),
            subject: p.get("subject").map(str::to_string),
            client,
            older_than: p.duration("older_than")?,
        })
    }

    fn matches(&self, t: &TunnelEntry, now: Instant) -> bool {
        self.route.as_ref().is_none_or(|r| *r == t.route)
            && self.backend.as_ref().is_none_or(|b| *b == t.backend.label)
            && self
                .subject
                .as_ref()
                .is_none_or(|s| t.subject.as_deref() == Some(s.as_str()))
            && self.client.as_ref().is_none_or(|c| match c {
                ClientMatch::Exact(a) => *a == t.client,
                ClientMatch::Net(net, bits) => in_prefix(t.client.ip(), *net, *bits),
            })
            && self
                .older_than
                .is_none_or(|d| now.saturating_duration_since(t.opened) >= d)
    }
}

fn parse_client(s: &str) -> Option<ClientMatch> {
    let s = s.trim();
    if let Some((ip, bits)) = s.split_once('/') {
        let ip: IpAddr = ip.parse().ok()?;
        let bits: u8 = bits.parse().ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        return (bits <= max).then_some(ClientMatch::Net(ip, bits));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(ClientMatch::Exact(a));
    }
    let ip: IpAddr = s.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    Some(ClientMatch::Net(ip, max))
}

fn in_prefix(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (a, n, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u32::from(a) as u128, u32::from(n) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (u128::from(a), u128::from(n), 128),
        (IpAddr::V6(a), IpAddr::V4(n)) => match a.to_ipv4_mapped() {
            Some(a) => (u32::from(a) as u128, u32::from(n) as u128, 32),
            None => return false,
        },
        _ => return false,
    };
    if bits == 0 {
        return true;
    }
    let shift = width - u32::from(bits);
    (a >> shift) == (n >> shift)
}

/// Runs an endpoint.
pub(super) fn run(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    endpoint: Endpoint,
    p: &Params,
) -> Response<Full<Bytes>> {
    let allowed = endpoint.params();
    let mut unknown: Vec<&str> =
        p.0.keys()
            .map(String::as_str)
            .filter(|k| !allowed.contains(k))
            .collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        let expected = if allowed.is_empty() {
            "this endpoint takes none".to_string()
        } else {
            format!("expected one of {}", allowed.join(", "))
        };
        return error(
            StatusCode::BAD_REQUEST,
            format!("{}: unknown parameter ({expected})", unknown[0]),
        );
    }
    let result = match endpoint {
        Endpoint::Tunnels => list_tunnels(shared, p),
        Endpoint::CloseTunnels => close_tunnels(shared, peer, p),
        Endpoint::CloseTunnel(id) => close_tunnel(shared, peer, id, p),
        Endpoint::Backends => Ok(json(StatusCode::OK, &backends(shared))),
        Endpoint::Drain => drain(shared, peer, p, true),
        Endpoint::Enable => drain(shared, peer, p, false),
        Endpoint::Cluster => Ok(json(StatusCode::OK, &cluster(shared))),
    };
    result.unwrap_or_else(|(status, e)| error(status, e))
}

type Answer = Result<Response<Full<Bytes>>, (StatusCode, String)>;

fn bad(e: String) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, e)
}

/// A wall-clock time as the admin API writes it (RFC 3339, seconds).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn tunnel_json(t: &TunnelEntry, now: Instant) -> Value {
    json!({
        "id": t.id.to_string(),
        "client": t.client.to_string(),
        "route": t.route,
        "backend": t.backend.label,
        "subject": t.subject,
        "protocol": t.protocol,
        "opened_at": rfc3339(t.opened_at),
        "age_seconds": now.saturating_duration_since(t.opened).as_secs_f64(),
        "bytes_from_client": t.bytes_up.load(Ordering::Relaxed),
        "bytes_to_client": t.bytes_down.load(Ordering::Relaxed),
        "frames_from_client": t.frames_up.load(Ordering::Relaxed),
        "frames_to_client": t.frames_down.load(Ordering::Relaxed),
    })
}

fn list_tunnels(shared: &Shared, p: &Params) -> Answer {
    let filter = Filter::parse(p).map_err(bad)?;
    let limit = p
        .number("limit", 0..=u64::from(u32::MAX))
        .map_err(bad)?
        .map_or(DEFAULT_LIMIT, |n| n as usize);
    let now = Instant::now();
    let mut found = shared.tunnels.select(|t| filter.matches(t, now));
    found.sort_by_key(|t| t.id);
    let truncated = found.len() > limit;
    let list: Vec<Value> = found
        .iter()
        .take(limit)
        .map(|t| tunnel_json(t, now))
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "tunnels": list, "truncated": truncated }),
    ))
}

/// `code` and `reason` of a close order.
fn close_params(p: &Params) -> Result<(u16, Box<str>), String> {
    let code = match p.get("code") {
        None => 1001,
        Some(s) => match s.trim().parse::<u16>() {
            Ok(c @ (1000 | 1001 | 1008 | 1011 | 1012 | 1013 | 4000..=4999)) => c,
            _ => {
                return Err(format!(
                    "code: \"{s}\" is not one of 1000, 1001, 1008, 1011, 1012, 1013 or 4000-4999"
                ));
            }
        },
    };
    let reason = p.get("reason").unwrap_or("closed by operator");
    if reason.len() > 123 {
        return Err(format!(
            "reason: {} bytes, at most 123 fit a Close frame",
            reason.len()
        ));
    }
    Ok((code, reason.into()))
}

fn count(shared: &Shared, action: &'static str) {
    shared
        .metrics
        .admin_actions
        .get_or_create(&ActionLabel { action })
        .inc();
}

fn close_tunnels(shared: &Shared, peer: SocketAddr, p: &Params) -> Answer {
    let filter = Filter::parse(p).map_err(bad)?;
    let (code, reason) = close_params(p).map_err(bad)?;
    let percent = p.number("percent", 1..=100).map_err(bad)?.unwrap_or(100);
    let spread = p.duration("spread").map_err(bad)?.unwrap_or(Duration::ZERO);
    let now = Instant::now();
    let mut matched = shared.tunnels.select(|t| filter.matches(t, now));
    let n = matched.len();
    let take = (n * percent as usize).div_ceil(100).min(n);
    shuffle(&mut matched);
    matched.truncate(take);
    for (k, t) in matched.iter().enumerate() {
        // Evenly over the window, in the shuffled order.
        let offset = spread.mul_f64(k as f64 / take.max(1) as f64);
        t.close(Order {
            at: now + offset,
            why: Why::Operator {
                code,
                reason: reason.clone(),
            },
        });
    }
    count(shared, "close_tunnels");
    tracing::info!(admin = %peer, action = "close_tunnels", matched = n, closing = take, code,
                   spread_ms = spread.as_millis() as u64, "admin action");
    Ok(json(
        StatusCode::OK,
        &json!({ "matched": n, "closing": take }),
    ))
}

fn close_tunnel(shared: &Shared, peer: SocketAddr, id: u64, p: &Params) -> Answer {
    let (code, reason) = close_params(p).map_err(bad)?;
    let Some(t) = shared.tunnels.get(id) else {
        return Err((StatusCode::NOT_FOUND, format!("no tunnel {id}")));
    };
    t.close(Order {
        at: Instant::now(),
        why: Why::Operator { code, reason },
    });
    count(shared, "close_tunnel");
    tracing::info!(admin = %peer, action = "close_tunnel", tunnel = id, code, "admin action");
    Ok(json(StatusCode::OK, &json!({ "matched": 1, "closing": 1 })))
}

fn backends(shared: &Shared) -> Value {
    let rt = shared.runtime.load();
    let mut list = Vec::new();
    for e in rt.routes.entries() {
        for s in &e.states {
            let h = s.health();
            let health = (e.health.is_some()).then(|| {
                json!({
                    "last_check": h.last_check.map(rfc3339),
                    "last_result": h.last_result,
                    "consecutive_failures": h.consecutive_failures,
                })
            });
            list.push(json!({
                "route": s.route,
                "backend": s.label,
                "state": state_of(s),
                "tunnels": s.tunnels(),
                "requests": s.requests(),
                "health": health,
            }));
        }
    }
    json!({ "backends": list })
}

/// `GET /cluster`: the instances alive, this one first (alone without `[cluster]`).
fn cluster(shared: &Shared) -> Value {
    match &shared.cluster {
        Some(c) => c.instances(shared.tunnels.len()),
        None => json!({ "instances": [{
            "instance": null,
            "tunnels": shared.tunnels.len(),
            "version": env!("CARGO_PKG_VERSION"),
            "last_seen": rfc3339(SystemTime::now()),
        }] }),
    }
}

fn state_of(s: &BackendState) -> &'static str {
    if s.is_draining() {
        "draining"
    } else if s.is_up() {
        "up"
    } else {
        "down"
    }
}

fn drain(shared: &Shared, peer: SocketAddr, p: &Params, on: bool) -> Answer {
    let (Some(route), Some(backend)) = (p.get("route"), p.get("backend")) else {
        let missing = if p.get("route").is_none() {
            "route"
        } else {
            "backend"
        };
        return Err(bad(format!("{missing}: required")));
    };
    let rt = shared.runtime.load();
    let Some(state) = rt
        .routes
        .entries()
        .iter()
        .flat_map(|e| e.states.iter())
        .find(|s| s.route == route && s.label == backend)
        .cloned()
    else {
        let known_route = rt.routes.entries().iter().any(|e| e.label() == route);
        return Err(bad(if known_route {
            format!("backend: route {route} has no backend {backend}")
        } else {
            format!("route: no route {route}")
        }));
    };
    let spread = p
        .duration("spread")
        .map_err(bad)?
        .unwrap_or(rt.config.server.drain_spread);
    state.set_draining(on);
    let closing = if on {
        health::close_tunnels(shared, &state, spread)
    } else {
        0
    };
    let action = if on {
        "drain_backend"
    } else {
        "enable_backend"
    };
    count(shared, action);
    tracing::info!(admin = %peer, action, route, backend, closing, "admin action");
    Ok(json(
        StatusCode::OK,
        &json!({ "route": route, "backend": backend, "state": state_of(&state), "closing": closing }),
    ))
}

/// Shuffles with a generator seeded from the OS (an operator's "random share" must not be
/// predictable from tunnel ids).
fn shuffle<T>(v: &mut [T]) {
    let mut seed = [0u8; 8];
    let _ = rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut seed);
    let mut x = u64::from_le_bytes(seed) | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_their_methods() {
        assert_eq!(
            Endpoint::of("/tunnels/42/close"),
            Some(Endpoint::CloseTunnel(42))
        );
        assert_eq!(Endpoint::of("/tunnels/x/close"), None);
        assert_eq!(Endpoint::CloseTunnels.method(), Method::POST);
        assert_eq!(Endpoint::Tunnels.method(), Method::GET);
    }

    #[test]
    fn client_filters_take_addresses_and_prefixes() {
        let a: SocketAddr = "203.0.113.7:51512".parse().unwrap();
        let m = |s: &str, a: SocketAddr| match parse_client(s).unwrap() {
            ClientMatch::Exact(x) => x == a,
            ClientMatch::Net(n, b) => in_prefix(a.ip(), n, b),
        };
        assert!(m("203.0.113.7:51512", a));
        assert!(!m("203.0.113.7:1", a));
        assert!(m("203.0.113.7", a));
        assert!(m("203.0.113.0/24", a));
        assert!(!m("203.0.112.0/24", a));
        assert!(m("0.0.0.0/0", a));
        assert!(parse_client("203.0.113.0/33").is_none());
    }

    #[test]
    fn close_parameters_are_checked() {
        let p = |q: &str| Params::parse(q, &Bytes::new()).unwrap();
        assert_eq!(close_params(&p("")).unwrap().0, 1001);
        assert_eq!(close_params(&p("code=4321")).unwrap().0, 4321);
        assert!(
            close_params(&p("code=1006"))
                .unwrap_err()
                .starts_with("code:")
        );
        let long = "r".repeat(124);
        assert!(
            close_params(&p(&format!("reason={long}")))
                .unwrap_err()
                .starts_with("reason:")
        );
        let body = Params::parse("code=1000", &Bytes::from(r#"{"code": 1012}"#)).unwrap();
        assert_eq!(close_params(&body).unwrap().0, 1012);
    }
}
