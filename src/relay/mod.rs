//! The two-way pump of an established tunnel. Bytes pass unchanged and in order while a
//! [`frame::Tracker`] per direction follows frame boundaries ([`pump`]); the gateway inserts
//! its own pings at boundaries of the backend-to-client stream and consumes the client's pongs
//! to them ([`keep`]), enforces idle, lifetime and frame-size bounds, and every close it starts
//! is a Close frame to both peers. An idle tunnel owns no read buffer.
//!
//! A tunnel is `Open` until the gateway decides to close it (`Closing`); peers may close it on
//! their own while it is `Open`, by Close frames or by hanging up.

pub(crate) mod frame;
mod keep;
pub(crate) mod orders;
pub(crate) mod policy;
mod pump;

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use frame::{ControlFrame, OP_PING, Sender, Violation};
use keep::Keep;
use orders::{Order, Orders, Why};
use policy::Limit;
use pump::{CloseSpec, Dir, Flow, Found, pump};

/// How long the gateway waits for close handshakes it started before dropping both sockets.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The `[websocket]` settings a tunnel runs with (a snapshot taken when it opened).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Gateway ping period; zero disables.
    pub(crate) ping_interval: Duration,
    /// Time allowed for the pong.
    pub(crate) pong_timeout: Duration,
    /// Data-frame idleness bound; zero disables.
    pub(crate) idle_timeout: Duration,
    /// Largest payload a client frame may declare.
    pub(crate) max_frame_size: u64,
    /// Tunnel age bound; zero disables.
    pub(crate) max_lifetime: Duration,
    /// The age bound is shortened by a random amount up to this, per tunnel.
    pub(crate) max_lifetime_jitter: Duration,
    /// What the client may send: message size, message and byte rates.
    pub(crate) limits: policy::Limits,
    /// When the tunnel's credential ends, and the close code the client gets then.
    pub(crate) expires: Option<(Instant, u16)>,
}

impl From<&crate::config::WebSocket> for Settings {
    fn from(w: &crate::config::WebSocket) -> Self {
        Settings {
            ping_interval: w.ping_interval,
            pong_timeout: w.pong_timeout,
            idle_timeout: w.idle_timeout,
            max_frame_size: w.max_frame_size,
            max_lifetime: w.max_lifetime,
            max_lifetime_jitter: w.max_lifetime_jitter,
            limits: policy::Limits {
                max_message_size: w.max_message_size,
                message_rate: w.client_message_rate,
                message_burst: w.client_message_burst,
                byte_rate: w.client_byte_rate,
                byte_burst: w.client_byte_burst,
                action: match w.rate_limit_action {
                    crate::config::RateLimitAction::Throttle => policy::Action::Throttle,
                    crate::config::RateLimitAction::Close => policy::Action::Close,
                },
            },
            expires: None,
        }
    }
}

/// Who ended a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client (Close frame, or its connection went away).
    Client,
    /// The backend.
    Backend,
    /// wsgate itself (timeouts, limits, protocol errors, shutdown).
    Gateway,
}

impl Side {
    /// Lower-case name for logs and metric labels.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
            Side::Gateway => "gateway",
        }
    }
}

/// Why the gateway closed a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GatewayClose {
    /// No pong to a gateway ping within `pong_timeout`.
    PingTimeout,
    /// No data frame within `idle_timeout`.
    Idle,
    /// Older than `max_lifetime`.
    Lifetime,
    /// The process is draining.
    Shutdown,
    /// Its backend went down or is being drained: the client should reconnect elsewhere.
    Restart,
    /// An operator closed it with this code and reason.
    Operator { code: u16, reason: Box<str> },
    /// The client broke RFC 6455 or the frame size limit.
    ClientViolation(Violation),
    /// The client broke one of its route's limits.
    Policy(Limit),
    /// The credential the tunnel was opened with expired; the client gets this code.
    Expired(u16),
    /// The backend broke RFC 6455.
    BackendViolation(Violation),
    /// The client's connection failed; only the backend can be told.
    ClientGone,
    /// The backend's connection failed; only the client can be told.
    BackendGone,
}

impl GatewayClose {
    /// Code and reason sent to the client.
    pub(crate) fn client_close(&self) -> (u16, Cow<'static, str>) {
        let s = |code, r: &'static str| (code, Cow::Borrowed(r));
        match self {
            GatewayClose::PingTimeout => s(1001, "ping timeout"),
            GatewayClose::Idle => s(1001, "idle timeout"),
            GatewayClose::Lifetime => s(1001, "max lifetime"),
            GatewayClose::Shutdown => s(1001, "going away"),
            GatewayClose::Restart => s(1012, "service restart"),
            GatewayClose::Operator { code, reason } => (*code, Cow::Owned(reason.to_string())),
            GatewayClose::ClientViolation(v) => s(v.close_code(), v.reason()),
            GatewayClose::Policy(l) => s(l.close().0, l.close().1),
            GatewayClose::Expired(code) => s(*code, "token expired"),
            GatewayClose::BackendViolation(_) => s(1014, "bad gateway"),
            GatewayClose::ClientGone => s(1001, "client gone"),
            GatewayClose::BackendGone => s(1001, "backend gone"),
        }
    }

    /// Code and reason sent (masked) to the backend.
    pub(crate) fn backend_close(&self) -> (u16, Cow<'static, str>) {
        let s = |code, r: &'static str| (code, Cow::Borrowed(r));
        match self {
            GatewayClose::ClientViolation(v) => s(1001, v.client_reason()),
            GatewayClose::Policy(l) => s(1001, l.close().1),
            GatewayClose::Expired(_) => s(1001, "token expired"),
            GatewayClose::Restart => s(1001, "service restart"),
            GatewayClose::Operator { reason, .. } => (1001, Cow::Owned(reason.to_string())),
            GatewayClose::BackendViolation(v) => s(1002, v.reason()),
            other => other.client_close(),
        }
    }
}

/// What happened over a tunnel's life, for the closing log line and metrics.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    /// Everything relayed, gateway pings and their pongs included.
    pub(crate) traffic: Traffic,
    /// Who ended it.
    pub(crate) closed_by: Side,
    /// Close code of the first Close frame (the gateway's own when it closed).
    pub(crate) close_code: Option<u16>,
    /// Why it ended, in a few words.
    pub(crate) reason: String,
    /// Set when the gateway closed the tunnel.
    pub(crate) gateway_close: Option<GatewayClose>,
}

/// Running totals of a tunnel's traffic, reported live as deltas through a [`Tally`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Traffic {
    /// Client-to-backend bytes forwarded.
    pub(crate) bytes_up: u64,
    /// Backend-to-client bytes forwarded.
    pub(crate) bytes_down: u64,
    /// Client frames forwarded.
    pub(crate) frames_up: u64,
    /// Backend frames forwarded.
    pub(crate) frames_down: u64,
    /// Gateway pings sent.
    pub(crate) pings_sent: u64,
    /// Pongs to gateway pings received (and consumed).
    pub(crate) pongs_received: u64,
    /// Time the client was held back by its rate limits (holds that ended).
    pub(crate) throttled: Duration,
}

impl Traffic {
    fn since(&self, before: &Traffic) -> Traffic {
        Traffic {
            throttled: self.throttled - before.throttled,
            bytes_up: self.bytes_up - before.bytes_up,
            bytes_down: self.bytes_down - before.bytes_down,
            frames_up: self.frames_up - before.frames_up,
            frames_down: self.frames_down - before.frames_down,
            pings_sent: self.pings_sent - before.pings_sent,
            pongs_received: self.pongs_received - before.pongs_received,
        }
    }
}

/// Where a tunnel adds its traffic as it happens, so counters of long-lived tunnels move
/// while they are open instead of jumping when they close.
pub(crate) trait Tally {
    /// Adds what the tunnel relayed since its last report.
    fn add(&self, delta: &Traffic);
}

/// The two connections of a tunnel and the bytes each side sent past the handshake (relayed
/// first).
pub(crate) struct Peers<C, B> {
    pub(crate) client: C,
    pub(crate) client_prefix: Bytes,
    pub(crate) backend: B,
    pub(crate) backend_prefix: Bytes,
}

/// Relays both peers until both directions are done. Traffic goes to `tally` at the end of
/// every pass that moved something (a few relaxed atomic adds per wake-up).
#[cfg(test)]
pub(crate) async fn run<C, B, O, T>(
    peers: Peers<C, B>,
    settings: &Settings,
    orders: &O,
    tally: &T,
    tunnel_id: u64,
) -> Summary
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    O: Orders,
    T: Tally,
{
    let mut r = std::pin::pin!(Relaying::new(peers, settings, tunnel_id));
    std::future::poll_fn(|cx| r.as_mut().poll_relay(cx, orders, tally)).await
}

pin_project_lite::pin_project! {
    /// A tunnel's relay, to be polled by the tunnel's task: the relay state and its one timer
    /// and nothing else. An `async fn` would also keep its arguments next to the state they
    /// were moved into, about doubling what every idle tunnel holds.
    pub(crate) struct Relaying<C, B> {
        t: Relay<C, B>,
        #[pin]
        sleep: Sleep,
    }
}

impl<C, B> Relaying<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    pub(crate) fn new(peers: Peers<C, B>, settings: &Settings, tunnel_id: u64) -> Self {
        let now = Instant::now();
        let t = Relay {
            client: peers.client,
            backend: peers.backend,
            up: Dir::client(
                settings.max_frame_size,
                peers.client_prefix,
                settings.limits,
                now,
            ),
            down: Dir::new(Sender::Backend, 0, peers.backend_prefix),
            keep: Keep::new(settings, now, tunnel_id),
            phase: Phase::Open,
            scheduled: None,
            first_close: None,
            first_eof: None,
            handshake_deadline: None,
            reported: Traffic::default(),
        };
        let wake = t.next_wakeup(now);
        Relaying {
            t,
            sleep: tokio::time::sleep_until(wake),
        }
    }

    /// One wake-up: relays what can move, reports the traffic, and says whether it is over.
    pub(crate) fn poll_relay<O: Orders, T: Tally>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        orders: &O,
        tally: &T,
    ) -> Poll<Summary> {
        let this = self.project();
        let r = this.t.poll(cx, this.sleep, orders);
        let now = this.t.traffic();
        if now != this.t.reported {
            tally.add(&now.since(&this.t.reported));
            this.t.reported = now;
        }
        r.map(|()| this.t.summary())
    }
}

/// Where a tunnel is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Relaying; the peers may close it between themselves.
    Open,
    /// The gateway is closing: its Close frames go out at the next boundaries, then both
    /// sockets are shut and read until both peers answered or `deadline` passes.
    Closing {
        why: GatewayClose,
        deadline: Instant,
    },
}

struct Relay<C, B> {
    client: C,
    backend: B,
    /// Client to backend.
    up: Dir,
    /// Backend to client.
    down: Dir,
    keep: Keep,
    phase: Phase,
    /// The earliest order taken so far (a drain, a backend going down, an operator).
    scheduled: Option<Order>,
    /// Which side sent the first Close frame (while `Open`).
    first_close: Option<Side>,
    /// Which side's connection ended first without a Close frame.
    first_eof: Option<Side>,
    /// Both Close frames have passed; the peers have until then to close their sockets.
    handshake_deadline: Option<Instant>,
    /// Traffic already given to the tally.
    reported: Traffic,
}

impl<C, B> Relay<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn poll<O: Orders>(
        &mut self,
        cx: &mut Context<'_>,
        mut sleep: Pin<&mut Sleep>,
        orders: &O,
    ) -> Poll<()> {
        while let Poll::Ready(o) = orders.poll_order(cx) {
            if self.scheduled.as_ref().is_none_or(|s| o.at < s.at) {
                self.scheduled = Some(o);
            }
        }
        loop {
            let now = Instant::now();
            self.check_timers(now);
            let up = pump(
                &mut self.client,
                &mut self.backend,
                &mut self.up,
                &mut self.keep,
                now,
                cx,
            );
            let down = pump(
                &mut self.backend,
                &mut self.client,
                &mut self.down,
                &mut self.keep,
                now,
                cx,
            );
            let mut again = self.absorb(up, Side::Client, now);
            again |= self.absorb(down, Side::Backend, now);
            if self.first_eof.is_none() {
                if self.up.ended() {
                    self.first_eof = Some(Side::Client);
                } else if self.down.ended() {
                    self.first_eof = Some(Side::Backend);
                }
            }
            if self.phase == Phase::Open {
                let client_broke = self.down.sink_failed() || self.up.read_error();
                let backend_broke = self.up.sink_failed() || self.down.read_error();
                if (client_broke || backend_broke) && self.first_close.is_some() {
                    // A peer went away during the close handshake: nothing is left to say.
                    self.up.abandon();
                    self.down.abandon();
                } else if client_broke {
                    self.start_close(GatewayClose::ClientGone, now);
                    again = true;
                } else if backend_broke {
                    self.start_close(GatewayClose::BackendGone, now);
                    again = true;
                }
                if self.handshake_deadline.is_none()
                    && self.up.close_seen.is_some()
                    && self.down.close_seen.is_some()
                {
                    self.handshake_deadline = Some(now + CLOSE_WAIT);
                }
            }
            // Close frames go out where a closing direction reached a boundary.
            if self.up.inject_close() | self.down.inject_close() {
                again = true;
            }
            if self.finished(now) {
                return Poll::Ready(());
            }
            if again {
                continue;
            }
            // One clock read per pass: the pumps take microseconds, far below any timeout.
            let wake = self.next_wakeup(now);
            // A deadline that moved later (activity pushes the idle one) needs no re-arming:
            // an early wake-up just recomputes. Re-arming on every frame would cost a timer
            // wheel update per message.
            if wake < self.keep.armed || self.keep.armed <= now {
                self.keep.armed = wake;
                sleep.as_mut().reset(wake);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                continue;
            }
            return Poll::Pending;
        }
    }

    /// Takes in what one direction's pump found; true when the tunnel must run another pass.
    fn absorb(&mut self, found: Found, side: Side, now: Instant) -> bool {
        if found.activity {
            self.keep.last_activity = now;
        }
        if found.pong {
            self.keep.pong_deadline = None;
        }
        if found.close && self.first_close.is_none() {
            self.first_close = Some(side);
        }
        let why = match (found.violation, found.limit, side) {
            (Some(v), _, Side::Client) => GatewayClose::ClientViolation(v),
            (Some(v), _, _) => GatewayClose::BackendViolation(v),
            (None, Some(l), _) => GatewayClose::Policy(l),
            (None, None, _) => return false,
        };
        self.start_close(why, now);
        true
    }

    fn check_timers(&mut self, now: Instant) {
        if let Phase::Closing { .. } = self.phase {
            return;
        }
        if self.up.hold.is_some() {
            // A throttled client is not read, so its pongs cannot be seen: its pong deadline
            // waits, and the time held counts as activity.
            self.keep.last_activity = now;
            if let Some(d) = self.keep.pong_deadline {
                self.keep.pong_deadline = Some(d.max(now + self.keep.pong_timeout));
            }
        }
        if self.keep.pong_deadline.is_some_and(|d| now >= d) {
            self.start_close(GatewayClose::PingTimeout, now);
        } else if !self.keep.idle_timeout.is_zero()
            && now.duration_since(self.keep.last_activity) >= self.keep.idle_timeout
        {
            self.start_close(GatewayClose::Idle, now);
        } else if let Some((at, code)) = self.keep.expires
            && now >= at
        {
            self.start_close(GatewayClose::Expired(code), now);
        } else if self.keep.lifetime_end.is_some_and(|d| now >= d) {
            self.start_close(GatewayClose::Lifetime, now);
        } else if let Some(o) = &self.scheduled
            && now >= o.at
        {
            let why = match &o.why {
                Why::Shutdown => GatewayClose::Shutdown,
                Why::Restart => GatewayClose::Restart,
                Why::Operator { code, reason } => GatewayClose::Operator {
                    code: *code,
                    reason: reason.clone(),
                },
            };
            self.start_close(why, now);
        } else if let Some(p) = self.keep.next_ping
            && now >= p
            && self.down.tracker.at_boundary()
            && self.down.flow == Flow::Forwarding
            && !self.down.ended()
        {
            let token = self.keep.next_token();
            let ping = ControlFrame::new(OP_PING, &token, None);
            self.down.queue(ping.bytes());
            self.keep.next_ping = Some(now + self.keep.ping_interval);
            if self.keep.pong_deadline.is_none() {
                self.keep.pong_deadline = Some(now + self.keep.pong_timeout);
            }
        }
        // An idle tunnel gives its write buffers back.
        if now.duration_since(self.keep.last_activity) >= Duration::from_secs(1) {
            self.up.release_buffer();
            self.down.release_buffer();
        }
    }

    fn start_close(&mut self, why: GatewayClose, now: Instant) {
        if let Phase::Closing { .. } = self.phase {
            return;
        }
        let (cc, cr) = why.client_close();
        let (bc, br) = why.backend_close();
        let client_gone = why == GatewayClose::ClientGone;
        let backend_gone = why == GatewayClose::BackendGone;
        self.phase = Phase::Closing {
            why,
            deadline: now + CLOSE_WAIT,
        };
        // Closing ends throttling: what the client sent is read (and discarded) again, so its
        // answering Close is seen.
        self.up.release_hold(now);
        // Frames to the client are unmasked; frames to the backend are masked since wsgate is
        // its client.
        if !client_gone && !self.down.sink_failed() {
            self.down.flow = Flow::Closing(CloseSpec {
                code: cc,
                reason: cr,
                mask: None,
            });
        } else {
            self.down.stop();
        }
        if !backend_gone && !self.up.sink_failed() {
            self.up.flow = Flow::Closing(CloseSpec {
                code: bc,
                reason: br,
                mask: Some(mask_key()),
            });
        } else {
            self.up.stop();
        }
    }

    fn finished(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Open => {
                (self.up.done() && self.down.done())
                    || self.handshake_deadline.is_some_and(|d| now >= d)
            }
            Phase::Closing { deadline, .. } => {
                // A peer is done when it answered with its Close or hung up; the gateway then
                // closes the TCP connection itself, as the server side of a close should.
                let answered = |d: &Dir| d.ended() || d.close_seen.is_some();
                (self.up.drained()
                    && self.down.drained()
                    && answered(&self.up)
                    && answered(&self.down))
                    || now >= deadline
            }
        }
    }

    fn next_wakeup(&self, now: Instant) -> Instant {
        let far = now + Duration::from_secs(3600);
        let mut t = far;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = t.min(x);
            }
        };
        match self.phase {
            Phase::Closing { deadline, .. } => consider(Some(deadline)),
            Phase::Open => {
                consider(self.up.hold.map(|h| h.until));
                consider(self.keep.pong_deadline);
                // A ping already due waits for a frame boundary, which only traffic brings:
                // no timer for it, or the timer would fire in a loop.
                consider(self.keep.next_ping.filter(|p| *p > now));
                consider(self.keep.lifetime_end);
                consider(self.keep.expires.map(|(at, _)| at));
                consider(self.scheduled.as_ref().map(|o| o.at));
                consider(self.handshake_deadline);
                if !self.keep.idle_timeout.is_zero() {
                    consider(Some(self.keep.last_activity + self.keep.idle_timeout));
                }
                if self.up.holds_buffer() || self.down.holds_buffer() {
                    consider(Some(self.keep.last_activity + Duration::from_secs(1)));
                }
            }
        }
        t.max(now)
    }

    fn traffic(&self) -> Traffic {
        Traffic {
            bytes_up: self.up.bytes,
            bytes_down: self.down.bytes,
            frames_up: self.up.frames,
            frames_down: self.down.frames,
            pings_sent: self.keep.pings_sent,
            pongs_received: self.keep.pongs,
            throttled: self.up.throttled,
        }
    }

    fn summary(&self) -> Summary {
        let (closed_by, code, reason, gateway_close) = match &self.phase {
            Phase::Closing { why, .. } => {
                let (c, r) = why.client_close();
                let reason = match why {
                    GatewayClose::BackendViolation(v) => {
                        format!("backend protocol error: {}", v.reason())
                    }
                    GatewayClose::ClientViolation(v) => {
                        format!("client protocol error: {}", v.reason())
                    }
                    GatewayClose::Policy(l) => format!("policy {}: {}", l.as_str(), r),
                    _ => r.into_owned(),
                };
                let code = (*why != GatewayClose::ClientGone).then_some(c);
                (Side::Gateway, code, reason, Some(why.clone()))
            }
            Phase::Open => match self.first_close {
                Some(Side::Client) => (
                    Side::Client,
                    self.up.close_seen,
                    "client sent close".to_string(),
                    None,
                ),
                Some(_) => (
                    Side::Backend,
                    self.down.close_seen,
                    "backend sent close".to_string(),
                    None,
                ),
                None => {
                    let side = self.first_eof.unwrap_or(Side::Backend);
                    let reason = match (side, self.up.read_error() || self.down.read_error()) {
                        (Side::Client, false) => "client closed connection",
                        (Side::Client, true) => "client connection reset",
                        (_, false) => "backend closed connection",
                        (_, true) => "backend connection reset",
                    };
                    (side, None, reason.to_string(), None)
                }
            },
        };
        Summary {
            traffic: self.traffic(),
            closed_by,
            close_code: code,
            reason,
            gateway_close,
        }
    }
}

/// A masking key for the gateway's own frames to the backend, from the operating system's
/// CSPRNG as RFC 6455 section 5.3 requires (closes are rare: one system call each is fine).
fn mask_key() -> [u8; 4] {
    static RNG: std::sync::LazyLock<&'static dyn rustls::crypto::SecureRandom> =
        std::sync::LazyLock::new(|| rustls::crypto::ring::default_provider().secure_random);
    let mut k = [0u8; 4];
    if RNG.fill(&mut k).is_err() {
        // The OS generator does not fail on Linux; should it, a clock-derived key still
        // differs per frame.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        k = t.to_be_bytes();
    }
    k
}

/// Fuzz entry: arbitrary bytes, cut into reads whose sizes come from the first byte, through
/// the pump's frame processing.
#[doc(hidden)]
pub fn fuzz_frames(data: &[u8]) {
    pump::fuzz(data);
}

#[cfg(test)]
mod tests;
