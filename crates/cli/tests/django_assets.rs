//! Every page finds its assets: the Django example (gunicorn, celery worker
//! and beat, PostgreSQL, Redis, `ManifestStaticFilesStorage`, `[static]`)
//! deployed by the real daemon, under load from threads that GET pages and,
//! for each page, every `/static/...` it references, through a rolling
//! deploy of a release whose CSS changed and a rollback.
//!
//! Needs the example's Python packages, PostgreSQL on 127.0.0.1:5432 and
//! Redis on 127.0.0.1:6379 (`./scripts/setup` installs and starts them);
//! without them it fails saying so. It uses its own database (dropped at
//! the end), Redis database 13 and Celery queue.

mod common;

use common::django::*;
use common::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(180);
const DEPLOY: Duration = Duration::from_secs(300);
const REDIS_DB: u32 = 13;

/// Runs a statement on the local PostgreSQL's `postgres` database.
fn psql(sql: &str) -> Result<(), String> {
    let script = "import sys, psycopg\n\
                  with psycopg.connect('postgres://postgres@127.0.0.1:5432/postgres', autocommit=True, connect_timeout=5) as c:\n    c.execute(sys.argv[1])";
    let out = Command::new("python3").args(["-c", script, sql]).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The test's database, dropped when the test ends (pass or fail).
struct Database(String);

impl Drop for Database {
    fn drop(&mut self) {
        if let Err(e) = psql(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.0)) {
            eprintln!("could not drop the test database {}: {e}", self.0);
        }
    }
}

/// The Django example on its own database, Redis database and queue;
/// `release N` writes a stylesheet and an APP_VERSION of its own.
fn django(db: &str) -> TestApp {
    let app = TestApp::new("django", |s| s);
    // `[database]`: nonstop fills DATABASE_URL for every process and task.
    let mut spec =
        set_in_section(&app.spec(), "database", "url", &format!("\"postgres://postgres@127.0.0.1:5432/{db}\""));
    for (key, value) in
        [("REDIS_URL", format!("redis://127.0.0.1:6379/{REDIS_DB}")), ("CELERY_QUEUE", format!("notes-{db}"))]
    {
        spec = set_in_section(&spec, "env", key, &format!("\"{value}\""));
    }
    app.write_spec(&spec);
    app
}

/// What release `n` changes: its version and its stylesheet, so that its
/// `app.<hash>.css` differs from every other release's.
fn release(app: &TestApp, n: u32) {
    app.write_spec(&set_in_section(&app.spec(), "env", "APP_VERSION", &format!("\"{n}\"")));
    let css = app.dir.path().join("notes/static/notes/app.css");
    let base = std::fs::read_to_string(repo_root().join("examples/django/notes/static/notes/app.css")).unwrap();
    std::fs::write(css, format!("{base}/* release {n} */\nbody {{ --release: {n}; }}\n")).unwrap();
}

/// The assets a page of `version` references (fetched now).
fn current_assets(app: &TestApp, version: &str) -> Vec<String> {
    let (code, _, page) = fetch(app.proxy(), "/").unwrap();
    assert_eq!(code, 200, "{page}");
    assert_eq!(page_version(&page).as_deref(), Some(version), "{page}");
    asset_refs(&page)
}

fn css_of(assets: &[String]) -> String {
    assets.iter().find(|a| a.ends_with(".css")).cloned().unwrap_or_else(|| panic!("no stylesheet in {assets:?}"))
}

#[test]
fn every_page_finds_its_assets_through_a_rolling_deploy_and_a_rollback() {
    require_services();
    let db = Database(format!("nonstop_assets_test_{}", std::process::id()));
    // The migration gate reads the database before the release tasks run,
    // on the first deploy too: it must exist (the example's README says so).
    psql(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", db.0)).unwrap();
    psql(&format!("CREATE DATABASE \"{}\"", db.0)).unwrap();
    let app = django(&db.0);

    // v1.
    release(&app, 1);
    let r = app.run_with_timeout(&["deploy", "-m", "v1"], DEPLOY);
    assert_eq!(r.code, 0, "first deploy:\n{}\n{}\n{}", r.stdout, r.stderr, app.log());
    let v1 = current_assets(&app, "1");
    assert!(v1.iter().any(|a| a.ends_with(".css")) && v1.iter().any(|a| a.ends_with(".js")), "{v1:?}");
    for url in &v1 {
        let (code, head, _) = fetch(app.proxy(), url).unwrap();
        assert_eq!(code, 200, "{url}: {head}");
        // Django's manifest names carry the hash: served as immutable, by the proxy.
        assert!(head.contains("cache-control: public, max-age=31536000, immutable"), "{url}: {head}");
    }
    // A missing asset: 404, never cached.
    let (code, head, _) = fetch(app.proxy(), "/static/notes/app.0123456789ab.css").unwrap();
    assert_eq!(code, 404, "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    let (_, _, unhashed_v1) = fetch(app.proxy(), "/static/notes/app.css").unwrap();
    assert!(unhashed_v1.contains("release 1"), "{unhashed_v1}");

    // v2, whose CSS changed, rolled out under load.
    release(&app, 2);
    let load = PageLoad::start(app.proxy(), 3);
    wait_until(T, "pages of v1 under load", || load.pages_of("1") > 0);
    let r = app.run_with_timeout(&["deploy", "-m", "v2: new css"], DEPLOY);
    assert_eq!(r.code, 0, "deploy of v2:\n{}\n{}", r.stdout, r.stderr);
    wait_until(T, "pages of v2 under load", || load.pages_of("2") > 0);
    let seen = load.finish();
    eprintln!("deploy: pages {:?}, {} asset requests", seen.pages, seen.asset_requests);
    assert_clean("during the rolling deploy of v2", &seen);
    let v2 = current_assets(&app, "2");
    assert_ne!(css_of(&v1), css_of(&v2), "v2's stylesheet has a new hashed name");
    assert!(seen.assets["1"].contains(&css_of(&v1)) && seen.assets["2"].contains(&css_of(&v2)), "{:?}", seen.assets);
    // After the rollout, v1 (retained) keeps its hashed assets served.
    for url in v1.iter().chain(&v2) {
        let (code, head, _) = fetch(app.proxy(), url).unwrap();
        assert_eq!(code, 200, "{url} after the rollout: {head}");
    }
    let (_, _, unhashed) = fetch(app.proxy(), "/static/notes/app.css").unwrap();
    assert!(unhashed.contains("release 2"), "the running v2's unhashed app.css: {unhashed}");

    // Rollback to v1 under load: pages now rendered by v1 find theirs, and
    // v2's (still retained, it went live) stay served.
    let load = PageLoad::start(app.proxy(), 3);
    wait_until(T, "pages of v2 under load", || load.pages_of("2") > 0);
    let r = app.run_with_timeout(&["rollback"], DEPLOY);
    assert_eq!(r.code, 0, "rollback:\n{}\n{}", r.stdout, r.stderr);
    wait_until(T, "pages of v1 under load", || load.pages_of("1") > 0);
    let seen = load.finish();
    eprintln!("rollback: pages {:?}, {} asset requests", seen.pages, seen.asset_requests);
    assert_clean("during the rollback to v1", &seen);
    assert_eq!(current_assets(&app, "1"), v1, "v1's pages reference v1's assets again");
    for url in v1.iter().chain(&v2) {
        let (code, head, _) = fetch(app.proxy(), url).unwrap();
        assert_eq!(code, 200, "{url} after the rollback: {head}");
    }
    // An unhashed name: the running release's file, not the newer v2's.
    let (code, _, unhashed) = fetch(app.proxy(), "/static/notes/app.css").unwrap();
    assert_eq!((code, unhashed.as_str()), (200, unhashed_v1.as_str()), "after the rollback app.css is v1's");
    let (code, head, _) = fetch(app.proxy(), "/static/notes/app.0123456789ab.css").unwrap();
    assert_eq!(code, 404, "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");

    app.run_with_timeout(&["down"], DEPLOY).ok();
    // Leave Redis as found: only this test's queue keys go.
    let script = "import sys, redis\nr = redis.Redis(host='127.0.0.1', db=int(sys.argv[1]))\nfor k in r.scan_iter('*' + sys.argv[2] + '*'):\n    r.delete(k)";
    let _ = Command::new("python3").args(["-c", script, &REDIS_DB.to_string(), &format!("notes-{}", db.0)]).output();
}
