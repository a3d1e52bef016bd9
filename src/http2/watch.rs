//! The connection-level frames the `h2` crate answers without a limit of its own: SETTINGS
//! and PING, which a client can send as fast as it reads the acknowledgements, keeping a core
//! busy for nothing. [`Watch`] wraps the client stream and follows the frame headers of what
//! the client sends (payloads are skipped, not parsed); past [`BUDGET`] such frames in a
//! [`WINDOW`] it stops reading and tells the connection's task, which ends the connection with
//! GOAWAY `ENHANCE_YOUR_CALM`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// SETTINGS and PING frames (not acknowledgements) a client may send per window: far above
/// what browsers and gRPC keep-alives send, far below a flood.
pub(crate) const BUDGET: u32 = 200;
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Where the follower is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Inside the connection preface; the count says how much of it is left.
    Preface(usize),
    /// Collecting a frame header: how many of its bytes are in `header`.
    Header(usize),
    /// Skipping a payload: how many bytes are left.
    Payload(usize),
}

/// Follows frame boundaries and counts control frames in the current window.
#[derive(Debug)]
pub(crate) struct Follower {
    at: At,
    header: [u8; HEADER_LEN],
    window_start: Option<Instant>,
    in_window: u32,
}

impl Follower {
    pub(crate) fn new() -> Self {
        Follower {
            at: At::Preface(PREFACE_LEN),
            header: [0; HEADER_LEN],
            window_start: None,
            in_window: 0,
        }
    }

    /// Takes bytes the client sent; true once the budget is spent. Work is proportional to
    /// the number of frames, not bytes.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], now: Instant) -> bool {
        while !bytes.is_empty() {
            match self.at {
                At::Preface(left) | At::Payload(left) => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    self.at = if n == left {
                        At::Header(0)
                    } else if matches!(self.at, At::Preface(_)) {
                        At::Preface(left - n)
                    } else {
                        At::Payload(left - n)
                    };
                }
                At::Header(have) => {
                    let n = (HEADER_LEN - have).min(bytes.len());
                    self.header[have..have + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if have + n < HEADER_LEN {
                        self.at = At::Header(have + n);
                        continue;
                    }
                    let h = &self.header;
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    let (kind, flags) = (h[3], h[4]);
                    if (kind == SETTINGS || kind == PING) && flags & ACK == 0 && self.count(now) {
                        return true;
                    }
                    self.at = if len == 0 {
                        At::Header(0)
                    } else {
                        At::Payload(len)
                    };
                }
            }
        }
        false
    }

    fn count(&mut self, now: Instant) -> bool {
        match self.window_start {
            Some(s) if now.duration_since(s) < WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        self.in_window += 1;
        self.in_window > BUDGET
    }
}

/// When the client last sent anything, for the streams to read.
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    /// Milliseconds from `base` to the last read that brought bytes.
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// How long the client has sent nothing.
    pub(crate) fn quiet_for(&self) -> Duration {
        let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(last)
    }

    fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.base).as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

/// The client stream, with its control frames counted.
pub(crate) struct Watch<S> {
    inner: S,
    follower: Follower,
    /// Set once the budget is spent; nothing more is read.
    flooded: bool,
    alarm: Arc<Notify>,
    activity: Arc<Activity>,
}

impl<S> Watch<S> {
    pub(crate) fn new(inner: S, alarm: Arc<Notify>, activity: Arc<Activity>) -> Self {
        Watch {
            inner,
            follower: Follower::new(),
            flooded: false,
            alarm,
            activity,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.flooded {
            // The connection's task was told and ends the connection; it needs no more input.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let this = &mut *self;
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let now = Instant::now();
        if buf.filled().len() > before {
            this.activity.touch(now);
        }
        if this.follower.feed(&buf.filled()[before..], now) {
            this.flooded = true;
            this.alarm.notify_one();
            // What came with the flood is not handed on.
            buf.set_filled(before);
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Fuzz entry: arbitrary bytes, whole and cut in two, must count the same frames and never
/// panic.
#[doc(hidden)]
pub fn fuzz_watch(data: &[u8]) {
    let now = Instant::now();
    let mut whole = Follower::new();
    let a = whole.feed(data, now);
    let cut = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    let mut parts = Follower::new();
    let b = parts.feed(&data[..cut], now) || parts.feed(&data[cut..], now);
    assert_eq!(a, b);
    if !a {
        assert_eq!(whole.in_window, parts.in_window);
        assert_eq!(whole.at, parts.at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.resize(HEADER_LEN + len, 0xAB);
        f
    }

    #[test]
    fn control_frames_past_the_budget_are_a_flood() {
        let now = Instant::now();
        let mut f = Follower::new();
        assert!(!f.feed(&[b'P'; PREFACE_LEN], now));
        for _ in 0..BUDGET {
            assert!(!f.feed(&frame(PING, 0, 8), now));
            // Acknowledgements and other frames do not count, payloads are skipped.
            assert!(!f.feed(&frame(PING, ACK, 8), now));
            assert!(!f.feed(&frame(0x0, 0, 300), now));
        }
        assert!(f.feed(&frame(SETTINGS, 0, 6), now));
    }

    #[test]
    fn the_budget_is_per_window_and_bytes_may_come_one_by_one() {
        let start = Instant::now();
        let mut f = Follower::new();
        let mut all = vec![b'P'; PREFACE_LEN];
        for _ in 0..BUDGET {
            all.extend(frame(SETTINGS, 0, 6));
        }
        for b in &all {
            assert!(!f.feed(std::slice::from_ref(b), start));
        }
        // A new window starts afresh.
        assert!(!f.feed(&frame(PING, 0, 8), start + WINDOW));
        assert_eq!(f.in_window, 1);
    }

    #[test]
    fn fuzz_entry_takes_garbage() {
        fuzz_watch(b"");
        fuzz_watch(&[0xff; 100]);
        let mut d = vec![7u8; PREFACE_LEN];
        for _ in 0..300 {
            d.extend(frame(PING, 0, 8));
        }
        fuzz_watch(&d);
    }
}
