//! The process's state and lifecycle: the configuration snapshot ([`Runtime`]) every new
//! connection takes and a reload swaps whole, the state shared by every task for the process's
//! life ([`Shared`]), the [`Gateway`] that binds and runs, and the [`Handle`] that reloads
//! (bind, then store, then start: no listener ever serves with a configuration not its own)
//! and drains.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigErrors};
use crate::conn::ListenerKind;
use crate::inherited::Inherited;
use crate::listener::{BindError, ListenKey, Listeners};
use crate::relay::orders::{Order, Why};
use crate::route::RouteTable;
use crate::tunnels::TunnelRegistry;
use crate::upstream::pool::Pool;
use crate::{admin, auth, backends, limits, metrics, shutdown, tls};

/// Everything a new connection needs from the configuration; swapped whole on reload, while
/// established connections and tunnels keep the snapshot they started with.
pub(crate) struct Runtime {
    pub(crate) config: Config,
    /// Routes with their balancing state.
    pub(crate) routes: RouteTable,
    /// TLS server configuration; `None` exactly when there are no TLS listeners.
    pub(crate) tls: Option<Arc<tls::TlsConfigs>>,
    /// The authenticators, by their index in `config.auth`.
    pub(crate) auth: Vec<auth::Authenticator>,
    /// The admin API's bearer token (`[admin] token_file`), read with the configuration.
    pub(crate) admin_token: Option<Vec<u8>>,
}

impl Runtime {
    /// Builds a runtime, loading certificates; errors cite the configuration.
    pub(crate) fn build(config: Config, reg: &Registries<'_>) -> Result<Runtime, ConfigErrors> {
        let mut errors = Vec::new();
        let routes = match RouteTable::new(&config.routes, reg.backends, reg.metrics, &config.path)
        {
            Ok(r) => Some(r),
            Err(e) => {
                errors.extend(e);
                None
            }
        };
        let tls = if config.server.listen.is_empty() {
            None
        } else {
            let acme = config.acme.as_ref().map(|_| reg.certs.clone());
            match tls::server_config(&config.tls, &config.path, acme, config.server.http2) {
                Ok(t) => Some(t),
                Err(e) => {
                    errors.extend(e);
                    None
                }
            }
        };
        let mut authenticators = Vec::new();
        for a in &config.auth {
            match auth::Authenticator::build(a, &config.path, reg.keys) {
                Ok(x) => authenticators.push(x),
                Err(e) => errors.extend(e),
            }
        }
        let admin_token = match admin::read_token(&config) {
            Ok(t) => t,
            Err(e) => {
                errors.push(e);
                None
            }
        };
        let Some(routes) = routes.filter(|_| errors.is_empty()) else {
            return Err(ConfigErrors(errors));
        };
        Ok(Runtime {
            routes,
            tls,
            auth: authenticators,
            admin_token,
            config,
        })
    }

    fn listen_keys(&self) -> Vec<ListenKey> {
        let s = &self.config.server;
        s.listen
            .iter()
            .map(|a| (*a, ListenerKind::Tls))
            .chain(s.listen_plain.iter().map(|a| (*a, ListenerKind::Plain)))
            .collect()
    }
}

/// The long-lived state a snapshot is built against: a reload's new snapshot takes the keys
/// and backend states the old one had, by what the configuration names.
pub(crate) struct Registries<'a> {
    pub(crate) keys: &'a auth::jwks::Registry,
    /// What `[acme]` ordered, served by every snapshot's TLS configuration.
    pub(crate) certs: &'a Arc<crate::acme::Certs>,
    pub(crate) backends: &'a backends::Registry,
    pub(crate) metrics: &'a metrics::Metrics,
}

/// State shared by every task for the life of the process.
pub(crate) struct Shared {
    /// The current configuration snapshot.
    pub(crate) runtime: ArcSwap<Runtime>,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) drain: shutdown::Drain,
    /// Admission control; its per-address state survives reloads.
    pub(crate) admission: Arc<limits::Admission>,
    /// Keep-alive connections to backends for plain HTTP.
    pub(crate) pool: Arc<Pool>,
    /// Every connection task, awaited when draining.
    pub(crate) tasks: TaskTracker,
    pub(crate) listeners: Listeners,
    pub(crate) stats: Stats,
    /// The keys fetched from every `jwks_url`, kept across reloads.
    pub(crate) keys: auth::jwks::Registry,
    /// Every route backend's counts, health and drain mark, kept across reloads.
    pub(crate) backends: backends::Registry,
    /// Every live tunnel.
    pub(crate) tunnels: TunnelRegistry,
    /// Certificates by ACME and the task that orders them, kept across reloads.
    pub(crate) acme: crate::acme::Manager,
    /// The fleet, with `[cluster]` (read at start; a reload does not change it).
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    next_id: AtomicU64,
}

impl Shared {
    fn registries(&self) -> Registries<'_> {
        Registries {
            keys: &self.keys,
            certs: &self.acme.certs,
            backends: &self.backends,
            metrics: &self.metrics,
        }
    }

    /// Starts the health checks of a snapshot just put in force, and forgets the backends it
    /// no longer has.
    fn backends_follow(self: &Arc<Self>, rt: &Runtime) {
        let states = self.backends_only_of(rt);
        for e in rt.routes.entries() {
            backends::health::start_route(self, e);
        }
        let keep: HashSet<(String, String)> = states
            .iter()
            .map(|s| (s.route.clone(), s.label.clone()))
            .collect();
        self.pool.retain(&keep);
    }

    /// Puts a snapshot's certificates in force: the expiry gauges of its files, and its
    /// `[acme]` (stored certificates loaded, orders planned).
    fn certificates_follow(self: &Arc<Self>, rt: &Runtime) {
        let files = rt.tls.as_ref().map(|t| t.file_expiry()).unwrap_or_default();
        self.metrics.set_file_certs(&files);
        self.acme.configure(self, rt.config.acme.as_ref());
    }

    /// Forgets every backend state (and its metric series) `rt` does not use: after a reload
    /// put `rt` in force, or after one failed while building states for its new backends.
    fn backends_only_of(&self, rt: &Runtime) -> Vec<Arc<backends::BackendState>> {
        let states: Vec<_> = rt
            .routes
            .entries()
            .iter()
            .flat_map(|e| e.states.iter().cloned())
            .collect();
        self.backends.retain(&states, &self.metrics);
        states
    }

    /// A fresh connection number.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Live counts of connections and tunnels, with a channel that ticks on every change, so
/// tests and the drain can await a state instead of polling for it.
pub(crate) struct Stats {
    connections: AtomicUsize,
    tunnels: AtomicUsize,
    changed: watch::Sender<u64>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            connections: AtomicUsize::new(0),
            tunnels: AtomicUsize::new(0),
            changed: watch::Sender::new(0),
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.bump();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        self.bump();
    }

    pub(crate) fn tunnel_opened(&self) {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        self.bump();
    }

    pub(crate) fn tunnel_closed(&self) {
        self.tunnels.fetch_sub(1, Ordering::Relaxed);
        self.bump();
    }

    fn snapshot(&self) -> Activity {
        Activity {
            connections: self.connections.load(Ordering::Relaxed),
            tunnels: self.tunnels.load(Ordering::Relaxed),
        }
    }
}

/// What the gateway is serving right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// Client connections open (tunnels included).
    pub connections: usize,
    /// WebSocket tunnels open.
    pub tunnels: usize,
}

/// A bound gateway, ready to run.
pub struct Gateway {
    shared: Arc<Shared>,
    admin: Option<SocketAddr>,
}

/// A handle to reload or drain a running gateway, and to watch what it serves.
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

/// Why a reload was refused (the previous configuration stays in force).
#[derive(Debug)]
pub enum ReloadError {
    /// The file, or a certificate it names, is invalid.
    Config(ConfigErrors),
    /// A listener the new configuration adds could not be bound.
    Bind(SocketAddr, std::io::Error),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Config(e) => write!(f, "{e}"),
            ReloadError::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
        }
    }
}

impl std::error::Error for ReloadError {}

impl Gateway {
    /// Loads certificates and binds every listener (their accept loops start here too).
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        Gateway::bind_with(config, Inherited::none(), true).await
    }

    /// As [`Gateway::bind`], taking the listeners `inherited` has instead of binding them;
    /// with `accept_now` false the sockets accept nothing until [`Handle::open`].
    pub async fn bind_with(
        config: Config,
        mut inherited: Inherited,
        accept_now: bool,
    ) -> Result<Gateway, StartError> {
        // Crates that build rustls configurations of their own (the Redis client for
        // rediss://) take the process default: wsgate's provider, not a panic over two.
        let _ = rustls::crypto::CryptoProvider::install_default((*tls::provider()).clone());
        let keys = auth::jwks::Registry::default();
        let backends = backends::Registry::default();
        let metrics = metrics::Metrics::new();
        let acme = crate::acme::Manager::default();
        let reg = Registries {
            keys: &keys,
            certs: &acme.certs,
            backends: &backends,
            metrics: &metrics,
        };
        let runtime = Runtime::build(config, &reg).map_err(StartError::Config)?;
        let cfg = &runtime.config;
        let admission = limits::Admission::new(&cfg.limits, cfg.server.max_connections.get());
        let admin_addr = cfg.admin.listen;
        let cluster_conf = cfg.cluster.clone();
        let wanted = runtime.listen_keys();
        let shared = Arc::new(Shared {
            admission,
            metrics,
            drain: shutdown::Drain::new(),
            pool: Arc::new(Pool::default()),
            tasks: TaskTracker::new(),
            listeners: Listeners::default(),
            stats: Stats::new(),
            keys,
            backends,
            tunnels: TunnelRegistry::default(),
            acme,
            cluster: cluster_conf.as_ref().and_then(crate::cluster::Cluster::new),
            next_id: AtomicU64::new(1),
            runtime: ArcSwap::from_pointee(runtime),
        });
        let bound = shared
            .listeners
            .bind_missing(&wanted, &mut inherited)
            .map_err(|BindError { addr, error }| StartError::Bind(addr, error))?;
        // Stored ACME certificates serve from the first handshake; ordering runs behind.
        shared.certificates_follow(&shared.runtime.load());
        if accept_now {
            shared.listeners.open();
        }
        let _ = shared.listeners.start(&shared, bound, &wanted);
        shared.backends_follow(&shared.runtime.load());
        let admin = match admin_addr {
            Some(addr) => match shared.listeners.bind_admin(addr, &mut inherited).await {
                Ok((l, stop)) => {
                    let local = l.local_addr().ok();
                    if let Some(a) = local {
                        tracing::info!(addr = %a, "admin listening");
                    }
                    tokio::spawn(admin::serve(l, shared.clone(), stop));
                    local
                }
                Err(e) => {
                    tracing::error!(addr = %addr, error = %e, "admin listener not started");
                    None
                }
            },
            None => None,
        };
        inherited.finish();
        tokio::spawn(limits_pruner(shared.clone()));
        if let Some(c) = &shared.cluster {
            crate::cluster::start(shared.clone(), c.clone());
        }
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
        if let Some(c) = &shared.cluster {
            c.stop.cancel();
        }
        tracing::info!("drained");
    }
}

impl Handle {
    /// Re-reads the configuration file and certificates and applies them to new connections:
    /// new listeners are bound first (a failure changes nothing), then the new snapshot is
    /// stored, then the new accept loops start and removed listeners close.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let path = self.shared.runtime.load().config.path.clone();
        let result = match self.apply(&path) {
            // Once their accept loops are done the removed listeners' sockets are closed,
            // inherited ones (never shut down) included.
            Ok(stopped) => {
                for t in stopped {
                    let _ = t.await;
                }
                Ok(())
            }
            Err(e) => Err(e),
        };
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
                match e {
                    ReloadError::Config(errors) => {
                        for line in &errors.0 {
                            tracing::error!(error = %line, "reload failed: configuration error; keeping the previous configuration");
                        }
                    }
                    ReloadError::Bind(addr, error) => {
                        tracing::error!(addr = %addr, error = %error, "reload failed: cannot bind; keeping the previous configuration");
                    }
                }
            }
        }
        result
    }

    fn apply(
        &self,
        path: &std::path::Path,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, ReloadError> {
        let r = self.try_apply(path);
        if r.is_err() {
            self.shared.backends_only_of(&self.shared.runtime.load());
        }
        r
    }

    fn try_apply(
        &self,
        path: &std::path::Path,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, ReloadError> {
        let config = Config::load(path).map_err(ReloadError::Config)?;
        let runtime =
            Runtime::build(config, &self.shared.registries()).map_err(ReloadError::Config)?;
        let wanted = runtime.listen_keys();
        let bound = self
            .shared
            .listeners
            .bind_missing(&wanted, &mut Inherited::none())
            .map_err(|BindError { addr, error }| ReloadError::Bind(addr, error))?;
        let cfg = &runtime.config;
        self.shared
            .admission
            .update(&cfg.limits, cfg.server.max_connections.get());
        let runtime = Arc::new(runtime);
        self.shared.runtime.store(runtime.clone());
        self.shared.certificates_follow(&runtime);
        let stopped = self.shared.listeners.start(&self.shared, bound, &wanted);
        self.shared.backends_follow(&runtime);
        Ok(stopped)
    }

    /// Starts draining: listeners close, tunnels get Close frames spread over the end of `grace`.
    pub fn drain(&self, grace: Duration, spread: Duration) {
        if self.shared.drain.begin(grace, spread) {
            tracing::info!(grace_ms = grace.as_millis() as u64, "draining");
            self.shared.listeners.close_all();
            for t in self.shared.tunnels.select(|_| true) {
                if let Some(at) = self.shared.drain.close_at(t.id) {
                    t.close(Order {
                        at,
                        why: Why::Shutdown,
                    });
                }
            }
        }
    }

    /// Starts the executable on disk again with this gateway's listening sockets, waits until
    /// it is ready and confirms it; returns its pid. After `Ok` call [`Handle::hand_over`]
    /// and drain. A failure changes nothing here and counts `wsgate_upgrades_total{result=
    /// "failed"}` (the new process counts `ok`, in the process that lives on).
    pub async fn upgrade(&self, exec: &crate::Exec) -> Result<u32, crate::UpgradeError> {
        let r = crate::upgrade::start(&self.shared.listeners, exec).await;
        if r.is_err() {
            self.count_upgrade("failed");
        }
        r
    }

    /// Starts accepting on listeners bound with `accept_now` false; in a process started by
    /// an upgrade, once the old one confirmed, which also counts the upgrade as done.
    pub fn open(&self, upgraded: bool) {
        if upgraded {
            self.count_upgrade("ok");
        }
        self.shared.listeners.open();
    }

    fn count_upgrade(&self, result: &'static str) {
        self.shared
            .metrics
            .upgrades
            .get_or_create(&metrics::ResultLabel { result })
            .inc();
    }

    /// Lets go of every listener without shutting the sockets down (the new process accepts
    /// on them) and keeps serving what was accepted; then [`Handle::drain`] as usual.
    pub fn hand_over(&self) {
        self.shared.drain.hand_over();
        self.shared.listeners.release_all();
    }

    /// Drains with the configured grace and spread.
    pub fn drain_configured(&self) {
        let s = &self.shared.runtime.load().config.server;
        self.drain(s.shutdown_grace, s.drain_spread);
    }

    /// What the gateway serves right now.
    pub fn activity(&self) -> Activity {
        self.shared.stats.snapshot()
    }

    /// Resolves once `pred` holds for the gateway's activity (checked at every change).
    pub async fn wait_until(&self, pred: impl Fn(Activity) -> bool) {
        let mut rx = self.shared.stats.changed.subscribe();
        loop {
            if pred(self.activity()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
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
