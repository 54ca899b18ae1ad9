//! Config (`nonstop config set`) per app and environment, and what each
//! deployment rolled out in its environment.
//!
//! - `config`: an environment's config as it applies now: the one of the
//!   release it runs (written when a deployment goes live), or, while it
//!   runs nothing, the one its next start gets. Values are in clear, like
//!   `[env]` (credentials belong in `secrets`).
//! - `deployment_config`: for each deployment, the environment's spec as
//!   `nonstop.toml` resolved it (before config and runtime counts) and the
//!   config it rolled out, written in the same transaction as the
//!   deployment. Releases are the app's and shared by its environments, so
//!   a release's own spec is the one it was *built* with; what an
//!   environment *ran* it with is here, and a rollback or a restarted
//!   daemon takes it from here (never another environment's).
//!
//! Neither is removed with an app's records ([`Store::delete_app`]): they
//! are configuration and history. `env destroy` removes the environment's
//! `config` ([`Store::forget_environment`]) and keeps `deployment_config`
//! with the rest of its history.

use super::{decode, encode, ms, AppName, DeploymentRecord, EnvironmentId, Result, Store};
use nonstop_core::config::Config;
use nonstop_core::process::AppSpec;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS config (
    app TEXT NOT NULL,
    environment TEXT NOT NULL,
    vars_json TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, environment)
);
CREATE TABLE IF NOT EXISTS deployment_config (
    deployment INTEGER PRIMARY KEY,
    spec_json TEXT NOT NULL,
    config_json TEXT NOT NULL
);
"#;

/// What a deployment rolls out in its environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The environment's spec as `nonstop.toml` resolved it: the toml's
    /// counts, no config.
    pub spec: AppSpec,
    /// The environment's config it runs with.
    pub config: Config,
}

impl RunConfig {
    /// The spec processes get: `spec` with `config` applied.
    pub fn applied(&self) -> AppSpec {
        self.config.applied(&self.spec)
    }
}

impl Store {
    /// The config of (app, environment); empty when none was ever set.
    pub fn config(&self, app: &AppName, env: &EnvironmentId) -> Result<Config> {
        let conn = self.conn();
        let found: Option<String> = conn
            .query_row(
                "SELECT vars_json FROM config WHERE app = ?1 AND environment = ?2",
                params![app.as_str(), env.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        match found {
            Some(json) => decode("config", &json),
            None => Ok(Config::default()),
        }
    }

    /// Replace the config of (app, environment).
    pub fn put_config(&self, app: &AppName, env: &EnvironmentId, config: &Config, now: SystemTime) -> Result<()> {
        self.conn().execute(
            "INSERT INTO config (app, environment, vars_json, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (app, environment) DO UPDATE SET vars_json = excluded.vars_json,
                 updated_at_ms = excluded.updated_at_ms",
            params![app.as_str(), env.as_str(), encode(config), ms(now)],
        )?;
        Ok(())
    }

    /// Record a new deployment with what it rolls out, in one transaction;
    /// returns its id.
    pub fn insert_deployment_with(&self, rec: &DeploymentRecord, run: &RunConfig) -> Result<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let id = super::insert_deployment_on(&tx, rec)?;
        tx.execute(
            "INSERT INTO deployment_config (deployment, spec_json, config_json) VALUES (?1, ?2, ?3)",
            params![id, encode(&run.spec), encode(&run.config)],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// What deployment `id` rolled out; `None` for a deployment recorded
    /// before this was kept (its release's spec, without config, is what
    /// it ran).
    pub fn deployment_config(&self, id: i64) -> Result<Option<RunConfig>> {
        let conn = self.conn();
        let found: Option<(String, String)> = conn
            .query_row("SELECT spec_json, config_json FROM deployment_config WHERE deployment = ?1", params![id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        found
            .map(|(spec, config)| {
                Ok(RunConfig { spec: decode("deployment spec", &spec)?, config: decode("deployment config", &config)? })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeploymentKind, DeploymentStatus};
    use nonstop_core::config::ConfigName;
    use nonstop_core::process::{ProxySpec, ReleaseSpec};
    use nonstop_core::ReleaseId;
    use std::time::{Duration, UNIX_EPOCH};

    fn spec() -> AppSpec {
        AppSpec {
            app: AppName::new("blog").unwrap(),
            env: [("A".to_string(), "1".to_string())].into(),
            processes: vec![],
            proxy: ProxySpec::new("127.0.0.1:8080".parse().unwrap()),
            build: vec![],
            release: ReleaseSpec::default(),
            statics: vec![],
            database: None,
            hosts: vec![],
            default_host: true,
            protected: false,
            base: None,
            metrics: None,
        }
    }

    #[test]
    fn config_and_what_each_deployment_ran_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (app, prod, staging) = (
            AppName::new("blog").unwrap(),
            EnvironmentId::new("production").unwrap(),
            EnvironmentId::new("staging").unwrap(),
        );
        let config =
            Config::default().with_set(&[(ConfigName::new("GREETING").unwrap(), "hi".to_string())].into(), "ann", 5);
        let dep = DeploymentRecord {
            id: 0,
            app: app.clone(),
            environment: prod.clone(),
            kind: DeploymentKind::Promote,
            from_release: None,
            to_release: ReleaseId(3),
            phase: serde_json::Value::Null,
            status: DeploymentStatus::Running,
            reason: None,
            who: "ann@host".into(),
            message: None,
            started_at: UNIX_EPOCH + Duration::from_secs(6),
            finished_at: None,
        };
        let run = RunConfig { spec: spec(), config: config.clone() };
        let id = {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.config(&app, &prod).unwrap(), Config::default());
            store.put_config(&app, &prod, &config, UNIX_EPOCH).unwrap();
            store.insert_deployment_with(&dep, &run).unwrap()
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(store.config(&app, &prod).unwrap(), config);
        assert_eq!(store.config(&app, &staging).unwrap(), Config::default(), "per environment");
        assert_eq!(store.deployment_config(id).unwrap(), Some(run.clone()));
        assert_eq!(store.deployments(&app, &prod, 5).unwrap()[0].kind, DeploymentKind::Promote);
        assert_eq!(run.applied().env["GREETING"], "hi");
        assert_eq!(store.deployment_config(id + 1).unwrap(), None);
        store.put_config(&app, &prod, &Config::default(), UNIX_EPOCH).unwrap();
        assert!(store.config(&app, &prod).unwrap().is_empty());
    }
}
