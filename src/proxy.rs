//! HTTP/1.1 serving of a client connection once its first head has passed: hyper parses each
//! request; plain requests are forwarded over a keep-alive pool with bodies streamed both ways;
//! Upgrade requests go to [`crate::upstream`] and, on a valid 101, become a tunnel run by
//! [`crate::relay`] on the raw streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::time::Instant;

use crate::config::{Backend, Route};
use crate::handshake::{self, Kind, Reject};
use crate::limits::Permit;
use crate::listener::{ClientStream, Rewind};
use crate::relay;
use crate::upstream::{self, Answer, ClientInfo};
use crate::{Runtime, Shared};

/// Body sent to backends.
pub type UpBody = Either<Incoming, Empty<Bytes>>;
/// Body sent to clients.
pub type DownBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

type ClientIo = TokioIo<Rewind<ClientStream>>;

/// Idle pooled connections per backend at most.
const MAX_IDLE: usize = 64;
/// A pooled connection unused this long is dropped.
const IDLE_TTL: Duration = Duration::from_secs(60);

/// Serves the requests of one client connection until it closes, upgrades or drains.
pub async fn serve(
    shared: Arc<Shared>,
    rt: Arc<Runtime>,
    io: Rewind<ClientStream>,
    client: ClientInfo,
    permit: Arc<Permit>,
    accepted: Instant,
) {
    let log = Arc::new(Mutex::new(ConnLog::default()));
    let svc = {
        let (shared, rt, client, log) = (shared.clone(), rt.clone(), client.clone(), log.clone());
        hyper::service::service_fn(move |req| {
            let ctx = Ctx {
                shared: shared.clone(),
                rt: rt.clone(),
                client: client.clone(),
                permit: permit.clone(),
                log: log.clone(),
            };
            async move { Ok::<_, Infallible>(handle(ctx, req).await) }
        })
    };
    let server = &rt.config.server;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .preserve_header_case(true)
        .max_headers(handshake::MAX_HEADERS)
        .max_buf_size(server.max_request_head.max(8192) + 8192)
        .timer(TokioTimer::new())
        .header_read_timeout(server.handshake_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.drain.started() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    let l = log.lock().map(|l| l.clone()).unwrap_or_default();
    if !l.upgraded {
        tracing::info!(
            conn = client.id,
            client = %client.addr,
            route = l.route.as_deref().unwrap_or("-"),
            backend = l.backend.as_deref().unwrap_or("-"),
            status = l.status,
            requests = l.requests,
            duration_ms = accepted.elapsed().as_millis() as u64,
            reason = match &result { Ok(()) => "closed", Err(_) => "connection error" },
            "connection closed"
        );
    }
}

#[derive(Clone, Default)]
struct ConnLog {
    route: Option<String>,
    backend: Option<String>,
    status: u16,
    requests: u64,
    upgraded: bool,
}

struct Ctx {
    shared: Arc<Shared>,
    rt: Arc<Runtime>,
    client: ClientInfo,
    permit: Arc<Permit>,
    log: Arc<Mutex<ConnLog>>,
}

impl Ctx {
    fn note(&self, route: &Route, backend: Option<&Backend>, status: u16) {
        if let Ok(mut l) = self.log.lock() {
            l.route = Some(route.label());
            l.backend = backend.map(|b| b.to_string());
            l.status = status;
            l.requests += 1;
        }
    }

    fn refuse(&self, r: Reject) -> Response<DownBody> {
        self.shared.metrics.reject(r.metric_reason());
        if crate::listener::log_budget() {
            tracing::info!(conn = self.client.id, client = %self.client.addr, status = r.status().as_u16(), reason = r.reason(), "request refused");
        }
        r.to_response()
            .map(|b| b.map_err(|e| match e {}).boxed_unsync())
    }
}

async fn handle(ctx: Ctx, req: Request<Incoming>) -> Response<DownBody> {
    let (parts, body) = req.into_parts();
    let (kind, route) = match handshake::check(&parts, &ctx.rt.routes) {
        Ok(k) => k,
        Err(r) => return ctx.refuse(r),
    };
    match kind {
        Kind::Plain => forward(&ctx, route, parts, body).await,
        Kind::Upgrade => {
            let mut req = Request::from_parts(parts, body);
            let on_upgrade = hyper::upgrade::on(&mut req);
            let (parts, _) = req.into_parts();
            tunnel(&ctx, route, parts, on_upgrade).await
        }
    }
}

async fn tunnel(
    ctx: &Ctx,
    route: &Route,
    parts: http::request::Parts,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<DownBody> {
    let cfg = &ctx.rt.config.upstream;
    let t0 = Instant::now();
    let order = ctx.rt.routes.backends(route, ctx.client.addr.ip());
    let (stream, backend) = match upstream::connect_any(order, cfg.connect_timeout).await {
        Ok(s) => s,
        Err(r) => {
            ctx.note(route, None, r.status().as_u16());
            return ctx.refuse(r);
        }
    };
    ctx.shared
        .metrics
        .backend_connect_seconds
        .observe(t0.elapsed().as_secs_f64());
    let answer = match upstream::upgrade(stream, &parts, &ctx.client, cfg.response_timeout).await {
        Ok(a) => a,
        Err(r) => {
            ctx.note(route, Some(backend), r.status().as_u16());
            return ctx.refuse(r);
        }
    };
    let t = match answer {
        Answer::Refused(resp) => {
            ctx.note(route, Some(backend), resp.status().as_u16());
            tracing::info!(conn = ctx.client.id, client = %ctx.client.addr, route = %route.label(), backend = %backend, status = resp.status().as_u16(), "backend refused the upgrade");
            return relay_response(resp, None);
        }
        Answer::Switched(t) => t,
    };
    ctx.note(route, Some(backend), 101);
    if let Ok(mut l) = ctx.log.lock() {
        l.upgraded = true;
    }
    let shared = ctx.shared.clone();
    let settings = ctx.rt.ws.clone();
    let client = ctx.client.clone();
    let permit = ctx.permit.clone();
    let label = route.label();
    let backend_name = backend.to_string();
    let upstream::Tunnel {
        response,
        stream,
        leftover,
    } = t;
    // Only what the backend sent past its 101 is kept, not hyper's whole read buffer.
    let leftover = Bytes::copy_from_slice(&leftover);
    ctx.shared.tasks.spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(conn = client.id, error = %e, "client went away before the 101 was sent");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<ClientIo>() else {
            tracing::error!(conn = client.id, "unexpected upgraded stream type");
            return;
        };
        let (client_io, rest) = parts.io.into_inner().into_inner();
        let prefix = if parts.read_buf.is_empty() && rest.is_empty() {
            Bytes::new()
        } else {
            let mut p = BytesMut::from(&parts.read_buf[..]);
            p.extend_from_slice(&rest);
            p.freeze()
        };
        // hyper's read buffer must not live as long as the tunnel.
        drop(parts.read_buf);
        drop(rest);
        run_tunnel(shared, settings, client, client_io, prefix, stream, leftover, label, backend_name).await;
    });
    response.map(|()| Empty::new().map_err(|e| match e {}).boxed_unsync())
}

#[allow(clippy::too_many_arguments)]
async fn run_tunnel(
    shared: Arc<Shared>,
    settings: relay::Settings,
    client: ClientInfo,
    client_io: ClientStream,
    client_prefix: Bytes,
    backend_io: upstream::BackendStream,
    backend_prefix: Bytes,
    route: String,
    backend: String,
) {
    let m = &shared.metrics;
    let route_label = crate::metrics::RouteLabel {
        route: route.clone(),
    };
    m.connections_total.get_or_create(&route_label).inc();
    m.connections_open.get_or_create(&route_label).inc();
    let opened = Instant::now();
    tracing::info!(conn = client.id, client = %client.addr, route = %route, backend = %backend, "tunnel opened");
    let s = relay::run(
        client_io,
        client_prefix,
        backend_io,
        backend_prefix,
        &settings,
        &shared.drain,
        &m.relay,
        client.id,
    )
    .await;
    m.connections_open.get_or_create(&route_label).dec();
    m.close(s.close_code, s.closed_by.as_str());
    match s.gateway_close {
        Some(relay::GatewayClose::PingTimeout) => {
            m.ping_timeouts.inc();
        }
        Some(relay::GatewayClose::Idle) => {
            m.idle_timeouts.inc();
        }
        _ => {}
    }
    tracing::info!(
        conn = client.id,
        client = %client.addr,
        route = %route,
        backend = %backend,
        status = 101,
        duration_ms = opened.elapsed().as_millis() as u64,
        bytes_up = s.traffic.bytes_up,
        bytes_down = s.traffic.bytes_down,
        frames_up = s.traffic.frames_up,
        frames_down = s.traffic.frames_down,
        closed_by = s.closed_by.as_str(),
        close_code = s.close_code.map_or(-1, i64::from),
        reason = %s.reason,
        "tunnel closed"
    );
}

/// A backend response on its way to the client: hop-by-hop headers replaced, body streamed.
fn relay_response(
    resp: Response<Incoming>,
    pooled: Option<(Arc<Pool>, Backend, SendRequest<UpBody>)>,
) -> Response<DownBody> {
    let (mut parts, body) = resp.into_parts();
    upstream::strip_hop_by_hop(&mut parts.headers);
    let body = PooledBody {
        inner: body,
        back: pooled,
    };
    Response::from_parts(parts, body.map_err(|e| Box::new(e) as _).boxed_unsync())
}

async fn forward(
    ctx: &Ctx,
    route: &Route,
    parts: http::request::Parts,
    body: Incoming,
) -> Response<DownBody> {
    let cfg = &ctx.rt.config.upstream;
    let headers = upstream::forward_headers(&parts.headers, &ctx.client);
    let bodiless = body.is_end_stream();
    let mut body = Some(body);
    let build = |b: UpBody| {
        let mut req = Request::new(b);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = upstream::origin_form(&parts.uri);
        *req.headers_mut() = headers.clone();
        *req.extensions_mut() = parts.extensions.clone();
        req
    };
    let pool = &ctx.shared.pool;
    for backend in ctx.rt.routes.backends(route, ctx.client.addr.ip()) {
        // A stale pooled connection may fail before the request is sent; bodiless requests
        // are retried once on a fresh one.
        for attempt in 0..2 {
            let (mut sender, reused) = match pool.checkout(backend, cfg.connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(backend = %backend, error = %e, "backend connect failed");
                    break;
                }
            };
            let b = match (bodiless, body.take()) {
                (false, Some(b)) => Either::Left(b),
                _ => Either::Right(Empty::new()),
            };
            let sent =
                tokio::time::timeout(cfg.response_timeout, sender.send_request(build(b))).await;
            let status = match sent {
                Err(_) => {
                    ctx.note(route, Some(backend), 504);
                    return ctx.refuse(Reject::BackendTimeout);
                }
                Ok(Err(e)) if reused && bodiless && attempt == 0 => {
                    tracing::debug!(backend = %backend, error = %e, "pooled connection failed; retrying");
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(backend = %backend, error = %e, "backend request failed");
                    ctx.note(route, Some(backend), 502);
                    return ctx.refuse(Reject::BackendUnavailable);
                }
                Ok(Ok(resp)) => resp,
            };
            let code = status.status().as_u16();
            ctx.note(route, Some(backend), code);
            ctx.shared
                .metrics
                .http_requests
                .get_or_create(&crate::metrics::RequestLabel {
                    route: route.label(),
                    status: status_class(code),
                })
                .inc();
            return relay_response(status, Some((pool.clone(), backend.clone(), sender)));
        }
        if body.is_none() && !bodiless {
            // The body went to a backend that failed; it cannot be sent again.
            break;
        }
    }
    ctx.note(route, None, 502);
    ctx.refuse(Reject::BackendUnavailable)
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

/// A pooled connection and when it was last released.
type Idle = (SendRequest<UpBody>, Instant);

/// Keep-alive connections to backends for plain HTTP requests.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Backend, Vec<Idle>>>,
}

impl Pool {
    /// An idle connection to `backend` (second value true), or a new one.
    pub async fn checkout(
        &self,
        backend: &Backend,
        timeout: Duration,
    ) -> std::io::Result<(SendRequest<UpBody>, bool)> {
        loop {
            let candidate = self
                .idle
                .lock()
                .ok()
                .and_then(|mut m| m.get_mut(backend).and_then(|v| v.pop()));
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
        let stream = upstream::connect(backend, timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, false))
    }

    fn put(&self, backend: Backend, sender: SendRequest<UpBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut m) = self.idle.lock() {
            let v = m.entry(backend).or_default();
            if v.len() < MAX_IDLE {
                v.push((sender, Instant::now()));
            }
        }
    }
}

/// A backend response body that hands its connection back to the pool once fully read.
struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<Pool>, Backend, SendRequest<UpBody>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((pool, backend, sender)) = self.back.take() {
            pool.put(backend, sender);
        }
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
