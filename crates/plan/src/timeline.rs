//! A deployment's timeline: what one move of the deployment machine
//! ([`advance`](crate::deployment::advance)) means to a person reading the
//! history: the phase it entered, a gate's verdict, how it ended. Pure: the
//! engine calls [`steps`] with the deployment before and after an event and
//! stores what it returns; the dashboard and `history --json` show it.

use crate::deployment::{judge, CanaryVerdict, Deployment, Event, GateVerdict, Outcome, Phase};
use serde::{Deserialize, Serialize};

/// What a timeline step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// The deployment entered a phase (`building`, `rolling web`, `rolling
    /// back: ...`).
    Phase,
    /// The migration gate's verdict.
    Gate,
    /// The live-traffic gate's verdict on one canary window.
    Canary,
    /// How the deployment ended (always its last step).
    Outcome,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Phase => "phase",
            StepKind::Gate => "gate",
            StepKind::Canary => "canary",
            StepKind::Outcome => "outcome",
        }
    }

    pub fn parse(s: &str) -> Option<StepKind> {
        [StepKind::Phase, StepKind::Gate, StepKind::Canary, StepKind::Outcome].into_iter().find(|k| k.as_str() == s)
    }
}

/// How a step went: a verdict that passed or a success, one that failed
/// (or a rollback), or neither (entering a phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tone {
    Neutral,
    Good,
    /// A suspicion (one slow canary window, an inconclusive one).
    Warning,
    Bad,
}

impl Tone {
    pub fn as_str(self) -> &'static str {
        match self {
            Tone::Neutral => "neutral",
            Tone::Good => "good",
            Tone::Warning => "warning",
            Tone::Bad => "bad",
        }
    }

    pub fn parse(s: &str) -> Option<Tone> {
        [Tone::Neutral, Tone::Good, Tone::Warning, Tone::Bad].into_iter().find(|t| t.as_str() == s)
    }
}

/// One step of a deployment's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub kind: StepKind,
    pub tone: Tone,
    /// What happened, in words (`rolling web`, `migration gate: safe`).
    pub text: String,
}

impl Step {
    fn new(kind: StepKind, tone: Tone, text: impl Into<String>) -> Step {
        Step { kind, tone, text: text.into() }
    }
}

/// The steps that moving `before` by `event` to `after` adds to the
/// timeline: a verdict the event carried, then the phase entered (once per
/// phase: a phase entered again with the same words adds nothing, except
/// at `Begin`), the outcome last.
pub fn steps(before: &Deployment, event: &Event, after: &Deployment) -> Vec<Step> {
    let mut out = Vec::new();
    if before.is_done() {
        return out;
    }
    match (&before.phase, event) {
        (Phase::MigrationGate, Event::Gate { verdict }) => out.push(match verdict {
            GateVerdict::Safe => Step::new(StepKind::Gate, Tone::Good, "migration gate: safe"),
            GateVerdict::Breaking { report } => {
                Step::new(StepKind::Gate, Tone::Bad, format!("migration gate: breaking: {report}"))
            }
            GateVerdict::Error { detail } => {
                Step::new(StepKind::Gate, Tone::Bad, format!("migration gate could not run: {detail}"))
            }
        }),
        (Phase::Canary { step }, Event::CanaryWindow { step: s, old, new }) if s == step => {
            let percent = before.shape.ramp.get(*step).map_or(0, |r| r.percent);
            let figures = format!(
                "new release {} requests, {:.1}% 5xx, p95 {:.0} ms; old {} requests, {:.1}% 5xx, p95 {:.0} ms",
                new.requests,
                new.error_rate() * 100.0,
                new.p95_ms,
                old.requests,
                old.error_rate() * 100.0,
                old.p95_ms
            );
            let (tone, verdict) = match judge(old, new, &before.margins) {
                CanaryVerdict::Pass => (Tone::Good, "pass".to_string()),
                CanaryVerdict::Inconclusive => (Tone::Warning, "inconclusive (too few requests)".to_string()),
                CanaryVerdict::Slow { why } => (Tone::Warning, format!("slow: {why}")),
                CanaryVerdict::Fail { why } => (Tone::Bad, format!("fail: {why}")),
            };
            out.push(Step::new(StepKind::Canary, tone, format!("canary at {percent}%: {verdict} ({figures})")));
        }
        _ => {}
    }
    let entered = describe(after);
    if matches!(event, Event::Begin) || entered != describe(before) {
        out.push(entered);
    }
    out
}

/// The phase a deployment is in, as a step.
pub fn describe(d: &Deployment) -> Step {
    let process = |index: usize| d.shape.order.get(index).map(|p| p.to_string()).unwrap_or_default();
    match &d.phase {
        Phase::Rolling { index } => Step::new(StepKind::Phase, Tone::Neutral, format!("rolling {}", process(*index))),
        Phase::Canary { step } => {
            let percent = d.shape.ramp.get(*step).map_or(0, |r| r.percent);
            let web = d.shape.canary.as_ref().map(|p| p.to_string()).unwrap_or_default();
            Step::new(StepKind::Phase, Tone::Neutral, format!("canary: {percent}% of {web} to the new release"))
        }
        Phase::RollingBack { failure, .. } => {
            Step::new(StepKind::Phase, Tone::Bad, format!("rolling back: {}", failure.detail))
        }
        Phase::Done { outcome } => match outcome {
            Outcome::Succeeded { note: None } => Step::new(StepKind::Outcome, Tone::Good, "succeeded"),
            Outcome::Succeeded { note: Some(n) } => {
                Step::new(StepKind::Outcome, Tone::Warning, format!("succeeded; {}", n.detail))
            }
            Outcome::Failed { failure } => {
                Step::new(StepKind::Outcome, Tone::Bad, format!("failed: {}", failure.detail))
            }
            Outcome::RolledBack { failure } => {
                Step::new(StepKind::Outcome, Tone::Bad, format!("rolled back: {}", failure.detail))
            }
        },
        other => Step::new(StepKind::Phase, Tone::Neutral, other.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_tones_read_back() {
        for k in [StepKind::Phase, StepKind::Gate, StepKind::Canary, StepKind::Outcome] {
            assert_eq!(StepKind::parse(k.as_str()), Some(k));
        }
        for t in [Tone::Neutral, Tone::Good, Tone::Warning, Tone::Bad] {
            assert_eq!(Tone::parse(t.as_str()), Some(t));
        }
        assert_eq!(StepKind::parse("nope"), None);
        assert_eq!(Tone::parse(""), None);
    }
}
