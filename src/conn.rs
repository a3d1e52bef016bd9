//! The connection context: what every stage after accept needs to know about one client
//! connection (its id, addresses, listener, admission permit, the configuration snapshot it
//! runs under and its tracing span), and the client stream types.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::either::Either;

use crate::limits::Permit;
use crate::server::{Runtime, Shared};
use crate::tls::stream::ServerTls;

/// A client connection: over TLS (left) or cleartext (right).
pub(crate) type ClientStream = Either<Box<ServerTls>, TcpStream>;

/// Which kind of listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum ListenerKind {
    /// `listen`: TLS (wss, https).
    Tls,
    /// `listen_plain`: cleartext (ws, http).
    Plain,
}

impl ListenerKind {
    /// The scheme the client used, as forwarding headers name it.
    pub(crate) fn proto(self) -> &'static str {
        match self {
            ListenerKind::Tls => "https",
            ListenerKind::Plain => "http",
        }
    }
}

/// One admitted client connection.
///
/// Invariant: `permit` is held for as long as the connection (and the tunnel it may become)
/// lives, so admission counts stay right however the task ends.
pub(crate) struct Conn {
    /// Process-unique connection number (also the tunnel id in logs).
    pub(crate) id: u64,
    /// The client's address: the socket's peer, or the PROXY header's source.
    pub(crate) client: SocketAddr,
    /// The local address the connection arrived on (a PROXY header to a backend names it).
    pub(crate) local: SocketAddr,
    pub(crate) listener: ListenerKind,
    /// When the socket was accepted.
    pub(crate) accepted: Instant,
    pub(crate) permit: Permit,
    /// The configuration snapshot taken at accept; later requests on a keep-alive connection
    /// and the tunnel keep it, so a reload never changes a connection mid-way.
    pub(crate) rt: Arc<Runtime>,
    pub(crate) shared: Arc<Shared>,
    /// `conn{id, client}`, with `route` and `backend` recorded once known.
    pub(crate) span: tracing::Span,
    /// Counts the connection open until the context (and the tunnel holding it) drops.
    pub(crate) _open: crate::listener::OpenGauge,
    /// Who connected, when the TLS handshake verified a client certificate.
    pub(crate) client_cert: Option<Box<crate::tls::client_cert::ClientCert>>,
    /// The TLS configuration the handshake used, kept only when names have configurations
    /// of their own (requests must name a host of the same one).
    pub(crate) tls_config: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Conn {
    /// Records the route (and backend, once chosen) on the connection's span.
    pub(crate) fn note_route(&self, route: &str) {
        self.span.record("route", route);
    }

    pub(crate) fn note_backend(&self, backend: &dyn std::fmt::Display) {
        self.span
            .record("backend", tracing::field::display(backend));
    }
}

/// The span every log line of a connection is written in.
pub(crate) fn span(id: u64, client: SocketAddr) -> tracing::Span {
    tracing::info_span!(
        "conn",
        id,
        client = %client,
        route = tracing::field::Empty,
        backend = tracing::field::Empty
    )
}
