//! `nonstop promote` and `nonstop config` end to end: two environments of
//! the hello example under one daemon, routed by `Host`, with real
//! processes and sockets.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(240);

/// Two environments, each with its own greeting, beat lock and host; a
/// release task that logs where it ran.
fn two_environments() -> TestApp {
    let app = TestApp::new("hello", |s| s);
    let dir = app.dir.path().display().to_string();
    let spec = app.spec().replace(
        "app = \"hello\"",
        &format!("app = \"hello\"\n\n[release]\ntasks = [\"echo migrated $NONSTOP_ENVIRONMENT $NONSTOP_RELEASE >> {dir}/migrations.log\"]"),
    );
    let spec = format!(
        r#"{spec}
[environments.production]
hosts = ["blog.test"]
default = true

[environments.production.env]
GREETING = "hello from production"
BEAT_LOCK = "{dir}/production-beat.lock"

[environments.staging]
hosts = ["staging.blog.test"]

[environments.staging.env]
GREETING = "hello from staging"
BEAT_LOCK = "{dir}/staging-beat.lock"

[environments.staging.processes.web]
count = 1
"#
    );
    app.write_spec(&spec);
    let gi = app.dir.path().join(".gitignore");
    let mut ignore = std::fs::read_to_string(&gi).unwrap_or_default();
    ignore.push_str("migrations.log\n*beat.lock*\n");
    std::fs::write(gi, ignore).unwrap();
    app
}

/// Both environments are brought down when the test ends, however it ends
/// (the app's own drop stops only the default one).
struct DownBoth<'a>(&'a TestApp);

impl Drop for DownBoth<'_> {
    fn drop(&mut self) {
        for env in ["staging", "production"] {
            let _ = self.0.run_with_timeout(&["-e", env, "down"], Duration::from_secs(60));
        }
    }
}

fn json(r: &Run) -> serde_json::Value {
    r.ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.stdout))
}

/// The working directory of the web instance that answers on `host`.
fn web_cwd(addr: SocketAddr, host: &str) -> PathBuf {
    let (code, body) = host_get(addr, host, "/pid").unwrap();
    assert_eq!(code, 200, "{body}");
    let pid: i32 = body.trim().parse().unwrap();
    std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn refused(r: &Run, words: &[&str]) {
    assert_eq!(r.code, 2, "expected a refusal (exit 2):\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
    for w in words {
        assert!(r.stderr.contains(w), "{w:?} not in: {}", r.stderr);
    }
}

#[test]
fn promote_runs_stagings_release_in_production_and_config_set_rolls_out_without_a_failed_request() {
    let app = two_environments();
    let _down = DownBoth(&app);
    let addr = app.proxy();

    // Bad input the CLI names before anything is sent.
    refused(&app.run(&["-e", "production", "config", "set", "GREETING"]), &["GREETING=VALUE", "config unset GREETING"]);
    let token = "ghp_0123456789abcdefghijklmnopqrstuvwxyz";
    let r = app.run(&["-e", "production", "config", "set", &format!("GITHUB_TOKEN={token}")]);
    refused(&r, &["looks like a credential", "nonstop secrets set GITHUB_TOKEN", "--force"]);
    assert!(!r.stderr.contains(token), "the value is never repeated: {}", r.stderr);

    // Staging gets v1.
    app.run_with_timeout(&["-e", "staging", "deploy"], T).ok();
    let (code, body) = host_get(addr, "staging.blog.test", "/").unwrap();
    assert_eq!((code, body.starts_with("hello from staging")), (200, true), "{body}");

    // A source that is not there.
    refused(&app.run(&["promote", "--from", "stagng", "--to", "production"]), &["stagng", "staging"]);

    // Promote: production runs exactly staging's release.
    let r = app.run_with_timeout(&["promote", "--from", "staging", "--to", "production"], T);
    r.ok();
    assert!(r.stdout.contains("v1 is live"), "{}", r.stdout);
    let prod = json(&app.run(&["-e", "production", "status", "--json"]));
    let stag = json(&app.run(&["-e", "staging", "status", "--json"]));
    assert_eq!((prod["release"].as_u64(), stag["release"].as_u64()), (Some(1), Some(1)));
    assert!(prod["instances"].as_array().unwrap().iter().all(|i| i["release"] == 1), "{prod}");
    let (_, body) = host_get(addr, "blog.test", "/env-sha256?name=NONSTOP_RELEASE").unwrap();
    assert_eq!(body.trim(), sha256_hex(b"v1"));
    // The same release directory: the same files, byte for byte.
    let releases = json(&app.run(&["-e", "production", "releases", "--json"]));
    let v1 = releases.as_array().unwrap().iter().find(|r| r["id"] == 1).unwrap();
    let release_dir = PathBuf::from(v1["dir"].as_str().unwrap());
    let (prod_cwd, stag_cwd) = (web_cwd(addr, "blog.test"), web_cwd(addr, "staging.blog.test"));
    assert_eq!(prod_cwd, release_dir.canonicalize().unwrap());
    assert_eq!(prod_cwd, stag_cwd, "production runs staging's release directory");
    for file in ["app.py", "worker.py", "beat.py"] {
        let ran = std::fs::read(prod_cwd.join(file)).unwrap();
        assert_eq!(sha256_hex(&ran), sha256_hex(&std::fs::read(app.dir.path().join(file)).unwrap()), "{file}");
    }
    // With production's config, through production's release task.
    let (code, body) = host_get(addr, "blog.test", "/").unwrap();
    assert_eq!((code, body.starts_with("hello from production")), (200, true), "{body}");
    let log = std::fs::read_to_string(app.dir.path().join("migrations.log")).unwrap();
    assert_eq!(log.lines().collect::<Vec<_>>(), ["migrated staging v1", "migrated production v1"], "{log}");
    let history = json(&app.run(&["-e", "production", "history", "--json"]));
    assert_eq!(history[0]["kind"], "promote", "{history}");
    assert_eq!(history[0]["to_release"], 1);

    // A config change in production under load: no failed request, and
    // the new greeting once it returns.
    let stop = Arc::new(AtomicBool::new(false));
    let prod_load = host_load(addr, "blog.test", &["hello from production", "bonjour from production"], stop.clone());
    let stag_load = host_load(addr, "staging.blog.test", &["hello from staging"], stop.clone());
    wait_until(T, "load", || host_get(addr, "blog.test", "/").is_ok());
    std::thread::sleep(Duration::from_millis(300));
    let set = app.run_with_timeout(&["-e", "production", "config", "set", "GREETING=bonjour from production"], T);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (prod_ok, prod_failed) = prod_load.join().unwrap();
    let (stag_ok, stag_failed) = stag_load.join().unwrap();
    set.ok();
    assert!(set.stdout.contains("v2 is live"), "{}", set.stdout);
    assert!(
        prod_failed.is_empty(),
        "production failed during its config change: {:?}",
        &prod_failed[..prod_failed.len().min(5)]
    );
    assert!(stag_failed.is_empty(), "staging failed meanwhile: {:?}", &stag_failed[..stag_failed.len().min(5)]);
    assert!(prod_ok > 0 && stag_ok > 0, "{prod_ok} {stag_ok}");
    for _ in 0..20 {
        let (code, body) = host_get(addr, "blog.test", "/").unwrap();
        assert_eq!((code, body.starts_with("bonjour from production")), (200, true), "{body}");
    }
    let (_, body) = host_get(addr, "staging.blog.test", "/").unwrap();
    assert!(body.starts_with("hello from staging"), "staging keeps its own: {body}");
    // The same build: the same directory, nothing rebuilt.
    assert_eq!(web_cwd(addr, "blog.test"), release_dir.canonicalize().unwrap());
    let got = json(&app.run(&["-e", "production", "config", "get", "--json"]));
    let greeting = got["variables"].as_array().unwrap().iter().find(|v| v["name"] == "GREETING").unwrap();
    assert_eq!(greeting["value"], "bonjour from production");
    assert!(greeting["source"].as_str().unwrap().starts_with("config set by"), "{got}");
    let beat_lock = got["variables"].as_array().unwrap().iter().find(|v| v["name"] == "BEAT_LOCK").unwrap();
    assert_eq!(beat_lock["source"], "nonstop.toml [environments.production.env]", "{got}");
    let one = app.run(&["-e", "production", "config", "get", "GREETING"]);
    assert_eq!(one.ok().stdout.trim(), "bonjour from production");
    let history = json(&app.run(&["-e", "production", "history", "--json"]));
    assert_eq!((history[0]["kind"].as_str(), history[0]["to_release"].as_u64()), (Some("config"), Some(2)));

    // Staging down: nothing to promote.
    app.run(&["-e", "staging", "down"]).ok();
    refused(&app.run(&["promote", "--from", "staging", "--to", "production"]), &["`staging` runs nothing"]);
    let (_, body) = host_get(addr, "blog.test", "/").unwrap();
    assert!(body.starts_with("bonjour from production"), "{body}");
}
