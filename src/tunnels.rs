//! The live tunnels of the process, by id: who they connect (client, route, backend, subject),
//! when they opened, what they relayed (updated by each relay pass), and each tunnel's
//! mailbox, through which a drain, a backend going down or an operator closes it. What the
//! admin API lists and closes is this registry, the one the relay reports to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::time::Instant;

use crate::backends::BackendState;
use crate::relay::orders::{Mailbox, Order};

/// One live tunnel.
pub(crate) struct TunnelEntry {
    pub(crate) id: u64,
    pub(crate) client: SocketAddr,
    pub(crate) route: String,
    pub(crate) backend: Arc<BackendState>,
    pub(crate) subject: Option<String>,
    /// `http1` (an Upgrade) or `h2` (an extended CONNECT on an HTTP/2 stream).
    pub(crate) protocol: &'static str,
    pub(crate) opened_at: SystemTime,
    pub(crate) opened: Instant,
    /// Bytes and frames relayed each way, frame headers included.
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
    pub(crate) frames_up: AtomicU64,
    pub(crate) frames_down: AtomicU64,
    pub(crate) mailbox: Mailbox,
}

impl TunnelEntry {
    pub(crate) fn close(&self, order: Order) {
        self.mailbox.post(order);
    }
}

/// Every live tunnel.
#[derive(Default)]
pub(crate) struct TunnelRegistry {
    map: Mutex<HashMap<u64, Arc<TunnelEntry>>>,
}

impl TunnelRegistry {
    /// Lists a tunnel that just opened; its owner removes it when it ends.
    pub(crate) fn insert(&self, entry: Arc<TunnelEntry>) {
        self.lock().insert(entry.id, entry);
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// How many are open.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The tunnels for which `pred` holds.
    pub(crate) fn select(&self, pred: impl Fn(&TunnelEntry) -> bool) -> Vec<Arc<TunnelEntry>> {
        self.lock().values().filter(|e| pred(e)).cloned().collect()
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<TunnelEntry>> {
        self.lock().get(&id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<TunnelEntry>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Adds a relay pass's traffic to the tunnel's own counters (relaxed: readers want totals).
pub(crate) fn add(entry: &TunnelEntry, d: &crate::relay::Traffic) {
    for (c, v) in [
        (&entry.bytes_up, d.bytes_up),
        (&entry.bytes_down, d.bytes_down),
        (&entry.frames_up, d.frames_up),
        (&entry.frames_down, d.frames_down),
    ] {
        if v > 0 {
            c.fetch_add(v, Ordering::Relaxed);
        }
    }
}
