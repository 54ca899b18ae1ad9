//! The migration compatibility gate: does a release's migration break the
//! release that runs now?
//!
//! - [`model`]: a database schema as data, with a stable
//!   [`Schema::fingerprint`] to store per release;
//! - [`catalog`]: reads it from a live PostgreSQL database (read-only);
//! - [`diff`] (pure): what changed between two schemas, and
//!   [`classify`]: safe while the old release runs, or breaking and why;
//! - [`scratch`]: [`run_gate`] copies the schema into a scratch database
//!   on the same server, runs the release tasks there, diffs, and always
//!   drops the scratch database; [`check_access`] is the preflight;
//! - [`env_for`] (pure): the variables that point an app at a database
//!   (`DATABASE_URL`, or a map of variables to URL parts).
//!
//! The URL type and the `[database]` spec are `nonstop_core::database`'s.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod diff;
mod env;
mod error;
pub mod model;
pub mod scratch;
pub mod tools;

pub use diff::{breaking_for, classified, classify, diff, Change, Classified, Compatibility, Rule};
pub use env::env_for;
pub use error::{GateError, TasksFailed};
pub use model::Schema;
pub use scratch::{
    check_access, connect, read_schema, run_gate, run_shell_tasks, GateOptions, GateReport, GateTimings, ServerInfo,
};
