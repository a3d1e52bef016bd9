//! The backend side: connecting (TCP or Unix socket, within `connect_timeout`, the next backend
//! on failure), the headers a backend receives ([`headers`]), the WebSocket Upgrade and the
//! check of its 101 ([`upgrade`]), and the keep-alive pool for plain HTTP ([`pool`]).

pub(crate) mod headers;
pub(crate) mod pool;
pub(crate) mod upgrade;

use std::io;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

use crate::config::Backend;
use crate::reject::Refusal;

/// A connection to a backend: TCP (left) or a Unix domain socket (right).
pub(crate) type BackendStream = Either<TcpStream, UnixStream>;

/// Connects to one backend within `timeout`.
pub(crate) async fn connect(backend: &Backend, timeout: Duration) -> io::Result<BackendStream> {
    let fut = async {
        match backend {
            Backend::Tcp(addr) => {
                let s = TcpStream::connect(addr.as_str()).await?;
                s.set_nodelay(true)?;
                Ok(Either::Left(s))
            }
            Backend::Unix(path) => Ok(Either::Right(UnixStream::connect(path).await?)),
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Connects to the first backend of `order` that accepts within `timeout` each.
pub(crate) async fn connect_any<'a>(
    order: impl Iterator<Item = &'a Backend>,
    timeout: Duration,
) -> Result<(BackendStream, &'a Backend), Refusal> {
    for backend in order {
        match connect(backend, timeout).await {
            Ok(s) => return Ok((s, backend)),
            Err(e) => tracing::warn!(backend = %backend, error = %e, "backend connect failed"),
        }
    }
    Err(Refusal::BackendUnavailable)
}
