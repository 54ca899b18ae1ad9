//! `[processes.NAME.autoscale]`, a worker's `queue` and `[metrics]` →
//! [`Autoscale`], [`QueueSource`] and [`MetricsSpec`].
//!
//! Pure. The rules: `max` is required and at least 1, `min` (default 1)
//! at most `max`; a web process never scales to 0, and a worker only with
//! a queue target (with no instance running, the queue is the only
//! measure left); at least one target, each a whole number above 0;
//! `requests_per_instance` and `p95_ms` for web processes only,
//! `queue_per_instance` only with a `queue`; a singleton never
//! autoscales. A `queue` reads the `REDIS_URL` its processes get, which
//! may be a secret or a config variable of the environment: the file
//! cannot tell, so the daemon checks that an environment has one when it
//! is about to run the process there (`engine/src/queue.rs`).

use crate::defaults::*;
use crate::duration::format_duration;
use crate::error::Diags;
use crate::raw::{RawAutoscale, RawDuration, RawIntOrString, RawMetrics, RawNumber, RawQueue};
use crate::validate::{duration, parse_listen, Field, Min};
use nonstop_core::autoscale::{Autoscale, Metric, MetricsSpec, QueueSource, Target};
use nonstop_core::process::{ProcessKind, ProxySpec, Quantity};
use serde_spanned::Spanned;
use std::net::SocketAddr;
use std::time::Duration;

/// A target's example value, for hints.
fn example(metric: Metric) -> u32 {
    match metric {
        Metric::CpuPercent => 70,
        Metric::RequestsPerInstance => 50,
        Metric::P95Ms => 300,
        Metric::QueuePerInstance => 20,
    }
}

/// `[processes.NAME.autoscale]` of the process at `path` (`processes.web`).
/// `kind`: `None` when it was invalid (reported already): the values are
/// checked, not whether they suit the process. `queue`: the process has
/// a `queue`. `None` if anything was wrong.
pub(crate) fn validate_autoscale(
    raw: &Spanned<RawAutoscale>,
    path: &str,
    kind: Option<ProcessKind>,
    queue: bool,
    diags: &mut Diags,
) -> Option<Autoscale> {
    let table = format!("{path}.autoscale");
    let f = |key| Field::new(&table, key);
    let before = diags.len();
    let a = raw.get_ref();
    if kind == Some(ProcessKind::Singleton) {
        diags.error(
            raw.span(),
            format!("[{table}]: a singleton never runs more than one instance, so it cannot autoscale"),
            format!("remove [{table}]; if several instances at once are fine, set kind = \"worker\" in [{path}]"),
        );
        return None;
    }
    // A missing `max`, or no target at all, was reported by the walk,
    // which knows whether a key is absent or only of the wrong type.
    let max = a.max.as_ref().and_then(|v| bound(v, f("max"), 1, diags));
    let min = match &a.min {
        Some(v) => bound(v, f("min"), 0, diags),
        None => Some(DEFAULT_AUTOSCALE_MIN),
    };

    let mut targets = Vec::new();
    for metric in Metric::ALL {
        let Some(value) = raw_target(a, metric) else { continue };
        let field = f(metric.key());
        let Some(n) = target(value, metric, field, diags) else { continue };
        let suits = match kind {
            Some(ProcessKind::Web) => metric != Metric::QueuePerInstance,
            Some(_) => !metric.web_only(),
            None => true,
        };
        if !suits {
            let (why, instead) = if metric.web_only() {
                (
                    "the proxy measures it, and this process gets no requests",
                    "cpu_percent, or queue_per_instance with a queue",
                )
            } else {
                ("a web process has no queue: its load is its requests", "requests_per_instance, p95_ms or cpu_percent")
            };
            diags.error(
                value.span(),
                format!(
                    "{} applies only to {}: {why}",
                    field.what(),
                    if metric.web_only() { "web processes" } else { "workers" }
                ),
                format!("remove it; track {instead} instead"),
            );
            continue;
        }
        if metric == Metric::QueuePerInstance && !queue {
            diags.error(
                value.span(),
                format!("{} needs the length of the process's queue, but [{path}] has no `queue`", field.what()),
                format!("add to [{path}] the Redis list its workers read, for example: queue = {{ redis_list = \"celery\" }}"),
            );
            continue;
        }
        targets.push(Target { metric, value: n });
    }

    if let (Some(min), Some(max)) = (min, max) {
        if min > max {
            // At the later of the two: an environment's, when it set one.
            let span = [a.min.as_ref(), a.max.as_ref()]
                .into_iter()
                .flatten()
                .map(Spanned::span)
                .max_by_key(|s| s.start)
                .unwrap_or(raw.span());
            diags.error(
                span,
                format!("`min` in [{table}] ({min}) is greater than `max` ({max})"),
                format!("min is the fewest instances and max the most: for example min = {max}, max = {min}"),
            );
        }
    }
    if min == Some(0) {
        let span = a.min.as_ref().map_or(raw.span(), Spanned::span);
        let queue_target = targets.iter().any(|t| t.metric == Metric::QueuePerInstance);
        match kind {
            Some(ProcessKind::Web) => diags.error(
                span,
                format!("`min` in [{table}] is 0, but a web process cannot scale to zero: no instance would be left to answer a request"),
                "set min = 1 (or more)",
            ),
            Some(ProcessKind::Worker) if !queue_target => diags.error(
                span,
                format!(
                    "`min` in [{table}] is 0, but only a queue target brings a worker back from zero instances (with none running there is no CPU to measure)"
                ),
                format!("set min = 1, or add queue_per_instance = 20 here with queue = {{ redis_list = \"celery\" }} in [{path}]"),
            ),
            _ => {}
        }
    }

    let scale_out_cooldown =
        bounded(a.scale_out_cooldown.as_ref(), f("scale_out_cooldown"), DEFAULT_AUTOSCALE_SCALE_OUT_COOLDOWN, diags);
    let scale_in_cooldown =
        bounded(a.scale_in_cooldown.as_ref(), f("scale_in_cooldown"), DEFAULT_AUTOSCALE_SCALE_IN_COOLDOWN, diags);
    let scale_in_window =
        bounded(a.scale_in_window.as_ref(), f("scale_in_window"), DEFAULT_AUTOSCALE_SCALE_IN_WINDOW, diags);
    let max_step = a.max_step.as_ref().map_or(DEFAULT_AUTOSCALE_MAX_STEP, |v| max_step(v, f("max_step"), diags));

    if diags.len() > before {
        return None;
    }
    if targets.is_empty() {
        return None;
    }
    Some(Autoscale { min: min?, max: max?, targets, scale_out_cooldown, scale_in_cooldown, scale_in_window, max_step })
}

fn raw_target(a: &RawAutoscale, metric: Metric) -> Option<&Spanned<RawNumber>> {
    match metric {
        Metric::CpuPercent => a.cpu_percent.as_ref(),
        Metric::RequestsPerInstance => a.requests_per_instance.as_ref(),
        Metric::P95Ms => a.p95_ms.as_ref(),
        Metric::QueuePerInstance => a.queue_per_instance.as_ref(),
    }
}

/// `min` or `max`: a count of at least `least`.
fn bound(value: &Spanned<i64>, field: Field<'_>, least: u32, diags: &mut Diags) -> Option<u32> {
    let n = *value.get_ref();
    if n < i64::from(least) {
        let hint = if least == 0 { field.example("1") } else { field.example("8") };
        diags.error(value.span(), format!("{} must be at least {least}, not {n}", field.what()), hint);
        return None;
    }
    match u32::try_from(n) {
        Ok(n) => Some(n),
        Err(_) => {
            diags.error(value.span(), format!("{} is too large (at most {})", field.what(), u32::MAX), None);
            None
        }
    }
}

/// A target: a whole number above 0 (`cpu_percent` may say `"70%"`).
fn target(value: &Spanned<RawNumber>, metric: Metric, field: Field<'_>, diags: &mut Diags) -> Option<u32> {
    let key = metric.key();
    let example = format!("for example: {key} = {}", example(metric));
    let n = match value.get_ref() {
        RawNumber::Int(i) => *i as f64,
        RawNumber::Float(x) => *x,
        RawNumber::Text(text) => {
            let t = text.trim();
            let percent = t.strip_suffix('%').map(str::trim);
            match (metric, percent.and_then(|p| p.parse::<f64>().ok())) {
                (Metric::CpuPercent, Some(p)) => p,
                _ => {
                    let bare = ["%", "ms", "/s", "s"].iter().find_map(|unit| t.strip_suffix(unit)).unwrap_or(t).trim();
                    let hint = match bare.parse::<f64>() {
                        Ok(n) if n > 0.0 => format!("write the number alone, without quotes: {key} = {}", whole(n)),
                        _ => example,
                    };
                    diags.error(
                        value.span(),
                        format!("{} must be a number, not a string ({text:?})", field.what()),
                        hint,
                    );
                    return None;
                }
            }
        }
    };
    if n.is_nan() || n <= 0.0 {
        diags.error(
            value.span(),
            format!(
                "{} must be greater than 0, not {}: instances are kept at their target, and no instance can be kept at {} or less",
                field.what(),
                shown(n),
                shown(n.max(0.0))
            ),
            example,
        );
        return None;
    }
    if n.fract() != 0.0 {
        diags.error(
            value.span(),
            format!("{} must be a whole number, not {}", field.what(), shown(n)),
            format!("for example: {key} = {}", whole(n)),
        );
        return None;
    }
    if n > f64::from(u32::MAX) {
        diags.error(value.span(), format!("{} is too large (at most {})", field.what(), u32::MAX), example);
        return None;
    }
    Some(n as u32)
}

/// `n` rounded to a whole number above 0, for hints.
fn whole(n: f64) -> String {
    let r = n.round().max(1.0);
    if r > f64::from(u32::MAX) {
        u32::MAX.to_string()
    } else {
        (r as u32).to_string()
    }
}

/// `70`, `0.5`, `-3`: a number as it was written (near enough).
fn shown(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// A cooldown or a window: 0 or more, at most [`MAX_AUTOSCALE_DURATION`].
fn bounded(value: Option<&Spanned<RawDuration>>, field: Field<'_>, default: Duration, diags: &mut Diags) -> Duration {
    let Some(v) = value else { return default };
    let d = duration(Some(v), field, Min::Zero, default, diags);
    if d > MAX_AUTOSCALE_DURATION {
        diags.error(
            v.span(),
            format!(
                "{} must be at most {}, not {}",
                field.what(),
                format_duration(MAX_AUTOSCALE_DURATION),
                format_duration(d)
            ),
            field.example(&format!("\"{}\"", format_duration(default))),
        );
        return default;
    }
    d
}

/// `max_step`: a count of at least 1, or a percentage of the current
/// count from 1% to [`MAX_AUTOSCALE_STEP_PERCENT`].
fn max_step(value: &Spanned<RawIntOrString>, field: Field<'_>, diags: &mut Diags) -> Quantity {
    let default = DEFAULT_AUTOSCALE_MAX_STEP;
    let hint = "use a count (max_step = 4) or a percentage of the current count (max_step = \"50%\")";
    match value.get_ref() {
        RawIntOrString::Int(n) if *n < 1 => {
            diags.error(
                value.span(),
                format!("{} must be at least 1, not {n}: a step of {n} could never change the count", field.what()),
                hint,
            );
            default
        }
        RawIntOrString::Int(n) => match u32::try_from(*n) {
            Ok(n) => Quantity::Count(n),
            Err(_) => {
                diags.error(value.span(), format!("{} is too large", field.what()), hint);
                default
            }
        },
        RawIntOrString::Text(text) => {
            let t = text.trim();
            if let Some(p) = t.strip_suffix('%').and_then(|p| p.trim().parse::<u32>().ok()) {
                if (1..=MAX_AUTOSCALE_STEP_PERCENT).contains(&p) {
                    return Quantity::Percent(p);
                }
                diags.error(
                    value.span(),
                    format!(
                        "{} must be from 1% to {MAX_AUTOSCALE_STEP_PERCENT}% of the current count, not {t}",
                        field.what()
                    ),
                    hint,
                );
                return default;
            }
            let hint = match t.parse::<u32>() {
                Ok(n) => format!("remove the quotes for a count (max_step = {n}) or add % for a percentage (\"{n}%\")"),
                Err(_) => hint.to_string(),
            };
            diags.error(value.span(), format!("{} is not a count or a percentage ({text:?})", field.what()), hint);
            default
        }
    }
}

/// `queue` of the process at `path`: workers only, a list name that is
/// not empty.
pub(crate) fn validate_queue(
    raw: &Spanned<RawQueue>,
    path: &str,
    kind: Option<ProcessKind>,
    diags: &mut Diags,
) -> Option<QueueSource> {
    if kind == Some(ProcessKind::Web) {
        diags.error(
            raw.span(),
            format!("`queue` in [{path}] applies only to workers: a web process's load is its requests"),
            format!("remove it; to follow the web load, use requests_per_instance or p95_ms in [{path}.autoscale]"),
        );
        return None;
    }
    // A missing `redis_list` was reported by the walk.
    let list = raw.get_ref().redis_list.as_ref()?;
    let name = list.get_ref();
    let problem = if name.trim().is_empty() {
        Some("is empty".to_string())
    } else if name.chars().any(char::is_control) {
        Some("contains control characters".to_string())
    } else if name.len() > MAX_QUEUE_NAME_BYTES {
        Some(format!("is longer than {MAX_QUEUE_NAME_BYTES} bytes"))
    } else {
        None
    };
    if let Some(problem) = problem {
        diags.error(
            list.span(),
            format!("`redis_list` of `queue` in [{path}] {problem}"),
            "name the Redis list the workers read, for example: queue = { redis_list = \"celery\" } (Celery's default queue)",
        );
        return None;
    }
    Some(QueueSource::RedisList(name.clone()))
}

/// `[metrics]`: an address to listen on, not one of the proxy's.
pub(crate) fn validate_metrics(raw: &Spanned<RawMetrics>, proxy: &ProxySpec, diags: &mut Diags) -> Option<MetricsSpec> {
    let Some(value) = &raw.get_ref().listen else {
        return Some(MetricsSpec {
            listen: DEFAULT_METRICS_LISTEN.parse().expect("the default metrics address is valid"),
        });
    };
    let listen = match parse_listen(value.get_ref()) {
        Ok(addr) => addr,
        Err((reason, hint)) => {
            diags.error(
                value.span(),
                format!("`listen` in [metrics] is not a valid address ({:?}): {reason}", value.get_ref()),
                hint.replace("8080", "9464"),
            );
            return None;
        }
    };
    let taken = [("listen", Some(proxy.listen)), ("https_listen", proxy.https_listen)];
    for (key, addr) in taken {
        if let Some(addr) = addr.filter(|a| overlaps(*a, listen)) {
            diags.error(
                value.span(),
                format!("`listen` in [metrics] ({listen}) takes the port of `{key}` in [proxy] ({addr})"),
                format!("give /metrics a port of its own, for example: listen = \"{}\"", DEFAULT_METRICS_LISTEN),
            );
            return None;
        }
    }
    Some(MetricsSpec { listen })
}

/// Whether two listening addresses would take the same port (the same
/// address, or one of them every address).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
