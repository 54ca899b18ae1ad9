//! The store's current values as Prometheus text (exposition format
//! 0.0.4), for the daemon's `/metrics`.
//!
//! Conventions: every name starts `nonstop_`; base units (seconds, bytes;
//! CPU as a ratio of one CPU); counters end `_total`; the latency
//! histogram is `_bucket{le=...}` (cumulative, ending with `+Inf`),
//! `_sum` (seconds) and `_count`. Labels are `app`, `environment`,
//! `process`, `release` (`v7`), `slot` (an instance's place in its
//! process type: `2` for `web.2`) and, on responses, `code` (`2xx`): all
//! bounded by what the daemon runs (the store caps them too). Not
//! `instance`: Prometheus gives that label to the scrape target (this
//! daemon) and would rename ours.
//!
//! Only current series are shown (a sample within
//! [`Limits::stale_after`](crate::store::Limits::stale_after)), so an
//! instance that is gone leaves the exposition instead of repeating its
//! last value. Within a family every sample carries the same label names
//! (an absent label is the empty value, which Prometheus reads as
//! absent). Counters are the totals the store keeps, which survive a
//! daemon restart with the store's file.
//!
//! The latency histogram shows every third bound of the store's buckets
//! (21 of them, ×1.95 apart, 100 µs to 66 s) so that each `le` is exact
//! (a sum of whole buckets) while a series costs 24 lines, not 64.

use crate::histogram::{Histogram, BUCKETS};
use crate::key::{Kind, Metric, SeriesKey};
use crate::store::{CurrentValue, Store};
use crate::time::Timestamp;
use std::fmt::Write;

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every `EXPOSED_STEP`th bucket bound is exposed as an `le`.
const EXPOSED_STEP: usize = 3;

/// A family of the exposition: one metric, or all response classes.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    /// Multiplies a gauge's stored value (CPU percent → ratio).
    scale: f64,
}

fn family(metric: Metric) -> Family {
    let (name, help, scale) = match metric {
        Metric::CpuPercent => (
            "nonstop_instance_cpu_usage_ratio",
            "CPU used by an instance's whole process group over the last sampling interval, in CPUs (1 = one CPU busy).",
            0.01,
        ),
        Metric::RssBytes => (
            "nonstop_instance_resident_memory_bytes",
            "Resident memory of an instance's whole process group (each process's RSS, summed).",
            1.0,
        ),
        Metric::Requests => ("nonstop_http_requests_total", "Requests answered through the proxy.", 1.0),
        Metric::InFlight => ("nonstop_http_requests_in_flight", "Requests in flight in the proxy.", 1.0),
        Metric::Latency => (
            "nonstop_http_request_duration_seconds",
            "Time from forwarding a request to an instance to its response head.",
            1.0,
        ),
        Metric::Responses(_) => ("nonstop_http_responses_total", "Responses by status class.", 1.0),
        Metric::UpstreamErrors => (
            "nonstop_upstream_errors_total",
            "Requests that failed at the instance (connect, reset, timeout) and were answered by the proxy.",
            1.0,
        ),
        Metric::StaticHits => ("nonstop_static_hits_total", "Requests answered with a static file.", 1.0),
        Metric::QueueDepth => ("nonstop_queue_depth", "Jobs waiting in a worker process's queue.", 1.0),
        Metric::Instances => ("nonstop_instances", "Running instances of a process type.", 1.0),
    };
    Family { name, help, kind: metric.kind(), scale }
}

/// The label names a family's samples carry, in order.
const LABELS: [&str; 5] = ["app", "environment", "process", "release", "slot"];

fn label_values(key: &SeriesKey) -> [Option<String>; 5] {
    [
        Some(key.app().to_string()),
        Some(key.environment_id().to_string()),
        key.process_name().map(|p| p.to_string()),
        key.release().map(|r| r.to_string()),
        key.slot().map(|s| s.to_string()),
    ]
}

/// The exposition of `store`'s series current at `now`, and the store's
/// own figures (`nonstop_metrics_series`,
/// `nonstop_metrics_dropped_samples_total`).
pub fn render(store: &Store, now: Timestamp) -> String {
    let mut out = String::with_capacity(4096);
    // Families in a fixed order; all response classes form one family.
    let mut seen: Vec<&'static str> = Vec::new();
    for metric in Metric::ALL {
        let fam = family(metric);
        if seen.contains(&fam.name) {
            continue;
        }
        seen.push(fam.name);
        let keys: Vec<&SeriesKey> =
            store.keys().filter(|k| family(k.metric()).name == fam.name && store.is_current(k, now)).collect();
        if keys.is_empty() {
            continue;
        }
        // The labels any of its series has; every sample carries them all.
        let used: Vec<usize> =
            (0..LABELS.len()).filter(|&i| keys.iter().any(|k| label_values(k)[i].is_some())).collect();
        header(&mut out, fam.name, fam.help, fam.kind);
        for key in keys {
            let Some(current) = store.current(key) else { continue };
            let values = label_values(key);
            let mut labels: Vec<(&str, String)> =
                used.iter().map(|&i| (LABELS[i], values[i].clone().unwrap_or_default())).collect();
            if let Metric::Responses(class) = key.metric() {
                labels.push(("code", class.to_string()));
            }
            match current.value {
                CurrentValue::Counter(n) => sample(&mut out, fam.name, &labels, &n.to_string()),
                CurrentValue::Gauge(v) => sample(&mut out, fam.name, &labels, &float(v * fam.scale)),
                CurrentValue::Histogram(h) => histogram(&mut out, fam.name, &labels, h),
            }
        }
    }
    header(&mut out, "nonstop_metrics_series", "Series held by the daemon's metrics store.", Kind::Gauge);
    sample(&mut out, "nonstop_metrics_series", &[], &store.len().to_string());
    header(
        &mut out,
        "nonstop_metrics_dropped_samples_total",
        "Samples not recorded because the metrics store held its limit of current series.",
        Kind::Counter,
    );
    sample(&mut out, "nonstop_metrics_dropped_samples_total", &[], &store.dropped_samples().to_string());
    out
}

fn header(out: &mut String, name: &str, help: &str, kind: Kind) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {}", kind.as_str());
}

fn sample(out: &mut String, name: &str, labels: &[(&str, String)], value: &str) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            out.push_str(&escape_label_value(v));
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

fn histogram(out: &mut String, name: &str, labels: &[(&str, String)], h: &Histogram) {
    let bucket = format!("{name}_bucket");
    let mut cumulative = 0u64;
    let mut with_le = labels.to_vec();
    with_le.push(("le", String::new()));
    for (i, &c) in h.counts().iter().enumerate().take(BUCKETS - 1) {
        cumulative = cumulative.saturating_add(c);
        if i % EXPOSED_STEP == 0 || i == BUCKETS - 2 {
            let Some(bound) = Histogram::bound(i) else { continue };
            if let Some(le) = with_le.last_mut() {
                le.1 = float(bound.as_secs_f64());
            }
            sample(out, &bucket, &with_le, &cumulative.to_string());
        }
    }
    if let Some(le) = with_le.last_mut() {
        le.1 = "+Inf".to_string();
    }
    let count = h.count();
    sample(out, &bucket, &with_le, &count.to_string());
    sample(out, &format!("{name}_sum"), labels, &float(h.sum().as_secs_f64()));
    sample(out, &format!("{name}_count"), labels, &count.to_string());
}

/// A sample value: Rust's shortest round-trip decimal (never exponent
/// notation), `+Inf`, `-Inf`, `NaN`.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        format!("{v}")
    }
}

/// A label value as the text format quotes it: `\` → `\\`, `"` → `\"`,
/// newline → `\n`.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A HELP text: `\` → `\\`, newline → `\n`.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests;
