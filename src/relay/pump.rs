//! One direction of a tunnel: the bytes read from one peer, walked frame by frame by the
//! [`Tracker`] and written to the other peer unchanged, with only what the destination has not
//! accepted yet kept in a buffer. Reads land in a per-thread scratch buffer, so an idle
//! direction owns no read buffer; the few bytes of a header cut by a read are carried over.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use tokio::time::Instant;

use super::frame::{self, OP_CLOSE, OP_PONG, Sender, Tracker, Violation};
use super::keep::{Keep, TOKEN_LEN};
use super::policy::{Limit, Limits, Policy, Verdict};

/// Room in front of each read for bytes carried over from the previous read.
pub(super) const HEADROOM: usize = 64;
/// Size of the per-thread read buffer.
pub(super) const SCRATCH: usize = 64 * 1024;
/// Longest carry: a partial header, or a whole candidate pong (header 6 + payload 8).
pub(super) const CARRY: usize = 32;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; HEADROOM + SCRATCH].into_boxed_slice());
}

/// A Close frame the gateway sends: code, reason, and the mask for frames to the backend. It is
/// encoded only when sent, so an open tunnel does not carry the encoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CloseSpec {
    pub(super) code: u16,
    pub(super) reason: std::borrow::Cow<'static, str>,
    pub(super) mask: Option<[u8; 4]>,
}

/// The reading end of a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Open,
    /// EOF, or a read error (`error`); nothing more is read.
    Ended {
        error: bool,
    },
}

/// What happens to the frames read from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Flow {
    /// Frames pass.
    Forwarding,
    /// The gateway is closing: frames pass up to the next boundary, where the tunnel queues
    /// this Close and the flow becomes `Stopped`. Everything already read before is relayed.
    Closing(CloseSpec),
    /// Nothing more is forwarded; frames are still tracked, so the peer's answering Close is
    /// seen.
    Stopped,
}

/// The writing end of a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sink {
    /// Writable; `unflushed` when bytes were written since the last flush.
    Open { unflushed: bool },
    /// Shut down after the source ended or the flow stopped.
    Shut,
    /// A write, flush or shutdown failed: the destination is gone.
    Failed,
}

/// A client direction held back by its rate policy: nothing is read before `until`; the frame
/// that found the bucket empty, and everything after it, waits in the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hold {
    pub(super) until: Instant,
    since: Instant,
}

/// State of one direction.
///
/// Legal combinations: `Flow::Closing` only while `Sink::Open` (a failed sink stops the flow at
/// once); `Sink::Shut` only once the source ended or the flow stopped and nothing is pending;
/// `hold` only while `Flow::Forwarding` (a closing tunnel stops throttling).
pub(super) struct Dir {
    pub(super) from: Sender,
    pub(super) tracker: Tracker,
    /// Bytes at the end of the last read that do not yet form a whole header (or candidate
    /// pong); at most `CARRY`.
    carry: [u8; CARRY],
    carry_len: usize,
    /// Bytes the destination has not accepted yet; empty and unallocated when idle.
    pub(super) pending: Vec<u8>,
    pending_pos: usize,
    /// Input not processed yet, taken before any new read: handshake leftovers, and what a
    /// hold kept back.
    backlog: Bytes,
    /// The client's limits (`None` for the backend's direction and when every limit is off, so
    /// a tunnel without policies pays nothing for them).
    policy: Option<Box<Policy>>,
    pub(super) hold: Option<Hold>,
    /// Time spent held so far (holds that ended).
    pub(super) throttled: std::time::Duration,
    pub(super) source: Source,
    pub(super) flow: Flow,
    pub(super) sink: Sink,
    /// The code of the Close frame this direction's sender sent (1005 when it had none).
    pub(super) close_seen: Option<u16>,
    /// Bytes forwarded (frame headers included).
    pub(super) bytes: u64,
    /// Frames forwarded.
    pub(super) frames: u64,
}

/// What the processing of one read found besides bytes to forward.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Found {
    pub(super) violation: Option<Violation>,
    /// A data frame passed (idle timeout activity).
    pub(super) activity: bool,
    /// A pong to the gateway's latest ping.
    pub(super) pong: bool,
    /// A Close frame passed.
    pub(super) close: bool,
    /// A limit the client broke; the frame that broke it was not forwarded.
    pub(super) limit: Option<Limit>,
}

impl Found {
    fn merge(&mut self, f: Found) {
        self.activity |= f.activity;
        self.pong |= f.pong;
        self.close |= f.close;
        self.violation = self.violation.or(f.violation);
        self.limit = self.limit.or(f.limit);
    }

    /// The tunnel must close.
    pub(super) fn stops(&self) -> bool {
        self.violation.is_some() || self.limit.is_some()
    }
}

impl Dir {
    pub(super) fn new(from: Sender, max_frame: u64, backlog: Bytes) -> Self {
        Self::with_policy(from, max_frame, backlog, None)
    }

    /// The client's direction, with its limits.
    pub(super) fn client(max_frame: u64, backlog: Bytes, limits: Limits, now: Instant) -> Self {
        let policy = (!limits.is_off()).then(|| Box::new(Policy::new(limits, now)));
        Self::with_policy(Sender::Client, max_frame, backlog, policy)
    }

    fn with_policy(
        from: Sender,
        max_frame: u64,
        backlog: Bytes,
        policy: Option<Box<Policy>>,
    ) -> Self {
        Dir {
            from,
            tracker: Tracker::new(from, max_frame),
            carry: [0; CARRY],
            carry_len: 0,
            pending: Vec::new(),
            pending_pos: 0,
            backlog,
            policy,
            hold: None,
            throttled: std::time::Duration::ZERO,
            source: Source::Open,
            flow: Flow::Forwarding,
            sink: Sink::Open { unflushed: false },
            close_seen: None,
            bytes: 0,
            frames: 0,
        }
    }

    pub(super) fn ended(&self) -> bool {
        matches!(self.source, Source::Ended { .. })
    }

    pub(super) fn read_error(&self) -> bool {
        self.source == Source::Ended { error: true }
    }

    pub(super) fn sink_failed(&self) -> bool {
        self.sink == Sink::Failed
    }

    /// Done: source finished and destination shut (or unusable).
    pub(super) fn done(&self) -> bool {
        self.ended() && !matches!(self.sink, Sink::Open { .. })
    }

    /// Nothing left to write, and the destination closed one way or the other.
    pub(super) fn drained(&self) -> bool {
        self.flow == Flow::Stopped
            && self.pending_pos >= self.pending.len()
            && !matches!(self.sink, Sink::Open { .. })
    }

    pub(super) fn queue(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Gives the write buffer back when it has been empty for a while.
    pub(super) fn release_buffer(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = Vec::new();
        }
    }

    pub(super) fn holds_buffer(&self) -> bool {
        self.pending.is_empty() && self.pending.capacity() > 0
    }

    /// Stops the flow now, without a Close frame (the destination cannot take one).
    pub(super) fn stop(&mut self) {
        self.flow = Flow::Stopped;
    }

    /// Ends a hold: reading resumes with the backlog.
    pub(super) fn release_hold(&mut self, now: Instant) {
        if let Some(h) = self.hold.take() {
            self.throttled += now.saturating_duration_since(h.since);
        }
    }

    /// Keeps `rest` (from the held frame's header on) in front of the backlog.
    fn hold_back(&mut self, rest: &[u8], until: Instant, now: Instant) {
        let mut v = Vec::with_capacity(rest.len() + self.backlog.len());
        v.extend_from_slice(rest);
        v.extend_from_slice(&self.backlog);
        self.backlog = Bytes::from(v);
        let since = self.hold.map_or(now, |h| h.since);
        self.hold = Some(Hold { until, since });
    }

    /// Stops reading and forwarding altogether (a peer vanished during the close handshake).
    pub(super) fn abandon(&mut self) {
        if !self.ended() {
            self.source = Source::Ended { error: false };
        }
        self.flow = Flow::Stopped;
    }

    /// At a boundary of a closing flow, queues its Close and stops; true when one was queued.
    pub(super) fn inject_close(&mut self) -> bool {
        if let Flow::Closing(c) = &self.flow
            && self.tracker.at_boundary()
        {
            let f = frame::ControlFrame::close(c.code, &c.reason, c.mask);
            self.queue(f.bytes());
            self.flow = Flow::Stopped;
            return true;
        }
        false
    }

    /// Takes the bytes of one read at `buf[HEADROOM..HEADROOM + n]` (the carry is put in front
    /// of them): walks them, compacts what is to be forwarded in place and returns its range.
    /// The pump and the fuzz target both feed reads through here.
    pub(super) fn ingest(
        &mut self,
        buf: &mut [u8],
        n: usize,
        keep: &mut Keep,
        now: Instant,
    ) -> (std::ops::Range<usize>, Found) {
        let start = HEADROOM - self.carry_len;
        buf[start..HEADROOM].copy_from_slice(&self.carry[..self.carry_len]);
        self.carry_len = 0;
        let frames_before = self.frames;
        let (end, found) = self.process(buf, start, HEADROOM + n, keep, now);
        if self.flow == Flow::Stopped {
            // After the gateway's Close nothing more is relayed.
            self.frames = frames_before;
            if found.violation.is_some() {
                self.source = Source::Ended { error: false };
            }
            return (start..start, Found::default());
        }
        self.bytes += (end - start) as u64;
        (start..end, found)
    }

    /// Walks the frames in `buf[start..end]`, compacting in place what is to be forwarded, and
    /// returns the end of the forwarded bytes (they start at `start`).
    fn process(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        keep: &mut Keep,
        now: Instant,
    ) -> (usize, Found) {
        let mut found = Found::default();
        let (mut r, mut w) = (start, start);
        while r < end {
            if !self.tracker.at_boundary() {
                found.activity |= self.tracker.in_data_payload();
                let k = self.tracker.take_payload(end - r);
                if w != r {
                    buf.copy_within(r..r + k, w);
                }
                r += k;
                w += k;
                continue;
            }
            let Some(h) = frame::parse_header(&buf[r..end]) else {
                self.save_carry(&buf[r..end]);
                break;
            };
            if self.from == Sender::Client
                && h.opcode == OP_PONG
                && h.fin
                && h.len == TOKEN_LEN as u64
                && let (Some(mask), Some((tok, prev))) = (h.mask, keep.expected())
            {
                let total = h.header_len + TOKEN_LEN;
                if end - r < total {
                    self.save_carry(&buf[r..end]);
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
            if let Err(v) = self.tracker.check(&h) {
                found.violation = Some(v);
                return (w, found);
            }
            if let Some(p) = &mut self.policy
                && self.flow == Flow::Forwarding
            {
                match p.judge(&h, now) {
                    Verdict::Pass => {}
                    Verdict::Hold(until) => {
                        // Nothing from this frame on is forwarded or read past until then.
                        let rest = buf[r..end].to_vec();
                        self.hold_back(&rest, until, now);
                        return (w, found);
                    }
                    Verdict::Close(limit) => {
                        found.limit = Some(limit);
                        return (w, found);
                    }
                }
            }
            self.tracker.start(&h);
            self.frames += 1;
            found.activity |= h.is_data();
            if h.opcode == OP_CLOSE {
                found.close = true;
                let code_at = r + h.header_len;
                self.close_seen = Some(if h.len >= 2 && code_at + 2 <= end {
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

    fn save_carry(&mut self, rest: &[u8]) {
        // A header is at most 14 bytes and a candidate pong 14: the carry always fits.
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
    }

    /// At the source's end, a truncated trailing header is relayed as it is.
    fn flush_carry(&mut self) {
        let c = self.carry_len;
        if c > 0 && self.flow != Flow::Stopped {
            let carry = self.carry;
            self.queue(&carry[..c]);
            self.carry_len = 0;
        }
    }

    fn mark_written(&mut self) {
        if let Sink::Open { .. } = self.sink {
            self.sink = Sink::Open { unflushed: true };
        }
    }

    /// Writes what is pending; `Pending` while the destination is backed up.
    fn poll_pending<D: AsyncWrite + Unpin>(
        &mut self,
        dst: &mut D,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        if let Sink::Open { .. } = self.sink {
            while self.pending_pos < self.pending.len() {
                match Pin::new(&mut *dst).poll_write(cx, &self.pending[self.pending_pos..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.pending_pos += n;
                        self.mark_written();
                    }
                    Poll::Ready(_) => {
                        self.sink = Sink::Failed;
                        break;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.sink == (Sink::Open { unflushed: true }) {
                match Pin::new(&mut *dst).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.sink = Sink::Open { unflushed: false },
                    Poll::Ready(Err(_)) => self.sink = Sink::Failed,
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        self.pending.clear();
        self.pending_pos = 0;
        Poll::Ready(())
    }
}

/// Moves what it can from `src` to `dst` for one direction and reports what it saw.
pub(super) fn pump<S, D>(
    src: &mut S,
    dst: &mut D,
    d: &mut Dir,
    keep: &mut Keep,
    now: Instant,
    cx: &mut Context<'_>,
) -> Found
where
    S: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    let mut found = Found::default();
    loop {
        // Writer first: nothing new is read while the destination has not taken the last read.
        if d.poll_pending(dst, cx).is_pending() {
            return found;
        }
        if matches!(d.flow, Flow::Closing(_)) && (d.tracker.at_boundary() || d.ended()) {
            // The tunnel queues the Close frame (or gives up on it at its deadline).
            return found;
        }
        let finished = d.ended() || d.flow == Flow::Stopped;
        // A source that broke (a reset, an HTTP/2 stream reset) while frames still flowed is
        // not passed on as an end: the tunnel answers it this pass by closing the other side
        // with a Close frame (1001), which a shut socket could no longer carry.
        // Only at a frame boundary, where a Close can go in at once: mid-frame, the end is
        // passed on as before rather than held until the close deadline.
        let broke_open = d.read_error() && d.flow == Flow::Forwarding && d.tracker.at_boundary();
        if finished
            && !broke_open
            && !matches!(d.flow, Flow::Closing(_))
            && matches!(d.sink, Sink::Open { .. })
        {
            match Pin::new(&mut *dst).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => d.sink = Sink::Shut,
                Poll::Ready(Err(_)) => d.sink = Sink::Failed,
                Poll::Pending => return found,
            }
        }
        if d.ended() {
            return found;
        }
        if let Some(h) = d.hold {
            if now < h.until {
                // Throttled: the client is not read, so TCP backpressure slows it down.
                return found;
            }
            d.release_hold(now);
        }
        let step = SCRATCH_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            let n = if !d.backlog.is_empty() {
                let n = d.backlog.len().min(SCRATCH);
                buf[HEADROOM..HEADROOM + n].copy_from_slice(&d.backlog[..n]);
                if n == d.backlog.len() {
                    // An emptied Bytes would still pin the handshake's read buffer.
                    d.backlog = Bytes::new();
                } else {
                    let _ = d.backlog.split_to(n);
                }
                n
            } else {
                let mut rb = ReadBuf::new(&mut buf[HEADROOM..]);
                match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                    Poll::Pending => return None,
                    Poll::Ready(Ok(())) => rb.filled().len(),
                    Poll::Ready(Err(e)) => {
                        d.source = Source::Ended {
                            error: !matches!(e.kind(), io::ErrorKind::UnexpectedEof),
                        };
                        0
                    }
                }
            };
            if n == 0 {
                if !d.ended() {
                    d.source = Source::Ended { error: false };
                }
                d.flush_carry();
                return Some(());
            }
            let (range, f) = d.ingest(&mut buf, n, keep, now);
            found.merge(f);
            let mut out = &buf[range];
            while !out.is_empty() && matches!(d.sink, Sink::Open { .. }) {
                match Pin::new(&mut *dst).poll_write(cx, out) {
                    Poll::Ready(Ok(w)) if w > 0 => {
                        out = &out[w..];
                        d.mark_written();
                    }
                    Poll::Ready(_) => d.sink = Sink::Failed,
                    Poll::Pending => break,
                }
            }
            if !out.is_empty() && matches!(d.sink, Sink::Open { .. }) {
                d.pending.extend_from_slice(out);
            }
            Some(())
        });
        if step.is_none() || found.stops() {
            return found;
        }
    }
}

/// Fuzz entry: walks `data` through [`Dir::ingest`], the pump's own processing, in reads whose
/// sizes come from the first byte, checking that forwarded bytes never outgrow the input.
pub(super) fn fuzz(data: &[u8]) {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    let from = if sel & 1 == 0 {
        Sender::Client
    } else {
        Sender::Backend
    };
    let step = 1 + (sel >> 1) as usize;
    let settings = super::Settings {
        ping_interval: std::time::Duration::from_secs(1),
        pong_timeout: std::time::Duration::from_secs(1),
        idle_timeout: std::time::Duration::ZERO,
        max_frame_size: 1 << 16,
        max_lifetime: std::time::Duration::ZERO,
        max_lifetime_jitter: std::time::Duration::ZERO,
        limits: Limits::default(),
        expires: None,
    };
    let now = Instant::now();
    let mut keep = Keep::new(&settings, now, 7);
    // Pretend a gateway ping is out, so candidate pongs are examined too.
    keep.pretend_ping_sent();
    // The top bit turns the client's policies on (small limits, so they are reached).
    let mut d = if from == Sender::Client && sel & 0x80 != 0 {
        let limits = Limits {
            max_message_size: 300,
            message_rate: 5,
            message_burst: 3,
            byte_rate: 1000,
            byte_burst: 500,
            action: if sel & 0x40 != 0 {
                super::policy::Action::Close
            } else {
                super::policy::Action::Throttle
            },
        };
        Dir::client(settings.max_frame_size, Bytes::new(), limits, now)
    } else {
        Dir::new(from, settings.max_frame_size, Bytes::new())
    };
    let mut buf = vec![0u8; HEADROOM + SCRATCH];
    let mut forwarded = 0usize;
    for chunk in data.chunks(step) {
        buf[HEADROOM..HEADROOM + chunk.len()].copy_from_slice(chunk);
        let (range, found) = d.ingest(&mut buf, chunk.len(), &mut keep, now);
        assert!(range.start <= range.end && range.end <= HEADROOM + chunk.len());
        forwarded += range.len();
        assert!(d.carry_len <= CARRY);
        if found.stops() {
            break;
        }
    }
    assert!(forwarded <= data.len());
    assert_eq!(d.bytes as usize, forwarded);
}
