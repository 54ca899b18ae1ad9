//! Which releases' `[static]` files the proxy serves, and which of them
//! wins a path that several have.
//!
//! Served: the running release, the target of the deployment in progress,
//! and every retained release whose instances may have rendered pages: one
//! that went live once, or whose rollout began and was rolled back (its
//! pages may still be open in browsers, asking for its hashed names). A
//! release whose deployment failed before any instance changed (a failed
//! build check or release task) is not served: it rendered nothing.
//!
//! Precedence (the first that has a path wins): the running release, then
//! the deployment's target, then the others, newest first. Hashed names
//! are the same content in every release that has them, so the order only
//! matters for unhashed ones (`robots.txt`, `favicon.ico`, an unhashed
//! `main.css`): after a rollback to an older release, that release's
//! files are answered, not those of the newer one it replaced.

use nonstop_core::ReleaseId;

/// A built, retained release that has `[static]` mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticCandidate {
    pub release: ReleaseId,
    /// Its instances may have rendered pages: a deployment to it succeeded,
    /// or rolled back after its rollout began.
    pub rendered: bool,
}

/// The releases to serve, in precedence order (the first that has a path
/// wins). `current`: the release the app runs now (none before its first
/// deploy); `target`: the release of the deployment in progress, if any.
pub fn serve_order(
    candidates: &[StaticCandidate],
    current: Option<ReleaseId>,
    target: Option<ReleaseId>,
) -> Vec<ReleaseId> {
    let rank = |c: &StaticCandidate| {
        if Some(c.release) == current {
            0
        } else if Some(c.release) == target {
            1
        } else {
            2
        }
    };
    let mut served: Vec<&StaticCandidate> = candidates.iter().filter(|c| c.rendered || rank(c) < 2).collect();
    served.sort_by_key(|c| (rank(c), std::cmp::Reverse(c.release)));
    served.dedup_by_key(|c| c.release);
    served.into_iter().map(|c| c.release).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(n: u64, rendered: bool) -> StaticCandidate {
        StaticCandidate { release: ReleaseId(n), rendered }
    }

    fn ids(v: &[ReleaseId]) -> Vec<u64> {
        v.iter().map(|r| r.0).collect()
    }

    #[test]
    fn the_cases_that_matter() {
        let all = [c(1, true), c(2, true), c(3, true)];
        // Steady state on v3: newest first.
        assert_eq!(ids(&serve_order(&all, Some(ReleaseId(3)), None)), [3, 2, 1]);
        // Rolled back to v1: v1 wins, v3's and v2's hashed files stay.
        assert_eq!(ids(&serve_order(&all, Some(ReleaseId(1)), None)), [1, 3, 2]);
        // During the rollback itself (v3 still current): v3, then v1.
        assert_eq!(ids(&serve_order(&all, Some(ReleaseId(3)), Some(ReleaseId(1)))), [3, 1, 2]);
        // A deploy of v4 in progress: the running v3 wins until v4 is live.
        let with_v4 = [c(1, true), c(2, true), c(3, true), c(4, false)];
        assert_eq!(ids(&serve_order(&with_v4, Some(ReleaseId(3)), Some(ReleaseId(4)))), [3, 4, 2, 1]);
        // v4's deploy failed before its rollout: withdrawn.
        assert_eq!(ids(&serve_order(&with_v4, Some(ReleaseId(3)), None)), [3, 2, 1]);
        // The first deploy: the target alone.
        assert_eq!(ids(&serve_order(&[c(1, false)], None, Some(ReleaseId(1)))), [1]);
    }

    fn candidates() -> impl Strategy<Value = Vec<StaticCandidate>> {
        proptest::collection::btree_map(1u64..12, any::<bool>(), 0..8)
            .prop_map(|m| m.into_iter().map(|(n, live)| c(n, live)).collect())
    }

    fn release() -> impl Strategy<Value = Option<ReleaseId>> {
        proptest::option::of((1u64..12).prop_map(ReleaseId))
    }

    proptest! {
        /// Exactly the running release, the target and the releases that
        /// may have rendered pages are served, each once.
        #[test]
        fn serves_exactly_current_target_and_rendered(cands in candidates(), current in release(), target in release()) {
            let out = serve_order(&cands, current, target);
            let mut sorted = ids(&out);
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), out.len(), "no duplicates: {:?}", out);
            for cand in &cands {
                let want = cand.rendered || Some(cand.release) == current || Some(cand.release) == target;
                prop_assert_eq!(out.contains(&cand.release), want, "{:?}", cand);
            }
            prop_assert!(out.iter().all(|r| cands.iter().any(|c| c.release == *r)));
        }

        /// The running release wins every path it has; then the target;
        /// then the others, newest first.
        #[test]
        fn current_then_target_then_newest(cands in candidates(), current in release(), target in release()) {
            let out = serve_order(&cands, current, target);
            let mut rest = out.as_slice();
            if let Some(cur) = current.filter(|r| out.contains(r)) {
                prop_assert_eq!(rest[0], cur);
                rest = &rest[1..];
            }
            if let Some(t) = target.filter(|t| out.contains(t) && Some(*t) != current) {
                prop_assert_eq!(rest[0], t);
                rest = &rest[1..];
            }
            prop_assert!(rest.windows(2).all(|w| w[0] > w[1]), "{:?}", out);
        }
    }
}
