//! Draining: once SIGTERM (or a test) starts it, listeners stop, `/readyz` turns 503, plain
//! HTTP connections finish their request, and each tunnel gets its own close instant spread
//! over the end of the grace period (posted to its mailbox), so clients do not all reconnect in
//! the same millisecond. The window ends a little before the grace does, leaving time for the
//! close handshakes. [`spread`] places instants in a window the same way for other closes.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Time kept free at the end of the grace for close handshakes (at most a quarter of it).
const CLOSE_MARGIN: Duration = Duration::from_millis(500);

/// The process-wide drain state.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    token: CancellationToken,
    plan: OnceLock<Plan>,
    /// Another process took the listeners over (an upgrade): what this one accepted before it
    /// let go is still served, not refused.
    handed_over: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    start: Instant,
    grace: Duration,
    spread: Duration,
}

impl Drain {
    /// A drain that has not started.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Starts draining (once; later calls change nothing). Returns true the first time.
    pub(crate) fn begin(&self, grace: Duration, spread: Duration) -> bool {
        let first = self
            .plan
            .set(Plan {
                start: Instant::now(),
                grace,
                spread: spread.min(grace),
            })
            .is_ok();
        self.token.cancel();
        first
    }

    /// True once draining started.
    pub(crate) fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Marks the listeners as handed over to the process an upgrade started; set before the
    /// drain begins.
    pub(crate) fn hand_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// New connections and requests are refused: draining, and not after a hand-over (whose
    /// connections, accepted before this process let go, would otherwise meet a refusal
    /// their client never sees from the process that took over).
    pub(crate) fn refuses_new(&self) -> bool {
        self.is_draining() && !self.handed_over.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves when draining starts.
    pub(crate) fn started(&self) -> impl Future<Output = ()> + '_ {
        self.token.cancelled()
    }

    /// When tunnel `id` is to be closed, once draining began.
    pub(crate) fn close_at(&self, id: u64) -> Option<Instant> {
        self.plan.get().map(|_| self.tunnel_close_at(id))
    }

    fn tunnel_close_at(&self, id: u64) -> Instant {
        let Some(p) = self.plan.get() else {
            return Instant::now();
        };
        let end = p.grace - CLOSE_MARGIN.min(p.grace / 4);
        let spread = p.spread.min(end);
        p.start + (end - spread) + spread_offset(id, spread)
    }
}

/// Where in a window of `spread` tunnel `id` falls: a multiplicative hash spreads consecutive
/// ids over the whole window.
pub(crate) fn spread_offset(id: u64, spread: Duration) -> Duration {
    let nanos = spread.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(id.wrapping_mul(0x9E37_79B9_7F4A_7C15) % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn close_instants_fall_inside_the_spread_window() {
        let d = Drain::new();
        d.begin(Duration::from_secs(10), Duration::from_secs(4));
        let start = Instant::now();
        let times: Vec<_> = (0..100).map(|i| d.tunnel_close_at(i) - start).collect();
        assert!(
            times
                .iter()
                .all(|t| *t >= Duration::from_millis(5500) && *t < Duration::from_millis(9500)),
            "closes fall in [grace - margin - spread, grace - margin)"
        );
        let distinct: std::collections::HashSet<_> =
            times.iter().map(|t| t.as_millis() / 500).collect();
        assert!(distinct.len() >= 6, "closes are spread: {distinct:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn spread_longer_than_grace_is_cut_to_grace() {
        let d = Drain::new();
        d.begin(Duration::from_secs(2), Duration::from_secs(30));
        let start = Instant::now();
        assert!((0..50).all(|i| d.tunnel_close_at(i) - start < Duration::from_secs(2)));
    }
}
