//! The migration compatibility gate, as the engine sees it: a boundary
//! ([`SchemaGate`]) that the daemon fills with the PostgreSQL gate of
//! `nonstop-schema`, and the engine's part of a deployment's
//! `MigrationGate` phase: run it off the engine's task, record the
//! schema a release expects, turn the answer into the machine's
//! [`GateVerdict`].
//!
//! For a deploy, the gate runs the release tasks on a scratch copy of the
//! database's schema and classifies every change; for a rollback, it
//! compares the schema the target release expects (recorded when it was
//! deployed) with the database as it is now. Either way nothing real
//! changes before the verdict.

use super::*;
use nonstop_core::database::DatabaseSpec;
use nonstop_plan::deployment::{DeploymentKind, Event, GateVerdict};
use std::future::Future;
use std::pin::Pin;

pub type GateFuture<T> = Pin<Box<dyn Future<Output = Result<T, SchemaGateError>> + Send>>;

/// Why the migration gate gave no answer. The deployment records its
/// words (with any secret value taken out); they must never hold a
/// password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchemaGateError {
    #[error("this daemon has no migration gate")]
    NoGate,
    /// The gate could not run (the database, the scratch copy, the
    /// tasks): `message` is its error's words with the database's URL
    /// redacted; the error itself is the source.
    #[error("{message}")]
    Failed {
        message: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The schema the tasks left cannot be recorded.
    #[error("cannot record the schema: {0}")]
    Encode(#[source] Arc<serde_json::Error>),
    /// The schema recorded for the release cannot be read back.
    #[error("the schema recorded for this release cannot be read ({0})")]
    Decode(#[source] Arc<serde_json::Error>),
}

impl SchemaGateError {
    /// The gate's own error, worded as `message` (its words, redacted).
    pub fn failed(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        SchemaGateError::Failed { message: message.into(), source: Arc::new(source) }
    }
}

/// What the gate runs for a deploy.
#[derive(Debug, Clone)]
pub struct GateInput {
    pub database: DatabaseSpec,
    /// `[release] tasks`, run in `dir` with `env` (whose `[database]`
    /// variables the gate points at its scratch copy).
    pub tasks: Vec<String>,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    /// For all the tasks.
    pub timeout: Duration,
}

/// What the gate found for a deploy.
#[derive(Debug, Clone, PartialEq)]
pub struct GateOutcome {
    /// Some change breaks the running release.
    pub breaking: bool,
    /// Every change, one per line, breaking ones with why, and the cost
    /// (no password: the URL is redacted).
    pub report: String,
    /// The schema after the tasks: what this release expects.
    pub fingerprint: String,
    pub schema: serde_json::Value,
    /// The gate's whole cost, the scratch database's drop included.
    pub seconds: f64,
}

/// The migration gate (PostgreSQL's, in the daemon).
pub trait SchemaGate: Send + Sync + 'static {
    /// Run `input.tasks` against a scratch copy of the database's schema
    /// and classify what they change. Dropping the future stops the tasks
    /// and drops the scratch database.
    fn check(&self, input: GateInput) -> GateFuture<GateOutcome>;
    /// What breaks for a release that expects `expected` (a schema
    /// [`check`](Self::check) returned) on the database as it is now:
    /// `None` if nothing does.
    fn behind(&self, database: DatabaseSpec, expected: serde_json::Value) -> GateFuture<Option<String>>;
}

/// For engines without a database gate (tests of other features): every
/// gated deployment fails with this answer.
pub struct NoSchemaGate;

impl SchemaGate for NoSchemaGate {
    fn check(&self, _: GateInput) -> GateFuture<GateOutcome> {
        Box::pin(async { Err(SchemaGateError::NoGate) })
    }
    fn behind(&self, _: DatabaseSpec, _: serde_json::Value) -> GateFuture<Option<String>> {
        Box::pin(async { Err(SchemaGateError::NoGate) })
    }
}

/// The gate's answer, back on the engine's task.
#[derive(Debug)]
pub(crate) enum GateAnswer {
    Deploy(Result<GateOutcome, SchemaGateError>),
    Rollback(Result<Option<String>, SchemaGateError>),
    /// The deployment stopped the gate (its scratch database dropped).
    Stopped,
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// `RunGate`: start the gate off the engine's task.
    pub(crate) fn spawn_gate(&mut self) {
        // The release tasks get the app's secrets on the scratch copy too.
        let gate_secrets = match self.launch_secrets() {
            Ok(s) => s,
            Err(e) => {
                self.feed(Event::Gate { verdict: GateVerdict::Error { detail: e.to_string() } });
                return;
            }
        };
        let Some(run) = self.deployment.as_ref() else { return };
        let id = run.record.id;
        let Some(database) = run.to.spec.database.clone() else {
            self.feed(Event::Gate { verdict: GateVerdict::Error { detail: "the spec has no [database]".into() } });
            return;
        };
        // The environment's own database (base services) is stored without
        // its role's password: the gate connects with it.
        let database = gate_secrets.complete_database(database);
        let (gate, tx, cancel) = (self.schema_gate.clone(), self.events_tx.clone(), run.cancel.clone());
        let future = match run.machine.shape.kind {
            DeploymentKind::Rollback { .. } => {
                let expected = match self.store.release_schema(&run.to.spec.app, run.to.id) {
                    Ok(Some(s)) => s.schema,
                    Ok(None) => {
                        // Nothing recorded (deployed before the gate, or
                        // without a database): nothing to compare.
                        self.feed(Event::Gate { verdict: GateVerdict::Safe });
                        return;
                    }
                    Err(e) => {
                        let detail = format!("cannot read the schema {} expects: {e}", run.to.id);
                        self.feed(Event::Gate { verdict: GateVerdict::Error { detail } });
                        return;
                    }
                };
                self.progress(format!(
                    "migration gate: comparing the schema {} expects with {}",
                    run.to.id,
                    database.url.redacted()
                ));
                let f = gate.behind(database, expected);
                Box::pin(async move { GateAnswer::Rollback(f.await) })
                    as Pin<Box<dyn Future<Output = GateAnswer> + Send>>
            }
            DeploymentKind::Deploy | DeploymentKind::Reuse { .. } => {
                let spec = &run.to.spec;
                let env: Vec<(String, String)> = release_env(&run.base_env, &run.to, &self.env).into_iter().collect();
                let env = secrets::with_secrets(env, &gate_secrets, spec.database.as_ref());
                let input = GateInput {
                    database: database.clone(),
                    tasks: spec.release.tasks.clone(),
                    dir: run.to.workdir.clone(),
                    env,
                    timeout: spec.release.task_timeout.saturating_mul(spec.release.tasks.len().max(1) as u32),
                };
                self.progress(format!(
                    "migration gate: running {} release task(s) against a scratch copy of {}'s schema",
                    input.tasks.len(),
                    database.url.redacted()
                ));
                let f = gate.check(input);
                Box::pin(async move { GateAnswer::Deploy(f.await) })
            }
        };
        self.tasks.spawn(async move {
            let answer = tokio::select! {
                answer = future => answer,
                // The scratch database is dropped with the future.
                () = cancel.cancelled() => GateAnswer::Stopped,
            };
            let _ = tx.send(Internal::GateChecked { deployment: id, answer });
        });
    }

    /// The gate answered: record what the release expects, tell the
    /// machine.
    pub(crate) fn deploy_on_gate(&mut self, deployment: i64, answer: GateAnswer) {
        let answer = self.redact_gate(answer);
        let Some(run) = self.deployment.as_ref().filter(|r| r.record.id == deployment) else { return };
        let (app, release) = (run.to.spec.app.clone(), run.to.id);
        let verdict = match answer {
            GateAnswer::Deploy(Err(e)) | GateAnswer::Rollback(Err(e)) => {
                // The tasks' output in it may show a secret they were given.
                GateVerdict::Error { detail: self.redact(&e.to_string()) }
            }
            GateAnswer::Stopped => GateVerdict::Error { detail: "stopped".into() },
            GateAnswer::Deploy(Ok(outcome)) => {
                for line in outcome.report.lines() {
                    self.progress(format!("migration gate: {line}"));
                }
                let record = nonstop_store::ReleaseSchema {
                    fingerprint: outcome.fingerprint.clone(),
                    schema: outcome.schema.clone(),
                    gate_ms: (outcome.seconds * 1000.0) as u64,
                };
                if let Err(e) = self.store.put_release_schema(&app, release, &record) {
                    tracing::warn!("could not record the schema {release} expects: {e}");
                }
                if outcome.breaking {
                    GateVerdict::Breaking {
                        report: format!(
                            "{}\nthe running release would fail against the migrated database. Make the \
                             migration backward-compatible (add first, remove in a later release), or deploy \
                             with `nonstop deploy --allow-breaking` to take the app into maintenance, stop the \
                             old release, run the tasks and start the new one (downtime).",
                            outcome.report.trim_end()
                        ),
                    }
                } else {
                    GateVerdict::Safe
                }
            }
            GateAnswer::Rollback(Ok(None)) => GateVerdict::Safe,
            GateAnswer::Rollback(Ok(Some(report))) => GateVerdict::Breaking {
                report: format!(
                    "{release} expects a schema the database no longer has:\n{}\nits code would fail \
                     against it. Deploy a fix forward instead, or `nonstop rollback {release} --force` if you \
                     know the difference is harmless.",
                    report.trim_end()
                ),
            },
        };
        self.feed(Event::Gate { verdict });
    }
}
