//! wsgate: a TLS-terminating WebSocket gateway and reverse proxy.
//!
//! A connection's life, in module order:
//!
//! ```text
//!  accept ──► limits (rate, per-address cap; refused: socket closed, no TLS work)
//!    │
//!    ├─► listener: PROXY header, TLS (tls), first request head within handshake_timeout
//!    │             global cap ──► 503 + Retry-After
//!    ├─► handshake: Upgrade checks, route, origin ──► 400/403/404/405/426/431
//!    ├─► proxy: hyper serves the connection
//!    │     ├─ plain request ──► pooled backend connection, streamed both ways
//!    │     └─ Upgrade ──► upstream: connect, forward, check 101 ──► 502/504 or 101
//!    └─► relay: frames tracked both ways; gateway pings, idle/lifetime bounds, Close frames
//!
//!  admin: /metrics /healthz /readyz      shutdown: drain on SIGTERM, reload on SIGHUP
//! ```

pub mod admin;
pub mod config;
pub mod handshake;
pub mod leftover;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod origin;
pub mod proxy;
pub mod proxy_protocol;
pub mod relay;
pub mod route;
pub mod shutdown;
pub mod systemd;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigErrors};
use crate::route::RouteTable;

/// Everything a new connection needs from the configuration; swapped whole on reload, while
/// established tunnels keep the snapshot they started with.
pub struct Runtime {
    /// The configuration.
    pub config: Config,
    /// Routes with their balancing state.
    pub routes: RouteTable,
    /// TLS server configuration; `None` when there are no TLS listeners.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Tunnel settings.
    pub ws: relay::Settings,
}

impl Runtime {
    /// Builds a runtime, loading certificates; errors cite the configuration.
    pub fn build(config: Config) -> Result<Runtime, ConfigErrors> {
        let tls = if config.server.listen.is_empty() {
            None
        } else {
            Some(tls::server_config(&config.tls, &config.path).map_err(ConfigErrors)?)
        };
        Ok(Runtime {
            routes: RouteTable::new(&config.routes),
            ws: relay::Settings::from(&config.websocket),
            tls,
            config,
        })
    }
}

/// State shared by every task for the life of the process.
pub struct Shared {
    /// The current configuration snapshot.
    pub runtime: ArcSwap<Runtime>,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Drain state.
    pub drain: shutdown::Drain,
    /// Admission control.
    pub admission: Arc<limits::Admission>,
    /// Keep-alive connections to backends for plain HTTP.
    pub pool: Arc<proxy::Pool>,
    /// Every connection and tunnel task, awaited when draining.
    pub tasks: TaskTracker,
    /// The listeners, changed by reloads.
    pub listeners: listener::Listeners,
    next_id: AtomicU64,
}

impl Shared {
    /// A fresh connection number.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A bound gateway, ready to run.
pub struct Gateway {
    shared: Arc<Shared>,
    admin: Option<SocketAddr>,
}

/// A handle to reload or drain a running gateway.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

/// Why the gateway could not start.
#[derive(Debug)]
pub enum StartError {
    /// The configuration or certificates are invalid.
    Config(ConfigErrors),
    /// A listener could not be bound.
    Bind(SocketAddr, std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl Gateway {
    /// Loads certificates and binds every listener (not the accept loops yet).
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let runtime = Runtime::build(config).map_err(StartError::Config)?;
        let cfg = &runtime.config;
        let admission = limits::Admission::new(&cfg.limits, cfg.server.max_connections.get());
        let admin_addr = cfg.admin.listen;
        let shared = Arc::new(Shared {
            admission,
            metrics: metrics::Metrics::new(),
            drain: shutdown::Drain::new(),
            pool: Arc::new(proxy::Pool::default()),
            tasks: TaskTracker::new(),
            listeners: listener::Listeners::default(),
            next_id: AtomicU64::new(1),
            runtime: ArcSwap::from_pointee(runtime),
        });
        let rt = shared.runtime.load_full();
        shared
            .listeners
            .apply(
                &shared,
                &rt.config.server.listen,
                &rt.config.server.listen_plain,
            )
            .await
            .map_err(|(a, e)| StartError::Bind(a, e))?;
        let admin = match admin_addr {
            Some(addr) => match admin::bind(addr).await {
                Ok(l) => {
                    let local = l.local_addr().ok();
                    if let Some(a) = local {
                        tracing::info!(addr = %a, "admin listening");
                    }
                    tokio::spawn(admin::serve(l, shared.clone()));
                    local
                }
                Err(e) => {
                    tracing::error!(addr = %addr, error = %e, "admin listener not started");
                    None
                }
            },
            None => None,
        };
        tokio::spawn(limits_pruner(shared.clone()));
        Ok(Gateway { shared, admin })
    }

    /// The bound addresses: (address, is TLS).
    pub fn local_addrs(&self) -> Vec<(SocketAddr, bool)> {
        self.shared.listeners.local_addrs()
    }

    /// The admin listener's address, when it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// A handle for reloads and draining.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` resolves (or a handle drains), then drains and returns when
    /// every connection has ended.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        tokio::select! {
            _ = shutdown => {}
            _ = shared.drain.started() => {}
        }
        let cfg = &shared.runtime.load().config.server;
        let (grace, spread) = (cfg.shutdown_grace, cfg.drain_spread);
        Handle {
            shared: shared.clone(),
        }
        .drain(grace, spread);
        shared.tasks.close();
        let limit = grace + Duration::from_secs(5);
        if tokio::time::timeout(limit, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = shared.tasks.len(),
                "connections still open after the grace period"
            );
        }
        tracing::info!("drained");
    }
}

impl Handle {
    /// Re-reads the configuration file and certificates and applies them to new connections.
    pub async fn reload(&self) -> Result<(), ConfigErrors> {
        let path = self.shared.runtime.load().config.path.clone();
        let result = async {
            let config = Config::load(&path)?;
            let runtime = Runtime::build(config)?;
            let s = &runtime.config.server;
            if let Err((addr, e)) = self
                .shared
                .listeners
                .apply(&self.shared, &s.listen, &s.listen_plain)
                .await
            {
                return Err(ConfigErrors(vec![config::ConfigError {
                    file: path.clone(),
                    line: 0,
                    key: "server.listen".into(),
                    message: format!("cannot listen on {addr}: {e}"),
                }]));
            }
            self.shared.admission.update(
                &runtime.config.limits,
                runtime.config.server.max_connections.get(),
            );
            self.shared.runtime.store(Arc::new(runtime));
            Ok(())
        }
        .await;
        let m = &self.shared.metrics;
        match &result {
            Ok(()) => {
                m.reloads
                    .get_or_create(&metrics::ResultLabel { result: "ok" })
                    .inc();
                m.config_ok.set(1);
                tracing::info!(config = %path.display(), "configuration reloaded");
            }
            Err(e) => {
                m.reloads
                    .get_or_create(&metrics::ResultLabel { result: "failed" })
                    .inc();
                m.config_ok.set(0);
                for line in &e.0 {
                    tracing::error!(error = %line, "reload failed; keeping the previous configuration");
                }
            }
        }
        result
    }

    /// Starts draining: listeners close, tunnels get Close frames spread over the end of `grace`.
    pub fn drain(&self, grace: Duration, spread: Duration) {
        if self.shared.drain.begin(grace, spread) {
            tracing::info!(grace_ms = grace.as_millis() as u64, "draining");
            self.shared.listeners.close_all();
        }
    }

    /// Drains with the configured grace and spread.
    pub fn drain_configured(&self) {
        let s = &self.shared.runtime.load().config.server;
        self.drain(s.shutdown_grace, s.drain_spread);
    }

    /// The shared state, for the admin listener and tests.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

async fn limits_pruner(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => { shared.admission.prune(); }
            _ = shared.drain.started() => return,
        }
    }
}
