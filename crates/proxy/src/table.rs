//! The route table. The control plane edits a [`Registry`] under a mutex and
//! publishes an immutable [`Snapshot`] through one `ArcSwap`; the request
//! path only loads the snapshot (no lock) and reads backend atomics.

use crate::backend::{BackendState, InFlight};
use nonstop_core::ids::InstanceId;
use nonstop_core::traffic::{RouteKey, Split};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The backends of one route, in a stable order.
pub(crate) struct Route {
    pub key: RouteKey,
    pub backends: Box<[Arc<BackendState>]>,
    /// The route is in maintenance (`maintenance.rs`).
    pub maintenance: Option<Arc<crate::maintenance::Gate>>,
    /// A share of the requests for some backends (a canary).
    pub split: Option<RouteSplit>,
    /// Rotating start of the scan: the round-robin tie-break.
    cursor: AtomicUsize,
}

/// A route's [`Split`] as the request path uses it: the two groups as
/// positions in `Route::backends`, each with its own round-robin cursor.
pub(crate) struct RouteSplit {
    percent: u8,
    /// `[listed, others]`.
    groups: [Box<[u32]>; 2],
    cursors: [AtomicUsize; 2],
    /// Requests given a group so far; kept across snapshots (the registry
    /// holds it), so that republishing the table does not restart the
    /// spread.
    counter: Arc<AtomicU64>,
}

impl Route {
    /// Round robin over the Healthy backends, skipping a backend with
    /// clearly more requests in flight than the least loaded one
    /// ([`round_robin_fits`]): then the least loaded is taken. `avoid` (the
    /// backend a retry comes from) is used only when no other backend is
    /// healthy. With a split, a first attempt is given a group first (the
    /// listed backends `percent`% of the time, spread evenly:
    /// [`Split::takes`]) and chooses in it the same way, or in the other
    /// group when none of its backends is healthy; a retry chooses among
    /// all.
    pub fn pick(&self, avoid: Option<&Arc<BackendState>>) -> Option<InFlight> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let group = match (&self.split, avoid) {
            (Some(split), None) => {
                let number = split.counter.fetch_add(1, Ordering::Relaxed);
                Some((split, usize::from(!Split::takes(split.percent, number))))
            }
            _ => None,
        };
        // Health may change between the scan and the acquire; rescan a
        // bounded number of times.
        for _ in 0..=n {
            let chosen = match group {
                None => self.scan(None, self.cursor.fetch_add(1, Ordering::Relaxed), avoid),
                Some((split, want)) => {
                    let start = split.cursors[want].fetch_add(1, Ordering::Relaxed);
                    self.scan(Some(&split.groups[want]), start, None).or_else(|| {
                        let other = 1 - want;
                        let start = split.cursors[other].fetch_add(1, Ordering::Relaxed);
                        self.scan(Some(&split.groups[other]), start, None)
                    })
                }
            };
            match chosen {
                None => return None,
                Some(b) => {
                    if let Some(guard) = InFlight::try_acquire(b) {
                        return Some(guard);
                    }
                }
            }
        }
        None
    }

    /// One round-robin scan over `members` (positions in `backends`; all
    /// of them when `None`) from `start`.
    #[inline]
    fn scan(
        &self,
        members: Option<&[u32]>,
        start: usize,
        avoid: Option<&Arc<BackendState>>,
    ) -> Option<&Arc<BackendState>> {
        let m = members.map_or(self.backends.len(), <[u32]>::len);
        if m == 0 {
            return None;
        }
        let mut next: Option<(&Arc<BackendState>, u64)> = None;
        let mut least: Option<(&Arc<BackendState>, u64)> = None;
        let mut avoided: Option<&Arc<BackendState>> = None;
        for i in 0..m {
            let k = start.wrapping_add(i) % m;
            let b = match members {
                None => &self.backends[k],
                Some(members) => &self.backends[members[k] as usize],
            };
            if !b.is_healthy() {
                continue;
            }
            if avoid.is_some_and(|a| Arc::ptr_eq(a, b)) {
                avoided = Some(b);
                continue;
            }
            let load = b.in_flight();
            next.get_or_insert((b, load));
            if least.is_none_or(|(_, least_load)| load < least_load) {
                least = Some((b, load));
            }
        }
        match (next, least) {
            (Some((next, next_load)), Some((least, least_load))) => {
                Some(if round_robin_fits(next_load, least_load) { next } else { least })
            }
            _ => avoided,
        }
    }
}

/// Whether the backend next in round-robin order, with `next` requests in
/// flight, takes the request when the least loaded one has `least`: yes
/// unless it has more than twice as many (and with `least` at 0, any at
/// all: an idle instance is never passed over, so one slow request is
/// enough to avoid an instance that serves one request at a time). Round
/// robin spreads a steady load more evenly over time than pure
/// least-outstanding, which chases whichever instance answered last and
/// makes it work in bursts (in `bench/proxy`, keep-alive, 64 connections:
/// p99 2.5 ms against 3.3 ms, HAProxy 2.4); the bound keeps
/// least-outstanding's point, not queueing behind slow requests.
pub(crate) fn round_robin_fits(next: u64, least: u64) -> bool {
    next <= least.saturating_mul(2)
}

/// An immutable view of the routes, swapped as a whole.
#[derive(Default)]
pub(crate) struct Snapshot {
    exact: HashMap<Box<str>, Arc<Route>>,
    /// `*.example.com` is stored as `example.com` and matches one label.
    wildcard: HashMap<Box<str>, Arc<Route>>,
    default: Option<Arc<Route>>,
}

impl Snapshot {
    /// The route for a request's `Host` (port and case ignored); the
    /// default route when no host matches.
    pub fn route_for(&self, host: Option<&[u8]>) -> Option<&Arc<Route>> {
        if self.exact.is_empty() && self.wildcard.is_empty() {
            return self.default.as_ref();
        }
        let found = host.and_then(|h| {
            let h = host_name(h)?;
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                self.lookup(&h.to_ascii_lowercase())
            } else {
                self.lookup(h)
            }
        });
        found.or(self.default.as_ref())
    }

    fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        if let Some(route) = self.exact.get(host) {
            return Some(route);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }
}

/// The host part of a `Host` header: without port, without a trailing dot.
/// IPv6 literals keep their brackets.
fn host_name(raw: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    let host = if s.starts_with('[') {
        match s.find(']') {
            Some(end) => &s[..=end],
            None => s,
        }
    } else {
        match s.rfind(':') {
            Some(colon) => &s[..colon],
            None => s,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// A configured host, normalised like a request's.
pub(crate) fn normalize_host(raw: &str) -> Option<String> {
    let (wild, rest) = match raw.trim().strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, raw.trim()),
    };
    let name = host_name(rest.as_bytes())?.to_ascii_lowercase();
    Some(if wild { format!("*.{name}") } else { name })
}

pub(crate) struct Entry {
    pub route: RouteKey,
    pub state: Arc<BackendState>,
    /// False once draining: no longer in the snapshot.
    pub in_rotation: bool,
}

/// The control plane's view, edited under a mutex.
#[derive(Default)]
pub(crate) struct Registry {
    pub backends: HashMap<InstanceId, Entry>,
    pub default_route: Option<RouteKey>,
    pub hosts: BTreeMap<RouteKey, Vec<String>>,
    /// Routes in maintenance.
    pub maintenance: BTreeMap<RouteKey, Arc<crate::maintenance::Gate>>,
    /// Routes with a split, and the number of requests each has given a
    /// group so far.
    pub splits: BTreeMap<RouteKey, (Split, Arc<AtomicU64>)>,
}

impl Registry {
    pub fn snapshot(&self) -> Snapshot {
        let mut grouped: BTreeMap<&RouteKey, Vec<&Arc<BackendState>>> = BTreeMap::new();
        for entry in self.backends.values().filter(|e| e.in_rotation) {
            grouped.entry(&entry.route).or_default().push(&entry.state);
        }
        for key in self.hosts.keys().chain(self.default_route.iter()).chain(self.maintenance.keys()) {
            grouped.entry(key).or_default();
        }
        let mut routes: HashMap<&RouteKey, Arc<Route>> = HashMap::new();
        for (key, mut backends) in grouped {
            backends.sort_by(|a, b| a.instance.cmp(&b.instance));
            let backends = backends.into_iter().cloned().collect();
            let backends: Box<[Arc<BackendState>]> = backends;
            let maintenance = self.maintenance.get(key).cloned();
            let split = self.splits.get(key).map(|(split, counter)| {
                let (listed, others): (Vec<u32>, Vec<u32>) =
                    (0..backends.len() as u32).partition(|&i| split.instances.contains(&backends[i as usize].instance));
                RouteSplit {
                    percent: split.percent.min(100),
                    groups: [listed.into(), others.into()],
                    cursors: [AtomicUsize::new(0), AtomicUsize::new(0)],
                    counter: Arc::clone(counter),
                }
            });
            routes.insert(
                key,
                Arc::new(Route { key: key.clone(), backends, maintenance, split, cursor: AtomicUsize::new(0) }),
            );
        }
        let mut snap = Snapshot {
            default: self.default_route.as_ref().and_then(|k| routes.get(k).cloned()),
            ..Snapshot::default()
        };
        for (key, hosts) in &self.hosts {
            let Some(route) = routes.get(key) else {
                continue;
            };
            for host in hosts {
                let (map, name) = match host.strip_prefix("*.") {
                    Some(rest) => (&mut snap.wildcard, rest),
                    None => (&mut snap.exact, host.as_str()),
                };
                if let Some(previous) = map.insert(name.into(), Arc::clone(route)) {
                    if previous.key != *key {
                        tracing::warn!(host = %host, route = %key.0, other = %previous.key.0, "host claimed by two routes; the later one wins");
                    }
                }
            }
        }
        snap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_lose_port_and_dot() {
        assert_eq!(host_name(b"example.com:8080"), Some("example.com"));
        assert_eq!(host_name(b"example.com."), Some("example.com"));
        assert_eq!(host_name(b"[::1]:80"), Some("[::1]"));
        assert_eq!(host_name(b"localhost"), Some("localhost"));
        assert_eq!(host_name(b""), None);
    }

    #[test]
    fn configured_hosts_are_normalised() {
        assert_eq!(normalize_host("Example.COM:443").as_deref(), Some("example.com"));
        assert_eq!(normalize_host("*.Staging.Example.com").as_deref(), Some("*.staging.example.com"));
        assert_eq!(normalize_host("  "), None);
    }

    #[test]
    fn routes_by_host_wildcard_and_default() {
        let mut reg = Registry::default();
        let a = RouteKey("a".into());
        let b = RouteKey("b".into());
        reg.hosts.insert(a.clone(), vec!["app.test".into()]);
        reg.hosts.insert(b.clone(), vec!["*.review.test".into()]);
        reg.default_route = Some(a.clone());
        let snap = reg.snapshot();
        let key = |h: &[u8]| snap.route_for(Some(h)).map(|r| r.key.0.clone());
        assert_eq!(key(b"app.test"), Some("a".into()));
        assert_eq!(key(b"APP.test:80"), Some("a".into()));
        assert_eq!(key(b"pr-7.review.test"), Some("b".into()));
        assert_eq!(key(b"review.test"), Some("a".into()), "wildcard needs a label; falls to default");
        assert_eq!(key(b"other"), Some("a".into()));
        assert_eq!(snap.route_for(None).map(|r| r.key.0.clone()), Some("a".into()));
    }

    #[test]
    fn round_robin_takes_the_next_backend_unless_it_is_clearly_busier() {
        // An idle backend is never passed over for one with a request in
        // flight, however few.
        assert!(round_robin_fits(0, 0));
        assert!(!round_robin_fits(1, 0));
        assert!(!round_robin_fits(3, 0));
        // Under load, up to twice the least loaded is round robin's.
        assert!(round_robin_fits(2, 1));
        assert!(!round_robin_fits(3, 1));
        assert!(round_robin_fits(8, 4));
        assert!(!round_robin_fits(9, 4));
        assert!(round_robin_fits(u64::MAX, u64::MAX / 2 + 1));
        // The least loaded always fits.
        for least in 0..200 {
            assert!(round_robin_fits(least, least));
        }
    }
}
