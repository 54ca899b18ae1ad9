//! A new environment's database as a copy of another's
//! (`nonstop env create NAME --from ENV`).
//!
//! The copy is `pg_dump | psql`: the source read by the `[base]`
//! administrator, restored by the new environment's own role into its
//! own (just made, empty) database, in one transaction, without owners
//! or privileges, so that every object of the copy belongs to the new
//! role.
//!
//! Why not `CREATE DATABASE … TEMPLATE`, which is faster: PostgreSQL
//! refuses a template that anyone is connected to, and the source is a
//! running environment's database (its instances hold connections); and a
//! template copy keeps every object's owner, the source environment's
//! role, which the new role could then neither alter nor (without grants)
//! read.
//!
//! Invariants:
//! - **the source is only read** (`pg_dump`, one snapshot);
//! - **checks before changes**: [`check_copy`] (the source is nonstop's
//!   database of that environment, the target has no database yet) runs
//!   before the target is provisioned;
//! - **all or nothing**: the restore is one transaction (`psql
//!   --single-transaction`, `ON_ERROR_STOP`);
//! - **no password on a command line**: each program gets its own through
//!   `PGPASSWORD`; messages show URLs redacted;
//! - **every wait has a timeout** ([`COPY_TIMEOUT`]).

use crate::error::BaseError;
use crate::naming::database_name;
use crate::postgres::{exists, server_of};
use nonstop_core::database::DatabaseUrl;
use nonstop_core::{AppName, EnvironmentId};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// How long a copy (dump and restore) may take.
pub const COPY_TIMEOUT: Duration = Duration::from_secs(1800);

/// How the copy was made (for the deploy's progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// `pg_dump | psql`.
    DumpRestore,
}

impl std::fmt::Display for CopyMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyMethod::DumpRestore => f.write_str("pg_dump | psql"),
        }
    }
}

/// A copy that was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Copied {
    pub from_database: String,
    pub to_database: String,
    pub method: CopyMethod,
    pub seconds: f64,
}

/// Which program of the copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStage {
    Dump,
    Restore,
}

impl std::fmt::Display for CopyStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyStage::Dump => "pg_dump",
            CopyStage::Restore => "psql",
        })
    }
}

/// Checks, changing nothing, that `app`'s database of `from` can be
/// copied into a new one of `to`: the source exists and is nonstop's for
/// (`app`, `from`), and `to` has no database yet (a database kept by `env
/// destroy` is not overwritten).
pub async fn check_copy(
    admin: &DatabaseUrl,
    app: &AppName,
    from: &EnvironmentId,
    to: &EnvironmentId,
) -> Result<(), BaseError> {
    let source = exists(admin, app, from).await?;
    if !source.complete() {
        return Err(BaseError::NoSourceDatabase {
            server: server_of(admin),
            env: from.to_string(),
            database: database_name(app, from),
        });
    }
    let target = exists(admin, app, to).await?;
    if target.database {
        return Err(BaseError::TargetExists {
            server: server_of(admin),
            env: to.to_string(),
            database: database_name(app, to),
        });
    }
    Ok(())
}

/// Copies the data of `app`'s database of `from` into the database `to`
/// points at (the new environment's, just provisioned and empty; `to`
/// has its role's password). `pg_dump` reads as the administrator of
/// `admin`, `psql` writes as `to`'s role, in one transaction. Call
/// [`check_copy`] before provisioning.
pub async fn copy_postgres(
    admin: &DatabaseUrl,
    app: &AppName,
    from: &EnvironmentId,
    to: &DatabaseUrl,
) -> Result<Copied, BaseError> {
    copy_with(admin, app, from, to, Path::new("pg_dump"), Path::new("psql"), COPY_TIMEOUT).await
}

/// [`copy_postgres`] with the programs and the timeout given.
pub async fn copy_with(
    admin: &DatabaseUrl,
    app: &AppName,
    from: &EnvironmentId,
    to: &DatabaseUrl,
    pg_dump: &Path,
    psql: &Path,
    timeout: Duration,
) -> Result<Copied, BaseError> {
    let started = Instant::now();
    let from_database = database_name(app, from);
    let source = admin.with_database(&from_database);
    let prepare = |cmd: &mut tokio::process::Command, url: &DatabaseUrl| {
        cmd.env_remove("PGPASSWORD").env("PGCONNECT_TIMEOUT", "10").kill_on_drop(true);
        if let Some(p) = url.password() {
            cmd.env("PGPASSWORD", p);
        }
    };
    let mut dump = tokio::process::Command::new(pg_dump);
    dump.args([
        "--no-owner",
        "--no-privileges",
        "--no-subscriptions",
        "--no-publications",
        "--no-security-labels",
        "--no-tablespaces",
        "--no-comments",
    ])
    .arg(format!("--dbname={}", source.without_password()));
    prepare(&mut dump, &source);
    dump.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut dump = dump.spawn().map_err(|e| spawn_error(pg_dump, e))?;
    let dump_out: Stdio = dump
        .stdout
        .take()
        .ok_or_else(|| spawn_error(pg_dump, std::io::Error::other("no stdout")))?
        .try_into()
        .map_err(|e| spawn_error(pg_dump, e))?;
    let mut restore = tokio::process::Command::new(psql);
    restore
        .args(["--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1", "--single-transaction"])
        .arg(format!("--dbname={}", to.without_password()));
    prepare(&mut restore, to);
    restore.stdin(dump_out).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut restore = match restore.spawn() {
        Ok(r) => r,
        Err(e) => {
            let _ = dump.start_kill();
            return Err(spawn_error(psql, e));
        }
    };
    let mut dump_err = dump.stderr.take();
    let mut restore_err = restore.stderr.take();
    let both = async {
        let (mut de, mut re) = (Vec::new(), Vec::new());
        let read_dump = async {
            if let Some(s) = dump_err.as_mut() {
                let _ = s.read_to_end(&mut de).await;
            }
        };
        let read_restore = async {
            if let Some(s) = restore_err.as_mut() {
                let _ = s.read_to_end(&mut re).await;
            }
        };
        let (_, _, ds, rs) = tokio::join!(read_dump, read_restore, dump.wait(), restore.wait());
        (String::from_utf8_lossy(&de).into_owned(), String::from_utf8_lossy(&re).into_owned(), ds, rs)
    };
    let (dump_stderr, restore_stderr, dump_status, restore_status) = match tokio::time::timeout(timeout, both).await {
        Ok(r) => r,
        Err(_) => {
            return Err(BaseError::CopyTimeout {
                from: from_database,
                to: to.database().to_string(),
                server: server_of(admin),
                after: timeout,
            })
        }
    };
    let redact = |t: &str| to.redact_in(&admin.redact_in(t));
    for (stage, status, stderr) in
        [(CopyStage::Dump, dump_status, dump_stderr), (CopyStage::Restore, restore_status, restore_stderr)]
    {
        let ok = status.as_ref().is_ok_and(|s| s.success());
        if !ok {
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("could not wait for it: {e}"),
            };
            return Err(BaseError::CopyFailed {
                from: from_database,
                to: to.database().to_string(),
                stage,
                status,
                stderr_tail: redact(&tail(&stderr, 12)),
            });
        }
    }
    tracing::info!("base: copied database {from_database} into {} ({})", to.database(), CopyMethod::DumpRestore);
    Ok(Copied {
        from_database,
        to_database: to.database().to_string(),
        method: CopyMethod::DumpRestore,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn spawn_error(program: &Path, source: std::io::Error) -> BaseError {
    BaseError::Spawn { program: program.display().to_string(), source }
}

/// The last `lines` lines of `text`, at most 4 KiB.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if out.len() > 4096 {
        let mut cut = out.len() - 4096;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = out[cut..].to_string();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_last_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
        let long = "é".repeat(5000);
        assert!(tail(&long, 1).len() <= 4096);
    }
}
