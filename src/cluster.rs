//! The fleet, through Redis pub/sub, off every critical path. Each `sync_interval` an
//! instance publishes on `wsgate:sync` its heartbeat (name, version, open tunnels) with its
//! per-address usage since the last one ([`crate::limits::Usage`]); it folds the others' into
//! its admission (their admissions debit its buckets, their open counts add to its caps) and
//! forgets an instance not heard from for three intervals. Admin calls with `cluster=true`
//! are published on `wsgate:control`, applied by every instance to its own tunnels and
//! answered on `wsgate:reply`. Redis holds no keys of ours, so its memory cannot grow with
//! the addresses seen. While Redis is away every instance decides alone, with its full local
//! budget; `wsgate_cluster_redis_up` says so.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::rfc3339;
use crate::limits::{IpKey, Usage};
use crate::server::Shared;

const SYNC: &str = "wsgate:sync";
const CONTROL: &str = "wsgate:control";
const REPLY: &str = "wsgate:reply";
/// How long a fleet-wide admin call waits for the other instances.
pub(crate) const REPLY_WITHIN: Duration = Duration::from_secs(2);
/// Every this many syncs, an instance sends every open count, not just the changed ones, so
/// an instance that missed messages catches up.
const FULL_EVERY: u32 = 50;

/// This instance's view of the fleet.
pub(crate) struct Cluster {
    pub(crate) instance: String,
    interval: Duration,
    client: redis::Client,
    up: AtomicBool,
    peers: Mutex<HashMap<String, Peer>>,
    /// Fleet-wide admin calls waiting for answers, by id.
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<Value>>>,
    /// Messages to publish (control calls and replies), sent by the sync task.
    outbox: mpsc::UnboundedSender<(&'static str, String)>,
    outbox_rx: Mutex<Option<mpsc::UnboundedReceiver<(&'static str, String)>>>,
    pub(crate) stop: CancellationToken,
    /// The next heartbeat carries every open count (a peer asked, or we reconnected).
    need_full: AtomicBool,
    /// When our own last heartbeat came back through the subscription.
    echo: Mutex<Option<Instant>>,
    /// Tells the listener to drop a subscription that stopped delivering.
    resubscribe: tokio::sync::Notify,
    /// When the up/down change was last logged (at most once a minute).
    logged: Mutex<Option<Instant>>,
}

/// Another instance, as its heartbeats describe it.
struct Peer {
    tunnels: u64,
    version: String,
    seen: Instant,
    seen_wall: SystemTime,
    open: HashMap<IpKey, u32>,
}

impl Cluster {
    /// The cluster of `[cluster]`; nothing connects until [`start`].
    pub(crate) fn new(c: &crate::config::Cluster) -> Option<Arc<Cluster>> {
        let client = redis::Client::open(c.redis.as_str()).ok()?;
        let (tx, rx) = mpsc::unbounded_channel();
        Some(Arc::new(Cluster {
            instance: c.instance.clone(),
            interval: c.sync_interval,
            client,
            up: AtomicBool::new(false),
            peers: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            outbox: tx,
            outbox_rx: Mutex::new(Some(rx)),
            stop: CancellationToken::new(),
            need_full: AtomicBool::new(true),
            echo: Mutex::new(None),
            resubscribe: tokio::sync::Notify::new(),
            logged: Mutex::new(None),
        }))
    }

    /// A heartbeat seen at `seen` still counts (three intervals).
    fn is_fresh(&self, seen: Instant) -> bool {
        seen.elapsed() <= self.interval * 3
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every instance heard from in the last three intervals, this one first.
    pub(crate) fn instances(&self, own_tunnels: usize) -> Value {
        let mut list = vec![json!({
            "instance": self.instance,
            "tunnels": own_tunnels,
            "version": env!("CARGO_PKG_VERSION"),
            "last_seen": rfc3339(SystemTime::now()),
        })];
        let peers = self.peers();
        let mut names: Vec<&String> = peers
            .iter()
            .filter(|(_, p)| self.is_fresh(p.seen))
            .map(|(n, _)| n)
            .collect();
        names.sort();
        for n in names {
            let p = &peers[n];
            list.push(json!({
                "instance": n,
                "tunnels": p.tunnels,
                "version": p.version,
                "last_seen": rfc3339(p.seen_wall),
            }));
        }
        json!({ "instances": list })
    }

    /// Publishes an admin call for the other instances and collects their answers for up to
    /// [`REPLY_WITHIN`] (or until every instance alive has answered).
    pub(crate) async fn broadcast(
        &self,
        path: &str,
        params: HashMap<String, String>,
    ) -> Vec<Value> {
        let id = random_u64();
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        // Out of the table however this ends (the admin client may go away mid-wait).
        let _pending = Pending { c: self, id };
        let expected = {
            self.peers()
                .values()
                .filter(|p| self.is_fresh(p.seen))
                .count()
        };
        let msg = json!({ "id": id, "from": self.instance, "path": path, "params": params });
        let _ = self.outbox.send((CONTROL, msg.to_string()));
        let mut answers = Vec::new();
        let deadline = tokio::time::Instant::now() + REPLY_WITHIN;
        loop {
            // Once every instance known alive answered, one more interval for any whose
            // heartbeat has not arrived here yet.
            let until = if answers.len() >= expected {
                deadline.min(tokio::time::Instant::now() + self.interval)
            } else {
                deadline
            };
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(v)) => answers.push(v),
                _ => break,
            }
        }
        answers
    }

    fn set_up(&self, shared: &Shared, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
            // A flapping Redis is logged once a minute, not at every flip.
            if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) || up {
                *logged = Some(Instant::now());
                if up {
                    tracing::info!("cluster: Redis reachable; sharing budgets again");
                } else {
                    tracing::warn!("cluster: Redis unreachable; deciding alone with local budgets");
                }
            }
        }
        shared.metrics.cluster_redis_up.set(i64::from(up));
    }

    /// Forgets instances not heard from in three intervals (their open counts stop counting).
    fn expire(&self, shared: &Shared) {
        let mut peers = self.peers();
        let gone: Vec<String> = peers
            .iter()
            .filter(|(_, p)| !self.is_fresh(p.seen))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            if let Some(p) = peers.remove(&n) {
                for k in p.open.keys() {
                    shared.admission.set_remote_open(*k, sum_open(&peers, k));
                }
            }
        }
        shared.admission.set_instances(peers.len() as u32 + 1);
    }

    /// A heartbeat with usage from another instance.
    fn fold(&self, shared: &Shared, v: &Value) {
        if v["resync"]
            .as_str()
            .is_some_and(|from| from != self.instance)
        {
            // An instance (re)subscribed and missed what was sent meanwhile.
            self.need_full.store(true, Ordering::Relaxed);
            return;
        }
        let Some(name) = v["i"].as_str() else {
            return;
        };
        if name == self.instance {
            // Our own heartbeat came back: the subscription works.
            *self.echo.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            return;
        }
        let admitted = keyed(&v["a"]);
        shared.admission.debit(&admitted);
        let open = keyed(&v["o"]);
        let full = v["full"].as_bool().unwrap_or(false);
        let mut peers = self.peers();
        if !full && !peers.contains_key(name) {
            // A peer first heard mid-stream: ask for everyone's full counts.
            let _ = self
                .outbox
                .send((SYNC, json!({ "resync": self.instance }).to_string()));
        }
        let peer = peers.entry(name.to_string()).or_insert_with(|| Peer {
            tunnels: 0,
            version: String::new(),
            seen: Instant::now(),
            seen_wall: SystemTime::now(),
            open: HashMap::new(),
        });
        peer.tunnels = v["t"].as_u64().unwrap_or(0);
        peer.version = v["v"].as_str().unwrap_or("").to_string();
        peer.seen = Instant::now();
        peer.seen_wall = SystemTime::now();
        let mut touched: Vec<IpKey> = open.iter().map(|(k, _)| *k).collect();
        if full {
            touched.extend(peer.open.keys().copied());
            peer.open.clear();
        }
        for (k, n) in open {
            if n == 0 {
                peer.open.remove(&k);
            } else {
                peer.open.insert(k, n);
            }
        }
        for k in touched {
            shared.admission.set_remote_open(k, sum_open(&peers, &k));
        }
        shared.admission.set_instances(peers.len() as u32 + 1);
    }
}

/// A fleet-wide call's entry in the table of calls awaiting answers.
struct Pending<'a> {
    c: &'a Cluster,
    id: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.c
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

fn sum_open(peers: &HashMap<String, Peer>, k: &IpKey) -> u32 {
    peers
        .values()
        .filter_map(|p| p.open.get(k))
        .fold(0u32, |a, b| a.saturating_add(*b))
}

/// `[["1.2.3.4", 3], ...]` as keys and counts; anything else is skipped.
fn keyed(v: &Value) -> Vec<(IpKey, u32)> {
    let Some(list) = v.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let ip: IpAddr = e.get(0)?.as_str()?.parse().ok()?;
            let n = u32::try_from(e.get(1)?.as_u64()?).ok()?;
            Some((IpKey(ip), n))
        })
        .collect()
}

fn usage_json(u: &[(IpKey, u32)]) -> Value {
    Value::Array(u.iter().map(|(k, n)| json!([k.0.to_string(), n])).collect())
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b);
    u64::from_le_bytes(b)
}

/// Starts the sync and listen tasks; they end when `cluster.stop` is cancelled.
pub(crate) fn start(shared: Arc<Shared>, cluster: Arc<Cluster>) {
    shared.admission.join_fleet();
    tokio::spawn(sync_loop(shared.clone(), cluster.clone()));
    tokio::spawn(listen_loop(shared, cluster));
}

/// Publishes this instance's heartbeat and usage every interval, and whatever the outbox
/// holds. A Redis that stalls delays only this task.
async fn sync_loop(shared: Arc<Shared>, c: Arc<Cluster>) {
    let mut outbox = c
        .outbox_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .expect("started once");
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut tick = tokio::time::interval(c.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    let mut backoff = Duration::from_millis(100);
    let mut next_connect = Instant::now();
    let timeout = c.interval.max(Duration::from_secs(2));
    loop {
        let extra = tokio::select! {
            _ = c.stop.cancelled() => return,
            _ = tick.tick() => None,
            m = outbox.recv() => m,
        };
        if conn.is_none() {
            let connected = if Instant::now() < next_connect {
                None
            } else {
                tokio::time::timeout(timeout, c.client.get_multiplexed_async_connection())
                    .await
                    .ok()
                    .and_then(Result::ok)
            };
            match connected {
                Some(k) => {
                    conn = Some(k);
                    backoff = Duration::from_millis(100);
                    // The first message after (re)connecting carries every open count.
                    c.need_full.store(true, Ordering::Relaxed);
                }
                None => {
                    if Instant::now() >= next_connect {
                        next_connect = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    c.set_up(&shared, false);
                    c.expire(&shared);
                    // Usage piles up only until the next successful sync.
                    let _ = shared.admission.take_usage(false);
                    continue;
                }
            }
        }
        let k = conn.as_mut().expect("connected above");
        let (channel, payload) = match extra {
            Some(m) => m,
            None => {
                n = n.wrapping_add(1);
                let full =
                    c.need_full.swap(false, Ordering::Relaxed) || n.is_multiple_of(FULL_EVERY);
                let Usage { admitted, open } = shared.admission.take_usage(full);
                let msg = json!({
                    "i": c.instance,
                    "v": env!("CARGO_PKG_VERSION"),
                    "t": shared.tunnels.len(),
                    "full": full,
                    "a": usage_json(&admitted),
                    "o": usage_json(&open),
                });
                c.expire(&shared);
                (SYNC, msg.to_string())
            }
        };
        let sent = tokio::time::timeout(
            timeout,
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(&payload)
                .query_async::<i64>(k),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {
                // Up only while our own heartbeats also come back through the subscription:
                // a publisher that works beside a dead subscription is still alone.
                let echo = *c.echo.lock().unwrap_or_else(|e| e.into_inner());
                // Lenient: a busy instance may take a while to read its own message back.
                let window = (c.interval * 10).max(Duration::from_secs(2));
                let hearing = echo.is_some_and(|t| t.elapsed() <= window);
                if !hearing && echo.is_some() {
                    c.resubscribe.notify_one();
                }
                c.set_up(&shared, hearing);
            }
            _ => {
                conn = None;
                c.set_up(&shared, false);
            }
        }
    }
}

/// Listens to the fleet's channels, reconnecting with a back-off while Redis is away.
async fn listen_loop(shared: Arc<Shared>, c: Arc<Cluster>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = async {
            let limit = c.interval.max(Duration::from_secs(2));
            let timed_out =
                || redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
            let mut ps = tokio::time::timeout(limit, c.client.get_async_pubsub())
                .await
                .map_err(|_| timed_out())??;
            tokio::time::timeout(limit, ps.subscribe(&[SYNC, CONTROL, REPLY]))
                .await
                .map_err(|_| timed_out())??;
            backoff = Duration::from_millis(100);
            *c.echo.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            // Whatever was published while we were away is lost: everyone resends in full.
            let _ = c
                .outbox
                .send((SYNC, json!({ "resync": c.instance }).to_string()));
            c.need_full.store(true, Ordering::Relaxed);
            let mut stream = ps.on_message();
            while let Some(msg) = stream.next().await {
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&payload) else {
                    continue;
                };
                match msg.get_channel_name() {
                    SYNC => c.fold(&shared, &v),
                    CONTROL => control(&shared, &c, v),
                    REPLY => {
                        let Some(id) = v["id"].as_u64() else {
                            continue;
                        };
                        let tx = c
                            .pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&id)
                            .cloned();
                        if let Some(tx) = tx {
                            let _ = tx.send(v["answer"].clone());
                        }
                    }
                    _ => {}
                }
            }
            Ok::<(), redis::RedisError>(())
        };
        tokio::select! {
            _ = c.stop.cancelled() => return,
            _ = session => {}
            // Our own heartbeats stopped coming back: a silently dead connection.
            _ = c.resubscribe.notified() => {}
        }
        tokio::select! {
            _ = c.stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// An admin call another instance published: applied here, answered on the reply channel.
fn control(shared: &Arc<Shared>, c: &Arc<Cluster>, v: Value) {
    if v["from"].as_str() == Some(c.instance.as_str()) {
        return;
    }
    let (Some(id), Some(path)) = (v["id"].as_u64(), v["path"].as_str()) else {
        return;
    };
    let params: HashMap<String, String> = v["params"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let path = path.to_string();
    let (shared, c) = (shared.clone(), c.clone());
    tokio::spawn(async move {
        let mut answer = crate::admin::apply_remote(&shared, &path, params).await;
        if let Value::Object(m) = &mut answer {
            m.insert("instance".into(), Value::String(c.instance.clone()));
        }
        let reply = json!({ "id": id, "instance": c.instance, "answer": answer });
        let _ = c.outbox.send((REPLY, reply.to_string()));
    });
}
