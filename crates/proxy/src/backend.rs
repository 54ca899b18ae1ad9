//! One instance as the proxy sees it: health (an atomic read on every
//! request, changed under a small lock by the checker and by passive
//! failures), the in-flight counter, and the pool of idle upstream
//! connections.

use crate::outlier::After5xx;
use crate::upstream::Upstream;
use nonstop_core::ids::InstanceId;
use nonstop_core::process::HealthCheck;
use nonstop_core::traffic::{
    latency_bucket, BackendFigures, BackendHealth, BackendStatus, LatencyHistogram, LATENCY_BUCKETS,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How many check results `BackendStatus::last_checks` keeps.
pub(crate) const LAST_CHECKS: usize = 5;

fn encode(h: BackendHealth) -> u8 {
    match h {
        BackendHealth::Pending => 0,
        BackendHealth::Healthy => 1,
        BackendHealth::Unhealthy => 2,
        BackendHealth::Draining => 3,
    }
}

fn decode(v: u8) -> BackendHealth {
    match v {
        0 => BackendHealth::Pending,
        1 => BackendHealth::Healthy,
        2 => BackendHealth::Unhealthy,
        _ => BackendHealth::Draining,
    }
}

const HEALTHY: u8 = 1;
const DRAINING: u8 = 3;

/// Health with hysteresis, as pure state: the checker and the request path
/// feed it results, it answers with the new health when it changes.
#[derive(Debug, Clone)]
pub(crate) struct HealthMachine {
    pub health: BackendHealth,
    passes: u32,
    fails: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl HealthMachine {
    pub fn new(initial: BackendHealth, check: &HealthCheck) -> Self {
        Self {
            health: initial,
            passes: 0,
            fails: 0,
            healthy_threshold: check.healthy_threshold.max(1),
            unhealthy_threshold: check.unhealthy_threshold.max(1),
        }
    }

    fn set(&mut self, health: BackendHealth) -> Option<BackendHealth> {
        if self.health == health {
            None
        } else {
            self.health = health;
            Some(health)
        }
    }

    /// An active check result. Pending/Unhealthy become Healthy after
    /// `healthy_threshold` passes in a row; Healthy becomes Unhealthy after
    /// `unhealthy_threshold` failures in a row. A pending instance that
    /// fails stays pending (it never served).
    pub fn observe(&mut self, pass: bool) -> Option<BackendHealth> {
        if self.health == BackendHealth::Draining {
            return None;
        }
        if pass {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            if self.health != BackendHealth::Healthy && self.passes >= self.healthy_threshold {
                return self.set(BackendHealth::Healthy);
            }
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            if self.health == BackendHealth::Healthy && self.fails >= self.unhealthy_threshold {
                return self.set(BackendHealth::Unhealthy);
            }
        }
        None
    }

    /// A request proved the instance down (connection refused): out of
    /// rotation at once, back after `healthy_threshold` passes.
    pub fn passive_failure(&mut self) -> Option<BackendHealth> {
        if self.health == BackendHealth::Draining {
            return None;
        }
        self.passes = 0;
        self.set(BackendHealth::Unhealthy)
    }

    pub fn drain(&mut self) -> Option<BackendHealth> {
        self.set(BackendHealth::Draining)
    }

    /// Ejected as an outlier: out of rotation now (from Healthy only),
    /// passes counted again from zero.
    pub fn eject(&mut self) -> Option<BackendHealth> {
        if self.health != BackendHealth::Healthy {
            return None;
        }
        self.passes = 0;
        self.fails = 0;
        self.set(BackendHealth::Unhealthy)
    }

    /// A pass while an ejection holds the backend out: not counted
    /// (passes start again from zero when it ends).
    pub fn hold(&mut self) {
        self.passes = 0;
    }
}

/// A backend's answers, counted on the request path with relaxed atomics
/// on the backend the request already holds: one increment per answer
/// (its latency bucket; the number of answers is their sum), one more
/// per answer that is not a 2xx (its status class; 2xx are the rest), one
/// more per failed attempt, and one load of the 5xx streak per other
/// answer.
pub(crate) struct Counters {
    /// Answers by latency bucket ([`nonstop_core::traffic::LATENCY_BOUNDS_US`]).
    latency: [AtomicU64; LATENCY_BUCKETS + 1],
    errors_5xx: AtomicU64,
    /// 1xx, 3xx and 4xx answers (status classes 1, 3, 4).
    classes: [AtomicU64; 3],
    /// Failed attempts (also counted as 5xx).
    upstream_errors: AtomicU64,
    /// 5xx answers in a row.
    streak: AtomicU32,
    /// The peers' non-5xx and 5xx answers when the streak began.
    mark_ok: AtomicU64,
    mark_5xx: AtomicU64,
}

impl Counters {
    fn new() -> Self {
        Self {
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            errors_5xx: AtomicU64::new(0),
            classes: std::array::from_fn(|_| AtomicU64::new(0)),
            upstream_errors: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            mark_ok: AtomicU64::new(0),
            mark_5xx: AtomicU64::new(0),
        }
    }

    /// Count one answer with `status`, `latency` after the request was
    /// forwarded (`failed`: the proxy's answer for a failed attempt). For a
    /// 5xx, says what the outlier detection has to do (`threshold`: its
    /// 5xx in a row; 0: nothing).
    #[inline]
    pub fn answered(&self, latency: Duration, status: u16, failed: bool, threshold: u32) -> After5xx {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency[latency_bucket(us)].fetch_add(1, Ordering::Relaxed);
        let is_5xx = status >= 500;
        match status / 100 {
            1 => self.classes[0].fetch_add(1, Ordering::Relaxed),
            3 => self.classes[1].fetch_add(1, Ordering::Relaxed),
            4 => self.classes[2].fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        if failed {
            self.upstream_errors.fetch_add(1, Ordering::Relaxed);
        }
        if !is_5xx {
            // A load, and a store only when a streak ends: the line stays
            // shared between workers while the instance answers well.
            if self.streak.load(Ordering::Relaxed) != 0 {
                self.streak.store(0, Ordering::Relaxed);
            }
            return After5xx::Nothing;
        }
        self.errors_5xx.fetch_add(1, Ordering::Relaxed);
        let streak = self.streak.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if threshold == 0 {
            After5xx::Nothing
        } else if streak == 1 {
            After5xx::Mark
        } else if streak.is_multiple_of(threshold) {
            After5xx::Judge
        } else {
            After5xx::Nothing
        }
    }

    /// Answers and 5xx answers so far (5xx read first, and never more than
    /// the answers).
    pub fn answers_and_errors(&self) -> (u64, u64) {
        let errors = self.errors_5xx.load(Ordering::Relaxed);
        let answers = self.latency.iter().fold(0u64, |sum, c| sum.saturating_add(c.load(Ordering::Relaxed)));
        (answers, errors.min(answers))
    }

    pub fn figures(&self, instance: &InstanceId) -> BackendFigures {
        let errors = self.errors_5xx.load(Ordering::Relaxed);
        let latency = LatencyHistogram { counts: self.latency.iter().map(|c| c.load(Ordering::Relaxed)).collect() };
        let requests = latency.total();
        let class = |i: usize| self.classes[i].load(Ordering::Relaxed);
        BackendFigures {
            instance: instance.clone(),
            requests,
            errors_5xx: errors.min(requests),
            latency,
            responses_1xx: class(0),
            responses_3xx: class(1),
            responses_4xx: class(2),
            upstream_errors: self.upstream_errors.load(Ordering::Relaxed),
        }
    }

    pub fn streak(&self) -> u32 {
        self.streak.load(Ordering::Relaxed)
    }

    pub fn reset_streak(&self) {
        self.streak.store(0, Ordering::Relaxed);
    }

    pub fn mark_peers(&self, ok: u64, errors: u64) {
        self.mark_ok.store(ok, Ordering::Relaxed);
        self.mark_5xx.store(errors, Ordering::Relaxed);
    }

    pub fn marked_peers(&self) -> (u64, u64) {
        (self.mark_ok.load(Ordering::Relaxed), self.mark_5xx.load(Ordering::Relaxed))
    }
}

/// The part of a backend's state that changes rarely (health transitions,
/// check results): behind one small lock, never taken per request.
pub(crate) struct Slow {
    pub machine: HealthMachine,
    pub last_checks: VecDeque<String>,
    /// Out of rotation as an outlier, until health checks bring it back.
    pub ejected: bool,
    /// Until when passing checks do not count (the ejection's time).
    pub held_until: Option<Instant>,
    /// How many times it was ejected.
    pub ejections: u32,
    /// When its last ejection ended (or ends): past ejections are
    /// forgiven from then on (`outlier::remembered`).
    pub last_ejection_end: Option<Instant>,
}

pub(crate) struct BackendState {
    pub instance: InstanceId,
    pub addr: SocketAddr,
    pub check: HealthCheck,
    /// The `Host` its health checks send (the configured `host`, else the
    /// instance's address), which the app therefore accepts: given to
    /// requests that came without one (HTTP/1.0).
    pub default_host: http::HeaderValue,
    health: AtomicU8,
    in_flight: AtomicU64,
    /// Woken when `in_flight` reaches zero while draining.
    idle: Notify,
    slow: Mutex<Slow>,
    /// Answers, 5xx, latency (see [`Counters`]).
    pub counters: Counters,
    pub pool: Pool,
    /// Cancelled when the backend is forgotten: stops its checker and its
    /// upgraded connections.
    pub token: CancellationToken,
}

impl BackendState {
    pub fn new(
        instance: InstanceId,
        addr: SocketAddr,
        check: HealthCheck,
        initial: BackendHealth,
        pool: Pool,
        token: CancellationToken,
    ) -> Self {
        let machine = HealthMachine::new(initial, &check);
        let default_host = check
            .host
            .as_deref()
            .and_then(|host| http::HeaderValue::from_str(host).ok())
            .unwrap_or_else(|| crate::headers::address_value(addr));
        Self {
            instance,
            addr,
            check,
            default_host,
            health: AtomicU8::new(encode(initial)),
            in_flight: AtomicU64::new(0),
            idle: Notify::new(),
            slow: Mutex::new(Slow {
                machine,
                last_checks: VecDeque::with_capacity(LAST_CHECKS),
                ejected: false,
                held_until: None,
                ejections: 0,
                last_ejection_end: None,
            }),
            counters: Counters::new(),
            pool,
            token,
        }
    }

    pub fn health(&self) -> BackendHealth {
        decode(self.health.load(Ordering::SeqCst))
    }

    pub fn is_healthy(&self) -> bool {
        self.health.load(Ordering::SeqCst) == HEALTHY
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Out of rotation as an outlier (takes the slow lock).
    pub fn ejected(&self) -> bool {
        self.slow().ejected
    }

    /// How many times it was ejected as an outlier (takes the slow lock).
    pub fn ejections(&self) -> u32 {
        self.slow().ejections
    }

    pub fn last_ejection_end(&self) -> Option<Instant> {
        self.slow().last_ejection_end
    }

    /// Lock the slow state. The health atomic is only written while this
    /// lock is held, so transitions and their events stay in order.
    pub fn slow(&self) -> MutexGuard<'_, Slow> {
        self.slow.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publish a health the machine (under `slow()`) has moved to.
    pub fn store_health(&self, health: BackendHealth) {
        self.health.store(encode(health), Ordering::SeqCst);
        if health == BackendHealth::Draining {
            // Close idle connections now; in-flight ones are not pooled again.
            self.pool.clear();
        }
    }

    /// Out of rotation for good, without an event (the caller removed it).
    pub fn retire(&self) {
        let mut slow = self.slow();
        slow.machine.drain();
        self.store_health(BackendHealth::Draining);
    }

    pub fn push_check(slow: &mut Slow, result: String) {
        if slow.last_checks.len() >= LAST_CHECKS {
            slow.last_checks.pop_front();
        }
        slow.last_checks.push_back(result);
    }

    pub fn status(&self) -> BackendStatus {
        let last_checks = self.slow().last_checks.iter().cloned().collect();
        BackendStatus {
            instance: self.instance.clone(),
            addr: self.addr,
            health: self.health(),
            in_flight: self.in_flight(),
            last_checks,
        }
    }

    /// Wait until nothing is in flight, or `deadline`. Call after the
    /// backend is Draining. Returns the count left.
    pub async fn wait_idle(&self, deadline: tokio::time::Instant) -> u64 {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let left = self.in_flight.load(Ordering::SeqCst);
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight.load(Ordering::SeqCst);
            }
        }
    }

    fn release(&self) {
        // Ordering: the decrement is SeqCst and so is the health load after
        // it; a drain stores Draining then loads the count, both SeqCst. So
        // either the drain sees our decrement, or we see Draining and wake it.
        let prev = self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if prev == 1 && self.health.load(Ordering::SeqCst) == DRAINING {
            self.idle.notify_waiters();
        }
    }
}

/// One request (or upgraded connection) counted against a backend. Taken
/// only while the backend is Healthy; released on drop.
pub(crate) struct InFlight(Arc<BackendState>);

impl InFlight {
    /// Count a request against `backend` if it is still in rotation.
    /// Increment first, then check: a concurrent drain either sees the count
    /// or we see its Draining state (both SeqCst).
    pub fn try_acquire(backend: &Arc<BackendState>) -> Option<InFlight> {
        backend.in_flight.fetch_add(1, Ordering::SeqCst);
        if backend.health.load(Ordering::SeqCst) == HEALTHY {
            Some(InFlight(Arc::clone(backend)))
        } else {
            backend.release();
            None
        }
    }

    pub fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.release();
    }
}

struct Idle {
    conn: Upstream,
    since: Instant,
}

/// Idle keep-alive connections to one backend, one share per proxy worker
/// thread (see `workers.rs`): a connection is pooled and reused on the
/// thread whose runtime drives its socket, and the short critical section
/// per request (a push or pop on a Vec) is never contended by another
/// worker. Newest first, since the newest is the likeliest to be alive.
pub(crate) struct Pool {
    shards: Box<[Mutex<Vec<Idle>>]>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// `shards`: `workers::slots(worker count)`. `max_idle` applies per
    /// share.
    pub fn new(shards: usize, max_idle: usize, idle_timeout: Duration) -> Self {
        let shards = (0..shards.max(1)).map(|_| Mutex::new(Vec::new())).collect();
        Self { shards, max_idle, idle_timeout }
    }

    fn lock(shard: &Mutex<Vec<Idle>>) -> MutexGuard<'_, Vec<Idle>> {
        shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current thread's share.
    fn mine(&self) -> MutexGuard<'_, Vec<Idle>> {
        Self::lock(&self.shards[crate::workers::slot() % self.shards.len()])
    }

    /// The newest idle connection not known to be closed or too old. Stale
    /// ones met on the way are dropped (which closes them). Whether the
    /// instance closed it meanwhile shows when it is driven again
    /// (`Upstream::ready`): idle connections are not polled.
    pub fn take(&self) -> Option<Upstream> {
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.mine();
            let mut found = None;
            while let Some(entry) = idle.pop() {
                if !entry.conn.is_open() || entry.since.elapsed() > self.idle_timeout {
                    stale.push(entry);
                    continue;
                }
                found = Some(entry.conn);
                break;
            }
            found
        };
        drop(stale);
        found
    }

    pub fn put(&self, conn: Upstream, backend_draining: bool) {
        if backend_draining || !conn.is_open() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.mine();
        if idle.len() < self.max_idle {
            idle.push(Idle { conn, since: Instant::now() });
        }
    }

    /// Close idle connections past `upstream_idle_timeout` or closed.
    pub fn prune(&self) {
        for shard in self.shards.iter() {
            let stale: Vec<Idle> = {
                let mut idle = Self::lock(shard);
                let timeout = self.idle_timeout;
                let (keep, stale): (Vec<Idle>, Vec<Idle>) =
                    idle.drain(..).partition(|e| e.conn.is_open() && e.since.elapsed() <= timeout);
                *idle = keep;
                stale
            };
            drop(stale);
        }
    }

    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let all = std::mem::take(&mut *Self::lock(shard));
            drop(all);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| Self::lock(shard).len()).sum()
    }
}

impl BackendState {
    /// Return a connection whose exchange completed cleanly.
    pub fn recycle(&self, conn: Upstream) {
        self.pool.put(conn, self.health.load(Ordering::SeqCst) == DRAINING);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::process::StatusRange;

    fn check(healthy: u32, unhealthy: u32) -> HealthCheck {
        HealthCheck {
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            expect_status: StatusRange { min: 200, max: 399 },
            host: None,
            smoke: Vec::new(),
        }
    }

    #[test]
    fn pending_needs_threshold_passes() {
        let mut m = HealthMachine::new(BackendHealth::Pending, &check(3, 2));
        assert_eq!(m.observe(true), None);
        assert_eq!(m.observe(false), None, "a failure resets the count and keeps it pending");
        assert_eq!(m.health, BackendHealth::Pending);
        assert_eq!(m.observe(true), None);
        assert_eq!(m.observe(true), None);
        assert_eq!(m.observe(true), Some(BackendHealth::Healthy));
        assert_eq!(m.observe(true), None);
    }

    #[test]
    fn healthy_needs_threshold_failures_and_comes_back() {
        let mut m = HealthMachine::new(BackendHealth::Healthy, &check(2, 3));
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(true), None, "a pass resets the failure count");
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(false), Some(BackendHealth::Unhealthy));
        assert_eq!(m.observe(true), None);
        assert_eq!(m.observe(true), Some(BackendHealth::Healthy));
    }

    #[test]
    fn passive_failure_is_immediate_and_recovers_by_checks() {
        let mut m = HealthMachine::new(BackendHealth::Healthy, &check(2, 3));
        assert_eq!(m.observe(true), None);
        assert_eq!(m.passive_failure(), Some(BackendHealth::Unhealthy));
        assert_eq!(m.passive_failure(), None);
        assert_eq!(m.observe(true), None);
        assert_eq!(m.observe(true), Some(BackendHealth::Healthy));
    }

    #[test]
    fn draining_is_final() {
        let mut m = HealthMachine::new(BackendHealth::Healthy, &check(1, 1));
        assert_eq!(m.drain(), Some(BackendHealth::Draining));
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(true), None);
        assert_eq!(m.passive_failure(), None);
        assert_eq!(m.health, BackendHealth::Draining);
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut m = HealthMachine::new(BackendHealth::Pending, &check(0, 0));
        assert_eq!(m.observe(true), Some(BackendHealth::Healthy));
        assert_eq!(m.observe(false), Some(BackendHealth::Unhealthy));
    }

    #[test]
    fn pool_starts_empty() {
        let pool = Pool::new(3, 4, Duration::from_secs(1));
        assert!(pool.take().is_none());
        assert_eq!(pool.len(), 0);
    }
}
