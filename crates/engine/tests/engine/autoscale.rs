//! The autoscaler in the controller: samples in, decisions carried out
//! through the scaling path, recorded as events with their reason, shown
//! by `status`; `scale` by hand inside the bounds holds, outside them is
//! refused; scale-in waits for a deployment.

use crate::*;
use nonstop_core::autoscale::{Autoscale, Metric, Target};
use nonstop_core::process::{AppSpec, Quantity};
use nonstop_engine::{AutoscaleSample, EngineError};
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, Fixture, RunningEngine};

fn policy() -> Autoscale {
    Autoscale {
        min: 1,
        max: 4,
        targets: vec![Target { metric: Metric::CpuPercent, value: 50 }],
        scale_out_cooldown: secs(15),
        scale_in_cooldown: secs(60),
        scale_in_window: secs(120),
        max_step: Quantity::Count(4),
    }
}

/// A worker-only app (no proxy needed) whose `worker` is autoscaled on CPU.
fn autoscaled() -> AppSpec {
    let mut spec = app("blog").worker("worker", 1).worker("mailer", 1).build();
    spec.processes[0].autoscale = Some(policy());
    spec
}

async fn sample(e: &RunningEngine, process: &str, cpu: f64) -> Option<String> {
    let s = AutoscaleSample { cpu_percent: Some(cpu), ..AutoscaleSample::default() };
    let d = e.handle.autoscale_sample(pn(process), s).await.unwrap();
    settle().await;
    d
}

fn autoscale_events(f: &Fixture) -> Vec<String> {
    f.store
        .events(&"blog".parse().unwrap(), &nonstop_core::EnvironmentId::default_env(), 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "autoscale")
        .map(|e| e.message)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_busy_process_scales_out_at_once_and_back_in_after_the_window() {
    let f = Fixture::new();
    let e = f.start();
    e.up(autoscaled()).await.unwrap();
    assert_eq!(alive(&f, "worker").len(), 1);

    // 100 % on one instance with a 50 % target: two are needed, now.
    let d = sample(&e, "worker", 100.0).await.unwrap();
    assert!(d.starts_with("scale out 1 → 2"), "{d}");
    assert_eq!(alive(&f, "worker").len(), 2);
    let events = autoscale_events(&f);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].contains("worker: scale out 1 → 2: cpu_percent 100 (target 50"), "{events:?}");
    let st = e.status().await.unwrap();
    let worker = st.processes.iter().find(|p| p.process == "worker").unwrap();
    let status = worker.autoscale.as_ref().expect("autoscale in status");
    assert_eq!((status.min, status.max, worker.desired), (1, 4, 2));
    assert!(status.last_decision.as_deref().unwrap().starts_with("scale out"), "{status:?}");
    // A process without a policy: no decision.
    assert_eq!(sample(&e, "mailer", 100.0).await, None);

    // Idle: no scale-in before the cooldown and the window have passed...
    for _ in 0..6 {
        tokio::time::advance(secs(5)).await;
        let d = sample(&e, "worker", 5.0).await.unwrap();
        assert!(d.starts_with("hold at 2"), "{d}");
    }
    assert_eq!(alive(&f, "worker").len(), 2);
    // ...then back to min, once.
    let mut last = String::new();
    for _ in 0..40 {
        tokio::time::advance(secs(5)).await;
        last = sample(&e, "worker", 5.0).await.unwrap();
        if last.starts_with("scale in") {
            break;
        }
    }
    assert!(last.starts_with("scale in 2 → 1"), "{last}");
    for _ in 0..50 {
        if alive(&f, "worker").len() == 1 {
            break;
        }
        tokio::time::advance(secs(1)).await;
        settle().await;
    }
    assert_eq!(alive(&f, "worker").len(), 1);
    assert_eq!(autoscale_events(&f).len(), 2, "one event per change, none per hold");
}

#[tokio::test(start_paused = true)]
async fn scale_by_hand_inside_the_bounds_holds_and_outside_is_refused() {
    let f = Fixture::new();
    let e = f.start();
    e.up(autoscaled()).await.unwrap();

    let err = e.scale(&[("worker", 9)]).await.unwrap_err();
    assert!(matches!(err, EngineError::OutsideAutoscaleBounds { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("min 1") && text.contains("max 4"), "{text}");
    assert_eq!(err.exit_code(), 2);
    assert_eq!(alive(&f, "worker").len(), 1, "nothing changed");

    e.scale(&[("worker", 3)]).await.unwrap();
    assert_eq!(alive(&f, "worker").len(), 3);
    // Idle right after: the count set by hand holds through the cooldown.
    tokio::time::advance(secs(5)).await;
    let d = sample(&e, "worker", 1.0).await.unwrap();
    assert!(d.starts_with("hold at 3"), "{d}");
    assert_eq!(alive(&f, "worker").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn during_a_deployment_scale_out_goes_ahead_and_scale_in_waits() {
    use nonstop_core::driver::Locator;
    let f = Fixture::new();
    let e = f.start();
    e.up(autoscaled()).await.unwrap();
    sample(&e, "worker", 100.0).await.unwrap();
    assert_eq!(alive(&f, "worker").len(), 2);

    // A deploy whose build never ends: a deployment in progress.
    f.builder.set_hash("source-2");
    let process = Locator::Local { pid: 7002, start_time: 70_020, monitor_pid: 0, monitor_start_time: 0 };
    f.builder.hang_next_build(process);
    let mut spec = autoscaled();
    spec.build = vec!["make assets".into()];
    let _deploy = e.spawn_deploy(spec, "ann");
    wait_operation(&e, "deploy").await;

    // Idle for long: scale-in is decided, and waits.
    let mut last = String::new();
    for _ in 0..40 {
        tokio::time::advance(secs(5)).await;
        last = sample(&e, "worker", 5.0).await.unwrap();
    }
    assert!(
        last.starts_with("scale in 2 → 1") && last.contains("not now: scale-in waits for the deployment"),
        "{last}"
    );
    assert_eq!(alive(&f, "worker").len(), 2);
    assert_eq!(autoscale_events(&f).len(), 1, "only the first scale-out");

    // Busy: at the first sample that shows it, scale-out goes ahead
    // beside the deployment (the newest sample counts, not only the
    // window's mean).
    tokio::time::advance(secs(5)).await;
    let d = sample(&e, "worker", 100.0).await.unwrap();
    assert!(d.starts_with("scale out 2 → 4"), "{d}");
    assert_eq!(alive(&f, "worker").len(), 4);
    e.shutdown().await;
}
