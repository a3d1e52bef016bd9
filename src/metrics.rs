//! Counters, gauges and histograms in the Prometheus text format (`prometheus-client`). Labels
//! stay bounded: routes come from the configuration, close codes are folded into a fixed set,
//! and client addresses never appear.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A `route` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabel {
    /// Route label as in the config (`host/path` or `path`).
    pub(crate) route: String,
}

/// Labels of the tunnels-opened counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TunnelLabel {
    /// Route label.
    pub(crate) route: String,
    /// What carried the tunnel: `http1` (an Upgrade) or `h2` (an extended CONNECT).
    pub(crate) protocol: &'static str,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    /// Fixed reason name.
    pub(crate) reason: &'static str,
}

/// A `direction` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabel {
    /// `client_to_backend` or `backend_to_client`.
    pub(crate) direction: &'static str,
}

/// Labels of the close counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CloseLabel {
    /// Close code, or `none`, `3xxx`, `4xxx`, `other`.
    pub(crate) code: String,
    /// `client`, `backend` or `gateway`.
    pub(crate) side: &'static str,
}

/// A `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    /// `ok` or `failed`.
    pub(crate) result: &'static str,
}

/// Labels of the HTTP request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabel {
    /// Route label.
    pub(crate) route: String,
    /// Status class: `2xx` ... `5xx`.
    pub(crate) status: &'static str,
}

/// Labels of the policy close counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PolicyLabel {
    /// Route label.
    pub(crate) route: String,
    /// `message_size`, `message_rate` or `byte_rate`.
    pub(crate) policy: &'static str,
}

/// Labels of a route's backend.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BackendLabel {
    /// Route label.
    pub(crate) route: String,
    /// The backend's address as written in the configuration.
    pub(crate) backend: String,
}

/// Labels of the health-check counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BackendCheckLabel {
    pub(crate) route: String,
    pub(crate) backend: String,
    /// `ok` or `failed`.
    pub(crate) result: &'static str,
}

/// An `action` label of the admin counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CertLabel {
    /// A DNS name the certificate is served for.
    pub(crate) name: String,
    /// `file` or `acme`.
    pub(crate) source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ActionLabel {
    pub(crate) action: &'static str,
}

/// A histogram per route, built with the tunnel-duration buckets.
pub(crate) type DurationFamily = Family<RouteLabel, Histogram, fn() -> Histogram>;

/// Tunnel lifetimes from a second to a day: kept apart from the handshake histograms, whose
/// milliseconds they would drown.
fn duration_histogram() -> Histogram {
    Histogram::new([
        1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
        43200.0, 86400.0,
    ])
}

/// A counter of seconds.
pub(crate) type Seconds = Counter<f64, std::sync::atomic::AtomicU64>;

/// Every metric wsgate exports.
pub(crate) struct Metrics {
    registry: Registry,
    /// Client connections currently held.
    pub(crate) client_connections: Gauge,
    /// Open WebSocket tunnels by route.
    pub(crate) connections_open: Family<RouteLabel, Gauge>,
    /// WebSocket tunnels opened by route.
    pub(crate) connections_total: Family<TunnelLabel, Counter>,
    /// Plain HTTP requests forwarded by route and status class.
    pub(crate) http_requests: Family<RequestLabel, Counter>,
    /// Tunnels closed for breaking a route's limit, by route and limit.
    pub(crate) policy_closes: Family<PolicyLabel, Counter>,
    /// Time tunnels spent throttled by their rate limits, by route.
    pub(crate) throttled_seconds: Family<RouteLabel, Seconds>,
    /// Tunnels closed because their credential expired, by route.
    pub(crate) auth_expiries: Family<RouteLabel, Counter>,
    /// 1 while a route's backend is up, 0 while down.
    pub(crate) backend_up: Family<BackendLabel, Gauge>,
    /// Open tunnels by route and backend.
    pub(crate) backend_tunnels: Family<BackendLabel, Gauge>,
    /// Health checks by route, backend and result.
    pub(crate) backend_checks: Family<BackendCheckLabel, Counter>,
    /// How long tunnels lived, by route, observed when they end.
    pub(crate) tunnel_duration: DurationFamily,
    /// Admin API actions by kind.
    pub(crate) admin_actions: Family<ActionLabel, Counter>,
    /// Refused handshakes by reason.
    pub(crate) rejections: Family<ReasonLabel, Counter>,
    /// Bytes relayed each way.
    pub(crate) bytes: Family<DirectionLabel, Counter>,
    /// Frames relayed each way.
    pub(crate) frames: Family<DirectionLabel, Counter>,
    /// Gateway pings sent.
    pub(crate) pings_sent: Counter,
    /// Pongs to gateway pings received.
    pub(crate) pongs_received: Counter,
    /// Tunnels closed for a missing pong.
    pub(crate) ping_timeouts: Counter,
    /// Tunnels closed for idleness.
    pub(crate) idle_timeouts: Counter,
    /// Closes by code and by the side that started them.
    pub(crate) closes: Family<CloseLabel, Counter>,
    /// TLS handshakes that failed.
    pub(crate) tls_failures: Family<ReasonLabel, Counter>,
    /// Accept to request head read, seconds.
    pub(crate) handshake_seconds: Histogram,
    /// Backend connect time, seconds.
    pub(crate) backend_connect_seconds: Histogram,
    /// Configuration reloads by result.
    pub(crate) reloads: Family<ResultLabel, Counter>,
    /// Binary upgrades (SIGUSR2) by result.
    pub(crate) upgrades: Family<ResultLabel, Counter>,
    /// ACME orders by result.
    pub(crate) acme_orders: Family<ResultLabel, Counter>,
    /// The `notAfter` of every certificate served, as Unix seconds.
    pub(crate) cert_expiry: Family<CertLabel, Gauge>,
    /// The names `cert_expiry` has `source="file"` series for.
    file_certs: std::sync::Mutex<Vec<String>>,
    /// 1 when the last reload succeeded (or none was tried), 0 when it failed.
    pub(crate) config_ok: Gauge,
    /// 1 while Redis answers this instance's `[cluster]` syncs.
    pub(crate) cluster_redis_up: Gauge,
    /// The relay's counters, resolved once so tunnels add to them without label lookups.
    pub(crate) relay: RelayCounters,
}

/// Handles on the traffic counters every tunnel adds to while it runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct RelayCounters {
    bytes_up: Counter,
    bytes_down: Counter,
    frames_up: Counter,
    frames_down: Counter,
    pings_sent: Counter,
    pongs_received: Counter,
}

impl crate::relay::Tally for RelayCounters {
    fn add(&self, d: &crate::relay::Traffic) {
        for (c, v) in [
            (&self.bytes_up, d.bytes_up),
            (&self.bytes_down, d.bytes_down),
            (&self.frames_up, d.frames_up),
            (&self.frames_down, d.frames_down),
            (&self.pings_sent, d.pings_sent),
            (&self.pongs_received, d.pongs_received),
        ] {
            if v > 0 {
                c.inc_by(v);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub(crate) fn new() -> Self {
        let mut r = Registry::default();
        let mut m = Metrics {
            client_connections: Gauge::default(),
            connections_open: Family::default(),
            connections_total: Family::default(),
            http_requests: Family::default(),
            policy_closes: Family::default(),
            throttled_seconds: Family::default(),
            auth_expiries: Family::default(),
            backend_up: Family::default(),
            backend_tunnels: Family::default(),
            backend_checks: Family::default(),
            tunnel_duration: Family::new_with_constructor(duration_histogram),
            admin_actions: Family::default(),
            rejections: Family::default(),
            bytes: Family::default(),
            frames: Family::default(),
            pings_sent: Counter::default(),
            pongs_received: Counter::default(),
            ping_timeouts: Counter::default(),
            idle_timeouts: Counter::default(),
            closes: Family::default(),
            tls_failures: Family::default(),
            handshake_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            backend_connect_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            reloads: Family::default(),
            upgrades: Family::default(),
            acme_orders: Family::default(),
            cert_expiry: Family::default(),
            file_certs: Default::default(),
            config_ok: Gauge::default(),
            cluster_redis_up: Gauge::default(),
            relay: RelayCounters::default(),
            registry: Registry::default(),
        };
        m.config_ok.set(1);
        // One statement per series: a family's read guard must be gone before the next
        // get_or_create, which takes the write lock to insert.
        let series = |f: &Family<DirectionLabel, Counter>, direction| {
            f.get_or_create(&DirectionLabel { direction }).clone()
        };
        let bytes_up = series(&m.bytes, "client_to_backend");
        let bytes_down = series(&m.bytes, "backend_to_client");
        let frames_up = series(&m.frames, "client_to_backend");
        let frames_down = series(&m.frames, "backend_to_client");
        m.relay = RelayCounters {
            bytes_up,
            bytes_down,
            frames_up,
            frames_down,
            pings_sent: m.pings_sent.clone(),
            pongs_received: m.pongs_received.clone(),
        };
        r.register(
            "wsgate_client_connections_open",
            "Client connections currently held",
            m.client_connections.clone(),
        );
        r.register(
            "wsgate_connections_open",
            "Open WebSocket tunnels by route",
            m.connections_open.clone(),
        );
        r.register(
            "wsgate_connections",
            "WebSocket tunnels opened by route and protocol",
            m.connections_total.clone(),
        );
        r.register(
            "wsgate_http_requests",
            "Plain HTTP requests forwarded by route and status class",
            m.http_requests.clone(),
        );
        r.register(
            "wsgate_handshake_rejections",
            "Refused handshakes by reason",
            m.rejections.clone(),
        );
        r.register(
            "wsgate_relayed_bytes",
            "Bytes relayed by direction",
            m.bytes.clone(),
        );
        r.register(
            "wsgate_relayed_frames",
            "WebSocket frames relayed by direction",
            m.frames.clone(),
        );
        r.register(
            "wsgate_gateway_pings",
            "Pings sent by the gateway",
            m.pings_sent.clone(),
        );
        r.register(
            "wsgate_gateway_pongs",
            "Pongs to gateway pings received",
            m.pongs_received.clone(),
        );
        r.register(
            "wsgate_ping_timeouts",
            "Tunnels closed for a missing pong",
            m.ping_timeouts.clone(),
        );
        r.register(
            "wsgate_idle_timeouts",
            "Tunnels closed for idleness",
            m.idle_timeouts.clone(),
        );
        r.register(
            "wsgate_closes",
            "Tunnel closes by code and side",
            m.closes.clone(),
        );
        r.register(
            "wsgate_tls_handshake_failures",
            "Failed TLS handshakes",
            m.tls_failures.clone(),
        );
        r.register(
            "wsgate_handshake_duration_seconds",
            "Accept to request head",
            m.handshake_seconds.clone(),
        );
        r.register(
            "wsgate_backend_connect_duration_seconds",
            "Backend connect time",
            m.backend_connect_seconds.clone(),
        );
        r.register(
            "wsgate_config_reloads",
            "Configuration reloads by result",
            m.reloads.clone(),
        );
        r.register(
            "wsgate_upgrades",
            "Binary upgrades (SIGUSR2) by result",
            m.upgrades.clone(),
        );
        r.register(
            "wsgate_acme_orders",
            "ACME certificate orders by result",
            m.acme_orders.clone(),
        );
        r.register(
            "wsgate_certificate_expiry_timestamp_seconds",
            "notAfter of every certificate served, by name and source (file or acme)",
            m.cert_expiry.clone(),
        );
        r.register(
            "wsgate_policy_closes",
            "Tunnels closed for breaking a route's message size or rate limit",
            m.policy_closes.clone(),
        );
        r.register(
            "wsgate_throttled_seconds",
            "Time tunnels spent throttled by their rate limits",
            m.throttled_seconds.clone(),
        );
        r.register(
            "wsgate_auth_expiries",
            "Tunnels closed because their credential expired",
            m.auth_expiries.clone(),
        );
        r.register(
            "wsgate_backend_up",
            "1 while a route's backend is up, 0 while health checks have it down",
            m.backend_up.clone(),
        );
        r.register(
            "wsgate_backend_tunnels_open",
            "Open tunnels by route and backend",
            m.backend_tunnels.clone(),
        );
        r.register(
            "wsgate_backend_health_checks",
            "Health checks by route, backend and result",
            m.backend_checks.clone(),
        );
        r.register(
            "wsgate_tunnel_duration_seconds",
            "How long tunnels lived, observed when they end",
            m.tunnel_duration.clone(),
        );
        r.register(
            "wsgate_admin_actions",
            "Admin API actions by kind",
            m.admin_actions.clone(),
        );
        r.register(
            "wsgate_config_last_reload_successful",
            "1 if the last reload succeeded",
            m.config_ok.clone(),
        );
        r.register(
            "wsgate_cluster_redis_up",
            "1 while Redis answers the [cluster] syncs, 0 while this instance decides alone",
            m.cluster_redis_up.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Counts one refused handshake.
    /// A failed TLS handshake, by `reason`.
    pub(crate) fn tls_failure(&self, reason: &'static str) {
        self.tls_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub(crate) fn reject(&self, reason: &'static str) {
        self.rejections.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts one tunnel close.
    pub(crate) fn close(&self, code: Option<u16>, side: &'static str) {
        let code = match code {
            None => "none".to_string(),
            Some(c @ 1000..=1015) => c.to_string(),
            Some(3000..=3999) => "3xxx".into(),
            Some(4000..=4999) => "4xxx".into(),
            Some(_) => "other".into(),
        };
        self.closes.get_or_create(&CloseLabel { code, side }).inc();
    }

    /// The expiry gauges of file certificates: `files` (name, notAfter) replaces the set
    /// before it, so a certificate a reload removed leaves no series behind.
    pub(crate) fn set_file_certs(&self, files: &[(String, i64)]) {
        let mut last = self.file_certs.lock().unwrap_or_else(|e| e.into_inner());
        for name in last.drain(..) {
            if !files.iter().any(|(n, _)| *n == name) {
                self.cert_expiry.remove(&CertLabel {
                    name,
                    source: "file",
                });
            }
        }
        for (name, at) in files {
            self.cert_expiry
                .get_or_create(&CertLabel {
                    name: name.clone(),
                    source: "file",
                })
                .set(*at);
            last.push(name.clone());
        }
    }

    /// The text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
