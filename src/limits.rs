//! Admission right after accept, before any TLS work: the per-address connection rate
//! (`governor`, keyed by IPv4 address or IPv6 prefix), the per-address concurrency cap, and the
//! global count whose overflow is answered with 503 after TLS. Admission is a [`Permit`] the
//! connection task holds; dropping it gives the slots back. With `[cluster]` the rate is a
//! fleet bucket instead ([`Fleet`]): every instance's admissions debit it (the others' arrive
//! through [`crate::cluster`] within a sync interval, and may drive it below zero), and the
//! cap counts the other instances' open connections too; the decision stays local and
//! instant either way.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::reject::Refusal;

/// The key a client is counted under: its IPv4 address, or its IPv6 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct IpKey(pub(crate) IpAddr);

impl IpKey {
    /// The key of `ip` with IPv6 addresses cut to `v6_prefix` bits (IPv4-mapped ones unwrapped).
    pub(crate) fn new(ip: IpAddr, v6_prefix: u8) -> Self {
        match ip {
            IpAddr::V4(_) => IpKey(ip),
            IpAddr::V6(v6) => {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    return IpKey(IpAddr::V4(v4));
                }
                let bits = u128::from(v6);
                let mask = if v6_prefix >= 128 {
                    u128::MAX
                } else {
                    !(u128::MAX >> v6_prefix)
                };
                IpKey(IpAddr::V6(Ipv6Addr::from(bits & mask)))
            }
        }
    }
}

type KeyedLimiter =
    RateLimiter<IpKey, DefaultKeyedStateStore<IpKey>, governor::clock::DefaultClock>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    limits: crate::config::Limits,
    max_connections: usize,
}

/// Admission state shared by every listener; survives reloads.
pub(crate) struct Admission {
    settings: ArcSwap<Settings>,
    rate: ArcSwapOption<KeyedLimiter>,
    per_ip: Mutex<HashMap<IpKey, u32>>,
    active: AtomicUsize,
    /// Fleet-wide state, when `[cluster]` is configured.
    /// Set once by [`Admission::join_fleet`]; without `[cluster]` admission never locks it.
    fleet: std::sync::OnceLock<Mutex<Fleet>>,
}

/// The per-address budget shared with other instances.
#[derive(Default)]
struct Fleet {
    /// Token buckets debited by admissions anywhere in the fleet.
    buckets: HashMap<IpKey, Bucket>,
    /// This instance's admissions per key since the last sync.
    admitted: HashMap<IpKey, u32>,
    /// Keys whose open count here changed since the last sync.
    dirty: HashSet<IpKey>,
    /// Open connections per key on the other instances, summed.
    remote_open: HashMap<IpKey, u32>,
    /// Instances alive, this one included: a key first seen here starts with its share of
    /// the burst, since the others may be spending theirs in the same interval.
    instances: u32,
}

/// A token bucket; `tokens` goes negative when other instances spent more than was left.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn refill(&mut self, rate: f64, burst: f64, now: std::time::Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }
}

/// What an instance tells the others each sync: admissions per key since the last one, and
/// the open count of every key that changed (every key with `full`).
pub(crate) struct Usage {
    pub(crate) admitted: Vec<(IpKey, u32)>,
    pub(crate) open: Vec<(IpKey, u32)>,
}

/// A connection's hold on its admission slots.
pub(crate) struct Permit {
    admission: Arc<Admission>,
    key: Option<IpKey>,
    /// True when the global cap was already reached: answer 503.
    pub(crate) over_capacity: bool,
}

impl Admission {
    /// Admission with the given limits.
    pub(crate) fn new(limits: &crate::config::Limits, max_connections: usize) -> Arc<Self> {
        let a = Admission {
            settings: ArcSwap::from_pointee(Settings {
                limits: limits.clone(),
                max_connections,
            }),
            rate: ArcSwapOption::empty(),
            per_ip: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            fleet: std::sync::OnceLock::new(),
        };
        a.rate.store(limiter(limits).map(Arc::new));
        Arc::new(a)
    }

    /// Applies reloaded limits; the rate state restarts only when the rate itself changed.
    pub(crate) fn update(&self, limits: &crate::config::Limits, max_connections: usize) {
        let old = self.settings.load();
        let rate_changed = old.limits.per_ip_rate != limits.per_ip_rate
            || old.limits.per_ip_burst != limits.per_ip_burst
            || old.limits.ipv6_prefix != limits.ipv6_prefix;
        self.settings.store(Arc::new(Settings {
            limits: limits.clone(),
            max_connections,
        }));
        if rate_changed {
            self.rate.store(limiter(limits).map(Arc::new));
        }
    }

    /// Shares the budget with a fleet from now on.
    pub(crate) fn join_fleet(&self) {
        let _ = self.fleet.set(Mutex::new(Fleet {
            instances: 1,
            ..Fleet::default()
        }));
    }

    /// How many instances are alive, this one included.
    pub(crate) fn set_instances(&self, n: u32) {
        if let Some(f) = self.fleet_lock().as_deref_mut() {
            f.instances = n.max(1);
        }
    }

    fn fleet_lock(&self) -> Option<std::sync::MutexGuard<'_, Fleet>> {
        self.fleet
            .get()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Admits or refuses a new connection from `ip`.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        let s = self.settings.load();
        let key = IpKey::new(ip, s.limits.ipv6_prefix);
        let cap = s.limits.per_ip_max_connections;
        let mut fleet = self.fleet_lock();
        match fleet.as_deref_mut() {
            Some(f) if s.limits.per_ip_rate > 0 => {
                let (rate, burst) = (
                    f64::from(s.limits.per_ip_rate),
                    f64::from(s.limits.per_ip_burst.max(1)),
                );
                let now = std::time::Instant::now();
                let share = (burst / f64::from(f.instances.max(1))).max(1.0);
                let b = f.buckets.entry(key).or_insert(Bucket {
                    tokens: share,
                    at: now,
                });
                b.refill(rate, burst, now);
                if b.tokens < 1.0 {
                    return Err(Refusal::RateLimit);
                }
                b.tokens -= 1.0;
            }
            Some(_) => {}
            None => {
                if let Some(rate) = &*self.rate.load()
                    && rate.check_key(&key).is_err()
                {
                    return Err(Refusal::RateLimit);
                }
            }
        }
        if cap > 0 {
            let remote = fleet
                .as_deref()
                .and_then(|f| f.remote_open.get(&key).copied())
                .unwrap_or(0);
            let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(key).or_insert(0);
            if n.saturating_add(remote) >= cap {
                if *n == 0 {
                    map.remove(&key);
                }
                return Err(Refusal::PerIpCap);
            }
            *n += 1;
        }
        if let Some(f) = fleet.as_deref_mut() {
            *f.admitted.entry(key).or_insert(0) += 1;
            if cap > 0 {
                f.dirty.insert(key);
            }
        }
        drop(fleet);
        let before = self.active.fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            admission: self.clone(),
            key: (cap > 0).then_some(key),
            over_capacity: before >= s.max_connections,
        })
    }

    /// Forgets rate state of addresses that have been quiet long enough to be at rest again.
    pub(crate) fn prune(&self) -> usize {
        if let Some(f) = self.fleet_lock().as_deref_mut() {
            let s = self.settings.load();
            let (rate, burst) = (
                f64::from(s.limits.per_ip_rate),
                f64::from(s.limits.per_ip_burst.max(1)),
            );
            let now = std::time::Instant::now();
            if rate == 0.0 {
                f.buckets.clear();
            }
            f.buckets.retain(|_, b| {
                b.refill(rate, burst, now);
                b.tokens < burst
            });
            f.buckets.shrink_to_fit();
            return f.buckets.len();
        }
        match &*self.rate.load() {
            Some(r) => prune(r),
            None => 0,
        }
    }

    /// This instance's usage since the last call, for the other instances.
    pub(crate) fn take_usage(&self, full: bool) -> Usage {
        let mut fleet = self.fleet_lock();
        let Some(f) = fleet.as_deref_mut() else {
            return Usage {
                admitted: Vec::new(),
                open: Vec::new(),
            };
        };
        let admitted: Vec<_> = f.admitted.drain().collect();
        let dirty: Vec<IpKey> = f.dirty.drain().collect();
        drop(fleet);
        let map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let open = if full {
            map.iter().map(|(k, n)| (*k, *n)).collect()
        } else {
            dirty
                .into_iter()
                .map(|k| (k, map.get(&k).copied().unwrap_or(0)))
                .collect()
        };
        Usage { admitted, open }
    }

    /// Admissions other instances made: they spend this instance's buckets too, below zero
    /// if need be, so the fleet as a whole keeps to the budget: when every instance spent its
    /// full burst at once, the debt makes them all wait until the fleet's refill has paid for
    /// it. The floor only bounds a debt no real fleet runs up.
    pub(crate) fn debit(&self, admitted: &[(IpKey, u32)]) {
        let s = self.settings.load();
        if s.limits.per_ip_rate == 0 {
            return;
        }
        let (rate, burst) = (
            f64::from(s.limits.per_ip_rate),
            f64::from(s.limits.per_ip_burst.max(1)),
        );
        let now = std::time::Instant::now();
        let mut fleet = self.fleet_lock();
        let Some(f) = fleet.as_deref_mut() else {
            return;
        };
        for (key, n) in admitted {
            let b = f.buckets.entry(*key).or_insert(Bucket {
                tokens: burst,
                at: now,
            });
            b.refill(rate, burst, now);
            b.tokens = (b.tokens - f64::from(*n)).max(-(16.0 * burst + rate));
        }
    }

    /// The other instances' open connections from `key`, summed.
    pub(crate) fn set_remote_open(&self, key: IpKey, n: u32) {
        if let Some(f) = self.fleet_lock().as_deref_mut() {
            if n == 0 {
                f.remote_open.remove(&key);
            } else {
                f.remote_open.insert(key, n);
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(key) = self.key {
            // The fleet lock first (the order admit takes them in), held over the decrement:
            // a sync between marking the key and lowering its count would publish the old one.
            let mut fleet = self.admission.fleet_lock();
            let mut map = self
                .admission
                .per_ip
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&key);
                }
            }
            if let Some(f) = fleet.as_deref_mut() {
                f.dirty.insert(key);
            }
        }
    }
}

fn limiter(l: &crate::config::Limits) -> Option<KeyedLimiter> {
    let rate = NonZeroU32::new(l.per_ip_rate)?;
    let burst = NonZeroU32::new(l.per_ip_burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Some(RateLimiter::dashmap(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

/// Drops keys at rest and gives their memory back; returns the keys left.
pub(crate) fn prune<C: Clock>(
    r: &RateLimiter<IpKey, DefaultKeyedStateStore<IpKey>, C, NoOpMiddleware<C::Instant>>,
) -> usize {
    r.retain_recent();
    r.shrink_to_fit();
    r.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    #[test]
    fn ipv6_clients_share_their_prefix_key() {
        let a = IpKey::new("2001:db8:1:2::1".parse().unwrap(), 64);
        let b = IpKey::new("2001:db8:1:2:ffff::9".parse().unwrap(), 64);
        let c = IpKey::new("2001:db8:1:3::1".parse().unwrap(), 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            IpKey::new("::ffff:10.1.2.3".parse().unwrap(), 64),
            IpKey::new("10.1.2.3".parse().unwrap(), 64)
        );
    }

    #[test]
    fn a_million_sprayed_addresses_are_pruned_back() {
        let clock = FakeRelativeClock::default();
        let quota = Quota::per_second(NonZeroU32::new(20).unwrap())
            .allow_burst(NonZeroU32::new(40).unwrap());
        let r: RateLimiter<
            IpKey,
            DefaultKeyedStateStore<IpKey>,
            FakeRelativeClock,
            NoOpMiddleware<<FakeRelativeClock as Clock>::Instant>,
        > = RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone());
        for i in 0..1_000_000u32 {
            let ip = IpAddr::V4(i.to_be_bytes().into());
            assert!(r.check_key(&IpKey(ip)).is_ok());
        }
        assert_eq!(r.len(), 1_000_000);
        assert_eq!(prune(&r), 1_000_000, "keys seen just now are kept");
        clock.advance(Duration::from_secs(3));
        assert_eq!(prune(&r), 0);
    }

    #[test]
    fn per_address_cap_counts_live_permits() {
        let limits = crate::config::Limits {
            per_ip_rate: 0,
            per_ip_burst: 1,
            per_ip_max_connections: 2,
            ipv6_prefix: 64,
        };
        let a = Admission::new(&limits, 10);
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let p1 = a.admit(ip).unwrap();
        let _p2 = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).err(), Some(Refusal::PerIpCap));
        drop(p1);
        assert!(a.admit(ip).is_ok());
        assert!(a.admit("127.0.0.10".parse().unwrap()).is_ok());
    }
}
