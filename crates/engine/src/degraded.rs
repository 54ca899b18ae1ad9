//! The engine while its store cannot be written (a full disk, a read-only
//! file system): nothing is started without its `launching` record (the
//! invariant stays), but
//!
//! - a slot whose start could not be recorded is retried soon, on a short
//!   bounded backoff ([`retry_delay`], at most [`RETRY_MAX`]), so an
//!   instance is back within seconds of space being freed;
//! - the reason is in `status` (the slot, and the store's last error);
//! - events that could not be written are kept in memory (the newest
//!   [`EVENT_RING`]), shown by `events`, and written, in order, once the
//!   store takes writes again.
//!
//! Only bookkeeping lives here; the actor decides and acts.

use nonstop_core::{AppName, ProcessName};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

/// The first retry after a failed store write.
pub(crate) const RETRY_FIRST: Duration = Duration::from_millis(250);
/// Retries never wait longer than this.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(2);
/// Events kept in memory while the store cannot take them.
pub(crate) const EVENT_RING: usize = 1000;

/// The wait before retry number `attempt` (0 for the first): doubling from
/// [`RETRY_FIRST`], capped at [`RETRY_MAX`].
pub(crate) fn retry_delay(attempt: u32) -> Duration {
    RETRY_FIRST.saturating_mul(1u32 << attempt.min(16)).min(RETRY_MAX)
}

/// An event not written yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingEvent {
    pub(crate) app: AppName,
    pub(crate) at: SystemTime,
    pub(crate) kind: nonstop_store::EventKind,
    pub(crate) instance: Option<String>,
    pub(crate) message: String,
}

/// The last failed store write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreFailure {
    /// What could not be written, e.g. "the record of web.1#4".
    pub(crate) what: String,
    pub(crate) error: String,
    pub(crate) since: SystemTime,
}

#[derive(Debug, Default)]
pub(crate) struct Degraded {
    failure: Option<StoreFailure>,
    /// Slots whose start could not be recorded, with why.
    blocked: BTreeMap<(ProcessName, u32), String>,
    attempts: u32,
    retry_at: Option<Instant>,
    events: VecDeque<PendingEvent>,
    /// Events dropped from a full ring.
    dropped: u64,
}

impl Degraded {
    /// A store write failed: remembered for `status`, and a retry is
    /// scheduled.
    pub(crate) fn write_failed(&mut self, what: &str, error: &dyn std::fmt::Display, wall: SystemTime, now: Instant) {
        let error = error.to_string();
        let since = match &self.failure {
            Some(f) if f.error == error => f.since,
            _ => wall,
        };
        self.failure = Some(StoreFailure { what: what.to_string(), error, since });
        self.schedule(now);
    }

    /// A store write worked: the store takes writes again.
    pub(crate) fn write_worked(&mut self) {
        self.failure = None;
        if self.blocked.is_empty() && self.events.is_empty() {
            self.attempts = 0;
            self.retry_at = None;
        }
    }

    fn schedule(&mut self, now: Instant) {
        let at = now + retry_delay(self.attempts);
        self.attempts = self.attempts.saturating_add(1);
        self.retry_at = Some(at);
    }

    /// The start of `slot` could not be recorded (so it was not started).
    pub(crate) fn start_blocked(
        &mut self,
        slot: (ProcessName, u32),
        error: &dyn std::fmt::Display,
        wall: SystemTime,
        now: Instant,
    ) {
        let what = format!("the launch record of {}.{}", slot.0, slot.1);
        self.blocked.insert(slot, format!("store write failed: {error}"));
        self.write_failed(&what, error, wall, now);
    }

    /// The start of `slot` was recorded (and goes ahead).
    pub(crate) fn start_recorded(&mut self, slot: &(ProcessName, u32)) {
        self.blocked.remove(slot);
        self.write_worked();
    }

    /// Slots no longer wanted (scaled down, app down) are not waited for.
    pub(crate) fn forget_slots(&mut self, wanted: impl Fn(&(ProcessName, u32)) -> bool) {
        self.blocked.retain(|slot, _| wanted(slot));
    }

    /// `slot` waits for its retry: its start is not tried again before
    /// (the store, and the log, are not hammered at every step).
    pub(crate) fn holds(&self, slot: &(ProcessName, u32), now: Instant) -> bool {
        self.blocked.contains_key(slot) && self.retry_at.is_some_and(|t| t > now)
    }

    /// Why `slot` cannot start, if its start could not be recorded.
    pub(crate) fn blocked(&self, slot: &(ProcessName, u32)) -> Option<&str> {
        self.blocked.get(slot).map(String::as_str)
    }

    pub(crate) fn blocked_slots(&self) -> impl Iterator<Item = &(ProcessName, u32)> {
        self.blocked.keys()
    }

    /// When the actor should wake to retry (only a time still ahead).
    pub(crate) fn next_wake(&self, now: Instant) -> Option<Instant> {
        self.retry_at.filter(|t| *t > now)
    }

    /// A retry is due: events are flushed, blocked slots tried again.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|t| t <= now)
    }

    /// Keep an event the store did not take. The oldest goes when full.
    pub(crate) fn keep_event(&mut self, event: PendingEvent) {
        if self.events.len() >= EVENT_RING {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(event);
    }

    pub(crate) fn pending_events(&self) -> impl Iterator<Item = &PendingEvent> {
        self.events.iter()
    }

    #[cfg(test)]
    pub(crate) fn pending_count(&self) -> usize {
        self.events.len()
    }

    #[cfg(test)]
    pub(crate) fn dropped_events(&self) -> u64 {
        self.dropped
    }

    /// Write the kept events, oldest first, through `write`, stopping at
    /// the first that fails (it stays, with those after it). Returns the
    /// error that stopped it, if any.
    pub(crate) fn flush_events<E>(&mut self, mut write: impl FnMut(&PendingEvent) -> Result<(), E>) -> Result<(), E> {
        while let Some(ev) = self.events.front() {
            write(ev)?;
            self.events.pop_front();
        }
        Ok(())
    }

    /// What `status` says of the store, if it fails.
    pub(crate) fn status_line(&self, wall: SystemTime) -> Option<String> {
        let f = self.failure.as_ref()?;
        let since = wall.duration_since(f.since).unwrap_or_default().as_secs();
        let mut line = format!("cannot write the store ({}): {}", f.what, f.error);
        if !self.events.is_empty() {
            line.push_str(&format!("; {} event(s) kept in memory until it can", self.events.len()));
        }
        if self.dropped > 0 {
            line.push_str(&format!(" ({} older ones dropped)", self.dropped));
        }
        line.push_str(&format!("; failing for {since}s; free space where the store lives"));
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot(p: &str, n: u32) -> (ProcessName, u32) {
        (ProcessName::new(p).unwrap(), n)
    }

    proptest! {
        #[test]
        fn retries_are_bounded_and_never_shrink(a in 0u32..10_000, b in 0u32..10_000) {
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(retry_delay(hi) <= RETRY_MAX);
            prop_assert!(retry_delay(lo) >= RETRY_FIRST.min(RETRY_MAX));
            prop_assert!(retry_delay(lo) <= retry_delay(hi));
        }
    }

    #[test]
    fn a_blocked_start_is_retried_soon_and_forgotten_once_recorded() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut d = Degraded::default();
        d.start_blocked(slot("web", 1), &"database or disk is full", wall, t0);
        assert_eq!(d.next_wake(t0), Some(t0 + RETRY_FIRST));
        assert!(d.holds(&slot("web", 1), t0) && !d.holds(&slot("web", 2), t0));
        assert_eq!(d.blocked(&slot("web", 1)), Some("store write failed: database or disk is full"));
        assert!(d.status_line(wall).unwrap().contains("database or disk is full"));
        let t1 = t0 + RETRY_FIRST;
        assert!(d.due(t1) && !d.holds(&slot("web", 1), t1));
        d.start_blocked(slot("web", 1), &"database or disk is full", wall, t1);
        assert_eq!(d.next_wake(t1), Some(t1 + RETRY_FIRST * 2));
        d.start_recorded(&slot("web", 1));
        assert_eq!(d.blocked(&slot("web", 1)), None);
        assert_eq!(d.status_line(wall), None);
        assert_eq!(d.next_wake(t1), None);
    }

    #[test]
    fn kept_events_are_flushed_in_order_and_stop_at_a_failure() {
        let mut d = Degraded::default();
        let ev = |n: u32| PendingEvent {
            app: AppName::new("blog").unwrap(),
            at: SystemTime::UNIX_EPOCH,
            kind: nonstop_store::EventKind::Exit,
            instance: None,
            message: n.to_string(),
        };
        for n in 0..(EVENT_RING as u32 + 2) {
            d.keep_event(ev(n));
        }
        assert_eq!(d.pending_count(), EVENT_RING);
        assert_eq!(d.dropped_events(), 2);
        assert_eq!(d.pending_events().next().unwrap().message, "2");
        let mut written = Vec::new();
        let r = d.flush_events(|e| {
            if written.len() == 3 {
                return Err("full");
            }
            written.push(e.message.clone());
            Ok(())
        });
        assert_eq!(r, Err("full"));
        assert_eq!(written, ["2", "3", "4"]);
        assert_eq!(d.pending_events().next().unwrap().message, "5");
        assert_eq!(d.flush_events(|_| Ok::<(), ()>(())), Ok(()));
        assert_eq!(d.pending_count(), 0);
    }
}
