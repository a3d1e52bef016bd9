//! The client side of HTTP/1.1, after accept and TLS: every request head on a connection is
//! read by [`head`] (exactly `max_request_head`, the first within `handshake_timeout` of the
//! accept, later ones within `handshake_timeout` of the previous response), decided by
//! [`crate::request::decide`], then either becomes a tunnel ([`crate::tunnel`]) or is forwarded
//! ([`crate::forward`]) with its body framed by [`body`] and the answer written by
//! [`response`]. Refusals are answered, the write side shut and what the client still sends
//! read off before closing, so the answer is not lost to a TCP reset (RFC 9112 section 9.6).

pub(crate) mod body;
pub(crate) mod head;
pub(crate) mod response;

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::auth::Denied;
use crate::conn::{ClientStream, Conn};
use crate::reject::{self, Refusal};
use crate::request::{self, Decision, Kind};
use crate::tunnel::{self, Opened, Tunnel};
use head::HeadError;

/// How long an early answer waits for the client to stop sending before closing.
const LINGER: Duration = Duration::from_secs(2);
/// How much an early answer reads off the client at most before closing.
const LINGER_BYTES: usize = 1 << 20;

/// A client connection speaking HTTP/1.1.
pub(crate) struct Downstream {
    pub(crate) stream: ClientStream,
    /// Bytes read past the last request head: the start of its body, pipelined requests.
    /// Emptied and unallocated while the connection waits for its next request.
    pub(crate) buf: BytesMut,
    /// Pooled backend connections were opened with a PROXY header naming this client: they
    /// are dropped with the connection.
    pub(crate) pooled_with_proxy: bool,
}

/// What the connection does after a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Read the next request.
    KeepAlive,
    /// Close: the client asked, the framing requires it, a tunnel ended, or the exchange broke.
    Close,
}

/// How a request was answered, for the connection's closing log line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served {
    pub(crate) next: Next,
    pub(crate) status: u16,
}

/// Serves the requests of one connection until it closes or drains, or returns the tunnel it
/// became (run by the caller, outside the connection's span).
pub(crate) async fn serve(conn: Conn, stream: ClientStream) -> Option<Tunnel> {
    let mut d = Downstream {
        stream,
        buf: BytesMut::new(),
        pooled_with_proxy: false,
    };
    let server = &conn.rt.config.server;
    let limit = server.max_request_head;
    let mut requests = 0u64;
    let mut last_status = 0u16;
    let end = loop {
        let first = requests == 0;
        let deadline = if first {
            conn.accepted + server.handshake_timeout
        } else {
            Instant::now() + server.handshake_timeout
        };
        let read =
            tokio::time::timeout_at(deadline, head::read_head(&mut d.stream, &mut d.buf, limit));
        let head = if first {
            read.await
        } else {
            // An idle keep-alive connection is closed at once when draining begins.
            tokio::select! {
                r = read => r,
                _ = conn.shared.drain.started() => break "draining",
            }
        };
        let mut parts = match head {
            Err(_) => {
                // A client that started a head and stalled is as slow as a slowloris.
                if first || !d.buf.is_empty() {
                    reject::record(&conn.shared, Refusal::HandshakeTimeout);
                }
                break "timeout";
            }
            Ok(Err(HeadError::Closed)) => break "closed",
            Ok(Err(HeadError::Io)) => break "connection error",
            Ok(Err(HeadError::Refused(r))) => {
                refuse(&conn, d.stream, r).await;
                return None;
            }
            Ok(Ok(p)) => p,
        };
        if first {
            conn.shared
                .metrics
                .handshake_seconds
                .observe(conn.accepted.elapsed().as_secs_f64());
        }
        if d.buf.is_empty() {
            d.buf = BytesMut::new();
        }
        requests += 1;
        // HTTP-01 (`[acme]`): a validator's request for a token out is answered here, before
        // routing; any other path under /.well-known/acme-challenge/ is routed as usual.
        if conn.listener == crate::conn::ListenerKind::Plain
            && parts.method == http::Method::GET
            && let Some(key_auth) = conn.shared.acme.certs.http_answer(parts.uri.path())
        {
            let mut out = Vec::with_capacity(160 + key_auth.len());
            out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n");
            out.extend_from_slice(
                format!(
                    "content-length: {}\r\nconnection: close\r\n\r\n",
                    key_auth.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(key_auth.as_bytes());
            {
                let _g = conn.span.enter();
                tracing::debug!(path = parts.uri.path(), "HTTP-01 challenge answered");
            }
            answer_and_close(d.stream, &out).await;
            log_close(&conn, requests, 200, "closed");
            return None;
        }
        let rt = conn.rt.clone();
        let served = match request::decide(&conn, &rt, &mut parts).await {
            Ok(Decision {
                kind: Kind::Upgrade,
                route,
                identity,
            }) => match tunnel::open(&conn, &mut d, parts, route, identity).await {
                Ok(Opened::Tunnel(p)) => return Some(Tunnel::new(conn, d, *p)),
                Ok(Opened::Answered(s)) => Ok(s),
                Err(r) => Err(r.into()),
            },
            Ok(Decision {
                kind: Kind::Forward,
                route,
                ..
            }) => crate::forward::exchange(&conn, &mut d, parts, route)
                .await
                .map_err(Denied::from),
            Err(denied) => Err(denied),
        };
        match served {
            Err(Denied {
                refusal,
                answer: Some(answer),
            }) => {
                refuse_with(&conn, d.stream, refusal, *answer).await;
                return None;
            }
            Err(Denied { refusal, .. }) => {
                refuse(&conn, d.stream, refusal).await;
                return None;
            }
            Ok(s) => {
                last_status = s.status;
                if s.next == Next::Close {
                    break "closed";
                }
            }
        }
    };
    log_close(&conn, requests, last_status, end);
    if d.pooled_with_proxy {
        conn.shared.pool.forget_client(conn.id);
    }
    None
}

fn log_close(conn: &Conn, requests: u64, status: u16, reason: &str) {
    let _g = conn.span.enter();
    tracing::info!(
        requests,
        status,
        duration_ms = conn.accepted.elapsed().as_millis() as u64,
        reason,
        "connection closed"
    );
}

/// Counts and logs a refusal, answers it if it has an answer, and closes.
pub(crate) async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(conn: &Conn, stream: S, r: Refusal) {
    {
        let _g = conn.span.enter();
        reject::record(&conn.shared, r);
    }
    if let Some(answer) = r.to_http1() {
        answer_and_close(stream, &answer).await;
    }
}

/// Counts and logs a refusal whose answer came from elsewhere (an auth service), writes that
/// answer and closes.
pub(crate) async fn refuse_with<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &Conn,
    stream: S,
    r: Refusal,
    answer: http::Response<bytes::Bytes>,
) {
    {
        let _g = conn.span.enter();
        reject::record(&conn.shared, r);
    }
    let (parts, body) = answer.into_parts();
    let mut headers = parts.headers;
    headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(body.len()),
    );
    let plan = response::Plan {
        framing: response::OutFraming::Length,
        keep_alive: false,
    };
    let mut out = Vec::with_capacity(256 + body.len());
    response::encode_head(
        parts.status,
        http::Version::HTTP_11,
        &headers,
        plan,
        &mut out,
    );
    out.extend_from_slice(&body);
    answer_and_close(stream, &out).await;
}

/// Writes `answer`, shuts the write side, reads off what the client still sends (bounded in
/// time and bytes), then drops the connection.
pub(crate) async fn answer_and_close<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, answer: &[u8]) {
    let sent = async {
        io.write_all(answer).await?;
        io.flush().await?;
        io.shutdown().await
    };
    if tokio::time::timeout(LINGER, sent).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}
