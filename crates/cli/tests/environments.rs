//! Two environments of one app under one daemon and one proxy address,
//! routed by `Host`, with real processes and sockets.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const ENVIRONMENTS: &str = r#"
[environments.production]
hosts = ["blog.test"]
default = true

[environments.production.env]
GREETING = "hello from production"

[environments.staging]
hosts = ["staging.blog.test"]

[environments.staging.env]
GREETING = "hello from staging"
BEAT_LOCK = "staging-beat.lock"

[environments.staging.processes.web]
count = 1
"#;

#[test]
fn two_environments_side_by_side_under_one_daemon_routed_by_host() {
    let app = TestApp::new("hello", |s| s + ENVIRONMENTS);
    app.run(&["-e", "production", "up"]).ok();
    app.run(&["-e", "staging", "up"]).ok();
    let addr = app.proxy();

    // Each host reaches its own environment; any other host the default.
    let (code, body) = host_get(addr, "blog.test", "/").unwrap();
    assert_eq!((code, body.starts_with("hello from production")), (200, true), "{body}");
    let (code, body) = host_get(addr, "staging.blog.test", "/").unwrap();
    assert_eq!((code, body.starts_with("hello from staging")), (200, true), "{body}");
    let (_, body) = host_get(addr, "elsewhere.test", "/").unwrap();
    assert!(body.starts_with("hello from production"), "{body}");

    // Each is listed with its instances; status addresses one.
    let list = app.run(&["env", "list", "--json"]);
    list.ok();
    let envs: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let running: Vec<(String, u64)> = envs
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["environment"].as_str().unwrap().to_string(), e["instances"].as_u64().unwrap()))
        .collect();
    assert_eq!(running, [("production".to_string(), 4), ("staging".to_string(), 3)], "{}", list.stdout);
    let st = app.run(&["-e", "staging", "status", "--json"]);
    st.ok();
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(st["environment"], "staging");
    assert_eq!(st["hosts"], serde_json::json!(["staging.blog.test"]));

    // A deploy in staging while both serve load: no failed request in either.
    let stop = Arc::new(AtomicBool::new(false));
    let prod = host_load(addr, "blog.test", &["hello from production"], stop.clone());
    let stag = host_load(addr, "staging.blog.test", &["hello from"], stop.clone());
    std::fs::write(app.dir.path().join("VERSION"), "2\n").unwrap();
    let deploy = app.run_with_timeout(&["-e", "staging", "deploy"], Duration::from_secs(240));
    stop.store(true, Ordering::Relaxed);
    let (prod_ok, prod_failed) = prod.join().unwrap();
    let (stag_ok, stag_failed) = stag.join().unwrap();
    deploy.ok();
    assert!(
        prod_failed.is_empty(),
        "production failed during staging's deploy: {:?}",
        &prod_failed[..prod_failed.len().min(5)]
    );
    assert!(
        stag_failed.is_empty(),
        "staging failed during its own deploy: {:?}",
        &stag_failed[..stag_failed.len().min(5)]
    );
    assert!(prod_ok > 0 && stag_ok > 0, "{prod_ok} {stag_ok}");
    let hist = app.run(&["-e", "production", "history", "--json"]);
    assert!(!hist.stdout.contains("\"to_release\""), "production was not deployed to: {}", hist.stdout);

    // A typo in an environment's name: named, with the ones there are.
    let typo = app.run(&["-e", "stagng", "status"]);
    assert_eq!(typo.code, 2, "{}{}", typo.stdout, typo.stderr);
    assert!(typo.stderr.contains("stagng") && typo.stderr.contains("staging"), "{}", typo.stderr);

    // Staging down: its host is released, production serves on, the
    // daemon stays.
    let down = app.run(&["-e", "staging", "down"]);
    down.ok();
    assert!(down.stdout.contains("keeps running hello/production"), "{}", down.stdout);
    let (code, body) = host_get(addr, "staging.blog.test", "/").unwrap();
    assert_eq!(code, 200, "an unclaimed host reaches the default: {body}");
    assert!(body.starts_with("hello from production"), "{body}");
    let (code, _) = host_get(addr, "blog.test", "/").unwrap();
    assert_eq!(code, 200);

    // The last one down stops the daemon.
    let down = app.run(&["-e", "production", "down"]);
    down.ok();
    assert!(down.stdout.contains("daemon"), "{}", down.stdout);
}

/// `nonstop ARGS` in `dir`, under `home`'s daemon and proxy address.
fn beside(home: &TestApp, dir: &std::path::Path, args: &[&str]) -> Run {
    let child = home.cmd(args).current_dir(dir).spawn().expect("spawn nonstop");
    let out = wait_output(child, Duration::from_secs(240), &format!("nonstop {}", args.join(" ")));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn two_apps_under_one_daemon_each_on_its_hosts() {
    let blog = TestApp::new("hello", |s| s + ENVIRONMENTS);
    let shop = TestApp::new("hello", |s| {
        s.replace("app = \"hello\"", "app = \"shop\"")
            + r#"
[environments.production]
hosts = ["shop.test"]

[environments.production.env]
GREETING = "hello from the shop"
"#
    });
    let addr = blog.proxy();
    blog.run(&["-e", "production", "up"]).ok();
    beside(&blog, shop.dir.path(), &["-e", "production", "up"]).ok();

    let (code, body) = host_get(addr, "blog.test", "/").unwrap();
    assert_eq!((code, body.starts_with("hello from production")), (200, true), "{body}");
    let (code, body) = host_get(addr, "shop.test", "/").unwrap();
    assert_eq!((code, body.starts_with("hello from the shop")), (200, true), "{body}");
    // Each directory addresses its own app.
    let st = beside(&blog, shop.dir.path(), &["-e", "production", "status", "--json"]);
    st.ok();
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!((st["app"].as_str(), st["hosts"].clone()), (Some("shop"), serde_json::json!(["shop.test"])));

    // A deploy of the shop while both serve load: no failed request.
    let stop = Arc::new(AtomicBool::new(false));
    let blog_load = host_load(addr, "blog.test", &["hello from production"], stop.clone());
    let shop_load = host_load(addr, "shop.test", &["hello from the shop"], stop.clone());
    std::fs::write(shop.dir.path().join("VERSION"), "2\n").unwrap();
    let deploy = beside(&blog, shop.dir.path(), &["-e", "production", "deploy"]);
    stop.store(true, Ordering::Relaxed);
    let (blog_ok, blog_failed) = blog_load.join().unwrap();
    let (shop_ok, shop_failed) = shop_load.join().unwrap();
    deploy.ok();
    assert!(blog_ok > 0 && shop_ok > 0, "{blog_ok} {shop_ok}");
    assert!(blog_failed.is_empty(), "blog: {:?}", &blog_failed[..blog_failed.len().min(5)]);
    assert!(shop_failed.is_empty(), "shop: {:?}", &shop_failed[..shop_failed.len().min(5)]);

    // A third app whose [proxy] differs is refused, naming both and the fix;
    // nothing of it starts and the others serve on.
    let other = TestApp::new("hello", |s| {
        s.replace("app = \"hello\"", "app = \"other\"").replace("[proxy]\n", "[proxy]\nmax_connections = 77\n")
    });
    let refused = beside(&blog, other.dir.path(), &["up"]);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    for word in ["other/default", "share one proxy", "[proxy]"] {
        assert!(refused.stderr.contains(word), "`{word}` in: {}", refused.stderr);
    }
    let (code, _) = host_get(addr, "shop.test", "/").unwrap();
    assert_eq!(code, 200);

    // Down of one app leaves the other serving.
    beside(&blog, shop.dir.path(), &["-e", "production", "down"]).ok();
    let (code, body) = host_get(addr, "blog.test", "/").unwrap();
    assert_eq!((code, body.starts_with("hello from production")), (200, true), "{body}");
    let (code, body) = host_get(addr, "shop.test", "/").unwrap();
    assert!(body.starts_with("hello from production"), "shop.test now reaches the default: {code} {body}");
}
