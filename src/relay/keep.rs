//! Keepalive and timeout bookkeeping of a tunnel: when the next gateway ping is due, the token
//! its pong must carry, the pong deadline, the last data activity and the lifetime's end.

use std::time::Duration;

use tokio::time::Instant;

use super::Settings;

/// Payload of gateway pings: a marker, part of the tunnel id, and a sequence number.
pub(super) const TOKEN_LEN: usize = 8;

pub(super) struct Keep {
    pub(super) ping_interval: Duration,
    pub(super) pong_timeout: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) lifetime_end: Option<Instant>,
    /// When the credential ends, with the client's close code.
    pub(super) expires: Option<(Instant, u16)>,
    /// The last data frame either way.
    pub(super) last_activity: Instant,
    /// When the next ping is due; `None` with pings off.
    pub(super) next_ping: Option<Instant>,
    /// Set while a ping awaits its pong.
    pub(super) pong_deadline: Option<Instant>,
    token: [u8; TOKEN_LEN],
    /// The token before the latest one: a late pong to it is still the gateway's to consume.
    prev_token: Option<[u8; TOKEN_LEN]>,
    seq: u32,
    pub(super) pings_sent: u64,
    pub(super) pongs: u64,
    /// The wake-up the sleep is currently armed for.
    pub(super) armed: Instant,
}

impl Keep {
    pub(super) fn new(s: &Settings, now: Instant, id: u64) -> Self {
        let mut token = [b'w', b'g', 0, 0, 0, 0, 0, 0];
        token[2..4].copy_from_slice(&(id as u16).to_be_bytes());
        Keep {
            ping_interval: s.ping_interval,
            pong_timeout: s.pong_timeout,
            idle_timeout: s.idle_timeout,
            lifetime_end: (!s.max_lifetime.is_zero()).then(|| {
                now + s.max_lifetime - jitter(s.max_lifetime_jitter, id).min(s.max_lifetime)
            }),
            expires: s.expires,
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

    /// The tokens a client pong may carry, when a gateway ping awaits its pong.
    pub(super) fn expected(&self) -> Option<([u8; TOKEN_LEN], Option<[u8; TOKEN_LEN]>)> {
        (self.pings_sent > 0).then_some((self.token, self.prev_token))
    }

    /// The payload of the next ping; counts it as sent.
    pub(super) fn next_token(&mut self) -> [u8; TOKEN_LEN] {
        self.prev_token = (self.pings_sent > 0).then_some(self.token);
        self.seq = self.seq.wrapping_add(1);
        self.token[4..8].copy_from_slice(&self.seq.to_be_bytes());
        self.pings_sent += 1;
        self.token
    }

    /// For the fuzz target: as if a ping had gone out, so candidate pongs are examined.
    pub(super) fn pretend_ping_sent(&mut self) {
        self.next_token();
    }
}

/// A random share of `up_to` for tunnel `id`: tunnels opened together do not all reach their
/// lifetime together. Seeded once from the OS, then a splitmix64 step per tunnel (no system
/// call on the handshake path).
fn jitter(up_to: Duration, id: u64) -> Duration {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let nanos = up_to.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    let seed = *SEED.get_or_init(|| {
        let mut b = [0u8; 8];
        let rng = rustls::crypto::ring::default_provider().secure_random;
        let _ = rng.fill(&mut b);
        u64::from_le_bytes(b)
    });
    let mut z = seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    Duration::from_nanos(z % (nanos + 1))
}
