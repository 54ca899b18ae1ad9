//! Stopping and starting an app on purpose (`nonstop stop`, `nonstop
//! start`), as pure decisions over the runtime counts.
//!
//! `stop` remembers the runtime count of every process type (exactly: its
//! source and the toml's count too) and sets each to zero; the reconciler
//! then stops every instance the way `scale` to zero does (web drained,
//! stop signal, `stop_timeout`). `start` puts the remembered counts back;
//! maintenance goes off once every web process has its instances healthy
//! (if `stop` turned it on), and only then is the app running again.
//!
//! While an app is stopped, what would start instances or change what
//! runs (`up`, `scale`, `restart`, `deploy`, `rollback`) is refused with a
//! pointer to `nonstop start`: a stopped app stays stopped until someone
//! starts it, daemon restarts included. Once started (even while web is
//! not healthy yet, or after a start that failed) they work again: a
//! deploy or a restart is how a broken start gets fixed.

use nonstop_core::maintenance::{MaintenanceBy, StopPhase, StoppedState};
use nonstop_core::{ProcessName, RuntimeCount};
use std::collections::BTreeMap;

/// Where an app is, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    Running,
    /// Stopped on purpose: every count at zero.
    Stopped,
    /// Started again, waiting for web to be healthy before maintenance
    /// goes off.
    Starting,
}

impl RunState {
    pub fn of(stopped: Option<&StoppedState>) -> RunState {
        match stopped.map(|s| s.phase) {
            None => RunState::Running,
            Some(StopPhase::Stopped) => RunState::Stopped,
            Some(StopPhase::Starting) => RunState::Starting,
        }
    }
}

/// What `nonstop stop` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopVerdict {
    /// Remember `remembered`, write `zero`, stop everything.
    Stop { remembered: BTreeMap<ProcessName, RuntimeCount>, zero: BTreeMap<ProcessName, RuntimeCount> },
    /// Already stopped: nothing to do.
    AlreadyStopped,
}

/// `current`: the runtime counts now (during a start, the restored ones,
/// or what `scale` made of them since).
pub fn on_stop(stopped: Option<&StoppedState>, current: &BTreeMap<ProcessName, RuntimeCount>) -> StopVerdict {
    let remembered = match stopped {
        Some(s) if s.phase == StopPhase::Stopped => return StopVerdict::AlreadyStopped,
        _ => current.clone(),
    };
    let zero = remembered.iter().map(|(p, c)| (p.clone(), RuntimeCount { count: 0, ..*c })).collect();
    StopVerdict::Stop { remembered, zero }
}

/// What `nonstop start` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartVerdict {
    /// Write `counts` back and wait for web.
    Start { counts: BTreeMap<ProcessName, RuntimeCount> },
    /// A start is already under way (its counts are back): wait for web
    /// again.
    Resume,
    /// The app is not stopped: nothing to do.
    NotStopped,
}

/// `app_processes`: the process types the app has now; a remembered count
/// of one it no longer has is dropped.
pub fn on_start(stopped: Option<&StoppedState>, app_processes: &[ProcessName]) -> StartVerdict {
    match stopped {
        None => StartVerdict::NotStopped,
        Some(s) if s.phase == StopPhase::Starting => StartVerdict::Resume,
        Some(s) => StartVerdict::Start {
            counts: s.counts.iter().filter(|(p, _)| app_processes.contains(p)).map(|(p, c)| (p.clone(), *c)).collect(),
        },
    }
}

/// Whether a start is done: every web process type has as many healthy
/// instances as it wants (`(wanted, healthy)` per web process type). An
/// app without web is done at once.
pub fn web_settled(web: &[(u32, u32)]) -> bool {
    web.iter().all(|&(wanted, healthy)| healthy >= wanted)
}

/// Whether a finished start turns maintenance off: only if `stop` turned
/// it on. Maintenance someone turned on by hand stays until
/// `nonstop maintenance off`.
pub fn start_turns_maintenance_off(by: Option<MaintenanceBy>) -> bool {
    by == Some(MaintenanceBy::Stop)
}

/// What `stop` does to maintenance: turns it on unless it is on already
/// (then it stays as it is, and `start` leaves it on).
pub fn stop_turns_maintenance_on(by: Option<MaintenanceBy>) -> bool {
    by.is_none()
}

/// Operations a stopped (or starting) app refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gated {
    Up,
    Scale,
    Restart,
    Deploy,
    Rollback,
}

impl Gated {
    pub fn as_str(self) -> &'static str {
        match self {
            Gated::Up => "up",
            Gated::Scale => "scale",
            Gated::Restart => "restart",
            Gated::Deploy => "deploy",
            Gated::Rollback => "rollback",
        }
    }
}

/// Whether `op` is refused in `state`: every gated operation is, while the
/// app is stopped; none once it was started (a start waiting for web is
/// fixed by a deploy or a restart).
pub fn refuses(state: RunState, _op: Gated) -> bool {
    state == RunState::Stopped
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::CountSource;
    use proptest::prelude::*;

    fn name(i: usize) -> ProcessName {
        ProcessName::new(format!("p{i}")).unwrap()
    }

    fn counts() -> impl Strategy<Value = BTreeMap<ProcessName, RuntimeCount>> {
        proptest::collection::btree_map(
            (0usize..6).prop_map(name),
            (0u32..20, prop_oneof![Just(CountSource::Toml), Just(CountSource::Scale)], 0u32..20)
                .prop_map(|(count, source, toml_at_apply)| RuntimeCount { count, source, toml_at_apply }),
            0..6,
        )
    }

    fn stopped(phase: StopPhase, counts: BTreeMap<ProcessName, RuntimeCount>) -> StoppedState {
        StoppedState { phase, counts, since_ms: 1, who: "t".into() }
    }

    proptest! {
        /// stop then start gives back exactly the counts that ran before,
        /// and stop leaves every count at zero with its source and toml kept.
        #[test]
        fn stop_then_start_restores_exactly(current in counts()) {
            let StopVerdict::Stop { remembered, zero } = on_stop(None, &current) else {
                panic!("a running app stops");
            };
            prop_assert_eq!(&remembered, &current);
            prop_assert_eq!(zero.keys().collect::<Vec<_>>(), current.keys().collect::<Vec<_>>());
            for (p, z) in &zero {
                prop_assert_eq!(z.count, 0);
                prop_assert_eq!(z.source, current[p].source);
                prop_assert_eq!(z.toml_at_apply, current[p].toml_at_apply);
            }
            let names: Vec<ProcessName> = current.keys().cloned().collect();
            let state = stopped(StopPhase::Stopped, remembered);
            prop_assert_eq!(on_start(Some(&state), &names), StartVerdict::Start { counts: current });
        }

        /// A second stop changes nothing; a stop during a start remembers
        /// what runs now (the restored counts, or what `scale` made of them).
        #[test]
        fn stopping_again_is_harmless(first in counts(), now in counts()) {
            prop_assert_eq!(on_stop(Some(&stopped(StopPhase::Stopped, first.clone())), &now), StopVerdict::AlreadyStopped);
            match on_stop(Some(&stopped(StopPhase::Starting, first.clone())), &now) {
                StopVerdict::Stop { remembered, .. } => prop_assert_eq!(remembered, now),
                other => prop_assert!(false, "{other:?}"),
            }
        }

        /// start of a running app does nothing; a start under way resumes;
        /// a process type the app no longer has gets no count back.
        #[test]
        fn start_is_harmless_and_only_restores_known_types(remembered in counts(), keep in proptest::collection::vec(any::<bool>(), 6)) {
            let names: Vec<ProcessName> = (0..6).filter(|i| keep[*i]).map(name).collect();
            prop_assert_eq!(on_start(None, &names), StartVerdict::NotStopped);
            prop_assert_eq!(on_start(Some(&stopped(StopPhase::Starting, remembered.clone())), &names), StartVerdict::Resume);
            let StartVerdict::Start { counts } = on_start(Some(&stopped(StopPhase::Stopped, remembered.clone())), &names) else {
                panic!("a stopped app starts");
            };
            for (p, c) in &counts {
                prop_assert!(names.contains(p));
                prop_assert_eq!(Some(c), remembered.get(p));
            }
            prop_assert_eq!(counts.len(), remembered.keys().filter(|p| names.contains(p)).count());
        }

        /// Settled exactly when every web process has what it wants.
        #[test]
        fn settled_iff_every_web_type_is_healthy(web in proptest::collection::vec((0u32..5, 0u32..5), 0..4)) {
            prop_assert_eq!(web_settled(&web), web.iter().all(|(w, h)| h >= w));
        }
    }

    #[test]
    fn gates_and_maintenance_ownership() {
        for op in [Gated::Up, Gated::Scale, Gated::Restart, Gated::Deploy, Gated::Rollback] {
            assert!(!refuses(RunState::Running, op));
            assert!(refuses(RunState::Stopped, op));
            assert!(!refuses(RunState::Starting, op), "a start waiting for web is fixed by a deploy");
        }
        assert!(stop_turns_maintenance_on(None));
        assert!(!stop_turns_maintenance_on(Some(MaintenanceBy::User)));
        assert!(start_turns_maintenance_off(Some(MaintenanceBy::Stop)));
        assert!(!start_turns_maintenance_off(Some(MaintenanceBy::User)));
        assert!(!start_turns_maintenance_off(None));
        assert_eq!(RunState::of(None), RunState::Running);
        assert_eq!(RunState::of(Some(&stopped(StopPhase::Stopped, BTreeMap::new()))), RunState::Stopped);
    }
}
