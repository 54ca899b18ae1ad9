//! A driver whose instances are rows in a table.

use crate::journal::{Entry, Journal};
use crate::lock;
use nonstop_core::driver::{
    Driver, DriverError, ExitStatus, InstanceHandle, LaunchSpec, Liveness, Locator, StopOutcome, TaskHandle,
    TaskOutcome, TaskSpec,
};
use nonstop_core::{AppName, EnvironmentId, InstanceId, ProcessName, Signal};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// What the driver was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverCall {
    Start { launch: LaunchSpec, at: Instant },
    Stop { instance: InstanceId, signal: Signal, timeout: Duration, at: Instant },
    RunTask { task: TaskSpec, at: Instant },
    StopTask { name: String, signal: Signal, at: Instant },
}

/// How long a started one-off task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRun {
    /// Ends at once with the task status.
    Instant,
    /// Ends with the task status this long after it started.
    After(Duration),
    /// Until [`FakeDriver::end_task`] (or a stop, or its timeout).
    UntilEnded,
}

struct FakeTask {
    handle: TaskHandle,
    spec: TaskSpec,
    exit: watch::Sender<Option<ExitStatus>>,
}

impl FakeTask {
    fn alive(&self) -> bool {
        self.exit.borrow().is_none()
    }
}

/// How an instance reacts to `stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopBehavior {
    /// Exits at once on the stop signal.
    Graceful,
    /// Exits this long after the stop signal (killed at the timeout if
    /// that comes first).
    After(Duration),
    /// Ignores the signal: `stop` resolves when the test makes the instance
    /// exit, or kills it at the stop timeout.
    Hang,
}

/// How long a started instance lives by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Until stopped or made to exit by the test.
    Forever,
    /// Exits with this status this long after it started (a crashing app).
    ExitAfter(Duration, ExitStatus),
}

/// A picture of the driver's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverSnapshot {
    /// Live instances, ordered by id.
    pub alive: Vec<InstanceId>,
    /// The most instances of each process alive at once since the start or
    /// the last [`FakeDriver::reset_peaks`].
    pub peak_alive: BTreeMap<ProcessName, usize>,
    /// The most instances alive at once, all processes together.
    pub peak_total: usize,
    pub starts: usize,
    pub stops: usize,
}

struct FakeInstance {
    handle: InstanceHandle,
    launch: LaunchSpec,
    exit: watch::Sender<Option<ExitStatus>>,
}

impl FakeInstance {
    fn alive(&self) -> bool {
        self.exit.borrow().is_none()
    }
}

struct FailRule {
    /// `None`: every start fails.
    remaining: Option<u32>,
    reason: String,
}

struct State {
    calls: Vec<DriverCall>,
    /// By pid: instance ids are unique only within an app and environment.
    instances: BTreeMap<u32, FakeInstance>,
    next_port: u16,
    next_pid: u32,
    failures: BTreeMap<ProcessName, FailRule>,
    stop_behavior: BTreeMap<ProcessName, StopBehavior>,
    default_stop: StopBehavior,
    lifetimes: BTreeMap<ProcessName, Lifetime>,
    start_delay: Duration,
    /// `start`, `stop` and `run_task` record the call and never answer.
    unresponsive: bool,
    /// `liveness` answers `Unknown` with this reason (a driver that cannot
    /// read `/proc`).
    liveness_unknown: Option<String>,
    task_status: ExitStatus,
    /// Tasks print this variable of their environment (`NAME=value`).
    task_echo: Option<String>,
    task_run: TaskRun,
    /// By pid.
    tasks: BTreeMap<u32, FakeTask>,
    /// The most tasks alive at once.
    peak_tasks: usize,
    peaks: BTreeMap<ProcessName, usize>,
    peak_total: usize,
}

impl State {
    /// The instance with this id: the live one if any, else the last started.
    fn by_id(&self, id: &InstanceId) -> Option<&FakeInstance> {
        let mut matching = self.instances.values().rev().filter(|i| &i.handle.instance == id);
        let latest = matching.clone().next();
        matching.find(|i| i.alive()).or(latest)
    }

    fn by_handle(&self, handle: &InstanceHandle) -> Option<&FakeInstance> {
        let pid = handle.locator.pid()?;
        self.instances.get(&pid).filter(|i| &i.handle == handle)
    }

    fn alive_ids(&self) -> Vec<InstanceId> {
        let mut ids: Vec<InstanceId> =
            self.instances.values().filter(|i| i.alive()).map(|i| i.handle.instance.clone()).collect();
        ids.sort();
        ids
    }

    fn alive_count(&self, process: Option<&ProcessName>) -> usize {
        self.instances.values().filter(|i| i.alive() && process.is_none_or(|p| &i.handle.instance.process == p)).count()
    }

    fn update_peaks(&mut self, process: &ProcessName) {
        let n = self.alive_count(Some(process));
        let peak = self.peaks.entry(process.clone()).or_default();
        *peak = (*peak).max(n);
        self.peak_total = self.peak_total.max(self.alive_count(None));
    }
}

struct Inner {
    state: Mutex<State>,
    journal: Journal,
}

/// A [`Driver`] that runs nothing. Clones share the same table.
#[derive(Clone)]
pub struct FakeDriver {
    inner: Arc<Inner>,
}

impl Default for FakeDriver {
    fn default() -> Self {
        Self::new(Journal::new())
    }
}

fn signal_number(s: Signal) -> i32 {
    match s {
        Signal::Hup => 1,
        Signal::Int => 2,
        Signal::Quit => 3,
        Signal::Kill => 9,
        Signal::Usr1 => 10,
        Signal::Usr2 => 12,
        Signal::Term => 15,
        Signal::Winch => 28,
    }
}

impl FakeDriver {
    pub fn new(journal: Journal) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    calls: Vec::new(),
                    instances: BTreeMap::new(),
                    next_port: 20_000,
                    next_pid: 1_000,
                    failures: BTreeMap::new(),
                    stop_behavior: BTreeMap::new(),
                    default_stop: StopBehavior::Graceful,
                    lifetimes: BTreeMap::new(),
                    start_delay: Duration::ZERO,
                    unresponsive: false,
                    liveness_unknown: None,
                    task_status: ExitStatus::Code(0),
                    task_echo: None,
                    task_run: TaskRun::Instant,
                    tasks: BTreeMap::new(),
                    peak_tasks: 0,
                    peaks: BTreeMap::new(),
                    peak_total: 0,
                }),
                journal,
            }),
        }
    }

    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    // ------------------------------------------------------------ behaviour

    /// The next `n` starts of `process` fail with `reason`.
    pub fn fail_next_starts(&self, process: &ProcessName, n: u32, reason: &str) {
        self.state().failures.insert(process.clone(), FailRule { remaining: Some(n), reason: reason.to_string() });
    }

    /// Every start of `process` fails with `reason` until
    /// [`FakeDriver::clear_failures`].
    pub fn fail_starts(&self, process: &ProcessName, reason: &str) {
        self.state().failures.insert(process.clone(), FailRule { remaining: None, reason: reason.to_string() });
    }

    pub fn clear_failures(&self) {
        self.state().failures.clear();
    }

    /// How instances of `process` react to `stop`.
    pub fn set_stop_behavior(&self, process: &ProcessName, behavior: StopBehavior) {
        self.state().stop_behavior.insert(process.clone(), behavior);
    }

    /// How instances of processes without their own setting react to `stop`.
    pub fn set_default_stop_behavior(&self, behavior: StopBehavior) {
        self.state().default_stop = behavior;
    }

    /// How long instances of `process` started from now on live.
    pub fn set_lifetime(&self, process: &ProcessName, lifetime: Lifetime) {
        self.state().lifetimes.insert(process.clone(), lifetime);
    }

    /// `start` takes this long (virtual time) before it returns.
    pub fn set_start_delay(&self, delay: Duration) {
        self.state().start_delay = delay;
    }

    /// From now on `start`, `stop` and `run_task` record the call and never
    /// answer (a driver whose remote API hangs), until set back to `false`;
    /// calls already waiting stay unanswered.
    pub fn set_unresponsive(&self, unresponsive: bool) {
        self.state().unresponsive = unresponsive;
    }

    /// From now on `liveness` answers `Unknown(reason)` for every instance
    /// (a driver out of file descriptors), until set back to `None`.
    pub fn set_liveness_unknown(&self, reason: Option<&str>) {
        self.state().liveness_unknown = reason.map(str::to_string);
    }

    /// The exit status of one-off tasks.
    pub fn set_task_status(&self, status: ExitStatus) {
        self.state().task_status = status;
    }

    /// Tasks print variable `var` of their environment as `var=value`
    /// (their output tail), as a task that echoes its settings does.
    pub fn set_task_echo(&self, var: Option<&str>) {
        self.state().task_echo = var.map(str::to_string);
    }

    /// How long one-off tasks started from now on run.
    pub fn set_task_run(&self, run: TaskRun) {
        self.state().task_run = run;
    }

    /// Make a live task exit with `status` (as if it finished by itself).
    /// Returns whether it was alive.
    pub fn end_task(&self, name: &str, status: ExitStatus) -> bool {
        let pid =
            self.state().tasks.values().rev().find(|t| t.handle.name == name && t.alive()).map(|t| pid_of(&t.handle));
        pid.is_some_and(|pid| self.exit_task(pid, status))
    }

    fn exit_task(&self, pid: u32, status: ExitStatus) -> bool {
        let name = {
            let st = self.state();
            match st.tasks.get(&pid) {
                Some(t) if t.alive() => {
                    t.exit.send_replace(Some(status));
                    Some(t.handle.name.clone())
                }
                _ => None,
            }
        };
        match name {
            Some(name) => {
                self.inner.journal.push(Entry::TaskExit(name, status));
                true
            }
            None => false,
        }
    }

    /// Handles of the live tasks, oldest first.
    pub fn tasks_alive(&self) -> Vec<TaskHandle> {
        self.state().tasks.values().filter(|t| t.alive()).map(|t| t.handle.clone()).collect()
    }

    /// The names of the tasks started, in order.
    pub fn task_starts(&self) -> Vec<String> {
        self.state().tasks.values().map(|t| t.handle.name.clone()).collect()
    }

    /// The spec of the last task started with this name.
    pub fn task_spec(&self, name: &str) -> Option<TaskSpec> {
        self.state().tasks.values().rev().find(|t| t.handle.name == name).map(|t| t.spec.clone())
    }

    /// The most tasks alive at once since the driver was created.
    pub fn peak_tasks_alive(&self) -> usize {
        self.state().peak_tasks
    }

    /// Every task stop the engine asked for: (task name, signal).
    pub fn task_stops(&self) -> Vec<(String, Signal)> {
        self.state()
            .calls
            .iter()
            .filter_map(|c| match c {
                DriverCall::StopTask { name, signal, .. } => Some((name.clone(), *signal)),
                _ => None,
            })
            .collect()
    }

    /// Make a live instance exit with `status`, as if it crashed or was
    /// killed behind our back. Returns whether it was alive.
    pub fn exit(&self, id: &InstanceId, status: ExitStatus) -> bool {
        let pid = self.state().by_id(id).and_then(|i| i.handle.locator.pid());
        pid.is_some_and(|pid| self.exit_pid(pid, status))
    }

    fn exit_pid(&self, pid: u32, status: ExitStatus) -> bool {
        let exited = {
            let st = self.state();
            match st.instances.get(&pid) {
                Some(inst) if inst.alive() => {
                    inst.exit.send_replace(Some(status));
                    Some(inst.handle.instance.clone())
                }
                _ => None,
            }
        };
        match exited {
            Some(id) => {
                self.inner.journal.push(Entry::Exit(id, status));
                true
            }
            None => false,
        }
    }

    /// Start counting peaks again from what is alive now.
    pub fn reset_peaks(&self) {
        let mut st = self.state();
        let processes: Vec<ProcessName> =
            st.instances.values().map(|i| i.handle.instance.process.clone()).chain(st.peaks.keys().cloned()).collect();
        st.peaks.clear();
        for p in processes {
            let n = st.alive_count(Some(&p));
            st.peaks.insert(p, n);
        }
        st.peak_total = st.alive_count(None);
    }

    // ------------------------------------------------------------- reading

    pub fn calls(&self) -> Vec<DriverCall> {
        self.state().calls.clone()
    }

    /// Every launch asked for (including the ones that failed), in order.
    pub fn starts(&self) -> Vec<LaunchSpec> {
        self.state()
            .calls
            .iter()
            .filter_map(|c| match c {
                DriverCall::Start { launch, .. } => Some(launch.clone()),
                _ => None,
            })
            .collect()
    }

    /// Every launch of `process`, in order.
    pub fn starts_of(&self, process: &ProcessName) -> Vec<LaunchSpec> {
        self.starts().into_iter().filter(|l| &l.instance.process == process).collect()
    }

    /// Every instance the engine asked to stop, in order.
    pub fn stops(&self) -> Vec<InstanceId> {
        self.state()
            .calls
            .iter()
            .filter_map(|c| match c {
                DriverCall::Stop { instance, .. } => Some(instance.clone()),
                _ => None,
            })
            .collect()
    }

    /// Live instances, ordered by id.
    pub fn alive(&self) -> Vec<InstanceId> {
        self.state().alive_ids()
    }

    pub fn alive_of(&self, process: &ProcessName) -> Vec<InstanceId> {
        self.alive().into_iter().filter(|i| &i.process == process).collect()
    }

    pub fn is_instance_alive(&self, id: &InstanceId) -> bool {
        self.state().by_id(id).is_some_and(|i| i.alive())
    }

    /// How an instance ended, if it did.
    pub fn exit_status(&self, id: &InstanceId) -> Option<ExitStatus> {
        self.state().by_id(id).and_then(|i| *i.exit.borrow())
    }

    pub fn handle_of(&self, id: &InstanceId) -> Option<InstanceHandle> {
        self.state().by_id(id).map(|i| i.handle.clone())
    }

    pub fn launch_of(&self, id: &InstanceId) -> Option<LaunchSpec> {
        self.state().by_id(id).map(|i| i.launch.clone())
    }

    /// The most instances of `process` alive at once (see [`FakeDriver::reset_peaks`]).
    pub fn peak_alive(&self, process: &ProcessName) -> usize {
        self.state().peaks.get(process).copied().unwrap_or(0)
    }

    pub fn snapshot(&self) -> DriverSnapshot {
        let st = self.state();
        DriverSnapshot {
            alive: st.alive_ids(),
            peak_alive: st.peaks.clone(),
            peak_total: st.peak_total,
            starts: st.calls.iter().filter(|c| matches!(c, DriverCall::Start { .. })).count(),
            stops: st.calls.iter().filter(|c| matches!(c, DriverCall::Stop { .. })).count(),
        }
    }

    /// Resolve once `cond` holds (re-checked after every change).
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&FakeDriver) -> bool) {
        self.inner.journal.wait_for(what, || cond(self)).await
    }

    /// Resolve once `process` has `n` live instances.
    pub async fn wait_alive(&self, process: &ProcessName, n: usize) {
        let what = format!("{n} live instance(s) of {process}");
        self.wait_for(&what, |d| d.alive_of(process).len() == n).await
    }

    /// Resolve once `n` starts of `process` were asked for in total.
    pub async fn wait_starts(&self, process: &ProcessName, n: usize) {
        let what = format!("{n} start(s) of {process}");
        self.wait_for(&what, |d| d.starts_of(process).len() >= n).await
    }
}

fn pid_of(handle: &TaskHandle) -> u32 {
    handle.locator.pid().unwrap_or(0)
}

impl FakeDriver {
    /// Whether this start should fail, consuming one counted failure.
    fn take_failure(st: &mut State, process: &ProcessName) -> Option<String> {
        let rule = st.failures.get_mut(process)?;
        let reason = rule.reason.clone();
        match &mut rule.remaining {
            None => Some(reason),
            Some(0) => {
                st.failures.remove(process);
                None
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    st.failures.remove(process);
                }
                Some(reason)
            }
        }
    }

    fn arm_lifetime(&self, pid: u32, lifetime: Lifetime) {
        let Lifetime::ExitAfter(after, status) = lifetime else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            me.exit_pid(pid, status);
        });
    }
}

impl Driver for FakeDriver {
    async fn start(&self, launch: LaunchSpec) -> Result<InstanceHandle, DriverError> {
        let (delay, unresponsive) = {
            let mut st = self.state();
            st.calls.push(DriverCall::Start { launch: launch.clone(), at: Instant::now() });
            (st.start_delay, st.unresponsive)
        };
        if unresponsive {
            return std::future::pending().await;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let id = launch.instance.clone();
        let result = {
            let mut st = self.state();
            match Self::take_failure(&mut st, &id.process) {
                Some(reason) => Err(DriverError::Start { instance: id.to_string(), source: reason.into() }),
                None => {
                    let pid = st.next_pid;
                    st.next_pid += 2;
                    let addr = launch.wants_port.then(|| {
                        st.next_port += 1;
                        SocketAddr::from((Ipv4Addr::LOCALHOST, st.next_port))
                    });
                    let handle = InstanceHandle {
                        instance: id.clone(),
                        locator: Locator::Local {
                            pid,
                            start_time: u64::from(pid) * 10,
                            monitor_pid: pid + 1,
                            monitor_start_time: u64::from(pid) * 10 + 1,
                        },
                        addr,
                    };
                    let (exit, _) = watch::channel(None);
                    st.instances.insert(pid, FakeInstance { handle: handle.clone(), launch, exit });
                    st.update_peaks(&id.process);
                    let lifetime = st.lifetimes.get(&id.process).copied().unwrap_or(Lifetime::Forever);
                    Ok((handle, lifetime))
                }
            }
        };
        match result {
            Ok((handle, lifetime)) => {
                self.inner.journal.push(Entry::Start(id.clone()));
                if let Some(pid) = handle.locator.pid() {
                    self.arm_lifetime(pid, lifetime);
                }
                Ok(handle)
            }
            Err(e) => {
                self.inner.journal.push(Entry::StartFailed(id));
                Err(e)
            }
        }
    }

    async fn stop(
        &self,
        handle: &InstanceHandle,
        signal: Signal,
        timeout: Duration,
    ) -> Result<StopOutcome, DriverError> {
        let id = handle.instance.clone();
        let pid = handle.locator.pid().unwrap_or(0);
        let (behavior, rx, unresponsive) = {
            let mut st = self.state();
            st.calls.push(DriverCall::Stop { instance: id.clone(), signal, timeout, at: Instant::now() });
            let behavior = st.stop_behavior.get(&id.process).copied().unwrap_or(st.default_stop);
            let rx = st.by_handle(handle).filter(|i| i.alive()).map(|i| i.exit.subscribe());
            (behavior, rx, st.unresponsive)
        };
        if unresponsive {
            return std::future::pending().await;
        }
        self.inner.journal.push(Entry::Stop(id.clone()));
        let Some(mut rx) = rx else {
            return Ok(StopOutcome::AlreadyGone);
        };
        // How long after the signal it exits by itself; None: never.
        let exits_in = match behavior {
            StopBehavior::Graceful => Some(Duration::ZERO),
            StopBehavior::After(d) => Some(d),
            StopBehavior::Hang => None,
        }
        .filter(|d| *d < timeout);
        if exits_in != Some(Duration::ZERO) {
            let wait = exits_in.unwrap_or(timeout);
            let exited_meanwhile = tokio::select! {
                r = rx.wait_for(|s| s.is_some()) => r.is_ok(),
                _ = tokio::time::sleep(wait) => false,
            };
            if exited_meanwhile {
                return Ok(StopOutcome::Graceful);
            }
        }
        match exits_in {
            Some(_) => {
                self.exit_pid(pid, ExitStatus::Signal(signal_number(signal)));
                Ok(StopOutcome::Graceful)
            }
            None => {
                self.exit_pid(pid, ExitStatus::Signal(9));
                Ok(StopOutcome::Killed)
            }
        }
    }

    async fn wait_exit(&self, handle: &InstanceHandle) -> ExitStatus {
        let rx = self.state().by_handle(handle).map(|i| i.exit.subscribe());
        let Some(mut rx) = rx else {
            return ExitStatus::Unknown;
        };
        let status = match rx.wait_for(|s| s.is_some()).await {
            Ok(s) => (*s).unwrap_or(ExitStatus::Unknown),
            Err(_) => ExitStatus::Unknown,
        };
        status
    }

    fn liveness(&self, handle: &InstanceHandle) -> Liveness {
        let st = self.state();
        if let Some(reason) = &st.liveness_unknown {
            return Liveness::Unknown(reason.clone());
        }
        match st.by_handle(handle).is_some_and(|i| i.alive()) {
            true => Liveness::Alive,
            false => Liveness::Gone,
        }
    }

    fn running(&self, app: &AppName, environment: &EnvironmentId) -> Vec<InstanceHandle> {
        self.state()
            .instances
            .values()
            .filter(|i| i.alive() && &i.launch.app == app && &i.launch.environment == environment)
            .map(|i| i.handle.clone())
            .collect()
    }

    async fn start_task(&self, task: TaskSpec) -> Result<TaskHandle, DriverError> {
        let (status, run, unresponsive) = {
            let mut st = self.state();
            st.calls.push(DriverCall::RunTask { task: task.clone(), at: Instant::now() });
            (st.task_status, st.task_run, st.unresponsive)
        };
        if unresponsive {
            return std::future::pending().await;
        }
        let handle = {
            let mut st = self.state();
            let pid = st.next_pid;
            st.next_pid += 2;
            let handle = TaskHandle {
                name: task.name.clone(),
                locator: Locator::Local {
                    pid,
                    start_time: u64::from(pid) * 10,
                    monitor_pid: pid + 1,
                    monitor_start_time: u64::from(pid) * 10 + 1,
                },
            };
            let (exit, _) = watch::channel(None);
            st.tasks.insert(pid, FakeTask { handle: handle.clone(), spec: task.clone(), exit });
            let alive = st.tasks.values().filter(|t| t.alive()).count();
            st.peak_tasks = st.peak_tasks.max(alive);
            handle
        };
        self.inner.journal.push(Entry::RunTask(task.name.clone()));
        let pid = pid_of(&handle);
        match run {
            TaskRun::Instant => {
                self.exit_task(pid, status);
            }
            TaskRun::After(d) => {
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    me.exit_task(pid, status);
                });
            }
            TaskRun::UntilEnded => {}
        }
        Ok(handle)
    }

    async fn wait_task(&self, handle: &TaskHandle, timeout: Duration) -> Result<TaskOutcome, DriverError> {
        let began = Instant::now();
        let (rx, unresponsive, output_tail) = {
            let st = self.state();
            let task = st.tasks.get(&pid_of(handle)).filter(|t| &t.handle == handle);
            let rx = task.map(|t| t.exit.subscribe());
            let echo = st.task_echo.as_ref().zip(task).map(|(var, t)| {
                let value = t.spec.env.iter().find(|(k, _)| k == var).map(|(_, v)| v.as_str()).unwrap_or("");
                format!("{var}={value}")
            });
            (rx, st.unresponsive, echo.into_iter().collect::<Vec<_>>())
        };
        if unresponsive {
            return std::future::pending().await;
        }
        let Some(mut rx) = rx else {
            return Err(DriverError::Task { name: handle.name.clone(), source: "no such task".into() });
        };
        let ended = tokio::select! {
            r = rx.wait_for(|s| s.is_some()) => r.ok().and_then(|s| *s),
            _ = tokio::time::sleep(timeout) => None,
        };
        let (status, timed_out) = match ended {
            Some(status) => (status, false),
            None => {
                self.exit_task(pid_of(handle), ExitStatus::Signal(15));
                (ExitStatus::Signal(15), true)
            }
        };
        Ok(TaskOutcome { status, timed_out, output_tail, duration: began.elapsed() })
    }

    async fn stop_task(
        &self,
        handle: &TaskHandle,
        signal: Signal,
        _timeout: Duration,
    ) -> Result<StopOutcome, DriverError> {
        let unresponsive = {
            let mut st = self.state();
            st.calls.push(DriverCall::StopTask { name: handle.name.clone(), signal, at: Instant::now() });
            st.unresponsive
        };
        if unresponsive {
            return std::future::pending().await;
        }
        if self.exit_task(pid_of(handle), ExitStatus::Signal(signal_number(signal))) {
            Ok(StopOutcome::Graceful)
        } else {
            Ok(StopOutcome::AlreadyGone)
        }
    }

    fn task_liveness(&self, handle: &TaskHandle) -> Liveness {
        let st = self.state();
        if let Some(reason) = &st.liveness_unknown {
            return Liveness::Unknown(reason.clone());
        }
        match st.tasks.get(&pid_of(handle)).is_some_and(|t| &t.handle == handle && t.alive()) {
            true => Liveness::Alive,
            false => Liveness::Gone,
        }
    }

    fn task_exit(&self, handle: &TaskHandle) -> Option<ExitStatus> {
        self.state().tasks.get(&pid_of(handle)).filter(|t| &t.handle == handle).and_then(|t| *t.exit.borrow())
    }

    fn running_tasks(&self, app: &AppName, environment: &EnvironmentId) -> Vec<TaskHandle> {
        self.state()
            .tasks
            .values()
            .filter(|t| t.alive() && &t.spec.app == app && &t.spec.environment == environment)
            .map(|t| t.handle.clone())
            .collect()
    }
}
