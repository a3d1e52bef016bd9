//! Listening and the first moments of a connection: binding (and, on reload, binding first and
//! starting later), the accept loop with back-off, admission before any TLS work, then one task
//! per connection that reads the optional PROXY header, completes TLS and hands the stream to
//! [`crate::downstream`], all of it within `handshake_timeout` of the accept.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::conn::{self, Conn, ListenerKind};
use crate::inherited::Inherited;
use crate::limits::Permit;
use crate::reject::{self, Refusal};
use crate::server::{Runtime, Shared};
use crate::tls::stream::ServerTls;

/// A configured listener: its address as written and its kind.
pub(crate) type ListenKey = (SocketAddr, ListenerKind);

/// The running listeners, changed by reloads.
#[derive(Default)]
pub(crate) struct Listeners {
    map: Mutex<HashMap<ListenKey, Entry>>,
    /// The admin listener, handed over with the others on an upgrade.
    admin: Mutex<Option<Entry>>,
    /// Accept loops wait for this before their first accept: a process started by an upgrade
    /// holds its sockets without accepting until the old process confirms the hand-over, so
    /// nothing it accepted is lost if it is told to go away instead.
    open: CancellationToken,
}

struct Entry {
    local: SocketAddr,
    stop: CancellationToken,
    socket: Arc<TcpListener>,
    /// Also held by the service manager (an inherited socket): see [`Entry::close`].
    shared: bool,
    /// The accept loop, which holds the socket until it has seen `stop`.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Entry {
    /// Stops accepting now. A socket only this process holds is shut down too: on Linux,
    /// shutting down a listening socket's read side makes the kernel refuse new connections
    /// at once, before the accept task even runs again. A socket the service manager also
    /// holds is only closed, so connections keep waiting in its queue for the next process.
    fn close(&self) {
        self.stop.cancel();
        if !self.shared {
            let _ = socket2::SockRef::from(&*self.socket).shutdown(std::net::Shutdown::Read);
        }
    }
}

/// A socket bound (or inherited) for a listener whose accept loop has not started yet.
pub(crate) struct Bound {
    key: ListenKey,
    socket: TcpListener,
    shared: bool,
    inherited: bool,
}

/// A listener that could not be bound.
#[derive(Debug)]
pub(crate) struct BindError {
    pub(crate) addr: SocketAddr,
    pub(crate) error: io::Error,
}

impl Listeners {
    /// Binds every wanted listener that is not running yet. Fallible and changes nothing: the
    /// sockets accept nothing until [`Listeners::start`] (connections wait in the kernel's
    /// queue meanwhile).
    /// Sockets in `inherited` listening on a wanted address are taken instead of binding.
    pub(crate) fn bind_missing(
        &self,
        wanted: &[ListenKey],
        inherited: &mut Inherited,
    ) -> Result<Vec<Bound>, BindError> {
        let mut fresh = Vec::new();
        for key in wanted {
            if self.lock().contains_key(key) {
                continue;
            }
            let err = |error| BindError { addr: key.0, error };
            let kind = crate::inherited::Kind::of_listener(key.1);
            let bound = match inherited.take(key.0, kind) {
                Some(s) => {
                    s.listener.set_nonblocking(true).map_err(err)?;
                    Bound {
                        key: *key,
                        socket: TcpListener::from_std(s.listener).map_err(err)?,
                        shared: s.shared,
                        inherited: true,
                    }
                }
                None => Bound {
                    key: *key,
                    socket: bind(key.0).map_err(err)?,
                    shared: false,
                    inherited: false,
                },
            };
            fresh.push(bound);
        }
        Ok(fresh)
    }

    /// Starts the accept loops of `bound` and stops the listeners not in `wanted`. Called after
    /// the runtime they serve with has been stored, so no connection meets the old one.
    /// Returns the accept loops stopped: once they are done, the sockets are closed.
    pub(crate) fn start(
        &self,
        shared: &Arc<Shared>,
        bound: Vec<Bound>,
        wanted: &[ListenKey],
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut map = self.lock();
        for Bound {
            key,
            socket,
            shared: held,
            inherited,
        } in bound
        {
            let local = socket.local_addr().unwrap_or(key.0);
            let stop = CancellationToken::new();
            tracing::info!(addr = %local, tls = key.1 == ListenerKind::Tls, inherited, "listening");
            let socket = Arc::new(socket);
            let task = tokio::spawn(accept_loop(
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
                    shared: held,
                    task: Some(task),
                },
            );
        }
        let mut stopped = Vec::new();
        map.retain(|key, e| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(addr = %e.local, "listener removed");
                e.close();
                stopped.extend(e.task.take());
            }
            keep
        });
        stopped
    }

    /// Stops every listener (draining): new connections are refused by the kernel at once.
    pub(crate) fn close_all(&self) {
        for (_, e) in self.lock().drain() {
            e.close();
        }
    }

    /// Lets the accept loops accept (once; they wait until then).
    pub(crate) fn open(&self) {
        self.open.cancel();
    }

    /// The token accept loops wait on before their first accept.
    pub(crate) fn opened(&self) -> CancellationToken {
        self.open.clone()
    }

    /// Stops every accept loop without shutting any socket down: the process that took them
    /// over keeps accepting on the same queues.
    pub(crate) fn release_all(&self) {
        for (_, e) in self.lock().drain() {
            e.stop.cancel();
        }
        if let Some(e) = self.admin_lock().take() {
            e.stop.cancel();
        }
    }

    /// Binds (or takes from `inherited`) the admin listener; its accept loop stops with the
    /// token returned.
    pub(crate) async fn bind_admin(
        &self,
        addr: SocketAddr,
        inherited: &mut Inherited,
    ) -> io::Result<(Arc<TcpListener>, CancellationToken)> {
        let (socket, shared) = match inherited.take(addr, crate::inherited::Kind::Admin) {
            Some(s) => {
                s.listener.set_nonblocking(true)?;
                (TcpListener::from_std(s.listener)?, s.shared)
            }
            None => (TcpListener::bind(addr).await?, false),
        };
        let socket = Arc::new(socket);
        let stop = CancellationToken::new();
        *self.admin_lock() = Some(Entry {
            local: socket.local_addr()?,
            stop: stop.clone(),
            socket: socket.clone(),
            shared,
            task: None,
        });
        Ok((socket, stop))
    }

    fn admin_lock(&self) -> std::sync::MutexGuard<'_, Option<Entry>> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A duplicate of every listening socket with the name it goes by in `LISTEN_FDNAMES`,
    /// for the process an upgrade starts.
    pub(crate) fn duplicates(&self) -> std::io::Result<Vec<(std::os::fd::OwnedFd, String)>> {
        use crate::inherited::{Kind, OWN, SHARED};
        use std::os::fd::AsFd;
        let map = self.lock();
        let admin = self.admin_lock();
        let listeners = map.iter().map(|(k, e)| (Kind::of_listener(k.1), e));
        listeners
            .chain(admin.iter().map(|e| (Kind::Admin, e)))
            .map(|(kind, e)| {
                let owner = if e.shared { SHARED } else { OWN };
                Ok((
                    e.socket.as_fd().try_clone_to_owned()?,
                    format!("{owner}.{}", kind.name()),
                ))
            })
            .collect()
    }

    /// Bound addresses and whether each is TLS.
    pub(crate) fn local_addrs(&self) -> Vec<(SocketAddr, bool)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(k, e)| (e.local, k.1 == ListenerKind::Tls))
            .collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ListenKey, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Binds a listening socket; IPv6 sockets are v6-only so `0.0.0.0` and `[::]` can share a port.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
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

/// Accepts until `stop`, handing each connection to `on_accept`. Errors that concern one
/// connection are skipped; others (out of file descriptors or memory) back off, up to a
/// second, rather than spin.
pub(crate) async fn accept_with_backoff(
    listener: &TcpListener,
    open: &CancellationToken,
    stop: &CancellationToken,
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    tokio::select! {
        biased;
        _ = stop.cancelled() => return,
        _ = open.cancelled() => {}
    }
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
                on_accept(tcp, peer);
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
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

async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    kind: ListenerKind,
    stop: CancellationToken,
) {
    let open = shared.listeners.opened();
    accept_with_backoff(&listener, &open, &stop, |tcp, peer| {
        admit(&shared, tcp, peer, kind)
    })
    .await;
}

/// Admission right after accept: the per-address rate and cap, before any TLS work. With
/// `proxy_protocol` it waits for the header, which names the address to count.
fn admit(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr, kind: ListenerKind) {
    if shared.drain.refuses_new() {
        return;
    }
    let accepted = Instant::now();
    let rt = shared.runtime.load_full();
    let id = shared.next_id();
    let permit = if rt.config.server.proxy_protocol {
        None
    } else {
        match shared.admission.admit(peer.ip()) {
            Ok(p) => Some(p),
            Err(refusal) => {
                tracing::info_span!("conn", id, client = %peer)
                    .in_scope(|| reject::record(shared, refusal));
                return;
            }
        }
    };
    let accept = Accepted {
        shared: shared.clone(),
        rt,
        tcp,
        peer,
        kind,
        id,
        accepted,
    };
    shared.tasks.spawn(connection(accept, permit));
}

/// A socket just accepted, before its client is known for sure (PROXY header) and admitted.
struct Accepted {
    shared: Arc<Shared>,
    rt: Arc<Runtime>,
    tcp: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    id: u64,
    accepted: Instant,
}

async fn connection(a: Accepted, permit: Option<Permit>) {
    let Accepted {
        shared,
        rt,
        mut tcp,
        peer,
        kind,
        id,
        accepted,
    } = a;
    let deadline = accepted + rt.config.server.handshake_timeout;
    let _ = tcp.set_nodelay(true);
    let (client, permit) = match permit {
        Some(p) => (peer, p),
        None => {
            let header = tokio::time::timeout_at(
                deadline,
                crate::proxy_protocol::read_header(&mut tcp, peer),
            )
            .await;
            let span = || tracing::info_span!("conn", id, client = %peer);
            let client = match header {
                Ok(Ok(addr)) => addr,
                Ok(Err(e)) => {
                    span().in_scope(|| {
                        tracing::debug!(error = %e, "bad PROXY header");
                        reject::record(&shared, Refusal::ProxyHeader);
                    });
                    return;
                }
                Err(_) => {
                    span().in_scope(|| reject::record(&shared, Refusal::HandshakeTimeout));
                    return;
                }
            };
            match shared.admission.admit(client.ip()) {
                Ok(p) => (client, p),
                Err(refusal) => {
                    tracing::info_span!("conn", id, client = %client)
                        .in_scope(|| reject::record(&shared, refusal));
                    return;
                }
            }
        }
    };
    let span = conn::span(id, client);
    let conn = Conn {
        _open: OpenGauge::new(shared.clone()),
        id,
        client,
        local: tcp.local_addr().unwrap_or(peer),
        listener: kind,
        accepted,
        permit,
        rt,
        shared: shared.clone(),
        span: span.clone(),
        client_cert: None,
        tls_config: None,
    };
    let tunnel = handshake(conn, tcp, deadline).instrument(span).await;
    // A task of its own: this one's state is sized for the handshake and HTTP forwarding,
    // several times what an idle tunnel needs, and would stay allocated as long as the tunnel.
    if let Some(t) = tunnel {
        shared.tasks.spawn(t.run());
    }
}

/// TLS (on a TLS listener) within the deadline, then the requests.
async fn handshake(
    mut conn: Conn,
    tcp: TcpStream,
    deadline: Instant,
) -> Option<crate::tunnel::Tunnel> {
    let stream = match conn.listener {
        ListenerKind::Plain => Either::Right(tcp),
        ListenerKind::Tls => {
            let Some(tls_config) = conn.rt.tls.clone() else {
                // Runtime::build gives every configuration with a TLS listener a TLS config,
                // and listeners start only after their runtime is stored.
                tracing::error!("TLS listener without a TLS configuration");
                return None;
            };
            if plain_http_on_tls_port(&tcp, deadline).await {
                crate::downstream::refuse(&conn, tcp, Refusal::PlainHttpOnTls).await;
                return None;
            }
            let shared = conn.shared.clone();
            let failed = |e: &std::io::Error| {
                let reason = crate::tls::failure_reason(e);
                shared.metrics.tls_failure(reason);
                tracing::debug!(error = %e, reason, "TLS handshake failed");
            };
            match tokio::time::timeout_at(deadline, ServerTls::accept(tcp, &tls_config, failed))
                .await
            {
                Ok(Ok(None)) => return None,
                Ok(Ok(Some((s, used)))) => {
                    if let Some(leaf) = s.peer_leaf() {
                        conn.client_cert =
                            crate::tls::client_cert::ClientCert::from_der(leaf).map(Box::new);
                        if conn.client_cert.is_none() {
                            tracing::warn!(
                                "a verified client certificate could not be read; treated as none"
                            );
                        }
                    }
                    conn.tls_config = used;
                    Either::Left(Box::new(s))
                }
                Ok(Err(_)) => return None,
                Err(_) => {
                    reject::record(&conn.shared, Refusal::HandshakeTimeout);
                    return None;
                }
            }
        }
    };
    if crate::http2::negotiated(&stream) {
        // Its tunnels are streams of this connection, run as tasks of their own.
        crate::http2::serve(conn, stream).await;
        return None;
    }
    crate::downstream::serve(conn, stream).await
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

/// Keeps the open-connections gauge right however the connection ends.
pub(crate) struct OpenGauge(Arc<Shared>);

impl OpenGauge {
    fn new(s: Arc<Shared>) -> Self {
        s.metrics.client_connections.inc();
        s.stats.connection_opened();
        OpenGauge(s)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.metrics.client_connections.dec();
        self.0.stats.connection_closed();
    }
}
