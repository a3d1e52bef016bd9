//! The backend side: connecting (TCP or Unix socket, within `connect_timeout`, the next backend
//! on failure), the headers a backend receives ([`headers`]), the WebSocket Upgrade and the
//! check of its 101 ([`upgrade`]), and the keep-alive pool for plain HTTP ([`pool`]).

pub(crate) mod headers;
pub(crate) mod pool;
pub(crate) mod tls;
pub(crate) mod upgrade;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

use crate::config::Backend;

/// A cleartext connection to a backend: TCP (left) or a Unix domain socket (right).
pub(crate) type PlainStream = Either<TcpStream, UnixStream>;
/// A connection to a backend: cleartext (left) or TLS over TCP (right).
pub(crate) type BackendStream =
    Either<PlainStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// What a connection to a backend starts with.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Proxy {
    /// Nothing: the request comes first.
    None,
    /// A PROXY v2 header naming this client (and the address it connected to).
    Client {
        client: SocketAddr,
        local: SocketAddr,
    },
    /// A PROXY v2 `LOCAL` header: the gateway's own connection (health checks).
    Local,
}

/// How to reach one backend.
pub(crate) struct Dial<'a> {
    pub(crate) backend: &'a Backend,
    /// TLS client and the name to verify, for `backend_tls`.
    pub(crate) tls: Option<(&'a Arc<rustls::ClientConfig>, Option<&'a str>)>,
    pub(crate) proxy: Proxy,
}

/// Why a backend could not be reached.
#[derive(Debug)]
pub(crate) enum DialError {
    /// No connection within the timeout, or refused.
    Connect(io::Error),
    /// The TLS handshake or the certificate's verification failed.
    Tls(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Connect(e) => write!(f, "{e}"),
            DialError::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

/// Connects to one backend within `timeout`: TCP or Unix socket, then the PROXY header, then
/// TLS when the route asks for it.
pub(crate) async fn dial(d: &Dial<'_>, timeout: Duration) -> Result<BackendStream, DialError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let connect = async {
        let mut plain: PlainStream = match d.backend {
            Backend::Tcp(addr) => {
                let s = TcpStream::connect(addr.as_str())
                    .await
                    .map_err(DialError::Connect)?;
                s.set_nodelay(true).map_err(DialError::Connect)?;
                Either::Left(s)
            }
            Backend::Unix(path) => Either::Right(
                UnixStream::connect(path)
                    .await
                    .map_err(DialError::Connect)?,
            ),
        };
        let header = match d.proxy {
            Proxy::None => None,
            Proxy::Client { client, local } => {
                Some(crate::proxy_protocol::encode_v2(client, local))
            }
            Proxy::Local => Some(crate::proxy_protocol::encode_v2_local()),
        };
        if let Some(h) = header {
            plain.write_all(&h).await.map_err(DialError::Connect)?;
        }
        Ok(plain)
    };
    let plain = tokio::time::timeout_at(deadline, connect)
        .await
        .map_err(|_| {
            DialError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        })??;
    let Some((cfg, name)) = d.tls else {
        return Ok(Either::Left(plain));
    };
    let Either::Left(tcp) = plain else {
        return Err(DialError::Tls("TLS to a unix socket".into()));
    };
    let name = tls::server_name(d.backend, name).map_err(DialError::Tls)?;
    // A backend that accepts and then stalls the handshake is a TLS failure, not a dead one.
    let handshake = tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp);
    let s = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| DialError::Tls("handshake timed out".into()))?
        .map_err(|e| DialError::Tls(e.to_string()))?;
    Ok(Either::Right(Box::new(s)))
}
