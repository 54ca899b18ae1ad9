//! The instances of a controller's app: what runs ([`AppRuntime`]: the
//! app's record, its instances, their restart backoff, the release each
//! process type runs during a deployment) and the work on them: starting
//! one (recorded `launching` first), watching its exits, its health and
//! readiness, draining and stopping it. Driver calls run off the actor
//! with the engine's own deadlines ([`DRIVER_START_DEADLINE`], ...); their
//! ends come back as `Internal` events.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InstPhase {
    Launching,
    Starting,
    Ready,
    Stopping,
}

pub(crate) struct Inst {
    pub(crate) id: InstanceId,
    pub(crate) kind: ProcessKind,
    pub(crate) release: ReleaseId,
    pub(crate) handle: Option<InstanceHandle>,
    pub(crate) phase: InstPhase,
    pub(crate) started: Instant,
    pub(crate) started_wall: SystemTime,
    pub(crate) health: Option<BackendHealth>,
    pub(crate) last_checks: VecDeque<String>,
    /// A stop was asked for while it was still launching.
    pub(crate) stop_requested: bool,
    /// It answered its health check but failed a smoke check (the
    /// proxy's words): it never takes traffic, and a rollout fails on it.
    pub(crate) smoke_failure: Option<String>,
    /// The proxy took it out of rotation as an outlier (the proxy's
    /// words): it answered only 5xx while its peers did not.
    pub(crate) ejected: Option<String>,
}

impl Inst {
    pub(crate) fn new(
        id: InstanceId,
        kind: ProcessKind,
        release: ReleaseId,
        handle: Option<InstanceHandle>,
        phase: InstPhase,
        started: (Instant, SystemTime),
    ) -> Self {
        Inst {
            id,
            kind,
            release,
            handle,
            phase,
            started: started.0,
            started_wall: started.1,
            health: None,
            last_checks: VecDeque::new(),
            stop_requested: false,
            smoke_failure: None,
            ejected: None,
        }
    }
}

/// A release as the engine runs it: its spec and its directory.
#[derive(Debug, Clone)]
pub(crate) struct ReleaseCtx {
    pub(crate) id: ReleaseId,
    pub(crate) spec: AppSpec,
    pub(crate) workdir: PathBuf,
}

impl ReleaseCtx {
    /// The process spec in this release, or a zero-count copy of `fallback`
    /// when the release no longer has that process type.
    fn process_or_zero(&self, name: &ProcessName, fallback: Option<&ProcessSpec>) -> Option<ProcessSpec> {
        match self.spec.process(name) {
            Some(p) => Some(p.clone()),
            None => fallback.map(|f| ProcessSpec { count: 0, ..f.clone() }),
        }
    }
}

pub(crate) struct AppRuntime {
    pub(crate) record: AppRecord,
    pub(crate) route: RouteKey,
    pub(crate) instances: BTreeMap<InstanceId, Inst>,
    pub(crate) backoff: BTreeMap<(ProcessName, u32), SlotBackoff>,
    pub(crate) last_exit: BTreeMap<(ProcessName, u32), (InstanceId, ExitStatus)>,
    pub(crate) rollout: Option<RolloutState>,
    /// During a deployment: the release each process type it touched runs.
    pub(crate) targets: BTreeMap<ProcessName, ReleaseCtx>,
}

/// The proxy route of an app in an environment.
pub(crate) fn route_key(app: &AppName, env: &EnvironmentId) -> RouteKey {
    AppEnv::new(app.clone(), env.clone()).route()
}

impl AppRuntime {
    pub(crate) fn new(record: AppRecord) -> Self {
        let route = route_key(&record.app, &record.environment);
        AppRuntime {
            record,
            route,
            instances: BTreeMap::new(),
            backoff: BTreeMap::new(),
            last_exit: BTreeMap::new(),
            rollout: None,
            targets: BTreeMap::new(),
        }
    }

    /// Restarts of the slot `id` fills.
    pub(crate) fn restarts(&self, id: &InstanceId) -> u32 {
        self.backoff.get(&(id.process.clone(), id.slot)).map(|b| b.restarts).unwrap_or(0)
    }

    /// What the store keeps of `inst`, in `phase`.
    pub(crate) fn record_of(&self, inst: &Inst, phase: InstancePhase, was_healthy: bool) -> InstanceRecord {
        InstanceRecord {
            app: self.record.app.clone(),
            environment: self.record.environment.clone(),
            id: inst.id.clone(),
            release: inst.release,
            handle: inst.handle.clone(),
            phase,
            was_healthy,
            started_at: inst.started_wall,
            restarts: self.restarts(&inst.id),
        }
    }

    pub(crate) fn current(&self) -> ReleaseCtx {
        ReleaseCtx { id: self.record.release, spec: self.record.spec.clone(), workdir: self.record.workdir.clone() }
    }

    /// The release a process type runs now.
    pub(crate) fn ctx_for(&self, process: &ProcessName) -> ReleaseCtx {
        self.targets.get(process).cloned().unwrap_or_else(|| self.current())
    }

    /// The spec of a process type as it should run now (a target release
    /// that dropped it gives a zero count).
    pub(crate) fn process_spec(&self, process: &ProcessName) -> Option<ProcessSpec> {
        match self.targets.get(process) {
            Some(t) => t.process_or_zero(process, self.record.spec.process(process)),
            None => self.record.spec.process(process).cloned(),
        }
    }

    /// Every process type that should run, with its spec.
    pub(crate) fn desired(&self) -> Vec<ProcessSpec> {
        if !self.record.running {
            return Vec::new();
        }
        let mut out: Vec<ProcessSpec> = Vec::new();
        for p in &self.record.spec.processes {
            if let Some(spec) = self.process_spec(&p.name) {
                out.push(spec);
            }
        }
        for (name, t) in &self.targets {
            if self.record.spec.process(name).is_none() {
                if let Some(p) = t.spec.process(name) {
                    out.push(p.clone());
                }
            }
        }
        out
    }
}

const CHECK_HISTORY: usize = 5;

/// The engine's own deadlines on driver calls, on top of the timeouts the
/// driver is given and enforces: a driver (a remote API behind it) that
/// never answers must not hold an instance slot, a stop or a deploy
/// forever. A call past its deadline is abandoned (dropped) and reported
/// as failed: [`DriverSilent`].
///
/// `start` returns once the process exists, not once it is ready.
pub(crate) const DRIVER_START_DEADLINE: Duration = Duration::from_secs(120);
/// On top of the drain and stop timeouts.
pub(crate) const DRIVER_STOP_MARGIN: Duration = Duration::from_secs(30);
/// On top of a task's own timeout.
pub(crate) const DRIVER_TASK_MARGIN: Duration = Duration::from_secs(60);

/// A driver call abandoned at its deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "the driver did not answer `{call}` within {} and was given up on; check the machine (or the cloud API) it \
     drives",
    fmt_dur(*deadline)
)]
pub(crate) struct DriverSilent {
    pub(crate) call: &'static str,
    pub(crate) deadline: Duration,
}

/// A driver call that failed, or that was given up on. Clone: it comes
/// back to the controller in an event.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum DriverCallError {
    #[error(transparent)]
    Failed(Arc<DriverError>),
    #[error(transparent)]
    Silent(#[from] DriverSilent),
}

impl From<DriverError> for DriverCallError {
    fn from(e: DriverError) -> Self {
        DriverCallError::Failed(Arc::new(e))
    }
}

/// Why an instance did not start.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsUnavailable),
    #[error(transparent)]
    Driver(#[from] DriverCallError),
}

pub(crate) fn release_env(
    base_env: &BTreeMap<String, String>,
    ctx: &ReleaseCtx,
    env: &EnvironmentId,
) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = base_env.clone();
    vars.extend(ctx.spec.env.clone());
    // `[database]` fills its variables for every process and task (the
    // spec refuses the same names in `[env]`).
    if let Some(db) = &ctx.spec.database {
        vars.extend(db.env_vars());
    }
    vars.insert("NONSTOP_APP".into(), ctx.spec.app.to_string());
    vars.insert("NONSTOP_ENVIRONMENT".into(), env.to_string());
    vars.insert("NONSTOP_RELEASE".into(), ctx.id.to_string());
    vars
}

fn instance_env(
    base_env: &BTreeMap<String, String>,
    ctx: &ReleaseCtx,
    spec: &ProcessSpec,
    id: &InstanceId,
    env: &EnvironmentId,
) -> Vec<(String, String)> {
    let mut vars = release_env(base_env, ctx, env);
    vars.extend(spec.env.clone());
    vars.insert("NONSTOP_PROCESS".into(), id.process.to_string());
    vars.insert("NONSTOP_INSTANCE".into(), id.slot_name());
    vars.into_iter().collect()
}

pub(crate) fn tail_suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last log lines:\n  {}", lines.join("\n  "))
    }
}

/// The last health checks of an instance: the traffic layer's, or the ones
/// the engine saw in health events if it has none.
pub(crate) fn last_checks<T: Traffic>(traffic: &T, inst: &Inst) -> Vec<String> {
    traffic
        .status(&inst.id)
        .map(|st| st.last_checks)
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| inst.last_checks.iter().cloned().collect())
}

pub(crate) fn checks_suffix(checks: &[String]) -> String {
    if checks.is_empty() {
        return String::new();
    }
    // A 400 to a bare GET is nearly always the app refusing the Host.
    let hint = if checks.iter().any(|c| c.contains(" -> 400 ")) {
        " (a 400 to a health check usually means the app refused its Host header, `127.0.0.1:PORT` unless \
         `host` is set in the process's [health]: allow it, e.g. in Django's ALLOWED_HOSTS, or set `host` to a \
         name the app accepts)"
    } else {
        ""
    };
    format!("; last health checks: {}{hint}", checks.join("; "))
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// How progress and events name an instance: its slot, its release
    /// and, while its process type is being rolled, whether it is an old
    /// or a new one: `web.1 (v3, new)`, `web.1 (v2, old)`, `worker.1 (v2)`.
    pub(crate) fn instance_label(&self, id: &InstanceId) -> String {
        let Some(rt) = self.app.as_ref() else { return id.slot_name() };
        let Some(inst) = rt.instances.get(id) else { return id.slot_name() };
        let role = match rt.rollout.as_ref().filter(|ro| ro.process == id.process) {
            Some(ro) if ro.new.values().any(|n| n == id) || (inst.release == ro.release && !ro.old.contains(id)) => {
                Some("new")
            }
            Some(_) => Some("old"),
            None => None,
        };
        // Release 0: an app started by `up` alone, without releases.
        let release = (inst.release.0 > 0).then(|| inst.release.to_string());
        match (release, role) {
            (Some(release), Some(role)) => format!("{} ({release}, {role})", id.slot_name()),
            (Some(release), None) => format!("{} ({release})", id.slot_name()),
            (None, Some(role)) => format!("{} ({role})", id.slot_name()),
            (None, None) => id.slot_name(),
        }
    }
    pub(crate) fn on_started(&mut self, id: InstanceId, result: Result<InstanceHandle, StartError>) {
        let (now, wall) = (self.clock.now(), self.clock.wall());
        let Some(rt) = self.app.as_mut() else { return };
        let Some(inst) = rt.instances.get_mut(&id) else { return };
        match result {
            Ok(handle) => {
                // Readiness (`ready_after`, `health_timeout`) and uptime
                // count from here, when the process exists: not from the
                // call to the driver, however long that took.
                (inst.started, inst.started_wall) = (now, wall);
                inst.handle = Some(handle.clone());
                let stop_now = inst.stop_requested;
                inst.phase = InstPhase::Starting;
                let rec = rt.record_of(&rt.instances[&id], InstancePhase::Running, false);
                if let Err(e) = self.store.put_instance(&rec) {
                    tracing::error!("could not record {id}: {e}");
                    store_failed(&self.degraded, &*self.clock, &format!("the record of {id}"), &e);
                }
                let spec = rt.process_spec(&id.process);
                let statics = rt.ctx_for(&id.process).spec.statics;
                let route = rt.route.clone();
                let app = rt.record.app.clone();
                self.watch_exit(handle.clone());
                let detail = match (handle.locator.pid(), handle.addr) {
                    (Some(pid), Some(addr)) => format!("started (pid {pid}, port {})", addr.port()),
                    (Some(pid), None) => format!("started (pid {pid})"),
                    _ => "started".to_string(),
                };
                let label = self.instance_label(&id);
                self.event(&app, EventKind::Start, Some(&id), &format!("{label} {detail}"));
                self.progress(format!("{label} {detail}"));
                if stop_now {
                    self.begin_stop(&id, false);
                    return;
                }
                if let (Some(spec), Some(addr)) = (spec, handle.addr) {
                    if let Some(check) = spec.health {
                        let check = crate::preflight::instance_check(check, &statics);
                        self.traffic.add(&route, Backend { instance: id.clone(), addr }, check, InitialHealth::Pending);
                    }
                }
            }
            Err(reason) => {
                let app = rt.record.app.clone();
                let label = self.instance_label(&id);
                self.event(&app, EventKind::StartFailed, Some(&id), &reason.to_string());
                self.progress(format!("{label} could not start: {reason}"));
                self.on_exited(id, ExitStatus::Code(127));
            }
        }
    }

    pub(crate) fn on_exited(&mut self, id: InstanceId, status: ExitStatus) {
        let now = self.clock.now();
        let label = self.instance_label(&id);
        let Some(rt) = self.app.as_mut() else { return };
        let Some(inst) = rt.instances.remove(&id) else { return };
        self.traffic.remove(&id);
        if let Err(e) = self.store.delete_instance(&rt.record.app, &self.env, &id) {
            tracing::error!("could not forget {id}: {e}");
            store_failed(&self.degraded, &*self.clock, &format!("the exit of {id}"), &e);
        }
        let app = rt.record.app.clone();
        if inst.phase == InstPhase::Stopping {
            self.event(&app, EventKind::Exit, Some(&id), &format!("{label} stopped ({status})"));
            return;
        }
        // An unplanned exit: back off, then the reconciler restarts the slot.
        let key = (id.process.clone(), id.slot);
        let policy = rt.process_spec(&id.process).map(|p| p.restart).unwrap_or_default();
        let uptime = now.saturating_duration_since(inst.started);
        let b = rt.backoff.get(&key).copied().unwrap_or_default().after_exit(uptime, &policy, now);
        rt.backoff.insert(key.clone(), b);
        rt.last_exit.insert(key, (id.clone(), status));
        let delay = b.retry_at.map(|at| at.saturating_duration_since(now)).unwrap_or_default();
        let msg = format!("exited unexpectedly ({status}) after {}; restarting in {}", fmt_dur(uptime), fmt_dur(delay));
        tracing::warn!("{id} {msg}");
        if let Some(ro) = rt.rollout.as_mut() {
            if ro.new.values().any(|n| n == &id) && ro.failure.is_none() {
                let logs = secrets::log_tail(&*self.logs, &self.secrets, &app, &self.env, &id, 10);
                ro.failure = Some(format!("new instance {} exited ({status}){}", id.slot_name(), tail_suffix(&logs)));
            }
        }
        self.event(&app, EventKind::Exit, Some(&id), &format!("{label} {msg}"));
        self.progress(format!("{label} {msg}"));
    }

    pub(crate) fn on_health(&mut self, ev: HealthEvent) {
        let Some(rt) = self.app.as_mut() else { return };
        let Some(inst) = rt.instances.get_mut(&ev.instance) else { return };
        let was = inst.health.replace(ev.health);
        if !ev.detail.is_empty() {
            inst.last_checks.push_back(ev.detail.clone());
            while inst.last_checks.len() > CHECK_HISTORY {
                inst.last_checks.pop_front();
            }
        }
        if ev.cause == HealthCause::Smoke && inst.phase == InstPhase::Starting {
            inst.smoke_failure = Some(ev.detail.clone());
        }
        match (ev.cause, ev.health) {
            (HealthCause::Outlier, BackendHealth::Unhealthy) => inst.ejected = Some(ev.detail.clone()),
            (_, BackendHealth::Healthy) => inst.ejected = None,
            _ => {}
        }
        let became_ready = ev.health == BackendHealth::Healthy && inst.phase == InstPhase::Starting;
        if became_ready {
            inst.phase = InstPhase::Ready;
        }
        let app = rt.record.app.clone();
        // Transitions only: a resync after a lagged broadcast repeats
        // what is already known.
        if became_ready {
            self.persist_ready(&ev.instance);
            self.event(&app, EventKind::Healthy, Some(&ev.instance), &ev.detail);
            let label = self.instance_label(&ev.instance);
            self.progress(format!("{label} healthy"));
        } else if ev.cause == HealthCause::Smoke {
            self.event(&app, EventKind::SmokeFailed, Some(&ev.instance), &ev.detail);
            let label = self.instance_label(&ev.instance);
            self.progress(format!("{label} {}", ev.detail));
        } else if ev.health == BackendHealth::Unhealthy && was != Some(BackendHealth::Unhealthy) {
            self.event(&app, EventKind::Unhealthy, Some(&ev.instance), &ev.detail);
        } else if ev.health == BackendHealth::Healthy && was == Some(BackendHealth::Unhealthy) {
            self.event(&app, EventKind::Recovered, Some(&ev.instance), &format!("healthy again: {}", ev.detail));
        }
    }

    pub(crate) fn resync_health(&mut self) {
        let Some(rt) = self.app.as_ref() else { return };
        let ids: Vec<InstanceId> = rt.instances.keys().cloned().collect();
        for id in ids {
            if let Some(st) = self.traffic.status(&id) {
                self.on_health(HealthEvent {
                    instance: id,
                    health: st.health,
                    detail: st.last_checks.last().cloned().unwrap_or_default(),
                    cause: Default::default(),
                });
            }
        }
    }

    pub(crate) fn persist_ready(&mut self, id: &InstanceId) {
        let Some(rt) = self.app.as_ref() else { return };
        let Some(inst) = rt.instances.get(id) else { return };
        let rec = rt.record_of(inst, InstancePhase::Running, true);
        if let Err(e) = self.store.put_instance(&rec) {
            tracing::error!("could not record {id}: {e}");
            self.store_failed(&format!("the record of {id}"), &e);
        }
    }

    /// The main process ended: out of rotation now (what is left of it
    /// finishes its requests, no new one is sent to it).
    pub(crate) fn on_main_exited(&mut self, id: InstanceId) {
        let web = self.app.as_ref().and_then(|rt| rt.instances.get(&id)).is_some_and(|i| i.kind == ProcessKind::Web);
        if web {
            drop(self.traffic.drain(&id, Duration::ZERO));
        }
    }

    /// A stop ended (`label`: the instance as it was when the stop began).
    pub(crate) fn on_stopped(&mut self, id: InstanceId, label: String, outcome: Result<StopOutcome, DriverCallError>) {
        let msg = match outcome {
            Ok(StopOutcome::Graceful) => "stopped".to_string(),
            Ok(StopOutcome::Killed) => "killed after its stop timeout".to_string(),
            Ok(StopOutcome::AlreadyGone) => "already gone".to_string(),
            Err(e) => format!("stop failed: {e}"),
        };
        if let Some(app) = self.app.as_ref().map(|rt| rt.record.app.clone()) {
            self.event(&app, EventKind::Stop, Some(&id), &format!("{label} {msg}"));
        }
        self.progress(format!("{label} {msg}"));
    }

    // ---------------------------------------------------------------- actions

    pub(crate) fn start_instance(&mut self, process: &ProcessName, slot: u32) -> Option<InstanceId> {
        if self.degraded().holds(&(process.clone(), slot), self.clock.now()) {
            return None; // its record could not be written; retried soon
        }
        let rt = self.app.as_mut()?;
        let ctx = rt.ctx_for(process);
        let spec = rt.process_spec(process)?;
        let generation = match self.store.next_generation(&rt.record.app, &self.env, process) {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("cannot start {process}.{slot}: {e}; retrying soon");
                let app = rt.record.app.clone();
                self.start_blocked(&app, process, slot, &e);
                return None;
            }
        };
        let id = InstanceId::new(process.clone(), slot, generation);
        let inst =
            Inst::new(id.clone(), spec.kind, ctx.id, None, InstPhase::Launching, (self.clock.now(), self.clock.wall()));
        let rec = rt.record_of(&inst, InstancePhase::Launching, false);
        if let Err(e) = self.store.put_instance(&rec) {
            // Never started without its record; retried soon (`degraded`).
            tracing::error!("cannot record {id} before starting it: {e}; not started, retrying soon");
            let app = rt.record.app.clone();
            self.start_blocked(&app, process, slot, &e);
            return None;
        }
        let was_blocked = {
            let mut d = self.degraded();
            let was = d.blocked(&(process.clone(), slot)).is_some();
            d.start_recorded(&(process.clone(), slot));
            was
        };
        // Nothing starts without its secrets: a start that cannot have
        // them fails as a start does (backoff, `status`, events).
        let secrets = self.launch_secrets();
        let rt = self.app.as_mut()?;
        let launch = secrets.map(|secrets| LaunchSpec {
            app: rt.record.app.clone(),
            environment: self.env.clone(),
            release: ctx.id,
            instance: id.clone(),
            command: spec.command.clone(),
            workdir: ctx.workdir.clone(),
            env: secrets::with_secrets(
                instance_env(&rt.record.base_env, &ctx, &spec, &id, &self.env),
                &secrets,
                ctx.spec.database.as_ref(),
            ),
            wants_port: spec.kind == ProcessKind::Web,
        });
        rt.instances.insert(id.clone(), inst);
        if was_blocked {
            let app = rt.record.app.clone();
            self.event(&app, EventKind::Store, Some(&id), "the store takes writes again: starting it");
        }
        let driver = self.driver.clone();
        let tx = self.events_tx.clone();
        let id2 = id.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let launch = match launch {
                Ok(launch) => launch,
                Err(reason) => {
                    let _ = tx.send(Internal::Started { id: id2, result: Err(reason.into()) });
                    return;
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = tokio::time::timeout(DRIVER_START_DEADLINE, driver.start(launch)) => {
                    let result = match r {
                        Ok(r) => r.map_err(|e| DriverCallError::from(e).into()),
                        Err(_) => Err(DriverCallError::from(DriverSilent { call: "start", deadline: DRIVER_START_DEADLINE }).into()),
                    };
                    let _ = tx.send(Internal::Started { id: id2, result });
                }
            }
        });
        Some(id)
    }

    pub(crate) fn watch_exit(&self, handle: InstanceHandle) {
        let driver = self.driver.clone();
        let tx = self.events_tx.clone();
        let cancel = self.cancel.clone();
        {
            let (driver, tx, cancel, handle) = (driver.clone(), tx.clone(), cancel.clone(), handle.clone());
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    () = driver.main_exited(&handle) => {
                        let _ = tx.send(Internal::MainExited { id: handle.instance.clone() });
                    }
                }
            });
        }
        self.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                status = driver.wait_exit(&handle) => {
                    let _ = tx.send(Internal::Exited { id: handle.instance.clone(), status });
                }
            }
        });
    }

    /// Make `record` the app's (a new runtime if there was none).
    pub(crate) fn install_record(&mut self, record: AppRecord) {
        match self.app.as_mut() {
            Some(rt) => {
                rt.route = route_key(&record.app, &record.environment);
                rt.record = record;
            }
            None => self.app = Some(AppRuntime::new(record)),
        }
    }

    /// Drain (web) and stop one instance. `resume` continues a stop that a
    /// previous daemon had recorded.
    pub(crate) fn begin_stop(&mut self, id: &InstanceId, resume: bool) {
        let Some(rt) = self.app.as_mut() else { return };
        let spec = rt.process_spec(&id.process).or_else(|| rt.record.spec.process(&id.process).cloned());
        let Some(inst) = rt.instances.get_mut(id) else { return };
        if inst.phase == InstPhase::Stopping && !resume {
            return;
        }
        let Some(handle) = inst.handle.clone() else {
            inst.stop_requested = true;
            return;
        };
        inst.phase = InstPhase::Stopping;
        let (signal, stop_timeout, drain_timeout) = spec
            .as_ref()
            .map(|s| (s.stop_signal, s.stop_timeout, s.drain_timeout))
            .unwrap_or((nonstop_core::Signal::Term, Duration::from_secs(10), Duration::from_secs(30)));
        let is_web = inst.kind == ProcessKind::Web;
        let rec = rt.record_of(&rt.instances[id], InstancePhase::Stopping, false);
        if let Err(e) = self.store.put_instance(&rec) {
            tracing::error!("could not record the stop of {id}: {e}");
            self.store_failed(&format!("the stop of {id}"), &e);
        }
        let driver = self.driver.clone();
        let traffic = self.traffic.clone();
        let tx = self.events_tx.clone();
        let cancel = self.cancel.clone();
        let id2 = id.clone();
        let label = self.instance_label(id);
        self.tasks.spawn(async move {
            let work = async {
                if is_web {
                    traffic.drain(&id2, drain_timeout).await;
                }
                driver.stop(&handle, signal, stop_timeout).await
            };
            let deadline = drain_timeout + stop_timeout + DRIVER_STOP_MARGIN;
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = tokio::time::timeout(deadline, work) => {
                    let outcome = match r {
                        Ok(r) => r.map_err(DriverCallError::from),
                        Err(_) => Err(DriverSilent { call: "stop", deadline }.into()),
                    };
                    let _ = tx.send(Internal::Stopped { id: id2, label, outcome });
                }
            }
        });
    }

    pub(crate) fn advance_readiness(&mut self, now: Instant) {
        let Some(rt) = self.app.as_mut() else { return };
        let mut ready = Vec::new();
        let ready_after: BTreeMap<ProcessName, Duration> =
            rt.desired().into_iter().map(|p| (p.name.clone(), p.ready_after)).collect();
        for inst in rt.instances.values_mut() {
            if inst.phase == InstPhase::Starting && inst.kind != ProcessKind::Web {
                let after = ready_after.get(&inst.id.process).copied().unwrap_or_default();
                if now.saturating_duration_since(inst.started) >= after {
                    inst.phase = InstPhase::Ready;
                    ready.push(inst.id.clone());
                }
            }
        }
        for id in ready {
            self.persist_ready(&id);
            let label = self.instance_label(&id);
            self.progress(format!("{label} ready"));
        }
    }
}
