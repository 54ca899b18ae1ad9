//! The deployment state machine: the phases a deploy (or rollback) goes
//! through, as data. The engine stores the phase before carrying it out, so
//! a restarted daemon knows exactly where a deployment stopped.

use nonstop_core::process::{AppSpec, ProcessKind};
use nonstop_core::ProcessName;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum DeployPhase {
    /// Snapshotting the app and running the build commands.
    Building,
    /// Running `[release] tasks` one at a time.
    ReleaseTasks,
    /// Replacing the instances of `order[index]` with the new release.
    Rolling {
        index: usize,
    },
    /// Running `[release] post_tasks`.
    PostTasks,
    /// Putting back the previous release on the processes in `remaining`
    /// (the ones already touched, last rolled first).
    RollingBack {
        reason: String,
        remaining: Vec<ProcessName>,
    },
    Succeeded,
    Failed {
        reason: String,
    },
    RolledBack {
        reason: String,
    },
}

impl DeployPhase {
    pub fn name(&self) -> &'static str {
        match self {
            DeployPhase::Building => "building",
            DeployPhase::ReleaseTasks => "release tasks",
            DeployPhase::Rolling { .. } => "rolling",
            DeployPhase::PostTasks => "post tasks",
            DeployPhase::RollingBack { .. } => "rolling back",
            DeployPhase::Succeeded => "succeeded",
            DeployPhase::Failed { .. } => "failed",
            DeployPhase::RolledBack { .. } => "rolled back",
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self, DeployPhase::Succeeded | DeployPhase::Failed { .. } | DeployPhase::RolledBack { .. })
    }

    /// What a daemon that finds this phase at start must do: phases before
    /// any instance changed end as failed (nothing to undo); rolling phases
    /// are rolled back.
    pub fn on_restart(&self, order: &[ProcessName]) -> DeployPhase {
        match self {
            DeployPhase::Building | DeployPhase::ReleaseTasks => DeployPhase::Failed {
                reason: format!("the daemon stopped during {}; no instance was changed", self.name()),
            },
            DeployPhase::Rolling { index } => DeployPhase::RollingBack {
                reason: "the daemon stopped in the middle of the rollout".to_string(),
                remaining: order[..(*index + 1).min(order.len())].iter().rev().cloned().collect(),
            },
            DeployPhase::PostTasks => DeployPhase::Succeeded,
            DeployPhase::RollingBack { reason, remaining } => {
                DeployPhase::RollingBack { reason: reason.clone(), remaining: remaining.clone() }
            }
            done => done.clone(),
        }
    }
}

/// The order in which a deploy rolls process types: `[release] order`
/// first, then web, workers, singletons (in declaration order within a
/// kind), then the process types the new release no longer has (rolled to
/// zero).
pub fn rollout_order(old: Option<&AppSpec>, new: &AppSpec) -> Vec<ProcessName> {
    let rank = |kind: ProcessKind| match kind {
        ProcessKind::Web => 0,
        ProcessKind::Worker => 1,
        ProcessKind::Singleton => 2,
    };
    let mut order: Vec<ProcessName> = new.release.order.iter().filter(|n| new.process(n).is_some()).cloned().collect();
    let mut rest: Vec<(usize, usize, ProcessName)> = new
        .processes
        .iter()
        .enumerate()
        .filter(|(_, p)| !order.contains(&p.name))
        .map(|(i, p)| (rank(p.kind), i, p.name.clone()))
        .collect();
    rest.sort();
    order.extend(rest.into_iter().map(|(_, _, n)| n));
    if let Some(old) = old {
        for p in &old.processes {
            if new.process(&p.name).is_none() {
                order.push(p.name.clone());
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::names;
    use nonstop_core::process::{ProcessSpec, ReleaseSpec};

    fn p(name: &str, kind: ProcessKind) -> ProcessSpec {
        crate::fixtures::process(name, kind, 1)
    }

    fn app(processes: Vec<ProcessSpec>, order: &[&str]) -> AppSpec {
        let order = order.iter().map(|n| ProcessName::new(*n).unwrap()).collect();
        AppSpec { release: ReleaseSpec { order, ..Default::default() }, ..crate::fixtures::app(processes) }
    }

    #[test]
    fn web_then_workers_then_singletons_then_removed() {
        let old = app(vec![p("beat", ProcessKind::Singleton), p("legacy", ProcessKind::Worker)], &[]);
        let new = app(
            vec![
                p("beat", ProcessKind::Singleton),
                p("worker", ProcessKind::Worker),
                p("web", ProcessKind::Web),
                p("mail", ProcessKind::Worker),
            ],
            &[],
        );
        assert_eq!(names(&rollout_order(Some(&old), &new)), ["web", "worker", "mail", "beat", "legacy"]);
        assert_eq!(names(&rollout_order(None, &new)), ["web", "worker", "mail", "beat"]);
    }

    #[test]
    fn configured_order_comes_first() {
        let new = app(
            vec![p("web", ProcessKind::Web), p("worker", ProcessKind::Worker), p("beat", ProcessKind::Singleton)],
            &["beat", "web"],
        );
        assert_eq!(names(&rollout_order(None, &new)), ["beat", "web", "worker"]);
    }

    #[test]
    fn a_restart_fails_early_phases_and_rolls_back_rolling_ones() {
        let order: Vec<ProcessName> = ["web", "worker", "beat"].iter().map(|n| ProcessName::new(*n).unwrap()).collect();
        assert!(matches!(DeployPhase::Building.on_restart(&order), DeployPhase::Failed { .. }));
        assert!(matches!(DeployPhase::ReleaseTasks.on_restart(&order), DeployPhase::Failed { .. }));
        match (DeployPhase::Rolling { index: 1 }).on_restart(&order) {
            DeployPhase::RollingBack { remaining, .. } => assert_eq!(names(&remaining), ["worker", "web"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(DeployPhase::PostTasks.on_restart(&order), DeployPhase::Succeeded);
        let rb = DeployPhase::RollingBack { reason: "r".into(), remaining: order.clone() };
        assert_eq!(rb.on_restart(&order), rb);
    }

    #[test]
    fn phases_serialize_with_a_tag() {
        let v = serde_json::to_value(DeployPhase::Rolling { index: 2 }).unwrap();
        assert_eq!(v, serde_json::json!({"phase": "rolling", "index": 2}));
        let back: DeployPhase = serde_json::from_value(v).unwrap();
        assert_eq!(back, DeployPhase::Rolling { index: 2 });
    }
}
