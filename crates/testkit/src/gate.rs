//! [`FakeSchemaGate`]: the migration gate's boundary, answered as the test
//! says, with every call recorded.

use nonstop_core::database::DatabaseSpec;
use nonstop_engine::{GateFuture, GateInput, GateOutcome, SchemaGate, SchemaGateError};
use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Default)]
pub struct FakeSchemaGate {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    checks: Vec<GateInput>,
    behinds: usize,
    check_answers: VecDeque<Result<GateOutcome, SchemaGateError>>,
    behind_answers: VecDeque<Result<Option<String>, SchemaGateError>>,
}

impl FakeSchemaGate {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An outcome for the next `check` (default: all safe).
    pub fn answer_check(&self, answer: Result<GateOutcome, SchemaGateError>) {
        self.state().check_answers.push_back(answer);
    }

    /// An answer for the next `behind` (default: nothing breaks).
    pub fn answer_behind(&self, answer: Result<Option<String>, SchemaGateError>) {
        self.state().behind_answers.push_back(answer);
    }

    /// What each `check` was asked to run.
    pub fn checks(&self) -> Vec<GateInput> {
        self.state().checks.clone()
    }

    pub fn behinds(&self) -> usize {
        self.state().behinds
    }
}

/// A gate outcome: `breaking` or not, its report, a schema naming `tag`.
pub fn gate_outcome(breaking: bool, report: &str, tag: &str) -> GateOutcome {
    GateOutcome {
        breaking,
        report: report.to_string(),
        fingerprint: format!("fp-{tag}"),
        schema: serde_json::json!({ "tag": tag }),
        seconds: 1.5,
    }
}

impl SchemaGate for FakeSchemaGate {
    fn check(&self, input: GateInput) -> GateFuture<GateOutcome> {
        let mut st = self.state();
        st.checks.push(input);
        let answer = st.check_answers.pop_front().unwrap_or_else(|| Ok(gate_outcome(false, "all safe", "safe")));
        Box::pin(async move { answer })
    }

    fn behind(&self, _: DatabaseSpec, _: serde_json::Value) -> GateFuture<Option<String>> {
        let mut st = self.state();
        st.behinds += 1;
        let answer = st.behind_answers.pop_front().unwrap_or(Ok(None));
        Box::pin(async move { answer })
    }
}
