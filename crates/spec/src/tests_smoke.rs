//! `smoke` in `[processes.NAME.health]`: paths, tables, every refusal.

use super::*;
use nonstop_core::process::{SmokeCheck, StatusRange};
use std::path::Path;

fn parse_ok(src: &str) -> AppSpec {
    parse(src, Path::new("nonstop.toml"), &()).unwrap_or_else(|e| panic!("expected a valid spec, got:\n{e}"))
}

fn parse_errs(src: &str) -> Vec<SpecError> {
    match parse(src, Path::new("nonstop.toml"), &()) {
        Ok(spec) => panic!("expected errors, got {spec:#?}"),
        Err(e) => e.errors,
    }
}

fn with_smoke(smoke: &str) -> String {
    format!(
        "app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n[processes.web.health]\nsmoke = {smoke}\n"
    )
}

fn smoke_of(spec: &AppSpec) -> Vec<SmokeCheck> {
    spec.processes[0].health.as_ref().map(|h| h.smoke.clone()).unwrap_or_default()
}

fn sc(path: &str, min: u16, max: u16) -> SmokeCheck {
    SmokeCheck { path: path.into(), expect_status: StatusRange { min, max } }
}

#[test]
fn no_smoke_means_none() {
    let spec = parse_ok("app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n");
    assert!(smoke_of(&spec).is_empty());
}

#[test]
fn paths_and_tables_both_work() {
    let spec = parse_ok(&with_smoke(
        r#"["/", "/notes/?page=2", { path = "/login/", expect_status = 200 }, { path = "/old/", expect_status = "301-302" }]"#,
    ));
    assert_eq!(
        smoke_of(&spec),
        vec![sc("/", 200, 399), sc("/notes/?page=2", 200, 399), sc("/login/", 200, 200), sc("/old/", 301, 302)]
    );
}

#[test]
fn a_smoke_path_that_is_not_a_path_is_refused_with_the_fix() {
    for (path, says, fix) in [
        ("notes/", "must start with '/'", "smoke = [\"/notes/\"]"),
        ("https://notes.example.com/notes/", "is a URL", "smoke = [\"/notes/\"]"),
        ("//notes.example.com/", "is a URL", "smoke = [\"/\"]"),
        ("/my notes/", "spaces", "smoke = [\"/mynotes/\"]"),
        ("/notes/#top", "fragment", "smoke = [\"/notes/\"]"),
    ] {
        let e = parse_errs(&with_smoke(&format!("[\"{path}\"]")));
        assert_eq!(e.len(), 1, "{path}: {e:?}");
        assert_eq!(e[0].line, 5, "{path}");
        assert!(e[0].message.contains("`smoke` of [processes.web.health]"), "{path}: {}", e[0].message);
        assert!(e[0].message.contains(says), "{path}: {}", e[0].message);
        assert!(e[0].hint.as_deref().unwrap_or("").contains(fix), "{path}: {:?}", e[0].hint);
    }
}

#[test]
fn wrong_types_and_bad_statuses_are_refused() {
    let cases = [
        ("\"/\"", "must be a list of paths, not a string"),
        ("3", "must be a list of paths"),
        ("[1]", "must contain paths or tables"),
        ("[{ expect_status = 200 }]", "has no `path`"),
        ("[{ path = \"/\", status = 200 }]", "unknown key `status`"),
        ("[{ path = \"/\", expect_status = \"399-200\" }]", "empty range"),
        ("[{ path = \"/\", expect_status = 700 }]", "between 100 and 599"),
    ];
    for (value, says) in cases {
        let e = parse_errs(&with_smoke(value));
        assert!(!e.is_empty(), "{value}");
        assert!(e.iter().any(|e| e.message.contains(says)), "{value}: {e:?}");
    }
}

#[test]
fn too_many_smoke_paths_are_refused() {
    let many: Vec<String> = (0..21).map(|i| format!("\"/p{i}/\"")).collect();
    let e = parse_errs(&with_smoke(&format!("[{}]", many.join(", "))));
    assert!(e[0].message.contains("lists 21 paths; at most 20"), "{e:?}");
}
