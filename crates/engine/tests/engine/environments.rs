//! Several environments of one app under one engine: one controller each.

use super::*;
use nonstop_engine::EngineError;
use nonstop_testkit::spec::app;
use nonstop_testkit::TaskRun;
use nonstop_testkit::{settle, within};

fn blog(v: &str) -> nonstop_core::process::AppSpec {
    app("blog").worker("worker", 2).env("V", v).build()
}

#[tokio::test(start_paused = true)]
async fn two_environments_run_side_by_side_and_one_never_waits_for_the_other() {
    let f = Fixture::new();
    let e = f.start();
    let (staging, production) = (e.env(None, "staging"), e.env(None, "production"));
    e.up_in(&staging, blog("1")).await.unwrap();
    e.up_in(&production, blog("1")).await.unwrap();
    let (s, p) = (staging.status().await.unwrap(), production.status().await.unwrap());
    assert_eq!((s.environment.as_str(), p.environment.as_str()), ("staging", "production"));
    assert_eq!((s.instances.len(), p.instances.len()), (2, 2));
    assert_eq!(f.driver.alive_of(&pn("worker")).len(), 4, "each environment runs its own instances");
    let listed: Vec<String> = e.handle.environments().iter().map(|s| s.to_string()).collect();
    assert_eq!(listed, ["blog/production", "blog/staging"]);

    // A deploy in staging held in its release task…
    f.driver.set_task_run(TaskRun::UntilEnded);
    f.builder.set_hash("source-2");
    let slow = app("blog").worker("worker", 2).env("V", "2").release_tasks(&["migrate"], secs(600)).build();
    let deploy = e.spawn_deploy_in(&staging, slow);
    f.driver.wait_for("the task", |d| d.tasks_alive().len() == 1).await;
    assert!(matches!(staging.scale(Default::default(), mpsc()).await, Err(EngineError::Busy { .. })));
    // …while production scales, and answers, at once.
    let counts = [(pn("worker"), 3)].into_iter().collect();
    within("production's scale", production.scale(counts, mpsc())).await.unwrap();
    assert_eq!(production.status().await.unwrap().instances.len(), 3);
    assert_eq!(staging.status().await.unwrap().instances.len(), 2);

    let name = f.driver.tasks_alive()[0].name.clone();
    assert!(f.driver.end_task(&name, nonstop_core::driver::ExitStatus::Code(0)));
    within("the deploy", deploy).await.unwrap().unwrap();
    settle().await;
    assert_eq!(staging.history(10).await.unwrap().len(), 1);
    assert_eq!(production.history(10).await.unwrap().len(), 0, "production was not deployed to");
    assert_eq!(production.status().await.unwrap().instances.len(), 3, "and kept its own count");
}

#[tokio::test(start_paused = true)]
async fn an_unknown_environment_is_named_with_the_known_ones() {
    let f = Fixture::new();
    let e = f.start();
    e.up_in(&e.env(None, "staging"), blog("1")).await.unwrap();
    let err = e.env(Some("blog"), "stagng").status().await.unwrap_err();
    assert!(
        matches!(&err, EngineError::UnknownEnvironment { env, known, .. } if env == "stagng" && known == &["staging"]),
        "{err:?}"
    );
    assert!(err.to_string().contains("has no environment `stagng`") && err.to_string().contains("staging"), "{err}");
    assert_eq!(err.exit_code(), 2);
    // Nothing was created by asking.
    assert_eq!(e.handle.environments().len(), 1);
    // The environment's one app is found without naming it.
    assert_eq!(e.env(None, "staging").status().await.unwrap().app, "blog");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_engine_brings_back_every_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let f = Fixture::with_store(nonstop_store::Store::open(&path).unwrap());
    let e = f.start();
    e.up_in(&e.env(None, "staging"), blog("1")).await.unwrap();
    e.up_in(&e.env(None, "production"), blog("1")).await.unwrap();
    let before = f.driver.alive_of(&pn("worker"));
    e.shutdown().await;

    let g = f.next_daemon(std::sync::Arc::new(nonstop_store::Store::open(&path).unwrap()));
    let e2 = g.start();
    for env in ["staging", "production"] {
        let st = e2.env(None, env).status().await.unwrap();
        assert_eq!(st.instances.len(), 2, "{env}: {st:#?}");
    }
    assert_eq!(f.driver.alive_of(&pn("worker")), before, "re-adopted, none restarted");
}

fn mpsc() -> tokio::sync::mpsc::UnboundedSender<nonstop_engine::Progress> {
    tokio::sync::mpsc::unbounded_channel().0
}

fn site(env: &str, hosts: &[&str], default_host: bool) -> nonstop_core::process::AppSpec {
    let mut spec = app("blog").web("web", 1).env("ENV", env).build();
    spec.hosts = hosts.iter().map(|h| h.to_string()).collect();
    spec.default_host = default_host;
    spec
}

#[tokio::test(start_paused = true)]
async fn each_environment_claims_its_hosts_and_a_taken_host_is_refused_before_anything_starts() {
    let f = Fixture::new();
    let e = f.start();
    e.up_in(&e.env(None, "production"), site("production", &["blog.test"], true)).await.unwrap();
    e.up_in(&e.env(None, "staging"), site("staging", &["staging.blog.test"], false)).await.unwrap();
    let claims = f.ingress.claims();
    let route = |env: &str| nonstop_core::traffic::RouteKey(format!("blog/{env}"));
    assert_eq!(claims.default_route(), Some(&route("production")));
    assert_eq!(claims.owner("staging.blog.test"), Some(&route("staging")));
    assert_eq!(claims.owner("blog.test"), Some(&route("production")));
    // Two web instances, one per environment, with distinct ids.
    let web = f.driver.alive_of(&pn("web"));
    assert_eq!(web.len(), 2);
    assert_ne!(web[0], web[1]);

    // A third environment that wants staging's host: refused, nothing runs.
    let err = e.up_in(&e.env(None, "review"), site("review", &["staging.blog.test"], false)).await.unwrap_err();
    assert!(matches!(&err, EngineError::HostConflict { reason } if reason.contains("staging")), "{err}");
    assert_eq!(f.driver.alive_of(&pn("web")).len(), 2, "nothing started for the refused environment");
    let listed: Vec<String> = e.handle.environments().iter().map(|s| s.to_string()).collect();
    assert_eq!(listed, ["blog/production", "blog/staging"], "and it left nothing behind");

    // Down in staging releases its hosts; production keeps serving.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    e.env(None, "staging").down(tx).await.unwrap();
    let claims = f.ingress.claims();
    assert_eq!(claims.owner("staging.blog.test"), None);
    assert_eq!(claims.default_route(), Some(&route("production")));
    assert_eq!(e.env(None, "production").status().await.unwrap().instances.len(), 1);
}

/// Releases belong to the app: one environment's deploys never prune the
/// release another runs.
#[tokio::test(start_paused = true)]
async fn a_deploy_in_one_environment_never_prunes_the_release_another_runs() {
    let f = Fixture::new();
    let e = f.start();
    let keep_one = |v: &str| {
        let mut spec = blog(v);
        spec.release.retain_releases = 1;
        spec
    };
    let (production, staging) = (e.env(None, "production"), e.env(None, "staging"));
    f.builder.set_hash("source-1");
    within("production's deploy", e.spawn_deploy_in(&production, keep_one("1"))).await.unwrap().unwrap();
    for n in 2..=4 {
        f.builder.set_hash(&format!("source-{n}"));
        within("staging's deploy", e.spawn_deploy_in(&staging, keep_one(&n.to_string()))).await.unwrap().unwrap();
    }
    let app = nonstop_core::AppName::new("blog").unwrap();
    let status =
        |id: u64| f.store.releases(&app).unwrap().into_iter().find(|r| r.id.0 == id).map(|r| r.status).unwrap();
    use nonstop_store::ReleaseStatus::{Pruned, Ready};
    assert_eq!(status(1), Ready, "production runs v1");
    assert_eq!(status(2), Pruned);
    assert_eq!((status(3), status(4)), (Ready, Ready), "staging's current and previous");
    assert_eq!(production.status().await.unwrap().release, 1);
}
