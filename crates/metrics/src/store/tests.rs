use super::*;
use crate::key::StatusClass;
use nonstop_core::{AppName, EnvironmentId, ProcessName, ReleaseId};
use proptest::prelude::*;

fn app() -> AppName {
    AppName::new("blog").unwrap()
}
fn env() -> EnvironmentId {
    EnvironmentId::new("production").unwrap()
}
fn web() -> ProcessName {
    ProcessName::new("web").unwrap()
}
fn requests() -> SeriesKey {
    SeriesKey::process(app(), env(), web(), Metric::Requests).with_release(ReleaseId(3))
}
fn cpu(slot: u32) -> SeriesKey {
    SeriesKey::instance(app(), env(), web(), slot, Metric::CpuPercent)
}
fn latency() -> SeriesKey {
    SeriesKey::process(app(), env(), web(), Metric::Latency)
}
/// 2026-01-01T00:00:00Z, a whole minute.
const T0: u64 = 1_767_225_600_000;
fn at(secs: u64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000)
}

#[test]
fn a_known_load_reads_back() {
    // 10 requests every 5 s for two minutes: 2 requests/s.
    let mut store = Store::new(Limits::default());
    for i in 0..24 {
        store.count(&requests(), at(i * 5), 10).unwrap();
        store.gauge(&cpu(1), at(i * 5), if i % 2 == 0 { 40.0 } else { 60.0 }).unwrap();
    }
    let Some(Summary::Counter { total, per_second }) =
        store.window(&requests(), Resolution::FiveSeconds, at(0), at(120))
    else {
        panic!("no counter summary")
    };
    assert_eq!(total, 240);
    assert!((per_second - 2.0).abs() < 1e-9, "{per_second}");
    // The same from the minute points.
    assert_eq!(
        store.window(&requests(), Resolution::OneMinute, at(0), at(120)),
        Some(Summary::Counter { total: 240, per_second })
    );
    let Some(Summary::Gauge { avg, max, samples }) = store.window(&cpu(1), Resolution::OneMinute, at(0), at(120))
    else {
        panic!("no gauge summary")
    };
    assert_eq!((avg, max, samples), (50.0, 60.0, 24));
    assert_eq!(store.current(&requests()).map(|c| c.value), Some(CurrentValue::Counter(240)));
    assert_eq!(store.current(&cpu(1)).map(|c| c.value), Some(CurrentValue::Gauge(60.0)));
    // 12 points of 5 s in the first minute, one of 1 min.
    assert_eq!(store.points(&requests(), Resolution::FiveSeconds, at(0), at(60)).len(), 12);
    assert_eq!(
        store.points(&requests(), Resolution::OneMinute, at(0), at(60)),
        vec![PointView { start: at(0), value: PointValue::Counter(120) }]
    );
}

#[test]
fn latency_quantiles_over_a_window() {
    let mut store = Store::new(Limits::default());
    // 90 fast requests (10 ms) and 10 slow ones (500 ms), spread over a minute.
    for i in 0..10u64 {
        let mut h = Histogram::new();
        for _ in 0..9 {
            h.observe(Duration::from_millis(10));
        }
        h.observe(Duration::from_millis(500));
        store.histogram(&latency(), at(i * 6), &h).unwrap();
    }
    let Some(Summary::Histogram { histogram, per_second }) =
        store.window(&latency(), Resolution::FiveSeconds, at(0), at(60))
    else {
        panic!("no histogram summary")
    };
    assert_eq!(histogram.count(), 100);
    assert!((per_second - 100.0 / 60.0).abs() < 1e-9);
    let p50 = histogram.quantile(0.5).unwrap();
    let p95 = histogram.quantile(0.95).unwrap();
    assert!(p50 >= Duration::from_millis(10) && p50 < Duration::from_micros(12_500), "{p50:?}");
    assert!(p95 >= Duration::from_millis(500) && p95 < Duration::from_millis(625), "{p95:?}");
    assert_eq!(histogram.sum(), Duration::from_millis(90 * 10 + 10 * 500));
}

#[test]
fn samples_of_the_wrong_kind_or_not_finite_are_refused() {
    let mut store = Store::new(Limits::default());
    let err = store.gauge(&requests(), at(0), 1.0).unwrap_err();
    assert!(matches!(err, RecordError::WrongKind { expected: Kind::Counter, given: Kind::Gauge, .. }), "{err}");
    assert!(err.to_string().contains("requests is a counter metric, not a gauge"), "{err}");
    let err = store.gauge(&cpu(1), at(0), f64::NAN).unwrap_err();
    assert!(matches!(err, RecordError::NotFinite { .. }), "{err}");
    assert!(store.is_empty());
}

#[test]
fn a_clock_stepped_back_loses_no_increment() {
    let mut store = Store::new(Limits::default());
    store.count(&requests(), at(100), 5).unwrap();
    store.count(&requests(), at(30), 7).unwrap();
    let points = store.points(&requests(), Resolution::FiveSeconds, at(0), at(200));
    assert_eq!(points, vec![PointView { start: at(100), value: PointValue::Counter(12) }]);
    assert_eq!(store.current(&requests()).unwrap().at, at(100));
}

#[test]
fn recent_values_for_a_sparkline() {
    let mut store = Store::new(Limits::default());
    store.count(&requests(), at(0), 5).unwrap();
    store.count(&requests(), at(10), 10).unwrap();
    store.count(&requests(), at(15), 0).unwrap();
    let v = store.recent(&requests(), Resolution::FiveSeconds, at(19), 5);
    assert_eq!(v, vec![None, Some(1.0), None, Some(2.0), Some(0.0)]);
    assert!(store.recent(&requests(), Resolution::FiveSeconds, at(19), 0).is_empty());
    assert_eq!(store.recent(&cpu(9), Resolution::FiveSeconds, at(19), 2), vec![None, None]);
}

#[test]
fn gone_instances_expire() {
    let mut store = Store::new(Limits::default());
    store.gauge(&cpu(1), at(0), 10.0).unwrap();
    store.gauge(&cpu(2), at(0), 10.0).unwrap();
    // Slot 2 was scaled away; slot 1 goes on.
    for i in 1..=800 {
        store.gauge(&cpu(1), at(i * 5), 10.0).unwrap();
    }
    let now = at(800 * 5);
    assert!(store.is_current(&cpu(1), now));
    assert!(!store.is_current(&cpu(2), now));
    assert_eq!(store.expire(now), 0, "slot 2 still has its minute points");
    assert_eq!(store.points(&cpu(1), Resolution::FiveSeconds, at(0), now.plus(Duration::from_secs(5))).len(), 720);
    assert!(store.points(&cpu(2), Resolution::FiveSeconds, at(0), now).is_empty(), "older than an hour");
    assert_eq!(store.points(&cpu(2), Resolution::OneMinute, at(0), now).len(), 1);
    // A day later, slot 2 has nothing left and goes.
    assert_eq!(store.expire(at(86_400 + 60)), 1);
    assert_eq!(store.keys().collect::<Vec<_>>(), vec![&cpu(1)]);
}

#[test]
fn a_full_store_evicts_a_stale_series_or_drops_and_counts() {
    let limits = Limits { max_series: 2, max_histogram_series: 1, stale_after: Duration::from_secs(60) };
    let mut store = Store::new(limits);
    store.gauge(&cpu(1), at(0), 1.0).unwrap();
    store.gauge(&cpu(2), at(30), 1.0).unwrap();
    // Both current: the third is dropped and counted.
    let err = store.gauge(&cpu(3), at(40), 1.0).unwrap_err();
    assert!(matches!(err, RecordError::TooManySeries { limit: 2, what: SeriesClass::All, .. }), "{err}");
    assert!(err.to_string().contains("limit of 2 series"), "{err}");
    store.gauge(&cpu(3), at(41), 1.0).unwrap_err();
    assert_eq!(store.dropped_samples(), 2);
    assert_eq!(store.len(), 2);
    // Slot 1 goes stale: the new series takes its place.
    store.gauge(&cpu(3), at(61), 1.0).unwrap();
    assert_eq!(store.evicted_series(), 1);
    assert!(store.current(&cpu(1)).is_none());
    // The histogram cap is separate and evicts a histogram.
    let other = SeriesKey::process(app(), env(), ProcessName::new("api").unwrap(), Metric::Latency);
    store.histogram(&latency(), at(62), &Histogram::new()).unwrap_err();
    store.gauge(&cpu(2), at(200), 1.0).unwrap();
    store.histogram(&latency(), at(200), &Histogram::new()).unwrap(); // cpu(3) was stale
    assert_eq!(store.histogram_len(), 1);
    let err = store.histogram(&other, at(201), &Histogram::new()).unwrap_err();
    assert!(matches!(err, RecordError::TooManySeries { limit: 1, what: SeriesClass::Histograms, .. }), "{err}");
}

#[test]
fn retain_forgets_an_environment() {
    let mut store = Store::new(Limits::default());
    store.histogram(&latency(), at(0), &Histogram::new()).unwrap();
    let staging = SeriesKey::environment(app(), EnvironmentId::new("staging").unwrap(), Metric::StaticHits);
    store.count(&staging, at(0), 1).unwrap();
    store.retain(|k| k.environment_id().as_str() != "production");
    assert_eq!(store.keys().collect::<Vec<_>>(), vec![&staging]);
    assert_eq!(store.histogram_len(), 0);
}

// --- properties --------------------------------------------------------

fn any_key() -> impl Strategy<Value = SeriesKey> {
    (0u32..6, 0usize..Metric::ALL.len(), 0u64..3).prop_map(|(slot, m, release)| {
        let metric = Metric::ALL[m];
        let key = match metric.kind() {
            Kind::Gauge => SeriesKey::instance(app(), env(), web(), slot, metric),
            _ => SeriesKey::process(app(), env(), web(), metric),
        };
        key.with_release(ReleaseId(release))
    })
}

#[derive(Debug, Clone)]
enum Op {
    Record { key: SeriesKey, advance_ms: u64, value: u64, latency_us: Vec<u64> },
    Expire { advance_ms: u64 },
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (any_key(), 0u64..20_000, 0u64..1_000, proptest::collection::vec(1u64..70_000_000, 0..5))
            .prop_map(|(key, advance_ms, value, latency_us)| Op::Record { key, advance_ms, value, latency_us }),
        1 => (0u64..4_000_000).prop_map(|advance_ms| Op::Expire { advance_ms }),
    ]
}

fn sample_for(key: &SeriesKey, value: u64, latency_us: &[u64]) -> (Option<u64>, Option<f64>, Option<Histogram>) {
    match key.metric().kind() {
        Kind::Counter => (Some(value), None, None),
        Kind::Gauge => (None, Some(value as f64 / 7.0), None),
        Kind::Histogram => {
            let mut h = Histogram::new();
            for &us in latency_us {
                h.observe(Duration::from_micros(us));
            }
            (None, None, Some(h))
        }
    }
}

fn record(store: &mut Store, key: &SeriesKey, now: Timestamp, value: u64, latency_us: &[u64]) {
    let result = match sample_for(key, value, latency_us) {
        (Some(n), _, _) => store.count(key, now, n),
        (_, Some(v), _) => store.gauge(key, now, v),
        (_, _, Some(h)) => store.histogram(key, now, &h),
        _ => unreachable!(),
    };
    match result {
        Ok(()) | Err(RecordError::TooManySeries { .. }) => {}
        Err(e) => panic!("{e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever is recorded, the caps hold, every ring stays within its
    /// capacity, and the heap stays under the limits' bound.
    #[test]
    fn memory_is_bounded(
        max_series in 1usize..12,
        max_histogram_series in 0usize..4,
        ops in proptest::collection::vec(any_op(), 1..400),
    ) {
        let limits = Limits { max_series, max_histogram_series, stale_after: Duration::from_secs(30) };
        let mut store = Store::new(limits);
        let mut now = Timestamp::from_millis(T0);
        for op in ops {
            match op {
                Op::Record { key, advance_ms, value, latency_us } => {
                    now = now.plus(Duration::from_millis(advance_ms));
                    record(&mut store, &key, now, value, &latency_us);
                }
                Op::Expire { advance_ms } => {
                    now = now.plus(Duration::from_millis(advance_ms));
                    store.expire(now);
                }
            }
            prop_assert!(store.len() <= max_series);
            prop_assert!(store.histogram_len() <= max_histogram_series);
            prop_assert!(store.heap_bytes() <= limits.max_heap_bytes(),
                "{} > {}", store.heap_bytes(), limits.max_heap_bytes());
            for s in store.series.values() {
                let (f, c) = match &s.data {
                    Data::Counter { fine, coarse, .. } => (fine.len(), coarse.len()),
                    Data::Gauge { fine, coarse, .. } => (fine.len(), coarse.len()),
                    Data::Histogram { fine, coarse, .. } => (fine.len(), coarse.len()),
                };
                prop_assert!(f <= Resolution::FiveSeconds.capacity());
                prop_assert!(c <= Resolution::OneMinute.capacity());
            }
        }
    }

    /// Every 1 min point is the merge of the 5 s points of its minute
    /// (while both are kept): counters summed, gauges' averages weighted
    /// and maxima combined, histograms merged bucket-wise.
    #[test]
    fn minute_points_are_the_merge_of_their_five_second_points(
        samples in proptest::collection::vec(
            (0u64..20_000, 0u64..10_000, proptest::collection::vec(1u64..70_000_000, 0..4)), 1..300),
        metric in prop_oneof![Just(Metric::Requests), Just(Metric::CpuPercent), Just(Metric::Latency)],
    ) {
        let key = SeriesKey::instance(app(), env(), web(), 1, metric);
        let mut store = Store::new(Limits::default());
        let mut now = Timestamp::from_millis(T0);
        let mut recorded_total = 0u64;
        for (advance, value, latency_us) in &samples {
            now = now.plus(Duration::from_millis(*advance));
            record(&mut store, &key, now, *value, latency_us);
            recorded_total += value;
        }
        let from = now.minus(Resolution::FiveSeconds.retention()).plus(Resolution::OneMinute.step());
        let minutes = store.points(&key, Resolution::OneMinute, from, now.plus(Duration::from_secs(60)));
        for minute in minutes {
            let end = minute.start.plus(Resolution::OneMinute.step());
            let fine = store.points(&key, Resolution::FiveSeconds, minute.start, end);
            prop_assert!(fine.len() <= 12);
            match &minute.value {
                PointValue::Counter(n) => {
                    let sum: u64 = fine.iter().map(|p| match p.value { PointValue::Counter(n) => n, _ => 0 }).sum();
                    prop_assert_eq!(*n, sum);
                }
                PointValue::Gauge { avg, max, samples } => {
                    let mut s = 0.0; let mut m = f64::NEG_INFINITY; let mut c = 0u32;
                    for p in &fine {
                        if let PointValue::Gauge { avg, max, samples } = p.value {
                            s += avg * f64::from(samples); m = m.max(max); c += samples;
                        }
                    }
                    prop_assert_eq!(*samples, c);
                    prop_assert_eq!(*max, m);
                    prop_assert!((avg - s / f64::from(c)).abs() <= 1e-9 * avg.abs().max(1.0));
                }
                PointValue::Histogram(h) => {
                    let mut merged = Histogram::new();
                    for p in &fine {
                        if let PointValue::Histogram(f) = &p.value { merged.merge(f); }
                    }
                    prop_assert_eq!(h, &merged);
                }
            }
        }
        // A counter's running total is every increment recorded.
        if metric == Metric::Requests {
            prop_assert_eq!(store.current(&key).unwrap().value, CurrentValue::Counter(recorded_total));
        }
    }
}

#[test]
fn response_classes_are_counters() {
    let mut store = Store::new(Limits::default());
    for class in StatusClass::ALL {
        let key = requests().with_metric(Metric::Responses(class));
        store.count(&key, at(0), 1).unwrap();
    }
    assert_eq!(store.len(), 5);
}
