//! The daemon's migration gate: `nonstop-schema`'s PostgreSQL gate behind
//! the engine's [`SchemaGate`] boundary.

use nonstop_core::database::DatabaseSpec;
use nonstop_engine::{GateFuture, GateInput, GateOutcome, SchemaGate, SchemaGateError};
use nonstop_schema::{breaking_for, env_for, Schema};
use nonstop_schema::{read_schema, run_gate, run_shell_tasks, GateOptions};
use std::collections::BTreeMap;

pub struct PgSchemaGate;

impl SchemaGate for PgSchemaGate {
    fn check(&self, input: GateInput) -> GateFuture<GateOutcome> {
        Box::pin(async move {
            let GateInput { database, tasks, dir, env, timeout } = input;
            let opts = GateOptions { tasks_timeout: timeout, ..GateOptions::default() };
            let mapping = database.env.clone();
            let report = run_gate(&database.url, &opts, move |scratch| {
                // The release's environment with every `[database]`
                // variable pointing at the scratch copy instead.
                let mut vars: BTreeMap<String, String> = env.into_iter().collect();
                vars.extend(env_for(&scratch, &mapping));
                run_shell_tasks(tasks, dir, vars.into_iter().collect())
            })
            .await
            .map_err(|e| SchemaGateError::failed(database.url.redact_in(&e.to_string()), e))?;
            let schema = serde_json::to_value(&report.after).map_err(|e| SchemaGateError::Encode(e.into()))?;
            Ok(GateOutcome {
                breaking: report.is_breaking(),
                report: report.render(),
                fingerprint: report.after_fingerprint.clone(),
                schema,
                seconds: report.timings.total_s,
            })
        })
    }

    fn behind(&self, database: DatabaseSpec, expected: serde_json::Value) -> GateFuture<Option<String>> {
        Box::pin(async move {
            let expected: Schema = serde_json::from_value(expected).map_err(|e| SchemaGateError::Decode(e.into()))?;
            let actual = read_schema(&database.url, &GateOptions::default())
                .await
                .map_err(|e| SchemaGateError::failed(database.url.redact_in(&e.to_string()), e))?;
            let breaking = breaking_for(&expected, &actual);
            if breaking.is_empty() {
                return Ok(None);
            }
            let mut out = String::new();
            for c in breaking {
                if let nonstop_schema::Compatibility::Breaking { why, .. } = &c.compatibility {
                    out.push_str(&format!("  BREAKING  {}\n            {why}\n", c.summary));
                }
            }
            Ok(Some(out))
        })
    }
}
