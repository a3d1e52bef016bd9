//! Certificates by ACME (`[acme]`): owns the certificates it ordered ([`Certs`], read by the
//! TLS resolver on every handshake, swapped whole so a renewal serves the next handshake and
//! touches no connection), the challenge answers it has out (TLS-ALPN-01 configurations,
//! HTTP-01 tokens), and the one task that plans, orders and renews ([`Manager`]). [`store`]
//! keeps the files, [`order`] talks to the server.
//!
//! One certificate per name, not one with every name: a name that fails validation (its DNS
//! moved, say) never holds the others back, adding or removing a name reorders nothing else,
//! and one name's key is never shared with another's.

pub(crate) mod order;
pub(crate) mod store;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::sync::watch;

use crate::config::{Acme as Conf, RenewBefore};
use crate::metrics::{CertLabel, ResultLabel};
use crate::server::Shared;
use store::Loaded;

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// The first retry after a failure; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);
/// The least time between two orders of one name, so a `renew_before` longer than the
/// certificates' lifetime renews often rather than in a loop.
const MIN_SPACING: Duration = Duration::from_secs(15);
/// How often renewal information is asked for at most (RFC 9773 lets the server say).
const ARI_DEFAULT_POLL: Duration = Duration::from_secs(6 * 3600);

/// What the handshake path reads: certificates by name and the challenges being answered.
#[derive(Default)]
pub(crate) struct Certs {
    served: ArcSwap<HashMap<String, Arc<Loaded>>>,
    /// TLS-ALPN-01: name → the configuration that answers it.
    alpn: Mutex<HashMap<String, Arc<ServerConfig>>>,
    /// HTTP-01: token → (name, key authorization).
    tokens: Mutex<HashMap<String, (String, String)>>,
    /// How many challenges are out: the handshake and request paths look no further at 0.
    pending: AtomicUsize,
    /// Held by whoever replaces `served` (the task, a reload), so no update is lost; it
    /// holds the names `[acme]` lists now, so an order that ends after a reload removed its
    /// name does not serve it again.
    writer: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("served", &self.served.load().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Certs {
    /// The certificate ordered for `name`.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.served.load().get(name).map(|l| l.key.clone())
    }

    /// The TLS-ALPN-01 answer for `name`, while its order waits for validation.
    pub(crate) fn challenge(&self, name: &str) -> Option<Arc<ServerConfig>> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        lock(&self.alpn).get(name).cloned()
    }

    /// The HTTP-01 answer for a request path, when it asks for a token out.
    pub(crate) fn http_answer(&self, path: &str) -> Option<String> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let token = path.strip_prefix("/.well-known/acme-challenge/")?;
        lock(&self.tokens).get(token).map(|(_, ka)| ka.clone())
    }

    fn set_alpn(&self, name: &str, config: Arc<ServerConfig>) {
        if lock(&self.alpn).insert(name.to_string(), config).is_none() {
            self.pending.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn set_token(&self, name: &str, token: &str, key_auth: &str) {
        let old =
            lock(&self.tokens).insert(token.to_string(), (name.to_string(), key_auth.to_string()));
        if old.is_none() {
            self.pending.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn clear_challenges(&self, name: &str) {
        let mut gone = usize::from(lock(&self.alpn).remove(name).is_some());
        let mut tokens = lock(&self.tokens);
        let before = tokens.len();
        tokens.retain(|_, (n, _)| n != name);
        gone += before - tokens.len();
        drop(tokens);
        self.pending.fetch_sub(gone, Ordering::AcqRel);
    }

    fn loaded(&self, name: &str) -> Option<Arc<Loaded>> {
        self.served.load().get(name).cloned()
    }

    /// Replaces the served map under the writer lock; `f` sees the listed names.
    fn update(&self, f: impl FnOnce(&mut HashSet<String>, &mut HashMap<String, Arc<Loaded>>)) {
        let mut listed = lock(&self.writer);
        let mut map = (**self.served.load()).clone();
        f(&mut listed, &mut map);
        self.served.store(Arc::new(map));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The ordering task and what it serves; one per process, kept across reloads.
#[derive(Default)]
pub(crate) struct Manager {
    pub(crate) certs: Arc<Certs>,
    conf: Mutex<Option<watch::Sender<Option<Arc<Conf>>>>>,
    started: AtomicBool,
}

impl Manager {
    /// Puts `conf` in force, at start and on every reload: certificates `storage` has for
    /// names not served yet are served at once, names no longer listed stop being served and
    /// renewed (their files stay), and the task orders what is missing in the background.
    pub(crate) fn configure(&self, shared: &Arc<Shared>, conf: Option<&Conf>) {
        let names: HashSet<&str> = conf
            .map(|c| c.domains.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let metrics = &shared.metrics;
        self.certs.update(|listed, map| {
            *listed = names.iter().map(|n| n.to_string()).collect();
            map.retain(|n, _| {
                let keep = names.contains(n.as_str());
                if !keep {
                    metrics.cert_expiry.remove(&CertLabel {
                        name: n.clone(),
                        source: "acme",
                    });
                }
                keep
            });
            let Some(conf) = conf else { return };
            for name in &conf.domains {
                if map.contains_key(name) {
                    continue;
                }
                match store::load(&conf.storage.value, name, &conf.directory) {
                    Ok(Some(l)) => {
                        tracing::info!(name = %name, not_after = %crate::admin::rfc3339(l.not_after), "ACME certificate loaded from storage");
                        set_expiry(metrics, name, &l);
                        map.insert(name.clone(), Arc::new(l));
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(name = %name, error = %e, "stored ACME certificate not used; ordering a new one"),
                }
            }
        });
        let conf = conf.cloned().map(Arc::new);
        let mut tx = lock(&self.conf);
        match tx.as_ref() {
            Some(tx) => {
                tx.send_replace(conf);
            }
            None if conf.is_some() => {
                let (t, rx) = watch::channel(conf);
                *tx = Some(t);
                if !self.started.swap(true, Ordering::AcqRel) {
                    tokio::spawn(run(shared.clone(), rx));
                }
            }
            None => {}
        }
    }
}

fn set_expiry(metrics: &crate::metrics::Metrics, name: &str, l: &Loaded) {
    let secs = l
        .not_after
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    metrics
        .cert_expiry
        .get_or_create(&CertLabel {
            name: name.to_string(),
            source: "acme",
        })
        .set(secs);
}

/// One name's schedule.
#[derive(Default)]
struct Plan {
    /// Failures in a row; the back-off grows with them.
    failures: u32,
    /// After a failure: not before then.
    retry_at: Option<SystemTime>,
    /// After an order: not before then ([`MIN_SPACING`]).
    floor: Option<SystemTime>,
    /// The server's suggested renewal window (RFC 9773), with when to ask again.
    ari: Option<(SystemTime, SystemTime)>,
    ari_next: Option<SystemTime>,
}

/// When a certificate falls due under `renew_before`.
fn renew_at(l: &Loaded, rb: RenewBefore) -> SystemTime {
    let lifetime = l
        .not_after
        .duration_since(l.not_before)
        .unwrap_or(Duration::ZERO);
    let before = match rb {
        RenewBefore::Fraction { num, den } => lifetime.mul_f64(f64::from(num) / f64::from(den)),
        RenewBefore::Left(d) => d,
    };
    l.not_after.checked_sub(before).unwrap_or(UNIX_EPOCH)
}

impl Plan {
    /// When the name should be ordered next.
    fn due(&self, cert: Option<&Loaded>, rb: RenewBefore) -> SystemTime {
        if let Some(at) = self.retry_at {
            return at;
        }
        let mut at = match cert {
            None => UNIX_EPOCH,
            Some(l) => renew_at(l, rb),
        };
        // The server asks for an earlier renewal: at a point inside its window, spread by
        // the name so a fleet of names does not arrive at once.
        if let Some((start, end)) = self.ari
            && start < at
        {
            let span = end.duration_since(start).unwrap_or(Duration::ZERO);
            at = at.min(start + span / 2);
        }
        match self.floor {
            Some(f) if f > at => f,
            _ => at,
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    (MIN_BACKOFF * 2u32.saturating_pow(exp)).min(MAX_BACKOFF)
}

/// The task, for the time this process serves: not before its listeners accept (a process an
/// upgrade started must not order while the old one still answers the challenges), not
/// after its drain began (the process that took over orders from then on).
async fn run(shared: Arc<Shared>, rx: watch::Receiver<Option<Arc<Conf>>>) {
    let open = shared.listeners.opened();
    tokio::select! {
        _ = open.cancelled() => {}
        _ = shared.drain.started() => return,
    }
    tokio::select! {
        _ = plan_and_order(shared.clone(), rx) => {}
        _ = shared.drain.started() => {}
    }
}

/// Orders each due name in turn, sleeps until the next is due or the configuration changes.
async fn plan_and_order(shared: Arc<Shared>, mut rx: watch::Receiver<Option<Arc<Conf>>>) {
    let certs = shared.acme.certs.clone();
    let mut plans: HashMap<String, Plan> = HashMap::new();
    let mut account: Option<instant_acme::Account> = None;
    let mut client: Option<order::Client> = None;
    let mut account_for: Option<Arc<Conf>> = None;
    loop {
        let Some(conf) = rx.borrow_and_update().clone() else {
            plans.clear();
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        // A change to what the account depends on starts from a new client and account.
        let same_account = account_for.as_ref().is_some_and(|a| {
            a.directory == conf.directory
                && a.directory_ca == conf.directory_ca
                && a.eab == conf.eab
                && a.contact == conf.contact
                && a.storage == conf.storage
        });
        if !same_account {
            account = None;
            client = None;
            // A back-off earned against the old server or account says nothing of the new.
            plans.clear();
            account_for = Some(conf.clone());
        }
        plans.retain(|n, _| conf.domains.contains(n));
        for n in &conf.domains {
            plans.entry(n.clone()).or_default();
        }
        let now = SystemTime::now();
        // Renewal information for certificates that have an identifier, when due to ask
        // (once an account is open: asking is never worth a round trip of its own).
        for (name, plan) in plans.iter_mut() {
            let Some(l) = certs.loaded(name) else {
                continue;
            };
            let Some(id) = l.ari_id.as_ref() else {
                continue;
            };
            if plan.ari_next.is_some_and(|t| t > now) || account.is_none() {
                continue;
            }
            let Some(acct) = account.as_ref() else {
                continue;
            };
            let asked = tokio::time::timeout(order::REQUEST_TIMEOUT, acct.renewal_info(id));
            match asked.await.unwrap_or(Err(instant_acme::Error::Str(
                "the ACME server did not answer",
            ))) {
                Ok((info, retry)) => {
                    let w = info.suggested_window;
                    let to_sys = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
                    plan.ari = Some((
                        to_sys(w.start.unix_timestamp()),
                        to_sys(w.end.unix_timestamp()),
                    ));
                    let poll = retry.clamp(MIN_BACKOFF, MAX_BACKOFF);
                    plan.ari_next = Some(now + poll);
                }
                Err(instant_acme::Error::Unsupported(_)) => {
                    // The server offers no renewal information: do not ask again.
                    plan.ari_next = Some(now + Duration::from_secs(100 * 365 * 24 * 3600));
                }
                Err(e) => {
                    tracing::debug!(name = %name, error = %e, "ACME renewal information not read");
                    plan.ari_next = Some(now + ARI_DEFAULT_POLL);
                }
            }
        }
        let next = plans
            .iter()
            .map(|(n, p)| {
                (
                    p.due(certs.loaded(n).as_deref(), conf.renew_before),
                    n.clone(),
                )
            })
            .min();
        let Some((at, name)) = next else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        if at > now {
            // Wall-clock times: woken at least hourly, so a clock that jumps is followed.
            let wait = at
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
                .min(Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                r = rx.changed() => if r.is_err() { return },
            }
            continue;
        }
        let c = match &client {
            Some(c) => c.clone(),
            None => match order::Client::new(&conf) {
                Ok(c) => {
                    client = Some(c.clone());
                    c
                }
                Err(f) => {
                    failed(&shared, &mut plans, &name, f);
                    continue;
                }
            },
        };
        let old = certs.loaded(&name);
        let replaces = old.as_ref().and_then(|l| l.ari_id.clone());
        tracing::info!(name = %name, challenge = conf.challenge.name(), renewal = old.is_some(), "ordering an ACME certificate");
        let ordering = order::order(&mut account, &conf, &c, &certs, &name, replaces.as_ref());
        // Every request has its own timeout, but a server that trickles a body does not
        // hold the task (and every other name's renewal) forever.
        let done = tokio::time::timeout(order::ORDER_TIMEOUT, ordering)
            .await
            .unwrap_or_else(|_| {
                Err(order::Failure::local(
                    "timeout",
                    "the order did not complete in time",
                ))
            });
        match done {
            Ok(issued) => {
                if let Err(e) = store::save(
                    &conf.storage.value,
                    &name,
                    &conf.directory,
                    &issued.chain_pem,
                    &issued.key_pem,
                ) {
                    tracing::error!(name = %name, storage = %conf.storage.value.display(), error = %e, "ACME certificate not stored (served from memory until restart)");
                }
                // A reload may have removed the name while the order ran: checked under the
                // lock a reload's configure takes, so the removal always wins.
                let l = Arc::new(issued.loaded);
                let mut serving = false;
                certs.update(|listed, m| {
                    if listed.contains(&name) {
                        m.insert(name.clone(), l.clone());
                        set_expiry(&shared.metrics, &name, &l);
                        serving = true;
                    }
                });
                if serving {
                    tracing::info!(name = %name, not_after = %crate::admin::rfc3339(l.not_after), "ACME certificate issued and serving");
                }
                // Counted once it serves: whoever sees the count sees the certificate.
                shared
                    .metrics
                    .acme_orders
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                if let Some(p) = plans.get_mut(&name) {
                    *p = Plan {
                        floor: Some(SystemTime::now() + MIN_SPACING),
                        ..Plan::default()
                    };
                }
            }
            Err(f) => failed(&shared, &mut plans, &name, f),
        }
    }
}

/// Counts and logs a failed order and schedules its retry.
fn failed(shared: &Shared, plans: &mut HashMap<String, Plan>, name: &str, f: order::Failure) {
    shared
        .metrics
        .acme_orders
        .get_or_create(&ResultLabel { result: "failed" })
        .inc();
    let Some(plan) = plans.get_mut(name) else {
        return;
    };
    plan.failures += 1;
    let now = SystemTime::now();
    let mut at = now + backoff(plan.failures);
    if let Some(ra) = f.retry_after
        && ra > at
    {
        at = ra.min(now + MAX_BACKOFF);
    }
    plan.retry_at = Some(at);
    tracing::warn!(
        name = %name,
        problem = %f.kind,
        detail = %f.detail,
        failures = plan.failures,
        retry_in_s = at.duration_since(now).unwrap_or_default().as_secs(),
        "ACME order failed; the current certificate keeps serving"
    );
}

/// The files `[acme]` names, read the way an order would read them, so `--check` reports a
/// missing or malformed `directory_ca` or EAB key before the daemon needs it.
pub(crate) fn check_files(conf: &Conf, file: &std::path::Path) -> Vec<crate::config::ConfigError> {
    let mut errors = Vec::new();
    let mut err = |s: &crate::config::Sourced<std::path::PathBuf>, message: String| {
        errors.push(crate::config::ConfigError {
            file: file.to_path_buf(),
            line: s.line,
            key: s.key.clone(),
            message,
        })
    };
    if let Some(ca) = &conf.directory_ca
        && let Err(e) = crate::auth::jwks::client_tls(Some(&ca.value))
    {
        err(ca, e);
    }
    if let Some((_, f)) = &conf.eab {
        match std::fs::read_to_string(&f.value) {
            Err(e) => err(f, format!("{}: {e}", f.value.display())),
            Ok(text) => {
                if let Err(e) = order::eab_key(&text) {
                    err(f, format!("{}: {e}", f.value.display()));
                }
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_minute_to_a_day() {
        assert_eq!(backoff(1), Duration::from_secs(60));
        assert_eq!(backoff(2), Duration::from_secs(120));
        assert_eq!(backoff(5), Duration::from_secs(960));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
