//! The deployment state machine: the phases a deploy (or rollback) goes
//! through, as data. The engine stores the phase before carrying it out, so
//! a restarted daemon knows exactly where a deployment stopped.

use nonstop_core::driver::{ExitStatus, TaskKind};
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
    /// any instance changed end as failed (nothing to undo), unless the
    /// release task that ran is found again (`task`, see [`task_on_restart`]):
    /// then the deployment stays in its phase and goes on once that task's
    /// exit is known, as after a normal exit; rolling phases are rolled
    /// back; post tasks end as succeeded (the release is live), or wait
    /// for the post task that was found.
    pub fn on_restart(&self, order: &[ProcessName], task: Option<&TaskFate>) -> DeployPhase {
        let resumes = task.is_some_and(TaskFate::resumes);
        match self {
            DeployPhase::ReleaseTasks | DeployPhase::PostTasks if resumes => self.clone(),
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

/// What a restarted daemon sees of a task (build command, release or post
/// task) recorded as starting or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskSeen {
    /// Its process (same pid and start time) still runs.
    Running,
    /// It ended while no daemon watched, and the driver knows how.
    Exited(ExitStatus),
    /// Its process is gone and how it ended is unknown, or it never got one.
    Gone,
}

/// Whether the deployment a found task belongs to can go on after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOwner {
    /// The deployment is recovered by the restarted daemon: it continues
    /// (or fails) from the task's exit as after a normal exit.
    Resumable,
    /// The deployment cannot go on (a first deploy whose app never ran: no
    /// record of the environment to run it with); it ends as failed.
    Ended,
}

/// What a restarted daemon does with a task the previous daemon left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskFate {
    /// Re-adopt it and wait for its exit (a migration must not be killed
    /// half way, nor run twice); then the deployment goes on or fails as
    /// after a normal exit of the task.
    WaitThenDecide,
    /// Wait for it to end (for the same reason), recording how; its
    /// deployment fails at once, and no other deployment's tasks start
    /// while it lives.
    WaitThenFail,
    /// Kill its process group and wait until it is gone; the deployment
    /// fails. For build commands: their output went to the dead daemon, so
    /// nothing could tell a finished build from a broken one.
    Kill,
    /// It ended while no daemon watched: its exit decides, as a normal exit
    /// would.
    Decide(ExitStatus),
    /// It did not run, or how it ended is unknown: the deployment fails.
    Fail,
}

impl TaskFate {
    /// The deployment stays in its phase and goes on from the task's exit.
    pub fn resumes(&self) -> bool {
        matches!(self, TaskFate::WaitThenDecide | TaskFate::Decide(_))
    }

    /// The task's process is still there to wait for or to kill.
    pub fn live(&self) -> bool {
        matches!(self, TaskFate::WaitThenDecide | TaskFate::WaitThenFail | TaskFate::Kill)
    }
}

/// The decision for a task found recorded as running when a daemon starts.
pub fn task_on_restart(kind: TaskKind, seen: TaskSeen, owner: TaskOwner) -> TaskFate {
    match (kind, seen, owner) {
        (TaskKind::Build, TaskSeen::Running, _) => TaskFate::Kill,
        (TaskKind::Build, _, _) => TaskFate::Fail,
        (_, TaskSeen::Running, TaskOwner::Resumable) => TaskFate::WaitThenDecide,
        (_, TaskSeen::Running, TaskOwner::Ended) => TaskFate::WaitThenFail,
        (_, TaskSeen::Exited(status), TaskOwner::Resumable) => TaskFate::Decide(status),
        (_, TaskSeen::Exited(_) | TaskSeen::Gone, _) => TaskFate::Fail,
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
        assert!(matches!(DeployPhase::Building.on_restart(&order, None), DeployPhase::Failed { .. }));
        assert!(matches!(DeployPhase::ReleaseTasks.on_restart(&order, None), DeployPhase::Failed { .. }));
        match (DeployPhase::Rolling { index: 1 }).on_restart(&order, None) {
            DeployPhase::RollingBack { remaining, .. } => assert_eq!(names(&remaining), ["worker", "web"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(DeployPhase::PostTasks.on_restart(&order, None), DeployPhase::Succeeded);
        let rb = DeployPhase::RollingBack { reason: "r".into(), remaining: order.clone() };
        assert_eq!(rb.on_restart(&order, None), rb);
    }

    const KINDS: [TaskKind; 3] = [TaskKind::Build, TaskKind::ReleaseTask, TaskKind::PostTask];
    const OWNERS: [TaskOwner; 2] = [TaskOwner::Resumable, TaskOwner::Ended];

    fn seens() -> Vec<TaskSeen> {
        let mut v = vec![TaskSeen::Running, TaskSeen::Gone, TaskSeen::Exited(ExitStatus::Unknown)];
        for c in [0, 1, 3, 137] {
            v.push(TaskSeen::Exited(ExitStatus::Code(c)));
        }
        v.push(TaskSeen::Exited(ExitStatus::Signal(9)));
        v
    }

    #[test]
    fn a_live_release_or_post_task_is_waited_for_never_killed_nor_run_again() {
        for kind in [TaskKind::ReleaseTask, TaskKind::PostTask] {
            assert_eq!(task_on_restart(kind, TaskSeen::Running, TaskOwner::Resumable), TaskFate::WaitThenDecide);
            assert_eq!(task_on_restart(kind, TaskSeen::Running, TaskOwner::Ended), TaskFate::WaitThenFail);
            let ok = TaskSeen::Exited(ExitStatus::Code(0));
            assert_eq!(task_on_restart(kind, ok, TaskOwner::Resumable), TaskFate::Decide(ExitStatus::Code(0)));
            assert_eq!(task_on_restart(kind, ok, TaskOwner::Ended), TaskFate::Fail);
            assert_eq!(task_on_restart(kind, TaskSeen::Gone, TaskOwner::Resumable), TaskFate::Fail);
        }
    }

    #[test]
    fn a_live_build_is_killed_and_a_dead_one_fails() {
        for owner in OWNERS {
            for seen in seens() {
                let fate = task_on_restart(TaskKind::Build, seen, owner);
                let want = if seen == TaskSeen::Running { TaskFate::Kill } else { TaskFate::Fail };
                assert_eq!(fate, want, "{seen:?} {owner:?}");
            }
        }
    }

    /// Every combination: a live process is always dealt with (waited for
    /// or killed, never forgotten), a dead one never is; only a resumable
    /// deployment resumes, and only from a task it can wait for or whose
    /// exit is known; what resumes a phase resumes it in place.
    #[test]
    fn every_case_keeps_the_fencing_rules() {
        let order: Vec<ProcessName> = ["web"].iter().map(|n| ProcessName::new(*n).unwrap()).collect();
        for kind in KINDS {
            for owner in OWNERS {
                for seen in seens() {
                    let fate = task_on_restart(kind, seen, owner);
                    assert_eq!(fate.live(), seen == TaskSeen::Running, "{kind:?} {seen:?} {owner:?} → {fate:?}");
                    if fate.resumes() {
                        assert_eq!(owner, TaskOwner::Resumable, "{kind:?} {seen:?} → {fate:?}");
                        assert_ne!(kind, TaskKind::Build);
                        assert!(matches!(seen, TaskSeen::Running | TaskSeen::Exited(_)));
                    }
                    if let TaskFate::Decide(s) = fate {
                        assert_eq!(seen, TaskSeen::Exited(s));
                    }
                    let phase = match kind {
                        TaskKind::Build => DeployPhase::Building,
                        TaskKind::ReleaseTask => DeployPhase::ReleaseTasks,
                        TaskKind::PostTask => DeployPhase::PostTasks,
                    };
                    let next = phase.on_restart(&order, Some(&fate));
                    match (kind, fate.resumes()) {
                        (_, true) => assert_eq!(next, phase),
                        (TaskKind::PostTask, false) => assert_eq!(next, DeployPhase::Succeeded),
                        (_, false) => assert!(matches!(next, DeployPhase::Failed { .. }), "{next:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn phases_serialize_with_a_tag() {
        let v = serde_json::to_value(DeployPhase::Rolling { index: 2 }).unwrap();
        assert_eq!(v, serde_json::json!({"phase": "rolling", "index": 2}));
        let back: DeployPhase = serde_json::from_value(v).unwrap();
        assert_eq!(back, DeployPhase::Rolling { index: 2 });
    }
}
