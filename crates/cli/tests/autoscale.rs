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
