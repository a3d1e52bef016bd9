//! wsgate: a TLS-terminating WebSocket gateway and reverse proxy.
//!
//! A connection's life, in module order:
//!
//! ```text
//!  listener ── accept (back-off on EMFILE) ──► limits: rate, per-address cap
//!    │            refused: socket closed, no TLS work (after the PROXY header when expected)
//!    ├─ proxy_protocol: client address        tls: handshake (SNI, tickets)
//!    │            all within handshake_timeout of the accept; conn: the context from here on
//!    ├─ ALPN h2 ─► http2: each stream decided like a request below; a plain one forwarded,
//!    │             an extended CONNECT made an Upgrade toward the backend, its stream relayed
//!    ▼
//!  downstream ── every request head read by head.rs (exact max_request_head) ──┐
//!    │                                                                         ▼
//!    │          request::decide: admit ► dot segments ► upgrade checks ► route ► origin
//!    │                  │ refused: reject::Refusal ─► status, metric, log (one place)
//!    │      ┌───────────┴──────────────┐
//!    │      ▼ Upgrade                  ▼ plain request
//!    │   tunnel: upstream connect,   forward: pooled backend connection (upstream::pool),
//!    │   upgrade, check the 101      body framed by downstream::body, response streamed
//!    │      │                          by downstream::response; keep-alive: next head
//!    │      ▼
//!    └─► relay: frames tracked both ways; gateway pings, idle/lifetime bounds, Close frames
//! ```
//!
//! Around it, in `server`:
//!
//! ```text
//!  reload (SIGHUP): Config::load ► Runtime::build (certificates) ► bind new listeners
//!                   ► store the Runtime ► start new accept loops, close removed ones
//!                   (any failure before the store changes nothing; tunnels keep their snapshot)
//!  drain (SIGTERM): listeners closed ► /readyz 503 ► idle keep-alive connections closed
//!                   ► each tunnel's Close 1001 at its instant in drain_spread before the grace
//!                   ends ► exit when every task is done
//!  upgrade (SIGUSR2): start the binary on disk with the listening sockets (upgrade) ► it
//!                   takes them (inherited) and binds the rest ► it says ready ► this process
//!                   stops accepting (sockets left open for the child) ► drain as on SIGTERM
//! ```
//!
//! `admin` serves `/metrics`, `/healthz` and `/readyz`; `metrics` defines every series.

pub mod config;
pub mod systemd;

mod acme;
mod admin;
mod auth;
mod backends;
mod cluster;
mod conn;
mod downstream;
mod forward;
mod http2;
mod inherited;
mod leftover;
mod limits;
mod listener;
mod metrics;
mod origin;
mod proxy_protocol;
mod reject;
mod relay;
mod request;
mod route;
mod server;
mod shutdown;
mod tls;
mod tunnel;
mod tunnels;
mod upgrade;
mod upstream;

pub use inherited::{Inherited, UpgradeFrom};
pub use server::{Activity, Gateway, Handle, ReloadError, StartError};
pub use upgrade::{Exec, READY_WITHIN, UpgradeError};

/// Validates the configuration file at `path` and loads its certificates, the way a reload
/// would: every problem as one line (`file:line: key: message`), none when it is usable.
pub fn check(path: &std::path::Path) -> Vec<String> {
    let text = match std::fs::read_to_string(path) {
        Err(e) => {
            return vec![format!(
                "{}: cannot read the configuration file: {e}",
                path.display()
            )];
        }
        Ok(t) => t,
    };
    let (config, errors) = config::Config::parse_all(path, &text);
    let mut lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    // Certificates and key files are checked even when other keys are wrong, so one run
    // shows everything.
    if let Some(c) = config {
        if !c.server.listen.is_empty()
            && let Err(e) = tls::server_config(
                &c.tls,
                &c.path,
                c.acme.as_ref().map(|_| Default::default()),
                c.server.http2,
            )
        {
            lines.extend(e.iter().map(ToString::to_string));
        }
        for a in &c.auth {
            lines.extend(
                auth::check_files(a, &c.path)
                    .iter()
                    .map(ToString::to_string),
            );
        }
        if let Some(a) = &c.acme {
            lines.extend(
                acme::check_files(a, &c.path)
                    .iter()
                    .map(ToString::to_string),
            );
        }
        if let Err(e) = admin::read_token(&c) {
            lines.push(e.to_string());
        }
        // Backend CA bundles are loaded when the route table is built.
        let scratch = metrics::Metrics::new();
        if let Err(e) =
            route::RouteTable::new(&c.routes, &backends::Registry::default(), &scratch, &c.path)
        {
            lines.extend(e.iter().map(ToString::to_string));
        }
    }
    lines
}

/// Entry points for the fuzz targets in `fuzz/`: each runs one parser of peer input.
#[doc(hidden)]
pub mod fuzz {
    pub use crate::downstream::body::fuzz_chunked as chunked;
    pub use crate::http2::watch::fuzz_watch as h2_watch;
    pub use crate::proxy_protocol::fuzz_proxy_header as proxy_header;
    pub use crate::relay::fuzz_frames as frames;
    pub use crate::request::fuzz_head as head;
}
