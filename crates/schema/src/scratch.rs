//! The gate itself: copy the schema into a scratch database on the same
//! server, run the release tasks there, diff, and always drop the scratch
//! database.
//!
//! Invariants:
//! - **the source database is only read**: a `READ ONLY` snapshot
//!   transaction, `pg_dump` (the schema, and the rows of the tables where
//!   frameworks record the migrations that ran), and `CREATE DATABASE`/`DROP DATABASE` of the
//!   scratch one (server-level statements, issued from the source's
//!   connection);
//! - **the scratch database is always dropped**: explicitly at the end, on
//!   success and on every error; by a guard if the gate's future is
//!   dropped half way (cancelled deploy) or a task panics; and, for a
//!   process killed outright, by the sweep every gate run starts with,
//!   which drops `nonstop_gate_*` databases older than
//!   [`GateOptions::stale_after`] (their creation time is in their name);
//! - **every wait has a timeout** ([`GateOptions`]);
//! - **no password in errors or reports**: URLs are shown redacted, and
//!   task output has the password replaced by `***`.

use crate::catalog;
use crate::diff::{self, Classified};
use crate::error::{GateError, TasksFailed};
use crate::model::Schema;
use crate::tools::{self, ExtensionProblem};
use nonstop_core::database::DatabaseUrl;
use nonstop_pg::{quote_ident, server_of, ConnectOptions};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncReadExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Every scratch database's name starts with this.
pub const SCRATCH_PREFIX: &str = "nonstop_gate_";

/// Limits of one gate run.
#[derive(Debug, Clone)]
pub struct GateOptions {
    /// To open a connection.
    pub connect_timeout: Duration,
    /// For one SQL statement or catalog snapshot (including `CREATE
    /// DATABASE` and `DROP DATABASE`).
    pub statement_timeout: Duration,
    /// For each `pg_dump | psql` (the schema, then the migration tables'
    /// rows).
    pub copy_timeout: Duration,
    /// For the release tasks (the engine passes `[release] task_timeout`).
    pub tasks_timeout: Duration,
    /// Scratch databases older than this are dropped by the next run's
    /// sweep (a gate killed outright leaves its own behind).
    pub stale_after: Duration,
    pub pg_dump: PathBuf,
    pub psql: PathBuf,
    /// Tables whose rows are copied with the schema (by name, in any
    /// schema): where frameworks record the migrations that ran. Default:
    /// [`MIGRATION_TABLES`].
    pub data_tables: Vec<String>,
}

impl Default for GateOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(60),
            copy_timeout: Duration::from_secs(300),
            tasks_timeout: Duration::from_secs(600),
            stale_after: Duration::from_secs(3600),
            pg_dump: PathBuf::from("pg_dump"),
            psql: PathBuf::from("psql"),
            data_tables: MIGRATION_TABLES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Where the time went, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct GateTimings {
    /// Creating the scratch database and copying the schema into it.
    pub copy_s: f64,
    pub tasks_s: f64,
    /// The whole run, the drop of the scratch database included.
    pub total_s: f64,
}

/// The gate's verdict on one release's tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    /// The source database, password redacted.
    pub source: String,
    /// The scratch database that was used (and dropped).
    pub scratch_database: String,
    /// Every change the tasks made, with its verdict.
    pub changes: Vec<Classified>,
    /// Fingerprint of the source database's schema, read before the copy.
    pub source_fingerprint: String,
    /// Fingerprint of the scratch copy before the tasks (equal to
    /// `source_fingerprint` when the copy is faithful).
    pub before_fingerprint: String,
    /// Fingerprint after the tasks: what the real database will look like
    /// after the same tasks; store it with the release.
    pub after_fingerprint: String,
    /// The schema after the tasks (to name the difference when a later
    /// rollback to this release meets another schema).
    pub after: Schema,
    pub timings: GateTimings,
    /// Stale scratch databases of earlier runs dropped by this one.
    pub swept: Vec<String>,
    /// False if dropping the scratch database failed (the next run's sweep
    /// will retry; the failure is logged).
    pub scratch_dropped: bool,
}

impl GateReport {
    /// The breaking changes.
    pub fn breaking(&self) -> impl Iterator<Item = &Classified> {
        self.changes.iter().filter(|c| c.compatibility.is_breaking())
    }

    pub fn is_breaking(&self) -> bool {
        self.breaking().next().is_some()
    }

    /// Human text: one line per change, breaking ones with why.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let n = self.breaking().count();
        if self.changes.is_empty() {
            out.push_str("the release tasks change no schema\n");
        } else if n == 0 {
            let _ = writeln!(
                out,
                "the release tasks make {} change(s), all safe while the running release runs:",
                self.changes.len()
            );
        } else {
            let _ = writeln!(
                out,
                "the release tasks make {n} change(s) that break the running release (of {} in all):",
                self.changes.len()
            );
        }
        for c in &self.changes {
            match &c.compatibility {
                diff::Compatibility::Safe => {
                    let _ = writeln!(out, "  safe      {}", c.summary);
                }
                diff::Compatibility::Breaking { why, .. } => {
                    let _ = writeln!(out, "  BREAKING  {}\n            {why}", c.summary);
                }
            }
        }
        let _ = writeln!(
            out,
            "gate: copy {:.2}s, tasks {:.2}s, total {:.2}s (scratch database {})",
            self.timings.copy_s, self.timings.tasks_s, self.timings.total_s, self.scratch_database
        );
        out
    }
}

/// What the gate learnt about the server while checking access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// `server_version_num`.
    pub version_num: u32,
    pub version: String,
    pub user: String,
    pub can_create_db: bool,
    /// `pg_dump`'s version, `server_version_num`-style.
    pub pg_dump_version: u32,
}

/// The name of a scratch database for source database `db`, created at
/// `now_secs` (Unix time), with `random` to keep two runs apart. At most
/// 63 bytes, only `[a-z0-9_]`.
pub fn scratch_name(db: &str, now_secs: u64, random: u32) -> String {
    let mut clean: String =
        db.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).take(20).collect();
    if clean.is_empty() {
        clean.push_str("db");
    }
    format!("{SCRATCH_PREFIX}{clean}_{now_secs}_{random:08x}")
}

/// When a scratch database was created, from its name.
pub fn scratch_created(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(SCRATCH_PREFIX)?;
    let mut parts = rest.rsplitn(3, '_');
    let random = parts.next()?;
    let secs = parts.next()?;
    let _db = parts.next()?;
    if random.len() != 8 || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    secs.parse().ok()
}

/// Is `name` a scratch database older than `stale_after` at `now_secs`?
/// A database that does not parse as one of ours is never stale.
pub fn is_stale(name: &str, now_secs: u64, stale_after: Duration) -> bool {
    scratch_created(name).is_some_and(|created| now_secs.saturating_sub(created) >= stale_after.as_secs())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// Opens a connection to `url`'s database (`nonstop-pg`, as base services
/// do); failures are worded for `[database] url`. The connection's driver
/// runs on a task that ends with the client.
pub async fn connect(url: &DatabaseUrl, opts: &GateOptions) -> Result<Client, GateError> {
    let connect = ConnectOptions { timeout: opts.connect_timeout, application_name: "nonstop-migration-gate" };
    Ok(nonstop_pg::connect(url, &connect).await?)
}

async fn timed<T>(
    what: &str,
    server: &str,
    after: Duration,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, GateError> {
    match tokio::time::timeout(after, fut).await {
        Err(_) => Err(GateError::Timeout { what: what.to_string(), server: server.to_string(), after }),
        Ok(Err(source)) => Err(GateError::Sql { what: what.to_string(), server: server.to_string(), source }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Checks, without changing anything, that the gate can run against
/// `url`: the server answers, the user may log in and create databases,
/// and pg_dump and psql are there and new enough. The engine's preflight.
pub async fn check_access(url: &DatabaseUrl, opts: &GateOptions) -> Result<ServerInfo, GateError> {
    let client = connect(url, opts).await?;
    let server = server_of(url);
    let row = timed(
        "reading the server's version and the user's rights",
        &server,
        opts.statement_timeout,
        client.query_one(
            "SELECT current_setting('server_version_num')::int4, current_setting('server_version'), current_user::text, \
                    (SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        ),
    )
    .await?;
    let version_num = row.get::<_, i32>(0) as u32;
    let version: String = row.get(1);
    let user: String = row.get(2);
    let can_create_db: bool = row.get(3);
    let pg_dump_version = tools::tool_version(&opts.pg_dump, version_num, opts.statement_timeout).await?;
    if !tools::dump_can_read(pg_dump_version, version_num) {
        return Err(GateError::ToolTooOld {
            program: opts.pg_dump.display().to_string(),
            tool_version: tools::major(pg_dump_version),
            server_version: version.clone(),
            server_major: tools::major(version_num),
        });
    }
    tools::tool_version(&opts.psql, version_num, opts.statement_timeout).await?;
    if !can_create_db {
        return Err(GateError::NoCreateDb { server, user });
    }
    Ok(ServerInfo { version_num, version, user, can_create_db, pg_dump_version })
}

/// Reads the schema of the database at `url` (read-only). The engine
/// uses it to compare the real database with a release's stored schema.
pub async fn read_schema(url: &DatabaseUrl, opts: &GateOptions) -> Result<Schema, GateError> {
    let mut client = connect(url, opts).await?;
    let server = server_of(url);
    timed("reading the catalog", &server, opts.statement_timeout, catalog::snapshot(&mut client)).await
}

/// Drops a database, ending its sessions first.
async fn drop_database(
    admin: &Client,
    name: &str,
    version_num: u32,
    timeout: Duration,
    server: &str,
) -> Result<(), GateError> {
    let what = format!("dropping scratch database {name}");
    if version_num >= 130000 {
        timed(
            &what,
            server,
            timeout,
            admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name))),
        )
        .await
    } else {
        timed(
            &what,
            server,
            timeout,
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&name]),
        )
        .await?;
        timed(&what, server, timeout, admin.batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote_ident(name))))
            .await
    }
}

/// Drops the scratch database if the gate's future is dropped before it
/// could (a cancelled deploy), on a task of the current runtime.
struct ScratchGuard {
    url: DatabaseUrl,
    opts: GateOptions,
    name: String,
    version_num: u32,
    armed: bool,
}

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (url, opts, name, version_num) = (self.url.clone(), self.opts.clone(), self.name.clone(), self.version_num);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let server = server_of(&url);
                    let result = async {
                        let admin = connect(&url, &opts).await?;
                        drop_database(&admin, &name, version_num, opts.statement_timeout, &server).await
                    }
                    .await;
                    match result {
                        Ok(()) => {
                            tracing::info!("migration gate: dropped scratch database {name} after a cancelled run")
                        }
                        Err(e) => tracing::warn!(
                            "migration gate: could not drop scratch database {name} ({e}); the next run's sweep will"
                        ),
                    }
                });
            }
            Err(_) => tracing::warn!(
                "migration gate: scratch database {name} left behind (no runtime); the next run's sweep will drop it"
            ),
        }
    }
}

/// Drops the scratch databases of earlier runs older than `stale_after`.
async fn sweep(admin: &Client, opts: &GateOptions, version_num: u32, server: &str) -> Vec<String> {
    let names = match timed(
        "listing scratch databases",
        server,
        opts.statement_timeout,
        admin.query("SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)", &[&SCRATCH_PREFIX]),
    )
    .await
    {
        Ok(rows) => rows.into_iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(),
        Err(e) => {
            tracing::warn!("migration gate: {e}");
            return Vec::new();
        }
    };
    let now = now_secs();
    let mut swept = Vec::new();
    for name in names.into_iter().filter(|n| is_stale(n, now, opts.stale_after)) {
        match drop_database(admin, &name, version_num, opts.statement_timeout, server).await {
            Ok(()) => {
                tracing::info!("migration gate: dropped stale scratch database {name}");
                swept.push(name);
            }
            Err(e) => tracing::warn!("migration gate: {e}"),
        }
    }
    swept
}

/// Runs the gate: copies `source`'s schema into a fresh scratch database
/// on the same server, snapshots it, calls `tasks` with the scratch
/// database's URL (same server, user and password; run the release tasks
/// with [`crate::env_for`] of it), snapshots again, and returns every
/// change with its verdict. The scratch database is dropped in every case.
///
/// `tasks` runs on its own tokio task: a panic is reported as
/// [`GateError::TasksPanicked`], and after [`GateOptions::tasks_timeout`]
/// it is aborted (dropped: a child process started with `kill_on_drop`
/// is killed).
pub async fn run_gate<F, Fut>(source: &DatabaseUrl, opts: &GateOptions, tasks: F) -> Result<GateReport, GateError>
where
    F: FnOnce(DatabaseUrl) -> Fut,
    Fut: Future<Output = Result<(), TasksFailed>> + Send + 'static,
{
    let started = Instant::now();
    let server = server_of(source);
    let info = check_access(source, opts).await?;
    let mut admin = connect(source, opts).await?;

    let swept = sweep(&admin, opts, info.version_num, &server).await;
    let source_schema =
        timed("reading the source database's catalog", &server, opts.statement_timeout, catalog::snapshot(&mut admin))
            .await?;
    let locale = timed(
        "reading the source database's encoding",
        &server,
        opts.statement_timeout,
        admin.query_one(
            "SELECT pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text FROM pg_database WHERE datname = current_database()",
            &[],
        ),
    )
    .await?;
    let (encoding, collate, ctype): (String, String, String) = (locale.get(0), locale.get(1), locale.get(2));

    let name = scratch_name(source.database(), now_secs(), random());
    let scratch = source.with_database(&name);
    let copy_started = Instant::now();
    let create = format!(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING '{}' LC_COLLATE '{}' LC_CTYPE '{}'",
        quote_ident(&name),
        encoding.replace('\'', "''"),
        collate.replace('\'', "''"),
        ctype.replace('\'', "''"),
    );
    // Armed before the database is asked for: a run cancelled while
    // `CREATE DATABASE` is under way still drops it (IF EXISTS).
    let mut guard = ScratchGuard {
        url: source.clone(),
        opts: opts.clone(),
        name: name.clone(),
        version_num: info.version_num,
        armed: true,
    };
    match tokio::time::timeout(opts.statement_timeout, admin.batch_execute(&create)).await {
        Err(_) => {
            // It may exist after all: the guard drops it.
            return Err(GateError::Timeout {
                what: format!("creating scratch database {name}"),
                server,
                after: opts.statement_timeout,
            });
        }
        Ok(Err(e)) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            return Err(GateError::NoCreateDb { server, user: info.user });
        }
        Ok(Err(source)) => {
            return Err(GateError::Sql { what: format!("creating scratch database {name}"), server, source })
        }
        Ok(Ok(())) => {}
    }
    let outcome = in_scratch(source, &scratch, opts, &info, &source_schema, copy_started, tasks).await;

    let dropped = match drop_database(&admin, &name, info.version_num, opts.statement_timeout, &server).await {
        Ok(()) => {
            guard.armed = false;
            true
        }
        Err(e) => {
            // The guard tries once more on a fresh connection.
            tracing::warn!("migration gate: {e}");
            false
        }
    };
    drop(guard);
    let (before, after, copy_s, tasks_s) = outcome?;
    let changes = diff::classified(&before, &after);
    Ok(GateReport {
        source: source.redacted(),
        scratch_database: name,
        changes,
        source_fingerprint: source_schema.fingerprint(),
        before_fingerprint: before.fingerprint(),
        after_fingerprint: after.fingerprint(),
        after,
        timings: GateTimings { copy_s, tasks_s, total_s: started.elapsed().as_secs_f64() },
        swept,
        scratch_dropped: dropped,
    })
}

/// Copy, snapshot, tasks, snapshot: everything that happens while the
/// scratch database exists.
async fn in_scratch<F, Fut>(
    source: &DatabaseUrl,
    scratch: &DatabaseUrl,
    opts: &GateOptions,
    info: &ServerInfo,
    source_schema: &Schema,
    copy_started: Instant,
    tasks: F,
) -> Result<(Schema, Schema, f64, f64), GateError>
where
    F: FnOnce(DatabaseUrl) -> Fut,
    Fut: Future<Output = Result<(), TasksFailed>> + Send + 'static,
{
    let server = server_of(source);
    copy_schema(source, scratch, opts, &info.user, source_schema).await?;
    let copy_s = copy_started.elapsed().as_secs_f64();

    let before = {
        let mut client = connect(scratch, opts).await?;
        // Defence in depth: the tasks must never be given the real one.
        let row = timed(
            "checking the scratch database's name",
            &server,
            opts.statement_timeout,
            client.query_one("SELECT current_database()::text", &[]),
        )
        .await?;
        let found: String = row.get(0);
        if found != scratch.database() {
            return Err(GateError::NotScratch { expected: scratch.database().to_string(), found });
        }
        timed("reading the scratch copy's catalog", &server, opts.statement_timeout, catalog::snapshot(&mut client))
            .await?
    };

    let tasks_started = Instant::now();
    let handle = tokio::spawn(tasks(scratch.clone()));
    // Aborted if this future is dropped (a cancelled deploy) or times out.
    let _abort = AbortOnDrop(handle.abort_handle());
    match tokio::time::timeout(opts.tasks_timeout, handle).await {
        Err(_) => return Err(GateError::TasksTimedOut { after: opts.tasks_timeout }),
        Ok(Err(join)) => {
            let message = if join.is_panic() {
                let payload = join.into_panic();
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(no message)".to_string())
            } else {
                "cancelled".to_string()
            };
            return Err(GateError::TasksPanicked { message: source.redact_in(&message) });
        }
        Ok(Ok(Err(mut failed))) => {
            failed.output_tail = source.redact_in(&failed.output_tail);
            failed.command = source.redact_in(&failed.command);
            return Err(GateError::TasksFailed(failed));
        }
        Ok(Ok(Ok(()))) => {}
    }
    let tasks_s = tasks_started.elapsed().as_secs_f64();

    let after = {
        let mut client = connect(scratch, opts).await?;
        timed("reading the scratch copy's catalog", &server, opts.statement_timeout, catalog::snapshot(&mut client))
            .await?
    };
    // Tasks that ignored the variables migrated the real database: say so
    // (nothing else would: the scratch copy did not change).
    let source_now = read_schema(source, opts).await?;
    if &source_now != source_schema {
        let changes = diff::diff(source_schema, &source_now).iter().map(|c| c.to_string()).collect();
        return Err(GateError::SourceChanged { changes });
    }
    Ok((before, after, copy_s, tasks_s))
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tables in which frameworks record which migrations ran: their rows are
/// copied with the schema (a Django migrate against an empty
/// `django_migrations` would try to create every table again). Matched by
/// name in any schema.
pub const MIGRATION_TABLES: &[&str] = &[
    "django_migrations",
    "schema_migrations",
    "ar_internal_metadata",
    "alembic_version",
    "flyway_schema_history",
    "_prisma_migrations",
    "knex_migrations",
    "knex_migrations_lock",
    "SequelizeMeta",
    "goose_db_version",
    "__EFMigrationsHistory",
    "doctrine_migration_versions",
    "phinx_log",
    "gorp_migrations",
    "__diesel_schema_migrations",
    "_sqlx_migrations",
    "refinery_schema_history",
    "seaql_migrations",
    "pgmigrations",
    "migrations",
];

/// `pg_dump --schema-only` of `source` piped into `psql` on `scratch`,
/// then the rows of the [`GateOptions::data_tables`] that exist.
async fn copy_schema(
    source: &DatabaseUrl,
    scratch: &DatabaseUrl,
    opts: &GateOptions,
    user: &str,
    source_schema: &Schema,
) -> Result<(), GateError> {
    let schema_args = [
        "--schema-only",
        "--no-owner",
        "--no-privileges",
        "--no-subscriptions",
        "--no-publications",
        "--no-security-labels",
        "--no-tablespaces",
    ];
    pipe_dump(&schema_args.map(String::from), source, scratch, opts, user).await?;
    let tables: Vec<String> = source_schema
        .tables
        .iter()
        .filter(|t| opts.data_tables.contains(&t.name.name))
        .map(|t| format!("--table={}.{}", pattern_ident(&t.name.schema), pattern_ident(&t.name.name)))
        .collect();
    if !tables.is_empty() {
        let mut args = vec!["--data-only".to_string(), "--no-owner".to_string(), "--no-privileges".to_string()];
        args.extend(tables);
        pipe_dump(&args, source, scratch, opts, user).await?;
    }
    Ok(())
}

/// A name for a pg_dump pattern: quoted, so taken literally (quotes
/// doubled; pattern characters inside quotes are not special).
fn pattern_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `pg_dump ARGS` of `source` piped into `psql` on `scratch`. The
/// password goes through `PGPASSWORD`, never on a command line.
async fn pipe_dump(
    args: &[String],
    source: &DatabaseUrl,
    scratch: &DatabaseUrl,
    opts: &GateOptions,
    user: &str,
) -> Result<(), GateError> {
    let env = |cmd: &mut tokio::process::Command| {
        cmd.env_remove("PGPASSWORD").env("PGCONNECT_TIMEOUT", opts.connect_timeout.as_secs().max(2).to_string());
        if let Some(p) = source.password() {
            cmd.env("PGPASSWORD", p);
        }
        cmd.kill_on_drop(true).stdin(Stdio::null());
    };
    let mut dump = tokio::process::Command::new(&opts.pg_dump);
    dump.args(args).arg(format!("--dbname={}", source.without_password()));
    env(&mut dump);
    dump.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut dump = dump.spawn().map_err(|e| spawn_error(&opts.pg_dump, e))?;
    let dump_out: Stdio = dump
        .stdout
        .take()
        .expect("stdout is piped")
        .try_into()
        .map_err(|e| GateError::Spawn { program: opts.pg_dump.display().to_string(), source: e })?;

    let mut restore = tokio::process::Command::new(&opts.psql);
    restore
        .args(["--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1", "--single-transaction"])
        .arg(format!("--dbname={}", scratch.without_password()));
    env(&mut restore);
    restore.stdin(dump_out).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut restore = restore.spawn().map_err(|e| spawn_error(&opts.psql, e))?;

    let mut dump_err = dump.stderr.take().expect("stderr is piped");
    let mut restore_err = restore.stderr.take().expect("stderr is piped");
    let both = async {
        let mut de = Vec::new();
        let mut re = Vec::new();
        let (_, _, ds, rs) =
            tokio::join!(dump_err.read_to_end(&mut de), restore_err.read_to_end(&mut re), dump.wait(), restore.wait());
        (String::from_utf8_lossy(&de).into_owned(), String::from_utf8_lossy(&re).into_owned(), ds, rs)
    };
    let (dump_stderr, restore_stderr, dump_status, restore_status) =
        match tokio::time::timeout(opts.copy_timeout, both).await {
            Ok(r) => r,
            Err(_) => {
                let _ = dump.start_kill();
                let _ = restore.start_kill();
                return Err(GateError::CopyTimedOut { after: opts.copy_timeout });
            }
        };
    let status_text = |s: &std::io::Result<std::process::ExitStatus>| match s {
        Ok(s) => s.to_string(),
        Err(e) => format!("could not wait for it: {e}"),
    };
    let ok = |s: &std::io::Result<std::process::ExitStatus>| s.as_ref().is_ok_and(|s| s.success());
    let redact = |t: &str| source.redact_in(&scratch.redact_in(t));
    if !ok(&dump_status) {
        return Err(GateError::DumpFailed {
            status: status_text(&dump_status),
            stderr_tail: redact(&tools::tail(&dump_stderr, 20, 4096)),
        });
    }
    if !ok(&restore_status) {
        let stderr_tail = redact(&tools::tail(&restore_stderr, 20, 4096));
        return Err(match tools::extension_problem(&restore_stderr) {
            Some(ExtensionProblem::Missing(extension)) => GateError::ExtensionMissing { extension, stderr_tail },
            Some(ExtensionProblem::NotPermitted(extension)) => {
                GateError::ExtensionNotPermitted { user: user.to_string(), extension, stderr_tail }
            }
            None => GateError::RestoreFailed { status: status_text(&restore_status), stderr_tail },
        });
    }
    Ok(())
}

fn spawn_error(program: &Path, source: std::io::Error) -> GateError {
    if source.kind() == std::io::ErrorKind::NotFound {
        GateError::ToolMissing { program: program.display().to_string(), server_major: "(the server's)".into(), source }
    } else {
        GateError::Spawn { program: program.display().to_string(), source }
    }
}

/// Runs shell commands one after another (`sh -c`, in `dir`, with `env`
/// added to this process's environment), as release tasks. The first
/// that fails ends the run with its exit status and the tail of its
/// output (stdout and stderr, interleaved as written). Each child is
/// killed if the returned future is dropped (the gate's timeout).
pub async fn run_shell_tasks(
    commands: Vec<String>,
    dir: PathBuf,
    env: Vec<(String, String)>,
) -> Result<(), TasksFailed> {
    for command in commands {
        let failed =
            |status: Option<i32>, output_tail: String| TasksFailed { command: command.clone(), status, output_tail };
        // `exec 2>&1`: one pipe for both streams keeps their order.
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(format!("exec 2>&1\n{command}")).current_dir(&dir).envs(env.iter().cloned());
        // The daemon's secrets key (nonstop-secrets' KEY_ENV), if it was
        // given one in its environment, is not the app's.
        cmd.env_remove("NONSTOP_SECRETS_KEY");
        cmd.kill_on_drop(true).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Err(failed(None, format!("could not start sh: {e}"))),
        };
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut output = Vec::new();
        let (_, status) = tokio::join!(stdout.read_to_end(&mut output), child.wait());
        let output = String::from_utf8_lossy(&output);
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => return Err(failed(s.code(), tools::tail(&output, 30, 8192))),
            Err(e) => return Err(failed(None, format!("could not wait for it: {e}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_are_short_safe_and_dated() {
        let n = scratch_name("Blog-Prod", 1_765_000_000, 0xdead_beef);
        assert_eq!(n, "nonstop_gate_blog_prod_1765000000_deadbeef");
        assert_eq!(scratch_created(&n), Some(1_765_000_000));
        let long = scratch_name(&"é".repeat(100), u64::MAX, u32::MAX);
        assert!(long.len() <= 63, "{long}");
        assert!(long.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        assert_eq!(scratch_created(&long), Some(u64::MAX));
        assert_eq!(scratch_created(&scratch_name("", 5, 1)), Some(5));
    }

    #[test]
    fn only_old_scratch_databases_are_stale() {
        let hour = Duration::from_secs(3600);
        let n = scratch_name("blog", 1000, 7);
        assert!(!is_stale(&n, 1000 + 3599, hour));
        assert!(is_stale(&n, 1000 + 3600, hour));
        // A clock behind the name's time: not stale.
        assert!(!is_stale(&n, 10, hour));
        for other in [
            "blog",
            "nonstop_gate_",
            "nonstop_gate_x_1000_zz",
            "nonstop_gate_1000_deadbeef",
            "nonstop_gate_x_y_deadbeef",
        ] {
            assert!(!is_stale(other, u64::MAX, hour), "{other}");
        }
    }
}
