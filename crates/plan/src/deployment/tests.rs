use super::*;
use crate::deploy::TaskFate;
use nonstop_core::driver::ExitStatus;
use proptest::prelude::*;

fn name(n: &str) -> ProcessName {
    ProcessName::new(n).unwrap()
}

fn shape(kind: DeploymentKind, gate: GateMode, first: bool, ramp: bool) -> Shape {
    Shape {
        kind,
        first,
        order: vec![name("web"), name("worker"), name("beat")],
        gate,
        has_tasks: true,
        has_post_tasks: true,
        canary: Some(name("web")),
        ramp: if ramp {
            vec![RampStep { percent: 5, hold_ms: 10_000 }, RampStep { percent: 25, hold_ms: 10_000 }]
        } else {
            vec![]
        },
        limits: Limits::default(),
    }
}

fn deploy(gate: GateMode, ramp: bool) -> Deployment {
    Deployment::new(shape(DeploymentKind::Deploy, gate, false, ramp), Margins::default())
}

/// Feed events in order; collect every action.
fn run(mut d: Deployment, events: Vec<Event>) -> (Deployment, Vec<Action>) {
    let mut all = Vec::new();
    for (i, e) in events.into_iter().enumerate() {
        let (next, actions) = advance(d, e, 1_000 * i as u64);
        d = next;
        all.extend(actions);
    }
    (d, all)
}

fn done(p: &str) -> Event {
    Event::RolloutDone { process: name(p) }
}

fn roll(p: &str, to: RollTo) -> Action {
    Action::Roll { process: name(p), to }
}

fn outcome(d: &Deployment) -> &Outcome {
    match &d.phase {
        Phase::Done { outcome } => outcome,
        other => panic!("not done: {other:?}"),
    }
}

#[test]
fn a_plain_deploy_builds_gates_migrates_rolls_promotes_and_runs_post_tasks() {
    let (d, actions) = run(
        deploy(GateMode::Check, false),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::Gate { verdict: GateVerdict::Safe },
            Event::TasksEnded { post: false, result: Ok(()) },
            done("web"),
            done("worker"),
            done("beat"),
            Event::TasksEnded { post: true, result: Ok(()) },
        ],
    );
    assert_eq!(
        actions,
        vec![
            Action::Build,
            Action::RunGate,
            Action::RunTasks { post: false },
            roll("web", RollTo::New),
            roll("worker", RollTo::New),
            roll("beat", RollTo::New),
            Action::Promote,
            Action::RunTasks { post: true },
            Action::Finish { outcome: Outcome::Succeeded { note: None } },
        ]
    );
    assert_eq!(outcome(&d), &Outcome::Succeeded { note: None });
}

#[test]
fn a_rollback_behind_the_schema_is_refused_before_anything_changes_unless_forced() {
    let rollback = |gate| {
        let mut s = shape(DeploymentKind::Rollback { run_tasks: false }, gate, false, false);
        s.has_post_tasks = false;
        Deployment::new(s, Margins::default())
    };
    let verdict = GateVerdict::Breaking { report: "v3 expects notes.title".into() };
    let (d, actions) = run(rollback(GateMode::Check), vec![Event::Begin, Event::Gate { verdict }]);
    assert_eq!(actions[0], Action::RunGate);
    assert!(!actions.iter().any(|a| matches!(a, Action::Roll { .. } | Action::RunTasks { .. })), "{actions:?}");
    assert!(matches!(outcome(&d), Outcome::Failed { failure } if failure.kind == FailureKind::Breaking));
    // A compatible schema: rolled as usual.
    let (_, actions) = run(rollback(GateMode::Check), vec![Event::Begin, Event::Gate { verdict: GateVerdict::Safe }]);
    assert_eq!(actions, vec![Action::RunGate, roll("web", RollTo::New)]);
    // `--force` (or nothing recorded): no gate.
    let (_, actions) = run(rollback(GateMode::Off), vec![Event::Begin]);
    assert_eq!(actions, vec![roll("web", RollTo::New)]);
}

#[test]
fn a_breaking_migration_is_refused_before_anything_changes() {
    let (d, actions) = run(
        deploy(GateMode::Check, false),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::Gate { verdict: GateVerdict::Breaking { report: "notes.title renamed".into() } },
        ],
    );
    assert_eq!(actions.len(), 3, "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::RunTasks { .. } | Action::Roll { .. })));
    match outcome(&d) {
        Outcome::Failed { failure } => {
            assert_eq!(failure.kind, FailureKind::Breaking);
            assert!(failure.detail.contains("notes.title renamed"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn allow_breaking_goes_through_maintenance_with_the_old_release_stopped() {
    let (d, actions) = run(
        deploy(GateMode::AllowBreaking, true),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::MaintenanceSet { on: true },
            done("web"),
            done("worker"),
            done("beat"),
            Event::TasksEnded { post: false, result: Ok(()) },
            done("web"),
            done("worker"),
            done("beat"),
            Event::TasksEnded { post: true, result: Ok(()) },
            Event::MaintenanceSet { on: false },
        ],
    );
    assert_eq!(
        actions,
        vec![
            Action::Build,
            Action::SetMaintenance { on: true },
            roll("web", RollTo::Nothing),
            roll("worker", RollTo::Nothing),
            roll("beat", RollTo::Nothing),
            Action::RunTasks { post: false },
            // No canary: there is no old release to compare with.
            roll("web", RollTo::New),
            roll("worker", RollTo::New),
            roll("beat", RollTo::New),
            Action::Promote,
            Action::RunTasks { post: true },
            Action::SetMaintenance { on: false },
            Action::Finish { outcome: Outcome::Succeeded { note: None } },
        ]
    );
    assert!(!d.maintenance);
}

#[test]
fn a_failed_task_in_the_fallback_puts_the_old_release_back_then_leaves_maintenance() {
    let (d, actions) = run(
        deploy(GateMode::AllowBreaking, false),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::MaintenanceSet { on: true },
            done("web"),
            done("worker"),
            done("beat"),
            Event::TasksEnded { post: false, result: Err(work_error("exit 1")) },
            done("beat"),
            done("worker"),
            done("web"),
            Event::MaintenanceSet { on: false },
        ],
    );
    let tail: Vec<Action> = actions[6..].to_vec();
    assert_eq!(
        tail,
        vec![
            roll("beat", RollTo::Previous),
            roll("worker", RollTo::Previous),
            roll("web", RollTo::Previous),
            Action::SetMaintenance { on: false },
            Action::Finish { outcome: outcome(&d).clone() },
        ]
    );
    assert!(matches!(outcome(&d), Outcome::RolledBack { failure } if failure.kind == FailureKind::Task));
}

#[test]
fn the_canary_ramps_then_rolls_the_rest() {
    let good = Window { requests: 500, errors_5xx: 0, p95_ms: 20.0 };
    let (d, actions) = run(
        deploy(GateMode::Off, true),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::TasksEnded { post: false, result: Ok(()) },
            Event::CanaryWindow { step: 0, old: good, new: good },
            Event::CanaryWindow { step: 1, old: good, new: good },
            done("web"),
        ],
    );
    assert_eq!(
        actions[2..],
        [
            Action::Weigh { process: name("web"), percent: 5, hold_ms: 10_000 },
            Action::Weigh { process: name("web"), percent: 25, hold_ms: 10_000 },
            roll("web", RollTo::New),
            roll("worker", RollTo::New),
        ]
    );
    assert_eq!(d.phase, Phase::Rolling { index: 1 });
}

#[test]
fn a_canary_answering_500_rolls_back_with_the_figures() {
    let old = Window { requests: 900, errors_5xx: 0, p95_ms: 20.0 };
    let new = Window { requests: 50, errors_5xx: 50, p95_ms: 5.0 };
    let (d, actions) = run(
        deploy(GateMode::Off, true),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::TasksEnded { post: false, result: Ok(()) },
            Event::CanaryWindow { step: 0, old, new },
            done("web"),
        ],
    );
    assert!(actions.contains(&roll("web", RollTo::Previous)));
    match outcome(&d) {
        Outcome::RolledBack { failure } => {
            assert_eq!(failure.kind, FailureKind::LiveGate);
            assert!(failure.detail.contains("100.0% of 50"), "{}", failure.detail);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn one_slow_window_is_measured_again_and_two_in_a_row_roll_back() {
    let old = Window { requests: 900, errors_5xx: 0, p95_ms: 80.0 };
    let slow = Window { requests: 60, errors_5xx: 0, p95_ms: 300.0 };
    let good = Window { requests: 60, errors_5xx: 0, p95_ms: 90.0 };
    let begin = vec![Event::Begin, Event::Built { result: Ok(()) }, Event::TasksEnded { post: false, result: Ok(()) }];
    let again = Action::Weigh { process: name("web"), percent: 5, hold_ms: 10_000 };

    // Slow once, then fine: the ramp goes on (and the count starts over,
    // so one more slow window at the next step is again only a suspicion).
    let mut events = begin.clone();
    events.extend([
        Event::CanaryWindow { step: 0, old, new: slow },
        Event::CanaryWindow { step: 0, old, new: good },
        Event::CanaryWindow { step: 1, old, new: slow },
    ]);
    let (d, actions) = run(deploy(GateMode::Off, true), events);
    assert_eq!(
        actions[2..],
        [
            again.clone(),
            again.clone(),
            Action::Weigh { process: name("web"), percent: 25, hold_ms: 10_000 },
            Action::Weigh { process: name("web"), percent: 25, hold_ms: 10_000 },
        ]
    );
    assert_eq!((d.phase.clone(), d.slow_windows), (Phase::Canary { step: 1 }, 1));

    // Slow twice in a row: rolled back, the figures and the repetition named.
    let mut events = begin;
    events.extend([
        Event::CanaryWindow { step: 0, old, new: slow },
        Event::CanaryWindow { step: 0, old, new: slow },
        done("web"),
    ]);
    let (d, actions) = run(deploy(GateMode::Off, true), events);
    assert!(actions.contains(&roll("web", RollTo::Previous)));
    match outcome(&d) {
        Outcome::RolledBack { failure } => {
            assert_eq!(failure.kind, FailureKind::LiveGate);
            assert!(
                failure.detail.contains("p95 is 300 ms, the old one's 80 ms")
                    && failure.detail.contains("2 windows in a row"),
                "{}",
                failure.detail
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_restart_in_the_middle_of_the_rollout_rolls_back_what_was_touched() {
    let (d, actions) = run(
        deploy(GateMode::Off, false),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::TasksEnded { post: false, result: Ok(()) },
            done("web"),
            Event::Restarted { task: None },
            done("worker"),
            done("web"),
        ],
    );
    let back: Vec<&Action> =
        actions.iter().filter(|a| matches!(a, Action::Roll { to: RollTo::Previous, .. })).collect();
    assert_eq!(back, [&roll("worker", RollTo::Previous), &roll("web", RollTo::Previous)]);
    assert!(matches!(outcome(&d), Outcome::RolledBack { failure } if failure.kind == FailureKind::DaemonStopped));
}

#[test]
fn a_restart_during_a_live_release_task_waits_for_it_and_never_starts_it_again() {
    let (d, actions) = run(
        deploy(GateMode::Off, false),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::Restarted { task: Some(TaskFate::WaitThenDecide) },
            Event::TasksEnded { post: false, result: Ok(()) },
        ],
    );
    let runs = actions.iter().filter(|a| **a == Action::RunTasks { post: false }).count();
    assert_eq!(runs, 1);
    assert!(actions.contains(&Action::AwaitLeftoverTask { post: false }));
    assert_eq!(d.phase, Phase::Rolling { index: 0 });
}

#[test]
fn a_cancel_during_release_tasks_stops_them_and_ends_when_they_end() {
    let (d, actions) = run(
        deploy(GateMode::Off, false),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::Cancel { why: "cancelled by ann".into() },
            Event::TasksEnded { post: false, result: Ok(()) },
        ],
    );
    // The task is stopped, nothing is rolled, and it ends as cancelled.
    assert!(actions.contains(&Action::Abort));
    assert!(!actions.iter().any(|a| matches!(a, Action::Roll { .. })));
    assert!(matches!(outcome(&d), Outcome::Failed { failure } if failure.kind == FailureKind::Cancelled));
}

#[test]
fn a_first_deploy_that_fails_stops_what_it_started() {
    let d = Deployment::new(shape(DeploymentKind::Deploy, GateMode::Check, true, true), Margins::default());
    let (d, actions) = run(
        d,
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::Gate { verdict: GateVerdict::Safe },
            Event::TasksEnded { post: false, result: Ok(()) },
            Event::RolloutFailed { process: name("web"), why: "GET /health/ -> 500".into() },
            done("web"),
        ],
    );
    // No canary on a first deploy: nothing to compare with.
    assert!(!actions.iter().any(|a| matches!(a, Action::Weigh { .. })));
    assert!(actions.contains(&Action::AdoptFirst));
    assert!(actions.contains(&roll("web", RollTo::Nothing)));
    assert!(matches!(outcome(&d), Outcome::RolledBack { .. }));
}

#[test]
fn a_rollback_builds_nothing_and_runs_no_task() {
    let d = Deployment::new(
        shape(DeploymentKind::Rollback { run_tasks: false }, GateMode::Off, false, true),
        Margins::default(),
    );
    let (_, actions) = run(d, vec![Event::Begin]);
    assert_eq!(actions, [Action::Weigh { process: name("web"), percent: 5, hold_ms: 10_000 }]);
}

#[test]
fn phases_and_events_serialize_with_tags() {
    let d = deploy(GateMode::Check, true);
    let (d, _) = advance(d, Event::Begin, 0);
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(v["phase"]["phase"], "building");
    let back: Deployment = serde_json::from_value(v).unwrap();
    assert_eq!(back, d);
    let v = serde_json::to_value(GateVerdict::Breaking { report: "r".into() }).unwrap();
    assert_eq!(v, serde_json::json!({"verdict": "breaking", "report": "r"}));
}

// ------------------------------------------------------------ the judge

fn window() -> impl Strategy<Value = Window> {
    (0u64..2_000, 0.0f64..1.0, 0.0f64..2_000.0).prop_map(|(requests, rate, p95_ms)| Window {
        requests,
        errors_5xx: (requests as f64 * rate) as u64,
        p95_ms,
    })
}

proptest! {
    #[test]
    fn a_release_as_good_as_the_old_one_passes(w in window()) {
        let verdict = judge(&w, &w, &Margins::default());
        if w.requests >= Margins::default().min_requests {
            prop_assert_eq!(verdict, CanaryVerdict::Pass);
        } else {
            prop_assert_eq!(verdict, CanaryVerdict::Inconclusive);
        }
    }

    #[test]
    fn latency_alone_is_never_an_immediate_failure(old in window(), new in window()) {
        let clean = Window { errors_5xx: 0, ..new };
        let old = Window { errors_5xx: 0, ..old };
        let verdict = judge(&old, &clean, &Margins::default());
        prop_assert!(!matches!(verdict, CanaryVerdict::Fail { .. }), "{:?}", verdict);
        prop_assert!(!window_complete(1_000, 10_000, &old, &clean, &Margins::default()) || clean.requests >= 100);
    }

    #[test]
    fn more_errors_never_turn_a_failure_into_a_pass(old in window(), new in window(), more in 0u64..500) {
        let worse = Window { errors_5xx: (new.errors_5xx + more).min(new.requests), ..new };
        let m = Margins::default();
        if matches!(judge(&old, &new, &m), CanaryVerdict::Fail { .. }) {
            let failed = matches!(judge(&old, &worse, &m), CanaryVerdict::Fail { .. });
            prop_assert!(failed, "{:?} {:?}", old, worse);
        }
    }
}

// ------------------------------------------------------- the simulation

/// What the world does next.
#[derive(Debug, Clone)]
enum Move {
    /// Answer the oldest outstanding action; `ok` picks success or
    /// failure, `seed` the figures.
    Answer {
        ok: bool,
        seed: u8,
    },
    Cancel,
    Tick {
        ms: u64,
    },
    /// The daemon dies and comes back; `fate` is what it finds of a task.
    Restart {
        fate: u8,
    },
}

fn moves() -> impl Strategy<Value = Vec<Move>> {
    let one = prop_oneof![
        8 => (any::<bool>(), any::<u8>()).prop_map(|(ok, seed)| Move::Answer { ok: ok || seed % 5 != 0, seed }),
        1 => Just(Move::Cancel),
        1 => (0u64..5_000_000).prop_map(|ms| Move::Tick { ms }),
        1 => (0u8..6).prop_map(|fate| Move::Restart { fate }),
    ];
    proptest::collection::vec(one, 0..120)
}

fn shapes() -> impl Strategy<Value = Shape> {
    (
        prop_oneof![
            Just(DeploymentKind::Deploy),
            any::<bool>().prop_map(|run_tasks| DeploymentKind::Rollback { run_tasks }),
            any::<bool>().prop_map(|run_tasks| DeploymentKind::Reuse { run_tasks }),
        ],
        prop_oneof![Just(GateMode::Off), Just(GateMode::Check), Just(GateMode::AllowBreaking)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        1usize..4,
    )
        .prop_map(|(kind, gate, first, ramp, has_tasks, has_post_tasks, n)| {
            let mut s = shape(kind, gate, first, ramp);
            s.order.truncate(n);
            s.has_tasks = has_tasks;
            s.has_post_tasks = has_post_tasks;
            s.limits = Limits { build_ms: 600_000, gate_ms: 600_000, tasks_ms: 600_000, rollout_ms: 600_000 };
            s
        })
}

/// A build or task that failed, as the engine reports it.
fn work_error(words: &str) -> WorkError {
    WorkError::of(std::io::Error::other(words.to_string()))
}

/// The answer the world gives to an action, if it answers at all.
fn answer(action: &Action, ok: bool, seed: u8, step: usize) -> Option<Event> {
    let fail = || format!("failure {seed}");
    Some(match action {
        Action::Build => Event::Built { result: if ok { Ok(()) } else { Err(work_error(&fail())) } },
        Action::RunGate => Event::Gate {
            verdict: match (ok, seed % 2) {
                (true, _) => GateVerdict::Safe,
                (false, 0) => GateVerdict::Breaking { report: fail() },
                (false, _) => GateVerdict::Error { detail: fail() },
            },
        },
        Action::SetMaintenance { on } => Event::MaintenanceSet { on: *on },
        Action::RunTasks { post } | Action::AwaitLeftoverTask { post } => {
            Event::TasksEnded { post: *post, result: if ok { Ok(()) } else { Err(work_error(&fail())) } }
        }
        Action::Roll { process, .. } => {
            if ok {
                Event::RolloutDone { process: process.clone() }
            } else {
                Event::RolloutFailed { process: process.clone(), why: fail() }
            }
        }
        Action::Weigh { .. } => {
            let old = Window { requests: 1_000, errors_5xx: 1, p95_ms: 30.0 };
            let new = match (ok, seed % 2) {
                (true, _) => old,
                (false, 0) => Window { requests: 100, errors_5xx: 100, p95_ms: 5.0 },
                // Slow: a suspicion first, a failure the second time.
                (false, _) => Window { requests: 100, errors_5xx: 0, p95_ms: 900.0 },
            };
            Event::CanaryWindow { step, old, new }
        }
        Action::AdoptFirst | Action::Promote | Action::Abort | Action::Finish { .. } => return None,
    })
}

const FATES: [Option<TaskFate>; 6] = [
    None,
    Some(TaskFate::WaitThenDecide),
    Some(TaskFate::WaitThenFail),
    Some(TaskFate::Decide(ExitStatus::Code(0))),
    Some(TaskFate::Fail),
    Some(TaskFate::Kill),
];

/// What the simulation saw.
#[derive(Default)]
struct Trace {
    actions: Vec<Action>,
    /// Process types that answered done to a roll to the new release.
    rolled_new: Vec<ProcessName>,
    finished: usize,
    promoted_before_all_rolled: bool,
    actions_after_finish: bool,
    /// The timeline the engine would record.
    steps: Vec<crate::timeline::Step>,
}

fn simulate(shape: Shape, moves: Vec<Move>) -> (Deployment, Trace) {
    let mut d = Deployment::new(shape, Margins::default());
    let mut trace = Trace::default();
    let mut now = 0u64;
    // Outstanding actions waiting for the world's answer, with the canary
    // step they were asked in.
    let mut outstanding: std::collections::VecDeque<(Action, usize)> = Default::default();
    let feed = |d: Deployment,
                e: Event,
                now: u64,
                trace: &mut Trace,
                out: &mut std::collections::VecDeque<(Action, usize)>| {
        let was_done = d.is_done();
        let before = d.clone();
        let (d, actions) = advance(d, e.clone(), now);
        trace.steps.extend(crate::timeline::steps(&before, &e, &d));
        if was_done && !actions.is_empty() {
            trace.actions_after_finish = true;
        }
        let step = match d.phase {
            Phase::Canary { step } => step,
            _ => 0,
        };
        for a in &actions {
            match a {
                Action::Finish { .. } => trace.finished += 1,
                Action::Promote if !d.shape.order.iter().all(|p| trace.rolled_new.contains(p)) => {
                    trace.promoted_before_all_rolled = true;
                }
                // The aborted work still ends, and says how.
                _ => {}
            }
            out.push_back((a.clone(), step));
        }
        trace.actions.extend(actions);
        d
    };
    d = feed(d, Event::Begin, now, &mut trace, &mut outstanding);
    let mut moves = moves.into_iter();
    // Up to 400 steps: the given moves, then only answers (all good) so
    // that every run can end.
    for _ in 0..400 {
        if d.is_done() {
            break;
        }
        let m = moves.next().unwrap_or(Move::Answer { ok: true, seed: 1 });
        match m {
            Move::Answer { ok, seed } => {
                let Some((action, step)) = outstanding.pop_front() else { continue };
                if let (Action::Roll { process, to: RollTo::New }, true) = (&action, ok) {
                    trace.rolled_new.push(process.clone());
                }
                if let Some(e) = answer(&action, ok, seed, step) {
                    d = feed(d, e, now, &mut trace, &mut outstanding);
                }
            }
            Move::Cancel => d = feed(d, Event::Cancel { why: "cancelled".into() }, now, &mut trace, &mut outstanding),
            Move::Tick { ms } => {
                now += ms;
                d = feed(d, Event::Tick, now, &mut trace, &mut outstanding);
            }
            Move::Restart { fate } => {
                // The daemon died: whatever it was doing is gone, except a
                // task that it finds (and then waits for).
                outstanding.clear();
                let task = FATES[fate as usize % FATES.len()];
                let task = match d.phase {
                    Phase::ReleaseTasks | Phase::PostTasks => task,
                    _ => None,
                };
                d = feed(d, Event::Restarted { task }, now, &mut trace, &mut outstanding);
            }
        }
    }
    (d, trace)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn every_path_ends_and_keeps_the_invariants(shape in shapes(), moves in moves()) {
        let (d, trace) = simulate(shape.clone(), moves);
        prop_assert!(d.is_done(), "stuck in {:?} after {:?}", d.phase, trace.actions);
        prop_assert_eq!(trace.finished, 1, "{:?}", trace.actions);
        prop_assert!(matches!(trace.actions.last(), Some(Action::Finish { .. })), "{:?}", trace.actions);
        prop_assert!(!trace.actions_after_finish);

        // The timeline starts with a phase, names each phase once when
        // entered, and ends with the one outcome, which is the machine's.
        use crate::timeline::{StepKind, describe};
        prop_assert_eq!(trace.steps.first().map(|s| s.kind), Some(StepKind::Phase), "{:?}", trace.steps);
        let outcomes = trace.steps.iter().filter(|s| s.kind == StepKind::Outcome).count();
        prop_assert_eq!(outcomes, 1, "{:?}", trace.steps);
        prop_assert_eq!(trace.steps.last(), Some(&describe(&d)));
        let phases: Vec<_> = trace.steps.iter().filter(|s| s.kind != StepKind::Gate && s.kind != StepKind::Canary).collect();
        prop_assert!(phases.windows(2).all(|w| w[0] != w[1]), "{:?}", trace.steps);

        // The release tasks start at most once; a restart waits instead.
        let started = trace.actions.iter().filter(|a| **a == Action::RunTasks { post: false }).count();
        prop_assert!(started <= 1, "{:?}", trace.actions);
        if !shape.runs_tasks() {
            prop_assert_eq!(started, 0);
        }

        // Promotion only once every process type runs the new release.
        prop_assert!(!trace.promoted_before_all_rolled, "{:?}", trace.actions);
        if matches!(outcome(&d), Outcome::Succeeded { .. }) {
            prop_assert!(trace.actions.contains(&Action::Promote));
        }

        // Nothing is stopped without a replacement, except by the
        // fallback (behind maintenance) or when undoing a first deploy.
        let fallback = trace.actions.contains(&Action::SetMaintenance { on: true });
        for a in &trace.actions {
            if let Action::Roll { to: RollTo::Nothing, .. } = a {
                prop_assert!(fallback || shape.first, "{:?}", trace.actions);
            }
        }
        if fallback {
            prop_assert_eq!(shape.gate, GateMode::AllowBreaking);
            prop_assert!(!shape.first);
            // …and maintenance is switched off again before the end.
            let on = trace.actions.iter().rposition(|a| *a == Action::SetMaintenance { on: true }).unwrap();
            let off = trace.actions.iter().rposition(|a| *a == Action::SetMaintenance { on: false });
            prop_assert!(off.is_some_and(|off| off > on), "{:?}", trace.actions);
            prop_assert!(!d.maintenance);
        }

        // A breaking change refused by the gate changes nothing.
        if let Outcome::Failed { failure } = outcome(&d) {
            if failure.kind == FailureKind::Breaking {
                let changed = trace.actions.iter().any(|a| matches!(a, Action::RunTasks { .. } | Action::Roll { .. }));
                prop_assert!(!changed, "{:?}", trace.actions);
            }
        }
        // Nothing is built on a rollback or reuse.
        if shape.kind != DeploymentKind::Deploy {
            prop_assert!(!trace.actions.contains(&Action::Build));
        }
    }

}

/// A restart at any point, with any fate of a task found: the deployment
/// either waits for the task it found, or rolls back (or ends) — never
/// carries on forward as if nothing happened.
#[test]
fn a_restart_resumes_or_rolls_back() {
    for task in FATES {
        let phases = [
            Phase::Building,
            Phase::MigrationGate,
            Phase::Fallback { stage: FallbackStage::MaintenanceOn },
            Phase::Fallback { stage: FallbackStage::StoppingOld { index: 0 } },
            Phase::ReleaseTasks,
            Phase::Canary { step: 0 },
            Phase::Rolling { index: 0 },
            Phase::PostTasks,
        ];
        for phase in phases {
            let mut d = deploy(GateMode::AllowBreaking, true);
            d.phase = phase.clone();
            d.maintenance = matches!(phase, Phase::Fallback { .. });
            let (next, actions) = advance(d, Event::Restarted { task }, 0);
            let resumes = task.is_some_and(|t| t.resumes()) && matches!(phase, Phase::ReleaseTasks | Phase::PostTasks);
            if resumes {
                assert_eq!(next.phase, phase);
                assert!(matches!(actions.as_slice(), [Action::AwaitLeftoverTask { .. }]), "{actions:?}");
            } else {
                assert!(
                    matches!(next.phase, Phase::RollingBack { .. } | Phase::MaintenanceOff { .. } | Phase::Done { .. }),
                    "{phase:?} → {:?}",
                    next.phase
                );
                assert!(!actions
                    .iter()
                    .any(|a| matches!(a, Action::Roll { to: RollTo::New, .. } | Action::RunTasks { .. })));
            }
        }
    }
}

proptest! {
    /// A window always ends by its hold; before that only with evidence (or
    /// with no traffic at all after the idle time).
    #[test]
    fn a_window_ends_by_its_hold_and_before_only_with_evidence(
        elapsed in 0u64..20_000, hold in 1_000u64..15_000,
        old_req in 0u64..500, old_err in 0u64..500, new_req in 0u64..500, new_err in 0u64..500,
    ) {
        let margins = Margins::default();
        let old = Window { requests: old_req, errors_5xx: old_err.min(old_req), p95_ms: 10.0 };
        let new = Window { requests: new_req, errors_5xx: new_err.min(new_req), p95_ms: 10.0 };
        let done = window_complete(elapsed, hold, &old, &new, &margins);
        if elapsed >= hold {
            prop_assert!(done);
        } else if done {
            let enough = new.requests >= margins.min_requests;
            let idle = elapsed >= IDLE_WINDOW_MS && old.requests == 0 && new.requests == 0;
            prop_assert!(enough || idle);
        }
        // Too few requests to judge, some traffic, before the hold: wait.
        if elapsed < hold && new.requests < margins.min_requests && old.requests + new.requests > 0 {
            prop_assert!(!done);
        }
    }
}

#[test]
fn a_fallback_stopped_before_maintenance_answered_stops_nothing_and_switches_it_off() {
    let (d, actions) = run(
        deploy(GateMode::AllowBreaking, false),
        vec![
            Event::Begin,
            Event::Built { result: Ok(()) },
            Event::Cancel { why: "maintenance could not be switched on".into() },
            Event::MaintenanceSet { on: true },
            Event::MaintenanceSet { on: false },
        ],
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::Roll { .. } | Action::RunTasks { .. })), "{actions:?}");
    assert!(actions.contains(&Action::SetMaintenance { on: false }));
    assert!(matches!(outcome(&d), Outcome::Failed { failure } if failure.kind == FailureKind::Cancelled));
}
