//! Autoscaling end to end: the hello example's web autoscaled on requests
//! per instance, the real daemon measuring it every 5 s, scaled out under
//! load and back in once the load is light, with no failed request.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn autoscaled(spec: String) -> String {
    spec.replace("count = 2\ndrain_timeout", "count = 1\ndrain_timeout")
        + r#"
[processes.web.autoscale]
min = 1
max = 3
requests_per_instance = 5
scale_out_cooldown = "5s"
scale_in_cooldown = "5s"
scale_in_window = "10s"
"#
}

fn web(app: &TestApp) -> (u64, u64, String) {
    let st = app.status();
    let web = st["processes"].as_array().unwrap().iter().find(|p| p["process"] == "web").unwrap().clone();
    let last = web["autoscale"]["last_decision"].as_str().unwrap_or_default().to_string();
    (web["desired"].as_u64().unwrap(), web["ready"].as_u64().unwrap(), last)
}

/// A light load: one request every 400 ms (2.5 per second, half of one
/// instance's target).
fn light(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failures) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            match http_get(addr, "/") {
                Ok((200, _)) => ok += 1,
                Ok((code, body)) => failures.push(format!("HTTP {code}: {}", body.trim())),
                Err(e) => failures.push(format!("I/O: {e}")),
            }
            std::thread::sleep(Duration::from_millis(400));
        }
        (ok, failures)
    })
}

#[test]
fn web_scales_out_under_load_and_back_in_without_a_failed_request() {
    let app = TestApp::new("hello", autoscaled);
    app.up().ok();
    assert_eq!(web(&app).0, 1);

    // Busy: as fast as 4 connections go, far above 5 per second.
    let load = Load::start(app.proxy(), "/", 4);
    wait_until(T, "web scaled out to 3, all ready", || {
        let (desired, ready, _) = web(&app);
        desired == 3 && ready == 3
    });
    let (_, _, last) = web(&app);
    let (ok, failures) = load.finish();
    assert!(ok > 0);
    assert!(
        failures.is_empty(),
        "{} failed while scaling out: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(last.starts_with("scale out") || last.starts_with("hold at 3"), "{last}");
    let events = app.run(&["events", "--json"]);
    events.ok();
    let events: serde_json::Value = serde_json::from_str(&events.stdout).unwrap();
    let outs: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "autoscale")
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.contains("scale out"))
        .collect();
    assert!(!outs.is_empty() && outs[0].contains("requests_per_instance"), "{outs:?}");

    // Light: back to 1 once the window has passed, draining first.
    let stop = Arc::new(AtomicBool::new(false));
    let slow = light(app.proxy(), stop.clone());
    wait_until(T, "web scaled back in to 1", || {
        let (desired, ready, _) = web(&app);
        desired == 1 && ready == 1
    });
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = slow.join().unwrap();
    assert!(ok > 0);
    assert!(failures.is_empty(), "failed while scaling in: {failures:?}");

    // By hand outside the bounds: refused, naming them; nothing changed.
    let r = app.run(&["scale", "web=7"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("min 1") && r.stderr.contains("max 3"), "{}", r.stderr);
    assert_eq!(web(&app).0, 1);
}

fn queue_worker(metrics: std::net::SocketAddr) -> impl FnOnce(String) -> String {
    move |spec| {
        let worker = "kind = \"worker\"\ncount = 1\n";
        assert!(spec.contains(worker), "the hello example's worker changed:\n{spec}");
        spec.replace(worker, &format!("{worker}queue = {{ redis_list = \"jobs\" }}\n"))
            + &format!(
                r#"
[processes.worker.autoscale]
min = 1
max = 3
queue_per_instance = 5
scale_out_cooldown = "5s"
scale_in_cooldown = "5s"
scale_in_window = "10s"

[metrics]
listen = "{metrics}"
"#
            )
    }
}

fn worker(app: &TestApp) -> (u64, u64) {
    let st = app.status();
    let w = st["processes"].as_array().unwrap().iter().find(|p| p["process"] == "worker").unwrap().clone();
    (w["desired"].as_u64().unwrap(), w["ready"].as_u64().unwrap())
}

/// The worker's entry of `nonstop metrics --json`.
fn worker_metrics(app: &TestApp) -> serde_json::Value {
    let r = app.run(&["metrics", "--json"]);
    r.ok();
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    report["processes"].as_array().unwrap().iter().find(|p| p["process"] == "worker").cloned().unwrap()
}

/// `nonstop_queue_depth` of the worker in `/metrics`, parsed by a real
/// Prometheus text parser.
fn scraped_depth(addr: std::net::SocketAddr) -> Option<f64> {
    use openmetrics_parser::prometheus::parse_prometheus;
    use openmetrics_parser::PrometheusValue;
    let (code, text) = http_get(addr, "/metrics").ok()?;
    assert_eq!(code, 200, "{text}");
    let parsed = parse_prometheus(&text).unwrap_or_else(|e| panic!("not Prometheus text ({e:?}):\n{text}"));
    let family = parsed.families.get("nonstop_queue_depth")?;
    let depth = family
        .iter_samples()
        .find(|s| s.get_labelset().unwrap().get_label_value("process") == Some("worker"))
        .map(|s| match &s.value {
            PrometheusValue::Gauge(g) => g.as_f64(),
            other => panic!("not a gauge: {other:?}"),
        });
    depth
}

#[test]
fn a_worker_scales_with_its_queue_read_from_the_redis_in_its_secrets() {
    let password = "q-pass-7c1e9b";
    let mut redis = PrivateRedis::on_with_password(free_port(), Some(password));
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let app = TestApp::new("hello", queue_worker(listen));

    // The file names no Redis, and the environment has none: refused
    // before anything runs, naming where one comes from.
    let r = app.up();
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("`queue` of worker reads the Redis list \"jobs\"")
            && r.stderr.contains("get no REDIS_URL")
            && r.stderr.contains("secrets set REDIS_URL"),
        "{}",
        r.stderr
    );
    assert_ne!(app.run(&["status", "--json"]).code, 0, "nothing is up");

    // REDIS_URL as a secret (with the server's password): the file cannot
    // see it, the daemon can.
    let secret = app.dir.path().join("redis-url");
    std::fs::write(&secret, format!("redis://:{password}@127.0.0.1:{}/3", redis.port)).unwrap();
    app.run(&["secrets", "set", "REDIS_URL", "--from-file", secret.to_str().unwrap()]).ok();
    std::fs::remove_file(&secret).unwrap();
    app.up().ok();
    assert_eq!(worker(&app).0, 1);
    wait_until(T, "the empty queue measured", || worker_metrics(&app)["queue_depth"]["current"].as_f64() == Some(0.0));

    // 20 waiting, 5 per instance: as many as max allows.
    let items: Vec<String> = (0..20).map(|i| format!("job-{i}")).collect();
    let mut push = vec!["LPUSH", "jobs"];
    push.extend(items.iter().map(String::as_str));
    assert_eq!(redis.cli(3, &push), "20");
    wait_until(T, "worker scaled out to 3, all ready", || worker(&app) == (3, 3));
    let w = worker_metrics(&app);
    assert_eq!(w["queue_depth"]["current"].as_f64(), Some(20.0), "{w:#}");
    assert!(w["queue_depth"]["recent"].as_array().unwrap().contains(&serde_json::json!(20.0)), "{w:#}");
    assert!(w.get("queue_error").is_none(), "{w:#}");
    let table = app.run(&["metrics"]);
    table.ok();
    assert!(
        table.stdout.lines().any(|l| l.starts_with("worker") && l.contains("queue") && l.contains("20 waiting")),
        "{}",
        table.stdout
    );
    wait_until(T, "/metrics shows the queue", || scraped_depth(listen) == Some(20.0));
    let events = app.run(&["events", "--json"]);
    events.ok();
    assert!(
        events.stdout.contains("worker: scale out") && events.stdout.contains("queue_per_instance"),
        "{}",
        events.stdout
    );

    // Redis goes away: no sample (not a zero), so no scale-in; the
    // outage is logged once, without the password.
    redis.stop();
    wait_until(T, "the outage reported", || worker_metrics(&app)["queue_error"].is_string());
    let w = worker_metrics(&app);
    let error = w["queue_error"].as_str().unwrap();
    assert!(error.contains("does not answer") && error.contains(&format!("127.0.0.1:{}/3", redis.port)), "{error}");
    assert!(!error.contains(password), "{error}");
    assert_eq!(worker(&app).0, 3, "a queue that cannot be read never scales in");

    // Back, empty (a server without persistence): read again over a new
    // connection, and the worker scales back in.
    let redis = PrivateRedis::on_with_password(redis.port, Some(password));
    wait_until(T, "worker scaled back in to 1", || worker(&app) == (1, 1));
    let w = worker_metrics(&app);
    assert_eq!(w["queue_depth"]["current"].as_f64(), Some(0.0), "{w:#}");
    assert!(w.get("queue_error").is_none(), "{w:#}");
    let log = app.log();
    assert_eq!(log.matches("does not answer (").count(), 1, "logged once per outage:\n{log}");
    assert!(log.contains("answers again"), "{log}");
    assert!(!log.contains(password), "the password is in the daemon's log");
    drop(redis);
}
