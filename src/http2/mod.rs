//! The client side of HTTP/2, for TLS connections whose client chose `h2` by ALPN: the `h2`
//! crate runs the connection (its limits bound rapid resets, CONTINUATION and empty-DATA
//! floods, SETTINGS and PING floods, and end the offender with GOAWAY), and every stream is a
//! task of its own that walks the one decision path ([`crate::request::decide`]) as an
//! HTTP/1.1 request would. A plain request is forwarded to the route's HTTP/1.1 backend
//! through the shared pool, bodies streamed both ways under HTTP/2 flow control. An extended
//! CONNECT with `:protocol = websocket` (RFC 8441, with `[server] websocket_over_h2`) is
//! rewritten into an HTTP/1.1 Upgrade with a key of the gateway's before the decision path,
//! the backend's 101 checked against that key ([`crate::tunnel::reach`]), and the stream
//! answered 200 and relayed by the same relay as every tunnel, through [`StreamIo`].
//!
//! Invariant: the connection's own task keeps polling the `h2` connection for as long as any
//! stream lives (tunnels included), because that task is what moves every stream's frames;
//! it ends when the client goes or, after GOAWAY (drain, or idle with no stream), when the
//! last stream ends. [`watch`] counts the SETTINGS and PING frames h2 answers without a limit.

pub(crate) mod watch;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use base64::Engine;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::auth::Denied;
use crate::backends::sticky;
use crate::conn::{ClientStream, Conn};
use crate::reject::{self, BodyError, Refusal};
use crate::request::{self, Decision, Kind};
use crate::route::RouteEntry;
use crate::tunnel::{Reached, Tunnel};
use crate::upstream::headers::{forward_headers, strip_hop_by_hop};
use crate::upstream::pool::{PoolKey, PooledBody};

/// Per-stream receive window: what a client may send ahead of the backend taking it. Small,
/// so many streams cost little; the connection window lets several run at full speed.
const STREAM_WINDOW: u32 = 128 * 1024;
/// Connection receive window: sixteen full stream windows, so streams whose data waits (a
/// throttled tunnel, an upload the backend reads slowly) do not freeze their siblings.
const CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
/// What a stream may have queued toward the client beyond its flow-control window.
const SEND_BUFFER: usize = 64 * 1024;
/// Streams the client reset before the gateway accepted them; more end the connection
/// (rapid reset, CVE-2023-44487).
const PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the gateway had to reset for the client's errors; more end the connection.
const LOCAL_ERROR_RESETS: usize = 256;
/// Streams the client reset after the gateway took them up (each may have cost an auth call
/// and a backend connect): more in [`RESET_WINDOW`] end the connection, the rapid reset that
/// `PENDING_ACCEPT_RESETS` does not see.
const RESET_BUDGET: u32 = 200;
const RESET_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the alarm rang.
const WHY_FLOOD: u8 = 0;
const WHY_STALL: u8 = 1;
const WHY_RESETS: u8 = 2;

/// The client chose HTTP/2 on this connection.
pub(crate) fn negotiated(stream: &ClientStream) -> bool {
    matches!(stream, tokio_util::either::Either::Left(tls) if tls.alpn_h2())
}

/// What the streams of one connection share.
struct Shared {
    conn: Conn,
    /// Pooled backend connections were opened with a PROXY header naming this client.
    pooled_with_proxy: AtomicBool,
    /// Rung when the connection is to end for abuse: a control-frame flood ([`watch`]) or a
    /// response the client let stall ([`Shared::stall`]).
    alarm: Arc<tokio::sync::Notify>,
    /// A response waited longer than this for the client to open its window: the client
    /// holds a backend connection hostage without reading, a slowloris in reverse.
    stall: std::time::Duration,
    /// Why the alarm rang (`WHY_*`).
    why: std::sync::atomic::AtomicU8,
    /// When the client last sent anything: a stall on a connection whose client is alive
    /// ends only that stream.
    activity: Arc<watch::Activity>,
    /// Client resets of taken-up streams in the current window: its start and count.
    resets: std::sync::Mutex<(Option<Instant>, u32)>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last stream task is done too: no pooled connection of this client's can be
        // handed back any more.
        if self.pooled_with_proxy.load(Ordering::Relaxed) {
            self.conn.shared.pool.forget_client(self.conn.id);
        }
    }
}

/// Serves one HTTP/2 connection until the client goes, or until it drains or idles and its
/// last stream ends.
pub(crate) async fn serve(conn: Conn, io: ClientStream) {
    let server = &conn.rt.config.server;
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(server.h2_max_concurrent_streams)
        // Twice the limit, so a list over it still reaches the decision below and its 431 is
        // counted and logged like every refusal; h2 answers lists beyond that itself.
        .max_header_list_size(
            u32::try_from(server.max_request_head.saturating_mul(2)).unwrap_or(u32::MAX),
        )
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS));
    if server.websocket_over_h2 {
        b.enable_connect_protocol();
    }
    let idle_after = server.handshake_timeout;
    let deadline = conn.accepted + server.handshake_timeout;
    let alarm = Arc::new(tokio::sync::Notify::new());
    let activity = Arc::new(watch::Activity::new());
    let io = watch::Watch::new(io, alarm.clone(), activity.clone());
    let mut h2c = match tokio::time::timeout_at(deadline, b.handshake::<_, Bytes>(io)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "HTTP/2 preface failed");
            return;
        }
        Err(_) => {
            reject::record(&conn.shared, Refusal::HandshakeTimeout);
            return;
        }
    };
    let shared = Arc::new(Shared {
        conn,
        pooled_with_proxy: AtomicBool::new(false),
        alarm: alarm.clone(),
        stall: idle_after,
        why: std::sync::atomic::AtomicU8::new(WHY_FLOOD),
        activity,
        resets: std::sync::Mutex::new((None, 0)),
    });
    let drain = shared.conn.shared.drain.started();
    tokio::pin!(drain);
    let mut goaway = false;
    // After GOAWAY, how long the connection may take to end: a client that never answers the
    // GOAWAY's PING, or never reads what is queued for it, must not hold its permit forever.
    let mut hard: Option<(Instant, bool)> = None;
    let far = || Instant::now() + std::time::Duration::from_secs(24 * 3600);
    let mut streams = 0u64;
    let idle = tokio::time::sleep(idle_after);
    tokio::pin!(idle);
    let end = loop {
        tokio::select! {
            next = h2c.accept() => match next {
                Some(Ok((req, respond))) => {
                    if streams == 0 {
                        shared.conn.shared
                            .metrics
                            .handshake_seconds
                            .observe(shared.conn.accepted.elapsed().as_secs_f64());
                    }
                    streams += 1;
                    idle.as_mut().reset(Instant::now() + idle_after);
                    let s = shared.clone();
                    shared.conn.shared.tasks.spawn(
                        stream(s, req, respond).instrument(shared.conn.span.clone()),
                    );
                }
                Some(Err(e)) => {
                    if e.is_go_away() && e.is_library() {
                        // The h2 crate's own limits: a flood, a malformed frame.
                        tracing::info!(error = %e, "HTTP/2 connection ended for a protocol error");
                        break "protocol error";
                    }
                    break if e.is_io() { "connection error" } else { "closed" };
                }
                None => break "closed",
            },
            () = alarm.notified(), if !matches!(hard, Some((_, true))) => {
                match shared.why.load(Ordering::Relaxed) {
                    WHY_STALL => tracing::info!("HTTP/2 connection ended: a response stalled on a window the client kept shut"),
                    WHY_RESETS => tracing::info!("HTTP/2 connection ended for resetting too many streams"),
                    _ => tracing::info!("HTTP/2 connection ended for a SETTINGS or PING flood"),
                }
                h2c.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                goaway = true;
                hard = Some((Instant::now() + idle_after, true));
            }
            () = &mut drain, if !goaway => {
                // No new streams; tunnels get their spread Close 1001 from the drain like
                // every tunnel, and the connection ends with its last stream (the process
                // ends at the grace in any case).
                h2c.graceful_shutdown();
                goaway = true;
            }
            () = &mut idle, if !goaway => {
                if h2c.has_streams() {
                    idle.as_mut().reset(Instant::now() + idle_after);
                } else {
                    h2c.graceful_shutdown();
                    goaway = true;
                    hard = Some((Instant::now() + idle_after, false));
                }
            }
            () = tokio::time::sleep_until(hard.map_or_else(far, |h| h.0)), if hard.is_some() => {
                let abrupt = hard.is_some_and(|h| h.1);
                if !abrupt && h2c.has_streams() {
                    // A stream that slipped in before the final GOAWAY is served to its end.
                    hard = Some((Instant::now() + idle_after, false));
                } else {
                    break "GOAWAY not answered";
                }
            }
        }
    };
    let conn = &shared.conn;
    {
        let _g = conn.span.enter();
        tracing::info!(
            protocol = "h2",
            streams,
            duration_ms = conn.accepted.elapsed().as_millis() as u64,
            reason = end,
            "connection closed"
        );
    }
    // When the client went, stream tasks still winding down outlive this one: the pooled
    // connections opened for this client go now rather than with the last of them (and
    // again then, harmlessly).
    if shared.pooled_with_proxy.load(Ordering::Relaxed) {
        conn.shared.pool.forget_client(conn.id);
    }
}

/// One stream: decided, then forwarded or tunnelled, or refused with its status.
async fn stream(s: Arc<Shared>, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let conn = &s.conn;
    let (mut parts, body) = req.into_parts();
    let head = parts.method == Method::HEAD;
    let websocket = parts.method == Method::CONNECT
        && parts
            .extensions
            .get::<h2::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if parts.method == Method::CONNECT && !websocket {
        // A plain CONNECT (a tunnel to anywhere) or another protocol: not a gateway's job.
        refuse(conn, head, &mut respond, Refusal::UpgradeMethod.into());
        return;
    }
    if header_list_size(&parts) > conn.rt.config.server.max_request_head {
        refuse(conn, head, &mut respond, Refusal::HeadTooLarge.into());
        return;
    }
    normalize(&mut parts, websocket);
    let rt = conn.rt.clone();
    // A client that resets while the gateway decides (an auth call) stops that work at once,
    // and counts toward the reset budget.
    let decided = tokio::select! {
        d = request::decide(conn, &rt, &mut parts) => d,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            s.client_reset();
            return;
        }
    };
    match decided {
        Err(denied) => refuse(conn, head, &mut respond, denied),
        Ok(Decision {
            kind: Kind::Upgrade,
            route,
            identity,
        }) if websocket => {
            if let Err(r) = tunnel(&s, parts, body, respond, route, identity).await {
                let mut respond = r.1;
                refuse(conn, false, &mut respond, r.0.into());
            }
        }
        Ok(Decision {
            kind: Kind::Forward,
            route,
            ..
        }) if !websocket => {
            if let Err(r) = forward(&s, parts, body, &mut respond, route).await {
                refuse(conn, head, &mut respond, r.into());
            }
        }
        // An Upgrade header is a connection-specific field that h2 refuses before this;
        // whatever else disagrees is a malformed request.
        Ok(_) => refuse(
            conn,
            head,
            &mut respond,
            Refusal::BadUpgrade(crate::reject::UpgradeDefect::NotHttp11).into(),
        ),
    }
}

/// The decoded header list's size as HTTP/2 counts it (RFC 9113 section 6.5.2: each field's
/// name and value plus 32), pseudo-header fields included.
fn header_list_size(parts: &http::request::Parts) -> usize {
    let field = |name: usize, value: usize| name + value + 32;
    let mut n = field(":method".len(), parts.method.as_str().len())
        + field(
            ":path".len(),
            parts.uri.path_and_query().map_or(1, |p| p.as_str().len()),
        )
        + field(":scheme".len(), parts.uri.scheme_str().map_or(0, str::len))
        + field(
            ":authority".len(),
            parts.uri.authority().map_or(0, |a| a.as_str().len()),
        );
    if let Some(p) = parts.extensions.get::<h2::ext::Protocol>() {
        n += field(":protocol".len(), p.as_str().len());
    }
    for (k, v) in &parts.headers {
        n += field(k.as_str().len(), v.len());
    }
    n
}

/// Makes an HTTP/2 request look like the HTTP/1.1 one it stands for, so the decision path
/// and the backend see the same thing whatever carried it: `Host` from `:authority`, the
/// cookie fields joined (RFC 9113 section 8.2.3), and for an extended CONNECT the Upgrade
/// fields with a key of the gateway's (checked against the backend's Accept).
fn normalize(parts: &mut http::request::Parts, websocket: bool) {
    if let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    let mut cookies = parts.headers.get_all(header::COOKIE).iter();
    if let (Some(first), Some(_)) = (cookies.next(), cookies.next()) {
        let mut joined = first.as_bytes().to_vec();
        for c in parts.headers.get_all(header::COOKIE).iter().skip(1) {
            joined.extend_from_slice(b"; ");
            joined.extend_from_slice(c.as_bytes());
        }
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            parts.headers.insert(header::COOKIE, v);
        }
    }
    if websocket {
        parts.method = Method::GET;
        parts.version = Version::HTTP_11;
        parts.extensions.remove::<h2::ext::Protocol>();
        let h = &mut parts.headers;
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        let mut key = [0u8; 16];
        // A key the client cannot choose: the Accept it proves the backend speaks WebSocket.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).is_ok()
            && let Ok(v) =
                HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(key))
        {
            h.insert(header::SEC_WEBSOCKET_KEY, v);
        }
    }
}

/// Counts and logs a refusal and answers the stream with it (or resets it when the refusal
/// has no answer).
fn refuse(conn: &Conn, head: bool, respond: &mut SendResponse<Bytes>, denied: Denied) {
    reject::record(&conn.shared, denied.refusal);
    if let Some(answer) = denied.answer {
        let (parts, body) = answer.into_parts();
        let mut resp = Response::new(());
        *resp.status_mut() = parts.status;
        *resp.headers_mut() = parts.headers;
        strip_response(resp.headers_mut());
        send_whole(respond, resp, body, head);
        return;
    }
    let Some(a) = denied.refusal.answer() else {
        respond.send_reset(Reason::REFUSED_STREAM);
        return;
    };
    let mut resp = Response::new(());
    *resp.status_mut() = a.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    for (k, v) in a.headers {
        if let (Ok(k), Ok(v)) = (
            header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    strip_response(h);
    let mut body = String::with_capacity(a.body.len() + 1);
    body.push_str(a.body);
    body.push('\n');
    send_whole(respond, resp, Bytes::from(body), head);
}

/// A small whole answer: head and body in one go (it fits any window worth having; h2
/// buffers the rest until the client opens its window). To a HEAD, the head alone.
fn send_whole(respond: &mut SendResponse<Bytes>, mut resp: Response<()>, body: Bytes, head: bool) {
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let body = if head { Bytes::new() } else { body };
    match respond.send_response(resp, body.is_empty()) {
        Ok(mut send) if !body.is_empty() => {
            let _ = send.send_data(body, true);
        }
        _ => {}
    }
}

/// Fields HTTP/2 forbids in a response (RFC 9113 section 8.2.2).
fn strip_response(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    h.remove(header::CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::UPGRADE);
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

/// Forwards one plain request to the route's backend and relays its answer on the stream.
async fn forward(
    s: &Shared,
    mut req: http::request::Parts,
    mut body: RecvStream,
    respond: &mut SendResponse<Bytes>,
    route: &RouteEntry,
) -> Result<(), Refusal> {
    let conn = &s.conn;
    let label = route.label();
    conn.note_route(&label);
    let cfg = &conn.rt.config.upstream;
    let pick = route.pick(conn.client.ip(), &req.headers, false)?;
    let sticky = sticky::take(&route.sticky, &mut req.headers);
    let mut headers = forward_headers(&req.headers, conn.client, conn.listener.proto());
    headers.remove(header::EXPECT);
    let empty = body.is_end_stream();
    let expect_continue = !empty
        && crate::upstream::headers::has_token(&req.headers, &header::EXPECT, "100-continue");
    let length = req
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if !empty && length.is_none() {
        // HTTP/1.1 frames a body of unknown length as chunked.
        headers.remove(header::CONTENT_LENGTH);
    }
    let pool = &conn.shared.pool;
    let mut refusal = Refusal::BackendUnavailable;
    for &i in &pick.order {
        let backend = &route.backends[i].label;
        let key = PoolKey::new(conn, route, i);
        for attempt in 0..2 {
            let slot = route.states[i].request_slot();
            let Some((mut sender, reused)) =
                crate::forward::checkout(conn, route, i, &key, &mut refusal).await
            else {
                break;
            };
            if route.send_proxy_protocol {
                s.pooled_with_proxy.store(true, Ordering::Relaxed);
            }
            conn.note_backend(backend);
            let crate::forward::Upstream { up, tx, abort } =
                crate::forward::upstream(&req, &headers, empty, length);
            if expect_continue && attempt == 0 {
                // The gateway answers 100-continue itself as it starts reading the body.
                let mut c = Response::new(());
                *c.status_mut() = StatusCode::CONTINUE;
                let _ = respond.send_informational(c);
            }
            let mut upload = std::pin::pin!(upload(&mut body, tx, &abort));
            // A body the backend is left without must not end as if complete.
            let give_up = |uploaded: bool| {
                if !uploaded {
                    abort.store(true, Ordering::Release);
                }
            };
            let mut uploaded = empty;
            let mut send = std::pin::pin!(tokio::time::timeout(
                cfg.response_timeout,
                sender.send_request(up)
            ));
            let sent = loop {
                tokio::select! {
                    // A reset breaks the upload too: seen as the reset it is, not a bad body.
                    biased;
                    _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
                        give_up(uploaded);
                        s.client_reset();
                        return Ok(());
                    }
                    r = &mut upload, if !uploaded => match r {
                        Ok(()) => uploaded = true,
                        Err(e) => return Err(Refusal::BadBody(e)),
                    },
                    r = &mut send => break r,
                }
            };
            let retry = reused && empty && attempt == 0;
            let (mut parts, incoming) = match crate::forward::answered(sent, retry, backend)? {
                Some(r) => r.into_parts(),
                None => continue,
            };
            let status = parts.status;
            crate::forward::count(conn, route, status);
            if let Some(s) = &sticky {
                s.answer(&label, backend, &mut parts.headers);
            }
            let down = PooledBody::new(incoming, pool.clone(), key.clone(), sender, slot);
            strip_response(&mut parts.headers);
            let mut head = Response::new(());
            *head.status_mut() = status;
            *head.headers_mut() = parts.headers;
            let bodiless = req.method == Method::HEAD || down.is_end_stream();
            let Ok(mut out) = respond.send_response(head, bodiless) else {
                return Ok(());
            };
            if bodiless {
                return Ok(());
            }
            let mut download = std::pin::pin!(download(down, &mut out, s.stall));
            loop {
                tokio::select! {
                    r = &mut upload, if !uploaded => match r {
                        Ok(()) => uploaded = true,
                        // Dropping the stream's handles resets it (CANCEL).
                        Err(_) => return Ok(()),
                    },
                    r = &mut download => {
                        give_up(uploaded);
                        match r {
                            Err(Broke::Backend) => {
                                tracing::warn!(backend = %backend, "backend response body broke off");
                            }
                            Err(Broke::Stalled) => s.stalled_stream(),
                            Err(Broke::Reset) => s.client_reset(),
                            _ => {}
                        }
                        return Ok(());
                    }
                }
            }
        }
        if !empty {
            // Part of the body may already be on its way: it cannot go to another backend.
            break;
        }
    }
    Err(refusal)
}

/// Which side broke a response body off.
enum Broke {
    Client,
    Backend,
    /// The client kept its window shut past the stall bound.
    Stalled,
    /// The client reset the stream.
    Reset,
}

impl Shared {
    /// A response stalled: the stream ends (its handles dropped reset it); the connection too
    /// when its client sent nothing at all meanwhile.
    fn stalled_stream(&self) {
        if self.activity.quiet_for() >= self.stall {
            self.ring(WHY_STALL);
        }
    }

    /// The client reset a stream the gateway had taken up; past the budget, the connection
    /// ends.
    fn client_reset(&self) {
        let now = Instant::now();
        let mut r = self.resets.lock().unwrap_or_else(|e| e.into_inner());
        match r.0 {
            Some(start) if now.duration_since(start) < RESET_WINDOW => r.1 += 1,
            _ => *r = (Some(now), 1),
        }
        if r.1 > RESET_BUDGET {
            drop(r);
            self.ring(WHY_RESETS);
        }
    }

    fn ring(&self, why: u8) {
        self.why.store(why, Ordering::Relaxed);
        self.alarm.notify_one();
    }
}

/// Feeds the client's DATA to the backend request, opening the client's window as the backend
/// takes it, so a slow backend slows the client instead of filling memory.
async fn upload(
    body: &mut RecvStream,
    tx: Option<mpsc::Sender<Bytes>>,
    abort: &AtomicBool,
) -> Result<(), BodyError> {
    let Some(tx) = tx else { return Ok(()) };
    loop {
        match std::future::poll_fn(|cx| body.poll_data(cx)).await {
            None => return Ok(()),
            Some(Err(_)) => {
                abort.store(true, Ordering::Release);
                return Err(BodyError::Truncated);
            }
            Some(Ok(b)) => {
                let n = b.len();
                if n > 0 && tx.send(b).await.is_err() {
                    // The backend answered without reading the rest.
                    return Ok(());
                }
                let _ = body.flow_control().release_capacity(n);
            }
        }
    }
}

/// Streams a backend body to the client as the client's window allows, then its trailers.
async fn download(
    mut body: PooledBody,
    out: &mut SendStream<Bytes>,
    stall: std::time::Duration,
) -> Result<(), Broke> {
    use http_body_util::BodyExt;
    loop {
        // An SSE stream or a long poll may wait on the backend for long: a client that resets
        // meanwhile ends it at once.
        let next = tokio::select! {
            f = body.frame() => f,
            _ = std::future::poll_fn(|cx| out.poll_reset(cx)) => return Err(Broke::Reset),
        };
        match next {
            None => {
                return out.send_data(Bytes::new(), true).map_err(|_| Broke::Client);
            }
            Some(Err(_)) => {
                out.send_reset(Reason::INTERNAL_ERROR);
                return Err(Broke::Backend);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => send_all(out, data, stall).await?,
                Err(frame) => {
                    if let Ok(mut trailers) = frame.into_trailers() {
                        strip_response(&mut trailers);
                        out.send_trailers(trailers).map_err(|_| Broke::Client)?;
                        // Read to its end, so the backend connection goes back to the pool.
                        let _ = body.frame().await;
                        return Ok(());
                    }
                }
            },
        }
    }
}

/// Sends `data` as the stream's window opens (never more buffered than the window), giving up
/// when it stays shut for `stall`.
async fn send_all(
    out: &mut SendStream<Bytes>,
    mut data: Bytes,
    stall: std::time::Duration,
) -> Result<(), Broke> {
    while !data.is_empty() {
        let room = std::future::poll_fn(|cx| poll_room(out, data.len(), cx));
        let cap = tokio::time::timeout(stall, room)
            .await
            .map_err(|_| Broke::Stalled)??;
        let chunk = data.split_to(cap.min(data.len()));
        out.send_data(chunk, false).map_err(|_| Broke::Client)?;
    }
    Ok(())
}

/// Capacity for up to `want` bytes on `out`, once the client's window has some.
fn poll_room(
    out: &mut SendStream<Bytes>,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<usize, Broke>> {
    loop {
        let cap = out.capacity();
        if cap > 0 {
            return Poll::Ready(Ok(cap));
        }
        out.reserve_capacity(want);
        match ready!(out.poll_capacity(cx)) {
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Poll::Ready(Err(Broke::Client)),
        }
    }
}

/// The WebSocket half of a stream: the backend's checked 101 becomes the stream's 200 and a
/// tunnel of its own; a backend's refusal is relayed as it is.
async fn tunnel(
    s: &Arc<Shared>,
    mut req: http::request::Parts,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
    route: &RouteEntry,
    identity: crate::auth::Identity,
) -> Result<(), (Refusal, SendResponse<Bytes>)> {
    let conn = &s.conn;
    let reached = tokio::select! {
        r = crate::tunnel::reach(conn, &mut req, route, identity) => r,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            s.client_reset();
            return Ok(());
        }
    };
    let (switched, parts) = match reached {
        Err(r) => return Err((r, respond)),
        Ok(Reached::Refused(resp))
            if resp.status().is_success() || resp.status().is_informational() =>
        {
            return Err((
                Refusal::BadBackendHandshake(crate::reject::BadHandshake::NotSwitched),
                respond,
            ));
        }
        Ok(Reached::Refused(resp)) => {
            let (mut head, incoming) = resp.into_parts();
            strip_response(&mut head.headers);
            let mut out = Response::new(());
            *out.status_mut() = head.status;
            *out.headers_mut() = head.headers;
            let bodiless = incoming.is_end_stream();
            match respond.send_response(out, bodiless) {
                // The client reset the stream meanwhile.
                Err(_) => s.client_reset(),
                Ok(mut send) if !bodiless => {
                    if let Err(Broke::Stalled) = relay_body(incoming, &mut send, s.stall).await {
                        s.stalled_stream();
                    }
                }
                Ok(_) => {}
            }
            return Ok(());
        }
        Ok(Reached::Switched { headers, parts }) => (headers, parts),
    };
    let mut ok = Response::new(());
    for name in [
        header::SEC_WEBSOCKET_PROTOCOL,
        header::SEC_WEBSOCKET_EXTENSIONS,
        header::SET_COOKIE,
    ] {
        for v in switched.get_all(&name) {
            ok.headers_mut().append(name.clone(), v.clone());
        }
    }
    let Ok(send) = respond.send_response(ok, false) else {
        tracing::info!("client went away before the 200 was sent");
        s.client_reset();
        return Ok(());
    };
    let io = StreamIo {
        send,
        recv: body,
        pending: Bytes::new(),
        eof: false,
        shut: false,
    };
    let id = conn.shared.next_id();
    let t = Tunnel::on_stream(s.clone(), id, io, *parts);
    conn.shared.tasks.spawn(t.run());
    Ok(())
}

/// A refused Upgrade's body, as the backend sends it.
async fn relay_body(
    body: hyper::body::Incoming,
    out: &mut SendStream<Bytes>,
    stall: std::time::Duration,
) -> Result<(), Broke> {
    use http_body_util::BodyExt;
    let mut body = body;
    loop {
        match body.frame().await {
            None => return out.send_data(Bytes::new(), true).map_err(|_| Broke::Client),
            Some(Err(_)) => {
                out.send_reset(Reason::INTERNAL_ERROR);
                return Err(Broke::Backend);
            }
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    send_all(out, d, stall).await?;
                }
            }
        }
    }
}

impl std::borrow::Borrow<Conn> for Arc<Shared> {
    fn borrow(&self) -> &Conn {
        &self.conn
    }
}

/// One HTTP/2 stream as the byte stream the relay reads and writes: DATA frames in (the
/// client's window reopened as the relay takes them), DATA frames out within the client's
/// window (so a slow client slows the backend), END_STREAM for a shutdown and a reset as an
/// error, which the relay answers toward the backend with a Close 1001.
pub(crate) struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The part of the last DATA frame the relay has not read yet.
    pending: Bytes,
    eof: bool,
    shut: bool,
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(b)) => this.pending = b,
                Some(Err(e)) => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, e)));
                }
                None => this.eof = true,
            }
        }
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let cap = ready!(poll_room(&mut this.send, buf.len(), cx))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        let n = cap.min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what the streams queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        // A tunnel that ended without shutting its side (an error) must not leave the stream
        // half open on the client.
        if !self.shut {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}
