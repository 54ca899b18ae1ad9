//! The engine against fakes of every boundary (`nonstop-testkit`), on
//! paused tokio time: minutes of health timeouts and backoff run in no
//! real time, and time-based assertions are exact.

mod autoscale;
mod base_services;
mod cancel;
mod config;
mod counts;
mod deadlines;
mod env_commands;
mod environments;
mod errors;
mod gates;
mod health_events;
mod lifecycle;
mod promote;
mod readoption;
mod restarts;
mod rollout;
mod secrets;
mod stopped;
mod store_full;
mod tasks;

use nonstop_core::driver::ExitStatus;
use nonstop_core::{InstanceId, ProcessName};
use nonstop_engine::StatusReport;
use nonstop_testkit::{pn, Entry, Fixture, RunningEngine};
use std::time::Duration;

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub const CRASH: ExitStatus = ExitStatus::Code(1);

/// Live instance ids of `process` as the driver sees them.
pub fn alive(f: &Fixture, process: &str) -> Vec<InstanceId> {
    f.driver.alive_of(&pn(process))
}

/// The instance ids `status` lists for `process`.
pub fn status_ids(st: &StatusReport, process: &str) -> Vec<String> {
    st.instances.iter().filter(|i| i.process == process).map(|i| i.id.clone()).collect()
}

pub fn ready_of(st: &StatusReport, process: &str) -> (u32, u32) {
    let p = st.processes.iter().find(|p| p.process == process).unwrap_or_else(|| panic!("no {process} in {st:#?}"));
    (p.ready, p.desired)
}

/// Position of an entry in the journal, failing the test if absent.
pub fn pos(f: &Fixture, entry: &Entry) -> usize {
    f.journal.position(entry).unwrap_or_else(|| panic!("{entry:?} not in the journal: {:#?}", f.journal))
}

pub fn slots(ids: &[InstanceId]) -> Vec<u32> {
    let mut s: Vec<u32> = ids.iter().map(|i| i.slot).collect();
    s.sort();
    s
}

pub fn names(ids: &[InstanceId]) -> Vec<String> {
    ids.iter().map(|i| i.to_string()).collect()
}

pub fn process(name: &str) -> ProcessName {
    pn(name)
}

/// Wait until `status` shows an operation containing `contains`, without
/// sleeping: paused time does not advance while a blocking task (a held
/// hash) runs.
pub async fn wait_operation(e: &RunningEngine, contains: &str) {
    for _ in 0..10_000 {
        if e.status().await.ok().and_then(|s| s.operation).is_some_and(|o| o.contains(contains)) {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the operation never showed {contains:?}");
}
