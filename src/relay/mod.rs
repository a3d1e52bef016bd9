//! The two-way pump of an established tunnel. Bytes pass unchanged and in order while a
//! [`frame::Tracker`] per direction follows frame boundaries; the gateway inserts its own pings
//! at boundaries of the backend-to-client stream, consumes the client's pongs to them, enforces
//! idle, lifetime and frame-size bounds, and every close it starts is a Close frame to both
//! peers. An idle tunnel owns no read buffer: reads land in a per-thread scratch buffer and only
//! what a slow peer has not accepted yet is kept.

pub mod frame;

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use frame::{ControlFrame, OP_CLOSE, OP_PING, OP_PONG, Sender, Tracker, Violation};

/// Room in front of each read for bytes carried over from the previous read.
const HEADROOM: usize = 64;
/// Size of the per-thread read buffer.
const SCRATCH: usize = 64 * 1024;
/// Longest carry: a partial header, or a whole candidate pong (header 6 + payload 8).
const CARRY: usize = 32;
/// Payload of gateway pings: a marker and a sequence number.
const TOKEN_LEN: usize = 8;
/// How long the gateway waits for close handshakes it started before dropping both sockets.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; HEADROOM + SCRATCH].into_boxed_slice());
}

/// The `[websocket]` settings a tunnel runs with (a snapshot taken when it opened).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Gateway ping period; zero disables.
    pub ping_interval: Duration,
    /// Time allowed for the pong.
    pub pong_timeout: Duration,
    /// Data-frame idleness bound; zero disables.
    pub idle_timeout: Duration,
    /// Largest payload a client frame may declare.
    pub max_frame_size: u64,
    /// Tunnel age bound; zero disables.
    pub max_lifetime: Duration,
}

impl From<&crate::config::WebSocket> for Settings {
    fn from(w: &crate::config::WebSocket) -> Self {
        Settings {
            ping_interval: w.ping_interval,
            pong_timeout: w.pong_timeout,
            idle_timeout: w.idle_timeout,
            max_frame_size: w.max_frame_size,
            max_lifetime: w.max_lifetime,
        }
    }
}

/// Who ended a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (Close frame, or its connection went away).
    Client,
    /// The backend.
    Backend,
    /// wsgate itself (timeouts, limits, protocol errors, shutdown).
    Gateway,
}

impl Side {
    /// Lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
            Side::Gateway => "gateway",
        }
    }
}

/// Why the gateway closed a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayClose {
    /// No pong to a gateway ping within `pong_timeout`.
    PingTimeout,
    /// No data frame within `idle_timeout`.
    Idle,
    /// Older than `max_lifetime`.
    Lifetime,
    /// The process is draining.
    Shutdown,
    /// The client broke RFC 6455 or the size limit.
    ClientViolation(Violation),
    /// The backend broke RFC 6455.
    BackendViolation(Violation),
    /// The client's connection failed; only the backend can be told.
    ClientGone,
    /// The backend's connection failed; only the client can be told.
    BackendGone,
}

impl GatewayClose {
    /// Code and reason sent to the client.
    pub fn client_close(self) -> (u16, &'static str) {
        match self {
            GatewayClose::PingTimeout => (1001, "ping timeout"),
            GatewayClose::Idle => (1001, "idle timeout"),
            GatewayClose::Lifetime => (1001, "max lifetime"),
            GatewayClose::Shutdown => (1001, "going away"),
            GatewayClose::ClientViolation(v) => (v.close_code(), v.reason()),
            GatewayClose::BackendViolation(_) => (1014, "bad gateway"),
            GatewayClose::ClientGone => (1001, "client gone"),
            GatewayClose::BackendGone => (1001, "backend gone"),
        }
    }

    /// Code and reason sent (masked) to the backend.
    pub fn backend_close(self) -> (u16, &'static str) {
        match self {
            GatewayClose::ClientViolation(v) => (1001, v.client_reason()),
            GatewayClose::BackendViolation(v) => (1002, v.reason()),
            other => other.client_close(),
        }
    }
}

/// What happened over a tunnel's life, for the closing log line and metrics.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Everything relayed, gateway pings and their pongs included.
    pub traffic: Traffic,
    /// Who ended it.
    pub closed_by: Side,
    /// Close code of the first Close frame (the gateway's own when it closed).
    pub close_code: Option<u16>,
    /// Why it ended, in a few words.
    pub reason: String,
    /// Set when the gateway closed the tunnel.
    pub gateway_close: Option<GatewayClose>,
}

/// Running totals of a tunnel's traffic, reported live as deltas through a [`Tally`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Client-to-backend bytes forwarded.
    pub bytes_up: u64,
    /// Backend-to-client bytes forwarded.
    pub bytes_down: u64,
    /// Client frames forwarded.
    pub frames_up: u64,
    /// Backend frames forwarded.
    pub frames_down: u64,
    /// Gateway pings sent.
    pub pings_sent: u64,
    /// Pongs to gateway pings received (and consumed).
    pub pongs_received: u64,
}

impl Traffic {
    fn since(&self, before: &Traffic) -> Traffic {
        Traffic {
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
pub trait Tally {
    /// Adds what the tunnel relayed since its last report.
    fn add(&self, delta: &Traffic);
}

/// Something that tells a tunnel when to close because the process is draining.
pub trait DrainSignal {
    /// Resolves when draining begins, with the instant this tunnel is to be closed.
    fn close_at(&self, tunnel_id: u64) -> impl Future<Output = Instant> + '_;
}

/// Relays `client` and `backend` until both directions are done. The prefixes are bytes read
/// past the handshake on each side; they are relayed first. Traffic goes to `tally` at the end
/// of every pass that moved something (a few relaxed atomic adds per wake-up).
#[allow(clippy::too_many_arguments)]
pub async fn run<C, B, D, T>(
    client: C,
    client_prefix: Bytes,
    backend: B,
    backend_prefix: Bytes,
    settings: &Settings,
    drain: &D,
    tally: &T,
    tunnel_id: u64,
) -> Summary
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    D: DrainSignal,
    T: Tally,
{
    let now = Instant::now();
    let mut t = Tunnel {
        client,
        backend,
        up: Dir::new(Sender::Client, settings.max_frame_size, client_prefix),
        down: Dir::new(Sender::Backend, 0, backend_prefix),
        keep: Keep::new(settings, now, tunnel_id),
        phase: Phase::Open,
        drain_at: None,
        first_close: None,
        first_eof: None,
        handshake_deadline: None,
        reported: Traffic::default(),
    };
    let mut sleep = pin!(tokio::time::sleep_until(t.next_wakeup(now)));
    let mut drain_fut = pin!(drain.close_at(tunnel_id));
    std::future::poll_fn(|cx| {
        let r = t.poll(cx, sleep.as_mut(), drain_fut.as_mut());
        let now = t.traffic();
        if now != t.reported {
            tally.add(&now.since(&t.reported));
            t.reported = now;
        }
        r
    })
    .await;
    t.summary()
}

/// State of one direction: the tracker, bytes carried over, and what the writer has not taken.
struct Dir {
    from: Sender,
    tracker: Tracker,
    /// Bytes at the end of the last read that do not yet form a whole header (or candidate pong).
    carry: [u8; CARRY],
    carry_len: usize,
    /// Bytes read but not yet accepted by the writer; empty and unallocated when idle.
    pending: Vec<u8>,
    pending_pos: usize,
    /// Handshake leftovers still to relay.
    prefix: Bytes,
    flush_needed: bool,
    /// The source ended (EOF or error); no more reads.
    eof: bool,
    read_error: bool,
    /// The destination's write side was shut down.
    shut: bool,
    /// Closing: once a read ends on a frame boundary, send `close_frame` and stop forwarding.
    /// Everything already read is relayed first, so nothing a peer sent before is lost.
    stop_at_boundary: bool,
    /// The gateway's Close for this direction's destination: code, reason, mask (the frame is
    /// only encoded when sent, so an open tunnel does not carry it).
    close_frame: Option<(u16, &'static str, Option<[u8; 4]>)>,
    /// Forwarding is over (close sent or destination gone); reads are discarded.
    stopped: bool,
    write_failed: bool,
    close_seen: Option<u16>,
    bytes: u64,
    frames: u64,
}

impl Dir {
    fn new(from: Sender, max: u64, prefix: Bytes) -> Self {
        Dir {
            from,
            tracker: Tracker::new(from, max),
            carry: [0; CARRY],
            carry_len: 0,
            pending: Vec::new(),
            pending_pos: 0,
            prefix,
            flush_needed: false,
            eof: false,
            read_error: false,
            shut: false,
            stop_at_boundary: false,
            close_frame: None,
            stopped: false,
            write_failed: false,
            close_seen: None,
            bytes: 0,
            frames: 0,
        }
    }

    /// Done: source finished and destination shut (or unusable).
    fn done(&self) -> bool {
        self.eof && (self.shut || self.write_failed)
    }

    fn queue(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }
}

/// Keepalive and timeout bookkeeping.
struct Keep {
    ping_interval: Duration,
    pong_timeout: Duration,
    idle_timeout: Duration,
    lifetime_end: Option<Instant>,
    last_activity: Instant,
    next_ping: Option<Instant>,
    pong_deadline: Option<Instant>,
    token: [u8; TOKEN_LEN],
    prev_token: Option<[u8; TOKEN_LEN]>,
    seq: u32,
    pings_sent: u64,
    pongs: u64,
    /// The wake-up the sleep is currently armed for.
    armed: Instant,
}

impl Keep {
    fn new(s: &Settings, now: Instant, id: u64) -> Self {
        let mut token = [b'w', b'g', 0, 0, 0, 0, 0, 0];
        token[2..4].copy_from_slice(&(id as u16).to_be_bytes());
        Keep {
            ping_interval: s.ping_interval,
            pong_timeout: s.pong_timeout,
            idle_timeout: s.idle_timeout,
            lifetime_end: (!s.max_lifetime.is_zero()).then(|| now + s.max_lifetime),
            last_activity: now,
            next_ping: (!s.ping_interval.is_zero()).then(|| now + s.ping_interval),
            pong_deadline: None,
            token,
            prev_token: None,
            seq: 0,
            pings_sent: 0,
            pongs: 0,
            armed: now,
        }
    }

    /// The token a client pong may carry, when a gateway ping awaits its pong.
    fn expected(&self) -> Option<([u8; TOKEN_LEN], Option<[u8; TOKEN_LEN]>)> {
        (self.pings_sent > 0).then_some((self.token, self.prev_token))
    }

    fn next_token(&mut self) -> [u8; TOKEN_LEN] {
        self.prev_token = (self.pings_sent > 0).then_some(self.token);
        self.seq = self.seq.wrapping_add(1);
        self.token[4..8].copy_from_slice(&self.seq.to_be_bytes());
        self.token
    }
}

enum Phase {
    Open,
    /// The gateway is closing: Close frames go out at the next boundaries, then both sockets
    /// are shut and drained until `deadline`.
    Closing {
        why: GatewayClose,
        deadline: Instant,
    },
}

struct Tunnel<C, B> {
    client: C,
    backend: B,
    up: Dir,
    down: Dir,
    keep: Keep,
    phase: Phase,
    drain_at: Option<Instant>,
    first_close: Option<Side>,
    /// Which side's connection ended first without a Close frame.
    first_eof: Option<Side>,
    /// Both Close frames have passed; the peers have this long to close their sockets.
    handshake_deadline: Option<Instant>,
    /// Traffic already given to the tally.
    reported: Traffic,
}

/// What the processing of one read found besides bytes to forward.
#[derive(Default)]
struct Found {
    violation: Option<Violation>,
    activity: bool,
    pong: bool,
    close: bool,
}

impl<C, B> Tunnel<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn poll<F: Future<Output = Instant>>(
        &mut self,
        cx: &mut Context<'_>,
        mut sleep: Pin<&mut Sleep>,
        drain: Pin<&mut F>,
    ) -> Poll<()> {
        if self.drain_at.is_none()
            && let Poll::Ready(at) = drain.poll(cx)
        {
            self.drain_at = Some(at);
        }
        loop {
            let now = Instant::now();
            self.check_timers(now);
            let up = pump(
                &mut self.client,
                &mut self.backend,
                &mut self.up,
                &mut self.keep,
                cx,
            );
            let down = pump(
                &mut self.backend,
                &mut self.client,
                &mut self.down,
                &mut self.keep,
                cx,
            );
            let mut again = false;
            for (found, side) in [(up, Side::Client), (down, Side::Backend)] {
                if found.activity {
                    self.keep.last_activity = now;
                }
                if found.pong {
                    self.keep.pong_deadline = None;
                }
                if found.close && self.first_close.is_none() {
                    self.first_close = Some(side);
                }
                if let Some(v) = found.violation {
                    let why = match side {
                        Side::Client => GatewayClose::ClientViolation(v),
                        _ => GatewayClose::BackendViolation(v),
                    };
                    self.start_close(why, now);
                    again = true;
                }
            }
            if self.first_eof.is_none() {
                if self.up.eof {
                    self.first_eof = Some(Side::Client);
                } else if self.down.eof {
                    self.first_eof = Some(Side::Backend);
                }
            }
            if let Phase::Open = self.phase {
                let client_broke = self.down.write_failed || self.up.read_error;
                let backend_broke = self.up.write_failed || self.down.read_error;
                if (client_broke || backend_broke) && self.first_close.is_some() {
                    // A peer went away during the close handshake: nothing is left to say.
                    self.abandon();
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
            if self.inject_frames() {
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

    fn check_timers(&mut self, now: Instant) {
        if let Phase::Closing { .. } = self.phase {
            return;
        }
        if self.keep.pong_deadline.is_some_and(|d| now >= d) {
            self.start_close(GatewayClose::PingTimeout, now);
        } else if !self.keep.idle_timeout.is_zero()
            && now.duration_since(self.keep.last_activity) >= self.keep.idle_timeout
        {
            self.start_close(GatewayClose::Idle, now);
        } else if self.keep.lifetime_end.is_some_and(|d| now >= d) {
            self.start_close(GatewayClose::Lifetime, now);
        } else if self.drain_at.is_some_and(|d| now >= d) {
            self.start_close(GatewayClose::Shutdown, now);
        } else if let Some(p) = self.keep.next_ping
            && now >= p
            && self.down.tracker.at_boundary()
            && !self.down.stopped
            && !self.down.eof
        {
            let token = self.keep.next_token();
            let ping = ControlFrame::new(OP_PING, &token, None);
            self.down.queue(ping.bytes());
            self.keep.pings_sent += 1;
            self.keep.next_ping = Some(now + self.keep.ping_interval);
            if self.keep.pong_deadline.is_none() {
                self.keep.pong_deadline = Some(now + self.keep.pong_timeout);
            }
        }
        // An idle tunnel gives its write buffers back.
        for d in [&mut self.up, &mut self.down] {
            if d.pending.is_empty()
                && d.pending.capacity() > 0
                && now.duration_since(self.keep.last_activity) >= Duration::from_secs(1)
            {
                d.pending = Vec::new();
            }
        }
    }

    fn start_close(&mut self, why: GatewayClose, now: Instant) {
        if let Phase::Closing { .. } = self.phase {
            return;
        }
        self.phase = Phase::Closing {
            why,
            deadline: now + CLOSE_WAIT,
        };
        let (cc, cr) = why.client_close();
        let (bc, br) = why.backend_close();
        // Client-side frames are unmasked; frames to the backend are masked since wsgate is its client.
        if why != GatewayClose::ClientGone && !self.down.write_failed {
            self.down.close_frame = Some((cc, cr, None));
        } else {
            self.down.stopped = true;
        }
        if why != GatewayClose::BackendGone && !self.up.write_failed {
            let mask = mask_key(self.keep.seq, self.up.bytes);
            self.up.close_frame = Some((bc, br, Some(mask)));
        } else {
            self.up.stopped = true;
        }
        self.up.stop_at_boundary = true;
        self.down.stop_at_boundary = true;
    }

    /// Queues the gateway's Close frames where a direction has reached a boundary.
    fn inject_frames(&mut self) -> bool {
        let mut queued = false;
        for d in [&mut self.up, &mut self.down] {
            if d.stop_at_boundary && !d.stopped && d.tracker.at_boundary() {
                if let Some((code, reason, mask)) = d.close_frame.take() {
                    d.queue(ControlFrame::close(code, reason, mask).bytes());
                    queued = true;
                }
                d.stopped = true;
            }
        }
        queued
    }

    /// Stops both directions without further frames.
    fn abandon(&mut self) {
        for d in [&mut self.up, &mut self.down] {
            d.eof = true;
            d.stopped = true;
        }
    }

    fn finished(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Open => {
                (self.up.done() && self.down.done())
                    || self.handshake_deadline.is_some_and(|d| now >= d)
            }
            Phase::Closing { deadline, .. } => {
                let sent = |d: &Dir| {
                    d.stopped && d.pending_pos >= d.pending.len() && (d.shut || d.write_failed)
                };
                // A peer is done when it answered with its Close or hung up; the gateway then
                // closes the TCP connection itself, as the server side of a close should.
                let answered = |d: &Dir| d.eof || d.close_seen.is_some();
                (sent(&self.up) && sent(&self.down) && answered(&self.up) && answered(&self.down))
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
                consider(self.keep.pong_deadline);
                // A ping already due waits for a frame boundary, which only traffic brings:
                // no timer for it, or the timer would fire in a loop.
                consider(self.keep.next_ping.filter(|p| *p > now));
                consider(self.keep.lifetime_end);
                consider(self.drain_at);
                consider(self.handshake_deadline);
                if !self.keep.idle_timeout.is_zero() {
                    consider(Some(self.keep.last_activity + self.keep.idle_timeout));
                }
                let releasable = |d: &Dir| d.pending.is_empty() && d.pending.capacity() > 0;
                if releasable(&self.up) || releasable(&self.down) {
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
        }
    }

    fn summary(&self) -> Summary {
        let (closed_by, code, reason, gateway_close) = match self.phase {
            Phase::Closing { why, .. } => {
                let (c, r) = why.client_close();
                let reason = match why {
                    GatewayClose::BackendViolation(v) => {
                        format!("backend protocol error: {}", v.reason())
                    }
                    GatewayClose::ClientViolation(v) => {
                        format!("client protocol error: {}", v.reason())
                    }
                    _ => r.to_string(),
                };
                let code = (why != GatewayClose::ClientGone).then_some(c);
                (Side::Gateway, code, reason, Some(why))
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
                    let reason = match (side, self.up.read_error || self.down.read_error) {
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

/// A mask key for the gateway's own frames to the backend. RFC 6455 asks for unpredictable
/// keys to defeat cache poisoning by scripts; the gateway's frames carry no script content, so
/// mixing a few counters is enough here.
fn mask_key(a: u32, b: u64) -> [u8; 4] {
    let x = (a as u64 ^ b.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 32) as u32).to_be_bytes()
}

/// Moves what it can from `src` to `dst` for one direction and reports what it saw.
fn pump<S, D>(src: &mut S, dst: &mut D, d: &mut Dir, keep: &mut Keep, cx: &mut Context<'_>) -> Found
where
    S: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    let mut found = Found::default();
    loop {
        // Writer first: nothing new is read while the destination has not taken the last read.
        if !d.write_failed {
            while d.pending_pos < d.pending.len() {
                match Pin::new(&mut *dst).poll_write(cx, &d.pending[d.pending_pos..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        d.pending_pos += n;
                        d.flush_needed = true;
                    }
                    Poll::Ready(_) => {
                        d.write_failed = true;
                        break;
                    }
                    Poll::Pending => return found,
                }
            }
            if d.flush_needed && !d.write_failed {
                match Pin::new(&mut *dst).poll_flush(cx) {
                    Poll::Ready(Ok(())) => d.flush_needed = false,
                    Poll::Ready(Err(_)) => d.write_failed = true,
                    Poll::Pending => return found,
                }
            }
        }
        d.pending.clear();
        d.pending_pos = 0;
        if d.close_frame.is_some() && (d.tracker.at_boundary() || d.eof) {
            // The tunnel queues the Close frame (or gives up on it at its deadline).
            return found;
        }
        if d.close_frame.is_none() && (d.eof || d.stopped) && !d.shut && !d.write_failed {
            match Pin::new(&mut *dst).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => d.shut = true,
                Poll::Ready(Err(_)) => d.write_failed = true,
                Poll::Pending => return found,
            }
        }
        if d.eof {
            return found;
        }
        let step = SCRATCH_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            let n = if !d.prefix.is_empty() {
                let n = d.prefix.len().min(SCRATCH);
                buf[HEADROOM..HEADROOM + n].copy_from_slice(&d.prefix[..n]);
                if n == d.prefix.len() {
                    // An emptied Bytes would still pin the handshake's read buffer.
                    d.prefix = Bytes::new();
                } else {
                    let _ = d.prefix.split_to(n);
                }
                n
            } else {
                let mut rb = ReadBuf::new(&mut buf[HEADROOM..]);
                match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                    Poll::Pending => return None,
                    Poll::Ready(Ok(())) => rb.filled().len(),
                    Poll::Ready(Err(e)) => {
                        d.read_error = !matches!(e.kind(), io::ErrorKind::UnexpectedEof);
                        0
                    }
                }
            };
            if n == 0 {
                d.eof = true;
                // A truncated trailing header is relayed as it is.
                let c = d.carry_len;
                if c > 0 && !d.stopped {
                    let carry = d.carry;
                    d.queue(&carry[..c]);
                    d.carry_len = 0;
                }
                return Some(());
            }
            let start = HEADROOM - d.carry_len;
            buf[start..HEADROOM].copy_from_slice(&d.carry[..d.carry_len]);
            d.carry_len = 0;
            let frames_before = d.frames;
            let (out_end, f) = process(d, &mut buf, start, HEADROOM + n, keep);
            if d.stopped {
                d.frames = frames_before;
                // After the gateway's Close nothing more is relayed; the frames are still
                // followed so the peer's answering Close is seen.
                if f.violation.is_some() {
                    d.eof = true;
                }
                return Some(());
            }
            found.activity |= f.activity;
            found.pong |= f.pong;
            found.close |= f.close;
            found.violation = found.violation.or(f.violation);
            let mut out = &buf[start..out_end];
            d.bytes += out.len() as u64;
            while !out.is_empty() && !d.write_failed {
                match Pin::new(&mut *dst).poll_write(cx, out) {
                    Poll::Ready(Ok(w)) if w > 0 => {
                        out = &out[w..];
                        d.flush_needed = true;
                    }
                    Poll::Ready(_) => d.write_failed = true,
                    Poll::Pending => break,
                }
            }
            if !out.is_empty() && !d.write_failed {
                d.pending.extend_from_slice(out);
            }
            Some(())
        });
        if step.is_none() || found.violation.is_some() {
            return found;
        }
    }
}

/// Walks the frames in `buf[start..end]`, compacting in place what is to be forwarded, and
/// returns the end of the forwarded bytes (they start at `start`).
fn process(
    d: &mut Dir,
    buf: &mut [u8],
    start: usize,
    end: usize,
    keep: &mut Keep,
) -> (usize, Found) {
    let mut found = Found::default();
    let (mut r, mut w) = (start, start);
    while r < end {
        if !d.tracker.at_boundary() {
            found.activity |= d.tracker.in_data_payload();
            let k = d.tracker.take_payload(end - r);
            if w != r {
                buf.copy_within(r..r + k, w);
            }
            r += k;
            w += k;
            continue;
        }
        let Some(h) = frame::parse_header(&buf[r..end]) else {
            let rest = end - r;
            d.carry[..rest].copy_from_slice(&buf[r..end]);
            d.carry_len = rest;
            break;
        };
        if d.from == Sender::Client
            && h.opcode == OP_PONG
            && h.fin
            && h.len == TOKEN_LEN as u64
            && let (Some(mask), Some((tok, prev))) = (h.mask, keep.expected())
        {
            let total = h.header_len + TOKEN_LEN;
            if end - r < total {
                let rest = end - r;
                d.carry[..rest].copy_from_slice(&buf[r..end]);
                d.carry_len = rest;
                break;
            }
            let mut p = [0u8; TOKEN_LEN];
            p.copy_from_slice(&buf[r + h.header_len..r + total]);
            frame::apply_mask(&mut p, mask, 0);
            if p == tok || Some(p) == prev {
                // The pong answers the gateway's ping: consumed, not forwarded.
                keep.pongs += 1;
                found.pong = p == tok;
                r += total;
                continue;
            }
        }
        if let Err(v) = d.tracker.begin(&h) {
            found.violation = Some(v);
            return (w, found);
        }
        d.frames += 1;
        found.activity |= h.is_data();
        if h.opcode == OP_CLOSE {
            found.close = true;
            let code_at = r + h.header_len;
            d.close_seen = Some(if h.len >= 2 && code_at + 2 <= end {
                let mut c = [buf[code_at], buf[code_at + 1]];
                if let Some(m) = h.mask {
                    frame::apply_mask(&mut c, m, 0);
                }
                u16::from_be_bytes(c)
            } else {
                1005
            });
        }
        if w != r {
            buf.copy_within(r..r + h.header_len, w);
        }
        r += h.header_len;
        w += h.header_len;
    }
    (w, found)
}

/// Fuzz entry: walks `data` through the frame processing exactly as the pump does, in reads
/// whose sizes come from the first byte, checking that forwarded bytes never outgrow the input.
#[doc(hidden)]
pub fn fuzz_frames(data: &[u8]) {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    let from = if sel & 1 == 0 {
        Sender::Client
    } else {
        Sender::Backend
    };
    let step = 1 + (sel >> 1) as usize;
    let settings = Settings {
        ping_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_secs(1),
        idle_timeout: Duration::ZERO,
        max_frame_size: 1 << 16,
        max_lifetime: Duration::ZERO,
    };
    let mut keep = Keep::new(&settings, Instant::now(), 7);
    // Pretend a gateway ping is out, so candidate pongs are examined too.
    keep.next_token();
    keep.pings_sent = 1;
    let mut d = Dir::new(from, settings.max_frame_size, Bytes::new());
    let mut buf = vec![0u8; HEADROOM + SCRATCH];
    let mut forwarded = 0usize;
    for chunk in data.chunks(step) {
        let start = HEADROOM - d.carry_len;
        buf[start..HEADROOM].copy_from_slice(&d.carry[..d.carry_len]);
        d.carry_len = 0;
        buf[HEADROOM..HEADROOM + chunk.len()].copy_from_slice(chunk);
        let (end, found) = process(&mut d, &mut buf, start, HEADROOM + chunk.len(), &mut keep);
        assert!(end >= start && end <= HEADROOM + chunk.len());
        forwarded += end - start;
        assert!(d.carry_len <= CARRY);
        if found.violation.is_some() {
            break;
        }
    }
    assert!(forwarded <= data.len());
}

#[cfg(test)]
mod tests;
