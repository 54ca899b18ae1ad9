//! Test doubles for nonstop's boundaries, for tests only (a
//! dev-dependency, never shipped).
//!
//! - [`FakeDriver`]: instances live in a table; the test makes them exit,
//!   makes starts fail and stops hang, and reads back every call.
//! - [`FakeTraffic`]: backends in a table; the test sets their health (or
//!   lets them turn healthy by themselves) and reads back adds, drains and
//!   how many backends were in rotation at the worst moment.
//! - [`FakeIngress`], [`FakeLogs`]: the engine's two small ports.
//! - [`FakeBuilder`]: releases "built" in no time, in the source directory.
//! - [`FakeBaseServices`]: `[base]`'s servers in memory (databases by
//!   name, Redis numbers, a server that does not answer on demand).
//! - [`TokioClock`]: a [`Clock`](nonstop_core::Clock) on tokio's time, so a
//!   test on paused time (`#[tokio::test(start_paused = true)]`) runs
//!   minutes of timeouts and backoff in no real time.
//! - [`spec`]: build an [`AppSpec`](nonstop_core::process::AppSpec) in a
//!   line, without TOML.
//! - [`Fixture`]: all of the above wired to a real engine.
//!
//! The driver and the traffic fake write to one shared [`Journal`], so a
//! test can check the order of things across both (drained before stopped).
#![forbid(unsafe_code)]

mod base;
mod builder;
mod clock;
mod driver;
mod fixture;
mod gate;
mod journal;
mod ports;
pub mod spec;
mod traffic;

pub use base::{FakeBaseServices, FAKE_DB_SERVER};
pub use builder::FakeBuilder;
pub use clock::TokioClock;
pub use driver::{DriverCall, DriverSnapshot, FakeDriver, Lifetime, StopBehavior, TaskRun};
pub use fixture::{settle, within, Fixture, Pending, RunningEngine};
pub use gate::{gate_outcome, FakeSchemaGate};
pub use journal::{Entry, Journal, Record};
pub use ports::{FakeIngress, FakeLogs, HostsCall};
pub use traffic::{AddCall, AutoHealth, FakeTraffic};

use nonstop_core::ProcessName;

/// A process name from a literal, for tests.
pub fn pn(name: &str) -> ProcessName {
    ProcessName::new(name).unwrap_or_else(|e| panic!("{e}"))
}

/// How long (virtual time) a `wait_for` waits before failing the test.
pub const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
