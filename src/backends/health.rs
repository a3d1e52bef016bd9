//! Active health checks, one task per route backend with `[routes.health]`: a TCP connect, or
//! an HTTP `GET path` expecting 2xx (over TLS and after a PROXY `LOCAL` header when the route
//! sends them), every `interval`, the first at an offset within it so a fleet of backends is
//! not checked in the same millisecond. A real request's failed connect counts as a failed
//! check. A backend that goes down with `on_backend_down = "close"` has its tunnels closed
//! with 1012, spread over `[server] drain_spread`.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BackendState, Transition};
use crate::config::{Health, OnDown};
use crate::relay::orders::{Order, Why};
use crate::route::RouteEntry;
use crate::server::Shared;
use crate::upstream::{self, Dial, Proxy};

/// What a checker checks, as of the snapshot that started it.
#[derive(Clone)]
pub(crate) struct Check {
    health: Health,
    tls: Option<(Arc<rustls::ClientConfig>, Option<String>)>,
    proxy: bool,
    on_down: OnDown,
}

/// (Re)starts the checks of every backend of `entry` that has `[routes.health]`, stopping those
/// of a route that no longer has it. Called once a snapshot is in force.
pub(crate) fn start_route(shared: &Arc<Shared>, entry: &RouteEntry) {
    for state in &entry.states {
        stop(state);
        let Some(health) = &entry.health else {
            // Without checks nothing would ever mark a backend that was down up again.
            state.forget_health();
            continue;
        };
        let check = Check {
            health: health.clone(),
            tls: entry.tls.clone().map(|c| {
                let name = entry
                    .backend_tls
                    .as_ref()
                    .and_then(|t| t.server_name.clone());
                (c, name)
            }),
            proxy: entry.send_proxy_protocol,
            on_down: entry.on_backend_down,
        };
        let token = CancellationToken::new();
        *state.checker.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((check.clone(), token.clone()));
        tokio::spawn(run(shared.clone(), state.clone(), check, token));
    }
}

/// Stops a backend's checks, if it has any.
pub(crate) fn stop(state: &BackendState) {
    if let Some((_, token)) = state
        .checker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        token.cancel();
    }
}

/// A real request could not connect: with active checks on, that is a failed check.
pub(crate) fn connect_failed(
    shared: &Shared,
    entry: &RouteEntry,
    state: &Arc<BackendState>,
    why: String,
) {
    let Some(h) = &entry.health else {
        return;
    };
    let t = state.record(Err(why), h.healthy_threshold, h.unhealthy_threshold);
    transition(shared, state, t, entry.on_backend_down);
}

async fn run(shared: Arc<Shared>, state: Arc<BackendState>, check: Check, stop: CancellationToken) {
    let interval = check.health.interval;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&state.route, &state.label).hash(&mut h);
    let first = Duration::from_nanos(h.finish() % interval.as_nanos().max(1) as u64);
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(first) => {}
    }
    let mut next = Instant::now();
    loop {
        let result = match tokio::time::timeout(check.health.timeout, probe(&state, &check)).await {
            Ok(r) => r,
            Err(_) => Err("timed out".to_string()),
        };
        if stop.is_cancelled() {
            return;
        }
        let t = state.record(
            result,
            check.health.healthy_threshold,
            check.health.unhealthy_threshold,
        );
        transition(&shared, &state, t, check.on_down);
        next += interval;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

fn transition(shared: &Shared, state: &Arc<BackendState>, t: Transition, on_down: OnDown) {
    match t {
        Transition::None => {}
        Transition::WentUp => {
            tracing::info!(route = %state.route, backend = %state.label, "backend up")
        }
        Transition::WentDown => {
            let why = state.health().last_result.unwrap_or_default();
            tracing::warn!(route = %state.route, backend = %state.label, error = %why, "backend down");
            if on_down == OnDown::Close {
                let spread = shared.runtime.load().config.server.drain_spread;
                close_tunnels(shared, state, spread);
            }
        }
    }
}

/// Closes every open tunnel of `state` with 1012 "service restart", each at its own instant
/// in `spread`; returns how many.
pub(crate) fn close_tunnels(shared: &Shared, state: &Arc<BackendState>, spread: Duration) -> usize {
    let tunnels = shared.tunnels.select(|t| Arc::ptr_eq(&t.backend, state));
    let now = Instant::now();
    for t in &tunnels {
        t.close(Order {
            at: now + crate::shutdown::spread_offset(t.id, spread),
            why: Why::Restart,
        });
    }
    tunnels.len()
}

/// One check: connect (with the route's PROXY header and TLS), then the HTTP GET if a path is
/// set.
async fn probe(state: &BackendState, check: &Check) -> Result<(), String> {
    let dial = Dial {
        backend: &state.target,
        tls: check.tls.as_ref().map(|(c, n)| (c, n.as_deref())),
        proxy: if check.proxy {
            Proxy::Local
        } else {
            Proxy::None
        },
    };
    let mut stream = upstream::dial(&dial, check.health.timeout)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let Some(path) = &check.health.path else {
        return Ok(());
    };
    // The name the backend's TLS certificate is checked against is the virtual host it serves.
    let host = match (
        check.tls.as_ref().and_then(|(_, n)| n.as_ref()),
        &state.target,
    ) {
        (Some(name), _) => name.clone(),
        (None, crate::config::Backend::Tcp(a)) => a.clone(),
        (None, crate::config::Backend::Unix(_)) => "localhost".to_string(),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wsgate-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(s) if (200..300).contains(&s) => Ok(()),
        Some(s) => Err(format!("answered {s}")),
        None => Err("no HTTP answer".into()),
    }
}
