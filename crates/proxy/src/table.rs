//! The route table. The control plane edits a [`Registry`] under a mutex and
//! publishes an immutable [`Snapshot`] through one `ArcSwap`; the request
//! path only loads the snapshot (no lock) and reads backend atomics.

use crate::backend::{BackendState, InFlight};
use crate::hosts::HostMap;
use nonstop_core::ids::InstanceId;
use nonstop_core::ingress::HostClaims;
use nonstop_core::traffic::{RouteKey, Split};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The backends of one route, in a stable order.
pub(crate) struct Route {
    /// (Read by the tests.)
    #[cfg_attr(not(test), allow(dead_code))]
    pub key: RouteKey,
    pub backends: Box<[Arc<BackendState>]>,
    /// The route is in maintenance (`maintenance.rs`).
    pub maintenance: Option<Arc<crate::maintenance::Gate>>,
    /// A share of the requests for some backends (a canary).
    pub split: Option<RouteSplit>,
    /// The route's `[static]` files (`statics.rs`): its own releases',
    /// never another route's.
    pub statics: Option<Arc<crate::statics::StaticTable>>,
    /// What the proxy answered itself for the route; kept across
    /// snapshots (the registry holds it).
    pub counters: Arc<RouteCounters>,
    /// Rotating start of the scan: the round-robin tie-break.
    cursor: AtomicUsize,
}

/// A route's answers that no backend gave ([`nonstop_core::traffic::RouteFigures`]):
/// relaxed increments on the request path, only for those answers.
#[derive(Default)]
pub(crate) struct RouteCounters {
    pub static_hits: AtomicU64,
    pub no_backend: AtomicU64,
}

impl RouteCounters {
    pub fn figures(&self) -> nonstop_core::traffic::RouteFigures {
        nonstop_core::traffic::RouteFigures {
            static_hits: self.static_hits.load(Ordering::Relaxed),
            no_backend: self.no_backend.load(Ordering::Relaxed),
        }
    }
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
    /// Routes by the hosts they claim (`hosts.rs`).
    hosts: HostMap<Arc<Route>>,
    default: Option<Arc<Route>>,
    /// Some route has static files: the request path looks only then.
    pub any_statics: bool,
}

impl Snapshot {
    /// The route for a request's `Host` (port and case ignored; exact
    /// beats wildcard, the longest wildcard wins); the default route when
    /// no host matches; `None` when there is none either (the request is
    /// answered 404, see `forward.rs`).
    #[inline]
    pub fn route_for(&self, host: Option<&[u8]>) -> Option<&Arc<Route>> {
        if self.hosts.is_empty() {
            return self.default.as_ref();
        }
        host.and_then(|h| self.hosts.lookup(h)).or(self.default.as_ref())
    }

    /// Whether every host has an answer from the routes: some route is
    /// the default, or no route claims any host (nothing is set up yet,
    /// or only the default was: `503` while no backend serves).
    #[inline]
    pub fn answers_every_host(&self) -> bool {
        self.default.is_some() || self.hosts.is_empty()
    }
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
    /// Which route claims which host, and the default.
    pub claims: HostClaims,
    /// Routes in maintenance.
    pub maintenance: BTreeMap<RouteKey, Arc<crate::maintenance::Gate>>,
    /// Routes with a split, and the number of requests each has given a
    /// group so far.
    pub splits: BTreeMap<RouteKey, (Split, Arc<AtomicU64>)>,
    /// Routes' static files, merged from their releases.
    pub statics: BTreeMap<RouteKey, Arc<crate::statics::StaticTable>>,
    /// Every route's counters, made with its first snapshot and kept (a
    /// route set up again counts on).
    pub counters: std::sync::Mutex<BTreeMap<RouteKey, Arc<RouteCounters>>>,
}

impl Registry {
    pub fn snapshot(&self) -> Snapshot {
        let mut grouped: BTreeMap<&RouteKey, Vec<&Arc<BackendState>>> = BTreeMap::new();
        for entry in self.backends.values().filter(|e| e.in_rotation) {
            grouped.entry(&entry.route).or_default().push(&entry.state);
        }
        for key in self.claims.route_keys().chain(self.maintenance.keys()).chain(self.statics.keys()) {
            grouped.entry(key).or_default();
        }
        let mut routes: HashMap<&RouteKey, Arc<Route>> = HashMap::new();
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
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
            let statics = self.statics.get(key).cloned();
            let counters = Arc::clone(counters.entry(key.clone()).or_default());
            routes.insert(
                key,
                Arc::new(Route {
                    key: key.clone(),
                    backends,
                    maintenance,
                    split,
                    statics,
                    counters,
                    cursor: AtomicUsize::new(0),
                }),
            );
        }
        let mut snap = Snapshot {
            default: self.claims.default_route().and_then(|k| routes.get(k).cloned()),
            any_statics: !self.statics.is_empty(),
            ..Snapshot::default()
        };
        for (key, claim) in self.claims.iter() {
            let Some(route) = routes.get(key) else {
                continue;
            };
            for host in &claim.hosts {
                // `HostClaims` gives a host to one route only.
                snap.hosts.insert(host, Arc::clone(route));
            }
        }
        snap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_host_wildcard_and_default() {
        let mut reg = Registry::default();
        let a = RouteKey("a".into());
        let b = RouteKey("b".into());
        reg.claims.set(&a, &["app.test".into()], true).unwrap();
        reg.claims.set(&b, &["*.review.test".into()], false).unwrap();
        let snap = reg.snapshot();
        let key = |h: &[u8]| snap.route_for(Some(h)).map(|r| r.key.0.clone());
        assert_eq!(key(b"app.test"), Some("a".into()));
        assert_eq!(key(b"APP.test:80"), Some("a".into()));
        assert_eq!(key(b"pr-7.review.test"), Some("b".into()));
        assert_eq!(key(b"review.test"), Some("a".into()), "wildcard needs a label; falls to default");
        assert_eq!(key(b"other"), Some("a".into()));
        assert_eq!(snap.route_for(None).map(|r| r.key.0.clone()), Some("a".into()));

        // Without a default, an unclaimed host has no route.
        reg.claims.set(&a, &["app.test".into()], false).unwrap();
        let snap = reg.snapshot();
        assert!(!snap.answers_every_host());
        assert!(snap.route_for(Some(b"other")).is_none());
        assert!(snap.route_for(None).is_none());
        assert_eq!(snap.route_for(Some(b"app.test")).map(|r| r.key.0.clone()), Some("a".into()));
        // A route with hosts and no backend is still a route (503, not 404).
        assert_eq!(snap.route_for(Some(b"x.review.test")).map(|r| r.backends.len()), Some(0));
    }

    #[test]
    fn the_listen_route_takes_every_host_until_it_has_hosts() {
        let mut reg = Registry::default();
        let a = RouteKey("a".into());
        reg.claims.set_fallback(Some(a.clone()));
        let snap = reg.snapshot();
        assert_eq!(snap.route_for(Some(b"anything")).map(|r| r.key.0.clone()), Some("a".into()));
        reg.claims.set(&a, &["a.test".into()], false).unwrap();
        let snap = reg.snapshot();
        assert!(snap.route_for(Some(b"anything")).is_none());
        reg.claims.remove(&a);
        assert!(reg.snapshot().route_for(Some(b"a.test")).is_none());
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
