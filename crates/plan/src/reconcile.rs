//! The steady-state reconciler: desired formation vs observed instances →
//! start and stop actions. Processes under a rollout are left to the
//! rollout (see `rollout`), so the two never fight over a slot.

use crate::backoff::SlotBackoff;
use nonstop_core::process::{ProcessKind, ProcessSpec};
use nonstop_core::{InstanceId, ProcessName};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// Where an observed instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Started, not yet ready (web: not yet healthy; worker: not yet up for `ready_after`).
    Starting,
    /// Serving / working.
    Ready,
    /// Told to stop; still exists.
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedInstance {
    pub id: InstanceId,
    pub phase: Phase,
}

/// What the engine knows right now.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub instances: Vec<ObservedInstance>,
    /// Backoff per (process, slot).
    pub backoff: BTreeMap<(ProcessName, u32), SlotBackoff>,
    /// Processes a rollout currently owns.
    pub rolling: BTreeSet<ProcessName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start {
        process: ProcessName,
        slot: u32,
    },
    /// Scale-down or a process type that left the spec.
    Stop {
        instance: InstanceId,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// When to look again (earliest backoff expiry), if anything waits.
    pub wake_at: Option<Instant>,
}

/// Decide what to start and stop so that every process type runs its
/// desired count, one instance per slot `1..=count`.
///
/// Invariants (tested below): a singleton is never started while any
/// instance of it exists, stopping ones included; a slot in backoff is not
/// started before its `retry_at`; scale-down stops the highest slots.
pub fn reconcile(desired: &[ProcessSpec], observed: &Observed, now: Instant) -> Decision {
    let mut decision = Decision::default();
    let mut by_process: BTreeMap<&ProcessName, Vec<&ObservedInstance>> = BTreeMap::new();
    for inst in &observed.instances {
        by_process.entry(&inst.id.process).or_default().push(inst);
    }

    for spec in desired {
        if observed.rolling.contains(&spec.name) {
            continue;
        }
        let instances = by_process.remove(&spec.name).unwrap_or_default();
        let desired_count = if spec.kind == ProcessKind::Singleton { spec.count.min(1) } else { spec.count };

        // Which slots have a live (not stopping) instance.
        let mut live_slots: BTreeMap<u32, Vec<&ObservedInstance>> = BTreeMap::new();
        for inst in &instances {
            if inst.phase != Phase::Stopping {
                live_slots.entry(inst.id.slot).or_default().push(inst);
            }
        }

        // Scale down: every live instance above the desired count, highest
        // slot first; and duplicates in a slot (older generations first).
        let mut stops: Vec<&InstanceId> = Vec::new();
        for (slot, insts) in live_slots.iter().rev() {
            if *slot > desired_count {
                stops.extend(insts.iter().map(|i| &i.id));
            } else if insts.len() > 1 {
                let newest = insts.iter().map(|i| i.id.generation).max().unwrap_or(0);
                stops.extend(insts.iter().filter(|i| i.id.generation != newest).map(|i| &i.id));
            }
        }
        for id in stops {
            decision.actions.push(Action::Stop { instance: id.clone() });
        }

        // Scale up / replace.
        if spec.kind == ProcessKind::Singleton && !instances.is_empty() {
            continue; // something of it still exists, even if stopping
        }
        for slot in 1..=desired_count {
            if live_slots.contains_key(&slot) {
                continue;
            }
            let backoff = observed.backoff.get(&(spec.name.clone(), slot)).copied().unwrap_or_default();
            if backoff.may_start(now) {
                decision.actions.push(Action::Start { process: spec.name.clone(), slot });
            } else if let Some(at) = backoff.retry_at {
                decision.wake_at = Some(decision.wake_at.map_or(at, |w| w.min(at)));
            }
        }
    }

    // Process types that are no longer in the spec.
    for (process, instances) in by_process {
        if observed.rolling.contains(process) {
            continue;
        }
        for inst in instances.into_iter().filter(|i| i.phase != Phase::Stopping) {
            decision.actions.push(Action::Stop { instance: inst.id.clone() });
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(name: &str, kind: ProcessKind, count: u32) -> ProcessSpec {
        crate::fixtures::process(name, kind, count)
    }

    fn inst(process: &str, slot: u32, generation: u64, phase: Phase) -> ObservedInstance {
        ObservedInstance { id: InstanceId::new(ProcessName::new(process).unwrap(), slot, generation), phase }
    }

    fn starts(d: &Decision) -> Vec<(String, u32)> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { process, slot } => Some((process.to_string(), *slot)),
                _ => None,
            })
            .collect()
    }

    fn stops(d: &Decision) -> Vec<String> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::Stop { instance } => Some(instance.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn starts_every_missing_slot() {
        let d = reconcile(
            &[spec("web", ProcessKind::Web, 3), spec("worker", ProcessKind::Worker, 1)],
            &Observed { instances: vec![inst("web", 2, 1, Phase::Ready)], ..Default::default() },
            Instant::now(),
        );
        assert_eq!(starts(&d), [("web".into(), 1), ("web".into(), 3), ("worker".into(), 1)]);
        assert!(stops(&d).is_empty());
    }

    #[test]
    fn scale_down_stops_highest_slots() {
        let observed = Observed {
            instances: (1..=4).map(|s| inst("web", s, u64::from(s), Phase::Ready)).collect(),
            ..Default::default()
        };
        let d = reconcile(&[spec("web", ProcessKind::Web, 2)], &observed, Instant::now());
        assert_eq!(stops(&d), ["web.4#4", "web.3#3"]);
        assert!(starts(&d).is_empty());
    }

    #[test]
    fn stopping_instances_do_not_fill_a_slot_except_for_singletons() {
        let now = Instant::now();
        let web = reconcile(
            &[spec("web", ProcessKind::Web, 1)],
            &Observed { instances: vec![inst("web", 1, 1, Phase::Stopping)], ..Default::default() },
            now,
        );
        assert_eq!(starts(&web), [("web".into(), 1)]);
        let beat = reconcile(
            &[spec("beat", ProcessKind::Singleton, 1)],
            &Observed { instances: vec![inst("beat", 1, 1, Phase::Stopping)], ..Default::default() },
            now,
        );
        assert!(starts(&beat).is_empty(), "a singleton waits until the old one is gone");
    }

    #[test]
    fn singleton_count_is_capped_at_one() {
        let d = reconcile(&[spec("beat", ProcessKind::Singleton, 3)], &Observed::default(), Instant::now());
        assert_eq!(starts(&d), [("beat".into(), 1)]);
    }

    #[test]
    fn backoff_delays_a_start_and_sets_a_wakeup() {
        let now = Instant::now();
        let at = now + Duration::from_millis(400);
        let mut observed = Observed::default();
        observed.backoff.insert(
            (ProcessName::new("web").unwrap(), 1),
            SlotBackoff { consecutive_failures: 3, restarts: 3, retry_at: Some(at) },
        );
        let d = reconcile(&[spec("web", ProcessKind::Web, 2)], &observed, now);
        assert_eq!(starts(&d), [("web".into(), 2)]);
        assert_eq!(d.wake_at, Some(at));
        let later = reconcile(&[spec("web", ProcessKind::Web, 2)], &observed, at);
        assert_eq!(starts(&later), [("web".into(), 1), ("web".into(), 2)]);
    }

    #[test]
    fn rolling_processes_are_left_alone() {
        let mut observed = Observed {
            instances: vec![inst("web", 1, 1, Phase::Ready), inst("web", 1, 2, Phase::Starting)],
            ..Default::default()
        };
        observed.rolling.insert(ProcessName::new("web").unwrap());
        let d = reconcile(&[spec("web", ProcessKind::Web, 3)], &observed, Instant::now());
        assert!(d.actions.is_empty());
    }

    #[test]
    fn duplicate_generations_in_a_slot_keep_the_newest() {
        let observed = Observed {
            instances: vec![inst("web", 1, 1, Phase::Ready), inst("web", 1, 2, Phase::Ready)],
            ..Default::default()
        };
        let d = reconcile(&[spec("web", ProcessKind::Web, 1)], &observed, Instant::now());
        assert_eq!(stops(&d), ["web.1#1"]);
    }

    #[test]
    fn removed_process_types_are_stopped() {
        let observed = Observed {
            instances: vec![
                inst("web", 1, 1, Phase::Ready),
                inst("old", 1, 1, Phase::Ready),
                inst("old", 2, 2, Phase::Stopping),
            ],
            ..Default::default()
        };
        let d = reconcile(&[spec("web", ProcessKind::Web, 1)], &observed, Instant::now());
        assert_eq!(stops(&d), ["old.1#1"]);
    }

    #[test]
    fn zero_count_stops_everything() {
        let observed = Observed { instances: vec![inst("worker", 1, 1, Phase::Starting)], ..Default::default() };
        let d = reconcile(&[spec("worker", ProcessKind::Worker, 0)], &observed, Instant::now());
        assert_eq!(stops(&d), ["worker.1#1"]);
    }
}
