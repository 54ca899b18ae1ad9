//! Rolling replacement of one process type's instances, one step at a
//! time. Used by `restart` now and by deploys: the engine describes each
//! slot (is there an old instance, is there a new one, in which phase) and
//! gets back what to do next.
//!
//! Invariants (checked by a randomized simulation below):
//! - at most `desired + surge` instances exist at once;
//! - the number of ready instances never drops below
//!   `desired - max_unavailable` because of an action taken here;
//! - `stop_first` (singletons) never has an old and a new instance at once.

use nonstop_core::process::{ProcessKind, Rollout};

/// The old instance of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldPhase {
    /// Serving.
    Ready,
    /// Exists but is not serving (crashed and restarting, or starting).
    NotReady,
    /// Told to stop (draining / stopping); still exists.
    Stopping,
}

/// The new instance of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewPhase {
    Starting,
    Ready,
    /// Crashed, or did not become healthy within `health_timeout`.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutSlot {
    pub slot: u32,
    pub old: Option<OldPhase>,
    pub new: Option<NewPhase>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutParams {
    /// Desired instances (slots `1..=desired`).
    pub desired: u32,
    pub surge: u32,
    pub unavailable: u32,
    /// Stop the old instance (and see it gone) before starting the new one.
    pub stop_first: bool,
}

impl RolloutParams {
    /// Resolve a process's rollout settings. Singletons always stop first
    /// with no surge. If surge and unavailability both resolve to zero (e.g.
    /// `25%` of 2), a surge of one is used so the rollout can progress.
    pub fn resolve(kind: ProcessKind, desired: u32, rollout: &Rollout) -> RolloutParams {
        if kind == ProcessKind::Singleton {
            return RolloutParams { desired: desired.min(1), surge: 0, unavailable: 1, stop_first: true };
        }
        let mut surge = rollout.max_surge.resolve(desired, true);
        let unavailable = rollout.max_unavailable.resolve(desired, false);
        if surge == 0 && unavailable == 0 {
            surge = 1;
        }
        RolloutParams { desired, surge, unavailable, stop_first: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    StartNew(u32),
    StopOld(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutStep {
    /// Carry these out, then ask again when something changes.
    Act(Vec<RolloutAction>),
    /// Nothing to do until an instance changes phase.
    Wait,
    /// Every slot runs a ready new instance and no old one is left.
    Done,
    /// A new instance failed: abort (the engine removes the new instances
    /// and restores the old ones).
    Failed { slot: u32 },
}

/// Decide the next step. `slots` lists every slot that has an old or a new
/// instance, plus every slot in `1..=desired` (with `None`s where empty).
pub fn rollout_step(slots: &[RolloutSlot], params: RolloutParams) -> RolloutStep {
    if let Some(s) = slots.iter().find(|s| s.new == Some(NewPhase::Failed)) {
        return RolloutStep::Failed { slot: s.slot };
    }
    let wanted = |slot: u32| slot >= 1 && slot <= params.desired;
    let done = slots
        .iter()
        .all(|s| s.old.is_none() && (if wanted(s.slot) { s.new == Some(NewPhase::Ready) } else { s.new.is_none() }));
    if done {
        return RolloutStep::Done;
    }

    let mut actions = Vec::new();
    let exists = slots.iter().map(|s| u32::from(s.old.is_some()) + u32::from(s.new.is_some())).sum::<u32>();
    let mut total = exists;
    let ready = |s: &RolloutSlot| s.new == Some(NewPhase::Ready) || s.old == Some(OldPhase::Ready);
    let mut ready_count = slots.iter().filter(|s| wanted(s.slot) && ready(s)).count() as u32;
    let min_ready = params.desired.saturating_sub(params.unavailable);

    for s in slots {
        let old_alive = matches!(s.old, Some(OldPhase::Ready | OldPhase::NotReady));
        if !wanted(s.slot) {
            // Slots above the desired count: retire the old instance.
            if old_alive {
                actions.push(RolloutAction::StopOld(s.slot));
            }
            continue;
        }
        match (s.old, s.new) {
            // Replacement ready: retire the old one. Capacity is kept since
            // the new one already serves.
            (Some(OldPhase::Ready | OldPhase::NotReady), Some(NewPhase::Ready)) => {
                actions.push(RolloutAction::StopOld(s.slot));
            }
            // Slot empty: fill it (restores capacity, within the total cap).
            (None, None) if total < params.desired + params.surge || params.stop_first => {
                actions.push(RolloutAction::StartNew(s.slot));
                total += 1;
            }
            // Old alive, no new yet.
            (Some(old @ (OldPhase::Ready | OldPhase::NotReady)), None) => {
                if params.stop_first {
                    actions.push(RolloutAction::StopOld(s.slot));
                } else if total < params.desired + params.surge {
                    actions.push(RolloutAction::StartNew(s.slot));
                    total += 1;
                } else if old == OldPhase::NotReady || ready_count > min_ready {
                    // Stop-first within the unavailability budget.
                    actions.push(RolloutAction::StopOld(s.slot));
                    if old == OldPhase::Ready {
                        ready_count -= 1;
                    }
                }
            }
            // Old stopping, no new: start one when the total allows (never
            // for stop-first: the old one must be gone).
            (Some(OldPhase::Stopping), None) if !params.stop_first && total < params.desired + params.surge => {
                actions.push(RolloutAction::StartNew(s.slot));
                total += 1;
            }
            _ => {}
        }
    }
    if actions.is_empty() {
        RolloutStep::Wait
    } else {
        RolloutStep::Act(actions)
    }
}

/// Where a canary (the first new instance of a deploy's live-traffic
/// gate, started beside the old ones) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryStep {
    /// Start the new instance of this slot (no old one is stopped).
    Start(u32),
    /// It is starting.
    Wait,
    /// It serves: the ramp can weigh it.
    Ready(u32),
    /// It crashed, or did not become healthy in time.
    Failed(u32),
}

/// The canary's next step: the lowest slot's new instance, and nothing
/// else (the old instances all keep serving).
pub fn canary_step(slots: &[RolloutSlot]) -> CanaryStep {
    let Some(first) = slots.iter().min_by_key(|s| s.slot) else { return CanaryStep::Start(1) };
    match first.new {
        None => CanaryStep::Start(first.slot),
        Some(NewPhase::Starting) => CanaryStep::Wait,
        Some(NewPhase::Ready) => CanaryStep::Ready(first.slot),
        Some(NewPhase::Failed) => CanaryStep::Failed(first.slot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::process::Quantity;
    use std::time::Duration;

    fn params(desired: u32, surge: u32, unavailable: u32) -> RolloutParams {
        RolloutParams { desired, surge, unavailable, stop_first: false }
    }

    fn fresh(desired: u32) -> Vec<RolloutSlot> {
        (1..=desired).map(|slot| RolloutSlot { slot, old: Some(OldPhase::Ready), new: None }).collect()
    }

    #[test]
    fn default_rollout_starts_one_new_first() {
        let step = rollout_step(&fresh(3), params(3, 1, 0));
        assert_eq!(step, RolloutStep::Act(vec![RolloutAction::StartNew(1)]));
    }

    #[test]
    fn ready_new_retires_old() {
        let mut slots = fresh(2);
        slots[0].new = Some(NewPhase::Ready);
        // total is 3 = desired + surge, so nothing else starts yet.
        assert_eq!(rollout_step(&slots, params(2, 1, 0)), RolloutStep::Act(vec![RolloutAction::StopOld(1)]));
    }

    #[test]
    fn unavailability_budget_allows_stop_first() {
        let step = rollout_step(&fresh(4), params(4, 0, 1));
        assert_eq!(step, RolloutStep::Act(vec![RolloutAction::StopOld(1)]));
    }

    #[test]
    fn singleton_stops_then_starts() {
        let p = RolloutParams::resolve(ProcessKind::Singleton, 1, &Rollout::default());
        let mut slot = RolloutSlot { slot: 1, old: Some(OldPhase::Ready), new: None };
        assert_eq!(rollout_step(&[slot], p), RolloutStep::Act(vec![RolloutAction::StopOld(1)]));
        slot.old = Some(OldPhase::Stopping);
        assert_eq!(rollout_step(&[slot], p), RolloutStep::Wait);
        slot.old = None;
        assert_eq!(rollout_step(&[slot], p), RolloutStep::Act(vec![RolloutAction::StartNew(1)]));
        slot.new = Some(NewPhase::Ready);
        assert_eq!(rollout_step(&[slot], p), RolloutStep::Done);
    }

    #[test]
    fn a_failed_new_instance_fails_the_rollout() {
        let mut slots = fresh(2);
        slots[1].new = Some(NewPhase::Failed);
        assert_eq!(rollout_step(&slots, params(2, 1, 0)), RolloutStep::Failed { slot: 2 });
    }

    #[test]
    fn zero_and_zero_resolves_to_a_surge_of_one() {
        let r = Rollout {
            max_surge: Quantity::Percent(25),
            max_unavailable: Quantity::Percent(25),
            health_timeout: Duration::from_secs(1),
            ..Rollout::default()
        };
        // 25% of 2: surge rounds up to 1 already.
        assert_eq!(RolloutParams::resolve(ProcessKind::Web, 2, &r).surge, 1);
        let r = Rollout {
            max_surge: Quantity::Count(0),
            max_unavailable: Quantity::Percent(25),
            health_timeout: Duration::from_secs(1),
            ..Rollout::default()
        };
        let p = RolloutParams::resolve(ProcessKind::Web, 2, &r);
        assert_eq!((p.surge, p.unavailable), (1, 0));
    }

    #[test]
    fn scale_down_during_rollout_retires_extra_slots() {
        let slots = vec![
            RolloutSlot { slot: 1, old: Some(OldPhase::Ready), new: None },
            RolloutSlot { slot: 2, old: Some(OldPhase::Ready), new: None },
        ];
        let step = rollout_step(&slots, params(1, 1, 0));
        assert_eq!(step, RolloutStep::Act(vec![RolloutAction::StopOld(2)]));
    }

    /// A tiny deterministic PRNG so the simulation needs no crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    /// Drive rollouts with random completion orders and check the
    /// invariants after every action.
    #[test]
    fn simulated_rollouts_keep_the_invariants() {
        for seed in 0..3000u64 {
            let mut rng = Lcg(seed);
            let desired = (rng.next() % 6) as u32 + 1;
            let stop_first = rng.next().is_multiple_of(5);
            let p = if stop_first {
                RolloutParams { desired: 1, surge: 0, unavailable: 1, stop_first: true }
            } else {
                let surge = (rng.next() % 3) as u32;
                let unavailable = (rng.next() % 3) as u32;
                let surge = if surge == 0 && unavailable == 0 { 1 } else { surge };
                params(desired, surge, unavailable)
            };
            let mut slots = fresh(p.desired);
            let min_ready = p.desired.saturating_sub(p.unavailable);
            let mut steps = 0;
            loop {
                steps += 1;
                assert!(steps < 500, "seed {seed}: rollout did not finish: {slots:?}");
                match rollout_step(&slots, p) {
                    RolloutStep::Done => break,
                    RolloutStep::Failed { .. } => unreachable!(),
                    RolloutStep::Act(actions) => {
                        for a in actions {
                            let before_ready = slots
                                .iter()
                                .filter(|s| s.new == Some(NewPhase::Ready) || s.old == Some(OldPhase::Ready))
                                .count() as u32;
                            match a {
                                RolloutAction::StartNew(n) => {
                                    let s = slots.iter_mut().find(|s| s.slot == n).unwrap();
                                    assert!(s.new.is_none());
                                    s.new = Some(NewPhase::Starting);
                                }
                                RolloutAction::StopOld(n) => {
                                    let s = slots.iter_mut().find(|s| s.slot == n).unwrap();
                                    s.old = Some(OldPhase::Stopping);
                                }
                            }
                            let total: u32 =
                                slots.iter().map(|s| u32::from(s.old.is_some()) + u32::from(s.new.is_some())).sum();
                            let cap = if p.stop_first { p.desired } else { p.desired + p.surge };
                            assert!(total <= cap, "seed {seed}: {total} instances: {slots:?}");
                            if p.stop_first {
                                assert!(
                                    slots.iter().all(|s| !(s.old.is_some() && s.new.is_some())),
                                    "seed {seed}: singleton doubled"
                                );
                            }
                            let ready = slots
                                .iter()
                                .filter(|s| s.new == Some(NewPhase::Ready) || s.old == Some(OldPhase::Ready))
                                .count() as u32;
                            assert!(
                                ready >= min_ready.min(before_ready),
                                "seed {seed}: ready {ready} < {min_ready}: {slots:?}"
                            );
                        }
                    }
                    RolloutStep::Wait => {}
                }
                // The world moves: one random pending transition happens.
                let pending: Vec<usize> = slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.new == Some(NewPhase::Starting) || s.old == Some(OldPhase::Stopping))
                    .map(|(i, _)| i)
                    .collect();
                if pending.is_empty() {
                    continue;
                }
                let i = pending[(rng.next() as usize) % pending.len()];
                let s = &mut slots[i];
                if s.new == Some(NewPhase::Starting)
                    && (s.old != Some(OldPhase::Stopping) || rng.next().is_multiple_of(2))
                {
                    s.new = Some(NewPhase::Ready);
                } else if s.old == Some(OldPhase::Stopping) {
                    s.old = None;
                }
            }
        }
    }

    #[test]
    fn a_canary_starts_one_instance_beside_the_old_ones() {
        let slot = |slot, new| RolloutSlot { slot, old: Some(OldPhase::Ready), new };
        assert_eq!(canary_step(&[slot(2, None), slot(1, None)]), CanaryStep::Start(1));
        assert_eq!(canary_step(&[slot(1, Some(NewPhase::Starting)), slot(2, None)]), CanaryStep::Wait);
        assert_eq!(canary_step(&[slot(1, Some(NewPhase::Ready)), slot(2, None)]), CanaryStep::Ready(1));
        assert_eq!(canary_step(&[slot(1, Some(NewPhase::Failed)), slot(2, None)]), CanaryStep::Failed(1));
    }
}
