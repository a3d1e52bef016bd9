//! Choosing a route's backend for one tunnel or request: only backends that are up and not
//! drained take new work (a tunnel also skips the ones at `max_tunnels`); a sticky cookie or
//! the client's address may name one; otherwise weighted round robin or the fewest open
//! tunnels plus requests per unit of weight (ties in turn). The answer is the order to try
//! them in: the chosen one, then the others for failover.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{Balance, Route, Sticky};
use crate::reject::Refusal;

use super::BackendState;

/// The order to try a route's backends in (indices into `route.backends`), and whether the
/// answer must (re)set the sticky cookie to the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pick {
    pub(crate) order: Vec<usize>,
    pub(crate) set_cookie: bool,
}

/// Picks for a tunnel (`tunnel`: caps apply) or a plain request.
pub(crate) fn pick(
    route: &Route,
    states: &[std::sync::Arc<BackendState>],
    rr: &AtomicUsize,
    client: IpAddr,
    cookie: Option<&str>,
    tunnel: bool,
) -> Result<Pick, Refusal> {
    let usable: Vec<usize> = (0..states.len())
        .filter(|&i| states[i].is_up() && !states[i].is_draining())
        .collect();
    if usable.is_empty() {
        return Err(Refusal::NoHealthyBackend);
    }
    let full = |i: usize| {
        let cap = route.backends[i].max_tunnels as usize;
        tunnel && cap > 0 && states[i].tunnels() >= cap
    };
    let open: Vec<usize> = usable.iter().copied().filter(|&i| !full(i)).collect();
    if open.is_empty() {
        return Err(Refusal::BackendFull);
    }
    let named = match (&route.sticky, cookie) {
        (Sticky::Cookie(_), Some(v)) => open
            .iter()
            .copied()
            .find(|&i| super::sticky::value(&route.label(), &route.backends[i].label) == v),
        _ => None,
    };
    let turn = rr.fetch_add(1, Ordering::Relaxed);
    let first = match named {
        Some(i) => i,
        None => match (&route.sticky, route.balance) {
            (Sticky::IpHash, _) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                client.hash(&mut h);
                by_weight(route, &open, h.finish() as usize)
            }
            (_, Balance::RoundRobin) => by_weight(route, &open, turn),
            (_, Balance::LeastConn) => least_loaded(route, states, &open, turn),
        },
    };
    let at = open.iter().position(|&i| i == first).unwrap_or(0);
    let mut order: Vec<usize> = open[at..].iter().chain(&open[..at]).copied().collect();
    // Full backends still take plain requests' failover last; tunnels never go to them.
    if !tunnel {
        let rest: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|i| !order.contains(i))
            .collect();
        order.extend(rest);
    }
    Ok(Pick {
        set_cookie: matches!(route.sticky, Sticky::Cookie(_)) && named.is_none(),
        order,
    })
}

/// The backend at position `n` of the weighted cycle over `candidates`.
fn by_weight(route: &Route, candidates: &[usize], n: usize) -> usize {
    let total: usize = candidates
        .iter()
        .map(|&i| route.backends[i].weight as usize)
        .sum();
    let mut k = n % total.max(1);
    for &i in candidates {
        let w = route.backends[i].weight as usize;
        if k < w {
            return i;
        }
        k -= w;
    }
    candidates[0]
}

/// The candidate with the least load per unit of weight; ties go in turn.
fn least_loaded(
    route: &Route,
    states: &[std::sync::Arc<BackendState>],
    candidates: &[usize],
    turn: usize,
) -> usize {
    let n = candidates.len();
    let mut best = candidates[turn % n];
    for k in 0..n {
        let i = candidates[(turn + k) % n];
        // a / wa < b / wb  <=>  a * wb < b * wa
        let load = |i: usize| (states[i].tunnels() + states[i].requests()) as u64;
        let w = |i: usize| route.backends[i].weight as u64;
        if load(i) * w(best) < load(best) * w(i) {
            best = i;
        }
    }
    best
}
