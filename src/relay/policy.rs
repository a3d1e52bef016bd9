//! Per-tunnel policy over what the client sends, decided from frame headers alone: the size of a
//! message summed over its fragments, and token buckets over messages and payload bytes. Sans
//! I/O like the frame tracker: it is fed a valid client frame header and the pass's clock, and
//! answers pass, hold until an instant (throttle), or close. No allocation, no clock read.

use std::time::Duration;

use tokio::time::Instant;

use super::frame::{Header, OP_BINARY, OP_CONTINUATION, OP_PING, OP_TEXT};

/// The limits a tunnel runs with; zero turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Limits {
    /// Largest message payload, summed over its frames.
    pub(crate) max_message_size: u64,
    /// Messages (and pings) per second, and the burst on top.
    pub(crate) message_rate: u64,
    pub(crate) message_burst: u64,
    /// Payload bytes per second, and the burst on top.
    pub(crate) byte_rate: u64,
    pub(crate) byte_burst: u64,
    /// What an empty bucket does.
    pub(crate) action: Action,
}

impl Limits {
    pub(crate) fn is_off(&self) -> bool {
        self.max_message_size == 0 && self.message_rate == 0 && self.byte_rate == 0
    }
}

/// What happens when a rate's bucket is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Action {
    /// Stop reading from the client until the bucket refills.
    #[default]
    Throttle,
    /// Close the tunnel.
    Close,
}

/// Which limit a client broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    MessageSize,
    MessageRate,
    ByteRate,
}

impl Limit {
    /// The `policy` label of `wsgate_policy_closes_total`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Limit::MessageSize => "message_size",
            Limit::MessageRate => "message_rate",
            Limit::ByteRate => "byte_rate",
        }
    }

    /// The close code to the client (the backend always gets 1001) and the reason for both.
    pub(crate) fn close(self) -> (u16, &'static str) {
        match self {
            Limit::MessageSize => (1009, "message too big"),
            Limit::MessageRate => (1008, "message rate exceeded"),
            Limit::ByteRate => (1008, "byte rate exceeded"),
        }
    }
}

/// The policy's answer for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Forward it.
    Pass,
    /// Do not read on before this instant; the frame waits unforwarded.
    Hold(Instant),
    /// Close the tunnel without forwarding this frame.
    Close(Limit),
}

/// The policy state of one tunnel's client direction.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    limits: Limits,
    /// Payload of the current message so far (its frames before this one).
    message_len: u64,
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl Policy {
    pub(crate) fn new(limits: Limits, now: Instant) -> Policy {
        let bucket = |rate: u64, burst: u64| (rate > 0).then(|| Bucket::new(rate, burst, now));
        Policy {
            messages: bucket(limits.message_rate, limits.message_burst),
            bytes: bucket(limits.byte_rate, limits.byte_burst),
            limits,
            message_len: 0,
        }
    }

    /// Judges a client frame header the tracker found valid, at the pass's instant `now`.
    /// Tokens are taken only when the frame passes.
    pub(crate) fn judge(&mut self, h: &Header, now: Instant) -> Verdict {
        let data = matches!(h.opcode, OP_TEXT | OP_BINARY | OP_CONTINUATION);
        let first = matches!(h.opcode, OP_TEXT | OP_BINARY);
        let max = self.limits.max_message_size;
        let so_far = if first { 0 } else { self.message_len };
        if data && max > 0 && so_far.saturating_add(h.len) > max {
            return Verdict::Close(Limit::MessageSize);
        }
        let counted = first || h.opcode == OP_PING;
        let paid = data || h.opcode == OP_PING;
        // Check both buckets before taking from either, so a held frame costs nothing.
        let msg_wait = match &self.messages {
            Some(b) if counted => b.wait(1, now),
            _ => None,
        };
        let byte_wait = match &self.bytes {
            Some(b) if paid => b.wait(h.len, now),
            _ => None,
        };
        if let Some((until, limit)) = match (msg_wait, byte_wait) {
            (Some(a), Some(b)) => Some((a.max(b), Limit::MessageRate)),
            (Some(a), None) => Some((a, Limit::MessageRate)),
            (None, Some(b)) => Some((b, Limit::ByteRate)),
            (None, None) => None,
        } {
            return match self.limits.action {
                Action::Throttle => Verdict::Hold(until),
                Action::Close => Verdict::Close(limit),
            };
        }
        if counted && let Some(b) = &mut self.messages {
            b.take(1, now);
        }
        if paid && let Some(b) = &mut self.bytes {
            b.take(h.len, now);
        }
        if data {
            self.message_len = if h.fin { 0 } else { so_far + h.len };
        }
        Verdict::Pass
    }
}

/// A token bucket of `burst` tokens refilled at `rate` per second, kept as GCRA: the instant the
/// bucket would be full again ("theoretical arrival time"), in units of nanoseconds times the
/// rate, so every step is exact integer arithmetic (one token is 1e9 units). A cost may be
/// taken once the bucket holds it; a cost larger than the burst once the bucket is full, which
/// leaves it in debt: a frame bigger than the burst is slowed, never refused forever.
#[derive(Debug, Clone)]
struct Bucket {
    rate: u128,
    /// The burst in units.
    burst: u128,
    /// When the bucket's clock started.
    origin: Instant,
    /// The theoretical arrival time, units since `origin`.
    tat: u128,
}

const UNIT: u128 = 1_000_000_000;

impl Bucket {
    fn new(rate: u64, burst: u64, now: Instant) -> Bucket {
        let burst = if burst == 0 { rate } else { burst };
        Bucket {
            rate: u128::from(rate),
            burst: u128::from(burst) * UNIT,
            origin: now,
            tat: 0,
        }
    }

    fn units(&self, now: Instant) -> u128 {
        now.saturating_duration_since(self.origin).as_nanos() * self.rate
    }

    /// `None` when `cost` may be taken now, else the instant it may.
    fn wait(&self, cost: u64, now: Instant) -> Option<Instant> {
        let t = self.units(now);
        let need = (u128::from(cost) * UNIT).min(self.burst);
        let ready_at = self.tat.saturating_sub(self.burst - need);
        if ready_at <= t {
            return None;
        }
        let ns = ready_at.div_ceil(self.rate);
        Some(self.origin + Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64))
    }

    fn take(&mut self, cost: u64, now: Instant) {
        let t = self.units(now);
        self.tat = self.tat.max(t) + u128::from(cost) * UNIT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: u8, fin: bool, len: u64) -> Header {
        Header {
            fin,
            rsv: 0,
            opcode,
            mask: Some([0; 4]),
            len,
            header_len: 6,
        }
    }

    #[test]
    fn message_size_sums_fragments_and_ignores_control_frames() {
        let limits = Limits {
            max_message_size: 100,
            ..Limits::default()
        };
        let now = Instant::now();
        let mut p = Policy::new(limits, now);
        assert_eq!(p.judge(&header(OP_TEXT, false, 60), now), Verdict::Pass);
        assert_eq!(p.judge(&header(OP_PING, true, 125), now), Verdict::Pass);
        assert_eq!(
            p.judge(&header(OP_CONTINUATION, false, 40), now),
            Verdict::Pass
        );
        assert_eq!(
            p.judge(&header(OP_CONTINUATION, true, 1), now),
            Verdict::Close(Limit::MessageSize)
        );
        let mut p = Policy::new(limits, now);
        assert_eq!(p.judge(&header(OP_BINARY, true, 100), now), Verdict::Pass);
        assert_eq!(p.judge(&header(OP_BINARY, true, 100), now), Verdict::Pass);
        assert_eq!(
            p.judge(&header(OP_BINARY, true, 101), now),
            Verdict::Close(Limit::MessageSize)
        );
    }

    #[test]
    fn message_rate_holds_after_the_burst_until_a_token_returns() {
        let limits = Limits {
            message_rate: 10,
            message_burst: 10,
            ..Limits::default()
        };
        let t0 = Instant::now();
        let mut p = Policy::new(limits, t0);
        for _ in 0..10 {
            assert_eq!(p.judge(&header(OP_TEXT, true, 5), t0), Verdict::Pass);
        }
        // Pongs and continuation frames are free.
        assert_eq!(p.judge(&header(0xA, true, 0), t0), Verdict::Pass);
        let Verdict::Hold(until) = p.judge(&header(OP_TEXT, true, 5), t0) else {
            panic!("the eleventh message waits");
        };
        assert_eq!(until - t0, Duration::from_millis(100));
        assert_eq!(p.judge(&header(OP_TEXT, true, 5), until), Verdict::Pass);
        let closing = Limits {
            action: Action::Close,
            ..limits
        };
        let mut p = Policy::new(closing, t0);
        for _ in 0..10 {
            p.judge(&header(OP_PING, true, 0), t0);
        }
        assert_eq!(
            p.judge(&header(OP_TEXT, true, 5), t0),
            Verdict::Close(Limit::MessageRate)
        );
    }

    #[test]
    fn byte_rate_lets_a_frame_bigger_than_the_burst_through_into_debt() {
        let limits = Limits {
            byte_rate: 1000,
            byte_burst: 1000,
            ..Limits::default()
        };
        let t0 = Instant::now();
        let mut p = Policy::new(limits, t0);
        assert_eq!(p.judge(&header(OP_BINARY, true, 3000), t0), Verdict::Pass);
        let Verdict::Hold(until) = p.judge(&header(OP_BINARY, true, 1), t0) else {
            panic!("in debt");
        };
        // The debt of 2000 bytes, then the one byte asked for.
        assert_eq!(until - t0, Duration::from_millis(2001));
    }
}
