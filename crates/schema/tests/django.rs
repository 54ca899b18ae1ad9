//! The gate on a real Django app (examples/django, whose settings read
//! DATABASE_URL): a `RenameField` migration run by `manage.py migrate`
//! against the scratch copy is reported as breaking, naming the column;
//! an `AddField(null=True)` passes; the real database is unchanged.
//!
//! Needs python3 with Django and psycopg (as examples/django does), and
//! PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth).

use nonstop_core::database::{DatabaseSpec, DatabaseUrl};
use nonstop_schema::diff::Rule;
use nonstop_schema::{env_for, read_schema, run_gate, run_shell_tasks, Compatibility, GateOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

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
        "psql failed (is PostgreSQL running on 127.0.0.1:5432?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Db(String);

impl Drop for Db {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-X", "-q", "-d"])
            .arg(format!("{SERVER}/postgres"))
            .arg("-c")
            .arg(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0))
            .output();
    }
}

/// A copy of examples/django in a temporary directory.
fn django_copy() -> tempfile::TempDir {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/django");
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("cp").arg("-r").arg(format!("{}/.", example.display())).arg(dir.path()).status().unwrap();
    assert!(status.success());
    dir
}

fn manage(dir: &Path, url: &DatabaseUrl, args: &[&str]) {
    let out = Command::new("python3")
        .arg("manage.py")
        .args(args)
        .current_dir(dir)
        .env("DATABASE_URL", url.expose())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "manage.py {args:?} failed (examples/django needs Django and psycopg):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const RENAME: &str = "from django.db import migrations\n\n\
class Migration(migrations.Migration):\n    dependencies = [('notes', '0001_initial')]\n    operations = [migrations.RenameField('note', 'text', 'body')]\n";

const ADD_NULLABLE: &str = "from django.db import migrations, models\n\n\
class Migration(migrations.Migration):\n    dependencies = [('notes', '0001_initial')]\n    operations = [migrations.AddField('note', 'title', models.CharField(max_length=100, null=True))]\n";

async fn gate_django(migration: &str, tag: &str) -> (nonstop_schema::GateReport, bool) {
    let name = format!("gdj{tag}_{}", std::process::id() % 100_000);
    psql("postgres", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    psql("postgres", &format!("CREATE DATABASE {name}"));
    let _db = Db(name.clone());
    let url = DatabaseUrl::parse(&format!("{SERVER}/{name}")).unwrap();
    let app = django_copy();
    // The running release's schema.
    manage(app.path(), &url, &["migrate", "--noinput"]);
    psql(&name, "INSERT INTO notes_note (text, version, created_at) VALUES ('kept', '1', now())");
    let before = read_schema(&url, &GateOptions::default()).await.unwrap();
    let applied = psql(&name, "SELECT count(*) FROM django_migrations");

    // The new release: one more migration.
    std::fs::write(app.path().join("notes/migrations/0002_change.py"), migration).unwrap();
    let dir: PathBuf = app.path().to_path_buf();
    let mapping = DatabaseSpec::new(url.clone()).env;
    let report = run_gate(&url, &GateOptions::default(), move |scratch| {
        run_shell_tasks(vec!["python3 manage.py migrate --noinput".into()], dir, env_for(&scratch, &mapping))
    })
    .await
    .unwrap();
    eprintln!("{}", report.render());

    // The real database did not move.
    let unchanged = read_schema(&url, &GateOptions::default()).await.unwrap() == before
        && psql(&name, "SELECT count(*) FROM django_migrations") == applied
        && psql(&name, "SELECT text FROM notes_note") == "kept";
    (report, unchanged)
}

#[tokio::test]
async fn a_django_rename_field_is_breaking() {
    let (report, unchanged) = gate_django(RENAME, "rn").await;
    assert!(unchanged, "the real database changed");
    let breaking: Vec<_> = report.breaking().collect();
    assert_eq!(breaking.len(), 1, "{}", report.render());
    assert_eq!(breaking[0].summary, "column notes_note.text renamed to body");
    assert!(
        matches!(&breaking[0].compatibility, Compatibility::Breaking { rule: Rule::ColumnRenamed, why } if why.contains("notes_note.text"))
    );
}

#[tokio::test]
async fn a_django_nullable_add_field_is_safe() {
    let (report, unchanged) = gate_django(ADD_NULLABLE, "add").await;
    assert!(unchanged, "the real database changed");
    assert!(!report.is_breaking(), "{}", report.render());
    let summaries: Vec<&str> = report.changes.iter().map(|c| c.summary.as_str()).collect();
    assert_eq!(summaries, ["column notes_note.title added (character varying(100), nullable)"]);
}
