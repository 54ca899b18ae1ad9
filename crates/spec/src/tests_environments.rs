//! Environments: `environment`, `[base]` and `[environments.NAME]`; how an
//! environment's spec is resolved; which one a command uses; and every
//! refusal, located. Files without environments parse as they always did.

use super::*;
use nonstop_core::database::UrlPart;
use nonstop_core::environment::environment_name;
use nonstop_core::ids::ProcessName;
use nonstop_core::process::{ProcessSpec, Quantity};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const FILE: &str = "nonstop.toml";
const SECRET: &str = "Sup3rSecretPw";

fn set_env(src: &str, env: &[(&str, &str)]) -> Result<SpecSet, SpecErrors> {
    let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    parse_set(src, Path::new(FILE), &env)
}

#[track_caller]
fn set(src: &str) -> SpecSet {
    set_env(src, &[]).unwrap_or_else(|e| panic!("expected a valid spec, got:\n{e}\n---\n{src}"))
}

/// The errors, checked for the password on the way.
#[track_caller]
fn errs(src: &str) -> Vec<SpecError> {
    match set_env(src, &[]) {
        Ok(s) => panic!("expected errors, got {s:#?}"),
        Err(e) => {
            let shown = format!("{e}\n{e:?}\n{}", serde_json::to_string(&e).unwrap());
            assert!(!shown.contains(SECRET), "the password leaked:\n{shown}");
            e.errors
        }
    }
}

#[track_caller]
fn one(src: &str) -> SpecError {
    let mut e = errs(src);
    assert_eq!(e.len(), 1, "expected one error, got:\n{}", SpecErrors { errors: e.clone() });
    e.remove(0)
}

#[track_caller]
fn assert_err(e: &SpecError, line: usize, column: usize, message: &str, hint: &str) {
    assert_eq!((e.line, e.column), (line, column), "location of: {e}");
    assert!(e.message.contains(message), "message {:?} lacks {message:?}", e.message);
    let h = e.hint.as_deref().unwrap_or("");
    assert!(h.contains(hint), "hint {h:?} lacks {hint:?}");
}

fn env(name: &str) -> EnvironmentId {
    environment_name(name).unwrap()
}

#[track_caller]
fn resolve(set: &SpecSet, name: &str) -> AppSpec {
    set.resolve(&env(name)).unwrap_or_else(|e| panic!("{e}"))
}

fn process<'a>(spec: &'a AppSpec, name: &str) -> &'a ProcessSpec {
    spec.process(&ProcessName::new(name).unwrap()).unwrap()
}

/// A web process and a worker (lines 1-7), then `tables` from line 8.
fn app(tables: &str) -> String {
    format!(
        "app = \"blog\"\n[env]\nMODE = \"base\"\n[processes.web]\ncommand = \"gunicorn blog.wsgi\"\n[processes.worker]\ncommand = \"celery worker\"\n{tables}"
    )
}

// ------------------------------------------------ files without environments

/// The spec JSON without the fields environments (and, since, the
/// autoscaling keys of the full example) added.
fn without_environment_fields(spec: &AppSpec) -> serde_json::Value {
    let mut json = serde_json::to_value(spec).unwrap();
    let map = json.as_object_mut().unwrap();
    for key in ["hosts", "default_host", "protected", "base", "metrics"] {
        map.remove(key);
    }
    for process in map["processes"].as_array_mut().unwrap() {
        let process = process.as_object_mut().unwrap();
        process.remove("autoscale");
        process.remove("queue");
    }
    json
}

fn golden(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(format!("{name}.spec.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_example_specs_parse_as_they_did_before_environments() {
    // testdata/*.spec.json: the examples parsed by the code before
    // environments existed.
    for name in ["hello", "django"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name).join(FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let spec = parse(&text, Path::new(FILE), &()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(without_environment_fields(&spec), golden(name), "{name}");
        // Its one environment, `default`, answers every host, as before.
        assert_eq!(spec.hosts, [format!("default.{name_app}.localhost", name_app = spec.app)]);
        assert!(spec.default_host && !spec.protected);
        // And the spec a daemon stored before environments reads back as
        // this one, but for the default host it now lists.
        let stored: AppSpec = serde_json::from_value(golden(name)).unwrap();
        assert_eq!(AppSpec { hosts: spec.hosts.clone(), ..stored }, spec, "{name}");
        let s = set(&text);
        assert_eq!(s.environments(), [env("default")]);
        assert_eq!((s.default_environment(), s.catch_all()), (&env("default"), Some(&env("default"))));
    }
}

#[test]
fn the_full_example_keeps_its_spec_for_its_default_environment() {
    // The full example gained environments; its default one (production,
    // without overrides of its processes) is the spec it always was.
    let spec = parse(crate::tests::FULL, Path::new(FILE), &()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(without_environment_fields(&spec), golden("full"));
    assert_eq!(spec.hosts, ["blog.example.com", "www.blog.example.com"]);
    assert!(spec.default_host && spec.protected);
}

// ------------------------------------------------------------- every key

#[test]
fn every_key_of_an_environment_is_read() {
    let s = set(crate::tests::FULL);
    assert_eq!(s.default_environment(), &env("production"));
    assert_eq!(s.environments(), [env("production"), env("staging")]);
    assert_eq!(s.catch_all(), Some(&env("production")));
    assert!(s.is_protected(&env("production")) && !s.is_protected(&env("staging")));

    let base = s.base_services().unwrap();
    let pg = base.postgres.as_ref().unwrap();
    assert_eq!((pg.host(), pg.port(), pg.database(), pg.user()), ("127.0.0.1", 5432, "postgres", Some("admin")));
    let redis = base.redis.as_ref().unwrap();
    assert_eq!((redis.host(), redis.port()), ("127.0.0.1", 6379));

    let production = resolve(&s, "production");
    let staging = resolve(&s, "staging");
    // Every environment's spec carries [base] to the daemon.
    assert_eq!(staging.base.as_ref(), Some(base));
    assert_eq!(resolve(&s, "pr-7").base.as_ref(), Some(base));
    assert_eq!(staging.hosts, ["staging.blog.example.com", "*.review.blog.example.com"]);
    assert!(!staging.default_host && !staging.protected);
    assert_eq!(staging.env.get("DEBUG").map(String::as_str), Some("true"));
    assert_eq!(production.env.get("DEBUG").map(String::as_str), Some("false"));

    let (web, base_web) = (process(&staging, "web"), process(&production, "web"));
    assert_eq!((web.count, base_web.count), (1, 2));
    assert_eq!(web.env.get("WEB_CONCURRENCY").map(String::as_str), Some("1"));
    let (h, base_h) = (web.health.as_ref().unwrap(), base_web.health.as_ref().unwrap());
    assert_eq!((h.interval, base_h.interval), (Duration::from_secs(1), Duration::from_secs(2)));
    // The other [health] keys are the file's.
    assert_eq!(h.path, "/health/");
    assert_eq!(h.timeout, Duration::from_millis(1500));
    assert_eq!(h.smoke, base_h.smoke);
    let (a, base_a) = (web.autoscale.as_ref().unwrap(), base_web.autoscale.as_ref().unwrap());
    assert_eq!((a.min, a.max, base_a.min, base_a.max), (1, 2, 2, 8));
    // The other [autoscale] keys are the file's.
    assert_eq!((&a.targets, a.max_step, a.scale_in_window), (&base_a.targets, base_a.max_step, base_a.scale_in_window));
    assert!(web.rollout.canary.steps.is_empty());
    assert_eq!(base_web.rollout.canary.steps, [10, 50]);
    assert_eq!(web.rollout.max_surge, Quantity::Percent(50));
    assert_eq!(web.rollout.canary.hold, Duration::from_secs(30));
    // Everything else about the process is the file's.
    assert_eq!(
        ProcessSpec {
            count: 2,
            health: None,
            rollout: base_web.rollout.clone(),
            autoscale: base_web.autoscale.clone(),
            env: BTreeMap::new(),
            ..web.clone()
        },
        ProcessSpec { health: None, env: BTreeMap::new(), ..base_web.clone() }
    );
    assert_eq!(&staging.processes[1..], &production.processes[1..]);

    let db = staging.database.as_ref().unwrap();
    assert_eq!(db.url.database(), "blog_staging");
    assert_eq!(db.env, BTreeMap::from([("POSTGRES_NAME".to_string(), UrlPart::Name)]));
    assert_eq!(production.database.as_ref().unwrap().url.database(), "blog");
    // What no environment changes is the same in all.
    for spec in [&staging, &production] {
        assert_eq!(
            (&spec.app, &spec.proxy, &spec.build, &spec.release, &spec.statics),
            (&s.base().app, &s.base().proxy, &s.base().build, &s.base().release, &s.base().statics)
        );
    }
}

#[test]
fn every_health_and_rollout_key_can_differ_by_environment() {
    // Every key set in the file and, differently, in the environment: the
    // environment's wins for each one (a key forgotten by the merge would
    // keep the file's value).
    let src = app(r#"[processes.web.health]
path = "/a/"
interval = "1s"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2
expect_status = 200
host = "a.example.com"
smoke = ["/a/"]
[processes.web.rollout]
max_surge = 1
max_unavailable = 0
health_timeout = "60s"
canary = ["5%"]
canary_hold = "10s"
canary_max_5xx_increase = "1%"
canary_max_p95_ratio = 2.0
canary_p95_slack = "100ms"
canary_min_requests = 20
[environments.staging.processes.web]
count = 4
[environments.staging.processes.web.health]
path = "/b/"
interval = "2s"
timeout = "2s"
healthy_threshold = 3
unhealthy_threshold = 3
expect_status = "200-299"
host = "b.example.com"
smoke = ["/b/"]
[environments.staging.processes.web.rollout]
max_surge = "50%"
max_unavailable = 1
health_timeout = "90s"
canary = ["10%", "20%"]
canary_hold = "20s"
canary_max_5xx_increase = "2%"
canary_max_p95_ratio = 3.0
canary_p95_slack = "200ms"
canary_min_requests = 30
"#);
    let s = set(&src);
    let (base, staging) = (resolve(&s, "default"), resolve(&s, "staging"));
    let (b, o) = (process(&base, "web"), process(&staging, "web"));
    let (bh, oh) = (b.health.as_ref().unwrap(), o.health.as_ref().unwrap());
    assert_eq!(o.count, 4);
    assert_eq!((oh.path.as_str(), oh.interval, oh.timeout), ("/b/", Duration::from_secs(2), Duration::from_secs(2)));
    assert_eq!((oh.healthy_threshold, oh.unhealthy_threshold), (3, 3));
    assert_eq!((oh.expect_status.min, oh.expect_status.max), (200, 299));
    assert_eq!((oh.host.as_deref(), oh.smoke[0].path.as_str()), (Some("b.example.com"), "/b/"));
    let (r, c) = (&o.rollout, &o.rollout.canary);
    assert_eq!((r.max_surge, r.max_unavailable), (Quantity::Percent(50), Quantity::Count(1)));
    assert_eq!(r.health_timeout, Duration::from_secs(90));
    assert_eq!(
        (c.steps.as_slice(), c.hold, c.p95_slack),
        (&[10, 20][..], Duration::from_secs(20), Duration::from_millis(200))
    );
    assert_eq!((c.max_5xx_increase_bp, c.max_p95_ratio_pct, c.min_requests), (200, 300, 30));
    // Field by field, nothing of the environment's is the file's.
    assert_ne!(bh.path, oh.path);
    assert_ne!(format!("{:?}", b.rollout), format!("{:?}", o.rollout));
}

// ---------------------------------------------------------------- merging

#[test]
fn variables_merge_file_then_environment_then_its_process() {
    let src = app(r#"[processes.web.env]
MODE = "web"
WEB_ONLY = "w"
[processes.worker.env]
QUEUE = "default"
[environments.staging.env]
MODE = "staging"
EXTRA = ""
[environments.staging.processes.worker.env]
QUEUE = "staging"
MODE = "worker-staging"
"#);
    let s = set(&src);
    let staging = resolve(&s, "staging");
    assert_eq!(staging.env.get("MODE").map(String::as_str), Some("staging"));
    // An empty value is a value: the variable is set, to "".
    assert_eq!(staging.env.get("EXTRA").map(String::as_str), Some(""));
    // The environment's value wins over the process's own...
    let web = process(&staging, "web");
    assert_eq!(web.env.get("MODE").map(String::as_str), Some("staging"));
    assert_eq!(web.env.get("WEB_ONLY").map(String::as_str), Some("w"));
    // ...and the environment's process table over everything.
    let worker = process(&staging, "worker");
    assert_eq!(worker.env.get("QUEUE").map(String::as_str), Some("staging"));
    assert_eq!(worker.env.get("MODE").map(String::as_str), Some("worker-staging"));
    // Other environments see the file.
    let other = resolve(&s, "default");
    assert_eq!(process(&other, "web").env.get("MODE").map(String::as_str), Some("web"));
    assert_eq!(other.env.get("EXTRA"), None);
}

#[test]
fn a_database_of_an_environment_merges_key_by_key() {
    let file =
        format!("[database]\nurl = \"postgres://blog:{SECRET}@db/blog\"\n[database.env]\nPOSTGRES_NAME = \"name\"\n");
    // Its url only: the file's mapping.
    let s = set(&app(&format!("{file}[environments.staging.database]\nurl = \"postgres://db/blog_staging\"\n")));
    let db = resolve(&s, "staging").database.unwrap();
    assert_eq!((db.url.database(), db.env.len()), ("blog_staging", 1));
    assert_eq!(db.env.get("POSTGRES_NAME"), Some(&UrlPart::Name));
    // Its mapping only: the file's url.
    let s = set(&app(&format!("{file}[environments.staging.database.env]\nDB = \"url\"\n")));
    let db = resolve(&s, "staging").database.unwrap();
    assert_eq!((db.url.database(), db.env.get("DB")), ("blog", Some(&UrlPart::Url)));
    // A database for one environment only.
    let s = set(&app("[environments.staging.database]\nurl = \"postgres://db/blog_staging\"\n"));
    assert!(resolve(&s, "default").database.is_none());
    assert_eq!(resolve(&s, "staging").database.unwrap().env.get("DATABASE_URL"), Some(&UrlPart::Url));
}

// ---------------------------------------------------------------- defaults

#[test]
fn environments_without_hosts_answer_on_their_localhost_name() {
    let s = set(&app("[environments.staging]\n[environments.review]\nhosts = [\"*.review.example.com\"]\n"));
    assert_eq!(resolve(&s, "staging").hosts, ["staging.blog.localhost"]);
    assert_eq!(resolve(&s, "review").hosts, ["*.review.example.com"]);
    assert_eq!(resolve(&s, "pr-7").hosts, ["pr-7.blog.localhost"]);
    // `hosts = []`: no host of its own.
    let s = set(&app("[environments.worker-only]\nhosts = []\n"));
    assert!(resolve(&s, "worker-only").hosts.is_empty());
    assert_eq!(s.claimed_by("staging.blog.localhost"), None);
}

#[test]
fn the_default_environment_answers_unclaimed_hosts_unless_another_says_so() {
    // Nothing said: the default environment.
    let s = set(&app("[environments.staging]\n"));
    assert_eq!(s.environments(), [env("default"), env("staging")]);
    assert_eq!(s.catch_all(), Some(&env("default")));
    assert!(resolve(&s, "default").default_host && !resolve(&s, "staging").default_host);
    // `default = true` elsewhere moves it.
    let s = set(&format!("environment = \"production\"\n{}", app("[environments.staging]\ndefault = true\n")));
    assert_eq!(s.catch_all(), Some(&env("staging")));
    assert!(!resolve(&s, "production").default_host && resolve(&s, "staging").default_host);
    // `default = false` on the default environment: nobody answers them.
    let s = set(&format!("environment = \"production\"\n{}", app("[environments.production]\ndefault = false\n")));
    assert_eq!(s.catch_all(), None);
    assert!(!resolve(&s, "production").default_host);
    // An ad hoc environment never does.
    assert!(!resolve(&s, "pr-1").default_host);
}

#[test]
fn an_environment_the_file_does_not_name_gets_the_base() {
    let s = set(&app("[environments.staging.processes.web]\ncount = 3\n"));
    let ad_hoc = resolve(&s, "pr-42");
    assert_eq!(AppSpec { hosts: Vec::new(), ..ad_hoc.clone() }, *s.base());
    assert_eq!(ad_hoc.hosts, ["pr-42.blog.localhost"]);
    assert!(!s.is_declared(&env("pr-42")) && s.is_declared(&env("staging")) && s.is_declared(&env("default")));
}

#[test]
fn hosts_are_claimed_by_exact_name_before_wildcards() {
    let s = set(&app(
        "[environments.review]\nhosts = [\"*.review.example.com\"]\n[environments.pr-1]\nhosts = [\"pr-1.review.example.com\"]\n",
    ));
    assert_eq!(s.claimed_by("pr-1.review.example.com"), Some(&env("pr-1")));
    assert_eq!(s.claimed_by("pr-2.review.example.com"), Some(&env("review")));
    assert_eq!(s.claimed_by("default.blog.localhost"), Some(&env("default")));
    assert_eq!(s.claimed_by("elsewhere.example.com"), None);
}

// ---------------------------------------------------------------- choose

#[test]
fn the_flag_wins_over_nonstop_env_which_wins_over_the_file() {
    let s = set(&format!("environment = \"production\"\n{}", app("[environments.staging]\n")));
    let chosen = |flag, var| s.choose(flag, var).unwrap();
    assert_eq!(
        chosen(None, None),
        Choice { environment: env("production"), declared: true, source: ChoiceSource::Spec }
    );
    assert_eq!(
        chosen(None, Some("staging")),
        Choice { environment: env("staging"), declared: true, source: ChoiceSource::Variable }
    );
    assert_eq!(
        chosen(Some("pr-7"), Some("staging")),
        Choice { environment: env("pr-7"), declared: false, source: ChoiceSource::Flag }
    );
    // An empty NONSTOP_ENV is unset; spaces around a name are ignored.
    assert_eq!(chosen(None, Some("  ")).source, ChoiceSource::Spec);
    assert_eq!(chosen(Some(" staging\n"), None).environment, env("staging"));
    // A file without environments: `default`.
    assert_eq!(set(&app("")).choose(None, None).unwrap().environment, env("default"));
}

#[test]
fn a_bad_name_from_the_flag_or_the_variable_is_refused_with_a_fix() {
    let s = set(&app(""));
    let e = s.choose(Some("Staging_2"), None).unwrap_err();
    assert_eq!(e.given_by, ChoiceSource::Flag);
    assert_eq!(e.error.suggestion, "staging-2");
    assert_eq!(e.to_string(), "-e/--env names an invalid environment");
    let source = std::error::Error::source(&e).unwrap().to_string();
    assert!(source.contains("\"Staging_2\"") && source.contains("(for example \"staging-2\")"), "{source}");
    let e = s.choose(None, Some("a-very-long-environment-name-for-a-host")).unwrap_err();
    assert_eq!(e.given_by, ChoiceSource::Variable);
    assert_eq!(e.to_string(), "NONSTOP_ENV names an invalid environment");
    assert!(s.choose(Some(""), Some("staging")).is_err(), "an empty -e is a mistake, not a default");
}

// ---------------------------------------------------------------- errors

#[test]
fn environment_names_are_dns_labels_of_at_most_32_characters() {
    let e = one(&app("[environments.Staging_2]\n"));
    assert_err(&e, 8, 15, "invalid environment name Staging_2 in [environments]", "[environments.staging-2]");
    let e = one(&app(&format!("[environments.{}]\n", "a".repeat(33))));
    assert_err(&e, 8, 15, "1 to 32 characters", &format!("[environments.{}]", "a".repeat(32)));
    let e = one(&format!("environment = \"Prod\"\n{}", app("")));
    assert_err(&e, 1, 15, "`environment` is not a valid environment name (\"Prod\")", "environment = \"prod\"");
}

#[test]
fn the_default_environment_is_checked_for_typos() {
    let e = one(&format!("environment = \"prodution\"\n{}", app("[environments.production]\n")));
    assert_err(
        &e,
        1,
        15,
        "`environment` names \"prodution\", which no [environments.NAME] table declares",
        "did you mean environment = \"production\"?",
    );
    // A name far from every table is an environment without overrides.
    let s = set(&format!("environment = \"live\"\n{}", app("[environments.staging]\n")));
    assert_eq!(s.environments(), [env("live"), env("staging")]);
    let e = one(&format!("{}[environment.staging]\nhosts = []\n", app("")));
    assert_err(&e, 8, 2, "`environment` must be a string", "[environments.NAME] (plural)");
}

#[test]
fn bad_hosts_are_refused_with_the_fixed_host() {
    for (host, message, hint) in [
        ("https://staging.example.com/", "it is a URL", "hosts = [\"staging.example.com\"]"),
        ("staging.example.com:8443", "it has a port", "hosts = [\"staging.example.com\"]"),
        ("Staging.Example.com", "it has upper-case letters", "hosts = [\"staging.example.com\"]"),
        ("staging.example.com.", "it ends with a dot", "hosts = [\"staging.example.com\"]"),
        ("a.*.example.com", "a wildcard is `*.` in front", "*.review.example.com"),
        (
            "under_score.example.com",
            "host names are labels of lowercase letters",
            "hosts = [\"under-score.example.com\"]",
        ),
        ("", "it is empty", "for example"),
    ] {
        let e = one(&app(&format!("[environments.staging]\nhosts = [\"ok.example.com\", \"{host}\"]\n")));
        assert_err(&e, 9, 28, &format!("invalid host {host:?} in `hosts` of [environments.staging]: {message}"), hint);
    }
    let e = one(&app("[environments.staging]\nhosts = [\"a.example.com\", \"a.example.com\"]\n"));
    assert_err(&e, 9, 27, "host \"a.example.com\" is listed twice in `hosts` of [environments.staging]", "remove one");
    let e = one(&app("[environments.staging]\nhosts = \"a.example.com\"\n"));
    assert_err(
        &e,
        9,
        9,
        "`hosts` in [environments.staging] must be a list of strings, not a string",
        "hosts = [\"a.example.com\"]",
    );
}

#[test]
fn two_environments_may_not_claim_one_host() {
    let src = app(
        "[environments.production]\nhosts = [\"example.com\"]\n[environments.staging]\nhosts = [\"staging.example.com\", \"example.com\"]\n",
    );
    let e = errs(&src);
    assert_eq!(e.len(), 2, "{e:?}");
    // One error at each place, each naming both.
    for (e, (line, column)) in e.iter().zip([(9, 10), (11, 33)]) {
        assert_err(
            e,
            line,
            column,
            "host \"example.com\" is claimed by two environments, production and staging",
            "remove it from all but one",
        );
    }
    // Another environment's default host.
    let e = one(&app("[environments.staging]\n[environments.qa]\nhosts = [\"staging.blog.localhost\"]\n"));
    assert_err(&e, 10, 10, "claimed by two environments, staging (its default host) and qa", "remove it");
    // A wildcard and a host it matches: the exact host wins, no conflict.
    set(&app(
        "[environments.review]\nhosts = [\"*.example.com\"]\n[environments.production]\nhosts = [\"www.example.com\"]\n",
    ));
}

#[test]
fn only_one_environment_answers_the_unclaimed_hosts() {
    let src = app("[environments.a]\ndefault = true\n[environments.b]\n[environments.c]\ndefault = true\n");
    let e = errs(&src);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_err(
        &e[0],
        9,
        11,
        "`default = true` in [environments.a]: 2 environments answer the hosts no environment claims (a, c)",
        "keep `default = true` in one",
    );
    assert_eq!((e[1].line, e[1].column), (12, 11));
    let e = one(&app("[environments.a]\ndefault = \"true\"\n"));
    assert_err(&e, 9, 11, "`default` in [environments.a] must be a boolean, not a string", "default = true");
}

#[test]
fn overrides_of_a_process_that_does_not_exist_get_a_suggestion() {
    let e = one(&app("[environments.staging.processes.wbe]\ncount = 2\n"));
    assert_err(
        &e,
        8,
        33,
        "[environments.staging.processes.wbe] overrides the process wbe, which the file does not define",
        "did you mean `web`? an environment changes the settings of the processes of [processes.NAME]: web, worker",
    );
}

#[test]
fn keys_an_environment_cannot_set_say_where_they_belong() {
    for (tables, line, column, message, hint) in [
        (
            "[environments.staging]\ncount = 1\n",
            9,
            1,
            "unknown key `count` in [environments.staging]",
            "a process's settings go in its own table, for example:\n[environments.staging.processes.web]\ncount = 1",
        ),
        (
            "[environments.staging.web]\ncount = 1\n",
            8,
            23,
            "unknown key `web` in [environments.staging]",
            "a process's settings go in [environments.staging.processes.web]",
        ),
        (
            "[environments.staging.proxy]\nlisten = \"127.0.0.1:9000\"\n",
            8,
            23,
            "unknown key `proxy` in [environments.staging]",
            "`proxy` is the same in every environment; an environment sets only: hosts, default, protected, env, processes, database",
        ),
        ("[environments.staging]\nhost = [\"a.example.com\"]\n", 9, 1, "unknown key `host`", "did you mean `hosts`?"),
        (
            "[environments.staging.processes.web]\ncommand = \"gunicorn other.wsgi\"\n",
            9,
            1,
            "unknown key `command` in [environments.staging.processes.web]",
            "`command` is the same in every environment (each runs the same release); an environment may change only: count, env, health, rollout",
        ),
        (
            "[environments.staging.processes.web]\ncuont = 1\n",
            9,
            1,
            "unknown key `cuont` in [environments.staging.processes.web]",
            "did you mean `count`?",
        ),
        ("[base]\npostgress = \"postgres://h/\"\n", 9, 1, "unknown key `postgress` in [base]", "did you mean `postgres`?"),
    ] {
        let e = one(&app(tables));
        assert_err(&e, line, column, message, hint);
    }
    let e = one(&app("[environments]\nstaging = 1\n"));
    assert_err(&e, 9, 11, "`staging` in [environments] must be a table, not an integer", "[environments.staging]");
    let e = one(&format!("environments = \"staging\"\n{}", app("")));
    assert_err(&e, 1, 16, "`environments` must be a table, not a string", "[environments.staging]");
}

#[test]
fn an_environments_values_are_checked_with_the_files_rules() {
    let e = one(&app("[environments.staging.processes.web]\ncount = -1\n"));
    assert_err(&e, 9, 9, "`count` in [environments.staging.processes.web] must be at least 0, not -1", "count = 1");
    let src = "app = \"blog\"\n[processes.beat]\ncommand = \"celery beat\"\nkind = \"singleton\"\n[environments.staging.processes.beat]\ncount = 2\n";
    let e = one(src);
    assert_err(
        &e,
        6,
        9,
        "`count` in [environments.staging.processes.beat] is 2, but a singleton runs 0 or 1",
        "count = 1",
    );
    let e = one(&app("[environments.staging.processes.worker.health]\npath = \"/\"\n"));
    assert_err(&e, 8, 1, "[environments.staging.processes.worker.health] applies only to web processes", "ready_after");
    let e = one(&app("[environments.staging.processes.web.rollout]\nmax_surge = \"2\"\n"));
    assert_err(&e, 9, 13, "`max_surge` in [environments.staging.processes.web.rollout] is not a count", "\"2%\"");
    let e = one(&app("[environments.staging.env]\nPORT = \"1\"\n"));
    assert_err(&e, 9, 1, "`PORT` in [environments.staging.env] is reserved", "$PORT");
    let e = one(&app("[environments.staging.processes.web.env]\n\"1X\" = \"1\"\n"));
    assert_err(&e, 9, 1, "invalid environment variable name 1X in [environments.staging.processes.web.env]", "_1X");
}

#[test]
fn a_rule_across_the_file_and_an_environment_is_checked() {
    // The file's health_timeout fits the file's checks, not the slower
    // ones of staging.
    let src = app(
        "[processes.web.rollout]\nhealth_timeout = \"10s\"\n[environments.staging.processes.web.health]\ninterval = \"5s\"\nhealthy_threshold = 3\n",
    );
    let e = one(&src);
    assert_err(
        &e,
        9,
        18,
        "`health_timeout` in [environments.staging.processes.web.rollout] (10s) is shorter than 3 health checks 5s apart (15s)",
        "raise health_timeout to at least \"15s\"",
    );
}

#[test]
fn a_problem_of_the_file_is_reported_once_not_per_environment() {
    let src = app(
        "[processes.web.health]\ninterval = \"fast\"\n[environments.staging.processes.web]\ncount = 2\n[environments.qa.processes.web]\ncount = 3\n",
    );
    let e = one(&src);
    assert_err(&e, 9, 12, "`interval` in [processes.web.health] is not a valid duration", "durations are");
}

#[test]
fn an_environments_database_is_checked_like_the_files() {
    let e = one(&app("[environments.staging.database]\nurl = \"mysql://db/blog\"\n"));
    assert_err(&e, 9, 7, "`url` in [environments.staging.database] is not a usable PostgreSQL URL", "PostgreSQL");
    let e = one(&app("[environments.staging.database.env]\nDB = \"url\"\n"));
    assert_err(&e, 8, 23, "missing `url` in [environments.staging.database]", "url = \"postgres://");
    let e = one(&app("[environments.staging.database]\nurl = \"postgres://db/b\"\n[environments.staging.database.env]\nDB = \"hostname\"\n"));
    assert_err(&e, 11, 6, "`DB` in [environments.staging.database.env] must be one of", "did you mean DB = \"host\"?");
    // A variable the database fills may not be set by hand, in the file or
    // in the environment.
    let e = errs(&app("[environments.staging.env]\nMODE = \"x\"\n[environments.staging.database]\nurl = \"postgres://db/b\"\n[environments.staging.database.env]\nMODE = \"name\"\n"));
    assert_eq!(e.len(), 2, "{e:?}");
    assert_err(
        &e[0],
        3,
        1,
        "`MODE` in [env] is also filled by [environments.staging.database] (with its name)",
        "remove it from [env]",
    );
    assert_err(
        &e[1],
        9,
        1,
        "`MODE` in [environments.staging.env] is also filled by [environments.staging.database] (with its name)",
        "remove it from [environments.staging.env]",
    );
    let e = one(&app("[environments.staging.database]\nurl = \"postgres://db/b\"\n[environments.staging.database.env]\nMODE = \"name\"\n"));
    assert_err(&e, 3, 1, "`MODE` in [env] is also filled by [environments.staging.database]", "remove it from [env]");
    let e = one(&app(
        "[database]\nurl = \"postgres://db/b\"\n[environments.staging.env]\nDATABASE_URL = \"postgres://db/c\"\n",
    ));
    assert_err(
        &e,
        11,
        1,
        "`DATABASE_URL` in [environments.staging.env] is also filled by [database] (with its url)",
        "remove it",
    );
}

// ------------------------------------------------- variables in the urls

#[test]
fn a_database_variable_that_is_unset_only_fails_the_environments_using_it() {
    let src = format!(
        "environment = \"production\"\n{}",
        app("[database]\nurl = \"${PROD_DATABASE_URL}\"\n[environments.staging.database]\nurl = \"${STAGING_DATABASE_URL}\"\n")
    );
    let staging_url = format!("postgres://blog:{SECRET}@db/blog_staging");
    // On a machine (or CI job) that deploys staging only.
    let s = set_env(&src, &[("STAGING_DATABASE_URL", &staging_url)]).unwrap();
    assert_eq!(s.resolve(&env("staging")).unwrap().database.unwrap().url.expose(), staging_url);
    let e = s.resolve(&env("production")).unwrap_err();
    assert_eq!(e.len(), 1);
    assert_err(
        &e.errors[0],
        10,
        7,
        "`url` in [database] reads ${PROD_DATABASE_URL}, which is not set in nonstop's environment",
        "export PROD_DATABASE_URL=",
    );
    // An ad hoc environment uses the file's database: the same problem.
    assert_eq!(s.resolve(&env("pr-1")).unwrap_err(), e);
    // And `parse`, which gives the default environment, reports it as it
    // always did.
    assert_eq!(
        parse(&src, Path::new(FILE), &BTreeMap::from([("STAGING_DATABASE_URL".to_string(), staging_url.clone())]))
            .unwrap_err(),
        e
    );
    // The other way round.
    let s = set_env(&src, &[("PROD_DATABASE_URL", "postgres://db/blog")]).unwrap();
    assert!(s.resolve(&env("production")).is_ok());
    let e = s.resolve(&env("staging")).unwrap_err();
    assert_err(
        &e.errors[0],
        12,
        7,
        "`url` in [environments.staging.database] reads ${STAGING_DATABASE_URL}, which is not set",
        "export STAGING_DATABASE_URL=",
    );
    // A wrong value is that environment's problem too, and not shown.
    let s = set_env(
        &src,
        &[("PROD_DATABASE_URL", "postgres://db/blog"), ("STAGING_DATABASE_URL", &format!("mysql://u:{SECRET}@h/d"))],
    )
    .unwrap();
    let e = s.resolve(&env("staging")).unwrap_err();
    assert!(e.errors[0].message.starts_with("the value of $STAGING_DATABASE_URL (read by `url` in [environments.staging.database]) is not a usable PostgreSQL URL"), "{e}");
    assert!(!e.to_string().contains(SECRET));
}

#[test]
fn with_other_problems_the_default_environments_variables_are_reported_too() {
    let src = app("[database]\nurl = \"${DATABASE_URL}\"\n[environments.staging]\nhosts = [\"HTTP://x\"]\n");
    let e = errs(&src);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].message.contains("reads ${DATABASE_URL}"), "{e:?}");
    assert!(e[1].message.contains("invalid host"), "{e:?}");
    // A badly named variable is the file's problem, wherever.
    let e = one(&app("[environments.staging.database]\nurl = \"${1BAD}\"\n"));
    assert_err(&e, 9, 7, "reads ${1BAD}, which is not a valid variable name", "url = \"${_1BAD}\"");
}

// ---------------------------------------------------------------- [base]

#[test]
fn base_urls_are_checked_and_never_shown() {
    for (value, message, hint) in [
        (
            format!("postgres://admin:{SECRET}@db:5432/?sslmode=require"),
            "the URL asks for TLS (`sslmode=require`)",
            "without TLS",
        ),
        (
            format!("postgres://admin:{SECRET}@db/?sslrootcert=/ca.pem"),
            "the URL asks for TLS (`sslrootcert`)",
            "drop the ssl* parameters",
        ),
        (
            format!("mysql://admin:{SECRET}@db/"),
            "the URL does not start with postgres:// or postgresql:// (its scheme is `mysql`)",
            "an administrator's connection",
        ),
        (format!("postgres://admin:{SECRET}%@db/"), "the URL has a bad percent-escape", "percent-encode"),
    ] {
        let e = one(&app(&format!("[base]\npostgres = \"{value}\"\n")));
        assert_err(&e, 9, 12, &format!("`postgres` in [base] is not a usable PostgreSQL URL: {message}"), hint);
    }
    for (value, message, hint) in [
        (format!("rediss://:{SECRET}@cache:6380"), "the URL asks for TLS (rediss://)", "without TLS"),
        (
            format!("http://:{SECRET}@cache"),
            "the URL does not start with redis://",
            "redis = \"redis://127.0.0.1:6379\"",
        ),
        (
            "redis://cache/3".to_string(),
            "the URL names database `3`; leave the number out",
            "redis = \"redis://127.0.0.1:6379\"",
        ),
    ] {
        let e = one(&app(&format!("[base]\nredis = \"{value}\"\n")));
        assert_err(&e, 9, 9, &format!("`redis` in [base] is not a usable Redis URL: {message}"), hint);
    }
    // Read from nonstop's environment, like [database]: unset, it is the
    // file's problem (every environment uses these servers).
    let src = app("[base]\npostgres = \"${BASE_POSTGRES}\"\nredis = \"${BASE_REDIS}\"\n");
    let s =
        set_env(&src, &[("BASE_POSTGRES", &format!("postgres://admin:{SECRET}@db/")), ("BASE_REDIS", "redis://cache")])
            .unwrap();
    let base = s.base_services().unwrap();
    assert_eq!(base.postgres.as_ref().unwrap().password(), Some(SECRET));
    assert!(!format!("{:?}", s).contains(SECRET), "a SpecSet printed for debugging hides passwords");
    let e = set_env(&src, &[("BASE_REDIS", "redis://cache")]).unwrap_err();
    assert_eq!(e.len(), 1);
    assert_err(
        &e.errors[0],
        9,
        12,
        "`postgres` in [base] reads ${BASE_POSTGRES}, which is not set",
        "export BASE_POSTGRES=",
    );
    // An empty [base] is allowed.
    assert_eq!(set(&app("[base]\n")).base_services(), Some(&nonstop_core::environment::BaseSpec::default()));
    assert_eq!(set(&app("")).base_services(), None);
}

// ---------------------------------------------------------------- properties

/// A file of random processes and variables, and a random environment
/// name; the environment is given an empty table or none.
fn random_file() -> impl Strategy<Value = (String, String, bool)> {
    let process = (prop::sample::select(vec!["web", "worker", "beat", "mailer"]), 0u32..5, prop::option::of(0u32..3));
    (
        prop::collection::vec(process, 1..4),
        prop::collection::btree_map("[A-Z][A-Z0-9_]{0,6}", "[a-z0-9 ]{0,8}", 0..4),
        "[a-z][a-z0-9-]{0,10}[a-z0-9]",
        any::<bool>(),
        prop::option::of("[a-z][a-z0-9]{0,8}"),
    )
        .prop_map(|(processes, vars, name, table, default)| {
            let mut src = "app = \"blog\"\n".to_string();
            if let Some(default) = &default {
                src.push_str(&format!("environment = \"{default}\"\n"));
            }
            src.push_str("[env]\n");
            for (k, v) in &vars {
                src.push_str(&format!("{k} = \"{v}\"\n"));
            }
            let mut seen = Vec::new();
            for (p, count, extra) in processes {
                if seen.contains(&p) {
                    continue;
                }
                seen.push(p);
                let kind = if p == "beat" {
                    "singleton"
                } else if p == "web" {
                    "web"
                } else {
                    "worker"
                };
                let count = if kind == "singleton" { count.min(1) } else { count };
                src.push_str(&format!("[processes.{p}]\ncommand = \"run {p}\"\nkind = \"{kind}\"\ncount = {count}\n"));
                if let Some(n) = extra {
                    src.push_str(&format!("[processes.{p}.env]\nN = \"{n}\"\n"));
                }
            }
            if table {
                src.push_str(&format!("[environments.{name}]\n"));
            }
            (src, name, table, default)
        })
        // A default close to a table's name is refused as a typo (tested
        // on its own).
        .prop_filter("a default that looks like a typo", |(_, name, _, default)| {
            default.as_deref().is_none_or(|d| d == name || crate::suggest::did_you_mean(d, &[name.as_str()]).is_none())
        })
        .prop_map(|(src, name, table, _)| (src, name, table))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// An environment without overrides is the base: the same spec, with
    /// its default host.
    #[test]
    fn an_environment_without_overrides_is_exactly_the_base((src, name, _table) in random_file()) {
        let s = set_env(&src, &[]).map_err(|e| TestCaseError::fail(format!("{e}\n{src}")))?;
        let environment = env(&name);
        let spec = s.resolve(&environment).unwrap();
        prop_assert_eq!(&spec.hosts, &vec![format!("{name}.blog.localhost")]);
        prop_assert_eq!(spec.default_host, s.catch_all() == Some(&environment));
        prop_assert!(!spec.protected);
        let reset = AppSpec { hosts: Vec::new(), default_host: false, protected: false, ..spec };
        prop_assert_eq!(&reset, s.base());
        // And `parse` gives the default environment's.
        let parsed = parse(&src, Path::new(FILE), &()).unwrap();
        prop_assert_eq!(parsed, s.resolve(s.default_environment()).unwrap());
    }

    /// An override changes what it names, nothing else.
    #[test]
    fn an_override_changes_only_what_it_names((src, name, _table) in random_file(), count in 0u32..2, var in "[a-z]{1,5}") {
        let base = set_env(&src, &[]).map_err(|e| TestCaseError::fail(format!("{e}\n{src}")))?;
        let first = base.base().processes[0].name.clone();
        let with = format!("{src}[environments.{name}.env]\nOVERRIDDEN = \"{var}\"\n[environments.{name}.processes.{first}]\ncount = {count}\n");
        let s = set_env(&with, &[]).map_err(|e| TestCaseError::fail(format!("{e}\n{with}")))?;
        let spec = s.resolve(&env(&name)).unwrap();
        let mut expected = base.resolve(&env(&name)).unwrap();
        expected.env.insert("OVERRIDDEN".to_string(), var);
        expected.processes[0].count = count;
        prop_assert_eq!(spec, expected);
        // Other environments are untouched.
        prop_assert_eq!(s.resolve(&env("zz-other")).unwrap(), base.resolve(&env("zz-other")).unwrap());
    }
}

#[test]
fn the_walk_agrees_with_serde_on_environment_tables() {
    // FULL covers every key; this covers an environment-only file.
    let src = app("[environments.a]\nhosts = []\ndefault = true\n[environments.a.processes.web.health]\npath = \"/x\"\n[base]\nredis = \"redis://h\"\n");
    let (doc, syntax) = toml::de::DeTable::parse_recoverable(&src);
    assert!(syntax.is_empty());
    let mut diags = crate::error::Diags::default();
    let walked = crate::walk::walk(&doc, &mut diags);
    assert!(diags.is_empty());
    assert_eq!(walked, toml::from_str::<crate::raw::RawSpec>(&src).unwrap());
}
