//! A driver that never answers (a remote API that hangs): every call the
//! engine makes gets a deadline of its own, and a call past it is reported
//! as failed instead of holding a slot, a stop or a deploy forever.

use crate::*;
use nonstop_testkit::spec::app;
use nonstop_testkit::Fixture;

fn silent(events: &[nonstop_engine::EventEntry], call: &str) -> bool {
    events.iter().any(|ev| ev.message.contains(&format!("the driver did not answer `{call}` within")))
}

#[tokio::test(start_paused = true)]
async fn a_start_the_driver_never_answers_is_given_up_on_and_the_slot_started_again() {
    let f = Fixture::new();
    f.driver.set_unresponsive(true);
    let e = f.start();
    let began = tokio::time::Instant::now();
    let (r, ()) = tokio::join!(e.up(app("blog").worker("worker", 1).build()), async {
        // Answering again after the first start's deadline.
        tokio::time::sleep(secs(121)).await;
        f.driver.set_unresponsive(false);
    });
    r.unwrap();
    let starts = f.driver.starts_of(&pn("worker"));
    assert!(starts.len() >= 2, "{starts:?}");
    assert_eq!(alive(&f, "worker").len(), 1);
    assert!(began.elapsed() >= secs(120));
    let events = e.handle.events(50).await.unwrap();
    assert!(silent(&events, "start"), "{events:#?}");
    assert!(events.iter().any(|ev| ev.kind == "start-failed" && ev.message.contains("2m0s")), "{events:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_stop_the_driver_never_answers_is_reported_after_its_deadline() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").worker("worker", 2).with("worker", |p| p.stop_timeout = secs(10)).build()).await.unwrap();
    f.driver.set_unresponsive(true);
    let began = tokio::time::Instant::now();
    let scaled = e.spawn_scale(&[("worker", 1)]);
    // Drain (30 s by default, though a worker has nothing to drain) + stop
    // timeout (10 s) + the margin (30 s).
    let deadline = secs(30 + 10 + 30);
    tokio::time::sleep_until(began + deadline - secs(1)).await;
    assert!(!silent(&e.handle.events(50).await.unwrap(), "stop"), "not before its deadline");
    tokio::time::sleep_until(began + deadline + secs(1)).await;
    let events = e.handle.events(50).await.unwrap();
    assert!(silent(&events, "stop"), "{events:#?}");
    assert!(events.iter().any(|ev| ev.message.contains("stop failed") && ev.message.contains("70.0s")), "{events:#?}");
    scaled.abort();
}

#[tokio::test(start_paused = true)]
async fn a_release_task_the_driver_never_answers_fails_the_deploy_after_its_deadline() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").worker("worker", 1).build()).await.unwrap();
    let before = alive(&f, "worker");
    f.driver.set_unresponsive(true);
    f.builder.set_hash("source-2");
    let began = tokio::time::Instant::now();
    let spec = app("blog").worker("worker", 1).release_tasks(&["python manage.py migrate"], secs(60)).build();
    let (r, _progress) = e.deploy_with_progress(spec).await;
    let err = r.unwrap_err().to_string();
    assert!(err.contains("the driver did not answer `start_task` within 2m0s"), "{err}");
    assert!(err.contains("python manage.py migrate"), "{err}");
    // Task timeout (60 s) + the margin (60 s).
    assert_eq!(began.elapsed().as_secs(), 120);
    assert_eq!(alive(&f, "worker"), before, "nothing changed");
}
