//! Stopping and starting an app on purpose: `nonstop stop`, `nonstop
//! start` (decisions in `nonstop_plan::stopped`).
//!
//! `stop`: the remembered counts, the zero counts and maintenance are
//! written in one transaction, maintenance is applied, then every process
//! type goes to zero and the reconciler stops the instances as `scale` to
//! zero does (web drained through the proxy, then the stop signal and
//! `stop_timeout`, so a worker finishes its current job). The operation
//! answers once nothing runs. The app is still "up" (its record runs): a
//! restarted daemon finds the zero counts and the stopped record, and the
//! app stays stopped.
//!
//! `start`: the remembered counts are written back (the record goes to
//! `starting`), the reconciler starts the instances, and once every web
//! process type has its instances healthy, maintenance goes off (if `stop`
//! turned it on) and the record goes ([`Engine::settle_start`], checked at
//! every step, so a daemon restarted in between finishes it too). The
//! operation fails like `up` does if an instance never gets healthy within
//! its `health_timeout` (the app then stays in maintenance, and says so).

use super::*;
use nonstop_core::maintenance::{Maintenance, MaintenanceBy, StopPhase, StoppedState, DEFAULT_RETRY_AFTER};
use nonstop_core::{CountSource, RuntimeCount};
use nonstop_plan::stopped::{self as plan, Gated, RunState, StartVerdict, StopVerdict};
use nonstop_store::Controls;

impl EngineHandle {
    /// `nonstop stop`: maintenance on, every process at zero, counts
    /// remembered. Streams progress; answers once nothing runs.
    pub async fn stop(&self, who: String, progress: ProgressTx) -> Result<OpReport, EngineError> {
        self.ask(|reply| Command::Stop { who, progress, reply }).await
    }

    /// `nonstop start`: the remembered counts back; answers once every
    /// instance is ready (maintenance off as soon as web is healthy).
    pub async fn start(&self, who: String, progress: ProgressTx) -> Result<OpReport, EngineError> {
        self.ask(|reply| Command::Start { who, progress, reply }).await
    }
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    pub(crate) fn run_state(&self) -> RunState {
        RunState::of(self.controls.stopped.as_ref())
    }

    /// The refusal of `op` while the app is stopped or starting.
    pub(crate) fn refuse_if_stopped(&self, op: Gated) -> Option<EngineError> {
        let state = self.run_state();
        if !plan::refuses(state, op) {
            return None;
        }
        let stopped = self.controls.stopped.as_ref()?;
        Some(EngineError::Stopped {
            operation: op.as_str().to_string(),
            since: crate::controller::fmt_wall(crate::controller::maintenance::from_ms(stopped.since_ms)),
            who: stopped.who.clone(),
            counts: describe_counts(&stopped.counts),
        })
    }

    pub(crate) fn on_stop_command(&mut self, who: String, progress: ProgressTx, reply: Reply<OpReport>) {
        let Some(reply) = self.admit(None, reply) else { return };
        match self.stop(&who) {
            Ok(Some(summary)) => self.begin_op("stop", progress, reply, summary, true, VecDeque::new(), false),
            Ok(None) => {
                let counts = self.controls.stopped.as_ref().map(|s| describe_counts(&s.counts)).unwrap_or_default();
                let _ = reply.send(Ok(OpReport {
                    summary: format!("already stopped; nothing changed (`nonstop start` brings back {counts})"),
                    changed: false,
                }));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    pub(crate) fn on_start_command(&mut self, who: String, progress: ProgressTx, reply: Reply<OpReport>) {
        let Some(reply) = self.admit(None, reply) else { return };
        // A start that cannot give its processes their secrets starts
        // nothing.
        if self.controls.stopped.is_some() {
            if let Err(e) = self.refresh_secrets() {
                let _ = reply.send(Err(e));
                return;
            }
        }
        match self.start(&who) {
            Ok(Some(summary)) => self.begin_op("start", progress, reply, summary, true, VecDeque::new(), false),
            Ok(None) => {
                let _ = reply.send(Ok(OpReport {
                    summary: "the app is not stopped; nothing changed".to_string(),
                    changed: false,
                }));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The runtime count of every process type the app has now (one
    /// without a stored count: the one its record runs).
    fn current_counts(&self, rt: &AppRuntime) -> Result<BTreeMap<ProcessName, RuntimeCount>, EngineError> {
        let known = self.store.process_counts(&rt.record.app, &self.env)?;
        Ok(rt
            .record
            .spec
            .processes
            .iter()
            .map(|p| {
                let c = known.get(&p.name).copied().unwrap_or(RuntimeCount {
                    count: p.count,
                    source: CountSource::Toml,
                    toml_at_apply: p.count,
                });
                (p.name.clone(), c)
            })
            .collect())
    }

    /// Persist the stop, switch maintenance on, set every count to zero.
    /// `None`: already stopped.
    fn stop(&mut self, who: &str) -> Result<Option<String>, EngineError> {
        let rt = self.app.as_ref().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        let current = self.current_counts(rt)?;
        let StopVerdict::Stop { remembered, zero } = plan::on_stop(self.controls.stopped.as_ref(), &current) else {
            return Ok(None);
        };
        let app = rt.record.app.clone();
        let route = rt.route.clone();
        let running = rt.instances.values().filter(|i| i.phase != InstPhase::Stopping).count();
        let now_ms = crate::controller::maintenance::wall_ms(self.clock.wall());
        let by = self.controls.maintenance.as_ref().map(|m| m.by);
        let maintenance = if plan::stop_turns_maintenance_on(by) {
            Some(nonstop_core::maintenance::MaintenanceState {
                maintenance: Maintenance {
                    page: None,
                    allow: Vec::new(),
                    retry_after_secs: DEFAULT_RETRY_AFTER.as_secs(),
                },
                by: MaintenanceBy::Stop,
                since_ms: now_ms,
            })
        } else {
            self.controls.maintenance.clone()
        };
        let stopped = StoppedState {
            phase: StopPhase::Stopped,
            counts: remembered.clone(),
            since_ms: now_ms,
            who: who.to_string(),
        };
        let next = Controls { maintenance, stopped: Some(stopped) };
        // Persist, then act: the remembered counts, the zero ones and
        // maintenance together.
        self.store.put_controls(&app, &self.env, &next, Some(&zero), self.clock.wall())?;
        self.controls = next;
        self.traffic.set_maintenance(&route, self.controls.maintenance.as_ref().map(|m| &m.maintenance));
        self.set_counts(&zero)?;
        let summary = format!(
            "stopping {running} instance(s) of {app} ({}); maintenance {}; `nonstop start` brings back {}",
            remembered.keys().map(|p| format!("{p} → 0")).collect::<Vec<_>>().join(", "),
            if plan::stop_turns_maintenance_on(by) { "on" } else { "stays on" },
            describe_counts(&remembered)
        );
        self.event(&app, EventKind::Stop, None, &format!("{summary} (by {who})"));
        Ok(Some(summary))
    }

    /// Put the remembered counts back. `None`: not stopped.
    fn start(&mut self, who: &str) -> Result<Option<String>, EngineError> {
        let rt = self.app.as_ref().filter(|rt| rt.record.running).ok_or(EngineError::NotUp)?;
        let app = rt.record.app.clone();
        let names: Vec<ProcessName> = rt.record.spec.processes.iter().map(|p| p.name.clone()).collect();
        let summary = match plan::on_start(self.controls.stopped.as_ref(), &names) {
            StartVerdict::NotStopped => return Ok(None),
            StartVerdict::Resume => "waiting for web to be healthy again, then maintenance goes off".to_string(),
            StartVerdict::Start { counts } => {
                let mut stopped = self.controls.stopped.clone().expect("stopped, per on_start");
                stopped.phase = StopPhase::Starting;
                let next = Controls { maintenance: self.controls.maintenance.clone(), stopped: Some(stopped) };
                self.store.put_controls(&app, &self.env, &next, Some(&counts), self.clock.wall())?;
                self.controls = next;
                self.set_counts(&counts)?;
                // A fresh start: crash loops from before the stop are history.
                if let Some(rt) = self.app.as_mut() {
                    rt.backoff.clear();
                    rt.last_exit.clear();
                }
                let off = plan::start_turns_maintenance_off(self.controls.maintenance.as_ref().map(|m| m.by));
                format!(
                    "starting {app}: {}; {}",
                    describe_counts(&counts),
                    if off {
                        "maintenance goes off once web is healthy"
                    } else {
                        "maintenance stays on (it was turned on by `nonstop maintenance on`, not by `stop`)"
                    }
                )
            }
        };
        self.event(&app, EventKind::Start, None, &format!("{summary} (by {who})"));
        Ok(Some(summary))
    }

    /// Give the app's record (and any deployment target) these counts.
    fn set_counts(&mut self, counts: &BTreeMap<ProcessName, RuntimeCount>) -> Result<(), EngineError> {
        let rt = self.app.as_mut().ok_or(EngineError::NotUp)?;
        let cap = |p: &ProcessSpec, c: u32| if p.kind == ProcessKind::Singleton { c.min(1) } else { c };
        for p in rt.record.spec.processes.iter_mut() {
            if let Some(c) = counts.get(&p.name) {
                p.count = cap(p, c.count);
            }
        }
        for t in rt.targets.values_mut() {
            for p in t.spec.processes.iter_mut() {
                if let Some(c) = counts.get(&p.name) {
                    p.count = cap(p, c.count);
                }
            }
        }
        self.store.put_app(&rt.record, self.clock.wall())?;
        Ok(())
    }

    /// A start under way is done once every web process type has its
    /// instances healthy: maintenance off (if `stop` turned it on), the
    /// stopped record gone. Called at every step, before the operation's
    /// check, so `start` answers after maintenance is off.
    pub(crate) fn settle_start(&mut self) {
        if self.run_state() != RunState::Starting {
            return;
        }
        let Some(rt) = self.app.as_ref() else { return };
        let web: Vec<(u32, u32)> = rt
            .desired()
            .iter()
            .filter(|p| p.kind == ProcessKind::Web)
            .map(|p| {
                let healthy = rt
                    .instances
                    .values()
                    .filter(|i| i.id.process == p.name && i.id.slot <= p.count && self.takes_work(i))
                    .count() as u32;
                (p.count, healthy)
            })
            .collect();
        if !plan::web_settled(&web) {
            return;
        }
        let (app, route) = (rt.record.app.clone(), rt.route.clone());
        let off = plan::start_turns_maintenance_off(self.controls.maintenance.as_ref().map(|m| m.by));
        let next = Controls { maintenance: if off { None } else { self.controls.maintenance.clone() }, stopped: None };
        if let Err(e) = self.store.put_controls(&app, &self.env, &next, None, self.clock.wall()) {
            // Tried again at the next step; maintenance stays on meanwhile.
            tracing::error!("could not record the end of the start: {e}");
            self.store_failed("the end of a start", &e);
            return;
        }
        self.controls = next;
        self.traffic.set_maintenance(&route, self.controls.maintenance.as_ref().map(|m| &m.maintenance));
        let msg = if off {
            "web is healthy: maintenance off, the app is running"
        } else {
            "web is healthy: the app is running (maintenance stays on)"
        };
        self.event(&app, EventKind::Start, None, msg);
        self.progress(msg.to_string());
    }

    /// `down` of a stopped app: the remembered counts go back (so that the
    /// next `up` runs them), and maintenance that `stop` turned on goes.
    pub(crate) fn forget_stop(&mut self) -> Result<(), EngineError> {
        let Some(stopped) = self.controls.stopped.clone() else { return Ok(()) };
        let rt = self.app.as_ref().ok_or(EngineError::NotUp)?;
        let (app, route) = (rt.record.app.clone(), rt.route.clone());
        let names: Vec<ProcessName> = rt.record.spec.processes.iter().map(|p| p.name.clone()).collect();
        let counts: BTreeMap<ProcessName, RuntimeCount> =
            stopped.counts.into_iter().filter(|(p, _)| names.contains(p)).collect();
        let off = plan::start_turns_maintenance_off(self.controls.maintenance.as_ref().map(|m| m.by));
        let next = Controls { maintenance: if off { None } else { self.controls.maintenance.clone() }, stopped: None };
        self.store.put_controls(&app, &self.env, &next, Some(&counts), self.clock.wall())?;
        self.controls = next;
        self.traffic.set_maintenance(&route, self.controls.maintenance.as_ref().map(|m| &m.maintenance));
        self.set_counts(&counts)
    }

    /// For `status`.
    pub(crate) fn stopped_status(&self) -> (AppState, Option<StoppedStatus>) {
        let state = match self.run_state() {
            RunState::Running => AppState::Running,
            RunState::Stopped => AppState::Stopped,
            RunState::Starting => AppState::Starting,
        };
        let status = self.controls.stopped.as_ref().map(|s| StoppedStatus {
            since_ms: s.since_ms,
            who: s.who.clone(),
            counts: s.counts.iter().map(|(p, c)| (p.to_string(), c.count)).collect(),
        });
        (state, status)
    }
}

/// `web=2, worker=1`.
fn describe_counts(counts: &BTreeMap<ProcessName, RuntimeCount>) -> String {
    if counts.is_empty() {
        return "no process".to_string();
    }
    counts.iter().map(|(p, c)| format!("{p}={}", c.count)).collect::<Vec<_>>().join(", ")
}
