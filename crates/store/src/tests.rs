use super::*;
use nonstop_core::driver::{Locator, TaskKind};
use nonstop_core::process::{ProxySpec, ReleaseSpec};
use std::collections::BTreeMap;

fn spec() -> AppSpec {
    AppSpec {
        app: AppName::new("blog").unwrap(),
        env: BTreeMap::from([("A".to_string(), "1".to_string())]),
        processes: vec![],
        proxy: ProxySpec::new("127.0.0.1:8080".parse().unwrap()),
        build: vec![],
        release: ReleaseSpec::default(),
        statics: vec![],
        database: None,
        hosts: vec![],
        default_host: true,
        protected: false,
        base: None,
        metrics: None,
    }
}

fn ids() -> (AppName, EnvironmentId, ProcessName) {
    (AppName::new("blog").unwrap(), EnvironmentId::default_env(), ProcessName::new("web").unwrap())
}

#[test]
fn apps_round_trip_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let (app, env, _) = ids();
    let rec = AppRecord {
        app: app.clone(),
        environment: env.clone(),
        spec: spec(),
        workdir: PathBuf::from("/srv/blog"),
        release: ReleaseId(0),
        base_env: BTreeMap::from([("PATH".to_string(), "/usr/bin".to_string())]),
        running: true,
    };
    {
        let store = Store::open(&path).unwrap();
        store.put_app(&rec, SystemTime::now()).unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.apps().unwrap(), vec![rec.clone()]);
    let stopped = AppRecord { running: false, ..rec };
    store.put_app(&stopped, SystemTime::now()).unwrap();
    assert_eq!(store.apps().unwrap(), vec![stopped]);
}

#[test]
fn generations_never_repeat() {
    let store = Store::in_memory().unwrap();
    let (app, env, web) = ids();
    let worker = ProcessName::new("worker").unwrap();
    assert_eq!(store.next_generation(&app, &env, &web).unwrap(), 1);
    assert_eq!(store.next_generation(&app, &env, &web).unwrap(), 2);
    assert_eq!(store.next_generation(&app, &env, &worker).unwrap(), 1);
    assert_eq!(store.next_generation(&app, &env, &web).unwrap(), 3);
    // Another environment, another app: the same sequence, so ids never
    // collide between them.
    let staging = EnvironmentId::new("staging").unwrap();
    let shop = AppName::new("shop").unwrap();
    assert_eq!(store.next_generation(&app, &staging, &web).unwrap(), 4);
    assert_eq!(store.next_generation(&shop, &env, &web).unwrap(), 5);
    assert_eq!(store.next_generation(&app, &env, &web).unwrap(), 6);
    assert_eq!(store.next_generation(&app, &staging, &worker).unwrap(), 2);
}

#[test]
fn instances_round_trip_update_and_delete() {
    let store = Store::in_memory().unwrap();
    let (app, env, web) = ids();
    let id = InstanceId::new(web, 1, 4);
    let mut rec = InstanceRecord {
        app: app.clone(),
        environment: env.clone(),
        id: id.clone(),
        release: ReleaseId(0),
        handle: None,
        phase: InstancePhase::Launching,
        was_healthy: false,
        started_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        restarts: 0,
    };
    store.put_instance(&rec).unwrap();
    assert_eq!(store.instances(&app, &env).unwrap(), vec![rec.clone()]);
    rec.handle = Some(InstanceHandle {
        instance: id.clone(),
        locator: Locator::Local { pid: 42, start_time: 7, monitor_pid: 41, monitor_start_time: 6 },
        addr: Some("127.0.0.1:4000".parse().unwrap()),
    });
    rec.phase = InstancePhase::Running;
    rec.was_healthy = true;
    rec.restarts = 2;
    store.put_instance(&rec).unwrap();
    assert_eq!(store.instances(&app, &env).unwrap(), vec![rec.clone()]);
    store.delete_instance(&app, &env, &id).unwrap();
    assert!(store.instances(&app, &env).unwrap().is_empty());
}

#[test]
fn events_come_back_newest_window_oldest_first() {
    let store = Store::in_memory().unwrap();
    let (app, env, _) = ids();
    for i in 0..5 {
        store.add_event(&app, &env, SystemTime::now(), EventKind::Deploy, None, &format!("e{i}")).unwrap();
    }
    let got: Vec<_> = store.events(&app, &env, 3).unwrap().into_iter().map(|e| e.message).collect();
    assert_eq!(got, ["e2", "e3", "e4"]);
}

#[test]
fn event_kinds_round_trip_and_an_unknown_one_is_refused() {
    let store = Store::in_memory().unwrap();
    let (app, env, _) = ids();
    let all = [EventKind::StartFailed, EventKind::RolledBack, EventKind::Autoscale, EventKind::Daemon];
    for kind in all {
        store.add_event(&app, &env, SystemTime::now(), kind, None, kind.as_str()).unwrap();
        assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
    }
    let got: Vec<_> = store.events(&app, &env, 10).unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(got, all);
    store.conn().execute("UPDATE events SET kind = 'started-ish' WHERE kind = 'daemon'", []).unwrap();
    match store.events(&app, &env, 10) {
        Err(StoreError::UnknownValue { what, value }) => {
            assert_eq!((what, value.as_str()), ("event kind", "started-ish"))
        }
        other => panic!("expected UnknownValue, got {other:?}"),
    }
}

#[test]
fn refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = Store::open(&path).unwrap();
        store.conn().execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'", []).unwrap();
    }
    let err = Store::open(&path).err().unwrap();
    assert!(err.to_string().contains("upgrade nonstop"), "{err}");
}

#[test]
fn releases_and_deployments_round_trip() {
    let store = Store::in_memory().unwrap();
    let (app, env, _) = ids();
    assert_eq!(store.next_release_id(&app).unwrap(), ReleaseId(1));
    let rel = ReleaseRecord {
        app: app.clone(),
        id: ReleaseId(1),
        content_hash: "abc".into(),
        dir: PathBuf::from("/r/v1"),
        spec: spec(),
        message: Some("first".into()),
        status: ReleaseStatus::Building,
        created_at: UNIX_EPOCH + Duration::from_secs(5),
        build_ms: 0,
    };
    store.put_release(&rel).unwrap();
    let ready = ReleaseRecord { status: ReleaseStatus::Ready, build_ms: 1234, ..rel.clone() };
    store.put_release(&ready).unwrap();
    assert_eq!(store.releases(&app).unwrap(), vec![ready.clone()]);
    assert_eq!(store.next_release_id(&app).unwrap(), ReleaseId(2));

    let mut dep = DeploymentRecord {
        id: 0,
        app: app.clone(),
        environment: env.clone(),
        kind: DeploymentKind::Deploy,
        from_release: None,
        to_release: ReleaseId(1),
        phase: serde_json::json!({"phase": "building"}),
        status: DeploymentStatus::Running,
        reason: None,
        who: "me@host".into(),
        message: None,
        started_at: UNIX_EPOCH + Duration::from_secs(6),
        finished_at: None,
    };
    dep.id = store.insert_deployment(&dep).unwrap();
    assert_eq!(store.running_deployment(&app, &env).unwrap(), Some(dep.clone()));
    dep.status = DeploymentStatus::RolledBack;
    dep.reason = Some("web.1 never healthy".into());
    dep.finished_at = Some(UNIX_EPOCH + Duration::from_secs(9));
    store.update_deployment(&dep).unwrap();
    assert_eq!(store.running_deployment(&app, &env).unwrap(), None);
    assert_eq!(store.deployments(&app, &env, 10).unwrap(), vec![dep.clone()]);
    // One by its ID: only in its own app and environment.
    assert_eq!(store.deployment(&app, &env, dep.id).unwrap(), Some(dep.clone()));
    assert_eq!(store.deployment(&app, &env, dep.id + 1).unwrap(), None);
    let other_env: EnvironmentId = "staging".parse().unwrap();
    assert_eq!(store.deployment(&app, &other_env, dep.id).unwrap(), None);

    // Its timeline, in the order written; another deployment's is apart.
    let at = |s| UNIX_EPOCH + Duration::from_secs(s);
    store.add_deployment_step(dep.id, at(6), &serde_json::json!({"kind": "phase", "text": "building"})).unwrap();
    store.add_deployment_step(dep.id + 1, at(7), &serde_json::json!({"kind": "phase", "text": "other"})).unwrap();
    store.add_deployment_step(dep.id, at(9), &serde_json::json!({"kind": "outcome", "text": "rolled back"})).unwrap();
    let steps = store.deployment_steps(dep.id).unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0], (at(6), serde_json::json!({"kind": "phase", "text": "building"})));
    assert_eq!(steps[1].0, at(9));
    assert!(store.deployment_steps(dep.id + 2).unwrap().is_empty());
}

#[test]
fn tasks_are_recorded_before_they_start_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let (app, env, _) = ids();
    let store = Store::open(&path).unwrap();
    let mut rec = TaskRecord {
        id: 0,
        app: app.clone(),
        environment: env.clone(),
        deployment: 7,
        kind: TaskKind::ReleaseTask,
        index: 0,
        total: 2,
        name: "release-3-1".into(),
        command: "python manage.py migrate".into(),
        locator: None,
        state: TaskState::Starting,
        started_at: UNIX_EPOCH + Duration::from_secs(10),
        finished_at: None,
        outcome: None,
    };
    rec.id = store.insert_task(&rec).unwrap();
    assert_eq!(store.unfinished_tasks(&app, &env).unwrap(), vec![rec.clone()]);
    rec.locator = Some(Locator::Local { pid: 42, start_time: 4200, monitor_pid: 41, monitor_start_time: 4100 });
    rec.state = TaskState::Running;
    store.update_task(&rec).unwrap();
    drop(store);

    // A restarted daemon finds it, with its process.
    let store = Store::open(&path).unwrap();
    assert_eq!(store.unfinished_tasks(&app, &env).unwrap(), vec![rec.clone()]);
    assert_eq!(rec.describe(), "release task 1/2 `python manage.py migrate`");
    rec.state = TaskState::Finished;
    rec.finished_at = Some(UNIX_EPOCH + Duration::from_secs(40));
    rec.outcome = Some("exit code 0".into());
    store.update_task(&rec).unwrap();
    assert!(store.unfinished_tasks(&app, &env).unwrap().is_empty());
    let other = AppName::new("shop").unwrap();
    assert!(store.tasks(&other, &env, 10).unwrap().is_empty());
    assert_eq!(store.tasks(&app, &env, 10).unwrap(), vec![rec]);
}

#[test]
fn process_counts_round_trip_replace_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let (app, env, web) = ids();
    let worker = ProcessName::new("worker").unwrap();
    let scaled = RuntimeCount { count: 3, source: CountSource::Scale, toml_at_apply: 2 };
    let toml = RuntimeCount { count: 1, source: CountSource::Toml, toml_at_apply: 1 };
    {
        let store = Store::open(&path).unwrap();
        assert!(store.process_counts(&app, &env).unwrap().is_empty());
        let both = BTreeMap::from([(web.clone(), scaled), (worker.clone(), toml)]);
        store.put_process_counts(&app, &env, &both, true).unwrap();
    }
    let store = Store::open(&path).unwrap();
    let got = store.process_counts(&app, &env).unwrap();
    assert_eq!(got.get(&web), Some(&scaled));
    assert_eq!(got.get(&worker), Some(&toml));
    // One process type updated, the other kept.
    let four = RuntimeCount { count: 4, ..scaled };
    store.put_process_counts(&app, &env, &BTreeMap::from([(web.clone(), four)]), false).unwrap();
    assert_eq!(store.process_counts(&app, &env).unwrap().len(), 2);
    // Exactly: the worker is gone from the app.
    store.put_process_counts(&app, &env, &BTreeMap::from([(web.clone(), four)]), true).unwrap();
    assert_eq!(store.process_counts(&app, &env).unwrap(), BTreeMap::from([(web, four)]));
    store.delete_app(&app, &env).unwrap();
    assert!(store.process_counts(&app, &env).unwrap().is_empty());
}

#[test]
fn controls_round_trip_survive_reopen_and_land_with_their_counts() {
    use nonstop_core::maintenance::{build_maintenance, MaintenanceBy, MaintenanceState, StopPhase, StoppedState};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let (app, env, web) = ids();
    let before = RuntimeCount { count: 3, source: CountSource::Scale, toml_at_apply: 2 };
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(store.controls(&app, &env).unwrap(), Controls::default());
        store.put_process_counts(&app, &env, &BTreeMap::from([(web.clone(), before)]), true).unwrap();
        let controls = Controls {
            maintenance: Some(MaintenanceState {
                maintenance: build_maintenance(Some("<p>back soon</p>".into()), &["10.0.0.0/8"], Some(120)).unwrap(),
                by: MaintenanceBy::Stop,
                since_ms: 7,
            }),
            stopped: Some(StoppedState {
                phase: StopPhase::Stopped,
                counts: BTreeMap::from([(web.clone(), before)]),
                since_ms: 7,
                who: "ann@host".into(),
            }),
        };
        let zero = BTreeMap::from([(web.clone(), RuntimeCount { count: 0, ..before })]);
        store.put_controls(&app, &env, &controls, Some(&zero), SystemTime::now()).unwrap();
    }
    let store = Store::open(&path).unwrap();
    let controls = store.controls(&app, &env).unwrap();
    assert_eq!(controls.stopped.as_ref().unwrap().counts[&web], before);
    assert_eq!(controls.maintenance.as_ref().unwrap().maintenance.retry_after_secs, 120);
    assert_eq!(store.process_counts(&app, &env).unwrap()[&web].count, 0, "the zero counts landed with the stop");
    // Both off: the row goes.
    store.put_controls(&app, &env, &Controls::default(), None, SystemTime::now()).unwrap();
    assert_eq!(store.controls(&app, &env).unwrap(), Controls::default());
    // Another environment is another app's business.
    let staging = EnvironmentId::new("staging").unwrap();
    assert_eq!(store.controls(&app, &staging).unwrap(), Controls::default());
}

#[test]
fn release_schemas_round_trip_replace_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let (app, _, _) = ids();
    let first = ReleaseSchema { fingerprint: "abc".into(), schema: serde_json::json!({"tables": []}), gate_ms: 1500 };
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(store.release_schema(&app, ReleaseId(3)).unwrap(), None);
        store.put_release_schema(&app, ReleaseId(3), &first).unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.release_schema(&app, ReleaseId(3)).unwrap(), Some(first.clone()));
    assert_eq!(store.release_schema(&app, ReleaseId(4)).unwrap(), None);
    let second = ReleaseSchema { fingerprint: "def".into(), ..first };
    store.put_release_schema(&app, ReleaseId(3), &second).unwrap();
    assert_eq!(store.release_schema(&app, ReleaseId(3)).unwrap(), Some(second));
}
