//! The gate against the real PostgreSQL at 127.0.0.1:5432 (user postgres,
//! trust auth). Each test makes its own source database (a short unique
//! name: scratch names keep 20 characters of it) and drops it.
//!
//! A test that cannot reach the server fails, saying so.

use nonstop_core::database::{DatabaseSpec, DatabaseUrl};
use nonstop_schema::diff::{Change, Compatibility, Rule};
use nonstop_schema::{
    env_for, read_schema, run_gate, run_shell_tasks, GateError, GateOptions, GateReport, TasksFailed,
};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!("{SERVER}/{db}"))
        .arg("-c")
        .arg(sql)
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql -c {sql:?} on {db} failed (is PostgreSQL running on 127.0.0.1:5432 with trust auth for postgres?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A source database for one test, dropped at the end.
struct Source {
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Source {
    fn new(tag: &str, setup: &str) -> Source {
        assert!(tag.len() <= 6);
        let name = format!("g{tag}_{}_{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed));
        psql("postgres", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        psql("postgres", &format!("CREATE DATABASE {name}"));
        if !setup.is_empty() {
            psql(&name, setup);
        }
        Source { name }
    }

    fn url(&self) -> DatabaseUrl {
        DatabaseUrl::parse(&format!("{SERVER}/{}", self.name)).unwrap()
    }

    /// With a password in it (trust auth ignores it): to check that it is
    /// never shown.
    fn url_with_password(&self) -> DatabaseUrl {
        DatabaseUrl::parse(&format!("postgres://postgres:Sup3rSecretPw@127.0.0.1:5432/{}", self.name)).unwrap()
    }

    /// Scratch databases made for this source that still exist.
    fn scratch_left(&self) -> Vec<String> {
        let out = psql(
            "postgres",
            &format!(
                "SELECT datname FROM pg_database WHERE datname LIKE 'nonstop\\_gate\\_{}\\_%' ORDER BY 1",
                self.name
            ),
        );
        out.lines().map(str::to_string).filter(|s| !s.is_empty()).collect()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-X", "-q", "-d"])
            .arg(format!("{SERVER}/postgres"))
            .arg("-c")
            .arg(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .output();
    }
}

const NOTES: &str = "CREATE TABLE notes (id bigserial PRIMARY KEY, title varchar(200) NOT NULL, body text, \
     created timestamptz NOT NULL DEFAULT now()); \
     CREATE INDEX notes_created ON notes (created); \
     CREATE TYPE mood AS ENUM ('sad', 'ok'); \
     INSERT INTO notes (title, body) VALUES ('first', 'hello'), ('second', 'world');";

fn opts() -> GateOptions {
    GateOptions { tasks_timeout: Duration::from_secs(60), ..GateOptions::default() }
}

/// Runs `commands` as release tasks against the scratch copy, the app
/// reading DATABASE_URL.
async fn gate(url: &DatabaseUrl, commands: &[&str]) -> Result<GateReport, GateError> {
    gate_with(url, &opts(), commands).await
}

async fn gate_with(url: &DatabaseUrl, opts: &GateOptions, commands: &[&str]) -> Result<GateReport, GateError> {
    let commands: Vec<String> = commands.iter().map(|s| s.to_string()).collect();
    let mapping = DatabaseSpec::new(url.clone()).env;
    run_gate(url, opts, move |scratch| {
        let env = env_for(&scratch, &mapping);
        run_shell_tasks(commands, std::env::temp_dir(), env)
    })
    .await
}

fn migrate(sql: &str) -> String {
    format!("psql -X -q -v ON_ERROR_STOP=1 -d \"$DATABASE_URL\" -c \"{sql}\"")
}

fn data(source: &Source) -> String {
    psql(&source.name, "SELECT string_agg(id || ':' || title || ':' || coalesce(body, ''), ',' ORDER BY id) FROM notes")
}

#[tokio::test]
async fn a_renamed_column_is_breaking_and_the_source_is_untouched() {
    let source = Source::new("rename", NOTES);
    let before = read_schema(&source.url(), &opts()).await.unwrap();
    let rows = data(&source);

    let started = Instant::now();
    let report = gate(&source.url(), &[&migrate("ALTER TABLE notes RENAME COLUMN title TO headline")]).await.unwrap();
    eprintln!(
        "gate on a small database: {:?} (wall {:.2}s)\n{}",
        report.timings,
        started.elapsed().as_secs_f64(),
        report.render()
    );

    assert!(report.is_breaking());
    let breaking: Vec<_> = report.breaking().collect();
    assert_eq!(breaking.len(), 1, "{}", report.render());
    assert_eq!(breaking[0].summary, "column notes.title renamed to headline");
    assert!(
        matches!(&breaking[0].change, Change::ColumnRenamed { from, to, .. } if from.name == "title" && to.name == "headline")
    );
    let Compatibility::Breaking { rule, why } = &breaking[0].compatibility else { unreachable!() };
    assert_eq!(*rule, Rule::ColumnRenamed);
    assert!(why.contains("notes.title"), "{why}");
    assert!(report.render().contains("BREAKING  column notes.title renamed to headline"));

    // The copy was faithful, and the real database is as it was.
    assert_eq!(report.source_fingerprint, before.fingerprint());
    assert_eq!(report.before_fingerprint, report.source_fingerprint);
    assert_ne!(report.after_fingerprint, report.before_fingerprint);
    let after = read_schema(&source.url(), &opts()).await.unwrap();
    assert_eq!(after.fingerprint(), before.fingerprint());
    assert_eq!(data(&source), rows);
    assert!(after.tables[0].column("title").is_some());

    assert!(report.scratch_dropped);
    assert!(source.scratch_left().is_empty(), "{:?}", source.scratch_left());
    assert!(report.scratch_database.starts_with(&format!("nonstop_gate_{}_", source.name)));
}

#[tokio::test]
async fn an_added_nullable_column_passes_as_safe() {
    let source = Source::new("addcol", NOTES);
    let before = read_schema(&source.url(), &opts()).await.unwrap();
    let report = gate(
        &source.url(),
        &[&migrate("ALTER TABLE notes ADD COLUMN subtitle text"), &migrate("ALTER TYPE mood ADD VALUE 'happy'")],
    )
    .await
    .unwrap();
    assert!(!report.is_breaking(), "{}", report.render());
    let summaries: Vec<&str> = report.changes.iter().map(|c| c.summary.as_str()).collect();
    assert_eq!(summaries, ["column notes.subtitle added (text, nullable)", "value \"happy\" added to enum type mood"]);
    assert_eq!(read_schema(&source.url(), &opts()).await.unwrap(), before);
    assert!(source.scratch_left().is_empty());
}

#[tokio::test]
async fn a_not_null_column_without_default_and_a_unique_index_are_breaking() {
    let source = Source::new("nn", NOTES);
    let report = gate(
        &source.url(),
        &[&migrate(
            "ALTER TABLE notes ADD COLUMN slug text NOT NULL; CREATE UNIQUE INDEX notes_title ON notes (title)",
        )],
    )
    .await
    .unwrap();
    let rules: Vec<Rule> = report
        .breaking()
        .filter_map(|c| match &c.compatibility {
            Compatibility::Breaking { rule, .. } => Some(*rule),
            Compatibility::Safe => None,
        })
        .collect();
    assert_eq!(rules, [Rule::NotNullColumnWithoutDefault, Rule::UniquenessAdded], "{}", report.render());
    assert!(source.scratch_left().is_empty());
}

#[tokio::test]
async fn a_failing_task_is_reported_with_its_output_and_no_password() {
    let source = Source::new("fail", NOTES);
    let url = source.url_with_password();
    let err = gate(&url, &[&migrate("SELECT 1"), "echo applying 0002; echo \"url is $DATABASE_URL\" >&2; exit 3"])
        .await
        .unwrap_err();
    let GateError::TasksFailed(TasksFailed { command, status, output_tail }) = &err else { panic!("{err:?}") };
    assert_eq!(*status, Some(3));
    assert!(command.starts_with("echo applying 0002"));
    assert!(output_tail.contains("applying 0002"), "{output_tail}");
    assert!(output_tail.contains("url is postgres://postgres:***@127.0.0.1:5432/nonstop_gate_"), "{output_tail}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("Sup3rSecretPw"), "{shown}");
    assert!(shown.contains("nothing real changed"));
    assert!(source.scratch_left().is_empty());
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = DatabaseUrl::parse(&format!("postgres://app:Sup3rSecretPw@127.0.0.1:{port}/app")).unwrap();
    let err = gate(&url, &["true"]).await.unwrap_err();
    assert!(matches!(err, GateError::Unreachable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")) && text.contains("check the host and port"), "{text}");
    assert!(!format!("{err} {err:?}").contains("Sup3rSecretPw"));
}

#[tokio::test]
async fn a_wrong_user_and_a_missing_database_are_clear_errors() {
    let url = DatabaseUrl::parse("postgres://nonstop_no_such_user:pw@127.0.0.1:5432/postgres").unwrap();
    let err = gate(&url, &["true"]).await.unwrap_err();
    assert!(matches!(err, GateError::AuthenticationRefused { .. }), "{err:?}");
    assert!(err.to_string().contains("refused user `nonstop_no_such_user`"), "{err}");
    assert!(err.to_string().contains("fix the user or password in [database] url"));
    assert!(std::error::Error::source(&err).is_some(), "keeps its source");

    let url = DatabaseUrl::parse("postgres://postgres@127.0.0.1:5432/nonstop_no_such_db").unwrap();
    let err = gate(&url, &["true"]).await.unwrap_err();
    assert!(matches!(err, GateError::DatabaseMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("database `nonstop_no_such_db` does not exist"), "{err}");
}

#[tokio::test]
async fn a_user_who_may_not_create_databases_is_told_so() {
    let source = Source::new("nocrdb", NOTES);
    let role = format!("nonstop_gate_test_{}", source.name);
    psql("postgres", &format!("DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN NOCREATEDB"));
    let url = DatabaseUrl::parse(&format!("postgres://{role}@127.0.0.1:5432/{}", source.name)).unwrap();
    let err = gate(&url, &["true"]).await.unwrap_err();
    psql("postgres", &format!("DROP ROLE IF EXISTS {role}"));
    assert!(matches!(err, GateError::NoCreateDb { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("ALTER ROLE \"{role}\" CREATEDB")), "{err}");
}

fn fake_tool(dir: &std::path::Path, name: &str, version: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo '{name} (PostgreSQL) {version}'; exit 0; fi\n{body}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test]
async fn an_extension_the_scratch_copy_cannot_have_is_named() {
    let source = Source::new("ext", NOTES);
    let dir = tempfile::tempdir().unwrap();
    // A pg_dump whose dump needs an extension this server does not have
    // (the real restore, by the real psql, fails on it).
    let pg_dump = fake_tool(
        dir.path(),
        "pg_dump",
        "15.20",
        "echo 'CREATE TABLE t (id int);'; echo 'CREATE EXTENSION IF NOT EXISTS nonexistent_ext;'",
    );
    let err = gate_with(&source.url(), &GateOptions { pg_dump, ..opts() }, &["true"]).await.unwrap_err();
    let GateError::ExtensionMissing { extension, .. } = &err else { panic!("{err:?}") };
    assert_eq!(extension, "nonexistent_ext");
    let text = err.to_string();
    assert!(text.contains("extension `nonexistent_ext`") && text.contains("install the extension's package"), "{text}");
    assert!(err.is_bad_input());
    assert!(source.scratch_left().is_empty(), "{:?}", source.scratch_left());
}

#[tokio::test]
async fn a_missing_or_old_pg_dump_is_a_clear_error() {
    let source = Source::new("tools", NOTES);
    let err = gate_with(&source.url(), &GateOptions { pg_dump: "/nonexistent/pg_dump".into(), ..opts() }, &["true"])
        .await
        .unwrap_err();
    assert!(matches!(err, GateError::ToolMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("postgresql-client-15"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let old = fake_tool(dir.path(), "pg_dump", "9.6.24", "exit 1");
    let err = gate_with(&source.url(), &GateOptions { pg_dump: old, ..opts() }, &["true"]).await.unwrap_err();
    assert!(matches!(err, GateError::ToolTooOld { .. }), "{err:?}");
    assert!(err.to_string().contains("version 9.6, older than the PostgreSQL server (15."), "{err}");
    // Checked before anything was created.
    assert!(source.scratch_left().is_empty());
}

#[tokio::test]
async fn tasks_that_hang_or_panic_still_leave_no_scratch_database() {
    let source = Source::new("hang", NOTES);
    let quick = GateOptions { tasks_timeout: Duration::from_secs(1), ..opts() };
    let err = gate_with(&source.url(), &quick, &["sleep 30"]).await.unwrap_err();
    assert!(matches!(err, GateError::TasksTimedOut { .. }), "{err:?}");
    assert!(source.scratch_left().is_empty(), "{:?}", source.scratch_left());

    let err = run_gate(&source.url(), &opts(), |_scratch| async { panic!("boom in the runner") }).await.unwrap_err();
    assert!(matches!(&err, GateError::TasksPanicked { message } if message.contains("boom")), "{err:?}");
    assert!(source.scratch_left().is_empty(), "{:?}", source.scratch_left());
}

/// Waits (at most 30 s) for `f` to hold.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_cancelled_gate_drops_its_scratch_database() {
    let source = Source::new("cancel", NOTES);
    let url = source.url();
    let run = tokio::spawn(async move { gate(&url, &["sleep 60"]).await });
    eventually("the scratch database exists", || !source.scratch_left().is_empty()).await;
    run.abort();
    let _ = run.await;
    eventually("the guard dropped the scratch database", || source.scratch_left().is_empty()).await;
}

#[tokio::test]
async fn stale_scratch_databases_are_swept() {
    let source = Source::new("sweep", NOTES);
    let old = nonstop_schema::scratch::scratch_name(&source.name, 1_000_000_000, 0xabcdef01);
    psql("postgres", &format!("CREATE DATABASE {old}"));
    // Made now: a later run sweeps it if this test dies before dropping it.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let fresh = nonstop_schema::scratch::scratch_name(&source.name, now, 0xabcdef02);
    psql("postgres", &format!("CREATE DATABASE {fresh}"));
    let report = gate(&source.url(), &["true"]).await.unwrap();
    assert!(report.changes.is_empty());
    // Dropped by this run or a test's run beside it; a recent one is left.
    assert_eq!(source.scratch_left(), vec![fresh.clone()]);
    psql("postgres", &format!("DROP DATABASE {fresh}"));
}

#[tokio::test]
async fn the_rows_of_migration_tables_come_with_the_schema() {
    // Frameworks read which migrations ran from a table: a copy without
    // its rows would run every migration again (Django: "relation already
    // exists").
    let source = Source::new(
        "migtab",
        &format!(
            "{NOTES} CREATE TABLE schema_migrations (version text PRIMARY KEY); \
         INSERT INTO schema_migrations VALUES ('1'), ('2');"
        ),
    );
    let report = gate(
        &source.url(),
        &[
            "test \"$(psql -X -t -A -d \"$DATABASE_URL\" -c 'SELECT sum(version::int) FROM schema_migrations')\" = 3",
            "test \"$(psql -X -t -A -d \"$DATABASE_URL\" -c 'SELECT count(*) FROM notes')\" = 0",
        ],
    )
    .await
    .unwrap();
    assert!(report.changes.is_empty(), "{}", report.render());
    assert!(source.scratch_left().is_empty());
}

#[tokio::test]
async fn a_url_that_asks_for_tls_is_refused_before_connecting() {
    let url = DatabaseUrl::parse("postgres://app:Sup3rSecretPw@127.0.0.1:5432/app?sslmode=require").unwrap();
    let err = gate(&url, &["true"]).await.unwrap_err();
    assert!(matches!(err, GateError::TlsNotSupported { .. }), "{err:?}");
    assert!(err.to_string().contains("sslmode=require"), "{err}");
    assert!(err.is_bad_input());
}

#[tokio::test]
async fn tasks_that_migrate_the_real_database_are_caught() {
    // An app that ignores DATABASE_URL (reads its database from elsewhere)
    // migrates the real database: the gate cannot prevent it, but says so.
    let source = Source::new("ignore", NOTES);
    let real = format!("{SERVER}/{}", source.name);
    let err = gate(&source.url(), &[&format!("psql -X -q -d {real} -c 'ALTER TABLE notes ADD COLUMN oops text'")])
        .await
        .unwrap_err();
    let GateError::SourceChanged { changes } = &err else { panic!("{err:?}") };
    assert_eq!(changes, &["column notes.oops added (text, nullable)"]);
    assert!(err.to_string().contains("[database.env]"), "{err}");
    assert!(source.scratch_left().is_empty());
}
