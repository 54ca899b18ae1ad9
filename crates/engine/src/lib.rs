//! The orchestrator: the one owner of control-plane state.
//!
//! [`Engine`] runs one controller (an actor) per app and environment. The
//! API sends commands through an [`EngineHandle`], which names an app and
//! an environment; driver and traffic results come back to each controller
//! as internal events. A controller alone decides for its environment (with
//! the pure functions of `nonstop-plan`), persists (with `nonstop-store`)
//! and only then acts (through the
//! [`Driver`](nonstop_core::driver::Driver) and
//! [`Traffic`](nonstop_core::traffic::Traffic) traits).
#![forbid(unsafe_code)]

mod controller;
mod degraded;
mod engine;
mod error;
pub mod preflight;
mod report;

pub use controller::autoscale::AutoscaleSample;
pub use controller::base::{
    is_base_secret, BaseFuture, BaseReady, BaseRequest, BaseServiceError, BaseServices, CopiedDatabase,
    DroppedDatabase, FlushedRedis, NoBaseServices, PostgresRequest, ProvisionedDatabase, RedisRequest, RedisShare,
    BASE_DATABASE_SECRET, BASE_REDIS_SECRET, REDIS_KEY_PREFIX_VAR, REDIS_URL_VAR,
};
pub use controller::config::{credential_refusal, ConfigReport};
pub use controller::environments::{CreateEnvironment, DestroyEnvironment};
pub use controller::gate::{GateFuture, GateInput, GateOutcome, NoSchemaGate, SchemaGate, SchemaGateError};
pub use controller::promote::PromoteRequest;
pub use controller::queue::{QueueRead, QueueRedis};
pub use controller::secrets::{
    EnvironmentSecrets, SecretInfo, SecretReport, SecretsKeyConfig, SecretsList, SecretsReadError,
};
pub use controller::statics::{live_statics_at_start, LiveStatics};
pub use controller::{
    BuildError, BuildNote, BuildOutput, Builder, DeployOptions, EngineConfig, Ingress, IngressError, InstanceLogs,
    NoBuilder, RollbackOptions,
};
pub use engine::{Engine, EngineHandle};
pub use error::EngineError;
pub use report::*;
