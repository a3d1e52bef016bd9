//! The file as serde reads it: every table and key, unknown ones refused
//! (`deny_unknown_fields`), values kept with their spans so later checks can cite lines.

use serde::Deserialize;
use toml::{Spanned, Value};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Raw {
    pub(super) server: RawServer,
    pub(super) tls: RawTls,
    pub(super) limits: RawLimits,
    pub(super) websocket: RawWebSocket,
    pub(super) upstream: RawUpstream,
    pub(super) admin: RawAdmin,
    pub(super) log: RawLog,
    pub(super) cluster: Option<Spanned<RawCluster>>,
    pub(super) acme: Option<Spanned<RawAcme>>,
    pub(super) auth: Vec<Spanned<RawAuth>>,
    pub(super) routes: Vec<RawRoute>,
}

/// `[routes.health]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHealth {
    pub(super) path: Opt<String>,
    pub(super) interval: Opt<Value>,
    pub(super) timeout: Opt<Value>,
    pub(super) healthy_threshold: Opt<i64>,
    pub(super) unhealthy_threshold: Opt<i64>,
}

/// One `[[auth]]` entry; which keys apply depends on `type`, checked when building.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) name: Spanned<String>,
    #[serde(rename = "type")]
    pub(super) kind: Spanned<String>,
    #[serde(default)]
    pub(super) token_from: Opt<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) jwks_file: Opt<String>,
    #[serde(default)]
    pub(super) jwks_url: Opt<String>,
    #[serde(default)]
    pub(super) jwks_ca: Opt<String>,
    #[serde(default)]
    pub(super) jwks_refresh: Opt<Value>,
    #[serde(default)]
    pub(super) secret_file: Opt<String>,
    #[serde(default)]
    pub(super) issuer: Opt<String>,
    #[serde(default)]
    pub(super) audience: Opt<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) algorithms: Opt<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) leeway: Opt<Value>,
    #[serde(default)]
    pub(super) require_exp: Option<bool>,
    #[serde(default)]
    pub(super) forward_claims: Opt<std::collections::BTreeMap<String, Spanned<String>>>,
    #[serde(default)]
    pub(super) strip_token: Option<bool>,
    #[serde(default)]
    pub(super) expired_close_code: Opt<i64>,
    #[serde(default)]
    pub(super) url: Opt<String>,
    #[serde(default)]
    pub(super) timeout: Opt<Value>,
    #[serde(default)]
    pub(super) copy_headers: Opt<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) expires_header: Opt<String>,
    #[serde(default)]
    pub(super) subject_header: Opt<String>,
}

pub(super) type Opt<T> = Option<Spanned<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub(super) listen: Opt<Vec<Spanned<String>>>,
    pub(super) listen_plain: Opt<Vec<Spanned<String>>>,
    pub(super) handshake_timeout: Opt<Value>,
    pub(super) max_connections: Opt<i64>,
    pub(super) shutdown_grace: Opt<Value>,
    pub(super) drain_spread: Opt<Value>,
    pub(super) max_request_head: Opt<Value>,
    pub(super) proxy_protocol: Option<bool>,
    pub(super) workers: Opt<i64>,
    pub(super) http2: Option<bool>,
    pub(super) h2_max_concurrent_streams: Opt<i64>,
    pub(super) websocket_over_h2: Opt<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    pub(super) cert: Opt<String>,
    pub(super) key: Opt<String>,
    pub(super) sni: Vec<Spanned<RawSni>>,
    pub(super) session_tickets: Option<bool>,
    pub(super) client_ca: Opt<String>,
    pub(super) client_auth: Opt<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSni {
    pub(super) server_name: Spanned<String>,
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
    #[serde(default)]
    pub(super) client_ca: Opt<String>,
    #[serde(default)]
    pub(super) client_auth: Opt<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub(super) per_ip_rate: Opt<i64>,
    pub(super) per_ip_burst: Opt<i64>,
    pub(super) per_ip_max_connections: Opt<i64>,
    pub(super) ipv6_prefix: Opt<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWebSocket {
    pub(super) ping_interval: Opt<Value>,
    pub(super) pong_timeout: Opt<Value>,
    pub(super) idle_timeout: Opt<Value>,
    pub(super) max_frame_size: Opt<Value>,
    pub(super) max_lifetime: Opt<Value>,
    pub(super) max_message_size: Opt<Value>,
    pub(super) client_message_rate: Opt<i64>,
    pub(super) client_message_burst: Opt<i64>,
    pub(super) client_byte_rate: Opt<Value>,
    pub(super) client_byte_burst: Opt<Value>,
    pub(super) rate_limit_action: Opt<String>,
    pub(super) max_lifetime_jitter: Opt<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub(super) connect_timeout: Opt<Value>,
    pub(super) response_timeout: Opt<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCluster {
    pub(super) redis: Opt<String>,
    pub(super) instance: Opt<String>,
    pub(super) sync_interval: Opt<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAcme {
    pub(super) directory: Opt<String>,
    pub(super) contact: Opt<Vec<Spanned<String>>>,
    pub(super) domains: Opt<Vec<Spanned<String>>>,
    pub(super) storage: Opt<String>,
    pub(super) challenge: Opt<String>,
    pub(super) renew_before: Opt<String>,
    pub(super) directory_ca: Opt<String>,
    pub(super) eab_kid: Opt<String>,
    pub(super) eab_hmac_key_file: Opt<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) listen: Opt<String>,
    pub(super) token_file: Opt<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) format: Opt<String>,
    pub(super) level: Opt<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) path: Spanned<String>,
    pub(super) host: Opt<String>,
    /// `host:port`, `unix:/path`, or `{ address, weight, max_tunnels }`.
    pub(super) backends: Spanned<Vec<Spanned<Value>>>,
    #[serde(default)]
    pub(super) balance: Opt<String>,
    #[serde(default)]
    pub(super) sticky_cookie: Opt<String>,
    #[serde(default)]
    pub(super) backend_tls: Option<bool>,
    pub(super) require_client_cert: Option<bool>,
    #[serde(default)]
    pub(super) backend_ca: Opt<String>,
    #[serde(default)]
    pub(super) backend_server_name: Opt<String>,
    #[serde(default)]
    pub(super) send_proxy_protocol: Opt<String>,
    #[serde(default)]
    pub(super) on_backend_down: Opt<String>,
    #[serde(default)]
    pub(super) health: Option<RawHealth>,
    #[serde(default)]
    pub(super) allowed_origins: Opt<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) allow_missing_origin: Option<bool>,
    #[serde(default)]
    pub(super) sticky: Opt<String>,
    /// Any `[websocket]` key, for this route only.
    #[serde(default)]
    pub(super) websocket: Option<RawWebSocket>,
    #[serde(default)]
    pub(super) auth: Opt<String>,
}
