//! The live-traffic gate's keys of `[processes.NAME.rollout]` (`canary`,
//! `canary_hold`, `canary_max_5xx_increase`, `canary_max_p95_ratio`,
//! `canary_p95_slack`, `canary_min_requests`) → [`Canary`].
//!
//! Pure: the values are parsed by the small functions at the bottom
//! (`step`, `basis_points`, `ratio_percent`), each answering what is wrong
//! and the value that would have been right.

use crate::defaults::*;
use crate::duration::format_duration;
use crate::error::Diags;
use crate::raw::{RawCanary, RawDuration, RawNumber, RawRollout};
use crate::validate::{duration, Field, Min};
use nonstop_core::process::{Canary, ProcessKind};
use serde_spanned::Spanned;
use std::ops::Range;
use std::time::Duration;

const STEPS_EXAMPLE: &str = "canary = [\"5%\", \"25%\"] (or canary = false for no ramp)";

/// `kind`: `None` when the kind was invalid (reported already); the keys'
/// values are checked then, but not whether they belong.
pub(crate) fn validate_canary(raw: &RawRollout, path: &str, kind: Option<ProcessKind>, diags: &mut Diags) -> Canary {
    let f = |key| Field::new(path, key);
    let set = keys_set(raw);
    if matches!(kind, Some(ProcessKind::Worker | ProcessKind::Singleton)) && !set.is_empty() {
        for (key, span) in set {
            diags.error(
                span,
                format!(
                    "`{key}` in [{path}] applies only to web processes: the live-traffic gate weighs web traffic, and this process gets none"
                ),
                format!("remove it from [{path}]"),
            );
        }
        return Canary::default();
    }
    let default = Canary::default();
    Canary {
        steps: raw.canary.as_ref().map_or(default.steps, |c| steps(c, f("canary"), diags)),
        hold: bounded_duration(
            raw.canary_hold.as_ref(),
            f("canary_hold"),
            MIN_CANARY_HOLD..=MAX_CANARY_HOLD,
            DEFAULT_CANARY_HOLD,
            "a shorter window sees too few requests to judge, a longer one holds the deploy for minutes",
            diags,
        ),
        max_5xx_increase_bp: raw
            .canary_max_5xx_increase
            .as_ref()
            .map_or(DEFAULT_CANARY_MAX_5XX_INCREASE_BP, |v| max_5xx_increase(v, f("canary_max_5xx_increase"), diags)),
        max_p95_ratio_pct: raw
            .canary_max_p95_ratio
            .as_ref()
            .map_or(DEFAULT_CANARY_MAX_P95_RATIO_PCT, |v| max_p95_ratio(v, f("canary_max_p95_ratio"), diags)),
        p95_slack: bounded_duration(
            raw.canary_p95_slack.as_ref(),
            f("canary_p95_slack"),
            Duration::ZERO..=MAX_CANARY_P95_SLACK,
            DEFAULT_CANARY_P95_SLACK,
            "it is added to the allowed p95, so that small p95s (a few ms) are not judged on noise",
            diags,
        ),
        min_requests: raw
            .canary_min_requests
            .as_ref()
            .map_or(DEFAULT_CANARY_MIN_REQUESTS, |v| min_requests(v, f("canary_min_requests"), diags)),
    }
}

/// The `canary*` keys present, with their locations, in schema order.
fn keys_set(raw: &RawRollout) -> Vec<(&'static str, Range<usize>)> {
    let span = |v: Option<Range<usize>>, key| v.map(|s| (key, s));
    [
        span(raw.canary.as_ref().map(Spanned::span), "canary"),
        span(raw.canary_hold.as_ref().map(Spanned::span), "canary_hold"),
        span(raw.canary_max_5xx_increase.as_ref().map(Spanned::span), "canary_max_5xx_increase"),
        span(raw.canary_max_p95_ratio.as_ref().map(Spanned::span), "canary_max_p95_ratio"),
        span(raw.canary_p95_slack.as_ref().map(Spanned::span), "canary_p95_slack"),
        span(raw.canary_min_requests.as_ref().map(Spanned::span), "canary_min_requests"),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// `canary`: rising percents; any problem reports and gives the default.
fn steps(value: &Spanned<RawCanary>, field: Field<'_>, diags: &mut Diags) -> Vec<u8> {
    let items = match value.get_ref() {
        RawCanary::Switch(false) => return Vec::new(),
        RawCanary::Switch(true) => return DEFAULT_CANARY_STEPS.to_vec(),
        RawCanary::Steps(items) => items,
    };
    let default = DEFAULT_CANARY_STEPS.to_vec();
    if items.len() > MAX_CANARY_STEPS {
        diags.error(
            value.span(),
            format!("{} lists {} steps; at most {MAX_CANARY_STEPS} are allowed", field.what(), items.len()),
            format!(
                "each step holds the deploy up to canary_hold: keep a few rising shares, for example: {STEPS_EXAMPLE}"
            ),
        );
        return default;
    }
    let before = diags.len();
    // What the user probably meant, for "did you mean": each item read
    // as a percent where that is the likely intent.
    let meant = format!(
        "canary = [{}]",
        items.iter().map(|i| format!("\"{}%\"", meant_percent(i.get_ref()))).collect::<Vec<_>>().join(", ")
    );
    let mut out: Vec<u8> = Vec::new();
    for item in items {
        match step(item.get_ref()) {
            Ok(n) => {
                if let Some(&last) = out.last() {
                    if n <= last {
                        let mut fixed: Vec<u8> = items.iter().filter_map(|i| meant_step(i.get_ref())).collect();
                        fixed.sort_unstable();
                        fixed.dedup();
                        diags.error(
                            item.span(),
                            format!("{} must rise step by step: \"{n}%\" comes after \"{last}%\"", field.what()),
                            format!("each step gives the new release a larger share; for example: {}", list(&fixed)),
                        );
                        continue;
                    }
                }
                out.push(n);
            }
            Err(StepError::Bare) => diags.error(
                item.span(),
                format!("{} has a bare number ({}) where a percentage belongs", field.what(), shown(item.get_ref())),
                format!("did you mean {meant}? steps are shares of the web traffic, written with %"),
            ),
            Err(problem) => diags.error(
                item.span(),
                format!("{} has {:?}, which {}", field.what(), shown(item.get_ref()), problem.says()),
                problem.fix(item.get_ref()),
            ),
        }
    }
    if diags.len() > before {
        return default;
    }
    out
}

/// `["5%", "25%"]` as written in a spec (`canary = []` when empty).
fn list(steps: &[u8]) -> String {
    format!("canary = [{}]", steps.iter().map(|n| format!("\"{n}%\"")).collect::<Vec<_>>().join(", "))
}

/// A value as it appears in messages.
fn shown(v: &RawNumber) -> String {
    match v {
        RawNumber::Int(n) => n.to_string(),
        RawNumber::Float(x) => format!("{x:?}"),
        RawNumber::Text(t) => t.clone(),
    }
}

/// The percent a step was probably meant to be: `5` → `5`, `"5"` → `5`.
fn meant_percent(v: &RawNumber) -> String {
    match v {
        RawNumber::Int(n) => n.to_string(),
        RawNumber::Float(x) => format!("{}", x.round()),
        RawNumber::Text(t) => {
            let t = t.trim();
            t.strip_suffix('%').unwrap_or(t).trim().to_string()
        }
    }
}

/// The step an item stands for in a suggested list: a valid step, or a
/// bare number that would be one with a % sign.
fn meant_step(v: &RawNumber) -> Option<u8> {
    match step(v) {
        Ok(n) => Some(n),
        Err(StepError::Bare | StepError::NoPercentSign) => {
            meant_percent(v).parse::<u8>().ok().filter(|n| (1..=99).contains(n))
        }
        Err(_) => None,
    }
}

/// Why a step was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepError {
    /// A number (`5`), not a percentage (`"5%"`).
    Bare,
    /// A string without `%` (`"5"`).
    NoPercentSign,
    /// `"5.5%"`, `2.5`: steps are whole percents.
    NotWhole,
    /// Not a number at all.
    Malformed,
    /// `"0%"` (or negative).
    TooSmall,
    /// `"100%"` and more: the full share comes after the last step.
    TooLarge,
}

impl StepError {
    fn says(self) -> &'static str {
        match self {
            StepError::Bare | StepError::NoPercentSign => "has no % sign",
            StepError::NotWhole => "is not a whole percent",
            StepError::Malformed => "is not a percentage",
            StepError::TooSmall => "is below 1%",
            StepError::TooLarge => {
                "is not below 100%: the new release gets the full share after the last step, by the rollout itself"
            }
        }
    }

    fn fix(self, v: &RawNumber) -> String {
        match self {
            StepError::Bare | StepError::NoPercentSign => {
                format!("did you mean \"{}%\"? for example: {STEPS_EXAMPLE}", meant_percent(v))
            }
            StepError::NotWhole => {
                let rounded = meant_percent(v).parse::<f64>().map_or(5.0, |x| x.round().clamp(1.0, 99.0));
                format!("write whole percents, such as \"{rounded}%\"; for example: {STEPS_EXAMPLE}")
            }
            StepError::Malformed => format!("write shares from \"1%\" to \"99%\"; for example: {STEPS_EXAMPLE}"),
            StepError::TooSmall => {
                format!("the smallest share is \"1%\"; for no ramp at all write canary = false; for example: {STEPS_EXAMPLE}")
            }
            StepError::TooLarge => {
                format!("remove it, keeping steps from \"1%\" to \"99%\"; for example: {STEPS_EXAMPLE}")
            }
        }
    }
}

/// One step of `canary`: `"5%"` → 5; 1 to 99.
pub(crate) fn step(v: &RawNumber) -> Result<u8, StepError> {
    let text = match v {
        RawNumber::Int(_) => return Err(StepError::Bare),
        RawNumber::Float(x) if x.fract() == 0.0 => return Err(StepError::Bare),
        RawNumber::Float(_) => return Err(StepError::NotWhole),
        RawNumber::Text(t) => t.trim(),
    };
    let Some(number) = text.strip_suffix('%') else {
        return Err(if text.parse::<f64>().is_ok() { StepError::NoPercentSign } else { StepError::Malformed });
    };
    let number = number.trim();
    match number.parse::<i64>() {
        Ok(n) if n < 1 => Err(StepError::TooSmall),
        Ok(n) if n > 99 => Err(StepError::TooLarge),
        Ok(n) => Ok(n as u8),
        Err(_) => match number.parse::<f64>() {
            Ok(x) if x.is_finite() && x < 1.0 => Err(StepError::TooSmall),
            Ok(x) if x.is_finite() && x >= 100.0 => Err(StepError::TooLarge),
            Ok(x) if x.is_finite() => Err(StepError::NotWhole),
            _ => Err(StepError::Malformed),
        },
    }
}

/// `"1%"` → 100, `"0.5%"` → 50, `"0.25%"` → 25: percentage points as basis
/// points. At most two decimals; 0 to 100%. The error says what is wrong.
pub(crate) fn basis_points(text: &str) -> Result<u32, &'static str> {
    let t = text.trim();
    let Some(number) = t.strip_suffix('%') else { return Err("it has no % sign") };
    let number = number.trim();
    if number.starts_with('-') {
        return Err("it is negative");
    }
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || (number.contains('.') && frac.is_empty()) {
        return Err("it is not a percentage");
    }
    if frac.len() > 2 {
        return Err("it has more than two decimals");
    }
    let whole: u64 = whole.parse().map_err(|_| "it is above 100%")?;
    let frac: u64 = format!("{frac:0<2}").parse().unwrap_or(0);
    let bp = whole.saturating_mul(100).saturating_add(frac);
    if bp > u64::from(MAX_CANARY_MAX_5XX_INCREASE_BP) {
        return Err("it is above 100%");
    }
    Ok(bp as u32)
}

/// Basis points as written in a spec: 100 → `"1%"`, 50 → `"0.5%"`.
pub(crate) fn format_basis_points(bp: u32) -> String {
    match bp % 100 {
        0 => format!("{}%", bp / 100),
        f if f % 10 == 0 => format!("{}.{}%", bp / 100, f / 10),
        f => format!("{}.{f:02}%", bp / 100),
    }
}

fn max_5xx_increase(value: &Spanned<RawNumber>, field: Field<'_>, diags: &mut Diags) -> u32 {
    let default = DEFAULT_CANARY_MAX_5XX_INCREASE_BP;
    let example = field.example(&format!("\"{}\"", format_basis_points(default)));
    let what = "percentage points: how much higher the new release's 5xx rate may be than the old one's";
    match value.get_ref() {
        RawNumber::Int(_) | RawNumber::Float(_) => {
            let n = shown(value.get_ref());
            let n = n.strip_suffix(".0").unwrap_or(&n);
            diags.error(
                value.span(),
                format!("{} must be a percentage such as \"1%\", not a bare number ({n})", field.what()),
                format!("did you mean {} = \"{n}%\"? it is {what}", field.key),
            );
            default
        }
        RawNumber::Text(text) => match basis_points(text) {
            Ok(bp) => bp,
            Err(reason) => {
                let hint = if reason == "it has no % sign" && text.trim().parse::<f64>().is_ok() {
                    format!("did you mean {} = \"{}%\"? it is {what}", field.key, text.trim())
                } else {
                    format!("use \"0%\" to \"100%\", with at most two decimals (\"0.5%\"); {example}")
                };
                diags.error(value.span(), format!("{} is not valid ({text:?}): {reason}", field.what()), hint);
                default
            }
        },
    }
}

/// `2.0` → 200, `1.25` → 125: a factor as whole percents, 1.0 to 100.0.
pub(crate) fn ratio_percent(x: f64) -> Result<u32, &'static str> {
    if !x.is_finite() {
        return Err("it is not a finite number");
    }
    let pct = (x * 100.0).round();
    if (x * 100.0 - pct).abs() > 1e-6 {
        return Err("it has more than two decimals");
    }
    if pct < f64::from(MIN_CANARY_MAX_P95_RATIO_PCT) {
        return Err("it is below 1.0 (the new release would have to be faster than the old one)");
    }
    if pct > f64::from(MAX_CANARY_MAX_P95_RATIO_PCT) {
        return Err("it is above 100.0");
    }
    Ok(pct as u32)
}

fn max_p95_ratio(value: &Spanned<RawNumber>, field: Field<'_>, diags: &mut Diags) -> u32 {
    let default = DEFAULT_CANARY_MAX_P95_RATIO_PCT;
    let example = format!("for example: {} = {:.1}", field.key, f64::from(default) / 100.0);
    let x = match value.get_ref() {
        RawNumber::Int(n) => *n as f64,
        RawNumber::Float(x) => *x,
        RawNumber::Text(text) => {
            let t = text.trim();
            let meant = t
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok().map(|p| p / 100.0))
                .or_else(|| t.trim_end_matches(['x', 'X', '×']).trim().parse::<f64>().ok());
            let hint = match meant {
                Some(m) => format!("did you mean {} = {m:?}? it is a factor, written without quotes", field.key),
                None => format!("it is a factor, written without quotes; {example}"),
            };
            diags.error(value.span(), format!("{} must be a number, not a string ({text:?})", field.what()), hint);
            return default;
        }
    };
    match ratio_percent(x) {
        Ok(pct) => pct,
        Err(reason) => {
            diags.error(
                value.span(),
                format!("{} is not valid ({}): {reason}", field.what(), shown(value.get_ref())),
                format!(
                    "use 1.0 to 100.0, with at most two decimals: the new release's p95 may be this many times the old one's, plus canary_p95_slack; {example}"
                ),
            );
            default
        }
    }
}

fn min_requests(value: &Spanned<i64>, field: Field<'_>, diags: &mut Diags) -> u32 {
    let n = *value.get_ref();
    match u32::try_from(n) {
        Ok(n) if (1..=MAX_CANARY_MIN_REQUESTS).contains(&n) => n,
        _ => {
            diags.error(
                value.span(),
                format!("{} must be between 1 and {MAX_CANARY_MIN_REQUESTS}, not {n}", field.what()),
                format!(
                    "a window with fewer new-release requests judges nothing; {}",
                    field.example(&DEFAULT_CANARY_MIN_REQUESTS.to_string())
                ),
            );
            DEFAULT_CANARY_MIN_REQUESTS
        }
    }
}

/// A duration that must lie within `range` (0 allowed if the range does).
fn bounded_duration(
    value: Option<&Spanned<RawDuration>>,
    field: Field<'_>,
    range: std::ops::RangeInclusive<Duration>,
    default: Duration,
    why: &str,
    diags: &mut Diags,
) -> Duration {
    let Some(value) = value else { return default };
    let before = diags.len();
    let d = duration(Some(value), field, Min::Zero, default, diags);
    if diags.len() > before {
        return default;
    }
    if !range.contains(&d) {
        diags.error(
            value.span(),
            format!(
                "{} must be between {} and {}, not {}",
                field.what(),
                format_duration(*range.start()),
                format_duration(*range.end()),
                format_duration(d)
            ),
            format!("{why}; {}", field.example(&format!("\"{}\"", format_duration(default)))),
        );
        return default;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_as_whole_percents() {
        let t = |s: &str| step(&RawNumber::Text(s.into()));
        assert_eq!(t("5%"), Ok(5));
        assert_eq!(t(" 25 % "), Ok(25));
        assert_eq!(t("1%"), Ok(1));
        assert_eq!(t("99%"), Ok(99));
        assert_eq!(t("0%"), Err(StepError::TooSmall));
        assert_eq!(t("-5%"), Err(StepError::TooSmall));
        assert_eq!(t("100%"), Err(StepError::TooLarge));
        assert_eq!(t("5.5%"), Err(StepError::NotWhole));
        assert_eq!(t("5"), Err(StepError::NoPercentSign));
        assert_eq!(t("five%"), Err(StepError::Malformed));
        assert_eq!(t("lots"), Err(StepError::Malformed));
        assert_eq!(step(&RawNumber::Int(5)), Err(StepError::Bare));
        assert_eq!(step(&RawNumber::Float(5.0)), Err(StepError::Bare));
        assert_eq!(step(&RawNumber::Float(5.5)), Err(StepError::NotWhole));
    }

    #[test]
    fn percentage_points_become_basis_points() {
        assert_eq!(basis_points("1%"), Ok(100));
        assert_eq!(basis_points("0.5%"), Ok(50));
        assert_eq!(basis_points("0.25%"), Ok(25));
        assert_eq!(basis_points("0%"), Ok(0));
        assert_eq!(basis_points("100%"), Ok(10_000));
        assert_eq!(basis_points("12.3 %"), Ok(1230));
        assert_eq!(basis_points("100.01%"), Err("it is above 100%"));
        assert_eq!(basis_points("99999999999999999999%"), Err("it is above 100%"));
        assert_eq!(basis_points("0.125%"), Err("it has more than two decimals"));
        assert_eq!(basis_points("-1%"), Err("it is negative"));
        assert_eq!(basis_points("1"), Err("it has no % sign"));
        assert_eq!(basis_points("1.%"), Err("it is not a percentage"));
        assert_eq!(basis_points(".5%"), Err("it is not a percentage"));
        assert_eq!(basis_points("1e2%"), Err("it is not a percentage"));
        for bp in [0, 1, 5, 10, 50, 99, 100, 150, 1234, 10_000] {
            assert_eq!(basis_points(&format_basis_points(bp)), Ok(bp), "{bp}");
        }
        assert_eq!(format_basis_points(50), "0.5%");
        assert_eq!(format_basis_points(5), "0.05%");
    }

    #[test]
    fn ratios_become_percent() {
        assert_eq!(ratio_percent(2.0), Ok(200));
        assert_eq!(ratio_percent(1.0), Ok(100));
        assert_eq!(ratio_percent(1.25), Ok(125));
        assert_eq!(ratio_percent(1.1), Ok(110));
        assert_eq!(ratio_percent(100.0), Ok(10_000));
        assert!(ratio_percent(0.99).is_err());
        assert!(ratio_percent(100.5).is_err());
        assert!(ratio_percent(1.234).is_err());
        assert!(ratio_percent(f64::NAN).is_err());
        assert!(ratio_percent(f64::INFINITY).is_err());
    }
}
