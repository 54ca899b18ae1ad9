//! Secrets against the fakes: set before the app runs, given to every
//! instance and task (and to nothing the engine reports), taking effect at
//! the next deploy or restart, and a key that cannot be had stopping an
//! operation before anything starts or stops.

use crate::*;
use nonstop_core::process::AppSpec;
use nonstop_engine::{EngineError, EngineHandle, SecretsKeyConfig};
use nonstop_secrets::{SecretName, SecretValue};
use nonstop_store::Store;
use nonstop_testkit::spec::app;
use nonstop_testkit::{settle, within, Fixture, RunningEngine};
use std::path::Path;
use std::sync::Arc;

const TOKEN: &str = "tok-5f3a9c1e-never-shown";
const TOKEN_2: &str = "tok-2b7d44aa-second-value";

fn name(n: &str) -> SecretName {
    SecretName::new(n).unwrap()
}

fn value(v: &str) -> SecretValue {
    SecretValue::new(v.to_string()).unwrap()
}

/// The handle of app `blog` named explicitly (as the CLI names it).
fn blog(e: &RunningEngine) -> EngineHandle {
    e.env(Some("blog"), "default")
}

fn spec() -> AppSpec {
    app("blog").web("web", 1).worker("worker", 1).build()
}

fn fixture(home: &Path) -> Fixture {
    let mut f = Fixture::new();
    f.secrets = SecretsKeyConfig::new(home.to_path_buf(), None);
    f
}

/// The value of `var` in the environment the instance `id` was started with.
fn env_of(f: &Fixture, id: &nonstop_core::InstanceId, var: &str) -> Option<String> {
    f.driver.launch_of(id)?.env.into_iter().find(|(k, _)| k == var).map(|(_, v)| v)
}

/// The value of API_TOKEN in the newest start of `process`.
fn newest_token(f: &Fixture, process: &str) -> Option<String> {
    let starts = f.driver.starts_of(&pn(process));
    let last = starts.last()?;
    last.env.iter().find(|(k, _)| k == "API_TOKEN").map(|(_, v)| v.clone())
}

async fn restart(e: &RunningEngine) -> Result<nonstop_engine::OpReport, EngineError> {
    e.restart(None).await
}

#[tokio::test(start_paused = true)]
async fn a_secret_set_before_the_first_up_reaches_every_instance_and_task_and_no_report() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();

    // Before the app runs: the app named explicitly gets its secrets.
    let r = blog(&e).set_secret(name("API_TOKEN"), value(TOKEN), "ann@laptop".into()).await.unwrap();
    assert!(r.key_created, "{r:?}");
    assert_eq!(r.version, Some(1));
    assert!(r.summary.contains("next `nonstop deploy`"), "{r:?}");
    assert!(home.path().join("secrets.key").is_file());
    let listed = blog(&e).secrets().await.unwrap();
    assert_eq!(listed.secrets.len(), 1);
    assert_eq!((listed.secrets[0].name.as_str(), listed.secrets[0].set_by.as_str()), ("API_TOKEN", "ann@laptop"));

    e.up(spec().clone()).await.unwrap();
    for launch in f.driver.starts() {
        assert!(launch.env.contains(&("API_TOKEN".to_string(), TOKEN.to_string())), "{:?}", launch.instance);
    }
    assert_eq!(f.driver.starts().len(), 2);

    // A deploy's release task gets it too.
    f.builder.set_hash("source-2");
    let v2 = app("blog").web("web", 1).worker("worker", 1).env("V", "2").release_tasks(&["migrate"], secs(60)).build();
    let (r, progress) = e.deploy_with_progress(v2).await;
    r.unwrap();
    let task = f.driver.task_spec("release-1-1").unwrap();
    assert!(task.env.contains(&("API_TOKEN".to_string(), TOKEN.to_string())));
    assert_eq!(newest_token(&f, "web").as_deref(), Some(TOKEN));

    // Nothing the engine reports shows it.
    let reports = [
        serde_json::to_string(&e.status().await.unwrap()).unwrap(),
        serde_json::to_string(&e.handle.events(1000).await.unwrap()).unwrap(),
        serde_json::to_string(&e.handle.history(100).await.unwrap()).unwrap(),
        serde_json::to_string(&e.handle.releases().await.unwrap()).unwrap(),
        serde_json::to_string(&blog(&e).secrets().await.unwrap()).unwrap(),
        serde_json::to_string(&progress).unwrap(),
        serde_json::to_string(&r_summary(&e).await).unwrap(),
    ];
    for text in reports {
        assert!(!text.contains(TOKEN), "{text}");
    }
    // Nor the stored spec and app record.
    let rec = f.store.apps().unwrap();
    assert!(!serde_json::to_string(&rec[0].spec).unwrap().contains(TOKEN));
    assert!(!format!("{:?}", rec[0]).contains(TOKEN));
    e.shutdown().await;
}

async fn r_summary(e: &RunningEngine) -> String {
    let ctx = e.handle.run_context(None).await.unwrap();
    format!("{ctx:?}")
}

#[tokio::test(start_paused = true)]
async fn a_change_takes_effect_at_the_next_restart_or_deploy_not_before() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    blog(&e).set_secret(name("API_TOKEN"), value(TOKEN), "ann".into()).await.unwrap();
    let (r, _) = e.deploy_with_progress(spec()).await;
    r.unwrap();
    let r = blog(&e).set_secret(name("API_TOKEN"), value(TOKEN_2), "ann".into()).await.unwrap();
    assert_eq!(r.version, Some(2));
    assert!(!r.key_created);
    assert!(r.summary.ends_with("takes effect at the next `nonstop deploy` or `nonstop restart`"), "{r:?}");

    // A crashed worker comes back with what the others run.
    let worker = alive(&f, "worker")[0].clone();
    f.driver.exit(&worker, CRASH);
    f.driver.wait_for("the worker to come back", |d| d.starts_of(&pn("worker")).len() == 2).await;
    assert_eq!(newest_token(&f, "worker").as_deref(), Some(TOKEN));

    // A deploy of the same code and config is not "nothing to deploy".
    let (r, _) = e.deploy_with_progress(spec()).await;
    let r = r.unwrap();
    assert!(!r.summary.contains("nothing to deploy"), "{r:?}");
    assert_eq!(newest_token(&f, "web").as_deref(), Some(TOKEN_2));
    assert_eq!(newest_token(&f, "worker").as_deref(), Some(TOKEN_2));
    // ...and once rolled out, it is again.
    let (r, _) = e.deploy_with_progress(spec()).await;
    assert!(r.unwrap().summary.contains("nothing to deploy"));

    // Unset: gone at the next restart.
    let r = blog(&e).unset_secret(name("API_TOKEN"), "bob".into()).await.unwrap();
    assert_eq!(r.version, Some(3));
    restart(&e).await.unwrap();
    assert_eq!(newest_token(&f, "web"), None);
    let e2 = blog(&e).unset_secret(name("API_TOKEN"), "bob".into()).await.unwrap_err();
    assert!(matches!(e2, EngineError::UnknownSecret { .. }), "{e2}");
    assert_eq!(e2.exit_code(), 2);
    assert!(e2.to_string().contains("it has no secrets"), "{e2}");
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_key_stops_restart_and_deploy_before_anything_and_the_app_keeps_running() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    blog(&e).set_secret(name("API_TOKEN"), value(TOKEN), "ann".into()).await.unwrap();
    e.up(spec()).await.unwrap();
    let key = std::fs::read(home.path().join("secrets.key")).unwrap();
    std::fs::remove_file(home.path().join("secrets.key")).unwrap();
    let calls = f.driver.calls().len();
    let running = f.driver.alive();

    let err = restart(&e).await.unwrap_err();
    assert!(matches!(err, EngineError::Secrets { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("the secrets key is missing: restore"), "{msg}");
    assert!(msg.contains("NONSTOP_SECRETS_KEY is read from the daemon's own environment"), "{msg}");
    assert!(msg.ends_with("nothing was changed"), "{msg}");
    f.builder.set_hash("source-2");
    let (r, _) = e.deploy_with_progress(app("blog").web("web", 1).worker("worker", 1).env("V", "2").build()).await;
    assert!(matches!(r.unwrap_err(), EngineError::Secrets { .. }));
    assert!(f.builder.builds().is_empty(), "nothing was built");
    assert_eq!(f.driver.calls().len(), calls, "no start, no stop");
    assert_eq!(f.driver.alive(), running);
    // `set` does not make a new key either while secrets exist.
    let err = blog(&e).set_secret(name("OTHER"), value("other-value"), "ann".into()).await.unwrap_err();
    assert!(err.to_string().contains("the secrets key is missing"), "{err}");
    assert!(!home.path().join("secrets.key").exists());
    assert_eq!(blog(&e).secrets().await.unwrap().secrets.len(), 1);

    // The key back: everything works again.
    write_key(home.path(), &key);
    restart(&e).await.unwrap();
    assert_eq!(newest_token(&f, "web").as_deref(), Some(TOKEN));
    e.shutdown().await;
}

fn write_key(home: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(home.join("secrets.key"))
        .unwrap();
    file.write_all(bytes).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_wrong_key_is_named_and_changes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    blog(&e).set_secret(name("API_TOKEN"), value(TOKEN), "ann".into()).await.unwrap();
    e.up(spec()).await.unwrap();
    // Another valid key in the file.
    write_key(home.path(), b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n");
    let calls = f.driver.calls().len();
    let err = restart(&e).await.unwrap_err();
    assert!(err.to_string().contains("does not match the one these secrets were written with"), "{err}");
    let err = blog(&e).set_secret(name("API_TOKEN"), value(TOKEN_2), "ann".into()).await.unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert_eq!(blog(&e).secrets().await.unwrap().secrets[0].version, 1, "nothing written");
    assert_eq!(f.driver.calls().len(), calls);
    e.shutdown().await;

    // A malformed NONSTOP_SECRETS_KEY is named (never repeated).
    let mut f2 = f.next_daemon(f.store.clone());
    f2.secrets = SecretsKeyConfig::new(home.path().to_path_buf(), Some("not-a-key".into()));
    let e = f2.start();
    let err = restart(&e).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("NONSTOP_SECRETS_KEY is not a secrets key"), "{msg}");
    assert!(!msg.contains("not-a-key"), "{msg}");
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_daemon_that_cannot_read_the_secrets_starts_no_instance_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let mut f = Fixture::with_store(Store::open(&dir.path().join("state.db")).unwrap());
    f.secrets = SecretsKeyConfig::new(home.clone(), None);
    let e = f.start();
    blog(&e).set_secret(name("API_TOKEN"), value(TOKEN), "ann".into()).await.unwrap();
    e.up(spec()).await.unwrap();
    e.shutdown().await;
    let key = std::fs::read(home.join("secrets.key")).unwrap();
    std::fs::remove_file(home.join("secrets.key")).unwrap();

    // A new daemon re-adopts the instances; a crashed one is not started
    // without its secrets.
    let f2 = f.next_daemon(Arc::new(Store::open(&dir.path().join("state.db")).unwrap()));
    let e = f2.start();
    settle().await;
    let worker = alive(&f2, "worker")[0].clone();
    let starts = f2.driver.starts_of(&pn("worker")).len();
    f2.driver.exit(&worker, CRASH);
    within("the failed start to be reported", async {
        loop {
            let evs = e.handle.events(100).await.unwrap();
            if evs.iter().any(|ev| ev.kind == "start-failed") {
                let ev = evs.iter().find(|ev| ev.kind == "start-failed").unwrap();
                assert!(ev.message.contains("its secrets cannot be read: the secrets key is missing"), "{ev:?}");
                break;
            }
            tokio::time::sleep(ms(100)).await;
        }
    })
    .await;
    assert_eq!(f2.driver.starts_of(&pn("worker")).len(), starts, "the driver was never asked");
    assert_eq!(alive(&f2, "web").len(), 1, "web keeps running");

    // The key back: the next retry starts it, with its secret.
    write_key(&home, &key);
    f2.driver.wait_for("the worker to start", |d| d.alive_of(&pn("worker")).len() == 1).await;
    let id = alive(&f2, "worker")[0].clone();
    assert_eq!(env_of(&f2, &id, "API_TOKEN").as_deref(), Some(TOKEN));
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn task_output_that_shows_a_secret_is_redacted_everywhere_it_is_relayed() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    blog(&e).set_secret(name("API_TOKEN"), value(TOKEN), "ann".into()).await.unwrap();
    e.up(spec()).await.unwrap();
    f.builder.set_hash("source-2");
    f.driver.set_task_status(nonstop_core::driver::ExitStatus::Code(1));
    f.driver.set_task_echo(Some("API_TOKEN"));
    let v2 = app("blog").web("web", 1).worker("worker", 1).env("V", "2").release_tasks(&["migrate"], secs(60)).build();
    let (r, progress) = e.deploy_with_progress(v2).await;
    let err = r.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("API_TOKEN=[secret API_TOKEN]"), "{msg}");
    assert!(!msg.contains(TOKEN), "{msg}");
    let history = serde_json::to_string(&e.handle.history(10).await.unwrap()).unwrap();
    assert!(history.contains("[secret API_TOKEN]"), "{history}");
    for text in [
        history,
        serde_json::to_string(&progress).unwrap(),
        serde_json::to_string(&e.handle.events(100).await.unwrap()).unwrap(),
    ] {
        assert!(!text.contains(TOKEN), "{text}");
    }
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_engine_without_a_key_place_refuses_to_set() {
    let f = Fixture::new();
    let e = f.start();
    let err = blog(&e).set_secret(name("API_TOKEN"), value(TOKEN), "ann".into()).await.unwrap_err();
    assert!(err.to_string().contains("no secrets key configured"), "{err}");
    // An app without secrets needs no key.
    e.up(spec()).await.unwrap();
    restart(&e).await.unwrap();
    e.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn each_environment_has_its_own_secrets() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    let staging = e.env(Some("blog"), "staging");
    staging.set_secret(name("API_TOKEN"), value(TOKEN_2), "ann".into()).await.unwrap();
    blog(&e).set_secret(name("API_TOKEN"), value(TOKEN), "ann".into()).await.unwrap();
    let listed = staging.secrets().await.unwrap();
    assert_eq!((listed.environment.as_str(), listed.secrets.len()), ("staging", 1));
    e.up(spec()).await.unwrap();
    assert_eq!(newest_token(&f, "web").as_deref(), Some(TOKEN), "default gets default's");
    staging.unset_secret(name("API_TOKEN"), "ann".into()).await.unwrap();
    assert_eq!(blog(&e).secrets().await.unwrap().secrets.len(), 1, "default's is untouched");
    e.shutdown().await;
}

/// A queue worker whose only REDIS_URL is a secret: `secrets unset
/// REDIS_URL` is refused while it runs (its next start would have no
/// Redis), naming the fix; once config gives it one, the unset goes
/// through.
#[tokio::test(start_paused = true)]
async fn unsetting_the_redis_url_a_running_queue_needs_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let f = fixture(home.path());
    let e = f.start();
    let queued = app("blog")
        .worker("worker", 1)
        .with("worker", |p| p.queue = Some(nonstop_core::autoscale::QueueSource::RedisList("celery".into())))
        .build();
    blog(&e).set_secret(name("REDIS_URL"), value("redis://127.0.0.1:6379/5"), "ann".into()).await.unwrap();
    blog(&e).set_secret(name("API_TOKEN"), value(TOKEN), "ann".into()).await.unwrap();
    e.deploy_with_progress(queued).await.0.unwrap();
    settle().await;
    // Another secret goes as before.
    blog(&e).unset_secret(name("API_TOKEN"), "bob".into()).await.unwrap();
    let err = blog(&e).unset_secret(name("REDIS_URL"), "bob".into()).await.unwrap_err();
    assert!(matches!(err, EngineError::SecretInUse { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("`queue` of worker") && text.contains("nothing was changed"), "{text}");
    assert!(text.contains("secrets set REDIS_URL") && text.contains("[env] REDIS_URL"), "names the fix: {text}");
    assert!(!text.contains("redis://127.0.0.1:6379/5"), "the value is never shown: {text}");
    assert_eq!(err.exit_code(), 2);
    let listed = blog(&e).secrets().await.unwrap();
    assert!(listed.secrets.iter().any(|s| s.name == "REDIS_URL"), "still set: {listed:?}");
    // With REDIS_URL in nonstop.toml's [env], the secret is no longer the
    // only source.
    let with_env = app("blog")
        .worker("worker", 1)
        .env("REDIS_URL", "redis://127.0.0.1:6379/6")
        .with("worker", |p| p.queue = Some(nonstop_core::autoscale::QueueSource::RedisList("celery".into())))
        .build();
    e.deploy_with_progress(with_env).await.0.unwrap();
    blog(&e).unset_secret(name("REDIS_URL"), "bob".into()).await.unwrap();
}
