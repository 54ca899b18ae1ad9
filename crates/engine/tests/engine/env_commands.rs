//! `env create` and `env destroy` on the fakes.

use super::base_services::{base, deploy, fixture, spec, var_of};
use super::*;
use nonstop_core::traffic::RouteKey;
use nonstop_engine::EngineError;
use nonstop_testkit::{settle, HostsCall};

fn listed(e: &nonstop_testkit::RunningEngine) -> Vec<String> {
    e.handle.environments().iter().map(|s| s.to_string()).collect()
}

#[tokio::test(start_paused = true)]
async fn create_deploys_a_new_environment_and_refuses_an_existing_one() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    let (r, progress) = e.create_env("review", spec("review", "1"), None).await;
    r.unwrap();
    assert!(progress.iter().any(|p| p.message.contains("creating environment review")), "{progress:#?}");
    let st = e.env(Some("blog"), "review").status().await.unwrap();
    assert_eq!((st.release, st.instances.len()), (1, 2));
    assert_eq!(listed(&e), ["blog/review"]);
    assert!(f.base.databases().contains_key("blog_review"));

    let (err, _) = e.create_env("review", spec("review", "1"), None).await;
    let err = err.unwrap_err();
    assert!(matches!(&err, EngineError::EnvironmentExists { detail, .. } if detail.contains("running v1")), "{err}");
    assert_eq!(err.exit_code(), 3);
    assert_eq!(f.builder.builds().len(), 1, "nothing was built for the refused one");
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn create_from_runs_the_same_release_with_its_own_config_and_a_copy_of_the_database() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    deploy(&e, "staging", spec("staging", "1")).await.unwrap();
    // The app directory moved on since: --from does not build it.
    f.builder.set_hash("source-2");
    let mut review = spec("review", "2-in-the-directory");
    review.processes[0].count = 2;
    let (r, progress) = e.create_env("review", review, Some("staging")).await;
    r.unwrap();
    assert_eq!(f.builder.builds().len(), 1, "not built again");
    let st = e.env(Some("blog"), "review").status().await.unwrap();
    assert_eq!(st.release, 1, "the release staging runs");
    assert_eq!(st.hosts, ["review.blog.localhost"]);
    assert_eq!(f.base.copies(), [("blog_staging".to_string(), "blog_review".to_string())]);
    assert!(
        progress.iter().any(|p| p.message.contains("copied database blog_staging into blog_review")),
        "{progress:#?}"
    );
    // Its own config (variables, counts), the release's commands.
    assert_eq!(var_of(&f, "review", "web", "V").as_deref(), Some("2-in-the-directory"));
    let web = f.driver.starts_of(&pn("web"));
    assert_eq!(web.iter().filter(|l| l.environment.as_str() == "review").count(), 2);
    assert_eq!(
        var_of(&f, "review", "web", "DATABASE_URL").as_deref(),
        Some("postgres://blog_review:generated-password-2@db.test:5432/blog_review")
    );
    // The release tasks ran again, on the copy.
    assert_eq!(f.driver.task_starts(), ["release-1-1", "release-1-1"]);
    let task = f.driver.task_spec("release-1-1").unwrap();
    assert_eq!(task.environment.as_str(), "review");
    assert!(task.env.iter().any(|(k, v)| k == "DATABASE_URL" && v.ends_with("@db.test:5432/blog_review")));
    let hist = e.env(Some("blog"), "review").history(10).await.unwrap();
    assert_eq!(hist.len(), 1);

    // From an environment that runs nothing: refused, nothing left behind.
    let (err, _) = e.create_env("qa", spec("qa", "1"), Some("nowhere")).await;
    assert!(matches!(err, Err(EngineError::UnknownEnvironment { .. })), "{err:?}");
    // With a nonstop.toml whose commands changed since staging's build:
    // refused before anything is made (promote's rule).
    let mut changed = spec("qa", "1");
    changed.processes[0].command = "a command the release was not built with".into();
    let (err, _) = e.create_env("qa", changed, Some("staging")).await;
    assert!(matches!(err, Err(EngineError::CannotPromote { .. })), "{err:?}");
    assert!(!f.base.databases().contains_key("blog_qa"), "no database was made");
    assert_eq!(listed(&e), ["blog/review", "blog/staging"]);
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn destroy_stops_everything_releases_the_hosts_and_keeps_the_database_and_history() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    deploy(&e, "staging", spec("staging", "1")).await.unwrap();
    e.create_env("review", spec("review", "1"), Some("staging")).await.0.unwrap();
    let review_ids: Vec<_> =
        f.driver.starts().into_iter().filter(|l| l.environment.as_str() == "review").map(|l| l.instance).collect();
    let staging_before: Vec<_> = f.driver.alive().into_iter().filter(|id| !review_ids.contains(id)).collect::<Vec<_>>();

    // A wrong confirmation changes nothing.
    let err = e.destroy_env("blog", "review", Some("blog_staging")).await.unwrap_err();
    assert!(matches!(&err, EngineError::DropNotConfirmed { database, .. } if database == "blog_review"), "{err}");
    assert_eq!(err.exit_code(), 2);
    assert!(review_ids.iter().all(|id| f.driver.is_instance_alive(id)));

    let report = e.destroy_env("blog", "review", None).await.unwrap();
    assert!(report.summary.contains("2 instance(s) stopped"), "{}", report.summary);
    assert!(report.summary.contains("its secrets and config removed"), "{}", report.summary);
    assert!(report.summary.contains("database blog_review kept"), "{}", report.summary);
    assert!(
        report.summary.contains("Redis database 2 on cache.test:6379 kept with its data, reserved for `review`"),
        "{}",
        report.summary
    );
    settle().await;
    assert!(review_ids.iter().all(|id| !f.driver.is_instance_alive(id)), "every instance stopped");
    assert_eq!(f.driver.alive(), staging_before, "staging runs on untouched");
    assert!(f.ingress.host_calls().contains(&HostsCall::Remove { route: RouteKey("blog/review".into()) }));
    assert_eq!(f.ingress.claims().owner("review.blog.localhost"), None);
    assert_eq!(listed(&e), ["blog/staging"], "the dispatcher forgot it");
    let err = e.env(Some("blog"), "review").status().await.unwrap_err();
    assert!(matches!(err, EngineError::UnknownEnvironment { .. }), "{err:?}");
    // The store would not bring it back; its history and database stay.
    assert!(f.store.apps().unwrap().iter().all(|r| r.environment.as_str() != "review"));
    let review = nonstop_core::EnvironmentId::new("review").unwrap();
    assert_eq!(f.store.deployments(&"blog".parse().unwrap(), &review, 10).unwrap().len(), 1);
    assert!(f.base.databases().contains_key("blog_review"));
    assert!(f.base.drops().is_empty());

    // Created again: the kept database is used again (not copied over),
    // its role with a new password (the old one went with its secrets),
    // and its Redis number, kept for the name.
    let (r, _) = e.create_env("review", spec("review", "1"), None).await;
    r.unwrap();
    assert_eq!(f.base.copies().len(), 1);
    assert_eq!(
        var_of(&f, "review", "web", "DATABASE_URL").as_deref(),
        Some("postgres://blog_review:generated-password-3@db.test:5432/blog_review"),
    );
    assert_eq!(f.base.databases()["blog_review"], "generated-password-3", "the role's password was reset");
    assert_eq!(var_of(&f, "review", "web", "REDIS_URL").as_deref(), Some("redis://cache.test:6379/2"));

    // --drop-database with the name: dropped, and its Redis database
    // emptied and freed.
    let report = e.destroy_env("blog", "review", Some("blog_review")).await.unwrap();
    assert!(report.summary.contains("database blog_review dropped"), "{}", report.summary);
    assert!(report.summary.contains("Redis database 2 on cache.test:6379 emptied"), "{}", report.summary);
    assert!(!f.base.databases().contains_key("blog_review"));
    assert_eq!(listed(&e), ["blog/staging"]);

    // A create of that name that fails leaves nothing listed, although the
    // history of the one destroyed is there.
    f.base.set_unreachable(true);
    let (err, _) = e.create_env("review", spec("review", "1"), None).await;
    assert!(matches!(err, Err(EngineError::Base { .. })), "{err:?}");
    assert_eq!(listed(&e), ["blog/staging"]);
    f.base.set_unreachable(false);
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_protected_environment_is_refused_and_a_failed_create_leaves_nothing() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    let mut production = spec("production", "1");
    production.protected = true;
    deploy(&e, "production", production).await.unwrap();
    let before = f.driver.alive();
    let err = e.destroy_env("blog", "production", Some("blog_production")).await.unwrap_err();
    assert!(matches!(err, EngineError::Protected { .. }), "{err:?}");
    assert!(err.to_string().contains("protected = true"), "{err}");
    assert_eq!(err.exit_code(), 2);
    settle().await;
    assert_eq!(f.driver.alive(), before, "nothing was stopped");
    assert!(f.base.drops().is_empty() && f.base.databases().contains_key("blog_production"));

    // A create whose base does not answer: nothing started, not listed.
    f.base.set_unreachable(true);
    let mut broken = spec("broken", "1");
    broken.base = Some(base(false));
    let (err, _) = e.create_env("broken", broken, None).await;
    assert!(matches!(err, Err(EngineError::Base { bad_input: true, .. })), "{err:?}");
    assert_eq!(listed(&e), ["blog/production"]);
    assert_eq!(f.driver.alive(), before);
    e.shutdown().await;
}

fn review_id() -> (nonstop_core::AppName, nonstop_core::EnvironmentId) {
    (nonstop_core::AppName::new("blog").unwrap(), nonstop_core::EnvironmentId::new("review").unwrap())
}

fn secret(n: &str, v: &str) -> (nonstop_secrets::SecretName, nonstop_secrets::SecretValue) {
    (nonstop_secrets::SecretName::new(n).unwrap(), nonstop_secrets::SecretValue::new(v.to_string()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_destroyed_environments_secrets_and_config_do_not_come_back_with_its_name() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    let (app, review) = review_id();
    e.create_env("review", spec("review", "1"), None).await.0.unwrap();
    let handle = e.env(Some("blog"), "review");
    let (n, v) = secret("API_TOKEN", "tok-review-4d2e9f");
    handle.set_secret(n, v, "ann".into()).await.unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let set = nonstop_core::config::parse_assignments(&["GREETING=from-config".to_string()]).unwrap();
    handle.set_config(set, false, "ann".into(), tx).await.unwrap();
    assert_eq!(var_of(&f, "review", "web", "API_TOKEN").as_deref(), Some("tok-review-4d2e9f"));
    assert_eq!(var_of(&f, "review", "web", "GREETING").as_deref(), Some("from-config"));
    assert_eq!(f.store.redis_assignment("cache.test:6379", &app, &review).unwrap(), Some(1));

    let report = e.destroy_env("blog", "review", None).await.unwrap();
    assert!(report.summary.contains("its secrets and config removed"), "{}", report.summary);
    assert!(f.store.current_secrets(&app, &review).unwrap().is_empty(), "no ciphertext is left");
    assert!(f.store.config(&app, &review).unwrap().is_empty());
    assert_eq!(f.store.pending_destroy(&app, &review).unwrap(), None);
    assert_eq!(
        f.store.redis_assignment("cache.test:6379", &app, &review).unwrap(),
        Some(1),
        "its Redis number stays reserved for the name (its data is kept)"
    );
    assert!(f.base.flushes().is_empty());
    // Another environment does not get that number meanwhile.
    deploy(&e, "qa", spec("qa", "1")).await.unwrap();
    assert_eq!(var_of(&f, "qa", "web", "REDIS_URL").as_deref(), Some("redis://cache.test:6379/2"));

    // Created again: neither comes back; the Redis number does.
    e.create_env("review", spec("review", "1"), None).await.0.unwrap();
    assert_eq!(var_of(&f, "review", "web", "API_TOKEN"), None);
    assert_eq!(var_of(&f, "review", "web", "GREETING"), None);
    assert_eq!(var_of(&f, "review", "web", "REDIS_URL").as_deref(), Some("redis://cache.test:6379/1"));
    assert!(handle.secrets().await.unwrap().secrets.is_empty());
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn drop_database_empties_the_redis_database_and_frees_its_number() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    let (app, review) = review_id();
    e.create_env("review", spec("review", "1"), None).await.0.unwrap();
    deploy(&e, "staging", spec("staging", "1")).await.unwrap();
    f.base.redis_set("cache.test:6379", 1, "blog:review:session", "x");
    f.base.redis_set("cache.test:6379", 2, "blog:staging:session", "y");

    let report = e.destroy_env("blog", "review", Some("blog_review")).await.unwrap();
    assert!(
        report.summary.contains("Redis database 1 on cache.test:6379 emptied (1 keys) and freed"),
        "{}",
        report.summary
    );
    assert_eq!(f.base.flushes(), [("cache.test:6379".to_string(), 1, app.clone(), review.clone())]);
    assert!(f.base.redis_keys("cache.test:6379", 1).is_empty());
    assert_eq!(f.base.redis_keys("cache.test:6379", 2), ["blog:staging:session"], "staging's are untouched");
    assert_eq!(f.store.redis_assignment("cache.test:6379", &app, &review).unwrap(), None);
    assert_eq!(f.store.redis_numbers_taken("cache.test:6379").unwrap(), [2]);
    // A later environment gets the number.
    e.create_env("qa", spec("qa", "1"), None).await.0.unwrap();
    assert_eq!(var_of(&f, "qa", "web", "REDIS_URL").as_deref(), Some("redis://cache.test:6379/1"));
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_destroy_that_failed_half_way_is_finished_by_the_next_and_holds_the_environment_meanwhile() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    let (app, review) = review_id();
    e.create_env("review", spec("review", "1"), None).await.0.unwrap();
    let (n, v) = secret("API_TOKEN", "tok-review-77aa01");
    e.env(Some("blog"), "review").set_secret(n, v, "ann".into()).await.unwrap();

    // The database is dropped, then the Redis server does not answer.
    f.base.set_redis_unreachable(true);
    let err = e.destroy_env("blog", "review", Some("blog_review")).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngineError::Base { .. }), "{err:?}");
    assert!(text.contains("removing its Redis data failed"), "{text}");
    assert!(text.contains("run `nonstop env destroy review` again"), "{text}");
    assert!(!f.base.databases().contains_key("blog_review"), "the database was dropped");
    // Recorded: nothing is forgotten yet, the number not freed.
    let pending = f.store.pending_destroy(&app, &review).unwrap().expect("the destroy is recorded");
    assert!(pending.drop_data && pending.who == "test", "{pending:?}");
    assert!(f.store.current_secrets(&app, &review).unwrap().iter().any(|s| s.name == "API_TOKEN"));
    assert_eq!(f.store.redis_assignment("cache.test:6379", &app, &review).unwrap(), Some(1));
    assert_eq!(listed(&e), ["blog/review"]);

    // Meanwhile nothing else happens there.
    let err = deploy(&e, "review", spec("review", "2")).await.unwrap_err();
    assert!(matches!(&err, EngineError::Destroying { drop_data: true, .. }), "{err:?}");
    assert_eq!(err.exit_code(), 3);
    assert!(err.to_string().contains("finish it with `nonstop env destroy review`"), "{err}");
    let (err, _) = e.create_env("review", spec("review", "1"), None).await;
    assert!(matches!(err, Err(EngineError::Destroying { .. })), "{err:?}");
    // A destroy without [base] cannot finish the drop it began: refused.
    let (err, _) = e.destroy_env_with("blog", "review", None, Default::default()).await;
    let err = err.unwrap_err();
    assert!(err.to_string().contains("drops the environment's database and Redis data"), "{err}");
    assert_eq!(err.exit_code(), 2);

    // A daemon that starts meanwhile knows it too; the next destroy
    // (without --drop-database) finishes it: the drop confirmed before
    // goes on.
    e.shutdown().await;
    let f = f.next_daemon(f.store.clone());
    let e = f.start();
    assert_eq!(listed(&e), ["blog/review"]);
    let err = deploy(&e, "review", spec("review", "2")).await.unwrap_err();
    assert!(matches!(&err, EngineError::Destroying { .. }), "{err:?}");
    f.base.set_redis_unreachable(false);
    f.base.redis_set("cache.test:6379", 1, "blog:review:left", "x");
    let (report, progress) = e.destroy_env_with("blog", "review", None, base(true)).await;
    let report = report.unwrap();
    assert!(
        progress.iter().any(|p| p.message.contains("finishing the destroy test began at")
            && p.message.contains("(with --drop-database)")),
        "{progress:#?}"
    );
    assert!(report.summary.contains("database blog_review was not there"), "{}", report.summary);
    assert!(report.summary.contains("Redis database 1 on cache.test:6379 emptied"), "{}", report.summary);
    assert!(f.base.redis_keys("cache.test:6379", 1).is_empty());
    assert_eq!(f.store.redis_assignment("cache.test:6379", &app, &review).unwrap(), None);
    assert_eq!(f.store.pending_destroy(&app, &review).unwrap(), None);
    assert!(f.store.current_secrets(&app, &review).unwrap().is_empty());
    assert!(listed(&e).is_empty());
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_destroy_left_unfinished_of_an_environment_without_a_record_gets_a_controller_to_finish_it() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    // As a daemon that died in the middle of destroying an environment
    // that had no app record left.
    let (app, ghost) =
        (nonstop_core::AppName::new("blog").unwrap(), nonstop_core::EnvironmentId::new("ghost").unwrap());
    f.store.begin_destroy(&app, &ghost, true, "ann", std::time::SystemTime::now()).unwrap();
    let e = f.start();
    assert_eq!(listed(&e), ["blog/ghost"]);
    let (err, _) = e.create_env("ghost", spec("ghost", "1"), None).await;
    assert!(matches!(err, Err(EngineError::Destroying { .. })), "{err:?}");
    assert_eq!(listed(&e), ["blog/ghost"], "a refused create does not forget it");
    let report = e.destroy_env("blog", "ghost", None).await.unwrap();
    assert!(report.summary.contains("0 instance(s) stopped"), "{}", report.summary);
    assert_eq!(f.base.drops(), [(app.clone(), ghost.clone())], "the confirmed drop went on");
    assert_eq!(f.store.pending_destroy(&app, &ghost).unwrap(), None);
    assert!(listed(&e).is_empty());
    e.create_env("ghost", spec("ghost", "1"), None).await.0.unwrap();
    e.shutdown().await;
}
