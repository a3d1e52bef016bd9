//! Keep-alive connections to backends for plain HTTP: a connection is checked out for one
//! request, handed back once its response body has been read to the end, dropped after a minute
//! unused, and dropped at once when a reload removes its backend. Connections that began with a
//! PROXY header naming one client serve only that client's connection.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Idle pooled connections per backend at most.
const MAX_IDLE: usize = 64;
/// A pooled connection unused this long is dropped.
const IDLE_TTL: Duration = Duration::from_secs(60);

/// The body of a request sent through the pool: nothing, or what the client's connection task
/// decodes and feeds through a channel (an error ends the request: the client's body broke).
pub(crate) enum UpBody {
    Empty,
    Stream {
        rx: mpsc::Receiver<Bytes>,
        /// Content-Length when the client gave one, so the backend gets it too.
        length: Option<u64>,
        /// Set when the client's body broke: checked before the channel's end is taken for
        /// the body's end, so hyper aborts the request instead of ending it as complete.
        aborted: Arc<AtomicBool>,
    },
}

/// The client's request body broke off; the backend request is abandoned.
#[derive(Debug)]
pub(crate) struct BodyAborted;

impl std::fmt::Display for BodyAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("client request body aborted")
    }
}

impl std::error::Error for BodyAborted {}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        match self.get_mut() {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Stream { rx, aborted, .. } => {
                if aborted.load(Ordering::Acquire) {
                    return Poll::Ready(Some(Err(BodyAborted)));
                }
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
                    Poll::Ready(None) if aborted.load(Ordering::Acquire) => {
                        Poll::Ready(Some(Err(BodyAborted)))
                    }
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, UpBody::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Stream {
                length: Some(n), ..
            } => SizeHint::with_exact(*n),
            UpBody::Stream { .. } => SizeHint::default(),
        }
    }
}

/// A pooled connection and when it was last released.
type Idle = (SendRequest<UpBody>, Instant);

/// What a pooled connection can be reused for: the same backend of the same route (its TLS
/// and PROXY settings come from the route), and, when it began with a PROXY header, the same
/// client connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) route: String,
    pub(crate) backend: String,
    pub(crate) client: Option<u64>,
}

/// Keep-alive connections to backends.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
}

impl PoolKey {
    /// The pool a request of `conn` to backend `i` of `route` draws from: one per route and
    /// backend, and one per client when backend connections carry a PROXY header naming it.
    pub(crate) fn new(
        conn: &crate::conn::Conn,
        route: &crate::route::RouteEntry,
        i: usize,
    ) -> Self {
        PoolKey {
            route: route.label(),
            backend: route.backends[i].label.clone(),
            client: route.send_proxy_protocol.then_some(conn.id),
        }
    }
}

impl Pool {
    /// An idle connection for `key` (second value true), or a new one dialled with `dial`.
    pub(crate) async fn checkout(
        &self,
        key: &PoolKey,
        dial: &super::Dial<'_>,
        timeout: Duration,
    ) -> Result<(SendRequest<UpBody>, bool), super::DialError> {
        loop {
            let candidate = self.lock().get_mut(key).and_then(|v| v.pop());
            let Some((mut s, since)) = candidate else {
                break;
            };
            if s.is_closed() || since.elapsed() > IDLE_TTL {
                continue;
            }
            if s.ready().await.is_ok() {
                return Ok((s, true));
            }
        }
        let stream = super::dial(dial, timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| super::DialError::Connect(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, false))
    }

    /// Drops the idle connections of route backends not in `keep` (a reload removed them).
    pub(crate) fn retain(&self, keep: &HashSet<(String, String)>) {
        self.lock()
            .retain(|k, _| keep.contains(&(k.route.clone(), k.backend.clone())));
    }

    /// Drops the idle connections that began with a PROXY header for client connection `id`.
    pub(crate) fn forget_client(&self, id: u64) {
        self.lock().retain(|k, _| k.client != Some(id));
    }

    fn put(&self, key: PoolKey, sender: SendRequest<UpBody>) {
        if sender.is_closed() {
            return;
        }
        let mut m = self.lock();
        let v = m.entry(key).or_default();
        if v.len() < MAX_IDLE {
            v.push((sender, Instant::now()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A backend response body that hands its connection back to the pool once fully read.
pub(crate) struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<Pool>, PoolKey, SendRequest<UpBody>)>,
    /// The request counts toward its backend's load until its answer has been read.
    _slot: Option<crate::backends::RequestSlot>,
}

impl PooledBody {
    pub(crate) fn new(
        inner: Incoming,
        pool: Arc<Pool>,
        key: PoolKey,
        s: SendRequest<UpBody>,
        slot: crate::backends::RequestSlot,
    ) -> Self {
        PooledBody {
            inner,
            back: Some((pool, key, s)),
            _slot: Some(slot),
        }
    }

    fn release(&mut self) {
        if let Some((pool, key, sender)) = self.back.take() {
            pool.put(key, sender);
        }
        self._slot = None;
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            self.release();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Only a fully read response leaves the connection reusable.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
