//! A store that cannot be written (a full disk): nothing starts without
//! its record, but the restart of a killed instance is retried within
//! seconds of the store working again, and the reason is in `status` and
//! in the events (kept in memory meanwhile).

use crate::*;
use nonstop_core::driver::ExitStatus;
use nonstop_core::EnvironmentId;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, Entry, Fixture};

const FULL: &str = "database or disk is full";

#[tokio::test(start_paused = true)]
async fn a_killed_instance_is_restarted_within_seconds_of_the_store_working_again() {
    let f = Fixture::new();
    let e = f.start();
    e.up(app("blog").web("web", 2).build()).await.unwrap();
    let starts_before = f.driver.starts_of(&pn("web")).len();

    f.store.fail_writes_for_tests(Some(FULL)).unwrap();
    let killed = alive(&f, "web").into_iter().find(|i| i.slot == 1).unwrap();
    assert!(f.driver.exit(&killed, ExitStatus::Signal(9)));
    // Far past the restart backoff: the start was tried, and refused for
    // want of its record, again and again.
    tokio::time::sleep(secs(60)).await;
    settle().await;
    assert_eq!(f.driver.starts_of(&pn("web")).len(), starts_before, "started without its launching record");
    let st = e.status().await.unwrap();
    let w = st.waiting.iter().find(|w| w.instance == "web.1").unwrap_or_else(|| panic!("{st:#?}"));
    assert_eq!(w.state, nonstop_engine::SlotState::CannotStart, "{w:#?}");
    assert!(w.problem.as_deref().is_some_and(|p| p.contains(FULL)), "{w:#?}");
    assert!(w.retry_in_ms <= 2000, "{w:#?}");
    assert!(st.store_error.as_deref().is_some_and(|s| s.contains(FULL)), "{st:#?}");
    // The events are shown, from memory.
    let evs = e.handle.events(100).await.unwrap();
    let exit = evs.iter().position(|ev| ev.kind == "exit" && ev.instance.as_deref() == Some(&killed.to_string()));
    let refused = evs.iter().position(|ev| ev.kind == "cannot-start" && ev.message.contains(FULL));
    assert!(exit.is_some() && refused.is_some() && exit < refused, "{evs:#?}");
    assert_eq!(evs.iter().filter(|ev| ev.kind == "cannot-start").count(), 1, "one event, not one per retry: {evs:#?}");

    // Space is freed.
    let freed = tokio::time::Instant::now();
    f.store.fail_writes_for_tests(None).unwrap();
    f.driver.wait_starts(&pn("web"), starts_before + 1).await;
    let next = f.driver.starts_of(&pn("web")).pop().unwrap();
    assert_eq!(next.instance.slot, 1);
    let started = f.journal.time_of(&Entry::Start(next.instance.clone())).unwrap();
    assert!(started - freed <= secs(2), "restarted {:?} after the store worked again", started - freed);
    settle().await;
    let st = e.status().await.unwrap();
    assert_eq!(st.store_error, None, "{st:#?}");
    assert!(st.waiting.is_empty(), "{st:#?}");
    // The kept events are in the store now, in order, before the new ones.
    let stored = f.store.events(&"blog".parse().unwrap(), &EnvironmentId::default_env(), 100).unwrap();
    let kinds: Vec<&str> = stored.iter().map(|ev| ev.kind.as_str()).collect();
    let exit = stored.iter().position(|ev| ev.kind == "exit" && ev.instance.as_deref() == Some(&killed.to_string()));
    let refused = kinds.iter().position(|k| *k == "cannot-start");
    let back =
        stored.iter().position(|ev| ev.kind == "store" && ev.instance.as_deref() == Some(&next.instance.to_string()));
    assert!(exit < refused && refused < back && exit.is_some(), "{kinds:?}");
    let evs = e.handle.events(100).await.unwrap();
    assert!(evs.iter().all(|ev| !ev.message.contains("not yet in the store")), "{evs:#?}");
    e.shutdown().await;
}
