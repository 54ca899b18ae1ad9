//! The orchestrator: the one owner of control-plane state.
//!
//! [`Engine`] is an actor. The API forwards [`Command`]s to it through an
//! [`EngineHandle`]; driver and traffic results come back to it as internal
//! events. It alone decides (with the pure functions of `nonstop-plan`),
//! persists (with `nonstop-store`) and only then acts (through the
//! [`Driver`](nonstop_core::driver::Driver) and
//! [`Traffic`](nonstop_core::traffic::Traffic) traits).
#![forbid(unsafe_code)]

mod actor;
mod degraded;
mod error;
pub mod preflight;
mod report;

pub use actor::gate::{GateFuture, GateInput, GateOutcome, NoSchemaGate, SchemaGate};
pub use actor::statics::{live_statics_at_start, LiveStatics};
pub use actor::{
    BuildNote, BuildOutput, Builder, DeployOptions, Engine, EngineConfig, EngineHandle, Ingress, IngressError,
    InstanceLogs, NoBuilder, RollbackOptions,
};
pub use error::EngineError;
pub use report::*;
