//! `[static]` / `[[static]]`: defaults, several mounts, every refusal.

use super::*;
use nonstop_core::process::StaticMount;
use std::path::{Path, PathBuf};

fn parse_ok(src: &str) -> AppSpec {
    parse(src, Path::new("nonstop.toml"), &()).unwrap_or_else(|e| panic!("expected a valid spec, got:\n{e}"))
}

fn parse_errs(src: &str) -> Vec<SpecError> {
    match parse(src, Path::new("nonstop.toml"), &()) {
        Ok(spec) => panic!("expected errors, got {spec:#?}"),
        Err(e) => e.errors,
    }
}

fn with(tables: &str) -> String {
    format!("app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n{tables}")
}

fn mount(url: &str, dir: &str) -> StaticMount {
    StaticMount { url: url.into(), dir: PathBuf::from(dir) }
}

#[test]
fn no_static_table_means_no_mounts() {
    assert!(parse_ok(&with("")).statics.is_empty());
}

#[test]
fn an_empty_static_table_takes_the_named_defaults() {
    let spec = parse_ok(&with("[static]\n"));
    assert_eq!(spec.statics, vec![mount(DEFAULT_STATIC_URL, DEFAULT_STATIC_DIR)]);
    assert_eq!((DEFAULT_STATIC_URL, DEFAULT_STATIC_DIR), ("/static/", "staticfiles"));
}

#[test]
fn one_table_and_a_list_of_tables_both_work() {
    let one = parse_ok(&with("[static]\nurl = \"/assets/\"\ndir = \"public/assets\"\n"));
    assert_eq!(one.statics, vec![mount("/assets/", "public/assets")]);
    let two = parse_ok(&with(
        "[[static]]\nurl = \"/static/\"\ndir = \"./staticfiles/\"\n[[static]]\nurl = \"/packs/v1/\"\ndir = \"public/packs\"\n",
    ));
    assert_eq!(two.statics, vec![mount("/static/", "staticfiles"), mount("/packs/v1/", "public/packs")]);
}

#[test]
fn a_bad_url_is_refused_with_its_location_and_the_fix() {
    for (url, says) in [
        ("static/", "must start and end with '/'"),
        ("/static", "must start and end with '/'"),
        ("/", "cannot be \"/\""),
        ("/st atic/", "contains ' '"),
        ("/static%2f/", "contains '%'"),
        ("/a//b/", "empty, '.' or '..' segment"),
        ("/a/../b/", "empty, '.' or '..' segment"),
        ("/a\\\\b/", "contains '\\\\'"),
    ] {
        let e = parse_errs(&with(&format!("[static]\nurl = \"{url}\"\n")));
        assert_eq!(e.len(), 1, "{url}: {e:?}");
        assert_eq!(e[0].line, 5, "{url}");
        assert!(e[0].message.contains("`url` in [static]") && e[0].message.contains(says), "{url}: {}", e[0].message);
        assert!(e[0].hint.as_deref().unwrap_or("").contains("url = \"/static/\""), "{url}");
    }
}

#[test]
fn a_bad_dir_is_refused_with_its_location_and_the_fix() {
    for (dir, says) in [
        ("", "is empty"),
        ("/srv/static", "is absolute"),
        ("../shared/static", "contains '..'"),
        ("static/../../etc", "contains '..'"),
        (".", "is the release itself"),
        ("./", "is the release itself"),
    ] {
        let e = parse_errs(&with(&format!("[static]\ndir = \"{dir}\"\n")));
        assert_eq!(e.len(), 1, "{dir}: {e:?}");
        assert!(e[0].message.contains("`dir` in [static]") && e[0].message.contains(says), "{dir}: {}", e[0].message);
        assert!(e[0].hint.as_deref().unwrap_or("").contains("collectstatic"), "{dir}");
    }
}

#[test]
fn a_url_mounted_twice_is_refused() {
    let e = parse_errs(&with("[[static]]\ndir = \"a\"\n[[static]]\nurl = \"/static/\"\ndir = \"b\"\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].message.contains("\"/static/\" is mounted twice"), "{}", e[0].message);
    assert_eq!(e[0].line, 7);
}

#[test]
fn unknown_keys_and_wrong_types_are_reported_together() {
    let e = parse_errs(&with("[static]\nurl = 3\ndri = \"x\"\n"));
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e.iter().any(|e| e.message.contains("unknown key `dri` in [static]")
        && e.hint.as_deref().unwrap_or("").contains("did you mean `dir`")));
    assert!(e.iter().any(|e| e.message.contains("`url` in [static] must be a string")));
    let e = parse_errs("app = \"blog\"\nstatic = \"/static/\"\n[processes.web]\ncommand = \"x\"\n");
    assert!(e[0].message.contains("must be a table ([static]) or a list of tables ([[static]])"), "{e:?}");
}

#[test]
fn the_mounts_survive_a_store_round_trip_and_old_records_read_as_none() {
    let spec = parse_ok(&with("[static]\n"));
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<AppSpec>(&json).unwrap(), spec);
    let without = parse_ok(&with(""));
    let json = serde_json::to_string(&without).unwrap();
    assert!(!json.contains("statics"), "{json}");
}
