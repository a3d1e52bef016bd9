//! The backends' state that outlives a configuration snapshot, keyed by route and backend as
//! the configuration names them: open tunnels and requests in flight (what `least_conn`
//! balances on), health (up or down, with the last checks), the drain mark, and each backend's
//! health-check task. A reload hands a backend still configured its existing state, so its
//! counts go on; a new backend starts at zero. [`balance`] picks among them, [`health`] checks
//! them, [`sticky`] names them in cookies.

pub(crate) mod balance;
pub(crate) mod health;
pub(crate) mod sticky;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::config::Backend;
use crate::metrics::{BackendCheckLabel, BackendLabel, Metrics};

/// One backend of one route.
///
/// Invariant: `tunnels` counts the live [`TunnelSlot`]s and `requests` the live
/// [`RequestSlot`]s; the gauge mirrors `tunnels`.
pub(crate) struct BackendState {
    /// The route's label (`host/path` or `path`).
    pub(crate) route: String,
    /// The address as written in the configuration.
    pub(crate) label: String,
    pub(crate) target: Backend,
    tunnels: AtomicUsize,
    requests: AtomicUsize,
    /// False once health checks marked it down.
    up: AtomicBool,
    /// Set by an operator's drain: no new tunnels or requests.
    draining: AtomicBool,
    health: Mutex<HealthView>,
    /// The running health-check task, with what it checks.
    checker: Mutex<Option<(health::Check, CancellationToken)>>,
    up_gauge: Gauge,
    tunnels_gauge: Gauge,
    checks_ok: Counter,
    checks_failed: Counter,
}

/// What the health checks found so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct HealthView {
    /// Checks run for this backend (none: its route has no `[routes.health]`).
    pub(crate) checked: bool,
    pub(crate) last_check: Option<SystemTime>,
    pub(crate) last_result: Option<String>,
    pub(crate) consecutive_failures: u32,
    pub(crate) consecutive_ok: u32,
}

/// A change of a backend's state brought by a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    WentDown,
    WentUp,
}

impl BackendState {
    fn new(route: &str, label: &str, target: Backend, metrics: &Metrics) -> BackendState {
        let l = BackendLabel {
            route: route.to_string(),
            backend: label.to_string(),
        };
        let check = |result| BackendCheckLabel {
            route: route.to_string(),
            backend: label.to_string(),
            result,
        };
        let up_gauge = metrics.backend_up.get_or_create(&l).clone();
        up_gauge.set(1);
        let tunnels_gauge = metrics.backend_tunnels.get_or_create(&l).clone();
        let checks_ok = metrics.backend_checks.get_or_create(&check("ok")).clone();
        let checks_failed = metrics
            .backend_checks
            .get_or_create(&check("failed"))
            .clone();
        BackendState {
            route: route.to_string(),
            label: label.to_string(),
            target,
            tunnels: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            health: Mutex::new(HealthView::default()),
            checker: Mutex::new(None),
            up_gauge,
            tunnels_gauge,
            checks_ok,
            checks_failed,
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks it drained (no new tunnels or requests) or back in service.
    pub(crate) fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    pub(crate) fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }

    pub(crate) fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Back to up with no check history: its route no longer runs checks.
    pub(crate) fn forget_health(&self) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = HealthView::default();
        self.up.store(true, Ordering::Relaxed);
        self.up_gauge.set(1);
    }

    pub(crate) fn health(&self) -> HealthView {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts a tunnel to this backend for as long as the slot lives.
    pub(crate) fn tunnel_slot(self: &Arc<Self>) -> TunnelSlot {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        self.tunnels_gauge.inc();
        TunnelSlot(self.clone())
    }

    /// Counts a plain request in flight for as long as the slot lives.
    pub(crate) fn request_slot(self: &Arc<Self>) -> RequestSlot {
        self.requests.fetch_add(1, Ordering::Relaxed);
        RequestSlot(self.clone())
    }

    /// Takes a check's result (a real request's failed connect is one too): down after
    /// `unhealthy` failures in a row, up after `healthy` passes in a row.
    pub(crate) fn record(
        &self,
        result: Result<(), String>,
        healthy: u32,
        unhealthy: u32,
    ) -> Transition {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.checked = true;
        h.last_check = Some(SystemTime::now());
        let was_up = self.is_up();
        let now_up = match result {
            Ok(()) => {
                self.checks_ok.inc();
                h.last_result = Some("ok".into());
                h.consecutive_failures = 0;
                h.consecutive_ok = h.consecutive_ok.saturating_add(1);
                was_up || h.consecutive_ok >= healthy
            }
            Err(why) => {
                self.checks_failed.inc();
                h.last_result = Some(why);
                h.consecutive_ok = 0;
                h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                was_up && h.consecutive_failures < unhealthy
            }
        };
        self.up.store(now_up, Ordering::Relaxed);
        self.up_gauge.set(i64::from(now_up));
        match (was_up, now_up) {
            (true, false) => Transition::WentDown,
            (false, true) => Transition::WentUp,
            _ => Transition::None,
        }
    }
}

/// One open tunnel's hold on its backend's count.
pub(crate) struct TunnelSlot(Arc<BackendState>);

impl TunnelSlot {
    pub(crate) fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
        self.0.tunnels_gauge.dec();
    }
}

/// One request in flight's hold on its backend's count.
pub(crate) struct RequestSlot(Arc<BackendState>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every backend state, by route label and backend label.
#[derive(Default)]
pub(crate) struct Registry {
    map: Mutex<HashMap<(String, String), Arc<BackendState>>>,
}

impl Registry {
    /// The state of `label` on `route`, the existing one when a reload keeps it.
    pub(crate) fn state(
        &self,
        route: &str,
        label: &str,
        target: &Backend,
        metrics: &Metrics,
    ) -> Arc<BackendState> {
        let mut map = self.lock();
        let key = (route.to_string(), label.to_string());
        if let Some(s) = map.get(&key)
            && s.target == *target
        {
            return s.clone();
        }
        let s = Arc::new(BackendState::new(route, label, target.clone(), metrics));
        map.insert(key, s.clone());
        s
    }

    /// Forgets every state not in `keep` and stops its checks (tunnels still holding one keep
    /// it alive; a backend added back later starts afresh).
    pub(crate) fn retain(&self, keep: &[Arc<BackendState>], metrics: &Metrics) {
        let mut map = self.lock();
        map.retain(|_, s| {
            let kept = keep.iter().any(|k| Arc::ptr_eq(k, s));
            if !kept {
                health::stop(s);
                let l = BackendLabel {
                    route: s.route.clone(),
                    backend: s.label.clone(),
                };
                metrics.backend_up.remove(&l);
                metrics.backend_tunnels.remove(&l);
                for result in ["ok", "failed"] {
                    metrics.backend_checks.remove(&BackendCheckLabel {
                        route: s.route.clone(),
                        backend: s.label.clone(),
                        result,
                    });
                }
            }
            kept
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<BackendState>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}
