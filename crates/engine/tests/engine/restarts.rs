//! Instances that die are brought back, with exponential backoff.

use crate::*;
use nonstop_core::driver::ExitStatus;
use nonstop_core::process::RestartPolicy;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, Entry, Fixture};

#[tokio::test(start_paused = true)]
async fn a_crashed_instance_is_restarted_with_exponential_backoff_then_shows_crash_loop() {
    let f = Fixture::new();
    let e = f.start();
    let spec = app("blog")
        .web("web", 1)
        .worker("worker", 2)
        .with("worker", |p| {
            p.restart = RestartPolicy {
                backoff_initial: ms(100),
                backoff_max: ms(1000),
                reset_after: secs(30),
                crash_loop_after: 5,
            }
        })
        .build();
    e.up(spec).await.unwrap();

    let mut delays = Vec::new();
    for n in 1..=6 {
        let current = alive(&f, "worker").into_iter().find(|i| i.slot == 1).unwrap();
        assert!(f.driver.exit(&current, CRASH));
        let exited = f.journal.time_of(&Entry::Exit(current.clone(), CRASH)).unwrap();
        if n == 5 {
            // Five quick exits in a row: status says so while it waits.
            settle().await;
            let st = e.status().await.unwrap();
            let w = st.waiting.iter().find(|w| w.instance == "worker.1").unwrap_or_else(|| panic!("{st:#?}"));
            assert_eq!(w.state, nonstop_engine::SlotState::CrashLoop);
            assert_eq!(w.restarts, 5);
            assert_eq!(w.last_exit.as_deref(), Some("exit code 1"));
            assert_eq!(w.retry_in_ms, 1000, "capped at backoff_max");
            assert!(!status_ids(&st, "worker").contains(&current.to_string()));
        }
        if n == 2 {
            settle().await;
            let st = e.status().await.unwrap();
            let w = st.waiting.iter().find(|w| w.instance == "worker.1").unwrap_or_else(|| panic!("{st:#?}"));
            assert_eq!((w.state.as_str(), w.retry_in_ms), ("backoff", 200));
        }
        f.driver.wait_starts(&pn("worker"), 2 + n).await;
        let next = f.driver.starts_of(&pn("worker")).pop().unwrap();
        assert_eq!(next.instance.slot, 1, "the crashed slot is the one restarted");
        assert!(next.instance.generation > current.generation, "a restart is a new generation");
        let started = f.journal.time_of(&Entry::Start(next.instance.clone())).unwrap();
        delays.push((started - exited).as_millis());
    }
    assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    // The other slot was never touched.
    assert_eq!(f.driver.starts().iter().filter(|l| l.instance.slot_name() == "worker.2").count(), 1);
    let st = e.status().await.unwrap();
    let w1 = st.instances.iter().find(|i| i.instance == "worker.1").unwrap();
    assert_eq!(w1.restarts, 6);
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_lived_long_restarts_at_once() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 1).build()).await.unwrap();
    let first = alive(&f, "web").remove(0);
    // Two quick crashes build up a backoff...
    f.driver.exit(&first, CRASH);
    f.driver.wait_starts(&pn("web"), 2).await;
    let second = alive(&f, "web").remove(0);
    f.driver.exit(&second, CRASH);
    f.driver.wait_starts(&pn("web"), 3).await;
    // ...which a long life (reset_after is 30 s) forgets.
    tokio::time::sleep(secs(31)).await;
    let third = alive(&f, "web").remove(0);
    f.driver.exit(&third, ExitStatus::Signal(9));
    f.driver.wait_starts(&pn("web"), 4).await;
    let fourth = f.driver.starts_of(&pn("web")).pop().unwrap().instance;
    let delay = f.journal.time_of(&Entry::Start(fourth)).unwrap()
        - f.journal.time_of(&Entry::Exit(third.clone(), ExitStatus::Signal(9))).unwrap();
    assert_eq!(delay, ms(100), "backoff_initial again");
    // A crashed web instance leaves the rotation at once.
    assert!(f.journal.position(&Entry::Remove(third)).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_start_that_fails_is_retried_with_backoff() {
    let f = Fixture::new();
    f.driver.fail_next_starts(&pn("web"), 2, "fork: resource temporarily unavailable");
    let e = f.start();
    e.up(app("blog").web("web", 1).build()).await.unwrap();

    let failed: Vec<_> = f.journal.records().into_iter().filter(|r| matches!(r.entry, Entry::StartFailed(_))).collect();
    assert_eq!(failed.len(), 2);
    let started = f.journal.records().into_iter().find(|r| matches!(r.entry, Entry::Start(_))).unwrap();
    assert_eq!(failed[1].at - failed[0].at, ms(100));
    assert_eq!(started.at - failed[1].at, ms(200));
    let events = e.handle.events(50).await.unwrap();
    assert_eq!(events.iter().filter(|ev| ev.kind == "start-failed").count(), 2, "{events:#?}");
    assert!(events.iter().any(|ev| ev.message.contains("resource temporarily unavailable")));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_singleton_is_replaced_once() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").singleton("beat").build()).await.unwrap();
    let beat = alive(&f, "beat").remove(0);
    f.driver.reset_peaks();
    f.driver.exit(&beat, CRASH);
    f.driver.wait_starts(&pn("beat"), 2).await;
    tokio::time::sleep(secs(60)).await;
    assert_eq!(f.driver.starts_of(&pn("beat")).len(), 2);
    assert_eq!(f.driver.peak_alive(&pn("beat")), 1);
    assert_eq!(ready_of(&e.status().await.unwrap(), "beat"), (1, 1));
}
