//! End-to-end tests of the migration compatibility gate with the real
//! binary, the hello example and the real PostgreSQL on 127.0.0.1:5432:
//! a breaking migration refused with the real database unchanged, a safe
//! one shipped, `--allow-breaking` through maintenance, a rollback behind
//! the schema refused (and forced), and a `[database]` the gate cannot use
//! refused before anything changes.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// Runs `sql` with psql on `db` of the local server; the output, trimmed.
fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-tAc", sql])
        .output()
        .expect("psql runs (the migration gate needs it; scripts/setup installs postgresql-client)");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A database of its own for one test, dropped at the end.
struct TestDb(String);

impl TestDb {
    fn new(tag: &str) -> TestDb {
        let name = format!("nonstop_e2e_{tag}_{}", std::process::id());
        psql("postgres", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        psql("postgres", &format!("CREATE DATABASE {name}"));
        TestDb(name)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.0)
    }

    fn columns(&self, table: &str) -> Vec<String> {
        psql(
            &self.0,
            &format!(
                "SELECT column_name FROM information_schema.columns WHERE table_name = '{table}' ORDER BY ordinal_position"
            ),
        )
        .lines()
        .map(str::to_string)
        .collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-tAc"])
            .arg(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0))
            .output();
    }
}

/// The hello app with `[database]` and a release task that applies
/// `migrate.sql` with psql.
fn app_with_database(db: &TestDb) -> TestApp {
    let app = TestApp::new("hello", |s| s);
    let spec = app.spec().replace(
        "app = \"hello\"",
        &format!(
            "app = \"hello\"\n\n[release]\ntasks = [\"psql \\\"$DATABASE_URL\\\" -v ON_ERROR_STOP=1 -q -f migrate.sql\"]\n\n[database]\nurl = \"{}\"",
            db.url()
        ),
    );
    let dir = app.dir.path().display().to_string();
    let spec = spec.replace(
        "GREETING = \"hello\"",
        &format!("GREETING = \"hello\"\nBEAT_LOCK = \"{dir}/beat.lock\"\nAPP_VERSION = \"1\""),
    );
    app.write_spec(&spec);
    migration(&app, "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, title text NOT NULL);");
    app
}

fn migration(app: &TestApp, sql: &str) {
    std::fs::write(app.dir.path().join("migrate.sql"), format!("{sql}\n")).unwrap();
}

fn version(app: &TestApp, v: u32) {
    let spec = app.spec();
    let at = spec.find("APP_VERSION = \"").unwrap() + "APP_VERSION = \"".len();
    let end = at + spec[at..].find('"').unwrap();
    app.write_spec(&format!("{}{v}{}", &spec[..at], &spec[end..]));
}

fn history(app: &TestApp) -> Vec<serde_json::Value> {
    let r = app.run(&["history", "--json"]);
    r.ok();
    serde_json::from_str::<Vec<serde_json::Value>>(&r.stdout).unwrap()
}

fn scratch_databases() -> Vec<String> {
    psql("postgres", "SELECT datname FROM pg_database WHERE datname LIKE 'nonstop_gate_%'")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_gate_refuses_a_breaking_migration_ships_a_safe_one_and_allow_breaking_goes_through_maintenance() {
    let db = TestDb::new("gate");
    let app = app_with_database(&db);
    app.run(&["deploy"]).ok();
    assert_eq!(db.columns("notes"), ["id", "title"]);
    // Every process gets `[database]`'s variables.
    let (status, body) = app.get("/database").unwrap();
    assert_eq!((status, body.trim()), (200, db.0.as_str()));

    // A nullable column: safe while v1 runs; shipped.
    migration(&app, "ALTER TABLE notes ADD COLUMN IF NOT EXISTS body text;");
    version(&app, 2);
    let r = app.run(&["deploy"]);
    r.ok();
    assert!(r.stderr.contains("migration gate"), "{}", r.stderr);
    assert!(r.stderr.contains("all safe"), "{}", r.stderr);
    assert_eq!(db.columns("notes"), ["id", "title", "body"]);
    // The schema v2 expects is recorded with it (v1 had no gate: first).
    let r = app.run(&["releases", "--json"]);
    r.ok();
    let releases: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let schema_of =
        |v: u64| releases.iter().find(|r| r["id"] == v).and_then(|r| r["schema"].as_str().map(str::to_string));
    assert!(schema_of(2).is_some_and(|s| s.len() >= 12), "{releases:#?}");
    assert_eq!(schema_of(1), None);

    // A renamed column: every v2 request would fail on it. Refused before
    // anything real changes.
    let before = app.pids("web");
    migration(&app, "ALTER TABLE notes RENAME COLUMN title TO headline;");
    version(&app, 3);
    let r = app.run(&["deploy"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("BREAKING"), "{}", r.stderr);
    assert!(r.stderr.contains("title"), "the change is named: {}", r.stderr);
    assert!(r.stderr.contains("--allow-breaking"), "the way out is named: {}", r.stderr);
    assert_eq!(db.columns("notes"), ["id", "title", "body"], "the real database is unchanged");
    assert_eq!(app.pids("web"), before, "the running release was not touched");
    assert!(app.get("/").unwrap().1.contains("version 2"));
    let h = history(&app);
    assert_eq!(h[0]["status"], "failed");
    assert!(h[0]["reason"].as_str().unwrap().contains("refused before anything changed"), "{h:#?}");
    assert!(scratch_databases().is_empty(), "scratch databases left: {:?}", scratch_databases());

    // The seeds' fallback: maintenance, old release stopped, tasks, new
    // release started, maintenance off.
    let r = app.run(&["deploy", "--allow-breaking"]);
    r.ok();
    assert!(r.stderr.contains("maintenance on"), "{}", r.stderr);
    assert!(r.stderr.contains("maintenance off"), "{}", r.stderr);
    assert_eq!(db.columns("notes"), ["id", "headline", "body"]);
    let (status, body) = app.get("/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("version 3"), "{body}");
    assert!(app.status()["maintenance"].is_null(), "maintenance is off: {}", app.status());

    // v2 expects `title`: a rollback to it is refused, naming the column…
    let r = app.run(&["rollback"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("expects a schema the database no longer has"), "{}", r.stderr);
    assert!(r.stderr.contains("title"), "{}", r.stderr);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    assert!(app.get("/").unwrap().1.contains("version 3"));
    // …unless forced.
    app.run(&["rollback", "--force"]).ok();
    wait_until(T, "v2 serving", || app.get("/").is_ok_and(|(_, b)| b.contains("version 2")));
    app.run(&["down"]).ok();
}

#[test]
fn a_database_the_gate_cannot_use_is_refused_before_anything_changes() {
    let db = TestDb::new("bad");
    let app = app_with_database(&db);
    app.run(&["deploy"]).ok();
    let before = app.pids("web");
    let spec = app.spec();
    let cases = [
        // Nothing listens there.
        (format!("postgres://postgres@127.0.0.1:{}/{}", free_port(), db.0), "127.0.0.1"),
        // No such role.
        (format!("postgres://nobody_here@127.0.0.1:5432/{}", db.0), "nobody_here"),
        // No such database.
        ("postgres://postgres@127.0.0.1:5432/nonstop_no_such_db".to_string(), "nonstop_no_such_db"),
    ];
    for (n, (url, named)) in cases.iter().enumerate() {
        app.write_spec(
            &spec.replace(&db.url(), url).replace("APP_VERSION = \"1\"", &format!("APP_VERSION = \"{}\"", n + 2)),
        );
        let r = app.run(&["deploy"]);
        assert_eq!(r.code, 1, "{url}: {}\n{}", r.stdout, r.stderr);
        assert!(r.stderr.contains("migration gate could not run"), "{url}: {}", r.stderr);
        assert!(r.stderr.contains(named), "{url}: the problem is named: {}", r.stderr);
        assert_eq!(app.pids("web"), before, "{url}: nothing changed");
    }
    // `--allow-breaking` without a [database] is a mistake, said at once.
    let no_db = spec.replace(&format!("[database]\nurl = \"{}\"", db.url()), "");
    assert!(!no_db.contains("[database]"), "{no_db}");
    app.write_spec(&no_db);
    let r = app.run(&["deploy", "--allow-breaking"]);
    assert_eq!(r.code, 2, "bad input: {}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("no [database]"), "{}", r.stderr);
    assert_eq!(app.pids("web"), before);
    app.run(&["down"]).ok();
}
