//! A WebSocket handshake that passed the decision path becomes a tunnel here: the backend is
//! connected (next one on failure), sent the Upgrade, its 101 checked ([`reach`]), the
//! gateway's own answer given to the client (a 101 by [`open`] on HTTP/1.1, a 200 on an
//! HTTP/2 stream by [`crate::http2`]), and then [`Tunnel::run`] relays both sides through
//! [`crate::relay`] with the settings of the snapshot the connection started under.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::auth::Identity;
use crate::backends::{TunnelSlot, health, sticky};
use crate::conn::{ClientStream, Conn};
use crate::downstream::response::encode_switching;
use crate::downstream::{Downstream, Next, Served};
use crate::metrics::{PolicyLabel, RelayCounters, RouteLabel, Seconds};
use crate::reject::Refusal;
use crate::relay::orders::{Mailbox, Order, Why};
use crate::relay::{self, GatewayClose};
use crate::route::RouteEntry;
use crate::tunnels::TunnelEntry;
use crate::upstream::upgrade::{self, Answer};
use crate::upstream::{self, BackendStream, Dial, DialError, Proxy};

/// An established tunnel, ready to relay: its client side is a connection of its own (`C` a
/// [`ClientStream`], `K` the [`Conn`] it owns) or a stream of a shared HTTP/2 connection (`K`
/// an `Arc<Conn>`).
pub(crate) struct Tunnel<C = ClientStream, K = Conn> {
    conn: K,
    /// The tunnel's id in logs, the registry and the admin API: the connection's own on
    /// HTTP/1.1, one of its own per HTTP/2 stream.
    id: u64,
    /// `http1` or `h2`, as `wsgate_connections_total` labels it.
    protocol: &'static str,
    client: C,
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
    /// Counts the tunnel toward its backend's load.
    slot: TunnelSlot,
}

/// How an Upgrade went.
pub(crate) enum Opened {
    /// The 101 went out: relay.
    Tunnel(Box<TunnelParts>),
    /// The backend refused and its answer went to the client.
    Answered(Served),
}

/// A backend that took the Upgrade, or its answer when it did not.
pub(crate) enum Reached {
    /// The backend's checked 101: the headers to answer the client with (sticky cookie in)
    /// and the tunnel's pieces.
    Switched {
        headers: http::HeaderMap,
        parts: Box<TunnelParts>,
    },
    /// Any other status, to be relayed as it is.
    Refused(http::Response<hyper::body::Incoming>),
}

/// The pieces of a tunnel before the connection context joins them.
pub(crate) struct TunnelParts {
    backend: BackendStream,
    backend_prefix: Bytes,
    route: String,
    settings: relay::Settings,
    identity: Identity,
    slot: TunnelSlot,
}

/// Connects a backend, forwards the Upgrade, checks its answer and answers the client.
pub(crate) async fn open(
    conn: &Conn,
    d: &mut Downstream,
    mut req: http::request::Parts,
    route: &RouteEntry,
    identity: Identity,
) -> Result<Opened, Refusal> {
    let (headers, parts) = match reach(conn, &mut req, route, identity).await? {
        Reached::Refused(resp) => {
            return Ok(Opened::Answered(
                crate::forward::relay_refusal(conn, d, &req, resp).await,
            ));
        }
        Reached::Switched { headers, parts } => (headers, parts),
    };
    let mut head = Vec::with_capacity(256);
    encode_switching(&headers, &mut head);
    if d.stream.write_all(&head).await.is_err() || d.stream.flush().await.is_err() {
        tracing::info!("client went away before the 101 was sent");
        return Ok(Opened::Answered(Served {
            next: Next::Close,
            status: 101,
        }));
    }
    Ok(Opened::Tunnel(parts))
}

/// Connects a backend and has it take the Upgrade `req` describes (an HTTP/1.1 request: an
/// HTTP/2 extended CONNECT is rewritten into one, with a key of the gateway's, before the
/// decision path).
pub(crate) async fn reach(
    conn: &Conn,
    req: &mut http::request::Parts,
    route: &RouteEntry,
    identity: Identity,
) -> Result<Reached, Refusal> {
    let label = route.label();
    conn.note_route(&label);
    let cfg = &conn.rt.config.upstream;
    let t0 = Instant::now();
    let pick = route.pick(conn.client.ip(), &req.headers, true)?;
    let sticky = sticky::take(&route.sticky, &mut req.headers);
    let (i, stream, slot) = connect(conn, route, &pick.order).await?;
    let backend = &route.backends[i];
    conn.note_backend(&backend.label);
    conn.shared
        .metrics
        .backend_connect_seconds
        .observe(t0.elapsed().as_secs_f64());
    let answer = upgrade::upgrade(
        stream,
        req,
        conn.client,
        conn.listener.proto(),
        cfg.response_timeout,
    )
    .await?;
    let mut switched = match answer {
        Answer::Refused(resp) => {
            tracing::info!(
                status = resp.status().as_u16(),
                "backend refused the upgrade"
            );
            return Ok(Reached::Refused(resp));
        }
        Answer::Switched(s) => s,
    };
    if let Some(s) = &sticky {
        s.answer(&label, &backend.label, &mut switched.headers);
    }
    Ok(Reached::Switched {
        headers: switched.headers,
        parts: Box::new(TunnelParts {
            backend: switched.stream,
            backend_prefix: switched.leftover,
            route: label,
            settings: settings_for(route, &identity),
            identity,
            slot,
        }),
    })
}

/// How one of a route's backends is reached from a client connection.
pub(crate) fn dial_for<'a>(conn: &Conn, route: &'a RouteEntry, i: usize) -> Dial<'a> {
    Dial {
        backend: &route.backends[i].target,
        tls: route.tls.as_ref().map(|c| {
            let name = route
                .backend_tls
                .as_ref()
                .and_then(|t| t.server_name.as_deref());
            (c, name)
        }),
        proxy: if route.send_proxy_protocol {
            Proxy::Client {
                client: conn.client,
                local: conn.local,
            }
        } else {
            Proxy::None
        },
    }
}

/// Connects to the first backend of `order` that accepts; a failure counts as a failed health
/// check and moves on to the next. The tunnel counts toward a backend's load (and cap) from
/// before its connect, so a burst of upgrades sees itself.
async fn connect(
    conn: &Conn,
    route: &RouteEntry,
    order: &[usize],
) -> Result<(usize, BackendStream, TunnelSlot), Refusal> {
    let timeout = conn.rt.config.upstream.connect_timeout;
    let mut refusal = Refusal::BackendUnavailable;
    for &i in order {
        let label = &route.backends[i].label;
        let slot = route.states[i].tunnel_slot();
        match upstream::dial(&dial_for(conn, route, i), timeout).await {
            Ok(s) => return Ok((i, s, slot)),
            Err(e) => {
                if let DialError::Tls(_) = e {
                    refusal = Refusal::BackendTls;
                }
                tracing::warn!(backend = %label, error = %e, "backend connect failed");
                health::connect_failed(&conn.shared, route, &route.states[i], e.to_string());
            }
        }
    }
    Err(refusal)
}

impl Tunnel {
    pub(crate) fn new(conn: Conn, d: Downstream, parts: TunnelParts) -> Tunnel {
        let Downstream {
            stream, mut buf, ..
        } = d;
        Tunnel {
            id: conn.id,
            protocol: "http1",
            conn,
            client: stream,
            client_prefix: buf.split().freeze(),
            backend: parts.backend,
            backend_prefix: parts.backend_prefix,
            route: parts.route,
            settings: parts.settings,
            identity: parts.identity,
            slot: parts.slot,
        }
    }
}

impl<C, K> Tunnel<C, K> {
    /// A tunnel on one stream of an HTTP/2 connection (`conn` shared by its streams), `id`
    /// its own.
    pub(crate) fn on_stream(conn: K, id: u64, client: C, parts: TunnelParts) -> Self {
        Tunnel {
            conn,
            id,
            protocol: "h2",
            client,
            client_prefix: Bytes::new(),
            backend: parts.backend,
            backend_prefix: parts.backend_prefix,
            route: parts.route,
            settings: parts.settings,
            identity: parts.identity,
            slot: parts.slot,
        }
    }
}

impl<C, K> Tunnel<C, K>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    K: std::borrow::Borrow<Conn>,
{
    /// Registers and counts the tunnel and logs its opening; the future it returns relays
    /// until both sides are done, then counts and logs the tunnel's end. That future is what
    /// an idle tunnel holds, so it keeps only the relay and what the end needs, and runs
    /// outside the connection's span (entered for the two log lines only): the relay is the
    /// hot path.
    pub(crate) fn run(self) -> Running<C, K> {
        let Tunnel {
            conn: owner,
            id,
            protocol,
            client,
            client_prefix,
            backend,
            backend_prefix,
            route,
            settings,
            identity,
            slot,
        } = self;
        let conn: &Conn = owner.borrow();
        let shared = conn.shared.clone();
        let m = &shared.metrics;
        // An authenticator's subject first; else the client certificate's common name.
        let subject = identity.subject.clone().or_else(|| {
            conn.client_cert
                .as_ref()
                .and_then(|c| c.common_name.clone())
        });
        let entry = Arc::new(TunnelEntry {
            id,
            client: conn.client,
            route: route.clone(),
            backend: slot.backend().clone(),
            subject,
            protocol,
            opened_at: SystemTime::now(),
            opened: Instant::now(),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            frames_up: AtomicU64::new(0),
            frames_down: AtomicU64::new(0),
            mailbox: Mailbox::default(),
        });
        shared.tunnels.insert(entry.clone());
        // A drain (of the process or of this backend) that began while the tunnel was being
        // set up has not seen it.
        if let Some(at) = shared.drain.close_at(id) {
            entry.close(Order {
                at,
                why: Why::Shutdown,
            });
        }
        if slot.backend().is_draining() {
            entry.close(Order {
                at: Instant::now(),
                why: Why::Restart,
            });
        }
        let route_label = RouteLabel { route };
        let throttled = m.throttled_seconds.get_or_create(&route_label).clone();
        m.connections_total
            .get_or_create(&crate::metrics::TunnelLabel {
                route: route_label.route.clone(),
                protocol,
            })
            .inc();
        m.connections_open.get_or_create(&route_label).inc();
        shared.stats.tunnel_opened();
        conn.span.in_scope(|| {
            tracing::info!(
                tunnel = id,
                protocol,
                subject = entry.subject.as_deref(),
                "tunnel opened"
            )
        });
        let relay = relay::Relaying::new(
            relay::Peers {
                client,
                client_prefix,
                backend,
                backend_prefix,
            },
            &settings,
            id,
        );
        Running {
            relay,
            end: End {
                opened: entry.opened,
                entry,
                conn: owner,
                route_label,
                throttled,
                _slot: slot,
                done: false,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// An open tunnel: its relay, and what counting and logging its end takes.
    pub(crate) struct Running<C, K: std::borrow::Borrow<Conn>> {
        #[pin]
        relay: relay::Relaying<C, BackendStream>,
        end: End<K>,
    }
}

/// What a tunnel keeps for its end. Dropping it (the tunnel ended, or the runtime dropped the
/// task) takes the tunnel out of the registry and off its backend's count.
struct End<K: std::borrow::Borrow<Conn>> {
    conn: K,
    entry: Arc<TunnelEntry>,
    route_label: RouteLabel,
    throttled: Seconds,
    opened: Instant,
    /// Counts the tunnel toward its backend's load.
    _slot: TunnelSlot,
    /// The end was counted and logged.
    done: bool,
}

impl<K: std::borrow::Borrow<Conn>> Drop for End<K> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.borrow().shared.tunnels.remove(self.entry.id);
        }
    }
}

impl<C, K> std::future::Future for Running<C, K>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    K: std::borrow::Borrow<Conn>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let end = &*this.end;
        let tally = TunnelTally {
            relay: &end.conn.borrow().shared.metrics.relay,
            throttled: &end.throttled,
            entry: &end.entry,
        };
        let s = std::task::ready!(this.relay.poll_relay(cx, &end.entry.mailbox, &tally));
        this.end.finish(s);
        Poll::Ready(())
    }
}

impl<K: std::borrow::Borrow<Conn>> End<K> {
    fn finish(&mut self, s: relay::Summary) {
        let conn: &Conn = self.conn.borrow();
        let shared = &conn.shared;
        // Out of the list before the count drops, so whoever waits on the count sees the list
        // agree.
        shared.tunnels.remove(self.entry.id);
        self.done = true;
        let m = &shared.metrics;
        let route_label = &self.route_label;
        m.connections_open.get_or_create(route_label).dec();
        m.tunnel_duration
            .get_or_create(route_label)
            .observe(self.opened.elapsed().as_secs_f64());
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
                m.auth_expiries.get_or_create(route_label).inc();
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
                tunnel = self.entry.id,
                duration_ms = self.opened.elapsed().as_millis() as u64,
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
    throttled: &'a Seconds,
    /// The tunnel's own counters, as the admin API lists them.
    entry: &'a TunnelEntry,
}

impl relay::Tally for TunnelTally<'_> {
    fn add(&self, delta: &relay::Traffic) {
        relay::Tally::add(self.relay, delta);
        crate::tunnels::add(self.entry, delta);
        if !delta.throttled.is_zero() {
            self.throttled.inc_by(delta.throttled.as_secs_f64());
        }
    }
}

/// The route's settings for one tunnel, with the instant its credential ends.
fn settings_for(route: &RouteEntry, identity: &Identity) -> relay::Settings {
    let mut s = relay::Settings::from(&route.websocket);
    if let Some(left) = identity.remaining() {
        s.expires = Some((Instant::now() + left, identity.expired_close_code));
    }
    s
}
