//! Real processes, real files. Every wait is on a condition with a
//! deadline; every test kills what it started (by process group) even when
//! it fails.

use nix::sys::signal::Signal as NixSignal;
use nonstop_core::driver::{Driver, ExitStatus, InstanceHandle, LaunchSpec, Liveness, Locator, StopOutcome, TaskSpec};
use nonstop_core::ids::{AppName, EnvironmentId, InstanceId, ProcessName, ReleaseId};
use nonstop_core::process::Signal;
use nonstop_supervisor::procinfo;
use nonstop_supervisor::{LocalDriver, LocalDriverConfig, LogQuery, Stream};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

fn python() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is needed by these tests");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// Kills every process group and monitor registered with it when dropped.
#[derive(Default)]
struct Cleanup {
    handles: Mutex<Vec<(u32, u64, u32, u64)>>,
}

impl Cleanup {
    fn track(&self, h: &InstanceHandle) {
        let Locator::Local { pid, start_time, monitor_pid, monitor_start_time } = h.locator;
        self.handles.lock().unwrap().push((pid, start_time, monitor_pid, monitor_start_time));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for &(pid, st, mpid, mst) in self.handles.lock().unwrap().iter() {
            if procinfo::exists(pid, st).unwrap_or(true) {
                let _ = procinfo::signal_group(pid, NixSignal::SIGKILL);
            }
            if procinfo::is_running(mpid, mst).unwrap_or(true) {
                let _ = procinfo::signal_process(mpid, NixSignal::SIGKILL);
            }
        }
    }
}

struct Fixture {
    // Declared first: dropped (processes killed) before the directory goes.
    cleanup: Cleanup,
    driver: LocalDriver,
    work: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Whatever was started in this state directory, handle seen or not
        // (e.g. by the helper daemon of another process).
        for r in self.driver.running() {
            if procinfo::exists(r.pid, r.start_time).unwrap_or(true) {
                let _ = procinfo::signal_group(r.pid, NixSignal::SIGKILL);
            }
        }
    }
}

fn config(state: &Path) -> LocalDriverConfig {
    LocalDriverConfig::new(state, vec![OsString::from(env!("CARGO_BIN_EXE_nonstop-monitor"))])
}

fn fixture_with(f: impl FnOnce(&mut LocalDriverConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("release");
    std::fs::create_dir(&work).unwrap();
    let mut cfg = config(&dir.path().join("state"));
    f(&mut cfg);
    Fixture { cleanup: Cleanup::default(), driver: LocalDriver::new(cfg).unwrap(), work, _dir: dir }
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

fn app() -> AppName {
    AppName::new("blog").unwrap()
}

fn env_id() -> EnvironmentId {
    EnvironmentId::new("staging").unwrap()
}

fn instance(process: &str, slot: u32, generation: u64) -> InstanceId {
    InstanceId::new(ProcessName::new(process).unwrap(), slot, generation)
}

impl Fixture {
    fn launch(&self, id: InstanceId, command: &str, wants_port: bool) -> LaunchSpec {
        LaunchSpec {
            app: app(),
            environment: env_id(),
            release: ReleaseId(1),
            command: command.to_string(),
            workdir: self.work.clone(),
            env: vec![
                ("NONSTOP_INSTANCE".to_string(), id.slot_name()),
                ("NONSTOP_PROCESS".to_string(), id.process.to_string()),
                ("PY".to_string(), python().to_string()),
            ],
            instance: id,
            wants_port,
        }
    }

    async fn start(&self, id: InstanceId, command: &str, wants_port: bool) -> InstanceHandle {
        let h = self.driver.start(self.launch(id, command, wants_port)).await.expect("start");
        self.cleanup.track(&h);
        h
    }

    fn log_path(&self, id: &InstanceId) -> PathBuf {
        self.driver.instance_log_path(&app(), &env_id(), id)
    }

    fn task(&self, name: &str, command: &str, timeout: Duration) -> TaskSpec {
        TaskSpec {
            app: app(),
            environment: env_id(),
            release: ReleaseId(1),
            name: name.to_string(),
            command: command.to_string(),
            workdir: self.work.clone(),
            env: vec![("PY".to_string(), python().to_string())],
            timeout,
        }
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_exit(driver: &LocalDriver, h: &InstanceHandle) -> ExitStatus {
    tokio::time::timeout(WAIT, driver.wait_exit(h)).await.expect("wait_exit timed out")
}

fn log_has(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle))
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The process `pid` is (still) a member of process group `pgid`.
fn in_group(pid: u32, pgid: u32) -> bool {
    procinfo::stat(pid).unwrap().is_some_and(|s| s.pgrp == pgid as i32 && !s.is_zombie())
}

fn app_pid(h: &InstanceHandle) -> u32 {
    h.locator.pid().unwrap()
}

#[tokio::test]
async fn start_gives_port_and_exact_env_and_serves_http() {
    let fx = fixture();
    std::fs::write(fx.work.join("index.html"), "hello from the release").unwrap();
    let id = instance("web", 1, 1);
    let h = fx.start(id.clone(), r#"env > env.txt; exec "$PY" -m http.server "$PORT" --bind 127.0.0.1"#, true).await;
    let addr = h.addr.expect("web instances get an address");
    assert!(addr.ip().is_loopback());
    assert!(fx.driver.liveness(&h).is_alive());

    let env_file = fx.work.join("env.txt");
    eventually("env.txt", || std::fs::read_to_string(&env_file).is_ok_and(|s| s.contains("PORT="))).await;
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(env.contains(&format!("PORT={}\n", addr.port())), "{env}");
    assert!(env.contains("NONSTOP_INSTANCE=web.1\n"), "{env}");
    assert!(env.contains("NONSTOP_PROCESS=web\n"), "{env}");
    assert!(env.contains("PATH="), "{env}");
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    assert!(!env.contains("CARGO_MANIFEST_DIR"), "the daemon's environment leaked: {env}");

    let mut body = String::new();
    eventually("the app to serve HTTP", || {
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        body.clear();
        s.read_to_string(&mut body).is_ok() && body.starts_with("HTTP/1.0 200")
    })
    .await;
    assert!(body.contains("hello from the release"), "{body}");

    // The app is in its own process group; the monitor is not in it.
    let Locator::Local { pid, monitor_pid, .. } = h.locator;
    assert_eq!(procinfo::stat(pid).unwrap().unwrap().pgrp, pid as i32);
    assert_ne!(procinfo::stat(monitor_pid).unwrap().unwrap().pgrp, pid as i32);

    let outcome = fx.driver.stop(&h, Signal::Term, Duration::from_secs(10)).await.unwrap();
    assert_eq!(outcome, StopOutcome::Graceful);
    assert_eq!(fx.driver.liveness(&h), Liveness::Gone);
    assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Signal(15));
    assert_eq!(fx.driver.stop(&h, Signal::Term, Duration::from_secs(1)).await.unwrap(), StopOutcome::AlreadyGone);
}

#[tokio::test]
async fn stop_escalates_to_sigkill_when_sigterm_is_ignored() {
    let fx = fixture();
    let id = instance("worker", 1, 1);
    let h = fx.start(id.clone(), "trap '' TERM; echo ready; exec sleep 1000", false).await;
    assert_eq!(h.addr, None);
    eventually("ready", || log_has(&fx.log_path(&id), " out ready")).await;
    let started = Instant::now();
    let outcome = fx.driver.stop(&h, Signal::Term, Duration::from_millis(500)).await.unwrap();
    assert_eq!(outcome, StopOutcome::Killed);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Signal(9));
}

#[tokio::test]
async fn exit_code_is_recorded_and_returned() {
    let fx = fixture();
    let h = fx.start(instance("worker", 1, 1), "exit 3", false).await;
    assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Code(3));
    assert_eq!(fx.driver.recorded_exit(&h), Some(ExitStatus::Code(3)));
    assert_eq!(fx.driver.liveness(&h), Liveness::Gone);
    // Several waiters, and waiting again, are fine.
    let (a, b) = tokio::join!(fx.driver.wait_exit(&h), fx.driver.wait_exit(&h));
    assert_eq!((a, b), (ExitStatus::Code(3), ExitStatus::Code(3)));
    assert_eq!(fx.driver.stop(&h, Signal::Term, Duration::from_secs(1)).await.unwrap(), StopOutcome::AlreadyGone);
}

#[tokio::test]
async fn leftovers_of_the_group_are_killed_before_wait_exit_returns() {
    let fx = fixture();
    let h = fx
        .start(
            instance("worker", 1, 1),
            r#"sleep 1000 & echo $! > bg.pid; exec "$PY" -c 'import sys; sys.exit(0)'"#,
            false,
        )
        .await;
    assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Code(0));
    let bg = read_pid(&fx.work.join("bg.pid")).expect("bg.pid");
    assert!(!in_group(bg, app_pid(&h)), "background child {bg} survived its instance");
    assert!(!procinfo::group_exists(app_pid(&h)));
}

/// `kill -9` of gunicorn's master must not cut the request a worker is
/// serving: the leftovers get SIGTERM and a grace period; one that ignores
/// SIGTERM is killed after it.
#[tokio::test]
async fn leftovers_get_sigterm_and_a_grace_period_when_the_main_process_dies() {
    let fx = fixture();
    let h = fx
        .start(
            instance("web", 1, 1),
            r#"sh -c 'trap "sleep 0.5; echo done > finished; exit 0" TERM; echo $$ > polite.pid; while :; do sleep 0.05; done' &
               sh -c 'trap "" TERM; echo $$ > stubborn.pid; while :; do sleep 0.05; done' &
               while [ ! -s polite.pid ] || [ ! -s stubborn.pid ]; do sleep 0.02; done; exec sleep 1000"#,
            false,
        )
        .await;
    let polite = fx.work.join("polite.pid");
    let stubborn = fx.work.join("stubborn.pid");
    eventually("both children", || read_pid(&polite).is_some() && read_pid(&stubborn).is_some()).await;
    let stubborn_pid = read_pid(&stubborn).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(app_pid(&h) as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Signal(9));
    // The polite one finished its work; the stubborn one was killed.
    assert_eq!(std::fs::read_to_string(fx.work.join("finished")).unwrap().trim(), "done");
    assert!(!in_group(stubborn_pid, app_pid(&h)), "the child ignoring SIGTERM survived");
    assert!(!procinfo::group_exists(app_pid(&h)));
}

/// The traffic layer takes an instance out of rotation when
/// `main_exited` resolves: that must be the moment its main process dies,
/// not when the rest of the group is gone (up to the 5 s grace later), for
/// the driver that started it as for one that adopted it.
#[tokio::test]
async fn main_exited_resolves_when_the_main_process_dies_before_the_leftovers_go() {
    let fx = fixture();
    let cfg = fx.driver.config().clone();
    let adopter = LocalDriver::new(cfg).unwrap();
    for (i, starter_watches) in [true, false].into_iter().enumerate() {
        let h = fx
            .start(
                instance("web", i as u32 + 1, 1),
                r#"sh -c 'trap "" TERM; echo $$ > stubborn.pid; while :; do sleep 0.05; done' &
                   while [ ! -s stubborn.pid ]; do sleep 0.02; done; exec sleep 1000"#,
                false,
            )
            .await;
        let stubborn_file = fx.work.join("stubborn.pid");
        eventually("the leftover child", || read_pid(&stubborn_file).is_some()).await;
        let stubborn = read_pid(&stubborn_file).unwrap();
        std::fs::remove_file(&stubborn_file).unwrap();
        let watcher = {
            let d = if starter_watches { fx.driver.clone() } else { adopter.clone() };
            let h = h.clone();
            tokio::spawn(async move { d.main_exited(&h).await })
        };
        // Watching before the kill (the common case).
        tokio::task::yield_now().await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(app_pid(&h) as i32), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
        tokio::time::timeout(WAIT, watcher).await.expect("main_exited resolves").unwrap();
        assert!(
            in_group(stubborn, app_pid(&h)),
            "main_exited waited for the leftovers (starter watching: {starter_watches})"
        );
        assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Signal(9));
        assert!(!in_group(stubborn, app_pid(&h)));
    }
}

/// gunicorn's sync workers whose master was killed serve the connections
/// queued on the listening socket and exit once it is empty: told to stop
/// at once, they would leave those requests to be reset. So what is left
/// of the group gets time to finish by itself before any SIGTERM.
#[tokio::test]
async fn leftovers_that_finish_by_themselves_are_not_signalled() {
    let fx = fixture();
    let h = fx
        .start(
            instance("web", 1, 1),
            // A "worker" that runs while its parent lives, then finishes.
            r#"sh -c 'trap "echo term > got_term" TERM; echo $PPID > started; while kill -0 $PPID 2>/dev/null; do sleep 0.02; done; echo done > finished' &
               exec sleep 1000"#,
            false,
        )
        .await;
    // Running, and watching the main process (not whoever it was
    // reparented to, had the main process died before it started).
    let started = fx.work.join("started");
    eventually("the worker", || read_pid(&started) == Some(app_pid(&h))).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(app_pid(&h) as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Signal(9));
    assert_eq!(std::fs::read_to_string(fx.work.join("finished")).unwrap().trim(), "done");
    assert!(!fx.work.join("got_term").exists(), "the worker was signalled before it could finish");
    assert!(!procinfo::group_exists(app_pid(&h)));
}

#[tokio::test]
async fn stop_kills_grandchildren_too() {
    let fx = fixture();
    let id = instance("worker", 1, 1);
    // A grandchild that ignores SIGTERM, under a child shell, under main.
    let h = fx
        .start(
            id.clone(),
            r#"sh -c '(trap "" TERM; exec sleep 1000) & echo $! > gc.pid; wait' & echo started; exec sleep 1000"#,
            false,
        )
        .await;
    let gc_file = fx.work.join("gc.pid");
    eventually("gc.pid", || read_pid(&gc_file).is_some()).await;
    let gc = read_pid(&gc_file).unwrap();
    assert!(in_group(gc, app_pid(&h)));
    let outcome = fx.driver.stop(&h, Signal::Term, Duration::from_secs(10)).await.unwrap();
    // Main exits on SIGTERM; the monitor kills the rest at once.
    assert_eq!(outcome, StopOutcome::Graceful);
    assert!(!in_group(gc, app_pid(&h)), "grandchild {gc} survived");
    assert!(!procinfo::group_exists(app_pid(&h)));
}

#[tokio::test]
async fn instances_survive_the_driver_and_are_adopted_by_a_new_one() {
    let fx = fixture();
    let id = instance("worker", 2, 5);
    let cfg = fx.driver.config().clone();
    let first = LocalDriver::new(cfg.clone()).unwrap();
    let h = first.start(fx.launch(id.clone(), "echo up; exec sleep 1000", false)).await.unwrap();
    fx.cleanup.track(&h);
    eventually("up", || log_has(&fx.log_path(&id), " out up")).await;
    drop(first);

    // The daemon "restarted": a new driver on the same state directory.
    let driver = LocalDriver::new(cfg).unwrap();
    assert!(driver.liveness(&h).is_alive());
    assert!(driver.running().iter().any(|r| r.instance.as_ref() == Some(&id)));
    let record = driver.instance_record(&h).unwrap();
    assert_eq!(record.app, "blog");
    assert_eq!(record.handle().unwrap().locator, h.locator);

    let waiter = {
        let (d, h) = (driver.clone(), h.clone());
        tokio::spawn(async move { d.wait_exit(&h).await })
    };
    let outcome = driver.stop(&h, Signal::Term, Duration::from_secs(10)).await.unwrap();
    assert_eq!(outcome, StopOutcome::Graceful);
    let status = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    assert_eq!(status, ExitStatus::Signal(15));
    assert_eq!(driver.liveness(&h), Liveness::Gone);
    assert!(driver.running().is_empty());
}

#[tokio::test]
async fn app_killed_with_sigkill_is_recorded_as_signal_9() {
    let fx = fixture();
    let h = fx.start(instance("worker", 1, 1), "exec sleep 1000", false).await;
    procinfo::signal_process(app_pid(&h), NixSignal::SIGKILL).unwrap();
    assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Signal(9));
}

#[tokio::test]
async fn is_alive_checks_start_times_and_stop_never_signals_a_stranger() {
    let fx = fixture();
    let h = fx.start(instance("worker", 1, 1), "exec sleep 1000", false).await;
    assert!(fx.driver.liveness(&h).is_alive());
    let Locator::Local { pid, start_time, monitor_pid, monitor_start_time } = h.locator;
    let mut wrong_app = h.clone();
    wrong_app.locator = Locator::Local { pid, start_time: start_time + 1, monitor_pid, monitor_start_time };
    assert_eq!(fx.driver.liveness(&wrong_app), Liveness::Gone);
    let mut wrong_monitor = h.clone();
    wrong_monitor.locator = Locator::Local { pid, start_time, monitor_pid, monitor_start_time: monitor_start_time + 1 };
    assert_eq!(fx.driver.liveness(&wrong_monitor), Liveness::Gone);

    // A recycled pid: stopping it must not touch the live process.
    let outcome = fx.driver.stop(&wrong_app, Signal::Kill, Duration::from_millis(100)).await.unwrap();
    assert_eq!(outcome, StopOutcome::AlreadyGone);
    assert!(fx.driver.liveness(&h).is_alive());
    assert_eq!(fx.driver.stop(&h, Signal::Term, Duration::from_secs(10)).await.unwrap(), StopOutcome::Graceful);
}

#[tokio::test]
async fn start_fails_clearly_without_a_workdir() {
    let fx = fixture();
    let mut launch = fx.launch(instance("web", 1, 1), "true", true);
    launch.workdir = PathBuf::from("/nonexistent/release");
    let err = fx.driver.start(launch).await.unwrap_err().to_string();
    assert!(err.contains("could not start web.1"), "{err}");
    assert!(err.contains("/nonexistent/release does not exist"), "{err}");

    let bad = LocalDriverConfig::new(fx.driver.state_dir(), vec![OsString::from("/nonexistent/nonstop")]);
    let driver = LocalDriver::new(bad).unwrap();
    let err = driver.start(fx.launch(instance("web", 1, 1), "true", true)).await.unwrap_err().to_string();
    assert!(err.contains("monitor_command"), "{err}");
}

#[tokio::test]
async fn log_lines_are_timestamped_and_tagged() {
    let fx = fixture();
    let id = instance("web", 1, 4);
    let h = fx.start(id.clone(), "echo hello; echo oops >&2; printf 'no newline'", false).await;
    assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Code(0));
    let content = std::fs::read_to_string(fx.log_path(&id)).unwrap();
    let lines: Vec<&str> = content.lines().collect();
    for line in &lines {
        let (ts, rest) = line.split_at(27);
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.', "{line}");
        assert!(rest.starts_with(" out ") || rest.starts_with(" err ") || rest.starts_with(" sys "), "{line}");
    }
    let texts: Vec<&str> = lines.iter().map(|l| &l[27..]).collect();
    assert!(texts.contains(&" out hello"), "{content}");
    assert!(texts.contains(&" err oops"), "{content}");
    assert!(texts.contains(&" out no newline"), "{content}");
    assert!(texts.contains(&" sys process exited: exit code 0"), "{content}");

    let query = LogQuery { app: app(), environment: env_id(), process: None, tail: 100 };
    let tail = fx.driver.logs_tail(&query).unwrap();
    let hello = tail.iter().find(|l| l.text == "hello").unwrap();
    assert_eq!((hello.instance.as_str(), hello.generation, hello.stream), ("web.1", 4, Stream::Out));
    assert!(tail.windows(2).all(|w| w[0].ts <= w[1].ts));
    let json = serde_json::to_string(hello).unwrap();
    assert!(json.contains(r#""stream":"out""#), "{json}");
}

#[tokio::test]
async fn logs_rotate_by_size_and_tail_reads_across_files() {
    let fx = fixture_with(|c| {
        c.log_max_bytes = 2000;
        c.log_keep = 2;
    });
    let id = instance("worker", 1, 1);
    let h = fx.start(id.clone(), "i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done", false).await;
    assert_eq!(wait_exit(&fx.driver, &h).await, ExitStatus::Code(0));
    let path = fx.log_path(&id);
    for suffix in ["", ".1", ".2"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len > 0 && len <= 2000, "{} is {len} bytes", p.display());
    }
    assert!(!PathBuf::from(format!("{}.3", path.display())).exists());

    let query =
        LogQuery { app: app(), environment: env_id(), process: Some(ProcessName::new("worker").unwrap()), tail: 60 };
    let tail = fx.driver.logs_tail(&query).unwrap();
    assert_eq!(tail.len(), 60);
    let outs: Vec<&str> = tail.iter().filter(|l| l.stream == Stream::Out).map(|l| l.text.as_str()).collect();
    assert_eq!(outs.last(), Some(&"line 199"));
    // Consecutive, across the rotation boundary.
    let nums: Vec<u32> = outs.iter().map(|t| t[5..].parse().unwrap()).collect();
    assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");
    let other = LogQuery { process: Some(ProcessName::new("web").unwrap()), ..query };
    assert!(fx.driver.logs_tail(&other).unwrap().is_empty());
}

async fn recv_text(
    rx: &mut tokio::sync::mpsc::Receiver<nonstop_supervisor::LogLine>,
    text: &str,
) -> nonstop_supervisor::LogLine {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {text:?}"))
            .expect("follow ended");
        if line.text == text {
            return line;
        }
    }
}

#[tokio::test]
async fn follow_picks_up_new_lines_new_files_and_rotations() {
    let fx = fixture_with(|c| {
        c.log_max_bytes = 1000;
        c.log_keep = 5;
    });
    // An instance that existed before following started.
    let old = instance("web", 1, 1);
    let h_old = fx.start(old.clone(), "echo before; exec sleep 1000", false).await;
    eventually("before", || log_has(&fx.log_path(&old), " out before")).await;

    let cancel = CancellationToken::new();
    let query = LogQuery { app: app(), environment: env_id(), process: None, tail: 10 };
    let mut rx = fx.driver.logs_follow(query, cancel.clone());
    let first = recv_text(&mut rx, "before").await;
    assert_eq!(first.instance, "web.1");

    // A new instance: 30 lines (one rotation), then 30 more on a signal.
    let new = instance("web", 2, 1);
    let script = r#"i=0; while [ $i -lt 30 ]; do echo "n $i"; i=$((i+1)); done
        while [ ! -f go ]; do sleep 0.05; done
        while [ $i -lt 60 ]; do echo "n $i"; i=$((i+1)); done
        exec sleep 1000"#;
    let h_new = fx.start(new.clone(), script, false).await;
    let mut seen = Vec::new();
    while seen.len() < 30 {
        let line = tokio::time::timeout(WAIT, rx.recv()).await.expect("timed out").expect("ended");
        if line.instance == "web.2" && line.stream == Stream::Out {
            seen.push(line.text);
        }
    }
    std::fs::write(fx.work.join("go"), "").unwrap();
    while seen.len() < 60 {
        let line = tokio::time::timeout(WAIT, rx.recv()).await.expect("timed out").expect("ended");
        if line.instance == "web.2" && line.stream == Stream::Out {
            seen.push(line.text);
        }
    }
    let expected: Vec<String> = (0..60).map(|i| format!("n {i}")).collect();
    assert_eq!(seen, expected);
    assert!(PathBuf::from(format!("{}.2", fx.log_path(&new).display())).exists(), "expected two rotations");

    // Stopping writes a sys line for the old instance.
    fx.driver.stop(&h_old, Signal::Term, Duration::from_secs(10)).await.unwrap();
    let exited = recv_text(&mut rx, "process exited: killed by signal 15").await;
    assert_eq!((exited.instance.as_str(), exited.stream), ("web.1", Stream::Sys));

    cancel.cancel();
    let end = tokio::time::timeout(WAIT, async { while rx.recv().await.is_some() {} }).await;
    assert!(end.is_ok(), "follow did not stop when cancelled");
    fx.driver.stop(&h_new, Signal::Kill, Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn run_task_reports_exit_code_and_output_tail() {
    let fx = fixture();
    let outcome = fx
        .driver
        .run_task(fx.task(
            "release-task-1",
            "i=0; while [ $i -lt 60 ]; do echo line $i; i=$((i+1)); done; echo failing >&2; exit 4",
            Duration::from_secs(30),
        ))
        .await
        .unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(4));
    assert!(!outcome.timed_out);
    assert_eq!(outcome.output_tail.len(), 50);
    assert_eq!(outcome.output_tail.last().map(String::as_str), Some("failing"));
    assert_eq!(outcome.output_tail[0], "line 11");
    let tasks = fx.driver.state_dir().join("logs/blog/staging/tasks");
    let logs: Vec<_> = std::fs::read_dir(&tasks).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(logs.len(), 1);
    assert!(logs[0].to_string_lossy().starts_with("release-task-1."), "{logs:?}");

    // Runs of one task never share a log (nor an output tail).
    for _ in 0..2 {
        let ok = fx.driver.run_task(fx.task("migrate", "echo $PY", Duration::from_secs(30))).await.unwrap();
        assert!(ok.status.success());
        assert_eq!(ok.output_tail, vec![python().to_string()]);
    }
}

#[tokio::test]
async fn run_task_times_out_and_kills_the_group() {
    let fx = fixture();
    let outcome = fx
        .driver
        .run_task(fx.task(
            "slow",
            "sleep 1000 & echo $! > task-bg.pid; echo waiting; exec sleep 1000",
            Duration::from_millis(300),
        ))
        .await
        .unwrap();
    assert!(outcome.timed_out);
    assert_eq!(outcome.status, ExitStatus::Signal(15));
    assert_eq!(outcome.output_tail, vec!["waiting".to_string()]);
    assert!(outcome.duration >= Duration::from_millis(300));
    let bg = read_pid(&fx.work.join("task-bg.pid")).unwrap();
    // Reaped by the task's monitor before it exited.
    assert!(procinfo::stat(bg).unwrap().is_none(), "background child {bg} of the task survived");
    assert!(fx.driver.running().is_empty(), "the task's monitor is still running");
}

/// A task outlives the driver that started it (a daemon SIGKILLed while a
/// migration runs): another driver on the same state directory finds it
/// by name, waits for it and reads its exit and output; or stops it.
#[tokio::test]
async fn a_task_outlives_its_driver_and_another_one_waits_for_it_or_stops_it() {
    let fx = fixture();
    let gate = fx.work.join("gate");
    let h = fx
        .driver
        .start_task(fx.task(
            "release-3-1",
            "echo migrating; while [ ! -e gate ]; do sleep 0.02; done; echo done; exit 7",
            WAIT,
        ))
        .await
        .unwrap();
    let pid = h.locator.pid().unwrap();
    // Dropping a wait leaves the task running.
    assert!(tokio::time::timeout(Duration::from_millis(200), fx.driver.wait_task(&h, WAIT)).await.is_err());
    assert!(fx.driver.task_liveness(&h).is_alive());
    assert_eq!(fx.driver.task_exit(&h), None);

    let adopter = LocalDriver::new(fx.driver.config().clone()).unwrap();
    assert!(adopter.task_liveness(&h).is_alive());
    let found = adopter.running_tasks(&app(), &env_id());
    assert_eq!(found, vec![h.clone()], "found by name without its handle");
    assert!(adopter.running_tasks(&AppName::new("shop").unwrap(), &env_id()).is_empty());
    assert!(Driver::running(&adopter, &app(), &env_id()).is_empty(), "a task is not an instance");
    std::fs::write(&gate, "").unwrap();
    let outcome = adopter.wait_task(&h, WAIT).await.unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(7));
    assert!(!outcome.timed_out);
    assert_eq!(outcome.output_tail, vec!["migrating".to_string(), "done".to_string()]);
    assert!(!adopter.task_liveness(&h).is_alive());
    assert_eq!(adopter.task_exit(&h), Some(ExitStatus::Code(7)));
    assert!(procinfo::stat(pid).unwrap().is_none());

    // Or the next driver stops it: the whole process group.
    let h = fx
        .driver
        .start_task(fx.task("release-3-2", "sleep 1000 & echo $! > bg.pid; exec sleep 1000", WAIT))
        .await
        .unwrap();
    eventually("the background child", || read_pid(&fx.work.join("bg.pid")).is_some()).await;
    let bg = read_pid(&fx.work.join("bg.pid")).unwrap();
    let adopter = LocalDriver::new(fx.driver.config().clone()).unwrap();
    let stopped = adopter.stop_task(&h, Signal::Kill, Duration::from_secs(5)).await.unwrap();
    assert_eq!(stopped, StopOutcome::Graceful);
    assert!(!adopter.task_liveness(&h).is_alive());
    assert!(procinfo::stat(bg).unwrap().is_none(), "the task's background child survived");
    assert_eq!(adopter.stop_task(&h, Signal::Kill, Duration::from_secs(5)).await.unwrap(), StopOutcome::AlreadyGone);
}

#[tokio::test]
async fn prune_logs_keeps_the_newest_and_the_running() {
    let fx = fixture();
    let dir = fx.driver.state_dir().join("logs/blog/staging");
    std::fs::create_dir_all(dir.join("tasks")).unwrap();
    for generation in 1..=4 {
        std::fs::write(dir.join(format!("web.1.{generation}.log")), "x\n").unwrap();
        std::fs::write(dir.join(format!("web.1.{generation}.log.1")), "x\n").unwrap();
        // Make the order of modification times unambiguous.
        let f = std::fs::File::options().write(true).open(dir.join(format!("web.1.{generation}.log"))).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + generation)).unwrap();
        let f = std::fs::File::options().write(true).open(dir.join(format!("web.1.{generation}.log.1"))).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + generation)).unwrap();
    }
    for ts in [100, 200, 300] {
        std::fs::write(dir.join(format!("tasks/migrate.{ts}.log")), "x\n").unwrap();
    }
    // A running instance with an old generation is never pruned.
    let live = instance("worker", 1, 1);
    let h = fx.start(live.clone(), "exec sleep 1000", false).await;
    std::fs::write(dir.join("worker.1.2.log"), "x\n").unwrap();
    let f = std::fs::File::options().write(true).open(fx.log_path(&live)).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();

    let removed = fx.driver.prune_logs(&app(), &env_id(), 1).unwrap();
    assert_eq!(removed, 6 + 2);
    let mut left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, vec!["tasks", "web.1.4.log", "web.1.4.log.1", "worker.1.1.log", "worker.1.2.log"]);
    let tasks: Vec<_> = std::fs::read_dir(dir.join("tasks")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(tasks, vec![OsString::from("migrate.300.log")]);
    fx.driver.stop(&h, Signal::Term, Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn prune_state_removes_ended_instances_only() {
    let fx = fixture();
    let done = fx.start(instance("worker", 1, 1), "exit 0", false).await;
    let running = fx.start(instance("worker", 2, 1), "exec sleep 1000", false).await;
    wait_exit(&fx.driver, &done).await;
    assert_eq!(fx.driver.prune_state(Duration::ZERO).unwrap(), 1);
    assert!(fx.driver.instance_record(&done).is_none());
    assert!(fx.driver.instance_record(&running).is_some());
    fx.driver.stop(&running, Signal::Term, Duration::from_secs(10)).await.unwrap();
}

/// Not a test on its own: the "daemon" process of
/// `instances_survive_a_daemon_killed_with_sigkill`. It starts an instance,
/// prints its handle, and lives until its stdin closes or it is killed.
#[tokio::test]
#[ignore = "helper process, started by another test"]
async fn helper_daemon() {
    let (Some(state), Some(work)) =
        (std::env::var_os("NONSTOP_TEST_HELPER_STATE"), std::env::var_os("NONSTOP_TEST_HELPER_WORK"))
    else {
        return;
    };
    let driver = LocalDriver::new(config(Path::new(&state))).unwrap();
    let id = instance("worker", 1, 9);
    let launch = LaunchSpec {
        app: app(),
        environment: env_id(),
        release: ReleaseId(1),
        instance: id,
        command: "echo up; while [ ! -f go ]; do sleep 0.05; done; echo still here; exec sleep 1000".to_string(),
        workdir: PathBuf::from(work),
        env: vec![],
        wants_port: true,
    };
    let h = driver.start(launch).await.unwrap();
    println!("HANDLE {}", serde_json::to_string(&h).unwrap());
    // Until the test kills us (or, should it die, closes our stdin).
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await;
}

#[tokio::test]
async fn instances_survive_a_daemon_killed_with_sigkill() {
    let fx = fixture();
    let mut daemon = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_daemon", "--ignored", "--nocapture", "--test-threads=1"])
        .env("NONSTOP_TEST_HELPER_STATE", fx.driver.state_dir())
        .env("NONSTOP_TEST_HELPER_WORK", &fx.work)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct KillDaemon(std::process::Child);
    impl Drop for KillDaemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = daemon.stdout.take().unwrap();
    let mut daemon = KillDaemon(daemon);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest may print "test helper_daemon ... " first.
            if let Some(at) = line.find("HANDLE ") {
                let _ = tx.send(line[at + 7..].to_string());
            }
        }
    });
    let json = rx.recv_timeout(WAIT).expect("the helper daemon printed no handle");
    let h: InstanceHandle = serde_json::from_str(&json).unwrap();
    fx.cleanup.track(&h);
    let id = h.instance.clone();
    eventually("up", || log_has(&fx.log_path(&id), " out up")).await;

    // The daemon dies without any chance to clean up.
    let daemon_pid = daemon.0.id();
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();

    let Locator::Local { monitor_pid, .. } = h.locator;
    assert!(fx.driver.liveness(&h).is_alive(), "the instance died with its daemon");
    assert_ne!(procinfo::stat(monitor_pid).unwrap().unwrap().ppid, daemon_pid as i32);
    // Output is still collected.
    std::fs::write(fx.work.join("go"), "").unwrap();
    eventually("still here", || log_has(&fx.log_path(&id), " out still here")).await;

    // A new daemon adopts it.
    let driver = LocalDriver::new(config(fx.driver.state_dir())).unwrap();
    assert!(driver.liveness(&h).is_alive());
    let outcome = driver.stop(&h, Signal::Term, Duration::from_secs(10)).await.unwrap();
    assert_eq!(outcome, StopOutcome::Graceful);
    assert_eq!(wait_exit(&driver, &h).await, ExitStatus::Signal(15));
    assert!(!procinfo::group_exists(app_pid(&h)));
}
