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
    pub(super) routes: Vec<RawRoute>,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    pub(super) cert: Opt<String>,
    pub(super) key: Opt<String>,
    pub(super) sni: Vec<Spanned<RawSni>>,
    pub(super) session_tickets: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSni {
    pub(super) server_name: Spanned<String>,
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub(super) connect_timeout: Opt<Value>,
    pub(super) response_timeout: Opt<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) listen: Opt<String>,
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
    pub(super) backends: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) allowed_origins: Opt<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) allow_missing_origin: Option<bool>,
    #[serde(default)]
    pub(super) sticky: Opt<String>,
    /// Any `[websocket]` key, for this route only.
    #[serde(default)]
    pub(super) websocket: Option<RawWebSocket>,
}
