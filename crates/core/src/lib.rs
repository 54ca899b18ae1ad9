//! Domain vocabulary shared by every nonstop crate.
//!
//! This crate does no I/O and reads no clock: it holds identifiers, the
//! validated shapes that flow from the spec to the drivers, and the traits
//! at the boundaries (driver, traffic, ingress, clock). Everything else
//! depends on it; it depends on nothing of ours.
#![forbid(unsafe_code)]

pub mod autoscale;
pub mod build;
pub mod clock;
pub mod config;
pub mod counts;
pub mod database;
pub mod driver;
pub mod environment;
pub mod ids;
pub mod ingress;
pub mod logline;
pub mod maintenance;
pub mod process;
pub mod traffic;

pub use clock::{Clock, SystemClock};
pub use counts::{CountSource, RuntimeCount};
pub use ids::{AppEnv, AppName, EnvironmentId, InstanceId, ProcessName, ReleaseId};
pub use process::{HealthCheck, ProcessKind, ProcessSpec, RestartPolicy, Signal};
