//! The live-traffic gate's keys in `[processes.NAME.rollout]`: defaults,
//! every key, the ramp turned off, every refusal.

use super::*;
use nonstop_core::process::Canary;
use proptest::prelude::*;
use std::path::Path;
use std::time::Duration;

fn parse_ok(src: &str) -> AppSpec {
    parse(src, Path::new("nonstop.toml"), &()).unwrap_or_else(|e| panic!("expected a valid spec, got:\n{e}"))
}

fn parse_errs(src: &str) -> Vec<SpecError> {
    match parse(src, Path::new("nonstop.toml"), &()) {
        Ok(spec) => panic!("expected errors, got {spec:#?}"),
        Err(e) => e.errors,
    }
}

/// A web process whose `[processes.web.rollout]` (line 4) has `lines`
/// (from line 5).
fn with_rollout(lines: &str) -> String {
    format!("app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n[processes.web.rollout]\n{lines}\n")
}

fn canary_of(spec: &AppSpec) -> Canary {
    spec.processes[0].rollout.canary.clone()
}

/// Exactly one error, on line 5, whose message names `key` and `value`
/// and whose hint holds `fix`.
#[track_caller]
fn refused(lines: &str, key: &str, value: &str, fix: &str) {
    let e = parse_errs(&with_rollout(lines));
    assert_eq!(e.len(), 1, "{lines}: {}", SpecErrors { errors: e.clone() });
    assert_eq!(e[0].line, 5, "{lines}: {}", e[0]);
    let m = &e[0].message;
    assert!(m.contains(&format!("`{key}` in [processes.web.rollout]")), "{lines}: {m}");
    assert!(m.contains(value), "{lines}: message {m:?} lacks the value {value:?}");
    let hint = e[0].hint.as_deref().unwrap_or("");
    assert!(hint.contains(fix), "{lines}: hint {hint:?} lacks {fix:?}");
}

#[test]
fn defaults_apply_when_the_keys_are_absent() {
    let spec = parse_ok("app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n");
    assert_eq!(canary_of(&spec), Canary::default());
    let spec = parse_ok(&with_rollout("max_surge = 2"));
    assert_eq!(canary_of(&spec), Canary::default());
    assert_eq!(
        Canary::default(),
        Canary {
            steps: DEFAULT_CANARY_STEPS.to_vec(),
            hold: DEFAULT_CANARY_HOLD,
            max_5xx_increase_bp: DEFAULT_CANARY_MAX_5XX_INCREASE_BP,
            max_p95_ratio_pct: DEFAULT_CANARY_MAX_P95_RATIO_PCT,
            p95_slack: DEFAULT_CANARY_P95_SLACK,
            min_requests: DEFAULT_CANARY_MIN_REQUESTS,
        }
    );
}

#[test]
fn every_key_is_read() {
    let spec = parse_ok(&with_rollout(
        "canary = [\"5%\", \"25%\"]\ncanary_hold = \"10s\"\ncanary_max_5xx_increase = \"1%\"\n\
         canary_max_p95_ratio = 2.0\ncanary_p95_slack = \"100ms\"\ncanary_min_requests = 20",
    ));
    assert_eq!(canary_of(&spec), Canary::default());

    let spec = parse_ok(&with_rollout(
        "canary = [\"1%\", \"10%\", \"50%\", \"75%\", \"99%\"]\ncanary_hold = \"10m\"\n\
         canary_max_5xx_increase = \"0.25%\"\ncanary_max_p95_ratio = 1.5\ncanary_p95_slack = 0\n\
         canary_min_requests = 100000",
    ));
    assert_eq!(
        canary_of(&spec),
        Canary {
            steps: vec![1, 10, 50, 75, 99],
            hold: Duration::from_secs(600),
            max_5xx_increase_bp: 25,
            max_p95_ratio_pct: 150,
            p95_slack: Duration::ZERO,
            min_requests: 100_000,
        }
    );

    // The other ends of the ranges, an integer ratio, seconds as a number.
    let spec = parse_ok(&with_rollout(
        "canary = [\"50%\"]\ncanary_hold = 1\ncanary_max_5xx_increase = \"100%\"\ncanary_max_p95_ratio = 100\n\
         canary_p95_slack = \"1m\"\ncanary_min_requests = 1",
    ));
    assert_eq!(
        canary_of(&spec),
        Canary {
            steps: vec![50],
            hold: Duration::from_secs(1),
            max_5xx_increase_bp: 10_000,
            max_p95_ratio_pct: 10_000,
            p95_slack: Duration::from_secs(60),
            min_requests: 1,
        }
    );
    let spec = parse_ok(&with_rollout("canary_max_5xx_increase = \"0%\"\ncanary_max_p95_ratio = 1.0"));
    assert_eq!((canary_of(&spec).max_5xx_increase_bp, canary_of(&spec).max_p95_ratio_pct), (0, 100));
}

#[test]
fn false_or_an_empty_list_turns_the_ramp_off() {
    for off in ["false", "[]"] {
        let spec = parse_ok(&with_rollout(&format!("canary = {off}")));
        let canary = canary_of(&spec);
        assert!(canary.steps.is_empty(), "{off}");
        assert_eq!(canary, Canary { steps: Vec::new(), ..Canary::default() }, "{off}: nothing else changes");
    }
    // `true` is the default ramp.
    assert_eq!(canary_of(&parse_ok(&with_rollout("canary = true"))), Canary::default());
}

#[test]
fn out_of_range_values_are_refused_with_the_fix() {
    let cases: &[(&str, &str, &str, &str)] = &[
        // (line, key, value in the message, fix in the hint)
        ("canary = [\"0%\"]", "canary", "0%", "canary = false"),
        ("canary = [\"100%\"]", "canary", "100%", "\"1%\" to \"99%\""),
        ("canary = [\"5%\", \"150%\"]", "canary", "150%", "remove it"),
        ("canary = [\"5.5%\"]", "canary", "5.5%", "\"6%\""),
        ("canary = [\"five%\"]", "canary", "five%", "canary = [\"5%\", \"25%\"]"),
        (
            "canary = [\"1%\", \"2%\", \"3%\", \"4%\", \"5%\", \"6%\"]",
            "canary",
            "6 steps",
            "canary = [\"5%\", \"25%\"]",
        ),
        ("canary = \"5%\"", "canary", "not a string", "canary = [\"5%\"]"),
        ("canary = \"off\"", "canary", "not a string", "canary = false"),
        ("canary = { at = 5 }", "canary", "not a table", "canary = [\"5%\", \"25%\"]"),
        ("canary_hold = \"500ms\"", "canary_hold", "500ms", "canary_hold = \"10s\""),
        ("canary_hold = \"11m\"", "canary_hold", "11m", "canary_hold = \"10s\""),
        ("canary_hold = 0", "canary_hold", "0s", "canary_hold = \"10s\""),
        ("canary_hold = \"soon\"", "canary_hold", "soon", "durations are"),
        ("canary_max_5xx_increase = \"101%\"", "canary_max_5xx_increase", "101%", "\"0%\" to \"100%\""),
        ("canary_max_5xx_increase = \"-1%\"", "canary_max_5xx_increase", "-1%", "\"0%\" to \"100%\""),
        ("canary_max_5xx_increase = \"0.125%\"", "canary_max_5xx_increase", "0.125%", "two decimals"),
        ("canary_max_5xx_increase = \"1\"", "canary_max_5xx_increase", "no % sign", "canary_max_5xx_increase = \"1%\""),
        ("canary_max_5xx_increase = 1", "canary_max_5xx_increase", "(1)", "canary_max_5xx_increase = \"1%\""),
        ("canary_max_5xx_increase = 0.5", "canary_max_5xx_increase", "(0.5)", "canary_max_5xx_increase = \"0.5%\""),
        ("canary_max_p95_ratio = 0.5", "canary_max_p95_ratio", "0.5", "1.0 to 100.0"),
        ("canary_max_p95_ratio = 0", "canary_max_p95_ratio", "(0)", "1.0 to 100.0"),
        ("canary_max_p95_ratio = 101", "canary_max_p95_ratio", "101", "canary_max_p95_ratio = 2.0"),
        ("canary_max_p95_ratio = 1.234", "canary_max_p95_ratio", "1.234", "two decimals"),
        ("canary_max_p95_ratio = nan", "canary_max_p95_ratio", "NaN", "1.0 to 100.0"),
        ("canary_max_p95_ratio = \"2x\"", "canary_max_p95_ratio", "2x", "canary_max_p95_ratio = 2.0"),
        ("canary_max_p95_ratio = \"200%\"", "canary_max_p95_ratio", "200%", "canary_max_p95_ratio = 2.0"),
        ("canary_max_p95_ratio = true", "canary_max_p95_ratio", "boolean", "canary_max_p95_ratio = 2.0"),
        ("canary_p95_slack = \"61s\"", "canary_p95_slack", "1m1s", "canary_p95_slack = \"100ms\""),
        ("canary_p95_slack = -1", "canary_p95_slack", "negative", "canary_p95_slack = \"100ms\""),
        ("canary_min_requests = 0", "canary_min_requests", "not 0", "canary_min_requests = 20"),
        ("canary_min_requests = 100001", "canary_min_requests", "100001", "canary_min_requests = 20"),
        ("canary_min_requests = -3", "canary_min_requests", "-3", "canary_min_requests = 20"),
        ("canary_min_requests = \"20\"", "canary_min_requests", "not a string", "canary_min_requests = 20"),
    ];
    for (line, key, value, fix) in cases {
        refused(line, key, value, fix);
    }
}

#[test]
fn steps_must_rise() {
    refused("canary = [\"25%\", \"5%\"]", "canary", "\"5%\" comes after \"25%\"", "canary = [\"5%\", \"25%\"]");
    refused("canary = [\"5%\", \"5%\"]", "canary", "\"5%\" comes after \"5%\"", "canary = [\"5%\"]");
    refused("canary = [\"5%\", \"50%\", \"25%\"]", "canary", "must rise", "canary = [\"5%\", \"25%\", \"50%\"]");
    // The fix counts a bare number as the percentage it stands for, and
    // leaves out what can be no step.
    let e = parse_errs(&with_rollout("canary = [5, \"25%\", \"25%\", \"150%\"]"));
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e[1].message.contains("must rise"), "{}", e[1]);
    assert!(e[1].hint.as_deref().unwrap_or("").contains("canary = [\"5%\", \"25%\"]"), "{}", e[1]);
}

#[test]
fn a_bare_number_gets_its_percentage() {
    refused("canary = [5, \"25%\"]", "canary", "bare number (5)", "did you mean canary = [\"5%\", \"25%\"]?");
    refused("canary = [\"5\"]", "canary", "no % sign", "did you mean \"5%\"?");
    refused("canary = 5", "canary", "not an integer", "did you mean canary = [\"5%\"]?");
    // Two bare numbers: two errors, both with the whole fixed list.
    let e = parse_errs(&with_rollout("canary = [5, 25]"));
    assert_eq!(e.len(), 2, "{e:?}");
    for e in &e {
        assert!(e.hint.as_deref().unwrap_or("").contains("canary = [\"5%\", \"25%\"]"), "{e}");
    }
}

#[test]
fn the_gate_is_for_web_processes_only() {
    for kind in ["worker", "singleton"] {
        let src = format!(
            "app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n\
             [processes.worker]\ncommand = \"celery -A blog worker\"\nkind = \"{kind}\"\n\
             [processes.worker.rollout]\ncanary = [\"5%\"]\ncanary_min_requests = 5\n"
        );
        let e = parse_errs(&src);
        assert_eq!(e.len(), 2, "{kind}: {e:?}");
        for (e, key, line) in [(&e[0], "canary", 8), (&e[1], "canary_min_requests", 9)] {
            assert_eq!(e.line, line, "{kind}: {e}");
            assert!(e.message.contains(&format!("`{key}` in [processes.worker.rollout]")), "{kind}: {e}");
            assert!(e.message.contains("the live-traffic gate weighs web traffic"), "{kind}: {e}");
            assert_eq!(e.hint.as_deref(), Some("remove it from [processes.worker.rollout]"), "{kind}");
        }
    }
    // Without the keys a worker validates, with the (unused) defaults.
    let spec = parse_ok(
        "app = \"blog\"\n[processes.worker]\ncommand = \"celery -A blog worker\"\n[processes.worker.rollout]\nmax_surge = 1\n",
    );
    assert_eq!(spec.processes[0].rollout.canary, Canary::default());
}

#[test]
fn unknown_canary_keys_get_a_did_you_mean() {
    for (key, meant) in [
        ("canary_steps", "canary"),
        ("steps", "canary"),
        ("canary_hlod", "canary_hold"),
        ("canary_window", "canary_hold"),
        ("canary_min_request", "canary_min_requests"),
        ("canary_p95_ratio", "canary_max_p95_ratio"),
    ] {
        let e = parse_errs(&with_rollout(&format!("{key} = 1")));
        assert_eq!(e.len(), 1, "{key}: {e:?}");
        assert!(e[0].message.contains(&format!("unknown key `{key}` in [processes.web.rollout]")), "{}", e[0]);
        let hint = e[0].hint.as_deref().unwrap_or("");
        assert!(hint.starts_with(&format!("did you mean `{meant}`?")), "{key}: {hint}");
    }
}

#[test]
fn problems_in_several_keys_are_all_reported() {
    let e = parse_errs(&with_rollout(
        "canary = [\"50%\", \"5%\"]\ncanary_hold = \"1h\"\ncanary_max_5xx_increase = 2\ncanary_min_requests = 0",
    ));
    let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
    assert_eq!(lines, [5, 6, 7, 8], "{e:?}");
}

/// 1 to 5 distinct percents from 1 to 99, in rising order.
fn rising_steps() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::btree_set(1u8..=99, 1..=5).prop_map(|s| s.into_iter().collect())
}

proptest! {
    #[test]
    fn any_rising_list_round_trips(steps in rising_steps(), spaced in any::<bool>()) {
        let items: Vec<String> =
            steps.iter().map(|n| if spaced { format!("\" {n} % \"") } else { format!("\"{n}%\"") }).collect();
        let spec = parse_ok(&with_rollout(&format!("canary = [{}]", items.join(", "))));
        prop_assert_eq!(canary_of(&spec), Canary { steps: steps.clone(), ..Canary::default() });
    }

    #[test]
    fn any_list_that_does_not_rise_is_refused(mut steps in proptest::collection::vec(1u8..=99, 2..=5)) {
        // Force a step that is not above the one before it.
        let i = steps.len() - 1;
        steps[i] = steps[i - 1];
        let items: Vec<String> = steps.iter().map(|n| format!("\"{n}%\"")).collect();
        let e = parse_errs(&with_rollout(&format!("canary = [{}]", items.join(", "))));
        prop_assert!(e.iter().any(|e| e.message.contains("must rise")), "{:?}", e);
    }

    #[test]
    fn any_two_decimal_percentage_is_read_exactly(bp in 0u32..=10_000) {
        let text = format!("{}.{:02}%", bp / 100, bp % 100);
        let spec = parse_ok(&with_rollout(&format!("canary_max_5xx_increase = \"{text}\"")));
        prop_assert_eq!(canary_of(&spec).max_5xx_increase_bp, bp);
    }
}
