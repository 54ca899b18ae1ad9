//! Issue 14: the daemon measures a known load, `nonstop metrics --json`
//! and `/metrics` (parsed by a real Prometheus text parser) show it, the
//! figures survive a daemon restart, and a `[metrics] listen` address
//! already taken is a clear error that changes nothing else.

mod common;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::PrometheusValue;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

fn with_metrics(addr: SocketAddr) -> impl FnOnce(String) -> String {
    move |spec| format!("{spec}\n[metrics]\nlisten = \"{addr}\"\n")
}

fn metrics_json(app: &TestApp) -> Value {
    let r = app.run(&["metrics", "--json"]);
    r.ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("metrics --json is not JSON ({e}):\n{}", r.stdout))
}

fn web(report: &Value) -> Value {
    report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["process"] == "web")
        .cloned()
        .unwrap_or_else(|| panic!("no web in {report:#}"))
}

fn web_requests_total(app: &TestApp) -> Option<u64> {
    web(&metrics_json(app))["requests"]["total"].as_u64()
}

/// The `nonstop_http_requests_total` of `web`, summed over its releases.
fn scraped_requests(addr: SocketAddr) -> f64 {
    let (code, text) = http_get(addr, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200, "{text}");
    let parsed = parse_prometheus(&text).unwrap_or_else(|e| panic!("not Prometheus text ({e:?}):\n{text}"));
    let family = parsed.families.get("nonstop_http_requests_total").unwrap_or_else(|| panic!("no requests in\n{text}"));
    family
        .iter_samples()
        .filter(|s| s.get_labelset().unwrap().get_label_value("process") == Some("web"))
        .map(|s| match &s.value {
            PrometheusValue::Counter(c) => c.value.as_f64(),
            other => panic!("not a counter: {other:?}"),
        })
        .sum()
}

#[test]
fn a_known_load_is_measured_shown_scraped_and_kept_across_a_daemon_restart() {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let app = TestApp::new("hello", with_metrics(listen));
    app.up().ok();
    // The environment is measured (its first step sets the baselines).
    wait_until(Duration::from_secs(60), "web's requests measured", || web_requests_total(&app).is_some());
    assert_eq!(web_requests_total(&app), Some(0), "no request was sent yet");

    const N: u64 = 150;
    for _ in 0..N {
        let (code, _) = app.get("/pid").unwrap();
        assert_eq!(code, 200);
    }
    wait_until(Duration::from_secs(30), "the load measured", || web_requests_total(&app) >= Some(N));
    let report = metrics_json(&app);
    let w = web(&report);
    assert_eq!(w["requests"]["total"].as_u64(), Some(N), "{w:#}");
    assert_eq!(w["responses_2xx"]["total"].as_u64(), Some(N), "{w:#}");
    assert_eq!(w["responses_5xx"]["total"].as_u64(), Some(0), "{w:#}");
    // The recent points are rates per 5 s step: together, the load.
    let step = report["step_secs"].as_f64().unwrap();
    let recent: f64 = w["requests"]["recent"].as_array().unwrap().iter().filter_map(Value::as_f64).sum();
    assert!((recent * step - N as f64).abs() < 0.01, "recent points add up to {} requests, not {N}", recent * step);
    assert!(w["p50_ms"].as_f64().is_some_and(|p| p > 0.0), "a latency p50: {w:#}");
    assert_eq!(w["instances"]["current"].as_f64(), Some(2.0), "{w:#}");

    // CPU and memory of the web instances' process groups.
    wait_until(Duration::from_secs(30), "CPU and memory measured", || {
        let w = web(&metrics_json(&app));
        w["cpu_percent"]["current"].as_f64().is_some() && w["rss_bytes"]["current"].as_f64().is_some_and(|b| b > 1e6)
    });

    // The table shows it.
    let table = app.run(&["metrics"]);
    table.ok();
    assert!(table.stdout.contains("requests") && table.stdout.contains("MiB"), "{}", table.stdout);

    // /metrics, parsed by a real Prometheus text parser.
    wait_until(Duration::from_secs(30), "/metrics served", || http_get(listen, "/metrics").is_ok());
    assert_eq!(scraped_requests(listen), N as f64);
    let (code, _) = http_get(listen, "/other").unwrap();
    assert_eq!(code, 404);

    // Saved (every minute), then the daemon is killed: the keeper starts
    // another, which loads them.
    let file = app.home.path().join("metrics").join("metrics.bin");
    let measured = std::time::SystemTime::now();
    wait_until(Duration::from_secs(90), "the metrics saved after the load", || {
        std::fs::metadata(&file).and_then(|m| m.modified()).is_ok_and(|t| t > measured)
    });
    let daemon = app.daemon_pid().unwrap();
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    wait_until(Duration::from_secs(60), "another daemon", || {
        app.daemon_pid().is_some_and(|p| p != daemon && pid_alive(p)) && app.run(&["metrics", "--json"]).code == 0
    });
    app.note_daemon();
    assert_eq!(web_requests_total(&app), Some(N), "the requests before the restart are kept");
    assert_eq!(scraped_requests(listen), N as f64);
}

#[test]
fn a_metrics_address_already_taken_is_refused_by_up_and_deploy_and_changes_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let app = TestApp::hello();
    app.up().ok();
    let before = app.status();
    let pids = app.pids("web");
    app.write_spec(&with_metrics(addr)(app.spec()));
    for command in [&["up"][..], &["deploy"][..]] {
        let r = app.run(command);
        assert_eq!(r.code, 2, "{command:?} with a taken address:\n{}\n{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains(&format!("cannot serve /metrics on {addr}")) && r.stderr.contains("[metrics] listen"),
            "{command:?}: {}",
            r.stderr
        );
    }
    // Nothing changed: the same release, the same instances, answering.
    let after = app.status();
    assert_eq!(after["release"], before["release"]);
    assert_eq!(app.pids("web"), pids);
    let (code, _) = app.get("/pid").unwrap();
    assert_eq!(code, 200);
    assert!(metrics_json(&app)["listen_errors"].as_array().is_none_or(Vec::is_empty));
    drop(taken);
}
