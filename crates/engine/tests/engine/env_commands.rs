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
    assert!(report.summary.contains("database blog_review kept"), "{}", report.summary);
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

    // Created again: the kept database is used again (not copied over).
    let (r, _) = e.create_env("review", spec("review", "1"), None).await;
    r.unwrap();
    assert_eq!(f.base.copies().len(), 1);
    assert_eq!(
        var_of(&f, "review", "web", "DATABASE_URL").as_deref(),
        Some("postgres://blog_review:generated-password-2@db.test:5432/blog_review"),
        "its password was kept with its history"
    );

    // --drop-database with the name: dropped.
    let report = e.destroy_env("blog", "review", Some("blog_review")).await.unwrap();
    assert!(report.summary.contains("database blog_review dropped"), "{}", report.summary);
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
