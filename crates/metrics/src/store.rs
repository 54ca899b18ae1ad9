//! The series store: every series at two resolutions, in rings of fixed
//! capacity, with a cap on the number of series.
//!
//! Shape: a map from [`SeriesKey`] to a series; a series is its kind's
//! running value (a counter's total, a gauge's last reading, a
//! histogram's running sum) plus a ring of 5 s points (720: an hour) and
//! a ring of 1 min points (1,440: a day).
//!
//! Invariants:
//! - a sample is folded, with the same merge, into the 5 s point and the
//!   1 min point of its time, so a 1 min point is always the merge of the
//!   5 s points of its minute: counters summed, gauges' sums, counts and
//!   maxima combined (average and peak), histograms merged bucket-wise;
//! - time in a series never goes back: a sample older than the series'
//!   newest is folded into the newest point (a wall clock stepped back
//!   loses no increment; it only lands a little late);
//! - at most [`Limits::max_series`] series, at most
//!   [`Limits::max_histogram_series`] of them histograms: a new series
//!   beyond a cap takes the place of the series whose last sample is the
//!   oldest, if that one is stale (no sample for [`Limits::stale_after`]:
//!   an instance, a release that is gone); otherwise the sample is
//!   dropped, counted ([`Store::dropped_samples`]) and logged once;
//! - so memory is bounded by the caps times the rings' capacities
//!   ([`Limits::max_heap_bytes`]), whatever is recorded;
//! - nothing reads a clock: every call takes the time it is about.
//!
//! The caller records every series at every step it samples, zeros
//! included, so a missing point means "not measured" (a daemon that was
//! down), never "nothing happened".

use crate::histogram::{HistPoint, Histogram, BUCKETS};
use crate::key::{Filter, Kind, Metric, SeriesKey};
use crate::ring::Ring;
use crate::time::{Resolution, Timestamp};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Bounds on what the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Series in all, histograms included.
    pub max_series: usize,
    /// Histogram series (each point of one is ~60 buckets).
    pub max_histogram_series: usize,
    /// A series with no sample for this long is not current: it is left
    /// out of the exposition and may give its place to a new series.
    pub stale_after: Duration,
}

/// Default [`Limits::max_series`].
pub const DEFAULT_MAX_SERIES: usize = 512;
/// Default [`Limits::max_histogram_series`].
pub const DEFAULT_MAX_HISTOGRAM_SERIES: usize = 32;
/// Default [`Limits::stale_after`].
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(60);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_series: DEFAULT_MAX_SERIES,
            max_histogram_series: DEFAULT_MAX_HISTOGRAM_SERIES,
            stale_after: DEFAULT_STALE_AFTER,
        }
    }
}

const POINTS_PER_SERIES: usize = Resolution::FiveSeconds.capacity() + Resolution::OneMinute.capacity();

impl Limits {
    /// The most heap [`Store::heap_bytes`] can count under these limits:
    /// every series full, the histogram cap filled with histograms and
    /// the rest with the largest scalar series.
    pub fn max_heap_bytes(&self) -> usize {
        let histograms = self.max_histogram_series.min(self.max_series);
        let scalars = self.max_series - histograms;
        scalars
            .saturating_mul(series_heap_bound(Kind::Gauge))
            .saturating_add(histograms.saturating_mul(series_heap_bound(Kind::Histogram)))
    }
}

/// The heap one full series of `kind` is counted at.
fn series_heap_bound(kind: Kind) -> usize {
    let points = match kind {
        Kind::Counter => POINTS_PER_SERIES * std::mem::size_of::<(u64, u64)>(),
        Kind::Gauge => POINTS_PER_SERIES * std::mem::size_of::<(u64, GaugePoint)>(),
        Kind::Histogram => {
            POINTS_PER_SERIES * (std::mem::size_of::<(u64, HistPoint)>() + HistPoint::HEAP_BYTES) + BUCKETS * 8
        }
    };
    points + ENTRY_OVERHEAD
}

/// What the map entry of one series is counted at: key and series inline,
/// the key's names (at most 63 bytes each), and as much again for the
/// B-tree's spare room.
const ENTRY_OVERHEAD: usize = 2 * (std::mem::size_of::<SeriesKey>() + std::mem::size_of::<Series>()) + 3 * 63;

/// One sample for [`Store::record`]; its kind must be the metric's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sample<'a> {
    /// A counter's increment since the previous sample.
    Count(u64),
    /// A gauge's reading.
    Gauge(f64),
    /// The latencies counted since the previous sample.
    Histogram(&'a Histogram),
}

impl Sample<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Sample::Count(_) => Kind::Counter,
            Sample::Gauge(_) => Kind::Gauge,
            Sample::Histogram(_) => Kind::Histogram,
        }
    }
}

/// Why a sample was not recorded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    /// A bug in the caller: e.g. a gauge reading for a counter.
    #[error("{key}: {metric} is a {expected} metric, not a {given}")]
    WrongKind { key: SeriesKey, metric: Metric, expected: Kind, given: Kind },
    /// A gauge reading that is NaN or infinite.
    #[error("{key}: the reading {value} is not a finite number")]
    NotFinite { key: SeriesKey, value: f64 },
    /// A new series beyond a cap, while every series held is current.
    #[error("{key}: not recorded, the store holds its limit of {limit} {what} and all are current")]
    TooManySeries { key: SeriesKey, limit: usize, what: SeriesClass },
}

/// Which cap a series counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesClass {
    All,
    Histograms,
}

impl fmt::Display for SeriesClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeriesClass::All => "series",
            SeriesClass::Histograms => "histogram series",
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A gauge's point: the readings' sum, count and maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GaugePoint {
    pub(crate) sum: f64,
    pub(crate) max: f64,
    pub(crate) count: u32,
}

impl GaugePoint {
    pub(crate) const EMPTY: GaugePoint = GaugePoint { sum: 0.0, max: f64::NEG_INFINITY, count: 0 };

    fn add(&mut self, v: f64) {
        self.sum += v;
        self.max = self.max.max(v);
        self.count = self.count.saturating_add(1);
    }
}

/// A series' rings and running value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Data {
    Counter { total: u64, fine: Ring<u64>, coarse: Ring<u64> },
    Gauge { last: f64, fine: Ring<GaugePoint>, coarse: Ring<GaugePoint> },
    Histogram { total: Box<Histogram>, fine: Ring<HistPoint>, coarse: Ring<HistPoint> },
}

impl Data {
    fn new(kind: Kind) -> Data {
        let fine = Resolution::FiveSeconds.capacity();
        let coarse = Resolution::OneMinute.capacity();
        match kind {
            Kind::Counter => Data::Counter { total: 0, fine: Ring::new(fine), coarse: Ring::new(coarse) },
            Kind::Gauge => Data::Gauge { last: 0.0, fine: Ring::new(fine), coarse: Ring::new(coarse) },
            Kind::Histogram => {
                Data::Histogram { total: Box::new(Histogram::new()), fine: Ring::new(fine), coarse: Ring::new(coarse) }
            }
        }
    }

    fn forget_before(&mut self, fine_slot: u64, coarse_slot: u64) {
        match self {
            Data::Counter { fine, coarse, .. } => {
                fine.forget_before(fine_slot);
                coarse.forget_before(coarse_slot);
            }
            Data::Gauge { fine, coarse, .. } => {
                fine.forget_before(fine_slot);
                coarse.forget_before(coarse_slot);
            }
            Data::Histogram { fine, coarse, .. } => {
                fine.forget_before(fine_slot);
                coarse.forget_before(coarse_slot);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Data::Counter { fine, coarse, .. } => fine.len() == 0 && coarse.len() == 0,
            Data::Gauge { fine, coarse, .. } => fine.len() == 0 && coarse.len() == 0,
            Data::Histogram { fine, coarse, .. } => fine.len() == 0 && coarse.len() == 0,
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Data::Counter { fine, coarse, .. } => (fine.allocated() + coarse.allocated()) * size_of::<(u64, u64)>(),
            Data::Gauge { fine, coarse, .. } => {
                (fine.allocated() + coarse.allocated()) * size_of::<(u64, GaugePoint)>()
            }
            Data::Histogram { fine, coarse, .. } => {
                (fine.allocated() + coarse.allocated()) * size_of::<(u64, HistPoint)>()
                    + (fine.len() + coarse.len()) * HistPoint::HEAP_BYTES
                    + BUCKETS * 8
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    /// The time of the newest sample (never goes back).
    pub(crate) last: Timestamp,
    pub(crate) data: Data,
}

/// The store. See the module documentation for its invariants.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    limits: Limits,
    pub(crate) series: BTreeMap<SeriesKey, Series>,
    histograms: usize,
    pub(crate) dropped: u64,
    pub(crate) evicted: u64,
    warned: bool,
}

/// A series' running value: what the exposition shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CurrentValue<'a> {
    /// The sum of every increment recorded.
    Counter(u64),
    /// The last reading.
    Gauge(f64),
    /// The merge of every histogram recorded.
    Histogram(&'a Histogram),
}

/// A series' running value and the time of its last sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Current<'a> {
    pub at: Timestamp,
    pub value: CurrentValue<'a>,
}

/// One point of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct PointView {
    /// When its step starts.
    pub start: Timestamp,
    pub value: PointValue,
}

/// What one point holds.
#[derive(Debug, Clone, PartialEq)]
pub enum PointValue {
    /// The sum of the increments in the step.
    Counter(u64),
    /// The readings in the step: their average, maximum and number.
    Gauge { avg: f64, max: f64, samples: u32 },
    /// The latencies counted in the step.
    Histogram(Histogram),
}

impl PointValue {
    /// The one number a sparkline shows for a point of `step`: a
    /// counter's rate per second, a gauge's average, a histogram's p95 in
    /// seconds (`None` if it counted nothing).
    pub fn headline(&self, step: Duration) -> Option<f64> {
        match self {
            PointValue::Counter(n) => Some(*n as f64 / step.as_secs_f64()),
            PointValue::Gauge { avg, .. } => Some(*avg),
            PointValue::Histogram(h) => h.quantile(0.95).map(|d| d.as_secs_f64()),
        }
    }
}

/// A series over a window of time.
#[derive(Debug, Clone, PartialEq)]
pub enum Summary {
    /// Increments in the window and their rate over its length.
    Counter { total: u64, per_second: f64 },
    /// The readings' average and maximum, and their number.
    Gauge { avg: f64, max: f64, samples: u64 },
    /// The latencies counted in the window (quantiles with
    /// [`Histogram::quantile`]) and their rate over its length.
    Histogram { histogram: Histogram, per_second: f64 },
}

impl Store {
    /// An empty store.
    pub fn new(limits: Limits) -> Store {
        Store { limits, series: BTreeMap::new(), histograms: 0, dropped: 0, evicted: 0, warned: false }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// How many series are held.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// How many of them are histograms.
    pub fn histogram_len(&self) -> usize {
        self.histograms
    }

    /// Samples dropped because a cap was full of current series.
    pub fn dropped_samples(&self) -> u64 {
        self.dropped
    }

    /// Series that gave their place to a new one (they were stale).
    pub fn evicted_series(&self) -> u64 {
        self.evicted
    }

    /// The heap the rings and entries take, counted as
    /// [`Limits::max_heap_bytes`] counts it (allocated ring entries, not
    /// allocator overhead).
    pub fn heap_bytes(&self) -> usize {
        self.series.values().map(|s| s.data.heap_bytes() + ENTRY_OVERHEAD).sum()
    }

    /// Record `sample` for `key` at `at`. See the module documentation.
    pub fn record(&mut self, key: &SeriesKey, at: Timestamp, sample: Sample<'_>) -> Result<(), RecordError> {
        let expected = key.metric().kind();
        if sample.kind() != expected {
            return Err(RecordError::WrongKind {
                key: key.clone(),
                metric: key.metric(),
                expected,
                given: sample.kind(),
            });
        }
        if let Sample::Gauge(value) = sample {
            if !value.is_finite() {
                return Err(RecordError::NotFinite { key: key.clone(), value });
            }
        }
        if !self.series.contains_key(key) {
            self.make_room(key, at)?;
            self.series.insert(key.clone(), Series { last: at, data: Data::new(expected) });
            if expected == Kind::Histogram {
                self.histograms += 1;
            }
        }
        let Some(series) = self.series.get_mut(key) else {
            return Ok(()); // just inserted
        };
        let at = at.max(series.last);
        series.last = at;
        let fine_slot = Resolution::FiveSeconds.slot(at);
        let coarse_slot = Resolution::OneMinute.slot(at);
        match (&mut series.data, sample) {
            (Data::Counter { total, fine, coarse }, Sample::Count(n)) => {
                *total = total.saturating_add(n);
                fine.fold(fine_slot, || 0, |p| *p = p.saturating_add(n));
                coarse.fold(coarse_slot, || 0, |p| *p = p.saturating_add(n));
            }
            (Data::Gauge { last, fine, coarse }, Sample::Gauge(v)) => {
                *last = v;
                fine.fold(fine_slot, || GaugePoint::EMPTY, |p| p.add(v));
                coarse.fold(coarse_slot, || GaugePoint::EMPTY, |p| p.add(v));
            }
            (Data::Histogram { total, fine, coarse }, Sample::Histogram(h)) => {
                total.merge(h);
                fine.fold(fine_slot, HistPoint::new, |p| p.add(h));
                coarse.fold(coarse_slot, HistPoint::new, |p| p.add(h));
            }
            // The kind was checked against the metric, and a series' data
            // is made from its metric's kind.
            _ => {}
        }
        Ok(())
    }

    /// Record a counter's increment.
    pub fn count(&mut self, key: &SeriesKey, at: Timestamp, n: u64) -> Result<(), RecordError> {
        self.record(key, at, Sample::Count(n))
    }

    /// Record a gauge's reading.
    pub fn gauge(&mut self, key: &SeriesKey, at: Timestamp, value: f64) -> Result<(), RecordError> {
        self.record(key, at, Sample::Gauge(value))
    }

    /// Record latencies.
    pub fn histogram(&mut self, key: &SeriesKey, at: Timestamp, h: &Histogram) -> Result<(), RecordError> {
        self.record(key, at, Sample::Histogram(h))
    }

    fn make_room(&mut self, key: &SeriesKey, at: Timestamp) -> Result<(), RecordError> {
        let histogram = key.metric().kind() == Kind::Histogram;
        let full = if histogram && self.histograms >= self.limits.max_histogram_series {
            Some(SeriesClass::Histograms)
        } else if self.series.len() >= self.limits.max_series {
            Some(SeriesClass::All)
        } else {
            None
        };
        let Some(class) = full else { return Ok(()) };
        let stalest = self
            .series
            .iter()
            .filter(|(k, _)| class == SeriesClass::All || k.metric().kind() == Kind::Histogram)
            .min_by_key(|(_, s)| s.last)
            .map(|(k, s)| (k.clone(), s.last));
        if let Some((victim, last)) = stalest {
            if last.plus(self.limits.stale_after) <= at {
                self.remove(&victim);
                self.evicted += 1;
                // A histogram may still be over its own cap if the victim
                // was a scalar series: try again.
                return self.make_room(key, at);
            }
        }
        self.dropped += 1;
        let limit = match class {
            SeriesClass::All => self.limits.max_series,
            SeriesClass::Histograms => self.limits.max_histogram_series,
        };
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                series = %key,
                limit,
                "metrics: the store holds its limit of {limit} {class}, all current; new series are not recorded \
                 (counted in nonstop_metrics_dropped_samples_total; logged once until there is room again)"
            );
        }
        Err(RecordError::TooManySeries { key: key.clone(), limit, what: class })
    }

    fn remove(&mut self, key: &SeriesKey) {
        if self.series.remove(key).is_some() && key.metric().kind() == Kind::Histogram {
            self.histograms -= 1;
        }
    }

    /// Drop points older than their resolution's retention at `now`, and
    /// series left without any point. Returns how many series went.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        let fine_from = window_start(Resolution::FiveSeconds, now);
        let coarse_from = window_start(Resolution::OneMinute, now);
        let before = self.series.len();
        for s in self.series.values_mut() {
            s.data.forget_before(fine_from, coarse_from);
        }
        self.series.retain(|_, s| !s.data.is_empty());
        self.histograms = self.series.keys().filter(|k| k.metric().kind() == Kind::Histogram).count();
        if self.series.len() < self.limits.max_series && self.histograms < self.limits.max_histogram_series {
            self.warned = false;
        }
        before - self.series.len()
    }

    /// Keep only the series `keep` says yes to (an environment destroyed,
    /// an app gone).
    pub fn retain(&mut self, mut keep: impl FnMut(&SeriesKey) -> bool) {
        self.series.retain(|k, _| keep(k));
        self.histograms = self.series.keys().filter(|k| k.metric().kind() == Kind::Histogram).count();
    }

    /// Every series' key, in order (app, environment, process, release,
    /// slot, metric).
    pub fn keys(&self) -> impl Iterator<Item = &SeriesKey> {
        self.series.keys()
    }

    /// The keys `filter` matches.
    pub fn select<'a>(&'a self, filter: &'a Filter) -> impl Iterator<Item = &'a SeriesKey> {
        self.series.keys().filter(move |k| filter.matches(k))
    }

    /// Whether `key` had a sample within `stale_after` before `now`.
    pub fn is_current(&self, key: &SeriesKey, now: Timestamp) -> bool {
        self.series.get(key).is_some_and(|s| s.last.plus(self.limits.stale_after) > now)
    }

    /// `key`'s running value.
    pub fn current(&self, key: &SeriesKey) -> Option<Current<'_>> {
        let s = self.series.get(key)?;
        let value = match &s.data {
            Data::Counter { total, .. } => CurrentValue::Counter(*total),
            Data::Gauge { last, .. } => CurrentValue::Gauge(*last),
            Data::Histogram { total, .. } => CurrentValue::Histogram(total),
        };
        Some(Current { at: s.last, value })
    }

    /// `key`'s points at `resolution` whose steps start in `from..to`,
    /// oldest first (steps without a sample are absent).
    pub fn points(&self, key: &SeriesKey, resolution: Resolution, from: Timestamp, to: Timestamp) -> Vec<PointView> {
        let Some(s) = self.series.get(key) else { return Vec::new() };
        if to <= from {
            return Vec::new();
        }
        let (lo, hi) = slot_range(resolution, from, to);
        let start = |slot: u64| resolution.start(slot);
        match (&s.data, resolution) {
            (Data::Counter { fine, coarse, .. }, r) => pick(r, fine, coarse)
                .range(lo, hi)
                .map(|(slot, n)| PointView { start: start(*slot), value: PointValue::Counter(*n) })
                .collect(),
            (Data::Gauge { fine, coarse, .. }, r) => pick(r, fine, coarse)
                .range(lo, hi)
                .map(|(slot, p)| PointView { start: start(*slot), value: gauge_value(p) })
                .collect(),
            (Data::Histogram { fine, coarse, .. }, r) => pick(r, fine, coarse)
                .range(lo, hi)
                .map(|(slot, p)| PointView { start: start(*slot), value: PointValue::Histogram(p.to_histogram()) })
                .collect(),
        }
    }

    /// `key` over the steps of `resolution` that start in `from..to`
    /// (rates over `to - from`). `None` if the series is unknown or has
    /// no point there.
    pub fn window(&self, key: &SeriesKey, resolution: Resolution, from: Timestamp, to: Timestamp) -> Option<Summary> {
        let points = self.points(key, resolution, from, to);
        if points.is_empty() {
            return None;
        }
        let secs = to.since(from).as_secs_f64();
        let per_second = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        Some(match key.metric().kind() {
            Kind::Counter => {
                let total = points.iter().fold(0u64, |sum, p| match p.value {
                    PointValue::Counter(n) => sum.saturating_add(n),
                    _ => sum,
                });
                Summary::Counter { total, per_second: per_second(total) }
            }
            Kind::Gauge => {
                let (mut sum, mut max, mut samples) = (0.0, f64::NEG_INFINITY, 0u64);
                for p in &points {
                    if let PointValue::Gauge { avg, max: m, samples: n } = p.value {
                        sum += avg * f64::from(n);
                        max = max.max(m);
                        samples += u64::from(n);
                    }
                }
                let avg = if samples > 0 { sum / samples as f64 } else { 0.0 };
                Summary::Gauge { avg, max, samples }
            }
            Kind::Histogram => {
                let mut histogram = Histogram::new();
                for p in &points {
                    if let PointValue::Histogram(h) = &p.value {
                        histogram.merge(h);
                    }
                }
                let per_second = per_second(histogram.count());
                Summary::Histogram { histogram, per_second }
            }
        })
    }

    /// The last `n` steps of `resolution` up to and including the one
    /// `end` falls in, each point's [`PointValue::headline`] (`None`
    /// where there is no point): what a sparkline draws.
    pub fn recent(&self, key: &SeriesKey, resolution: Resolution, end: Timestamp, n: usize) -> Vec<Option<f64>> {
        let last = resolution.slot(end);
        let first = last.saturating_sub(n.saturating_sub(1) as u64);
        let mut out = vec![None; usize::try_from(last - first + 1).unwrap_or(0).min(n)];
        let from = resolution.start(first);
        let to = resolution.start(last.saturating_add(1));
        for p in self.points(key, resolution, from, to) {
            let i = (resolution.slot(p.start) - first) as usize;
            if let Some(slot) = out.get_mut(i) {
                *slot = p.value.headline(resolution.step());
            }
        }
        out
    }

    /// Rebuild from decoded parts (the persisted file): over the caps,
    /// the series with the oldest last samples are left out.
    pub(crate) fn from_parts(limits: Limits, series: Vec<(SeriesKey, Series)>, dropped: u64, evicted: u64) -> Store {
        let mut store = Store::new(limits);
        store.dropped = dropped;
        store.evicted = evicted;
        let mut series = series;
        series.sort_by_key(|(_, s)| std::cmp::Reverse(s.last));
        for (key, s) in series {
            let histogram = key.metric().kind() == Kind::Histogram;
            if store.series.len() >= limits.max_series || (histogram && store.histograms >= limits.max_histogram_series)
            {
                store.evicted += 1;
                continue;
            }
            if store.series.insert(key, s).is_none() && histogram {
                store.histograms += 1;
            }
        }
        store
    }
}

fn gauge_value(p: &GaugePoint) -> PointValue {
    let avg = if p.count > 0 { p.sum / f64::from(p.count) } else { 0.0 };
    PointValue::Gauge { avg, max: p.max, samples: p.count }
}

fn pick<'a, P>(r: Resolution, fine: &'a Ring<P>, coarse: &'a Ring<P>) -> &'a Ring<P> {
    match r {
        Resolution::FiveSeconds => fine,
        Resolution::OneMinute => coarse,
    }
}

/// The steps (inclusive) whose start is in `from..to`.
fn slot_range(r: Resolution, from: Timestamp, to: Timestamp) -> (u64, u64) {
    let step = r.step_ms();
    let lo = from.as_millis().div_ceil(step);
    let hi = (to.as_millis() - 1) / step;
    (lo, hi)
}

/// The oldest step of `r` kept at `now`.
fn window_start(r: Resolution, now: Timestamp) -> u64 {
    r.slot(now).saturating_sub(r.capacity() as u64 - 1)
}

#[cfg(test)]
mod tests;
