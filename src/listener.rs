//! Listening and the first moments of a connection: binding (and re-binding on reload), the
//! accept loop with back-off, admission before any TLS work, then one task per connection that
//! reads the optional PROXY header, completes TLS and reads the first request head, all within
//! `handshake_timeout`, answering early refusals itself before handing over to [`crate::proxy`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::tls::stream::ServerTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::handshake::{self, HeadError, Reject};
use crate::leftover::Leftover;
use crate::upstream::ClientInfo;
use crate::{Shared, proxy};

/// The running listeners, keyed by configured address and kind (TLS or not).
#[derive(Default)]
pub struct Listeners {
    map: Mutex<HashMap<(SocketAddr, bool), Entry>>,
}

struct Entry {
    local: SocketAddr,
    stop: CancellationToken,
    socket: Arc<TcpListener>,
}

impl Entry {
    /// Stops accepting now: on Linux, shutting down a listening socket's read side makes the
    /// kernel refuse new connections at once, before the accept task even runs again.
    fn close(&self) {
        self.stop.cancel();
        let _ = socket2::SockRef::from(&*self.socket).shutdown(std::net::Shutdown::Read);
    }
}

impl Listeners {
    /// Makes the running set match the configuration: binds new addresses first (so a failure
    /// changes nothing), then stops the listeners no longer configured.
    pub async fn apply(
        &self,
        shared: &Arc<Shared>,
        tls: &[SocketAddr],
        plain: &[SocketAddr],
    ) -> Result<(), (SocketAddr, io::Error)> {
        let wanted: Vec<(SocketAddr, bool)> = tls
            .iter()
            .map(|a| (*a, true))
            .chain(plain.iter().map(|a| (*a, false)))
            .collect();
        let mut fresh = Vec::new();
        for key in &wanted {
            if self.lock().contains_key(key) {
                continue;
            }
            let l = bind(key.0).map_err(|e| (key.0, e))?;
            fresh.push((*key, l));
        }
        let mut map = self.lock();
        for (key, l) in fresh {
            let local = l.local_addr().unwrap_or(key.0);
            let stop = CancellationToken::new();
            tracing::info!(addr = %local, tls = key.1, "listening");
            let socket = Arc::new(l);
            tokio::spawn(accept_loop(
                shared.clone(),
                socket.clone(),
                key.1,
                stop.clone(),
            ));
            map.insert(
                key,
                Entry {
                    local,
                    stop,
                    socket,
                },
            );
        }
        map.retain(|key, e| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(addr = %e.local, "listener removed");
                e.close();
            }
            keep
        });
        Ok(())
    }

    /// Stops every listener (draining): new connections are refused by the kernel at once.
    pub fn close_all(&self) {
        for (_, e) in self.lock().drain() {
            e.close();
        }
    }

    /// Bound addresses and whether each is TLS.
    pub fn local_addrs(&self) -> Vec<(SocketAddr, bool)> {
        let mut v: Vec<_> = self.lock().iter().map(|(k, e)| (e.local, k.1)).collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, bool), Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Binds a listening socket; IPv6 sockets are v6-only so `0.0.0.0` and `[::]` can share a port.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    TcpListener::from_std(s.into())
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    tls: bool,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::from_millis(5);
                admit(&shared, tcp, peer, tls);
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // Out of file descriptors or memory: wait rather than spin.
                tracing::error!(error = %e, "accept failed; backing off");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

fn admit(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr, tls: bool) {
    if shared.drain.is_draining() {
        return;
    }
    let rt = shared.runtime.load_full();
    let id = shared.next_id();
    if rt.config.server.proxy_protocol {
        // The real client address is in the PROXY header: admission waits for it.
        shared
            .tasks
            .spawn(connection(shared.clone(), rt, tcp, peer, tls, None, id));
        return;
    }
    match shared.admission.admit(peer.ip()) {
        Ok(permit) => {
            shared.tasks.spawn(connection(
                shared.clone(),
                rt,
                tcp,
                peer,
                tls,
                Some(permit),
                id,
            ));
        }
        Err(refusal) => {
            shared.metrics.reject(refusal.metric_reason());
            log_refusal(peer, refusal.metric_reason());
        }
    }
}

/// A client connection: over TLS (left) or cleartext (right).
pub type ClientStream = Either<Box<ServerTls>, TcpStream>;

#[allow(clippy::too_many_arguments)]
async fn connection(
    shared: Arc<Shared>,
    rt: Arc<crate::Runtime>,
    mut tcp: TcpStream,
    socket_peer: SocketAddr,
    tls: bool,
    permit: Option<crate::limits::Permit>,
    id: u64,
) {
    let start = Instant::now();
    let server = &rt.config.server;
    let deadline = start + server.handshake_timeout;
    let _ = tcp.set_nodelay(true);
    let mut peer = socket_peer;
    let permit = match permit {
        Some(p) => p,
        None => {
            match tokio::time::timeout_at(
                deadline,
                crate::proxy_protocol::read_header(&mut tcp, socket_peer),
            )
            .await
            {
                Ok(Ok(addr)) => peer = addr,
                Ok(Err(e)) => {
                    shared.metrics.reject("proxy_protocol");
                    log_refusal(socket_peer, "proxy_protocol");
                    tracing::debug!(peer = %socket_peer, error = %e, "bad PROXY header");
                    return;
                }
                Err(_) => {
                    shared.metrics.reject("handshake_timeout");
                    return;
                }
            }
            match shared.admission.admit(peer.ip()) {
                Ok(p) => p,
                Err(refusal) => {
                    shared.metrics.reject(refusal.metric_reason());
                    log_refusal(peer, refusal.metric_reason());
                    return;
                }
            }
        }
    };
    let _open = OpenGauge::new(&shared);
    let stream = if tls {
        let Some(tls_config) = rt.tls.clone() else {
            return;
        };
        if plain_http_on_tls_port(&tcp, deadline).await {
            let r = Reject::BadRequest("plain HTTP sent to the TLS port; use https:// or wss://");
            return refuse(&shared, Either::Right(tcp), peer, r, id).await;
        }
        match tokio::time::timeout_at(deadline, ServerTls::accept(tcp, tls_config)).await {
            Ok(Ok(s)) => Either::Left(Box::new(s)),
            Ok(Err(e)) => {
                shared.metrics.tls_failures.inc();
                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                shared.metrics.reject("handshake_timeout");
                log_refusal(peer, "handshake_timeout");
                return;
            }
        }
    } else {
        Either::Right(tcp)
    };
    let mut stream = stream;
    let mut buf = Vec::new();
    let head = tokio::time::timeout_at(
        deadline,
        handshake::read_head(&mut stream, &mut buf, server.max_request_head),
    )
    .await;
    let (parts, _len) = match head {
        Err(_) => {
            shared.metrics.reject("handshake_timeout");
            log_refusal(peer, "handshake_timeout");
            return;
        }
        Ok(Err(HeadError::Closed)) | Ok(Err(HeadError::Io(_))) => return,
        Ok(Err(HeadError::Reject(r))) => return refuse(&shared, stream, peer, r, id).await,
        Ok(Ok(h)) => h,
    };
    shared
        .metrics
        .handshake_seconds
        .observe(start.elapsed().as_secs_f64());
    if permit.over_capacity {
        return refuse(&shared, stream, peer, Reject::Overloaded, id).await;
    }
    if shared.drain.is_draining() {
        return refuse(&shared, stream, peer, Reject::Draining, id).await;
    }
    if let Err(r) = handshake::check(&parts, &rt.routes) {
        return refuse(&shared, stream, peer, r, id).await;
    }
    let client = ClientInfo {
        addr: peer,
        tls,
        id,
    };
    let io = Rewind::new(stream, buf);
    proxy::serve(
        shared.clone(),
        rt.clone(),
        io,
        client,
        Arc::new(permit),
        start,
    )
    .await;
}

/// True when the first byte is an ASCII letter: an HTTP request, where a TLS handshake record
/// (0x16) was expected. Such clients get a readable 400 instead of a failed handshake.
async fn plain_http_on_tls_port(tcp: &TcpStream, deadline: Instant) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await,
        Ok(Ok(1)) if first[0].is_ascii_alphabetic()
    )
}

async fn refuse(shared: &Shared, stream: ClientStream, peer: SocketAddr, r: Reject, id: u64) {
    shared.metrics.reject(r.metric_reason());
    if log_budget() {
        tracing::info!(conn = id, client = %peer, status = r.status().as_u16(), reason = r.reason(), "request refused");
    }
    handshake::answer_and_close(stream, &r.to_bytes()).await;
}

/// Keeps the open-connections gauge right however the task ends.
struct OpenGauge<'a>(&'a Shared);

impl<'a> OpenGauge<'a> {
    fn new(s: &'a Shared) -> Self {
        s.metrics.client_connections.inc();
        OpenGauge(s)
    }
}

impl Drop for OpenGauge<'_> {
    fn drop(&mut self) {
        self.0.metrics.client_connections.dec();
    }
}

/// Logs refusals at most a few times a second, so a flood cannot fill the disk.
fn log_refusal(peer: SocketAddr, reason: &'static str) {
    if log_budget() {
        tracing::warn!(client = %peer, reason, "connection refused");
    }
}

/// True while this second's budget of refusal log lines lasts; reports what was suppressed.
pub fn log_budget() -> bool {
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        COUNT.store(0, Ordering::Relaxed);
        let s = SUPPRESSED.swap(0, Ordering::Relaxed);
        if s > 0 {
            tracing::warn!(suppressed = s, "refusals not logged in the last second");
        }
    }
    if COUNT.fetch_add(1, Ordering::Relaxed) < 20 {
        true
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// A stream that first yields bytes already read (the request head), then reads from the inner
/// stream. The buffer is freed as soon as it has been consumed.
pub struct Rewind<S> {
    prefix: Leftover,
    inner: S,
}

impl<S> Rewind<S> {
    /// Wraps `inner`, to yield `prefix` first.
    pub fn new(inner: S, prefix: Vec<u8>) -> Self {
        Rewind {
            prefix: Leftover::new(prefix),
            inner,
        }
    }

    /// The inner stream and the bytes of the prefix not yet read.
    pub fn into_inner(self) -> (S, Vec<u8>) {
        (self.inner, self.prefix.into_remaining())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            this.prefix.put_into(buf);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
