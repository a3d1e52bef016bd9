//! A WebSocket Upgrade that passed the decision path becomes a tunnel here: the backend is
//! connected (next one on failure), sent the Upgrade, its 101 checked, the gateway's own 101
//! written to the client, and then [`Tunnel::run`] relays both sockets through
//! [`crate::relay`] with the settings of the snapshot the connection started under.

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::auth::Identity;
use crate::config::Route;
use crate::conn::{ClientStream, Conn};
use crate::downstream::response::encode_switching;
use crate::downstream::{Downstream, Next, Served};
use crate::metrics::{PolicyLabel, RelayCounters, RouteLabel, Seconds};
use crate::reject::Refusal;
use crate::relay::{self, GatewayClose};
use crate::upstream::upgrade::{self, Answer};
use crate::upstream::{self, BackendStream};

/// An established tunnel, ready to relay.
pub(crate) struct Tunnel {
    conn: Conn,
    client: ClientStream,
    /// What the client sent past its Upgrade request (its first frames), relayed first.
    client_prefix: Bytes,
    backend: BackendStream,
    /// What the backend sent past its 101.
    backend_prefix: Bytes,
    route: String,
    /// The route's `[websocket]` settings as they were when the tunnel opened.
    settings: relay::Settings,
    /// Who opened it, when the route authenticates.
    identity: Identity,
}

/// How an Upgrade went.
pub(crate) enum Opened {
    /// The 101 went out: relay.
    Tunnel(Box<TunnelParts>),
    /// The backend refused and its answer went to the client.
    Answered(Served),
}

/// The pieces of a tunnel before the connection context joins them.
pub(crate) struct TunnelParts {
    backend: BackendStream,
    backend_prefix: Bytes,
    route: String,
    settings: relay::Settings,
    identity: Identity,
}

/// Connects a backend, forwards the Upgrade, checks its answer and answers the client.
pub(crate) async fn open(
    conn: &Conn,
    d: &mut Downstream,
    req: http::request::Parts,
    route: &Route,
    identity: Identity,
) -> Result<Opened, Refusal> {
    let label = route.label();
    conn.note_route(&label);
    let cfg = &conn.rt.config.upstream;
    let t0 = Instant::now();
    let order = conn.rt.routes.backends(route, conn.client.ip());
    let (stream, backend) = upstream::connect_any(order, cfg.connect_timeout).await?;
    conn.note_backend(backend);
    conn.shared
        .metrics
        .backend_connect_seconds
        .observe(t0.elapsed().as_secs_f64());
    let answer = upgrade::upgrade(
        stream,
        &req,
        conn.client,
        conn.listener.proto(),
        cfg.response_timeout,
    )
    .await?;
    let switched = match answer {
        Answer::Refused(resp) => {
            tracing::info!(
                status = resp.status().as_u16(),
                "backend refused the upgrade"
            );
            return Ok(Opened::Answered(
                crate::forward::relay_refusal(conn, d, &req, resp).await,
            ));
        }
        Answer::Switched(s) => s,
    };
    let mut head = Vec::with_capacity(256);
    encode_switching(&switched.headers, &mut head);
    if d.stream.write_all(&head).await.is_err() || d.stream.flush().await.is_err() {
        tracing::info!("client went away before the 101 was sent");
        return Ok(Opened::Answered(Served {
            next: Next::Close,
            status: 101,
        }));
    }
    Ok(Opened::Tunnel(Box::new(TunnelParts {
        backend: switched.stream,
        backend_prefix: switched.leftover,
        route: label,
        settings: settings_for(route, &identity),
        identity,
    })))
}

impl Tunnel {
    pub(crate) fn new(conn: Conn, d: Downstream, parts: TunnelParts) -> Tunnel {
        let Downstream { stream, mut buf } = d;
        Tunnel {
            conn,
            client: stream,
            client_prefix: buf.split().freeze(),
            backend: parts.backend,
            backend_prefix: parts.backend_prefix,
            route: parts.route,
            settings: parts.settings,
            identity: parts.identity,
        }
    }

    /// Relays until both sides are done, then counts and logs the tunnel's end. Runs outside
    /// the connection's span (entered for its two log lines only): the relay is the hot path.
    pub(crate) async fn run(self) {
        let Tunnel {
            conn,
            client,
            client_prefix,
            backend,
            backend_prefix,
            route,
            settings,
            identity,
        } = self;
        let shared = conn.shared.clone();
        let m = &shared.metrics;
        let route_label = RouteLabel { route };
        let tally = TunnelTally {
            relay: &m.relay,
            throttled: m.throttled_seconds.get_or_create(&route_label).clone(),
        };
        m.connections_total.get_or_create(&route_label).inc();
        m.connections_open.get_or_create(&route_label).inc();
        let opened = Instant::now();
        shared.stats.tunnel_opened();
        conn.span
            .in_scope(|| tracing::info!(subject = identity.subject.as_deref(), "tunnel opened"));
        let s = relay::run(
            relay::Peers {
                client,
                client_prefix,
                backend,
                backend_prefix,
            },
            &settings,
            &shared.drain,
            &tally,
            conn.id,
        )
        .await;
        m.connections_open.get_or_create(&route_label).dec();
        m.close(s.close_code, s.closed_by.as_str());
        let mut policy = None;
        match s.gateway_close {
            Some(GatewayClose::PingTimeout) => {
                m.ping_timeouts.inc();
            }
            Some(GatewayClose::Idle) => {
                m.idle_timeouts.inc();
            }
            Some(GatewayClose::Expired(_)) => {
                m.auth_expiries.get_or_create(&route_label).inc();
            }
            Some(GatewayClose::Policy(l)) => {
                policy = Some(l.as_str());
                let label = PolicyLabel {
                    route: route_label.route.clone(),
                    policy: l.as_str(),
                };
                m.policy_closes.get_or_create(&label).inc();
            }
            _ => {}
        }
        conn.span.in_scope(|| {
            tracing::info!(
                duration_ms = opened.elapsed().as_millis() as u64,
                bytes_up = s.traffic.bytes_up,
                bytes_down = s.traffic.bytes_down,
                frames_up = s.traffic.frames_up,
                frames_down = s.traffic.frames_down,
                closed_by = s.closed_by.as_str(),
                close_code = s.close_code.map_or(-1, i64::from),
                reason = %s.reason,
                policy,
                throttled_ms = s.traffic.throttled.as_millis() as u64,
                "tunnel closed"
            )
        });
        shared.stats.tunnel_closed();
    }
}

/// The tunnel's live traffic reports: the process-wide relay counters, and the time held back
/// by its route's rate limits.
struct TunnelTally<'a> {
    relay: &'a RelayCounters,
    throttled: Seconds,
}

impl relay::Tally for TunnelTally<'_> {
    fn add(&self, delta: &relay::Traffic) {
        relay::Tally::add(self.relay, delta);
        if !delta.throttled.is_zero() {
            self.throttled.inc_by(delta.throttled.as_secs_f64());
        }
    }
}

/// The route's settings for one tunnel, with the instant its credential ends.
fn settings_for(route: &Route, identity: &Identity) -> relay::Settings {
    let mut s = relay::Settings::from(&route.websocket);
    if let Some(left) = identity.remaining() {
        s.expires = Some((Instant::now() + left, identity.expired_close_code));
    }
    s
}
