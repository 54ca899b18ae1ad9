//! Passive outlier ejection (Envoy's outlier detection is the model): a
//! backend that answered 5xx to its last `outlier_consecutive_5xx`
//! requests while its peers in the same route answered 2xx/3xx/4xx is
//! taken out of rotation with [`HealthCause::Outlier`], for
//! `outlier_base_ejection` × its number of ejections (at most
//! [`MAX_EJECTION`]); one past ejection is forgiven per [`EJECTION_DECAY`]
//! it stays back after the last one ended (Envoy decrements its multiplier
//! the same way), so a blip long ago does not lengthen today's ejection.
//! Health checks that pass do not bring it back before
//! that (an app whose health view answers while its pages fail lies);
//! afterwards it comes back through them, as any unhealthy backend. Never
//! more than half of a route's backends (in rotation or ejected) are out
//! as outliers.
//!
//! The request path pays one relaxed load per answer that is not a 5xx
//! (the backend's streak of 5xx, to reset it when it is not zero) and one
//! increment per 5xx; everything else happens on a 5xx that starts a
//! streak (the peers' counts are noted, to judge "over the same period")
//! or completes `outlier_consecutive_5xx` of them (judged: [`decide`],
//! pure). Both are the failure path, and bounded by the route's size.
//!
//! [`HealthCause::Outlier`]: nonstop_core::traffic::HealthCause::Outlier

use crate::backend::BackendState;
use crate::Inner;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest ejection, whatever the count.
pub const MAX_EJECTION: Duration = Duration::from_secs(5 * 60);

/// Back in rotation this long after its last ejection ended, a backend has
/// one past ejection forgiven (and one more per further period).
pub const EJECTION_DECAY: Duration = MAX_EJECTION;

/// The past ejections that still count at `now`, of `ejections` whose last
/// ended at `last_end`.
pub(crate) fn remembered(ejections: u32, last_end: Option<Instant>, now: Instant) -> u32 {
    match last_end {
        Some(end) if now > end => {
            let steps = now.duration_since(end).as_secs() / EJECTION_DECAY.as_secs();
            ejections.saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX))
        }
        _ => ejections,
    }
}

/// What [`decide`] is given about the backend whose streak of 5xx reached
/// the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// In rotation now (only a backend in rotation can be ejected).
    pub healthy: bool,
    /// Its 5xx answers in a row.
    pub streak: u32,
    /// How many times it was ejected before.
    pub ejections: u32,
    /// When its last ejection ended (or ends).
    pub last_ejection_end: Option<Instant>,
    /// Its peers' non-5xx answers since its streak began.
    pub peers_ok: u64,
    /// Its peers' 5xx answers since its streak began.
    pub peers_5xx: u64,
}

/// One other backend of the same route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    /// In rotation.
    pub healthy: bool,
    /// Out of rotation as an outlier (until its checks bring it back).
    pub ejected: bool,
    /// Its 5xx answers in a row.
    pub streak: u32,
}

/// The thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// 5xx in a row that make an outlier; 0: never eject.
    pub consecutive_5xx: u32,
    /// Ejection time per ejection so far.
    pub base: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Keep,
    /// Out of rotation until `until` (at least), its `ejections`th time.
    Eject {
        until: Instant,
        ejections: u32,
    },
}

/// How long the `ejections`th ejection (counting from 1) lasts.
pub(crate) fn ejection_time(base: Duration, ejections: u32) -> Duration {
    base.saturating_mul(ejections.max(1)).min(MAX_EJECTION)
}

/// Whether `candidate` is ejected now. Pure.
///
/// Ejected when: its streak reached the threshold; it is in rotation; its
/// peers answered mostly non-5xx over the same period (at least one
/// non-5xx, and more non-5xx than 5xx); no peer in rotation is itself on
/// a streak of the threshold (then the fault is likelier shared: a
/// database down); and ejecting it leaves at most half of the route's
/// backends (in rotation or ejected, itself included) ejected.
pub(crate) fn decide(policy: Policy, candidate: Candidate, peers: &[Peer], now: Instant) -> Decision {
    let n = policy.consecutive_5xx;
    if n == 0 || candidate.streak < n || !candidate.healthy {
        return Decision::Keep;
    }
    if candidate.peers_ok == 0 || candidate.peers_5xx >= candidate.peers_ok {
        return Decision::Keep;
    }
    if peers.iter().any(|p| p.healthy && p.streak >= n) {
        return Decision::Keep;
    }
    let ejected = peers.iter().filter(|p| p.ejected).count();
    let counted = 1 + peers.iter().filter(|p| p.healthy || p.ejected).count();
    if (ejected + 1) * 2 > counted {
        return Decision::Keep;
    }
    let ejections = remembered(candidate.ejections, candidate.last_ejection_end, now).saturating_add(1);
    Decision::Eject { until: now + ejection_time(policy.base, ejections), ejections }
}

/// What a 5xx answer asks of the slow path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After5xx {
    Nothing,
    /// The first of a streak: note the peers' counts.
    Mark,
    /// The streak reached a multiple of the threshold: judge it.
    Judge,
}

/// The peers of `backend` in the route `host` leads to now (its own route:
/// the backend must be in it).
fn with_peers<R>(
    inner: &Inner,
    host: Option<&[u8]>,
    backend: &Arc<BackendState>,
    f: impl FnOnce(&[Arc<BackendState>]) -> R,
) -> Option<R> {
    let snapshot = inner.table.load();
    let route = snapshot.route_for(host)?;
    if !route.backends.iter().any(|b| Arc::ptr_eq(b, backend)) {
        return None;
    }
    Some(f(&route.backends))
}

/// Non-5xx and 5xx answers of every backend of `all` but `me`.
fn peer_counts(all: &[Arc<BackendState>], me: &Arc<BackendState>) -> (u64, u64) {
    let (mut ok, mut bad) = (0u64, 0u64);
    for b in all.iter().filter(|b| !Arc::ptr_eq(b, me)) {
        let (answers, errors) = b.counters.answers_and_errors();
        ok = ok.saturating_add(answers.saturating_sub(errors));
        bad = bad.saturating_add(errors);
    }
    (ok, bad)
}

/// The failure path after a 5xx of `backend` (see [`After5xx`]).
pub(crate) fn after_5xx(
    inner: &Inner,
    policy: Policy,
    host: Option<&[u8]>,
    backend: &Arc<BackendState>,
    what: After5xx,
) {
    match what {
        After5xx::Nothing => {}
        After5xx::Mark => {
            with_peers(inner, host, backend, |all| {
                let (ok, bad) = peer_counts(all, backend);
                backend.counters.mark_peers(ok, bad);
            });
        }
        After5xx::Judge => {
            // One judgement at a time, so that two ejections decided
            // together cannot take more than half of a route.
            let _one = inner.outliers.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let decision = with_peers(inner, host, backend, |all| {
                let (ok, bad) = peer_counts(all, backend);
                let (mark_ok, mark_bad) = backend.counters.marked_peers();
                let peers: Vec<Peer> = all
                    .iter()
                    .filter(|b| !Arc::ptr_eq(b, backend))
                    .map(|b| Peer { healthy: b.is_healthy(), ejected: b.ejected(), streak: b.counters.streak() })
                    .collect();
                let candidate = Candidate {
                    healthy: backend.is_healthy(),
                    streak: backend.counters.streak(),
                    ejections: backend.ejections(),
                    last_ejection_end: backend.last_ejection_end(),
                    peers_ok: ok.saturating_sub(mark_ok),
                    peers_5xx: bad.saturating_sub(mark_bad),
                };
                decide(policy, candidate, &peers, now)
            });
            if let Some(Decision::Eject { until, ejections }) = decision {
                let detail = format!(
                    "answered 5xx to its last {} requests while its peers answered 2xx/3xx/4xx",
                    policy.consecutive_5xx
                );
                tracing::warn!(
                    instance = %backend.instance,
                    ejections,
                    out_for_s = until.saturating_duration_since(now).as_secs(),
                    "outlier ejected"
                );
                inner.shared.eject(backend, detail, until, ejections);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: Policy = Policy { consecutive_5xx: 10, base: Duration::from_secs(10) };

    fn candidate(streak: u32, peers_ok: u64) -> Candidate {
        Candidate { healthy: true, streak, ejections: 0, last_ejection_end: None, peers_ok, peers_5xx: 0 }
    }

    fn fine() -> Peer {
        Peer { healthy: true, ejected: false, streak: 0 }
    }

    #[test]
    fn an_all_5xx_backend_beside_good_peers_is_ejected_for_ten_seconds() {
        let now = Instant::now();
        assert_eq!(decide(POLICY, candidate(9, 50), &[fine()], now), Decision::Keep);
        assert_eq!(
            decide(POLICY, candidate(10, 50), &[fine()], now),
            Decision::Eject { until: now + Duration::from_secs(10), ejections: 1 }
        );
        let again = Candidate { ejections: 2, ..candidate(10, 50) };
        assert_eq!(
            decide(POLICY, again, &[fine(), fine()], now),
            Decision::Eject { until: now + Duration::from_secs(30), ejections: 3 }
        );
    }

    #[test]
    fn past_ejections_are_forgiven_while_it_stays_back() {
        let now = Instant::now();
        let ended = |ago: u64| Some(now - Duration::from_secs(ago));
        // Ejected 3 times; the last ended a minute ago: the 4th is 40 s.
        let c = Candidate { ejections: 3, last_ejection_end: ended(60), ..candidate(10, 50) };
        assert_eq!(
            decide(POLICY, c, &[fine()], now),
            Decision::Eject { until: now + Duration::from_secs(40), ejections: 4 }
        );
        // Eleven minutes back: two of the three forgiven, this is the 2nd.
        let c = Candidate { last_ejection_end: ended(11 * 60), ..c };
        assert_eq!(
            decide(POLICY, c, &[fine()], now),
            Decision::Eject { until: now + Duration::from_secs(20), ejections: 2 }
        );
        // An hour: as if never ejected.
        let c = Candidate { last_ejection_end: ended(3600), ..c };
        assert_eq!(
            decide(POLICY, c, &[fine()], now),
            Decision::Eject { until: now + Duration::from_secs(10), ejections: 1 }
        );
    }

    #[test]
    fn shared_failures_eject_nobody() {
        let now = Instant::now();
        // Peers that answered nothing, or only 5xx, over the streak.
        assert_eq!(decide(POLICY, candidate(10, 0), &[fine()], now), Decision::Keep);
        let c = Candidate { peers_5xx: 30, ..candidate(10, 30) };
        assert_eq!(decide(POLICY, c, &[fine()], now), Decision::Keep);
        // A peer on a streak of its own.
        assert_eq!(decide(POLICY, candidate(10, 30), &[fine(), Peer { streak: 10, ..fine() }], now), Decision::Keep);
        // Alone in its route.
        assert_eq!(decide(POLICY, candidate(10, 30), &[], now), Decision::Keep);
        // Disabled.
        assert_eq!(decide(Policy { consecutive_5xx: 0, ..POLICY }, candidate(10, 30), &[fine()], now), Decision::Keep);
    }

    #[test]
    fn at_most_half_of_a_route_is_ejected() {
        let now = Instant::now();
        let out = Peer { healthy: false, ejected: true, streak: 0 };
        // Two backends: one may go; not the second.
        assert!(matches!(decide(POLICY, candidate(10, 5), &[fine()], now), Decision::Eject { .. }));
        assert_eq!(decide(POLICY, candidate(10, 5), &[out], now), Decision::Keep);
        // Four: two may go.
        assert!(matches!(decide(POLICY, candidate(10, 5), &[out, fine(), fine()], now), Decision::Eject { .. }));
        assert_eq!(decide(POLICY, candidate(10, 5), &[out, out, fine()], now), Decision::Keep);
    }

    fn peer() -> impl Strategy<Value = Peer> {
        (any::<bool>(), any::<bool>(), 0u32..20).prop_map(|(healthy, ejected, streak)| Peer {
            healthy: healthy && !ejected,
            ejected,
            streak,
        })
    }

    proptest! {
        /// Judging the backends of a route one after the other (each a clear
        /// outlier), applying every ejection: never more than half out.
        #[test]
        fn never_more_than_half_ejected(size in 1usize..12, order in proptest::collection::vec(0usize..12, 0..40), pending in proptest::collection::vec(any::<bool>(), 12)) {
            let now = Instant::now();
            // Some backends are not in rotation at all (pending): they
            // count neither way.
            let mut route: Vec<Peer> = (0..size).map(|i| Peer { healthy: !pending[i], ejected: false, streak: 0 }).collect();
            let counted = route.iter().filter(|p| p.healthy).count();
            for i in order {
                let i = i % size;
                let c = Candidate { healthy: route[i].healthy, streak: 10, ejections: 0, last_ejection_end: None, peers_ok: 5, peers_5xx: 0 };
                let others: Vec<Peer> = route.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| *p).collect();
                if let Decision::Eject { .. } = decide(POLICY, c, &others, now) {
                    route[i] = Peer { healthy: false, ejected: true, streak: 0 };
                }
                let ejected = route.iter().filter(|p| p.ejected).count();
                prop_assert!(ejected * 2 <= counted, "{ejected} of {counted} ejected");
            }
        }

        /// A single decision never takes the route past half.
        #[test]
        fn one_ejection_keeps_half_in(peers in proptest::collection::vec(peer(), 0..12), streak in 0u32..30, ok in 0u64..100, bad in 0u64..100) {
            let c = Candidate { healthy: true, streak, ejections: 0, last_ejection_end: None, peers_ok: ok, peers_5xx: bad };
            if let Decision::Eject { .. } = decide(POLICY, c, &peers, Instant::now()) {
                let counted = 1 + peers.iter().filter(|p| p.healthy || p.ejected).count();
                let ejected = 1 + peers.iter().filter(|p| p.ejected).count();
                prop_assert!(ejected * 2 <= counted, "{ejected} of {counted}");
            }
        }

        /// Never ejected while its peers also fail: their answers over the
        /// streak all 5xx (or none), or one of them on a streak as long.
        #[test]
        fn never_ejected_while_peers_fail(peers in proptest::collection::vec(peer(), 0..12), streak in 0u32..30, bad in 0u64..100, failing in 0usize..12) {
            let now = Instant::now();
            let c = Candidate { healthy: true, streak, ejections: 0, last_ejection_end: None, peers_ok: 0, peers_5xx: bad };
            prop_assert_eq!(decide(POLICY, c, &peers, now), Decision::Keep);
            if !peers.is_empty() {
                let mut peers = peers;
                let i = failing % peers.len();
                peers[i] = Peer { healthy: true, ejected: false, streak: POLICY.consecutive_5xx + failing as u32 };
                let c = Candidate { peers_ok: 1_000, ..c };
                prop_assert_eq!(decide(POLICY, c, &peers, now), Decision::Keep);
            }
        }

        /// What is remembered never exceeds the count and only shrinks as
        /// time goes by.
        #[test]
        fn remembered_ejections_only_decay(n in 0u32..50, ago_a in 0u64..100_000, ago_b in 0u64..100_000) {
            let now = Instant::now() + Duration::from_secs(200_000);
            let end = now - Duration::from_secs(100_000);
            let (early, late) = (end + Duration::from_secs(ago_a.min(ago_b)), end + Duration::from_secs(ago_a.max(ago_b)));
            prop_assert!(remembered(n, Some(end), early) <= n);
            prop_assert!(remembered(n, Some(end), late) <= remembered(n, Some(end), early));
            prop_assert_eq!(remembered(n, None, now), n);
            prop_assert_eq!(remembered(n, Some(now), now), n);
        }

        /// Ejection time grows with the count and is capped.
        #[test]
        fn ejection_time_grows_and_is_capped(a in 0u32..1_000, b in 0u32..1_000, base_ms in 1u64..100_000) {
            let base = Duration::from_millis(base_ms);
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(ejection_time(base, lo) <= ejection_time(base, hi));
            prop_assert!(ejection_time(base, hi) <= MAX_EJECTION);
            prop_assert_eq!(ejection_time(base, 1), base.min(MAX_EJECTION));
            let now = Instant::now();
            let c = Candidate { healthy: true, streak: 10, ejections: lo, last_ejection_end: None, peers_ok: 5, peers_5xx: 0 };
            let policy = Policy { consecutive_5xx: 10, base };
            match decide(policy, c, &[fine()], now) {
                Decision::Eject { until, ejections } => {
                    prop_assert_eq!(ejections, lo + 1);
                    prop_assert_eq!(until, now + ejection_time(base, lo + 1));
                    prop_assert!(until - now <= MAX_EJECTION);
                }
                Decision::Keep => prop_assert!(false, "a clear outlier is ejected"),
            }
        }
    }
}
