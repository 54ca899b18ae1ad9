//! Two environments of the Django example side by side under one daemon:
//! production and staging, each with its own database and role (made by
//! `[base]` on the real PostgreSQL), its own Redis database (its celery
//! worker counts the words of its own notes), its own hosts, config and
//! static files; a config change rolled out in staging while both serve
//! pages and every asset those pages reference, with no failed request in
//! either; then staging destroyed with its database.
//!
//! Needs the example's Python packages, PostgreSQL on 127.0.0.1:5432
//! (user postgres, trust auth) and Redis (`./scripts/setup` installs and
//! starts them); without them it fails saying so. Its `[base] redis` is a
//! `redis-server` of its own (destroying staging with its data empties a
//! Redis database: never one another test uses). Its app has a name of its
//! own (`dj<pid>`): its databases and roles are dropped at the end, also
//! when the test fails.

mod common;

use common::django::*;
use common::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(180);
const DEPLOY: Duration = Duration::from_secs(300);
const PRODUCTION: &str = "notes.test";
const STAGING: &str = "staging.notes.test";

/// `sql` through psql as postgres on `db`; the output, trimmed.
fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-tAc", sql])
        .output()
        .expect("psql runs (is postgresql-client installed? ./scripts/setup installs it)");
    assert!(
        out.status.success(),
        "psql {sql}: {} (is PostgreSQL running on 127.0.0.1:5432 with trust auth for postgres?)",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The example as app `name`: no `[database]` and no REDIS_URL of its own
/// (`[base]` gives each environment both), two environments on their hosts.
fn spec(example: &str, name: &str, redis: &str) -> String {
    let mut out = Vec::new();
    let mut in_database = false;
    for line in example.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_database = t == "[database]";
        }
        if in_database || t.starts_with("REDIS_URL") || t.starts_with("APP_VERSION") {
            continue;
        }
        if t.starts_with("app = ") {
            out.push(format!("app = \"{name}\""));
            continue;
        }
        out.push(line.to_string());
    }
    let mut spec = out.join("\n");
    spec.push_str(&format!(
        r#"

[base]
postgres = "postgres://postgres@127.0.0.1:5432/"
redis = "{redis}"

[environments.production]
hosts = ["{PRODUCTION}"]
default = true

[environments.production.env]
APP_VERSION = "prod-1"

[environments.staging]
hosts = ["{STAGING}"]

[environments.staging.env]
APP_VERSION = "staging-1"

[environments.staging.processes.web]
count = 1
"#
    ));
    spec
}

/// What the build of the next deploy changes: the stylesheet, so that its
/// `app.<hash>.css` is its own.
fn stylesheet(app: &TestApp, mark: &str) {
    let css = app.dir.path().join("notes/static/notes/app.css");
    let base = std::fs::read_to_string(repo_root().join("examples/django/notes/static/notes/app.css")).unwrap();
    std::fs::write(css, format!("{base}/* {mark} */\nbody {{ --mark: \"{mark}\"; }}\n")).unwrap();
}

/// The app, both environments brought down and their databases and roles
/// dropped when it goes.
struct Fixture {
    app: TestApp,
    name: String,
}

impl Fixture {
    fn db(&self, env: &str) -> String {
        format!("{}_{env}", self.name)
    }

    fn clean(&self) {
        for env in ["production", "staging"] {
            let db = self.db(env);
            psql("postgres", &format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"));
            psql("postgres", &format!("DROP ROLE IF EXISTS \"{db}\""));
        }
    }

    /// The page on `host`, checked to be version `version`; its assets.
    fn assets(&self, host: &str, version: &str) -> Vec<String> {
        let (code, _, page) = fetch_host(self.app.proxy(), host, "/").unwrap();
        assert_eq!(code, 200, "{host}: {page}");
        assert_eq!(page_version(&page).as_deref(), Some(version), "{host}: {page}");
        let refs = asset_refs(&page);
        assert!(refs.iter().any(|a| a.ends_with(".css")), "{host}: {refs:?}");
        refs
    }

    /// A variable of `env`'s running web instance, read from /proc.
    fn web_var(&self, env: &str, name: &str) -> Option<String> {
        let st = self.app.run(&["-e", env, "status", "--json"]);
        st.ok();
        let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
        let web = st["instances"].as_array().unwrap().iter().find(|i| i["process"] == "web").cloned();
        let pid = web.and_then(|w| w["pid"].as_i64()).expect("a web instance");
        let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        raw.split(|b| *b == 0).find_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        })
    }

    fn post_note(&self, host: &str, text: &str) -> i64 {
        let body = serde_json::json!({ "text": text }).to_string();
        let mut s = std::net::TcpStream::connect(self.app.proxy()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "POST /notes/ HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 201"), "POST a note on {host}: {out}");
        let json: serde_json::Value = serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap();
        json["id"].as_i64().unwrap()
    }

    fn json(&self, host: &str, path: &str) -> serde_json::Value {
        let (code, _, body) = fetch_host(self.app.proxy(), host, path).unwrap();
        assert_eq!(code, 200, "{host}{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for env in ["staging", "production"] {
            let _ = self.app.run_with_timeout(&["-e", env, "down"], Duration::from_secs(90));
        }
        self.clean();
    }
}

#[test]
fn production_and_staging_of_the_django_example_side_by_side() {
    require_services();
    let name = format!("dj{}", std::process::id());
    let redis = PrivateRedis::start();
    let app = TestApp::new("django", |s| spec(&s, &name, &redis.url()));
    let f = Fixture { app, name };
    f.clean();

    // Production, then staging built from a changed stylesheet.
    stylesheet(&f.app, "production");
    let r = f.app.run_with_timeout(&["-e", "production", "deploy", "-m", "production"], DEPLOY);
    assert_eq!(r.code, 0, "deploy production:\n{}\n{}\n{}", r.stdout, r.stderr, f.app.log());
    stylesheet(&f.app, "staging");
    let r = f.app.run_with_timeout(&["-e", "staging", "deploy", "-m", "staging"], DEPLOY);
    assert_eq!(r.code, 0, "deploy staging:\n{}\n{}\n{}", r.stdout, r.stderr, f.app.log());

    // Hosts and config: each host its own environment's pages.
    let prod_assets = f.assets(PRODUCTION, "prod-1");
    let staging_assets = f.assets(STAGING, "staging-1");
    let css = |assets: &[String]| assets.iter().find(|a| a.ends_with(".css")).cloned().unwrap();
    let (prod_css, staging_css) = (css(&prod_assets), css(&staging_assets));
    assert_ne!(prod_css, staging_css, "each environment's build hashed its own stylesheet");
    // Static files: each host serves its own environment's, never the other's.
    for (host, own, other) in [(PRODUCTION, &prod_assets, &staging_css), (STAGING, &staging_assets, &prod_css)] {
        for url in own {
            let (code, head, _) = fetch_host(f.app.proxy(), host, url).unwrap();
            assert_eq!(code, 200, "{host}{url}: {head}");
        }
        let (code, head, _) = fetch_host(f.app.proxy(), host, other).unwrap();
        assert_eq!(code, 404, "{host} must not serve the other environment's {other}: {head}");
    }
    for (host, mark) in [(PRODUCTION, "production"), (STAGING, "staging")] {
        let (code, _, body) = fetch_host(f.app.proxy(), host, "/static/notes/app.css").unwrap();
        assert_eq!(code, 200, "{host}");
        assert!(body.contains(&format!("/* {mark} */")), "{host}'s unhashed app.css is its own: {body}");
    }

    // Databases: each environment has its own, made by [base], with a role
    // of its own; a note written in staging is in staging's only.
    let (prod_db, staging_db) = (f.db("production"), f.db("staging"));
    for db in [&prod_db, &staging_db] {
        assert_eq!(psql("postgres", &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'")), "1");
        assert_ne!(psql(db, "SELECT count(*) FROM django_migrations WHERE app = 'notes'"), "0", "{db} migrated");
    }
    let prod_url = f.web_var("production", "DATABASE_URL").expect("production's DATABASE_URL");
    let staging_url = f.web_var("staging", "DATABASE_URL").expect("staging's DATABASE_URL");
    assert!(prod_url.ends_with(&format!("/{prod_db}")) && staging_url.ends_with(&format!("/{staging_db}")));
    let id = f.post_note(STAGING, "three little words");
    assert_eq!(f.json(STAGING, "/notes/count/")["count"], 1);
    assert_eq!(f.json(PRODUCTION, "/notes/count/")["count"], 0);
    assert_eq!(psql(&staging_db, "SELECT count(*) FROM notes_note"), "1");
    assert_eq!(psql(&prod_db, "SELECT count(*) FROM notes_note"), "0");

    // Redis: each environment its own database number; staging's celery
    // worker, on staging's, counts the words of staging's note.
    let prod_redis = f.web_var("production", "REDIS_URL").expect("production's REDIS_URL");
    let staging_redis = f.web_var("staging", "REDIS_URL").expect("staging's REDIS_URL");
    assert_ne!(prod_redis, staging_redis);
    wait_until(T, "staging's worker to count the note's words", || {
        f.json(STAGING, &format!("/notes/{id}/"))["word_count"] == 3
    });

    // A config change in staging, rolled out while both environments serve
    // pages and their assets: no failed request in either.
    let prod_load = PageLoad::start_host(f.app.proxy(), PRODUCTION, 2);
    let staging_load = PageLoad::start_host(f.app.proxy(), STAGING, 2);
    wait_until(T, "pages under load", || prod_load.pages_of("prod-1") > 0 && staging_load.pages_of("staging-1") > 0);
    let r = f.app.run_with_timeout(&["-e", "staging", "config", "set", "APP_VERSION=staging-2"], DEPLOY);
    assert_eq!(r.code, 0, "config set:\n{}\n{}", r.stdout, r.stderr);
    wait_until(T, "staging pages of staging-2", || staging_load.pages_of("staging-2") > 0);
    let (prod_seen, staging_seen) = (prod_load.finish(), staging_load.finish());
    eprintln!(
        "config set: production pages {:?}, staging pages {:?}, {} asset requests",
        prod_seen.pages,
        staging_seen.pages,
        prod_seen.asset_requests + staging_seen.asset_requests
    );
    assert_clean("production while staging's config rolled out", &prod_seen);
    assert_clean("staging while its config rolled out", &staging_seen);
    assert_eq!(prod_seen.pages.keys().collect::<Vec<_>>(), ["prod-1"], "production never changed");
    assert_eq!(f.assets(STAGING, "staging-2"), staging_assets, "a config change keeps the build's assets");
    f.assets(PRODUCTION, "prod-1");

    // Staging destroyed with its database: its host is nobody's (the
    // default, production, answers it), production is untouched.
    let r = f.app.run_with_timeout(&["env", "destroy", "staging", "--drop-database", &staging_db], DEPLOY);
    assert_eq!(r.code, 0, "env destroy:\n{}\n{}", r.stdout, r.stderr);
    assert_eq!(psql("postgres", &format!("SELECT count(*) FROM pg_database WHERE datname = '{staging_db}'")), "0");
    f.assets(STAGING, "prod-1");
    let (code, _, _) = fetch_host(f.app.proxy(), STAGING, &staging_css).unwrap();
    assert_eq!(code, 404, "staging's assets went with it");
    assert_eq!(f.json(PRODUCTION, "/notes/count/")["count"], 0);
}
