//! Base services on the fakes: each environment gets its own database, role
//! and Redis database before its release tasks run; the role's password
//! reaches processes, tasks and the gate only; a base that does not answer
//! stops the deploy before anything changes.

use super::*;
use nonstop_core::database::DatabaseUrl;
use nonstop_core::environment::{BaseSpec, RedisUrl};
use nonstop_core::process::AppSpec;
use nonstop_engine::{EngineError, EngineHandle, SecretsKeyConfig};
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, Fixture, RunningEngine};
use std::path::Path;

pub const ADMIN: &str = "postgres://admin:admin-pw-9f8e7d@db.test:5432/postgres";

pub fn base(redis: bool) -> BaseSpec {
    BaseSpec {
        postgres: Some(DatabaseUrl::parse(ADMIN).unwrap()),
        redis: redis.then(|| RedisUrl::parse("redis://cache.test:6379").unwrap()),
    }
}

/// App `blog` in `env` (its own host), a web and a worker, with release
/// tasks, `[base]`.
pub fn spec(env: &str, version: &str) -> AppSpec {
    let mut spec =
        app("blog").web("web", 1).worker("worker", 1).env("V", version).release_tasks(&["migrate"], secs(60)).build();
    spec.hosts = vec![format!("{env}.blog.localhost")];
    spec.default_host = false;
    spec.base = Some(base(true));
    spec
}

pub fn fixture(home: &Path) -> Fixture {
    let mut f = Fixture::new();
    f.secrets = SecretsKeyConfig::new(home.to_path_buf(), None);
    f
}

pub async fn deploy(e: &RunningEngine, env: &str, spec: AppSpec) -> Result<nonstop_engine::OpReport, EngineError> {
    e.spawn_deploy_in(&e.env(Some("blog"), env), spec).await.unwrap()
}

/// The value of `var` in the newest start of `process` in `env`.
pub fn var_of(f: &Fixture, env: &str, process: &str, var: &str) -> Option<String> {
    let starts = f.driver.starts_of(&pn(process));
    let last = starts.iter().rev().find(|l| l.environment.as_str() == env)?;
    last.env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
}

fn handle(e: &RunningEngine, env: &str) -> EngineHandle {
    e.env(Some("blog"), env)
}

#[tokio::test(start_paused = true)]
async fn each_environment_gets_its_own_database_role_and_redis_and_the_password_reaches_processes_only() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let r = handle(&e, "staging")
        .deploy(spec("staging", "1"), f.workdir.clone(), f.base_env.clone(), None, "ann".into(), tx)
        .await;
    r.unwrap();
    let mut progress = Vec::new();
    let mut rx = rx;
    while let Ok(p) = rx.try_recv() {
        progress.push(p.message);
    }
    assert!(progress.iter().any(|m| m.contains("database blog_staging (created)")), "{progress:#?}");

    // Asked once, before the build: the admin's server, a new password,
    // CREATEDB for the gate (the spec has release tasks).
    let requests = f.base.requests();
    assert_eq!(requests.len(), 1);
    let pg = requests[0].postgres.as_ref().unwrap();
    assert_eq!((pg.admin.expose(), pg.password.expose(), pg.create_db), (ADMIN, "generated-password-1", true));
    assert_eq!(f.builder.builds().len(), 1);

    let staging_url = "postgres://blog_staging:generated-password-1@db.test:5432/blog_staging";
    assert_eq!(var_of(&f, "staging", "web", "DATABASE_URL").as_deref(), Some(staging_url));
    assert_eq!(var_of(&f, "staging", "worker", "DATABASE_URL").as_deref(), Some(staging_url));
    assert_eq!(var_of(&f, "staging", "web", "REDIS_URL").as_deref(), Some("redis://cache.test:6379/1"));
    assert_eq!(var_of(&f, "staging", "web", "REDIS_KEY_PREFIX").as_deref(), Some("blog:staging:"));
    let task = f.driver.task_spec("release-1-1").expect("the release task ran");
    assert!(task.env.contains(&("DATABASE_URL".to_string(), staging_url.to_string())), "{:?}", task.env);

    // A second environment: its own database, role, password and number.
    deploy(&e, "production", spec("production", "1")).await.unwrap();
    assert_eq!(
        var_of(&f, "production", "web", "DATABASE_URL").as_deref(),
        Some("postgres://blog_production:generated-password-2@db.test:5432/blog_production")
    );
    assert_eq!(var_of(&f, "production", "web", "REDIS_URL").as_deref(), Some("redis://cache.test:6379/2"));
    assert_eq!(f.base.databases().len(), 2);

    // The stored spec has the URL without the password, and no [base];
    // nothing the engine reports shows a password.
    let records = f.store.apps().unwrap();
    for rec in &records {
        let db = rec.spec.database.as_ref().expect("the environment's database is the spec's");
        assert_eq!(db.url.password(), None, "{}", db.url);
        assert!(rec.spec.base.is_none());
        let text = serde_json::to_string(&rec.spec).unwrap();
        assert!(!text.contains("generated-password") && !text.contains("admin-pw"), "{text}");
    }
    let reports = [
        serde_json::to_string(&handle(&e, "staging").status().await.unwrap()).unwrap(),
        serde_json::to_string(&handle(&e, "staging").events(1000).await.unwrap()).unwrap(),
        serde_json::to_string(&handle(&e, "staging").history(10).await.unwrap()).unwrap(),
        serde_json::to_string(&handle(&e, "staging").secrets().await.unwrap()).unwrap(),
        serde_json::to_string(&progress).unwrap(),
    ];
    for text in reports {
        assert!(!text.contains("generated-password") && !text.contains("admin-pw"), "{text}");
        assert!(!text.contains("NONSTOP_BASE"), "base secrets are not listed: {text}");
    }

    // The next deploy keeps the password (generated once) and gates the
    // migration with it.
    f.builder.set_hash("source-2");
    deploy(&e, "staging", spec("staging", "2")).await.unwrap();
    let requests = f.base.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[2].postgres.as_ref().unwrap().password.expose(), "generated-password-1");
    assert_eq!(requests[2].redis.as_ref().unwrap().assigned, Some(1), "the Redis number is kept");
    let checks = f.schema_gate.checks();
    assert_eq!(checks.len(), 1, "the migration gate ran on the environment's database");
    assert_eq!(checks[0].database.url.expose(), staging_url);
    assert_eq!(var_of(&f, "staging", "web", "V").as_deref(), Some("2"));
    assert_eq!(var_of(&f, "staging", "web", "DATABASE_URL").as_deref(), Some(staging_url));

    // The same code and config again: nothing to deploy (the database is
    // made again the same way, the stored spec and secrets unchanged).
    let again = deploy(&e, "staging", spec("staging", "2")).await.unwrap();
    assert!(!again.changed && again.summary.contains("nothing to deploy"), "{again:?}");
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_base_that_does_not_answer_stops_the_deploy_before_anything_changes() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    f.base.set_unreachable(true);
    let err = deploy(&e, "staging", spec("staging", "1")).await.unwrap_err();
    assert!(!home.path().join("secrets.key").exists(), "no key was made for nothing");
    assert!(matches!(err, EngineError::Base { bad_input: true, .. }), "{err:?}");
    assert_eq!(err.exit_code(), 2);
    let text = err.to_string();
    assert!(text.contains("cannot reach the PostgreSQL server") && text.contains("before anything"), "{text}");
    assert!(f.builder.builds().is_empty(), "nothing was built");
    assert!(f.driver.starts().is_empty() && f.driver.task_starts().is_empty(), "nothing started");
    assert!(f.store.apps().unwrap().is_empty() && f.store.releases(&"blog".parse().unwrap()).unwrap().is_empty());
    assert!(f.ingress.listens().is_empty(), "the proxy was not touched");
    assert!(e.handle.environments().is_empty(), "no environment was left behind");

    // A running environment keeps running as it was.
    f.base.set_unreachable(false);
    deploy(&e, "staging", spec("staging", "1")).await.unwrap();
    let before = f.driver.alive();
    f.base.set_unreachable(true);
    f.builder.set_hash("source-2");
    let err = deploy(&e, "staging", spec("staging", "2")).await.unwrap_err();
    assert!(matches!(err, EngineError::Base { .. }), "{err:?}");
    settle().await;
    assert_eq!(f.driver.alive(), before, "no instance changed");
    assert_eq!(f.builder.builds().len(), 1, "nothing was built");
    assert_eq!(handle(&e, "staging").status().await.unwrap().release, 1);
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_explicit_database_is_used_as_it_is_and_up_provisions_too() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    // [database] of its own: no database is made, Redis still is.
    let mut own = spec("staging", "1");
    own.database = app("blog").database("postgres://blog@elsewhere.test/blog").build().database;
    deploy(&e, "staging", own).await.unwrap();
    let requests = f.base.requests();
    assert!(requests[0].postgres.is_none() && requests[0].redis.is_some(), "{requests:?}");
    assert_eq!(var_of(&f, "staging", "web", "DATABASE_URL").as_deref(), Some("postgres://blog@elsewhere.test/blog"));

    // `up` of a spec with [base] gets its database too.
    let mut up = spec("review", "1");
    up.base = Some(base(false));
    e.up_in(&handle(&e, "review"), up).await.unwrap();
    assert_eq!(
        var_of(&f, "review", "worker", "DATABASE_URL").as_deref(),
        Some("postgres://blog_review:generated-password-1@db.test:5432/blog_review")
    );
    assert_eq!(var_of(&f, "review", "worker", "REDIS_URL"), None, "no [base] redis: no REDIS_URL");
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn without_a_secrets_key_nothing_is_made() {
    let f = Fixture::new(); // no key configured
    let e = f.start();
    let err = deploy(&e, "staging", spec("staging", "1")).await.unwrap_err();
    assert!(matches!(err, EngineError::Secrets { .. }), "{err:?}");
    assert!(f.base.requests().is_empty(), "no server was asked to make anything");
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_promotion_gives_its_target_a_database_of_its_own_without_copying() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    deploy(&e, "staging", spec("staging", "1")).await.unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let request = nonstop_engine::PromoteRequest {
        from: nonstop_core::EnvironmentId::new("staging").unwrap(),
        spec: spec("production", "1"),
        base_env: f.base_env.clone(),
        message: None,
        who: "ann".into(),
    };
    handle(&e, "production").promote(request, tx).await.unwrap();
    assert_eq!(
        var_of(&f, "production", "web", "DATABASE_URL").as_deref(),
        Some("postgres://blog_production:generated-password-2@db.test:5432/blog_production")
    );
    assert!(f.base.copies().is_empty(), "a promotion copies no data");
    let rec = f.store.apps().unwrap().into_iter().find(|r| r.environment.as_str() == "production").unwrap();
    assert!(rec.spec.base.is_none() && rec.spec.database.as_ref().unwrap().url.password().is_none());
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn run_gets_what_processes_get_but_the_api_carries_no_secret() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    let staging = handle(&e, "staging");
    let token = "tok-run-9c1d22e0";
    staging
        .set_secret(
            nonstop_secrets::SecretName::new("API_TOKEN").unwrap(),
            nonstop_secrets::SecretValue::new(token.to_string()).unwrap(),
            "ann".into(),
        )
        .await
        .unwrap();
    deploy(&e, "staging", spec("staging", "1")).await.unwrap();

    // The run context: the plain variables, `[database]`'s without the
    // password; no secret.
    let ctx = staging.run_context(None).await.unwrap();
    assert_eq!((ctx.app.as_str(), ctx.environment.as_str()), ("blog", "staging"));
    let own = "postgres://blog_staging@db.test:5432/blog_staging";
    assert_eq!(ctx.env.get("DATABASE_URL").map(String::as_str), Some(own));
    assert_eq!(ctx.database.as_ref().map(|d| d.url.expose()), Some(own));
    assert_eq!(ctx.env.get("NONSTOP_PROCESS").map(String::as_str), Some("run"));
    let wire = serde_json::to_string(&ctx).unwrap();
    for hidden in [token, "generated-password-1", "NONSTOP_BASE"] {
        assert!(!wire.contains(hidden), "{hidden} in {wire}");
    }
    assert!(!ctx.env.contains_key("API_TOKEN") && !ctx.env.contains_key("REDIS_URL"), "{:?}", ctx.env);

    // What the client adds from the store with the key: exactly what the
    // instances got.
    let (app, env) =
        (nonstop_core::AppName::new("blog").unwrap(), nonstop_core::EnvironmentId::new("staging").unwrap());
    let secrets = nonstop_engine::EnvironmentSecrets::read(&f.store, &f.secrets, &app, &env).unwrap();
    assert_eq!(secrets.names().collect::<Vec<_>>(), ["API_TOKEN"], "the base services' are not secrets of their own");
    let mut vars = ctx.env.clone();
    secrets.add_to(&mut vars, ctx.database.as_ref());
    for var in ["API_TOKEN", "DATABASE_URL", "REDIS_URL", "REDIS_KEY_PREFIX"] {
        assert_eq!(vars.get(var), var_of(&f, "staging", "web", var).as_ref(), "{var}");
    }
    assert_eq!(vars["DATABASE_URL"], "postgres://blog_staging:generated-password-1@db.test:5432/blog_staging");
    assert_eq!(vars["API_TOKEN"], token);

    // Another key: refused before anything is decrypted, naming the fix.
    let other = tempfile::tempdir().unwrap();
    let key = nonstop_secrets::SecretsKey::generate().unwrap();
    let wrong = SecretsKeyConfig::new(other.path().to_path_buf(), Some(key.to_base64().to_string()));
    let err = nonstop_engine::EnvironmentSecrets::read(&f.store, &wrong, &app, &env).err().unwrap();
    assert!(matches!(err, nonstop_engine::SecretsReadError::Crypto(_)), "{err:?}");
    assert!(err.to_string().contains("does not match"), "{err}");
    // No key at all.
    let none = SecretsKeyConfig::new(other.path().to_path_buf(), None);
    let err = nonstop_engine::EnvironmentSecrets::read(&f.store, &none, &app, &env).err().unwrap();
    assert!(matches!(err, nonstop_engine::SecretsReadError::Key(_)), "{err:?}");
    assert!(err.to_string().contains("the secrets key is missing"), "{err}");
    e.shutdown().await;
}
