//! Plain HTTP forwarding: one request of a client connection sent to a route's backend over the
//! keep-alive pool, its body streamed up as the client sends it while the response streams
//! down as the backend produces it. A client whose body framing breaks is answered 400 (and
//! the backend's request abandoned, never ended as if complete); a backend that fails before
//! its response head is 502, one too slow 504.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::backends::{health, sticky};
use crate::conn::Conn;
use crate::downstream::body::{self, Decoder, Framing, Step};
use crate::downstream::response::{self, BodyEnd, OutFraming};
use crate::downstream::{Downstream, Next, Served};
use crate::reject::{BodyError, Refusal};
use crate::route::RouteEntry;
use crate::upstream::DialError;
use crate::upstream::headers::{forward_headers, has_token, origin_form};
use crate::upstream::pool::{PoolKey, PooledBody, UpBody};

/// Room read from the client per read of a request body.
const BODY_READ: usize = 16 * 1024;

/// Forwards one plain request and relays its response.
pub(crate) async fn exchange(
    conn: &Conn,
    d: &mut Downstream,
    mut req: http::request::Parts,
    route: &RouteEntry,
) -> Result<Served, Refusal> {
    let framing = body::request_framing(&req.headers).map_err(Refusal::BadBody)?;
    let label = route.label();
    conn.note_route(&label);
    let cfg = &conn.rt.config.upstream;
    let pick = route.pick(conn.client.ip(), &req.headers, false)?;
    let sticky = sticky::take(&route.sticky, &mut req.headers);
    let mut headers = forward_headers(&req.headers, conn.client, conn.listener.proto());
    // The gateway answers 100-continue itself when it starts reading the body.
    let expect_continue = req.version == Version::HTTP_11
        && has_token(&req.headers, &header::EXPECT, "100-continue")
        && framing != Framing::Empty;
    headers.remove(header::EXPECT);
    let length = match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    let mut decoder = Decoder::new(framing, conn.rt.config.server.max_request_head);
    let pool = &conn.shared.pool;
    let mut refusal = Refusal::BackendUnavailable;
    for &i in &pick.order {
        let backend = &route.backends[i].label;
        let key = PoolKey::new(conn, route, i);
        // A stale pooled connection may fail before the request is sent; bodiless requests
        // are retried once on a fresh one.
        for attempt in 0..2 {
            // Counted from before the connect, so requests that arrive together see each other.
            let slot = route.states[i].request_slot();
            let Some((mut sender, reused)) = checkout(conn, route, i, &key, &mut refusal).await
            else {
                break;
            };
            if route.send_proxy_protocol {
                d.pooled_with_proxy = true;
            }
            conn.note_backend(backend);
            let Upstream { up, tx, abort } =
                upstream(&req, &headers, framing == Framing::Empty, length);
            if expect_continue && attempt == 0 {
                d.stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .map_err(|_| Refusal::BadBody(BodyError::Truncated))?;
            }
            let (mut rd, mut wr) = tokio::io::split(&mut d.stream);
            let buf = &mut d.buf;
            let mut upload = pin!(upload(&mut rd, buf, &mut decoder, tx, &abort));
            let mut uploaded: Option<Uploaded> = if framing == Framing::Empty {
                Some(Uploaded::Complete)
            } else {
                None
            };
            let mut send = pin!(tokio::time::timeout(
                cfg.response_timeout,
                sender.send_request(up)
            ));
            let sent = loop {
                tokio::select! {
                    r = &mut upload, if uploaded.is_none() => match r {
                        Ok(u) => uploaded = Some(u),
                        Err(e) => return Err(Refusal::BadBody(e)),
                    },
                    r = &mut send => break r,
                }
            };
            let retry = reused && framing == Framing::Empty && attempt == 0;
            let (mut parts, incoming) = match answered(sent, retry, backend)? {
                Some(r) => r.into_parts(),
                None => continue,
            };
            let status = parts.status;
            count(conn, route, status);
            if let Some(s) = &sticky {
                s.answer(&label, backend, &mut parts.headers);
            }
            let body = PooledBody::new(incoming, pool.clone(), key.clone(), sender, slot);
            let plan = plan_for(conn, &req, status, &parts.headers);
            let mut head = Vec::with_capacity(512);
            response::encode_head(status, req.version, &parts.headers, plan, &mut head);
            let download = async {
                wr.write_all(&head).await.map_err(|_| BodyEnd::Client)?;
                response::write_body(&mut wr, body, plan.framing).await
            };
            let mut download = pin!(download);
            let written = loop {
                tokio::select! {
                    r = &mut upload, if uploaded.is_none() => match r {
                        Ok(u) => uploaded = Some(u),
                        // The answer is under way: the connection can only be closed.
                        Err(_) => return Ok(served(Next::Close, status)),
                    },
                    r = &mut download => break r,
                }
            };
            let next = match (written, uploaded) {
                (Ok(()), Some(Uploaded::Complete)) if plan.keep_alive => Next::KeepAlive,
                (Err(BodyEnd::Backend), _) => {
                    tracing::warn!(backend = %backend, "backend response body broke off");
                    Next::Close
                }
                _ => Next::Close,
            };
            return Ok(served(next, status.as_u16()));
        }
        if decoder.started() {
            break;
        }
    }
    Err(refusal)
}

/// What became of a request sent over a pooled connection: the backend's answer, `None` when
/// the connection failed before answering and `retry` allows a fresh one (a stale pooled
/// connection, a bodiless request), or the refusal.
pub(crate) fn answered(
    sent: Result<hyper::Result<Response<hyper::body::Incoming>>, tokio::time::error::Elapsed>,
    retry: bool,
    backend: &str,
) -> Result<Option<Response<hyper::body::Incoming>>, Refusal> {
    match sent {
        Err(_) => Err(Refusal::BackendTimeout),
        Ok(Err(e)) if retry => {
            tracing::debug!(backend = %backend, error = %e, "pooled connection failed; retrying");
            Ok(None)
        }
        Ok(Err(e)) => {
            tracing::warn!(backend = %backend, error = %e, "backend request failed");
            // A body already on its way cannot be sent to another backend.
            Err(Refusal::BackendUnavailable)
        }
        Ok(Ok(r)) if r.status() == StatusCode::SWITCHING_PROTOCOLS => {
            tracing::warn!(backend = %backend, "backend switched protocols on a plain request");
            Err(Refusal::BackendUnavailable)
        }
        Ok(Ok(r)) => Ok(Some(r)),
    }
}

/// A request toward a backend, its body fed through `tx` as the client sends it.
pub(crate) struct Upstream {
    pub(crate) up: Request<UpBody>,
    /// `None` for a bodiless request.
    pub(crate) tx: Option<mpsc::Sender<Bytes>>,
    /// Set when the client's body broke: the backend's request is abandoned, never ended as
    /// if complete.
    pub(crate) abort: Arc<AtomicBool>,
}

/// The backend's request for client request `req`: its method, its target in origin form,
/// `headers`, and a body of `length` (chunked when unknown) unless it is `empty`.
pub(crate) fn upstream(
    req: &http::request::Parts,
    headers: &HeaderMap,
    empty: bool,
    length: Option<u64>,
) -> Upstream {
    let abort = Arc::new(AtomicBool::new(false));
    let (tx, body) = if empty {
        (None, UpBody::Empty)
    } else {
        let (tx, rx) = mpsc::channel(2);
        let body = UpBody::Stream {
            rx,
            length,
            aborted: abort.clone(),
        };
        (Some(tx), body)
    };
    let mut up = Request::new(body);
    *up.method_mut() = req.method.clone();
    *up.uri_mut() = origin_form(&req.uri);
    *up.headers_mut() = headers.clone();
    Upstream { up, tx, abort }
}

/// A pooled connection to backend `i` of `route` (and whether it was reused), or `None` when
/// it cannot be reached: logged, counted as a failed health check, and `refusal` set to what
/// the client is to get if no backend can be.
pub(crate) async fn checkout(
    conn: &Conn,
    route: &RouteEntry,
    i: usize,
    key: &PoolKey,
    refusal: &mut Refusal,
) -> Option<(hyper::client::conn::http1::SendRequest<UpBody>, bool)> {
    let dial = crate::tunnel::dial_for(conn, route, i);
    let timeout = conn.rt.config.upstream.connect_timeout;
    match conn.shared.pool.checkout(key, &dial, timeout).await {
        Ok(s) => Some(s),
        Err(e) => {
            if let DialError::Tls(_) = e {
                *refusal = Refusal::BackendTls;
            }
            let backend = &route.backends[i].label;
            tracing::warn!(backend = %backend, error = %e, "backend connect failed");
            health::connect_failed(&conn.shared, route, &route.states[i], e.to_string());
            None
        }
    }
}

fn served(next: Next, status: impl Into<u16>) -> Served {
    Served {
        next,
        status: status.into(),
    }
}

/// The framing and keep-alive of a response on this hop.
fn plan_for(
    conn: &Conn,
    req: &http::request::Parts,
    status: StatusCode,
    headers: &HeaderMap,
) -> response::Plan {
    let keep = response::wants_keep_alive(req) && !conn.shared.drain.is_draining();
    response::plan(&req.method, req.version, keep, status, headers)
}

pub(crate) fn count(conn: &Conn, route: &RouteEntry, status: StatusCode) {
    conn.shared
        .metrics
        .http_requests
        .get_or_create(&crate::metrics::RequestLabel {
            route: route.label(),
            status: status_class(status.as_u16()),
        })
        .inc();
}

/// A backend's answer to an Upgrade that was not a 101, relayed to the client as it is.
pub(crate) async fn relay_refusal<B>(
    conn: &Conn,
    d: &mut Downstream,
    req: &http::request::Parts,
    resp: Response<B>,
) -> Served
where
    B: Body<Data = Bytes> + Unpin,
{
    let (parts, body) = resp.into_parts();
    let plan = plan_for(conn, req, parts.status, &parts.headers);
    let mut head = Vec::with_capacity(512);
    response::encode_head(parts.status, req.version, &parts.headers, plan, &mut head);
    let ok = async {
        d.stream
            .write_all(&head)
            .await
            .map_err(|_| BodyEnd::Client)?;
        response::write_body(&mut d.stream, body, plan.framing).await
    }
    .await
    .is_ok();
    let next = if ok && plan.keep_alive && plan.framing != OutFraming::UntilClose {
        Next::KeepAlive
    } else {
        Next::Close
    };
    served(next, parts.status.as_u16())
}

/// How the upload of a request body ended (short of an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Uploaded {
    /// The whole body was read and handed over: the connection is in step for the next request.
    Complete,
    /// The backend stopped taking it (it answered early): the rest was not read.
    Abandoned,
}

/// Reads the request body off the client and feeds it to the backend request. On a framing
/// error the backend's body is aborted, so a truncated body never looks complete to it.
async fn upload<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    decoder: &mut Decoder,
    tx: Option<mpsc::Sender<Bytes>>,
    abort: &AtomicBool,
) -> Result<Uploaded, BodyError> {
    let Some(tx) = tx else {
        return Ok(Uploaded::Complete);
    };
    let fail = |e| {
        abort.store(true, Ordering::Release);
        Err(e)
    };
    loop {
        match decoder.decode(buf) {
            Err(e) => return fail(e),
            Ok(Step::Done) => return Ok(Uploaded::Complete),
            Ok(Step::Data(b)) => {
                if tx.send(b).await.is_err() {
                    return Ok(Uploaded::Abandoned);
                }
            }
            Ok(Step::NeedMore) => {
                buf.reserve(BODY_READ);
                match rd.read_buf(buf).await {
                    Ok(0) | Err(_) => return fail(BodyError::Truncated),
                    Ok(_) => {}
                }
            }
        }
    }
}

fn status_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
