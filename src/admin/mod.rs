//! The admin listener: `/metrics` (Prometheus text), `/healthz` (200 while the process serves),
//! `/readyz` (200 while accepting, 503 while draining), the status page (`GET /`), and the
//! control API of [`api`] over the same registries the data path uses: tunnels listed and
//! closed, backends drained and enabled. With `[admin] token_file`, everything but the first
//! three and the page needs `Authorization: Bearer <token>`, compared in constant time.

mod api;

pub(crate) use api::rfc3339;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::server::Shared;

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// Admin connections held at once; more are closed at accept (the listener may face a network
/// when it has a token).
const MAX_CONNECTIONS: usize = 256;

/// Time a client has to send a request head, the first one or the next on a kept-alive
/// connection.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The status page: one self-contained file, no external assets.
const STATUS_PAGE: &str = include_str!("status.html");

/// Serves admin requests until `stop` (it stays up while draining, so `/readyz` can say so),
/// with the same accept back-off as the client listeners.
pub(crate) async fn serve(
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let open = shared.listeners.opened();
    crate::listener::accept_with_backoff(&listener, &open, &stop, |tcp, peer| {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(admin = %peer, "admin connection refused: {MAX_CONNECTIONS} already open");
            return;
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(answer(&shared, peer, req).await) }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                // Handed over: kept-alive scrapers and health checks move to the new process
                // after their current request instead of reading this one's drain.
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    })
    .await;
}

/// The token of `[admin] token_file`, read at start and at every reload.
pub(crate) fn read_token(config: &Config) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(f) = &config.admin.token_file else {
        return Ok(None);
    };
    let err = |message: String| ConfigError {
        file: config.path.clone(),
        line: f.line,
        key: f.key.clone(),
        message,
    };
    let bytes = std::fs::read(&f.value)
        .map_err(|e| err(format!("{}: cannot read: {e}", f.value.display())))?;
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(err(format!("{}: the token is empty", f.value.display())));
    }
    Ok(Some(token.to_vec()))
}

/// An answer with a body.
pub(super) fn reply(
    status: StatusCode,
    ctype: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

pub(super) fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

pub(super) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message.to_string() }))
}

async fn answer(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: http::Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match path.as_str() {
        "/metrics" => {
            return reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                shared.metrics.encode(),
            );
        }
        "/healthz" => return reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if shared.drain.is_draining() => {
            return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n");
        }
        "/readyz" => return reply(StatusCode::OK, "text/plain", "ready\n"),
        "/" if method == Method::GET || method == Method::HEAD => {
            return reply(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE);
        }
        _ => {}
    }
    let Some(endpoint) = api::Endpoint::of(&path) else {
        return error(StatusCode::NOT_FOUND, format!("no endpoint {path}"));
    };
    let wanted = endpoint.method();
    if method != wanted {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} answers {wanted} only"),
        );
        if let Ok(v) = http::HeaderValue::from_str(wanted.as_str()) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r;
    }
    let token = shared.runtime.load().admin_token.clone();
    if let Some(token) = token
        && !bearer_matches(req.headers(), &token)
    {
        let mut r = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"wsgate admin\""),
        );
        return r;
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "body too large or broken"),
    };
    let mut params = match api::Params::parse(&query, &body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let fleet = match params.take("cluster").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cluster: expected true or false, got {other:?}"),
            );
        }
    };
    if !fleet {
        return api::run(shared, peer, endpoint, &params);
    }
    if !matches!(
        endpoint,
        api::Endpoint::CloseTunnels | api::Endpoint::Drain | api::Endpoint::Enable
    ) {
        return error(
            StatusCode::BAD_REQUEST,
            "cluster: only /tunnels/close, /backends/drain and /backends/enable take it",
        );
    }
    let Some(cluster) = shared.cluster.clone() else {
        return error(
            StatusCode::BAD_REQUEST,
            "cluster: this instance has no [cluster] configured",
        );
    };
    // Here first: a call this instance refuses (a bad parameter) goes nowhere else.
    let local = api::run(shared, peer, endpoint, &params);
    if local.status() != StatusCode::OK {
        return local;
    }
    let mut own = body_json(local).await;
    if let Value::Object(m) = &mut own {
        m.insert("instance".into(), Value::String(cluster.instance.clone()));
    }
    tracing::info!(admin = %peer, path, "admin action: published to the cluster");
    let mut instances = vec![own];
    instances.extend(cluster.broadcast(&path, params.to_map()).await);
    json(
        StatusCode::OK,
        &serde_json::json!({ "instances": instances }),
    )
}

/// A fleet-wide call published by another instance, applied to this one's tunnels; its
/// answer (or `{"error": ...}`) as JSON.
pub(crate) async fn apply_remote(
    shared: &Arc<Shared>,
    path: &str,
    params: std::collections::HashMap<String, String>,
) -> Value {
    let Some(endpoint) = api::Endpoint::of(path).filter(|e| {
        matches!(
            e,
            api::Endpoint::CloseTunnels | api::Endpoint::Drain | api::Endpoint::Enable
        )
    }) else {
        return serde_json::json!({ "error": format!("no fleet endpoint {path}") });
    };
    let peer = SocketAddr::from(([0, 0, 0, 0], 0));
    body_json(api::run(
        shared,
        peer,
        endpoint,
        &api::Params::from_map(params),
    ))
    .await
}

async fn body_json(r: Response<Full<Bytes>>) -> Value {
    let bytes = r
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

/// `Authorization: Bearer <token>` with the configured token, compared in constant time.
fn bearer_matches(headers: &http::HeaderMap, token: &[u8]) -> bool {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let v = v.as_bytes();
    let Some(given) = v
        .strip_prefix(b"Bearer ")
        .or_else(|| v.strip_prefix(b"bearer "))
    else {
        return false;
    };
    bool::from(given.trim_ascii().ct_eq(token))
}
