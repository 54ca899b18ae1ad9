//! `[database]`: the url (written, or read from nonstop's environment),
//! the variables it fills, and every refusal. No message may contain the
//! password.

use super::*;
use nonstop_core::database::UrlPart;
use std::collections::BTreeMap;
use std::path::Path;

const SECRET: &str = "Sup3rSecretPw";

fn parse_env(src: &str, env: &[(&str, &str)]) -> Result<AppSpec, SpecErrors> {
    let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    parse(src, Path::new("nonstop.toml"), &env)
}

fn parse_ok(src: &str) -> AppSpec {
    parse_env(src, &[]).unwrap_or_else(|e| panic!("expected a valid spec, got:\n{e}"))
}

/// The errors, checked for the password on the way.
#[track_caller]
fn errs_env(src: &str, env: &[(&str, &str)]) -> Vec<SpecError> {
    match parse_env(src, env) {
        Ok(spec) => panic!("expected errors, got {spec:#?}"),
        Err(e) => {
            let shown = format!("{e}\n{e:?}\n{}", serde_json::to_string(&e).unwrap());
            assert!(!shown.contains(SECRET), "the password leaked:\n{shown}");
            e.errors
        }
    }
}

#[track_caller]
fn one(src: &str) -> SpecError {
    one_env(src, &[])
}

#[track_caller]
fn one_env(src: &str, env: &[(&str, &str)]) -> SpecError {
    let mut e = errs_env(src, env);
    assert_eq!(e.len(), 1, "expected one error, got:\n{}", SpecErrors { errors: e.clone() });
    e.remove(0)
}

fn with(tables: &str) -> String {
    format!("app = \"blog\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n{tables}")
}

fn url_line(url: &str) -> String {
    with(&format!("[database]\nurl = \"{url}\"\n"))
}

#[test]
fn no_database_table_means_no_database() {
    assert!(parse_ok(&with("")).database.is_none());
}

#[test]
fn a_url_alone_fills_database_url() {
    let spec = parse_ok(&url_line(&format!("postgres://blog:{SECRET}@db.internal:5433/blog")));
    let db = spec.database.as_ref().unwrap();
    assert_eq!(db.url.expose(), format!("postgres://blog:{SECRET}@db.internal:5433/blog"));
    assert_eq!(db.env, BTreeMap::from([("DATABASE_URL".to_string(), UrlPart::Url)]));
    // A spec printed for debugging hides the password.
    let shown = format!("{spec:?}");
    assert!(!shown.contains(SECRET) && shown.contains("postgres://blog:***@db.internal:5433/blog"), "{shown}");
}

#[test]
fn the_url_can_come_from_nonstops_environment() {
    let url = format!("postgresql://blog:{SECRET}@10.0.0.5/blog_prod");
    let spec = parse_env(&url_line("${BLOG_DATABASE_URL}"), &[("BLOG_DATABASE_URL", &url)]).unwrap();
    assert_eq!(spec.database.unwrap().url.expose(), url);

    let e = one_env(&url_line("${BLOG_DATABASE_URL}"), &[]);
    assert_eq!(e.message, "`url` in [database] reads ${BLOG_DATABASE_URL}, which is not set in nonstop's environment");
    assert!(e.hint.unwrap().contains("export BLOG_DATABASE_URL="));
    assert_eq!((e.line, e.column), (5, 7));

    let e = one_env(&url_line("${BLOG_DATABASE_URL}"), &[("BLOG_DATABASE_URL", &format!("mysql://u:{SECRET}@h/d"))]);
    assert_eq!(
        e.message,
        "the value of $BLOG_DATABASE_URL (read by `url` in [database]) is not a usable PostgreSQL URL: the URL does not start with postgres:// or postgresql:// (its scheme is `mysql`)"
    );
    let e = one(&url_line("${1BAD}"));
    assert!(e.message.contains("not a valid variable name"), "{e}");
}

#[test]
fn a_map_gives_each_variable_its_part() {
    let spec = parse_ok(&with(&format!(
        "[database]\nurl = \"postgres://blog:{SECRET}@db/blog\"\n[database.env]\nPOSTGRES_NAME = \"name\"\nPOSTGRES_SERVICE_HOST = \"host\"\nPOSTGRES_PASSWORD = \"password\"\nPOSTGRES_PORT = \"port\"\nPOSTGRES_USER = \"user\"\nDATABASE_URL = \"url\"\n"
    )));
    let env = spec.database.unwrap().env;
    let parts: Vec<(&str, UrlPart)> = env.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        parts,
        [
            ("DATABASE_URL", UrlPart::Url),
            ("POSTGRES_NAME", UrlPart::Name),
            ("POSTGRES_PASSWORD", UrlPart::Password),
            ("POSTGRES_PORT", UrlPart::Port),
            ("POSTGRES_SERVICE_HOST", UrlPart::Host),
            ("POSTGRES_USER", UrlPart::User),
        ]
    );
}

#[test]
fn bad_urls_are_refused_without_showing_them() {
    for (url, says, hint) in [
        (format!("mysql://blog:{SECRET}@db/blog"), "its scheme is `mysql`", "PostgreSQL"),
        (format!("blog:{SECRET}@db/blog"), "does not start with postgres://", "PostgreSQL"),
        (format!("postgres://blog:{SECRET}@db:5432"), "names no database", "put the database's name after the host"),
        (format!("postgres://blog:{SECRET}@db:0/blog"), "port is not a number", "for example"),
        (format!("postgres://blog:{SECRET}@/blog"), "names no host", "for example"),
        (format!("postgres://blog:{SECRET}%@db/blog"), "bad percent-escape", "percent-encode"),
        (format!("postgres://blog:{SECRET}@a,b/blog"), "several hosts", "give one host"),
        (
            format!("postgres://blog:{SECRET}@db/blog?dbname=prod"),
            "sets `dbname` in its parameters",
            "by the name in the path",
        ),
    ] {
        let e = one(&url_line(&url));
        assert!(e.message.starts_with("`url` in [database] is not a usable PostgreSQL URL: "), "{e}");
        assert!(e.message.contains(says), "{url}: {e}");
        assert!(e.hint.as_deref().unwrap().contains(hint), "{url}: {e}");
        assert_eq!(e.line, 5);
    }
    let e = one(&with("[database]\n"));
    assert_eq!(e.message, "missing `url` in [database]");
}

#[test]
fn parts_must_be_known_and_get_suggestions() {
    for (part, suggestion) in [
        ("hostname", Some("host")),
        ("hots", Some("host")),
        ("dbname", Some("name")),
        ("pwd", Some("password")),
        ("xyzzy", None),
    ] {
        let e = one(&with(&format!(
            "[database]\nurl = \"postgres://db/blog\"\n[database.env]\nDATABASE_URL = \"url\"\nPOSTGRES_X = \"{part}\"\n"
        )));
        assert_eq!(
            e.message,
            format!(
                "`POSTGRES_X` in [database.env] must be one of url, name, host, port, user, password, not {part:?}"
            )
        );
        let hint = e.hint.unwrap();
        match suggestion {
            Some(s) => assert_eq!(hint, format!("did you mean POSTGRES_X = \"{s}\"?")),
            None => assert!(hint.contains("name the part of the url"), "{hint}"),
        }
        assert_eq!((e.line, e.column), (8, 14));
    }
    let e = one(&with("[database]\nurl = \"postgres://db/blog\"\n[database.env]\nPOSTGRES_NAME = 5\n"));
    assert_eq!(e.message, "`POSTGRES_NAME` in [database.env] must be a string, not an integer");
}

#[test]
fn the_mapping_must_point_at_the_database() {
    let e = one(&with("[database]\nurl = \"postgres://db/blog\"\n[database.env]\n"));
    assert!(e.message.starts_with("[database.env] is empty"), "{e}");
    let e = one(&with(
        "[database]\nurl = \"postgres://db/blog\"\n[database.env]\nPGHOST = \"host\"\nPGPASSWORD = \"password\"\n",
    ));
    assert!(e.message.contains("neither the `name` nor the `url`"), "{e}");
    assert!(e.hint.unwrap().contains("POSTGRES_NAME = \"name\""));
    let e = one(&with("[database]\nurl = \"postgres://db/blog\"\n[database.env]\n\"1X\" = \"name\"\n"));
    assert!(e.message.contains("invalid environment variable name"), "{e}");
    let e = one(&with("[database]\nurl = \"postgres://db/blog\"\n[database.env]\nNONSTOP_DB = \"name\"\n"));
    assert!(e.message.contains("is reserved"), "{e}");
}

#[test]
fn a_variable_filled_from_database_may_not_be_set_by_hand() {
    let src = "app = \"blog\"\n[env]\nDATABASE_URL = \"postgres://x/y\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n[processes.web.env]\nDATABASE_URL = \"postgres://x/z\"\n[database]\nurl = \"postgres://db/blog\"\n";
    let e = errs_env(src, &[]);
    assert_eq!(e.len(), 2, "{:?}", e);
    assert_eq!(e[0].message, "`DATABASE_URL` in [env] is also filled by [database] (with its url)");
    assert_eq!(e[0].line, 3);
    assert_eq!(e[1].message, "`DATABASE_URL` in [processes.web.env] is also filled by [database] (with its url)");
    assert!(e[0].hint.as_deref().unwrap().starts_with("remove it from [env]"));
}

#[test]
fn unknown_keys_and_wrong_shapes_are_refused() {
    let e = one(&with("[database]\nurl = \"postgres://db/blog\"\nulr = \"x\"\n"));
    assert_eq!(e.message, "unknown key `ulr` in [database]");
    assert!(e.hint.unwrap().starts_with("did you mean `url`?"));
    let e = one(&format!("database = \"postgres://blog:{SECRET}@db/blog\"\n{}", &with("")["app = \"blog\"\n".len()..])
        .replace("[processes.web]", "app = \"blog\"\n[processes.web]"));
    assert_eq!(e.message, "`database` must be a table, not a string");
}
