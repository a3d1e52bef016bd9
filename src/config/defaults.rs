//! Every configuration default in one place, units in the names. [`DOCUMENTED`] is how the
//! README's configuration reference writes each key's default; tests check that the README
//! lists exactly these keys with these defaults, and that writing every default out gives the
//! same configuration as leaving the keys out.

use std::time::Duration;

pub(crate) const LISTEN: [&str; 2] = ["0.0.0.0:443", "[::]:443"];
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const MAX_CONNECTIONS: i64 = 50_000;
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub(crate) const DRAIN_SPREAD: Duration = Duration::from_secs(5);
pub(crate) const MAX_REQUEST_HEAD_BYTES: u64 = 32 * 1024;
pub(crate) const PROXY_PROTOCOL: bool = false;

pub(crate) const TLS_CERT: &str = "certs/localhost.pem";
pub(crate) const TLS_KEY: &str = "certs/localhost-key.pem";
pub(crate) const SESSION_TICKETS: bool = true;

pub(crate) const PER_IP_RATE: i64 = 20;
pub(crate) const PER_IP_BURST: i64 = 40;
pub(crate) const PER_IP_MAX_CONNECTIONS: i64 = 256;
pub(crate) const IPV6_PREFIX_BITS: i64 = 64;

pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(30);
pub(crate) const PONG_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub(crate) const MAX_FRAME_SIZE_BYTES: u64 = 16 * 1024 * 1024;
pub(crate) const MAX_LIFETIME: Duration = Duration::ZERO;

/// `[websocket]` as it is when the file says nothing: the base every route's table overrides.
pub(crate) fn websocket() -> super::WebSocket {
    super::WebSocket {
        ping_interval: PING_INTERVAL,
        pong_timeout: PONG_TIMEOUT,
        idle_timeout: IDLE_TIMEOUT,
        max_frame_size: MAX_FRAME_SIZE_BYTES,
        max_lifetime: MAX_LIFETIME,
        max_message_size: 0,
        client_message_rate: 0,
        client_message_burst: 0,
        client_byte_rate: 0,
        client_byte_burst: 0,
        rate_limit_action: super::RateLimitAction::Throttle,
        max_lifetime_jitter: Duration::ZERO,
    }
}

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) const ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// `[acme]` defaults.
pub(crate) const ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub(crate) const ACME_STORAGE: &str = "/var/lib/wsgate/acme";
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_millis(100);
pub(crate) const LOG_LEVEL: &str = "info";

pub(crate) const ALLOW_MISSING_ORIGIN: bool = false;
pub(crate) const STICKY_COOKIE: &str = "wsgate_sticky";
pub(crate) const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const HEALTHY_THRESHOLD: i64 = 2;
pub(crate) const UNHEALTHY_THRESHOLD: i64 = 3;

pub(crate) const JWKS_REFRESH: Duration = Duration::from_secs(600);
pub(crate) const JWT_ALGORITHMS: [jsonwebtoken::Algorithm; 3] = [
    jsonwebtoken::Algorithm::RS256,
    jsonwebtoken::Algorithm::ES256,
    jsonwebtoken::Algorithm::EdDSA,
];
pub(crate) const JWT_LEEWAY: Duration = Duration::from_secs(60);
pub(crate) const REQUIRE_EXP: bool = true;
pub(crate) const STRIP_TOKEN: bool = false;
pub(crate) const EXPIRED_CLOSE_CODE: u16 = 1008;
pub(crate) const HTTP2: bool = true;
pub(crate) const H2_MAX_CONCURRENT_STREAMS: i64 = 100;
pub(crate) const WEBSOCKET_OVER_H2: bool = false;
pub(crate) const FORWARD_AUTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Each key (dotted; `routes.` for keys of a `[[routes]]` entry) with its default as the
/// README writes it: a TOML value, or words where there is no literal default.
#[cfg(test)]
pub(crate) const DOCUMENTED: &[(&str, &str)] = &[
    ("server.listen", r#"["0.0.0.0:443", "[::]:443"]"#),
    ("server.listen_plain", "[]"),
    ("server.handshake_timeout", r#""10s""#),
    ("server.max_connections", "50000"),
    ("server.shutdown_grace", r#""30s""#),
    ("server.drain_spread", r#""5s""#),
    ("server.max_request_head", r#""32KiB""#),
    ("server.proxy_protocol", "false"),
    ("server.workers", "one per core"),
    ("server.http2", "true"),
    ("server.h2_max_concurrent_streams", "100"),
    ("server.websocket_over_h2", "false"),
    ("tls.cert", r#""certs/localhost.pem""#),
    ("tls.key", r#""certs/localhost-key.pem""#),
    ("tls.session_tickets", "true"),
    ("tls.client_ca", "none"),
    ("tls.client_auth", "\"optional\""),
    ("tls.sni", "none"),
    ("limits.per_ip_rate", "20"),
    ("limits.per_ip_burst", "40"),
    ("limits.per_ip_max_connections", "256"),
    ("limits.ipv6_prefix", "64"),
    ("websocket.ping_interval", r#""30s""#),
    ("websocket.pong_timeout", r#""10s""#),
    ("websocket.idle_timeout", r#""10m""#),
    ("websocket.max_frame_size", r#""16MiB""#),
    ("websocket.max_lifetime", r#""0s""#),
    ("websocket.max_message_size", "0"),
    ("websocket.client_message_rate", "0"),
    ("websocket.client_message_burst", "the rate"),
    ("websocket.client_byte_rate", "0"),
    ("websocket.client_byte_burst", "the rate"),
    ("websocket.rate_limit_action", r#""throttle""#),
    ("websocket.max_lifetime_jitter", r#""0s""#),
    ("upstream.connect_timeout", r#""5s""#),
    ("upstream.response_timeout", r#""60s""#),
    ("admin.listen", r#""127.0.0.1:9090""#),
    ("admin.token_file", "none"),
    ("cluster.redis", "none"),
    ("cluster.instance", "the host name"),
    ("cluster.sync_interval", "\"100ms\""),
    (
        "acme.directory",
        r#""https://acme-v02.api.letsencrypt.org/directory""#,
    ),
    ("acme.contact", "[]"),
    ("acme.domains", "required"),
    ("acme.storage", r#""/var/lib/wsgate/acme""#),
    ("acme.challenge", r#""tls-alpn-01""#),
    ("acme.renew_before", r#""1/3""#),
    ("acme.directory_ca", "the system's roots only"),
    ("acme.eab_kid", "none"),
    ("acme.eab_hmac_key_file", "none"),
    ("log.format", r#""text""#),
    ("log.level", r#""info""#),
    ("auth.name", "required"),
    ("auth.type", "required"),
    ("auth.token_from", r#"["header:Authorization"]"#),
    ("auth.jwks_file", "none"),
    ("auth.jwks_url", "none"),
    ("auth.jwks_ca", "the system's roots"),
    ("auth.jwks_refresh", r#""10m""#),
    ("auth.secret_file", "none"),
    ("auth.issuer", "not checked"),
    ("auth.audience", "not checked"),
    ("auth.algorithms", r#"["RS256", "ES256", "EdDSA"]"#),
    ("auth.leeway", r#""60s""#),
    ("auth.require_exp", "true"),
    ("auth.forward_claims", "{}"),
    ("auth.strip_token", "false"),
    ("auth.expired_close_code", "1008"),
    ("auth.url", "required"),
    ("auth.timeout", r#""2s""#),
    ("auth.copy_headers", "[]"),
    ("auth.expires_header", "none"),
    ("auth.subject_header", "none"),
    ("routes.path", "required"),
    ("routes.host", "any"),
    ("routes.backends", "required"),
    ("routes.allowed_origins", "[]"),
    ("routes.allow_missing_origin", "false"),
    ("routes.sticky", "none"),
    ("routes.balance", r#""round_robin""#),
    ("routes.sticky_cookie", r#""wsgate_sticky""#),
    ("routes.backend_tls", "false"),
    ("routes.backend_ca", "the system's roots"),
    ("routes.backend_server_name", "the backend's host"),
    ("routes.send_proxy_protocol", "none"),
    ("routes.on_backend_down", r#""keep""#),
    ("routes.health", "none"),
    ("routes.health.path", "a TCP connect"),
    ("routes.health.interval", r#""5s""#),
    ("routes.health.timeout", r#""2s""#),
    ("routes.health.healthy_threshold", "2"),
    ("routes.health.unhealthy_threshold", "3"),
    ("routes.websocket", "none"),
    ("routes.auth", "none"),
    ("routes.require_client_cert", "false"),
];
