//! `config set|unset|get`: a config change is a new release of the same
//! build, rolled out as a deploy is; the config stays with the
//! environment's later deploys, goes back with a rollback, and changes
//! nothing when its rollout fails.

use super::*;
use nonstop_core::config::ConfigName;
use nonstop_core::process::AppSpec;
use nonstop_core::ReleaseId;
use nonstop_engine::{EngineError, EngineHandle, OpReport, SecretsKeyConfig};
use nonstop_store::DeploymentKind;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, within};
use std::collections::{BTreeMap, BTreeSet};

fn spec(greeting: &str) -> AppSpec {
    app("blog").worker("worker", 2).env("GREETING", greeting).env("COLOR", "blue").build()
}

fn tx() -> tokio::sync::mpsc::UnboundedSender<nonstop_engine::Progress> {
    tokio::sync::mpsc::unbounded_channel().0
}

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<ConfigName, String> {
    pairs.iter().map(|(k, v)| (ConfigName::new(*k).unwrap(), v.to_string())).collect()
}

fn blog(e: &RunningEngine) -> EngineHandle {
    e.env(Some("blog"), "default")
}

async fn set(e: &RunningEngine, pairs: &[(&str, &str)]) -> Result<OpReport, EngineError> {
    within("config set", blog(e).set_config(vars(pairs), false, "ann@host".into(), tx())).await
}

async fn unset(e: &RunningEngine, names: &[&str]) -> Result<OpReport, EngineError> {
    let names: BTreeSet<ConfigName> = names.iter().map(|n| ConfigName::new(*n).unwrap()).collect();
    within("config unset", blog(e).unset_config(names, "ann@host".into(), tx())).await
}

/// `var` in the newest start of the worker, and that start's release.
fn newest(f: &Fixture, var: &str) -> (Option<String>, u64) {
    let starts = f.driver.starts_of(&pn("worker"));
    let last = starts.last().expect("a worker started");
    (last.env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()), last.release.0)
}

/// Every live worker has `var = value`.
fn all_workers(f: &Fixture, var: &str, value: &str) -> bool {
    let alive = f.driver.alive_of(&pn("worker"));
    !alive.is_empty()
        && alive
            .iter()
            .all(|id| f.driver.launch_of(id).is_some_and(|l| l.env.iter().any(|(k, v)| k == var && v == value)))
}

#[tokio::test(start_paused = true)]
async fn config_set_rolls_out_a_new_release_of_the_same_build_and_later_deploys_keep_it() {
    let f = Fixture::new();
    let e = f.start();
    let (r, _) = e.deploy_with_progress(spec("from the file")).await;
    r.unwrap();
    let builds = f.builder.builds();

    let r = set(&e, &[("GREETING", "from config"), ("EXTRA", "x=1")]).await.unwrap();
    assert!(r.changed && r.summary.contains("v2 is live"), "{}", r.summary);
    settle().await;
    assert_eq!(f.builder.builds(), builds, "nothing built");
    assert!(all_workers(&f, "GREETING", "from config") && all_workers(&f, "EXTRA", "x=1"));
    assert!(all_workers(&f, "COLOR", "blue"), "the file's other variables stay");
    let app = nonstop_core::AppName::new("blog").unwrap();
    let (v1, v2) =
        (f.store.release(&app, ReleaseId(1)).unwrap().unwrap(), f.store.release(&app, ReleaseId(2)).unwrap().unwrap());
    assert_eq!((v2.dir, v2.content_hash), (v1.dir, v1.content_hash), "the same build");
    let history = blog(&e).history(5).await.unwrap();
    assert_eq!((history[0].kind, history[0].from_release, history[0].to_release), (DeploymentKind::Config, Some(1), 2));

    // `config get`: the values and who set them.
    let report = blog(&e).config().await.unwrap();
    assert_eq!(report.config["GREETING"].value, "from config");
    assert_eq!(report.config["GREETING"].set_by, "ann@host");
    assert_eq!(report.env.as_ref().unwrap()["GREETING"], "from config");
    assert_eq!(report.file_env.as_ref().unwrap()["GREETING"], "from the file");
    assert_eq!(report.release, Some(2));

    // The same values again: nothing to roll.
    let r = set(&e, &[("GREETING", "from config")]).await.unwrap();
    assert!(!r.changed, "{}", r.summary);

    // A deploy of new code keeps the config.
    f.builder.set_hash("source-2");
    let (r, _) = e.deploy_with_progress(spec("from the file, v3")).await;
    r.unwrap();
    settle().await;
    assert_eq!(newest(&f, "GREETING"), (Some("from config".into()), 3));
    // And an unset gives the file's value back.
    unset(&e, &["GREETING"]).await.unwrap();
    settle().await;
    assert_eq!(newest(&f, "GREETING"), (Some("from the file, v3".into()), 4));
    assert!(all_workers(&f, "GREETING", "from the file, v3") && all_workers(&f, "EXTRA", "x=1"));
    let err = unset(&e, &["GREETING"]).await.unwrap_err();
    assert!(matches!(&err, EngineError::InvalidConfig { reason } if reason.contains("EXTRA")), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_config_change_whose_rollout_fails_changes_nothing_and_a_rollback_brings_the_old_config_back() {
    let f = Fixture::new();
    let e = f.start();
    e.deploy_with_progress(spec("one")).await.0.unwrap();
    set(&e, &[("GREETING", "two")]).await.unwrap();
    settle().await;

    // New instances that cannot start: rolled back, config unchanged.
    f.driver.fail_starts(&pn("worker"), "bad config");
    let err = set(&e, &[("GREETING", "three")]).await.unwrap_err();
    assert!(matches!(err, EngineError::RolledBack { .. } | EngineError::DeployFailed { .. }), "{err}");
    f.driver.clear_failures();
    settle().await;
    assert_eq!(blog(&e).config().await.unwrap().config["GREETING"].value, "two");
    assert!(all_workers(&f, "GREETING", "two"));

    // A rollback goes back to v1 with v1's config (none), and that is the
    // environment's config from then on.
    within("the rollback", blog(&e).rollback(None, false, "test".into(), tx())).await.unwrap();
    settle().await;
    assert!(all_workers(&f, "GREETING", "one"));
    assert!(blog(&e).config().await.unwrap().config.is_empty());
    f.builder.set_hash("source-2");
    e.deploy_with_progress(spec("one")).await.0.unwrap();
    settle().await;
    assert!(all_workers(&f, "GREETING", "one"), "the rolled-back config did not come back");
}

#[tokio::test(start_paused = true)]
async fn config_set_before_the_first_deploy_is_stored_and_applied_by_it() {
    let f = Fixture::new();
    let e = f.start();
    let r = set(&e, &[("GREETING", "early")]).await.unwrap();
    assert!(r.summary.contains("next `nonstop up`, `deploy` or `promote`"), "{}", r.summary);
    assert!(f.driver.alive().is_empty());
    e.deploy_with_progress(spec("file")).await.0.unwrap();
    settle().await;
    assert!(all_workers(&f, "GREETING", "early"));
}

#[tokio::test(start_paused = true)]
async fn up_of_the_working_directory_gets_the_config_too() {
    let f = Fixture::new();
    let e = f.start();
    e.up(spec("file")).await.unwrap();
    let r = set(&e, &[("GREETING", "cfg")]).await.unwrap();
    assert!(r.summary.contains("next `nonstop up` applies it"), "{}", r.summary);
    let r = e.up(spec("file")).await.unwrap();
    assert!(r.changed, "{}", r.summary);
    settle().await;
    assert!(all_workers(&f, "GREETING", "cfg"));
}

#[tokio::test(start_paused = true)]
async fn what_a_secret_or_the_database_would_hide_and_what_looks_like_a_credential_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let mut f = Fixture::new();
    f.secrets = SecretsKeyConfig::new(home.path().to_path_buf(), None);
    let e = f.start();
    let with_db = app("blog").worker("worker", 1).database("postgres://blog@127.0.0.1/blog").build();
    e.deploy_with_progress(with_db).await.0.unwrap();
    let token = nonstop_secrets::SecretValue::new("tok-12345678".to_string()).unwrap();
    blog(&e).set_secret(nonstop_secrets::SecretName::new("API_TOKEN").unwrap(), token, "t".into()).await.unwrap();
    let refused = |r: Result<OpReport, EngineError>, words: &[&str]| {
        let err = r.unwrap_err();
        assert!(matches!(err, EngineError::InvalidConfig { .. }), "{err:?}");
        assert_eq!(err.exit_code(), 2);
        for w in words {
            assert!(err.to_string().contains(w), "{w:?} not in: {err}");
        }
    };
    refused(set(&e, &[("API_TOKEN", "x")]).await, &["is a secret", "nonstop secrets"]);
    refused(set(&e, &[("DATABASE_URL", "postgres://x/y")]).await, &["[database]"]);
    refused(
        set(&e, &[("GITHUB_TOKEN", "abc123456789")]).await,
        &["looks like a credential", "nonstop secrets set GITHUB_TOKEN", "--force"],
    );
    let secret_value = "postgres://u:hunter2@db/x";
    let err = set(&e, &[("CACHE_URL", secret_value)]).await.unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "the value is never shown: {err}");
    assert_eq!(blog(&e).history(10).await.unwrap().len(), 1, "nothing was rolled out");
    assert!(blog(&e).config().await.unwrap().config.is_empty());
    // --force keeps it as plain config.
    let handle = blog(&e);
    let forced = handle.set_config(vars(&[("GITHUB_TOKEN", "abc123456789")]), true, "t".into(), tx());
    within("config set --force", forced).await.unwrap();
    assert_eq!(blog(&e).config().await.unwrap().config["GITHUB_TOKEN"].value, "abc123456789");
}

#[tokio::test(start_paused = true)]
async fn a_config_change_interrupted_by_a_daemon_restart_is_rolled_back_and_its_config_never_applies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(nonstop_store::Store::open(&path).unwrap());
    let e = f.start();
    e.deploy_with_progress(spec("one")).await.0.unwrap();
    // The new instances never get ready while this daemon runs.
    f.driver.set_start_delay(secs(3600));
    let pending = {
        let h = blog(&e);
        tokio::spawn(async move { h.set_config(vars(&[("GREETING", "two")]), false, "t".into(), tx()).await })
    };
    wait_operation(&e, "config").await;
    e.shutdown().await;
    let _ = pending.await;
    f.driver.set_start_delay(ms(0));

    let g = f.next_daemon(std::sync::Arc::new(nonstop_store::Store::open(&path).unwrap()));
    let e2 = g.start();
    let h = e2.env(Some("blog"), "default");
    for _ in 0..100 {
        settle().await;
        tokio::time::sleep(secs(1)).await;
        if h.status().await.is_ok_and(|s| s.operation.is_none()) {
            break;
        }
    }
    let history = h.history(5).await.unwrap();
    assert_eq!(
        (history[0].kind, history[0].status),
        (DeploymentKind::Config, nonstop_store::DeploymentStatus::RolledBack)
    );
    // Rolled back to v1 and its config; the change is not the
    // environment's config.
    assert_eq!(h.status().await.unwrap().release, 1);
    assert!(all_workers(&g, "GREETING", "one"));
    assert!(h.config().await.unwrap().config.is_empty());
}

/// Releases of config changes run the directory of the build they share:
/// a prune keeps that directory while any kept release uses it, even when
/// the release that built it is pruned.
#[tokio::test(start_paused = true)]
async fn a_prune_keeps_the_directory_of_a_build_that_kept_releases_share() {
    let f = Fixture::new();
    let e = f.start();
    let mut one = spec("one");
    one.release.retain_releases = 1;
    e.deploy_with_progress(one).await.0.unwrap();
    set(&e, &[("GREETING", "two")]).await.unwrap();
    set(&e, &[("GREETING", "three")]).await.unwrap();
    settle().await;
    let app = nonstop_core::AppName::new("blog").unwrap();
    let status = |id: u64| f.store.release(&app, ReleaseId(id)).unwrap().unwrap().status;
    assert_eq!(status(1), nonstop_store::ReleaseStatus::Pruned, "v1 is no rollback target any more");
    let keep = f.builder.prunes().last().cloned().unwrap_or_default();
    assert!(keep.contains(&ReleaseId(1)), "v1's directory runs v2 and v3: {keep:?}");
    assert!(all_workers(&f, "GREETING", "three"));
}

/// A deployed environment that is down starts again as it ran (`up`): a
/// config change waits for its next deploy or promote, and says so.
#[tokio::test(start_paused = true)]
async fn config_set_while_a_deployed_environment_is_down_says_what_applies_it() {
    let f = Fixture::new();
    let e = f.start();
    e.deploy_with_progress(spec("one")).await.0.unwrap();
    e.down().await.unwrap();
    settle().await;
    let r = set(&e, &[("GREETING", "two")]).await.unwrap();
    assert!(r.summary.contains("next `nonstop deploy` or `promote`") && r.summary.contains("v1"), "{}", r.summary);
    f.builder.set_hash("source-2");
    e.deploy_with_progress(spec("one")).await.0.unwrap();
    settle().await;
    assert!(all_workers(&f, "GREETING", "two"));
}

/// A worker reading the Redis list `celery`.
fn queued() -> AppSpec {
    app("blog")
        .worker("worker", 1)
        .with("worker", |p| p.queue = Some(nonstop_core::autoscale::QueueSource::RedisList("celery".into())))
        .build()
}

#[tokio::test(start_paused = true)]
async fn a_queue_needs_a_redis_url_from_somewhere_and_config_can_be_where() {
    let f = Fixture::new();
    let e = f.start();
    // No REDIS_URL anywhere: refused before anything is recorded.
    let (r, _) = e.deploy_with_progress(queued()).await;
    match r {
        Err(EngineError::Preflight { problems }) => {
            assert!(problems[0].contains("`queue` of worker") && problems[0].contains("no REDIS_URL"), "{problems:?}")
        }
        other => panic!("not refused: {other:?}"),
    }
    let app = nonstop_core::AppName::new("blog").unwrap();
    assert!(f.store.releases(&app).unwrap().is_empty(), "nothing recorded");
    assert!(f.driver.alive().is_empty());

    // In the environment's config (the file cannot see it): deployed, and
    // the queue is read where the worker's REDIS_URL points.
    set(&e, &[("REDIS_URL", "redis://127.0.0.1:6379/4")]).await.unwrap();
    e.deploy_with_progress(queued()).await.0.unwrap();
    settle().await;
    assert!(all_workers(&f, "REDIS_URL", "redis://127.0.0.1:6379/4"));
    let reads = blog(&e).queue_reads().await.unwrap();
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0].process, pn("worker"));
    match &reads[0].redis {
        nonstop_engine::QueueRedis::Url(url) => assert_eq!(url.expose(), "redis://127.0.0.1:6379/4"),
        other => panic!("{other:?}"),
    }

    // Taking it away would leave the queue without Redis: refused, the
    // config unchanged.
    let r = unset(&e, &["REDIS_URL"]).await;
    assert!(matches!(&r, Err(EngineError::Preflight { problems }) if problems[0].contains("no REDIS_URL")), "{r:?}");
    assert_eq!(blog(&e).config().await.unwrap().config["REDIS_URL"].value, "redis://127.0.0.1:6379/4");
    assert_eq!(f.store.releases(&app).unwrap().len(), 1, "no release recorded for it");
}
