//! One ordered record of what happened at the boundaries, shared by the
//! driver and traffic fakes.

use crate::lock;
use nonstop_core::driver::ExitStatus;
use nonstop_core::traffic::{BackendHealth, InitialHealth};
use nonstop_core::InstanceId;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The driver started an instance.
    Start(InstanceId),
    /// The driver refused to start an instance.
    StartFailed(InstanceId),
    /// The engine asked the driver to stop an instance.
    Stop(InstanceId),
    /// An instance ended (on its own, by the test, or by a stop).
    Exit(InstanceId, ExitStatus),
    /// A one-off task was started (by name).
    RunTask(String),
    /// A one-off task ended (by itself, by the test, or stopped).
    TaskExit(String, ExitStatus),
    /// The engine added a backend.
    Add(InstanceId, InitialHealth),
    /// A backend's health changed.
    Health(InstanceId, BackendHealth),
    /// The engine asked to drain a backend.
    Drain(InstanceId),
    /// The engine removed a backend.
    Remove(InstanceId),
    /// The engine put a route in maintenance (`true`) or took it out.
    Maintenance(bool),
}

impl Entry {
    pub fn instance(&self) -> Option<&InstanceId> {
        match self {
            Entry::Start(i)
            | Entry::StartFailed(i)
            | Entry::Stop(i)
            | Entry::Exit(i, _)
            | Entry::Add(i, _)
            | Entry::Health(i, _)
            | Entry::Drain(i)
            | Entry::Remove(i) => Some(i),
            Entry::RunTask(_) | Entry::TaskExit(..) | Entry::Maintenance(_) => None,
        }
    }
}

/// An entry and when (virtual time) it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub at: Instant,
    pub entry: Entry,
}

/// Cheap to clone; clones share the record.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Mutex<Vec<Record>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for Journal {
    fn default() -> Self {
        Self { inner: Arc::default(), changed: Arc::new(watch::channel(0).0) }
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(lock(&self.inner).iter()).finish()
    }
}

impl Journal {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&self, entry: Entry) {
        lock(&self.inner).push(Record { at: Instant::now(), entry });
        self.bump();
    }

    /// Wake whoever waits in [`Journal::wait_for`] (state changed without
    /// an entry).
    pub fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn records(&self) -> Vec<Record> {
        lock(&self.inner).clone()
    }

    pub fn entries(&self) -> Vec<Entry> {
        lock(&self.inner).iter().map(|r| r.entry.clone()).collect()
    }

    /// Index of the first entry equal to `entry`.
    pub fn position(&self, entry: &Entry) -> Option<usize> {
        lock(&self.inner).iter().position(|r| &r.entry == entry)
    }

    /// When the first entry equal to `entry` happened.
    pub fn time_of(&self, entry: &Entry) -> Option<Instant> {
        lock(&self.inner).iter().find(|r| &r.entry == entry).map(|r| r.at)
    }

    /// Every entry about one instance, in order.
    pub fn about(&self, id: &InstanceId) -> Vec<Entry> {
        lock(&self.inner).iter().filter(|r| r.entry.instance() == Some(id)).map(|r| r.entry.clone()).collect()
    }

    /// Resolve once `cond` holds, re-checking after every change the fakes
    /// make. Fails the test after [`crate::WAIT_LIMIT`] of (virtual) time.
    pub async fn wait_for(&self, what: &str, cond: impl Fn() -> bool) {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if cond() {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        if tokio::time::timeout(crate::WAIT_LIMIT, wait).await.is_err() {
            panic!("timed out waiting for {what}; journal: {self:#?}");
        }
    }
}
