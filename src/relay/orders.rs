//! Orders a tunnel takes from outside its task: close at an instant, because the process
//! drains, its backend went down or is being drained, or an operator asked. Each tunnel has a
//! one-slot [`Mailbox`] (a lock, the earliest order, the task's waker: about a hundred bytes,
//! nothing allocated until an order comes); the relay polls it like any other source of work.

use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use tokio::time::Instant;

/// Why a tunnel is ordered closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Why {
    /// The process is draining: Close 1001 "going away".
    Shutdown,
    /// Its backend was marked down (`on_backend_down = "close"`) or is being drained: Close
    /// 1012 "service restart", so the client reconnects elsewhere.
    Restart,
    /// An operator's close with its own code and reason (the backend gets 1001 and the reason).
    Operator { code: u16, reason: Box<str> },
}

/// A close to carry out at `at` (at once when it has passed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Order {
    pub(crate) at: Instant,
    pub(crate) why: Why,
}

/// Where a tunnel's orders come from.
pub(crate) trait Orders {
    /// The next order, registering the task's waker when there is none.
    fn poll_order(&self, cx: &mut Context<'_>) -> Poll<Order>;
}

/// One tunnel's mailbox: holds the earliest order posted and wakes the tunnel.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    slot: Mutex<Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    order: Option<Order>,
    waker: Option<Waker>,
}

impl Mailbox {
    /// Posts an order; of two orders not yet taken, the earlier stays.
    pub(crate) fn post(&self, order: Order) {
        let waker = {
            let mut s = self.slot.lock().unwrap_or_else(|e| e.into_inner());
            match &s.order {
                Some(o) if o.at <= order.at => {}
                _ => s.order = Some(order),
            }
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Orders for Mailbox {
    fn poll_order(&self, cx: &mut Context<'_>) -> Poll<Order> {
        let mut s = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = s.order.take() {
            return Poll::Ready(o);
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_earliest_order_wins_and_is_taken_once() {
        let m = Mailbox::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(m.poll_order(&mut cx).is_pending());
        let now = Instant::now();
        m.post(Order {
            at: now + Duration::from_secs(5),
            why: Why::Shutdown,
        });
        m.post(Order {
            at: now + Duration::from_secs(1),
            why: Why::Restart,
        });
        m.post(Order {
            at: now + Duration::from_secs(3),
            why: Why::Shutdown,
        });
        let Poll::Ready(o) = m.poll_order(&mut cx) else {
            panic!("an order waits");
        };
        assert_eq!(o.why, Why::Restart);
        assert!(m.poll_order(&mut cx).is_pending());
    }
}
