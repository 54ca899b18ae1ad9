//! Pure decisions. Nothing in this crate does I/O or reads a clock: time
//! comes in as `now`, state comes in as values, and decisions go out as
//! data for the engine to carry out. That makes every rule here testable
//! exhaustively, which the tests do.
#![forbid(unsafe_code)]

pub mod autoscale;
pub mod backoff;
pub mod counts;
pub mod deploy;
pub mod deployment;
pub mod diff;
#[cfg(test)]
mod fixtures;
pub mod reconcile;
pub mod rollout;
pub mod statics;
pub mod stopped;
pub mod timeline;

pub use backoff::SlotBackoff;
pub use reconcile::{reconcile, Action, Decision, Observed, ObservedInstance, Phase};
pub use rollout::{rollout_step, NewPhase, OldPhase, RolloutAction, RolloutParams, RolloutSlot, RolloutStep};
