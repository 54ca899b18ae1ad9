//! Issue 15: a daemon under a 1024-descriptor limit faced with more idle
//! connections than it has descriptors keeps its instances in rotation,
//! logs the refusals in a few lines, and serves normally as soon as the
//! connections close.

mod common;

use common::*;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);
/// More idle connections than the daemon has descriptors.
const IDLE_CONNECTIONS: usize = 1100;
/// How long they are held.
const HOLD: Duration = Duration::from_secs(15);

/// Both web instances running and healthy (in rotation), as `status` says.
fn web_in_rotation(app: &TestApp) -> Result<(), String> {
    let status = app.status();
    let web: Vec<&serde_json::Value> =
        status["instances"].as_array().unwrap().iter().filter(|i| i["process"] == "web").collect();
    let in_rotation = web.iter().filter(|i| i["state"] == "running" && i["health"] == "healthy").count();
    if web.len() == 2 && in_rotation == 2 {
        Ok(())
    } else {
        Err(format!("web instances: {web:#?}"))
    }
}

/// The soft and hard `RLIMIT_NOFILE` of a process, from /proc.
fn fd_limits(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

#[test]
fn under_a_1024_fd_limit_1100_idle_connections_leave_the_instances_in_rotation() {
    let app = TestApp::hello();
    // `nonstop up` (hence the daemon it starts) with a soft and hard limit
    // of 1024, systemd's default soft limit: the daemon cannot raise it.
    let up = app
        .cmd_with(std::path::Path::new("/bin/sh"), &["-c", "ulimit -n 1024 && exec \"$0\" up", bin().to_str().unwrap()])
        .spawn()
        .unwrap();
    let out = wait_output(up, T, "up");
    app.note_daemon();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let daemon = app.daemon_pid().expect("a daemon");
    assert_eq!(fd_limits(daemon), (1024, 1024), "the daemon runs under the limit of the report");
    web_in_rotation(&app).unwrap();
    assert_eq!(app.get("/").unwrap().0, 200);
    let log_lines_before = app.log().lines().count();

    // This process needs more descriptors than the daemon has.
    let mine = getrlimit(Resource::Nofile);
    let wanted = (IDLE_CONNECTIONS as u64 + 512).min(mine.maximum.unwrap_or(u64::MAX));
    assert!(wanted >= IDLE_CONNECTIONS as u64 + 256, "the test needs a hard limit above {}", IDLE_CONNECTIONS + 256);
    setrlimit(Resource::Nofile, Rlimit { current: Some(wanted), maximum: mine.maximum }).unwrap();

    // Idle connections: connected, never a byte sent, from five addresses
    // (so that the limit met is the total one, derived from the descriptor
    // limit, not the per-client one). The ones beyond the proxy's limit are
    // closed by it at once; the test keeps its end open.
    let idle: Vec<TcpStream> = (0..IDLE_CONNECTIONS)
        .map(|i| {
            use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
            let from = SockaddrIn::new(127, 0, 0, 2 + (i % 5) as u8, 0);
            let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
            bind(fd.as_raw_fd(), &from).unwrap();
            let to = SockaddrIn::new(127, 0, 0, 1, app.port);
            connect(fd.as_raw_fd(), &to).unwrap_or_else(|e| panic!("connection {i} to the proxy: {e}"));
            TcpStream::from(fd)
        })
        .collect();
    let started = Instant::now();
    let mut checks = 0;
    while started.elapsed() < HOLD {
        if let Err(e) = web_in_rotation(&app) {
            panic!("{:.1}s into {IDLE_CONNECTIONS} idle connections: {e}", started.elapsed().as_secs_f64());
        }
        checks += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(checks >= 10, "status answered {checks} times in {HOLD:?}");
    drop(idle);
    setrlimit(Resource::Nofile, mine).unwrap();

    // Served normally right after (the issue asks within a second; the
    // bound here is generous for a loaded CI machine, the time is printed).
    let closed = Instant::now();
    wait_until(Duration::from_secs(10), "GET / to answer 200 after the connections closed", || {
        app.get("/").is_ok_and(|(status, _)| status == 200)
    });
    eprintln!("served again {:?} after the idle connections closed", closed.elapsed());
    for _ in 0..20 {
        assert_eq!(app.get("/").unwrap().0, 200);
    }
    web_in_rotation(&app).unwrap();

    // The log says what happened in a few lines, not one per connection.
    let log = app.log();
    let new_lines: Vec<&str> = log.lines().skip(log_lines_before).collect();
    assert!(new_lines.len() < 100, "{} new log lines:\n{}", new_lines.len(), new_lines.join("\n"));
    assert!(
        new_lines.iter().any(|l| l.contains("client connections refused")
            && l.contains("max_connections=384")
            && !l.contains(" at_max_connections=0 ")),
        "the refusals are logged with the limit:\n{}",
        new_lines.join("\n")
    );
    assert!(
        log.lines().any(|l| l.contains("file descriptor limit (RLIMIT_NOFILE): soft 1024")),
        "the daemon logs its limit at start"
    );
}
