//! The exposition parsed back by a real Prometheus text parser
//! (`openmetrics-parser`: a grammar of the 0.0.4 text format, with label
//! unescaping and histogram checks).

use super::*;
use crate::key::StatusClass;
use crate::store::Limits;
use nonstop_core::{AppName, EnvironmentId, ProcessName, ReleaseId};
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricFamily, PrometheusType, PrometheusValue};
use std::time::Duration;

const T0: u64 = 1_767_225_600_000;
fn at(secs: u64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000)
}
fn app() -> AppName {
    AppName::new("blog").unwrap()
}
fn env() -> EnvironmentId {
    EnvironmentId::new("production").unwrap()
}
fn web() -> ProcessName {
    ProcessName::new("web").unwrap()
}
fn web_v4(metric: Metric) -> SeriesKey {
    SeriesKey::process(app(), env(), web(), metric).with_release(ReleaseId(4))
}

type Family = MetricFamily<PrometheusType, PrometheusValue>;

/// The sample of `family` whose labels include all of `want`.
fn find<'a>(family: &'a Family, want: &[(&str, &str)]) -> &'a PrometheusValue {
    let found: Vec<_> = family
        .iter_samples()
        .filter(|s| {
            let l = s.get_labelset().unwrap();
            want.iter().all(|(k, v)| l.get_label_value(k) == Some(*v))
        })
        .collect();
    assert_eq!(found.len(), 1, "{} samples of {} match {want:?}", found.len(), family.family_name);
    &found[0].value
}

fn gauge(v: &PrometheusValue) -> f64 {
    match v {
        PrometheusValue::Gauge(n) => n.as_f64(),
        other => panic!("not a gauge: {other:?}"),
    }
}

fn counter(v: &PrometheusValue) -> f64 {
    match v {
        PrometheusValue::Counter(c) => c.value.as_f64(),
        other => panic!("not a counter: {other:?}"),
    }
}

/// A minute of a known load: 4 requests/s on web v4 (a 5xx every 5 s),
/// two instances at 50% and 25% of a CPU, 120 MB and 80 MB, a static
/// hit per second, 7 jobs queued for the worker.
fn known_load() -> Store {
    let mut store = Store::new(Limits::default());
    let worker = ProcessName::new("worker").unwrap();
    for i in 0..12u64 {
        let t = at(i * 5);
        store.count(&web_v4(Metric::Requests), t, 20).unwrap();
        store.count(&web_v4(Metric::Responses(StatusClass::Success)), t, 19).unwrap();
        store.count(&web_v4(Metric::Responses(StatusClass::ServerError)), t, 1).unwrap();
        store.count(&web_v4(Metric::UpstreamErrors), t, 0).unwrap();
        store.gauge(&web_v4(Metric::InFlight), t, 3.0).unwrap();
        let mut h = Histogram::new();
        for k in 0..20u64 {
            // 18 at 8 ms, 2 at 300 ms.
            h.observe(Duration::from_millis(if k < 18 { 8 } else { 300 }));
        }
        store.histogram(&web_v4(Metric::Latency), t, &h).unwrap();
        let cpu1 = SeriesKey::instance(app(), env(), web(), 1, Metric::CpuPercent).with_release(ReleaseId(4));
        let cpu2 = SeriesKey::instance(app(), env(), web(), 2, Metric::CpuPercent);
        store.gauge(&cpu1, t, 50.0).unwrap();
        store.gauge(&cpu2, t, 25.0).unwrap();
        store.gauge(&cpu1.clone().with_metric(Metric::RssBytes), t, 120e6).unwrap();
        store.gauge(&cpu2.clone().with_metric(Metric::RssBytes), t, 80e6).unwrap();
        store.count(&SeriesKey::environment(app(), env(), Metric::StaticHits), t, 5).unwrap();
        store.gauge(&SeriesKey::process(app(), env(), worker.clone(), Metric::QueueDepth), t, 7.0).unwrap();
        store.gauge(&SeriesKey::process(app(), env(), web(), Metric::Instances), t, 2.0).unwrap();
    }
    store
}

#[test]
fn the_exposition_parses_and_round_trips_values_and_types() {
    let store = known_load();
    let text = render(&store, at(56));
    let parsed = parse_prometheus(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    let fam = |name: &str| parsed.families.get(name).unwrap_or_else(|| panic!("no {name} in\n{text}"));

    let requests = fam("nonstop_http_requests_total");
    assert_eq!(requests.family_type, PrometheusType::Counter);
    assert_eq!(
        counter(find(
            requests,
            &[("app", "blog"), ("environment", "production"), ("process", "web"), ("release", "v4")]
        )),
        240.0
    );

    let responses = fam("nonstop_http_responses_total");
    assert_eq!(responses.family_type, PrometheusType::Counter);
    assert_eq!(counter(find(responses, &[("code", "2xx")])), 228.0);
    assert_eq!(counter(find(responses, &[("code", "5xx")])), 12.0);
    assert_eq!(counter(find(fam("nonstop_upstream_errors_total"), &[])), 0.0);
    assert_eq!(counter(find(fam("nonstop_static_hits_total"), &[("app", "blog")])), 60.0);

    let cpu = fam("nonstop_instance_cpu_usage_ratio");
    assert_eq!(cpu.family_type, PrometheusType::Gauge);
    assert_eq!(gauge(find(cpu, &[("slot", "1"), ("release", "v4")])), 0.5);
    // No release for slot 2: the empty value, i.e. absent.
    assert_eq!(gauge(find(cpu, &[("slot", "2"), ("release", "")])), 0.25);
    assert_eq!(gauge(find(fam("nonstop_instance_resident_memory_bytes"), &[("slot", "1")])), 120e6);
    assert_eq!(gauge(find(fam("nonstop_http_requests_in_flight"), &[])), 3.0);
    assert_eq!(gauge(find(fam("nonstop_queue_depth"), &[("process", "worker")])), 7.0);
    assert_eq!(gauge(find(fam("nonstop_instances"), &[("process", "web")])), 2.0);
    assert_eq!(gauge(find(fam("nonstop_metrics_series"), &[])), store.len() as f64);
    assert_eq!(counter(find(fam("nonstop_metrics_dropped_samples_total"), &[])), 0.0);

    let latency = fam("nonstop_http_request_duration_seconds");
    assert_eq!(latency.family_type, PrometheusType::Histogram);
    let PrometheusValue::Histogram(h) = find(latency, &[("process", "web")]) else { panic!("not a histogram") };
    assert_eq!(h.count, Some(240));
    let sum = h.sum.as_ref().unwrap().as_f64();
    assert!((sum - (216.0 * 0.008 + 24.0 * 0.3)).abs() < 1e-6, "{sum}");
    // Cumulative, exact at every exposed bound, ending with +Inf = count.
    let buckets: Vec<(f64, f64)> = h.buckets.iter().map(|b| (b.upper_bound, b.count.as_f64())).collect();
    assert_eq!(buckets.len(), 22);
    assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 240.0));
    for (le, count) in &buckets {
        let expected = if *le < 0.008 {
            0.0
        } else if *le < 0.3 {
            216.0
        } else {
            240.0
        };
        assert_eq!(*count, expected, "le={le}");
    }
    assert_eq!(buckets[0].0, 0.0001);
    assert!((buckets[20].0 - 66.422437).abs() < 1e-9, "{buckets:?}");
}

#[test]
fn stale_series_leave_the_exposition() {
    let mut store = known_load();
    let cpu3 = SeriesKey::instance(app(), env(), web(), 3, Metric::CpuPercent);
    store.gauge(&cpu3, at(500), 10.0).unwrap();
    // At 500 s only slot 3 is current: the rest stopped at 55 s.
    let text = render(&store, at(500));
    let parsed = parse_prometheus(&text).unwrap();
    let cpu = &parsed.families["nonstop_instance_cpu_usage_ratio"];
    assert_eq!(cpu.iter_samples().count(), 1);
    assert_eq!(gauge(find(cpu, &[("slot", "3")])), 0.1);
    assert!(!parsed.families.contains_key("nonstop_http_requests_total"), "{text}");
    // Its labels are only those the family's series have.
    assert_eq!(cpu.get_label_names(), ["app", "environment", "process", "slot"]);
}

#[test]
fn an_empty_store_still_says_so() {
    let text = render(&Store::new(Limits::default()), at(0));
    let parsed = parse_prometheus(&text).unwrap();
    assert_eq!(parsed.families.len(), 2, "{text}");
    assert_eq!(gauge(find(&parsed.families["nonstop_metrics_series"], &[])), 0.0);
}

#[test]
fn text_format_details() {
    let text = render(&known_load(), at(56));
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        assert!(
            line.starts_with("# HELP nonstop_") || line.starts_with("# TYPE nonstop_") || line.starts_with("nonstop_"),
            "{line}"
        );
    }
    assert!(text.contains("# TYPE nonstop_http_request_duration_seconds histogram\n"));
    assert!(text.contains("le=\"+Inf\"} 240\n"), "{text}");
    // Every counter family ends in _total; every name is nonstop_.
    for line in text.lines().filter(|l| l.starts_with("# TYPE") && l.ends_with(" counter")) {
        assert!(line.split(' ').nth(2).unwrap().ends_with("_total"), "{line}");
    }
    assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(float(f64::INFINITY), "+Inf");
    assert_eq!(float(f64::NEG_INFINITY), "-Inf");
    assert_eq!(float(f64::NAN), "NaN");
    assert_eq!(float(1e-7), "0.0000001");
}

#[test]
fn label_values_are_escaped_as_the_parser_reads_them() {
    for value in ["plain", "a \"quoted\" word", "back\\slash", "two\nlines", "end\\", "\\\"\n\\n", "ünïcödé, {x=\"y\"}"]
    {
        let mut text = String::new();
        header(&mut text, "nonstop_test", "A help with a \\ backslash\nand a newline.", Kind::Gauge);
        sample(&mut text, "nonstop_test", &[("app", value.to_string())], "1");
        let parsed = parse_prometheus(&text).unwrap_or_else(|e| panic!("{value:?}: {e:?}\n{text}"));
        let family = &parsed.families["nonstop_test"];
        let s = family.iter_samples().next().unwrap();
        assert_eq!(s.get_labelset().unwrap().get_label_value("app"), Some(value), "{text}");
        assert_eq!(family.help, "A help with a \\ backslash\nand a newline.");
    }
}
