//! The daemon's metrics (issue 14): one task that, every 5 s, reads every
//! environment's status from the engine and the traffic layer's figures,
//! samples the instances' process groups, and records it all in a
//! `nonstop_metrics::Store`; the store is saved under
//! `$NONSTOP_HOME/metrics/` every minute and when the task stops, and
//! loaded when it starts. It answers `GET /v1/metrics` (the API's
//! [`MetricsSource`]) and serves Prometheus text on the running specs'
//! `[metrics] listen` addresses.

use crate::queue::{Depths, QueueKey, QueueReader};
use nonstop_api::dashboard::{ChartRange, ChartsReport, ProcessCharts};
use nonstop_api::server::{ListenError, MetricsSource};
use nonstop_api::wire::{MetricSeries, MetricsReport, ProcessMetrics, ReleaseRequests};
use nonstop_core::traffic::{BackendFigures, BackendHealth, RouteFigures, Traffic};
use nonstop_core::{AppEnv, AppName, EnvironmentId, InstanceId, ProcessKind, ProcessName, ReleaseId};
use nonstop_engine::{EngineHandle, InstanceState, StatusReport};
use nonstop_metrics::{
    persist, prometheus, CurrentValue, Histogram, Limits, Metric, Resolution, Sampler, SeriesKey, StatusClass, Store,
    Summary, Timestamp,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the task samples.
pub const STEP: Duration = Duration::from_secs(5);
/// How often the store is saved.
pub const SAVE_EVERY: Duration = Duration::from_secs(60);
/// Points in a report's recent series (5 min of 5 s points).
pub const RECENT_POINTS: usize = 60;
/// The window a report's current rates and quantiles are taken over.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The store and where it is saved; shared by the task, the API and the
/// `/metrics` servers.
pub struct Metrics {
    store: Mutex<Store>,
    dir: PathBuf,
    /// Why a `[metrics] listen` address could not be served, per address.
    listen_errors: Mutex<BTreeMap<SocketAddr, String>>,
    /// The addresses `/metrics` is served on.
    served: Mutex<BTreeSet<SocketAddr>>,
    /// Why a process's queue depth was not read at the last step.
    queue_errors: Mutex<BTreeMap<crate::queue::QueueKey, String>>,
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

impl Metrics {
    /// The store saved in `dir`, or an empty one (a damaged file is moved
    /// aside and logged, never fatal).
    pub fn load(dir: PathBuf) -> Arc<Metrics> {
        let loaded = persist::load(&dir, Limits::default(), now());
        if let Some(p) = loaded.problem {
            tracing::warn!("metrics: {p}; starting with no past metrics");
        }
        Arc::new(Metrics {
            store: Mutex::new(loaded.store),
            dir,
            listen_errors: Mutex::new(BTreeMap::new()),
            served: Mutex::new(BTreeSet::new()),
            queue_errors: Mutex::new(BTreeMap::new()),
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encode under the lock, write off it.
    async fn save(self: &Arc<Self>) {
        let bytes = persist::encode(&self.store());
        let dir = self.dir.clone();
        match tokio::task::spawn_blocking(move || persist::write_atomic(&dir, &bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("metrics: {e}"),
            Err(e) => tracing::warn!("metrics: saving failed: {e}"),
        }
    }

    /// The Prometheus text of everything.
    pub fn render(&self) -> String {
        prometheus::render(&self.store(), now())
    }

    /// The `[metrics] listen` problems, for logs and reports.
    pub fn listen_errors(&self) -> Vec<String> {
        self.listen_errors.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}

/// One series as the wire shows it: a counter's rate over the window and
/// total, a gauge's last value; recent points' headlines.
fn series(store: &Store, key: &SeriesKey, at: Timestamp) -> MetricSeries {
    let (from, to) = (at.minus(WINDOW), at.plus(Duration::from_millis(1)));
    let current = store.current(key);
    let (current_value, total) = match current.map(|c| c.value) {
        Some(CurrentValue::Counter(total)) => {
            let rate = match store.window(key, Resolution::FiveSeconds, from, to) {
                Some(Summary::Counter { per_second, .. }) => Some(per_second),
                _ => Some(0.0),
            };
            (rate, Some(total))
        }
        Some(CurrentValue::Gauge(v)) => (store.is_current(key, at).then_some(v), None),
        _ => (None, None),
    };
    MetricSeries {
        current: current_value,
        total,
        recent: store.recent(key, Resolution::FiveSeconds, at, RECENT_POINTS),
    }
}

/// The sum of several series (a process's releases, its instances):
/// totals and rates added, recent points added step by step, gauges'
/// current values added over those still measured.
fn sum_series(store: &Store, keys: &[&SeriesKey], at: Timestamp) -> MetricSeries {
    let mut out = MetricSeries { current: None, total: None, recent: vec![None; RECENT_POINTS] };
    for k in keys {
        let one = series(store, k, at);
        let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(x), Some(y)) => Some(x + y),
            (x, None) => x,
            (None, y) => y,
        };
        out.current = add(out.current, one.current);
        out.total = match (out.total, one.total) {
            (Some(x), Some(y)) => Some(x + y),
            (x, None) => x,
            (None, y) => y,
        };
        for (a, b) in out.recent.iter_mut().zip(one.recent) {
            *a = add(*a, b);
        }
    }
    if keys.is_empty() {
        out.recent.clear();
    }
    out
}

/// The p95 of each of the last [`RECENT_POINTS`] steps, in milliseconds,
/// over several latency series.
fn p95_recent(store: &Store, keys: &[&SeriesKey], at: Timestamp) -> Vec<Option<f64>> {
    let step = Resolution::FiveSeconds.step_ms();
    let last = at.as_millis() / step;
    let first = last.saturating_sub(RECENT_POINTS as u64 - 1);
    let mut merged: Vec<Histogram> = vec![Histogram::new(); (last - first + 1) as usize];
    let (from, to) = (Timestamp::from_millis(first * step), Timestamp::from_millis((last + 1) * step));
    for k in keys {
        for p in store.points(k, Resolution::FiveSeconds, from, to) {
            if let nonstop_metrics::PointValue::Histogram(h) = p.value {
                if let Some(m) = merged.get_mut((p.start.as_millis() / step).saturating_sub(first) as usize) {
                    m.merge(&h);
                }
            }
        }
    }
    merged.iter().map(|h| h.quantile(0.95).map(ms)).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl MetricsSource for Metrics {
    fn check_listen(&self, addr: SocketAddr) -> Result<(), ListenError> {
        if self.served.lock().unwrap_or_else(|e| e.into_inner()).contains(&addr) {
            return Ok(());
        }
        // Free now (the task binds it within a step), or taken.
        std::net::TcpListener::bind(addr).map(drop).map_err(|source| ListenError { addr, source })
    }

    fn report(&self, app: &str, env: &str, processes: &[String]) -> MetricsReport {
        let at = now();
        let (Ok(app_name), Ok(env_id)) = (AppName::new(app), EnvironmentId::new(env)) else {
            return empty_report(app, env, at);
        };
        let store = self.store();
        let env_key = |m| SeriesKey::environment(app_name.clone(), env_id.clone(), m);
        let mut out = empty_report(app, env, at);
        out.listen_errors = self.listen_errors();
        out.static_hits = series(&store, &env_key(Metric::StaticHits), at);
        for p in processes {
            let Ok(process) = ProcessName::new(p.as_str()) else { continue };
            let key = |m| SeriesKey::process(app_name.clone(), env_id.clone(), process.clone(), m);
            let mine = ProcessSeries::of(&store, &app_name, &env_id, &process);
            let of = |m: Metric| mine.totals(m);
            let slots = |m: Metric| -> Vec<&SeriesKey> {
                mine.slots(m).into_iter().filter(|k| store.is_current(k, at)).collect()
            };
            let latency_keys = of(Metric::Latency);
            let mut latency = Histogram::new();
            for k in &latency_keys {
                if let Some(Summary::Histogram { histogram, .. }) =
                    store.window(k, Resolution::FiveSeconds, at.minus(WINDOW), at.plus(Duration::from_millis(1)))
                {
                    latency.merge(&histogram);
                }
            }
            let q = |q: f64| latency.quantile(q).map(ms);
            let releases = of(Metric::Requests)
                .into_iter()
                .filter_map(|k| {
                    let one = series(&store, k, at);
                    Some(ReleaseRequests { release: k.release()?.0, total: one.total?, per_second: one.current? })
                })
                .collect();
            out.processes.push(ProcessMetrics {
                process: p.clone(),
                requests: sum_series(&store, &of(Metric::Requests), at),
                p50_ms: q(0.50),
                p95_ms: q(0.95),
                p99_ms: q(0.99),
                p95_ms_recent: if latency_keys.is_empty() { Vec::new() } else { p95_recent(&store, &latency_keys, at) },
                responses_2xx: sum_series(&store, &of(Metric::Responses(StatusClass::Success)), at),
                responses_4xx: sum_series(&store, &of(Metric::Responses(StatusClass::ClientError)), at),
                responses_5xx: sum_series(&store, &of(Metric::Responses(StatusClass::ServerError)), at),
                upstream_errors: sum_series(&store, &of(Metric::UpstreamErrors), at),
                in_flight: series(&store, &key(Metric::InFlight), at),
                cpu_percent: sum_series(&store, &slots(Metric::CpuPercent), at),
                rss_bytes: sum_series(&store, &slots(Metric::RssBytes), at),
                instances: series(&store, &key(Metric::Instances), at),
                releases,
                queue_depth: series(&store, &key(Metric::QueueDepth), at),
                queue_error: self
                    .queue_errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(AppEnv::new(app_name.clone(), env_id.clone()), process.clone()))
                    .cloned(),
            });
        }
        out
    }

    fn charts(&self, app: &str, env: &str, processes: &[String], range: ChartRange) -> ChartsReport {
        charts_report(&self.store(), app, env, processes, range, now())
    }
}

/// The series of one process of an environment: the process's own
/// (per release or not) and its instances' (slots).
struct ProcessSeries<'a> {
    keys: Vec<&'a SeriesKey>,
}

impl<'a> ProcessSeries<'a> {
    fn of(store: &'a Store, app: &AppName, env: &EnvironmentId, process: &ProcessName) -> ProcessSeries<'a> {
        let keys = store
            .keys()
            .filter(|k| k.app() == app && k.environment_id() == env && k.process_name() == Some(process))
            .collect();
        ProcessSeries { keys }
    }

    /// The process's own series of `metric` (one per release, or one).
    fn totals(&self, metric: Metric) -> Vec<&'a SeriesKey> {
        self.keys.iter().copied().filter(|k| k.metric() == metric && k.slot().is_none()).collect()
    }

    /// Its instances' series of `metric`.
    fn slots(&self, metric: Metric) -> Vec<&'a SeriesKey> {
        self.keys.iter().copied().filter(|k| k.metric() == metric && k.slot().is_some()).collect()
    }
}

/// The dashboard's charts (`GET /v1/charts`): per process type, point by
/// point over the range, requests/s, p95, the 5xx share, CPU % and
/// instances; `None` where nothing was measured.
fn charts_report(
    store: &Store,
    app: &str,
    env: &str,
    processes: &[String],
    range: ChartRange,
    at: Timestamp,
) -> ChartsReport {
    let (step_secs, n) = range.points();
    let resolution = if step_secs == 5 { Resolution::FiveSeconds } else { Resolution::OneMinute };
    let step = resolution.step_ms();
    // A minute still being filled would show its counts over the whole
    // 60 s (a dip at the right edge): the range ends at the last whole one.
    let at = match resolution {
        Resolution::OneMinute => Timestamp::from_millis((at.as_millis() / step * step).saturating_sub(1)),
        Resolution::FiveSeconds => at,
    };
    let last = at.as_millis() / step;
    let first = last.saturating_sub(n as u64 - 1);
    let mut out = ChartsReport {
        app: app.to_owned(),
        environment: env.to_owned(),
        range,
        start_ms: first * step,
        step_secs,
        processes: Vec::new(),
    };
    let (Ok(app_name), Ok(env_id)) = (AppName::new(app), EnvironmentId::new(env)) else { return out };
    let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(x), Some(y)) => Some(x + y),
        (x, None) => x,
        (None, y) => y,
    };
    // Several series summed point by point.
    let sum = |keys: &[&SeriesKey]| -> Vec<Option<f64>> {
        let mut total = vec![None; n];
        for k in keys {
            for (t, v) in total.iter_mut().zip(store.recent(k, resolution, at, n)) {
                *t = add(*t, v);
            }
        }
        total
    };
    for p in processes {
        let Ok(process) = ProcessName::new(p.as_str()) else { continue };
        let mine = ProcessSeries::of(store, &app_name, &env_id, &process);
        let of = |m: Metric| mine.totals(m);
        let slots = |m: Metric| mine.slots(m);
        let requests = sum(&of(Metric::Requests));
        let errors = sum(&of(Metric::Responses(StatusClass::ServerError)));
        let error_rate = requests
            .iter()
            .zip(&errors)
            .map(|(r, e)| match r {
                Some(r) if *r > 0.0 => Some(e.unwrap_or(0.0) / r),
                _ => None,
            })
            .collect();
        let mut latency: Vec<Histogram> = vec![Histogram::new(); n];
        let (from, to) = (Timestamp::from_millis(first * step), Timestamp::from_millis((last + 1) * step));
        for k in of(Metric::Latency) {
            for point in store.points(k, resolution, from, to) {
                if let nonstop_metrics::PointValue::Histogram(h) = point.value {
                    if let Some(m) = latency.get_mut((point.start.as_millis() / step).saturating_sub(first) as usize) {
                        m.merge(&h);
                    }
                }
            }
        }
        out.processes.push(ProcessCharts {
            process: p.clone(),
            requests_per_second: requests,
            p95_ms: latency.iter().map(|h| h.quantile(0.95).map(ms)).collect(),
            error_rate,
            cpu_percent: sum(&slots(Metric::CpuPercent)),
            instances: sum(&of(Metric::Instances)),
        });
    }
    out
}

fn empty_report(app: &str, env: &str, at: Timestamp) -> MetricsReport {
    MetricsReport {
        app: app.to_owned(),
        environment: env.to_owned(),
        at_ms: at.as_millis(),
        step_secs: STEP.as_secs(),
        window_secs: WINDOW.as_secs(),
        static_hits: MetricSeries::default(),
        processes: Vec::new(),
        listen_errors: Vec::new(),
    }
}

/// What one process type (or one of its releases) did in a step: the
/// proxy's figures, summed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Step {
    pub requests: u64,
    pub classes: [u64; 5],
    pub upstream_errors: u64,
    pub latency: Histogram,
}

impl Step {
    fn add(&mut self, d: &BackendFigures) {
        self.requests += d.requests;
        self.classes[0] += d.responses_1xx;
        self.classes[1] += d.responses_2xx();
        self.classes[2] += d.responses_3xx;
        self.classes[3] += d.responses_4xx;
        self.classes[4] += d.errors_5xx;
        self.upstream_errors += d.upstream_errors;
        self.latency.merge(&Histogram::from_latency_estimating_sum(&d.latency));
    }
}

const CLASSES: [StatusClass; 5] = [
    StatusClass::Informational,
    StatusClass::Success,
    StatusClass::Redirection,
    StatusClass::ClientError,
    StatusClass::ServerError,
];

/// The proxy's figures since the last step, per (process type, release):
/// an instance's release from `releases`, else (an instance already gone)
/// `fallback`, the environment's current one. `previous` holds the last figures seen per
/// backend; a backend first seen at the first step (`baseline`) only sets
/// its baseline (its counters predate this daemon's measuring), one first
/// seen later counts from zero; a backend no longer there is forgotten.
/// Pure.
pub fn fold_figures(
    previous: &mut HashMap<InstanceId, BackendFigures>,
    figures: Vec<BackendFigures>,
    releases: &HashMap<InstanceId, ReleaseId>,
    fallback: ReleaseId,
    baseline: bool,
) -> BTreeMap<(ProcessName, ReleaseId), Step> {
    let mut out: BTreeMap<(ProcessName, ReleaseId), Step> = BTreeMap::new();
    let mut seen = HashMap::with_capacity(figures.len());
    for f in figures {
        let delta = match previous.get(&f.instance) {
            Some(before) => Some(f.since(before)),
            None if baseline => None,
            None => Some(f.clone()),
        };
        if let Some(d) = delta {
            let release = releases.get(&f.instance).copied().unwrap_or(fallback);
            out.entry((f.instance.process.clone(), release)).or_default().add(&d);
        }
        seen.insert(f.instance.clone(), f);
    }
    *previous = seen;
    out
}

/// An instance's place and release: what the sampler labels a group with.
type Slot = (AppEnv, ProcessName, u32, Option<ReleaseId>);

/// What the task remembers between steps.
struct Sampling {
    sampler: Sampler<Slot>,
    figures: HashMap<AppEnv, HashMap<InstanceId, BackendFigures>>,
    routes: HashMap<AppEnv, RouteFigures>,
}

/// What one environment looked like at a step.
struct EnvReading {
    scope: AppEnv,
    status: StatusReport,
    steps: BTreeMap<(ProcessName, ReleaseId), Step>,
    in_flight: BTreeMap<ProcessName, u64>,
    static_hits: u64,
    /// The environment was first seen at this step: its figures only set
    /// the baselines, they say nothing about this step's load.
    baseline: bool,
}

fn instance_id(s: &nonstop_engine::InstanceStatus) -> Option<InstanceId> {
    let (slot_part, generation) = s.id.split_once('#')?;
    let (process, slot) = slot_part.rsplit_once('.')?;
    Some(InstanceId::new(ProcessName::new(process).ok()?, slot.parse().ok()?, generation.parse().ok()?))
}

async fn read_env<T: Traffic>(
    engine: &EngineHandle,
    traffic: &T,
    scope: AppEnv,
    sampling: &mut Sampling,
) -> Option<EnvReading> {
    let status = engine.scoped(Some(scope.app.clone()), Some(scope.env.clone())).status().await.ok()?;
    let route = scope.route();
    let figures = traffic.figures(&route).await;
    let route_figures = traffic.route_figures(&route).await;
    let mut in_flight: BTreeMap<ProcessName, u64> = BTreeMap::new();
    for f in &figures {
        if let Some(s) = traffic.status(&f.instance) {
            *in_flight.entry(f.instance.process.clone()).or_default() += s.in_flight;
        }
    }
    let releases: HashMap<InstanceId, ReleaseId> =
        status.instances.iter().filter_map(|i| Some((instance_id(i)?, ReleaseId(i.release)))).collect();
    // An environment first seen (this daemon just started, or restored
    // it, or it is new) only sets the baselines: its counters may predate
    // this daemon (the data plane outlives it) and were counted before.
    let baseline = !sampling.figures.contains_key(&scope);
    let previous = sampling.figures.entry(scope.clone()).or_default();
    let steps = fold_figures(previous, figures, &releases, ReleaseId(status.release), baseline);
    let static_hits = match sampling.routes.insert(scope.clone(), route_figures) {
        Some(before) => route_figures.static_hits.saturating_sub(before.static_hits),
        None => 0,
    };
    Some(EnvReading { scope, status, steps, in_flight, static_hits, baseline })
}

fn record(store: &mut Store, at: Timestamp, r: &EnvReading, usage: &[nonstop_metrics::GroupReading<Slot>]) {
    let (app, env) = (r.scope.app.clone(), r.scope.env.clone());
    let note = |e: nonstop_metrics::RecordError| tracing::debug!("metrics: {e}");
    if let Err(e) =
        store.count(&SeriesKey::environment(app.clone(), env.clone(), Metric::StaticHits), at, r.static_hits)
    {
        note(e);
    }
    for p in &r.status.processes {
        let Ok(process) = ProcessName::new(p.process.as_str()) else { continue };
        let key = |m| SeriesKey::process(app.clone(), env.clone(), process.clone(), m);
        let running =
            r.status.instances.iter().filter(|i| i.process == p.process && i.state == InstanceState::Running).count();
        let mut results = vec![store.gauge(&key(Metric::Instances), at, running as f64)];
        for u in usage.iter().filter(|u| u.label.0 == r.scope && u.label.1 == process) {
            let slot = |m| SeriesKey::instance(app.clone(), env.clone(), process.clone(), u.label.2, m);
            let slot = |m| match u.label.3 {
                Some(rel) => slot(m).with_release(rel),
                None => slot(m),
            };
            if let Some(c) = u.cpu_percent {
                results.push(store.gauge(&slot(Metric::CpuPercent), at, c));
            }
            results.push(store.gauge(&slot(Metric::RssBytes), at, u.rss_bytes as f64));
        }
        if p.kind == ProcessKind::Web {
            let flight = r.in_flight.get(&process).copied().unwrap_or(0);
            results.push(store.gauge(&key(Metric::InFlight), at, flight as f64));
            // Per release only: a sum over the releases is the
            // process's figure, counted once.
            let mut steps: BTreeMap<ReleaseId, &Step> =
                r.steps.iter().filter(|((q, _), _)| q == &process).map(|((_, rel), s)| (*rel, s)).collect();
            let zero = Step::default();
            steps.entry(ReleaseId(r.status.release)).or_insert(&zero);
            for (rel, step) in &steps {
                let k = key(Metric::Requests).with_release(*rel);
                results.push(store.count(&k, at, step.requests));
                for (class, n) in CLASSES.iter().zip(step.classes) {
                    results.push(store.count(&k.clone().with_metric(Metric::Responses(*class)), at, n));
                }
                results.push(store.count(&k.clone().with_metric(Metric::UpstreamErrors), at, step.upstream_errors));
                results.push(store.histogram(&k.clone().with_metric(Metric::Latency), at, &step.latency));
            }
        }
        for e in results.into_iter().filter_map(Result::err) {
            note(e);
        }
    }
}

async fn step<T: Traffic>(
    metrics: &Arc<Metrics>,
    engine: &EngineHandle,
    traffic: &T,
    sampling: &mut Sampling,
    queues: &mut QueueReader,
) {
    let scopes = engine.environments();
    // The queues are read beside the rest (each server's read has its
    // bound); the step's time and CPU sample are taken when the rest is
    // read, not when the slowest queue answers.
    let envs = async {
        let mut readings = Vec::new();
        for scope in scopes.clone() {
            if let Some(r) = read_env(engine, traffic, scope, sampling).await {
                readings.push(r);
            }
        }
        let groups: Vec<_> = readings
            .iter()
            .flat_map(|r: &EnvReading| {
                r.status.instances.iter().filter_map(|i| {
                    let pid = i32::try_from(i.pid?).ok()?;
                    let id = instance_id(i)?;
                    Some(((r.scope.clone(), id.process, id.slot, Some(ReleaseId(i.release))), pid))
                })
            })
            .collect();
        let at = now();
        let usage = match sampling.sampler.sample(&groups, at) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!("metrics: cannot sample the instances' processes: {e}");
                Vec::new()
            }
        };
        (readings, at, usage)
    };
    let ((readings, at, usage), depths) = tokio::join!(envs, read_queues(engine, scopes.clone(), queues));
    {
        let mut store = metrics.store();
        for r in &readings {
            record(&mut store, at, r, &usage);
        }
        for ((scope, process), depth) in &depths.depths {
            let key = SeriesKey::process(scope.app.clone(), scope.env.clone(), process.clone(), Metric::QueueDepth);
            if let Err(e) = store.gauge(&key, at, *depth as f64) {
                tracing::debug!("metrics: {e}");
            }
        }
        store.expire(at);
    }
    *metrics.queue_errors.lock().unwrap_or_else(|e| e.into_inner()) = depths.problems;
    // The autoscaled processes' measurements go to their controllers.
    for r in &readings {
        for (process, sample) in autoscale_samples(r, &usage, &depths.depths) {
            let handle = engine.scoped(Some(r.scope.app.clone()), Some(r.scope.env.clone()));
            match handle.autoscale_sample(process.clone(), sample).await {
                Ok(Some(decision)) => tracing::debug!(scope = %r.scope, %process, "autoscale: {decision}"),
                Ok(None) => {}
                Err(e) => tracing::debug!(scope = %r.scope, %process, "autoscale sample not taken: {e}"),
            }
        }
    }
}

/// The queues of every environment's running processes, read (see
/// `queue.rs`).
async fn read_queues(engine: &EngineHandle, scopes: Vec<AppEnv>, queues: &mut QueueReader) -> Depths {
    let mut wanted = Vec::new();
    for scope in scopes {
        let handle = engine.scoped(Some(scope.app.clone()), Some(scope.env.clone()));
        if let Ok(reads) = handle.queue_reads().await {
            wanted.extend(reads.into_iter().map(|read| (scope.clone(), read)));
        }
    }
    queues.read(wanted).await
}

/// What this step measured of each autoscaled process of `r`: the mean
/// CPU of its instances, for web its requests per second and p95 over
/// the step, for a worker with a queue its depth now. Not measured
/// (`None`): what the step cannot say (the first step of an environment
/// only sets baselines; no request: no p95; a queue that could not be
/// read).
fn autoscale_samples(
    r: &EnvReading,
    usage: &[nonstop_metrics::GroupReading<Slot>],
    depths: &BTreeMap<QueueKey, u64>,
) -> Vec<(ProcessName, nonstop_engine::AutoscaleSample)> {
    let mut out = Vec::new();
    for p in r.status.processes.iter().filter(|p| p.autoscale.is_some()) {
        let Ok(process) = ProcessName::new(p.process.as_str()) else { continue };
        // Over the instances in rotation (web: healthy; others: running):
        // one still booting neither serves nor shares the load yet.
        let in_rotation = |slot: u32, release: Option<ReleaseId>| {
            r.status.instances.iter().any(|i| {
                instance_id(i).is_some_and(|id| id.process == process && id.slot == slot)
                    && Some(ReleaseId(i.release)) == release
                    && i.state == InstanceState::Running
                    && (p.kind != ProcessKind::Web || i.health == Some(BackendHealth::Healthy))
            })
        };
        let cpu: Vec<f64> = usage
            .iter()
            .filter(|u| u.label.0 == r.scope && u.label.1 == process && in_rotation(u.label.2, u.label.3))
            .filter_map(|u| u.cpu_percent)
            .collect();
        let measured_instances = u32::try_from(cpu.len()).ok().filter(|n| *n > 0);
        let cpu_percent = (!cpu.is_empty()).then(|| cpu.iter().sum::<f64>() / cpu.len() as f64);
        let (mut requests_per_second, mut p95_ms) = (None, None);
        if p.kind == ProcessKind::Web && !r.baseline {
            let mut requests = 0;
            let mut latency = Histogram::default();
            for ((q, _), step) in &r.steps {
                if q == &process {
                    requests += step.requests;
                    latency.merge(&step.latency);
                }
            }
            requests_per_second = Some(requests as f64 / STEP.as_secs_f64());
            p95_ms = latency.quantile(0.95).map(ms);
        }
        let queue_depth = depths.get(&(r.scope.clone(), process.clone())).map(|n| *n as f64);
        let sample = nonstop_engine::AutoscaleSample {
            cpu_percent,
            requests_per_second,
            p95_ms,
            queue_depth,
            measured_instances,
        };
        out.push((process, sample));
    }
    out
}

/// The metrics task: a step every [`STEP`], a save every [`SAVE_EVERY`]
/// and when `stop` fires; `/metrics` served on the running specs'
/// `[metrics] listen` addresses (checked at every step).
pub fn spawn<T: Traffic>(
    metrics: Arc<Metrics>,
    engine: EngineHandle,
    traffic: Arc<T>,
    store: Arc<nonstop_store::Store>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) {
    let tasks2 = tasks.clone();
    tasks.spawn(async move {
        let mut sampling = Sampling { sampler: Sampler::new(), figures: HashMap::new(), routes: HashMap::new() };
        let mut queues = QueueReader::default();
        let mut servers: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        let mut tick = tokio::time::interval(STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_save = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let wanted = wanted_listen(&store).await;
            serve_wanted(&metrics, &wanted, &mut servers, &stop, &tasks2).await;
            // Every wait has a bound: a step that cannot finish (a controller
            // that does not answer) is given up, and the next one tries again.
            let stepped = step(&metrics, &engine, traffic.as_ref(), &mut sampling, &mut queues);
            if tokio::time::timeout(STEP * 6, stepped).await.is_err() {
                tracing::warn!("metrics: a step took more than {}s and was given up", (STEP * 6).as_secs());
            }
            if last_save.elapsed() >= SAVE_EVERY {
                metrics.save().await;
                last_save = tokio::time::Instant::now();
            }
        }
        metrics.save().await;
    });
}

/// The `[metrics] listen` addresses of the running apps.
async fn wanted_listen(store: &Arc<nonstop_store::Store>) -> BTreeSet<SocketAddr> {
    let store = store.clone();
    let apps = tokio::task::spawn_blocking(move || store.apps()).await;
    match apps {
        Ok(Ok(apps)) => {
            apps.iter().filter(|a| a.running).filter_map(|a| a.spec.metrics.as_ref().map(|m| m.listen)).collect()
        }
        Ok(Err(e)) => {
            tracing::warn!("metrics: cannot read the apps: {e}");
            BTreeSet::new()
        }
        Err(_) => BTreeSet::new(),
    }
}

/// Bind what is wanted and not served; stop what is no longer wanted.
async fn serve_wanted(
    metrics: &Arc<Metrics>,
    wanted: &BTreeSet<SocketAddr>,
    servers: &mut HashMap<SocketAddr, CancellationToken>,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) {
    servers.retain(|addr, token| {
        let keep = wanted.contains(addr);
        if !keep {
            token.cancel();
        }
        keep
    });
    let mut errors = BTreeMap::new();
    let missing: Vec<SocketAddr> = wanted.iter().filter(|a| !servers.contains_key(a)).copied().collect();
    for addr in &missing {
        match serve(metrics.clone(), *addr, stop.child_token(), tasks).await {
            Ok(token) => {
                tracing::info!("metrics: Prometheus text on http://{addr}/metrics");
                servers.insert(*addr, token);
            }
            Err(e) => {
                let known = metrics.listen_errors.lock().unwrap_or_else(|p| p.into_inner()).contains_key(addr);
                if !known {
                    tracing::error!("{e}");
                }
                errors.insert(*addr, e.to_string());
            }
        }
    }
    *metrics.listen_errors.lock().unwrap_or_else(|p| p.into_inner()) = errors;
    *metrics.served.lock().unwrap_or_else(|p| p.into_inner()) = servers.keys().copied().collect();
}

/// Serve `GET /metrics` on `addr` until `stop` fires.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> Result<CancellationToken, ListenError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ListenError { addr, source })?;
    let app = router(metrics);
    let token = stop.clone();
    tasks.spawn(async move {
        let r = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        if let Err(e) = r {
            tracing::error!("metrics: /metrics on {addr} stopped: {e}");
        }
    });
    Ok(token)
}

fn router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::http::header;
    use axum::response::IntoResponse;
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                let text = tokio::task::spawn_blocking(move || m.render()).await.unwrap_or_default();
                ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], text).into_response()
            }
        }),
    )
}

/// `nonstop metrics`: one row per process type and measure, its current
/// value and a sparkline of its recent points. Pure.
pub fn table(report: &MetricsReport) -> String {
    let rate = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}/s"));
    let millis = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms"));
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |process: &str, what: &str, now: String, recent: &[Option<f64>]| {
        // From the first measured point: a series younger than the
        // window does not start with blanks.
        let from = recent.iter().position(Option::is_some).unwrap_or(recent.len());
        rows.push(vec![process.to_string(), what.to_string(), now, nonstop_metrics::sparkline(&recent[from..])]);
    };
    for p in &report.processes {
        let name = p.process.as_str();
        if p.requests.total.is_some() {
            row(name, "requests", rate(p.requests.current), &p.requests.recent);
            row(
                name,
                "latency p50/p95/p99",
                format!("{} / {} / {}", millis(p.p50_ms), millis(p.p95_ms), millis(p.p99_ms)),
                &p.p95_ms_recent,
            );
            row(name, "2xx", rate(p.responses_2xx.current), &p.responses_2xx.recent);
            row(name, "4xx", rate(p.responses_4xx.current), &p.responses_4xx.recent);
            row(name, "5xx", rate(p.responses_5xx.current), &p.responses_5xx.recent);
            row(name, "upstream errors", rate(p.upstream_errors.current), &p.upstream_errors.recent);
            row(
                name,
                "in flight",
                p.in_flight.current.map_or_else(|| "-".to_string(), |v| format!("{v:.0}")),
                &p.in_flight.recent,
            );
        }
        row(
            name,
            "CPU",
            p.cpu_percent.current.map_or_else(|| "-".to_string(), |v| format!("{v:.1}%")),
            &p.cpu_percent.recent,
        );
        let mib: Vec<Option<f64>> = p.rss_bytes.recent.iter().map(|v| v.map(|b| b / 1_048_576.0)).collect();
        row(
            name,
            "memory (RSS)",
            p.rss_bytes.current.map_or_else(|| "-".to_string(), |v| format!("{:.1} MiB", v / 1_048_576.0)),
            &mib,
        );
        row(
            name,
            "instances",
            p.instances.current.map_or_else(|| "-".to_string(), |v| format!("{v:.0}")),
            &p.instances.recent,
        );
        if p.queue_error.is_some() || p.queue_depth.recent.iter().any(Option::is_some) {
            row(
                name,
                "queue",
                p.queue_depth.current.map_or_else(|| "-".to_string(), |v| format!("{v:.0} waiting")),
                &p.queue_depth.recent,
            );
        }
    }
    if report.static_hits.total.is_some() {
        row("(static)", "static hits", rate(report.static_hits.current), &report.static_hits.recent);
    }
    let mut out = format!(
        "{} / {}: rates over the last {}s; trend: the last {} min in {}s steps\n",
        report.app,
        report.environment,
        report.window_secs,
        (report.step_secs * RECENT_POINTS as u64) / 60,
        report.step_secs
    );
    out.push_str(&crate::output::table(&["PROCESS", "METRIC", "NOW", "TREND"], &rows));
    for e in &report.listen_errors {
        out.push_str(&format!("warning: {e}\n"));
    }
    for p in &report.processes {
        if let Some(e) = &p.queue_error {
            out.push_str(&format!("warning: the queue of {}: {e}\n", p.process));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::traffic::LatencyHistogram;

    fn figures(process: &str, slot: u32, generation: u64, requests: u64, e5: u64) -> BackendFigures {
        let mut f = BackendFigures::new(InstanceId::new(ProcessName::new(process).unwrap(), slot, generation));
        f.requests = requests;
        f.errors_5xx = e5;
        f.latency = LatencyHistogram::new();
        f
    }

    #[test]
    fn the_first_step_only_sets_baselines_later_ones_count_the_difference_per_process_and_release() {
        let mut previous = HashMap::new();
        let releases: HashMap<InstanceId, ReleaseId> =
            [(figures("web", 1, 1, 0, 0).instance, ReleaseId(3)), (figures("web", 2, 1, 0, 0).instance, ReleaseId(4))]
                .into_iter()
                .collect();
        let first = fold_figures(&mut previous, vec![figures("web", 1, 1, 100, 5)], &releases, ReleaseId(4), true);
        assert!(first.is_empty(), "counters from before this daemon measured are not counted: {first:?}");
        let later = fold_figures(
            &mut previous,
            vec![figures("web", 1, 1, 130, 6), figures("web", 2, 1, 7, 0), figures("web", 3, 1, 2, 0)],
            &releases,
            ReleaseId(4),
            false,
        );
        let web = ProcessName::new("web").unwrap();
        let v3 = &later[&(web.clone(), ReleaseId(3))];
        assert_eq!(v3.requests, 30);
        assert_eq!(v3.classes[4], 1);
        assert_eq!(v3.classes[1], 29);
        // web.3 is no instance the status knows: the current release's.
        assert_eq!(later[&(web, ReleaseId(4))].requests, 7 + 2);
    }

    #[test]
    fn a_backend_that_is_gone_is_forgotten() {
        let mut previous = HashMap::new();
        let none = HashMap::new();
        fold_figures(&mut previous, vec![figures("web", 1, 1, 10, 0)], &none, ReleaseId(1), true);
        fold_figures(&mut previous, vec![], &none, ReleaseId(1), false);
        assert!(previous.is_empty());
        // It comes back (the same id): counted from zero.
        let again = fold_figures(&mut previous, vec![figures("web", 1, 1, 4, 0)], &none, ReleaseId(1), false);
        assert_eq!(again[&(ProcessName::new("web").unwrap(), ReleaseId(1))].requests, 4);
    }

    #[test]
    fn the_table_shows_each_measure_with_a_sparkline_from_its_first_point() {
        let measured =
            MetricSeries { current: Some(2.5), total: Some(40), recent: vec![None, None, Some(1.0), Some(4.0)] };
        let mut report = empty_report("hello", "default", Timestamp::from_secs(1_000));
        report.processes.push(ProcessMetrics {
            process: "web".into(),
            requests: measured.clone(),
            p50_ms: Some(1.0),
            p95_ms: Some(2.0),
            p99_ms: None,
            p95_ms_recent: vec![],
            responses_2xx: measured.clone(),
            responses_4xx: MetricSeries::default(),
            responses_5xx: MetricSeries::default(),
            upstream_errors: MetricSeries::default(),
            in_flight: MetricSeries::default(),
            cpu_percent: MetricSeries::default(),
            rss_bytes: MetricSeries { current: Some(2.0 * 1_048_576.0), total: None, recent: vec![] },
            instances: MetricSeries::default(),
            releases: vec![],
            queue_depth: MetricSeries::default(),
            queue_error: None,
        });
        let text = table(&report);
        let requests = text.lines().find(|l| l.contains("requests")).unwrap();
        assert!(requests.contains("2.50/s"), "{text}");
        assert!(requests.trim_end().ends_with("▃█"), "{text}");
        assert!(text.contains("1.0 ms / 2.0 ms / -"), "{text}");
        assert!(text.contains("2.0 MiB"), "{text}");
        assert!(!text.contains("static hits"), "never measured: {text}");
    }

    #[test]
    fn a_chart_of_minutes_ends_at_the_last_whole_minute() {
        // 60 requests/s for ten whole minutes, then 10 s of the current
        // minute at the same rate.
        let mut store = Store::new(nonstop_metrics::Limits::default());
        let key = SeriesKey::process(
            AppName::new("hello").unwrap(),
            EnvironmentId::new("default").unwrap(),
            ProcessName::new("web").unwrap(),
            Metric::Requests,
        )
        .with_release(ReleaseId(1));
        let start = 1_000_020u64 * 60; // a minute's start, in seconds
        for s in (5..=610).step_by(5) {
            store.count(&key, Timestamp::from_secs(start + s), 300).unwrap();
        }
        let at = Timestamp::from_secs(start + 610);
        let report = charts_report(&store, "hello", "default", &["web".into()], ChartRange::SixHours, at);
        let rps = &report.processes[0].requests_per_second;
        let last = rps.last().copied().flatten().expect("the last point is measured");
        assert!((last - 60.0).abs() < 1e-9, "the right edge is a whole minute: {last}");
        // The 5 s chart does end now.
        let report = charts_report(&store, "hello", "default", &["web".into()], ChartRange::FifteenMinutes, at);
        let rps = &report.processes[0].requests_per_second;
        assert!((rps.last().copied().flatten().unwrap() - 60.0).abs() < 1e-9, "{:?}", &rps[rps.len() - 3..]);
    }

    #[test]
    fn the_table_shows_a_queue_and_why_it_is_not_read() {
        let mut report = empty_report("shop", "default", Timestamp::from_secs(1_000));
        let worker = |name: &str, depth: MetricSeries, error: Option<&str>| ProcessMetrics {
            process: name.into(),
            requests: MetricSeries::default(),
            p50_ms: None,
            p95_ms: None,
            p99_ms: None,
            p95_ms_recent: vec![],
            responses_2xx: MetricSeries::default(),
            responses_4xx: MetricSeries::default(),
            responses_5xx: MetricSeries::default(),
            upstream_errors: MetricSeries::default(),
            in_flight: MetricSeries::default(),
            cpu_percent: MetricSeries::default(),
            rss_bytes: MetricSeries::default(),
            instances: MetricSeries::default(),
            releases: vec![],
            queue_depth: depth,
            queue_error: error.map(str::to_string),
        };
        let measured = MetricSeries { current: Some(20.0), total: None, recent: vec![None, Some(4.0), Some(20.0)] };
        report.processes.push(worker("celery", measured, None));
        report.processes.push(worker(
            "mailer",
            MetricSeries::default(),
            Some("Redis at redis://***@h:6379/1 does not answer"),
        ));
        report.processes.push(worker("beat", MetricSeries::default(), None));
        let text = table(&report);
        let celery = text.lines().find(|l| l.starts_with("celery") && l.contains("queue")).expect(&text);
        assert!(celery.contains("20 waiting") && celery.trim_end().ends_with('█'), "{text}");
        let mailer = text.lines().find(|l| l.starts_with("mailer") && l.contains("queue")).expect(&text);
        assert!(mailer.trim_end().ends_with("queue         -"), "{text}");
        assert!(text.contains("warning: the queue of mailer: Redis at redis://***@h:6379/1 does not answer"), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("beat") && l.contains("queue")), "no queue: {text}");
    }
}
