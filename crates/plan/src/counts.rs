//! Which count of a process type applies when a spec is applied.
//!
//! The runtime owns the count: `nonstop scale` sets it, and deploys,
//! rollbacks, an `up` of an unchanged spec and daemon restarts keep it.
//! `count` in `nonstop.toml` is the initial value; *changing* it (compared
//! with the toml applied last) applies the new value. A rollback applies
//! no toml: it keeps the runtime count.

use nonstop_core::{CountSource, RuntimeCount};

/// How a spec comes to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// `up` or `deploy` of a `nonstop.toml`.
    Toml,
    /// A rollback to a retained release: its toml is not applied again.
    Rollback,
}

/// Why the chosen count applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountWhy {
    /// The process type had no runtime count yet: the toml's.
    New,
    /// The toml's count is the one applied last and the runtime's is the
    /// same.
    Unchanged,
    /// The toml's count changed (from `toml_before`), so it applies;
    /// `runtime_before` ran until now.
    TomlChanged { toml_before: u32, runtime_before: u32 },
    /// The runtime count is kept, and differs from the toml's.
    Kept { toml: u32, source: CountSource },
}

/// The count that applies, why, and what the store keeps once it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountChoice {
    pub count: u32,
    pub why: CountWhy,
    pub record: RuntimeCount,
}

/// The count of one process type when a spec whose toml says `toml_now`
/// is applied, given its runtime count (`last`, `None` when it has none).
/// A singleton never gets more than one.
pub fn choose(toml_now: u32, last: Option<RuntimeCount>, apply: Apply, singleton: bool) -> CountChoice {
    let cap = |n: u32| if singleton { n.min(1) } else { n };
    let fresh = RuntimeCount { count: cap(toml_now), source: CountSource::Toml, toml_at_apply: toml_now };
    let Some(last) = last else {
        return CountChoice { count: fresh.count, why: CountWhy::New, record: fresh };
    };
    if apply == Apply::Toml && toml_now != last.toml_at_apply {
        return CountChoice {
            count: fresh.count,
            why: CountWhy::TomlChanged { toml_before: last.toml_at_apply, runtime_before: last.count },
            record: fresh,
        };
    }
    let count = cap(last.count);
    let record = RuntimeCount { count, ..last };
    let why =
        if count == toml_now { CountWhy::Unchanged } else { CountWhy::Kept { toml: toml_now, source: last.source } };
    CountChoice { count, why, record }
}

/// What the store keeps after `nonstop scale` sets `count`; `toml` is the
/// toml's count of the release running, for a process type without a
/// runtime count yet.
pub fn scaled(last: Option<RuntimeCount>, toml: u32, count: u32) -> RuntimeCount {
    RuntimeCount { count, source: CountSource::Scale, toml_at_apply: last.map_or(toml, |l| l.toml_at_apply) }
}

/// The line a deploy or `up` plan shows for a process type, when its
/// count is worth a word.
pub fn describe(process: &str, choice: &CountChoice) -> Option<String> {
    match choice.why {
        CountWhy::New | CountWhy::Unchanged => None,
        CountWhy::TomlChanged { toml_before, runtime_before } => Some(if runtime_before == toml_before {
            format!("{process}: count {runtime_before} → {} (changed in nonstop.toml)", choice.count)
        } else {
            format!(
                "{process}: count {runtime_before} → {} (changed in nonstop.toml from {toml_before}; replaces the count set by `nonstop scale`)",
                choice.count
            )
        }),
        CountWhy::Kept { toml, source } => Some(match source {
            CountSource::Scale => {
                format!("{process}: {} instances (set by `nonstop scale`; nonstop.toml says {toml})", choice.count)
            }
            CountSource::Toml => format!("{process}: {} instances (nonstop.toml says {toml})", choice.count),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rc(count: u32, source: CountSource, toml_at_apply: u32) -> RuntimeCount {
        RuntimeCount { count, source, toml_at_apply }
    }

    #[test]
    fn the_issue_cases() {
        // scale web=3 with the toml at 2; deploy the same toml: 3 stays.
        let scaled = scaled(Some(rc(2, CountSource::Toml, 2)), 2, 3);
        let c = choose(2, Some(scaled), Apply::Toml, false);
        assert_eq!(c.count, 3);
        assert_eq!(describe("web", &c).unwrap(), "web: 3 instances (set by `nonstop scale`; nonstop.toml says 2)");
        // a rollback keeps it too.
        assert_eq!(choose(5, Some(scaled), Apply::Rollback, false).count, 3);
        // the toml goes 2 → 4: 4 applies.
        let c = choose(4, Some(rc(2, CountSource::Toml, 2)), Apply::Toml, false);
        assert_eq!(c.count, 4);
        assert_eq!(describe("web", &c).unwrap(), "web: count 2 → 4 (changed in nonstop.toml)");
        // a first apply: the toml's count, nothing to say.
        let c = choose(2, None, Apply::Toml, false);
        assert_eq!((c.count, c.why, describe("web", &c)), (2, CountWhy::New, None));
    }

    fn source() -> impl Strategy<Value = CountSource> {
        prop_oneof![Just(CountSource::Toml), Just(CountSource::Scale)]
    }

    fn last() -> impl Strategy<Value = Option<RuntimeCount>> {
        proptest::option::of((0u32..20, source(), 0u32..20).prop_map(|(c, s, t)| rc(c, s, t)))
    }

    fn apply() -> impl Strategy<Value = Apply> {
        prop_oneof![Just(Apply::Toml), Just(Apply::Rollback)]
    }

    proptest! {
        /// A toml whose count differs from the one applied last applies;
        /// otherwise (and always on a rollback) the runtime count is kept.
        #[test]
        fn toml_change_applies_else_runtime_kept(toml in 0u32..20, last in last(), apply in apply(), singleton: bool) {
            let c = choose(toml, last, apply, singleton);
            let cap = |n: u32| if singleton { n.min(1) } else { n };
            match last {
                None => prop_assert_eq!(c.count, cap(toml)),
                Some(l) if apply == Apply::Toml && l.toml_at_apply != toml => prop_assert_eq!(c.count, cap(toml)),
                Some(l) => prop_assert_eq!(c.count, cap(l.count)),
            }
            prop_assert_eq!(c.record.count, c.count);
        }

        /// A singleton never gets more than one instance.
        #[test]
        fn singleton_at_most_one(toml in 0u32..20, last in last(), apply in apply()) {
            prop_assert!(choose(toml, last, apply, true).count <= 1);
        }

        /// Applying the same toml again changes nothing (a daemon restart, an
        /// `up` of an unchanged spec, a redeploy): the choice is a fixed point.
        #[test]
        fn reapplying_is_a_fixed_point(toml in 0u32..20, last in last(), apply in apply(), singleton: bool) {
            let first = choose(toml, last, apply, singleton);
            let again = choose(toml, Some(first.record), apply, singleton);
            prop_assert_eq!(again.count, first.count);
            prop_assert_eq!(again.record, first.record);
            let settled = !matches!(again.why, CountWhy::TomlChanged { .. });
            prop_assert!(settled, "a second apply changed the count again: {:?}", again.why);
        }

        /// A scaled count survives any number of deploys of the same toml
        /// and rollbacks to any release, until the toml's count changes.
        #[test]
        fn scale_survives_until_the_toml_changes(
            toml in 0u32..20, n in 0u32..20, rollbacks in proptest::collection::vec(0u32..20, 0..5), new_toml in 0u32..20,
        ) {
            let mut rec = scaled(Some(choose(toml, None, Apply::Toml, false).record), toml, n);
            for other in rollbacks {
                let c = choose(other, Some(rec), Apply::Rollback, false);
                prop_assert_eq!(c.count, n);
                rec = c.record;
                let c = choose(toml, Some(rec), Apply::Toml, false);
                prop_assert_eq!(c.count, n);
                rec = c.record;
            }
            let c = choose(new_toml, Some(rec), Apply::Toml, false);
            prop_assert_eq!(c.count, if new_toml == toml { n } else { new_toml });
        }

        /// A rollback never records a toml as applied.
        #[test]
        fn rollback_keeps_the_applied_toml(toml in 0u32..20, l in (0u32..20, source(), 0u32..20)) {
            let l = rc(l.0, l.1, l.2);
            prop_assert_eq!(choose(toml, Some(l), Apply::Rollback, false).record.toml_at_apply, l.toml_at_apply);
        }
    }
}
