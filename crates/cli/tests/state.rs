//! A hostile or damaged state directory, end to end: an unsafe
//! NONSTOP_HOME is refused, what nonstop creates there is private, a damaged
//! or lost store is refused before anything starts, and `doctor --repair` /
//! `down` find the instances again.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).mode() & 0o777
}

fn kill_daemon(app: &TestApp) {
    let daemon = app.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(T, "the daemon to die", || !pid_alive(daemon));
}

fn instance_pids(app: &TestApp) -> Vec<(String, i32)> {
    app.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["instance"].as_str().unwrap().to_string(), i["pid"].as_i64().unwrap() as i32))
        .collect()
}

/// The backup holds the app once the daemon backed up after `up`.
fn wait_for_backup(app: &TestApp) {
    let backup = app.home.path().join("state.db.backup");
    wait_until(T, "the daemon to back up the store", || match nonstop_store::Store::inspect(&backup) {
        Ok(nonstop_store::Inspection::Healthy(s)) => {
            s.apps().unwrap().iter().any(|a| a.running)
                && s.apps()
                    .unwrap()
                    .iter()
                    .all(|a| s.instances(&a.app, &a.environment).unwrap().iter().all(|i| i.handle.is_some()))
                && s.apps().unwrap().iter().map(|a| s.instances(&a.app, &a.environment).unwrap().len()).sum::<usize>()
                    == 4
        }
        _ => false,
    });
}

fn proxy_refuses(app: &TestApp) -> bool {
    std::net::TcpStream::connect_timeout(&app.proxy(), Duration::from_secs(1)).is_err()
}

fn daemon_not_running(app: &TestApp) -> bool {
    app.daemon_pid().is_none_or(|p| !pid_alive(p))
}

#[test]
fn a_world_writable_or_foreign_home_is_refused_and_left_as_it_is() {
    let app = TestApp::hello();
    let home = app.home.path();
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = app.up();
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("refusing to use NONSTOP_HOME"), "{}", r.stderr);
    assert!(
        r.stderr.contains("mode 0777") && r.stderr.contains(&format!("chmod 700 {}", home.display())),
        "{}",
        r.stderr
    );
    assert_eq!(mode(home), 0o777, "an existing home is never chmod-ed");
    assert!(app.daemon_pid().is_none(), "nothing started");
    // `nonstop daemon` itself refuses it too.
    let r = app.run(&["daemon"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("mode 0777"), "{}", r.stderr);

    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(nix::unistd::geteuid().is_root(), "this test gives the home to another user: run it as root");
    nix::unistd::chown(home, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let r = app.up();
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("owned by uid 65534") && r.stderr.contains("chown"), "{}", r.stderr);
    assert!(app.daemon_pid().is_none(), "nothing started");
    let r = app.run(&["doctor"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("UNSAFE") && r.stdout.contains("owned by uid 65534"), "{}", r.stdout);
    nix::unistd::chown(home, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
}

#[test]
fn a_planted_daemon_log_symlink_is_refused_and_its_target_untouched() {
    let app = TestApp::hello();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("root-owned-file");
    std::fs::write(&target, b"precious\n").unwrap();
    std::os::unix::fs::symlink(&target, app.home.path().join("daemon.log")).unwrap();
    let r = app.up();
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("daemon.log") && r.stderr.contains("symbolic link"), "{}", r.stderr);
    let r = app.run(&["daemon"]);
    assert_ne!(r.code, 0);
    assert_eq!(std::fs::read(&target).unwrap(), b"precious\n", "the link's target was written to");
    assert!(app.daemon_pid().is_none());
}

#[test]
fn state_is_private_the_app_keeps_the_users_umask_and_old_records_are_pruned() {
    let app = TestApp::hello();
    // A record of an instance that ended two days ago (pids long gone).
    let old = app.home.path().join("instances/4000000-1");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::set_permissions(app.home.path().join("instances"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let record = serde_json::json!({
        "app": "hello", "environment": "default", "instance": null, "task": "old", "pid": 4000000,
        "start_time": 1, "monitor_pid": 4000001, "monitor_start_time": 1, "log_path": "/nonexistent",
        "started_at": "2026-01-01T00:00:00.000000Z"
    });
    std::fs::write(old.join("instance.json"), record.to_string()).unwrap();
    std::fs::write(old.join("exit.json"), r#"{"status":{"code":0},"exited_at_ms":0}"#).unwrap();
    let touched = std::process::Command::new("touch").args(["-d", "2 days ago"]).arg(old.join("exit.json")).status();
    assert!(touched.unwrap().success());

    app.up().ok();
    let home = app.home.path();
    for f in ["state.db", "daemon.log", "daemon.pid", "daemon.lock"] {
        assert_eq!(mode(&home.join(f)), 0o600, "{f}");
    }
    for d in ["instances", "logs", "logs/hello", "logs/hello/default"] {
        assert_eq!(mode(&home.join(d)), 0o700, "{d}");
    }
    for entry in std::fs::read_dir(home.join("logs/hello/default")).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    let (_, web) = instance_pids(&app).into_iter().find(|(i, _)| i.starts_with("web")).unwrap();
    let records: Vec<PathBuf> = std::fs::read_dir(home.join("instances"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{web}-")))
        .collect();
    assert_eq!(records.len(), 1, "the web instance's record");
    assert_eq!(mode(&records[0]), 0o700);
    assert_eq!(mode(&records[0].join("instance.json")), 0o600);
    wait_for_backup(&app);
    assert_eq!(mode(&home.join("state.db.backup")), 0o600);
    // The app runs with the umask of the user who ran `up`, not the
    // daemon's 077.
    let umask = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Umask:").map(|m| m.trim().to_string()))
            .unwrap()
    };
    assert_eq!(umask(&web.to_string()), umask("self"), "the app's umask");
    assert_eq!(umask(&app.daemon_pid().unwrap().to_string()), "0077", "the daemon's umask");
    // The daemon pruned the old record at start, and kept the live ones.
    wait_until(T, "the old record to be pruned", || !old.exists());
    assert!(records[0].exists());
}

#[test]
fn a_truncated_store_is_refused_and_doctor_repair_restores_the_backup_and_takes_the_instances_over() {
    let app = TestApp::hello();
    app.up().ok();
    let before = instance_pids(&app);
    assert_eq!(before.len(), 4);
    wait_for_backup(&app);
    kill_daemon(&app);
    let db = app.home.path().join("state.db");
    std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(0).unwrap();

    // Refused, with the reason and what to do, and nothing started.
    let r = app.run_with_timeout(&["up"], Duration::from_secs(60));
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("exited at start (exit status: 2)"), "not a timeout: {}", r.stderr);
    assert!(r.stderr.contains("is damaged") && r.stderr.contains("empty (0 bytes)"), "{}", r.stderr);
    assert!(r.stderr.contains("nonstop doctor"), "{}", r.stderr);
    assert!(daemon_not_running(&app));
    assert!(proxy_refuses(&app), "no half-started daemon serves the port");
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "the damaged store is left as it was");

    // The doctor sees the damage, the backup and the instances still running.
    let r = app.run(&["doctor"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("DAMAGED"), "{}", r.stdout);
    assert!(r.stdout.contains("restores the backup"), "{}", r.stdout);
    let r = app.run(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["store"]["state"], "damaged", "{v:#}");
    assert_eq!(v["backup"]["usable"], true, "{v:#}");
    let mut seen: Vec<i64> = v["running"].as_array().unwrap().iter().map(|i| i["pid"].as_i64().unwrap()).collect();
    let mut expected: Vec<i64> = before.iter().map(|(_, p)| i64::from(*p)).collect();
    seen.sort_unstable();
    expected.sort_unstable();
    assert_eq!(seen, expected, "doctor finds every running instance");

    // Repair: the backup comes back and the same instances are managed again.
    let r = app.run(&["doctor", "--repair"]);
    app.note_daemon();
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("restored the backup") && r.stdout.contains("started the daemon"), "{}", r.stdout);
    let aside: Vec<String> = std::fs::read_dir(app.home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.db.damaged-") && !n.ends_with("-wal") && !n.ends_with("-shm"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged store is kept aside: {aside:?}");
    assert_eq!(instance_pids(&app), before, "the running instances were taken over as they were");
    let (code, _) = app.get("/").unwrap();
    assert_eq!(code, 200);
    let r = app.run(&["doctor"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
}

#[test]
fn a_corrupt_store_is_refused_before_anything_starts_and_down_stops_the_instances() {
    let app = TestApp::hello();
    app.up().ok();
    let pids: Vec<i32> = instance_pids(&app).into_iter().map(|(_, p)| p).collect();
    kill_daemon(&app);
    // Garbage over every page but the first, and over the write-ahead log
    // (whose frames would otherwise still be read in their place).
    let db = app.home.path().join("state.db");
    let garbage = |path: &Path, from: u64| {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len > from {
            use std::io::{Seek, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.seek(std::io::SeekFrom::Start(from)).unwrap();
            f.write_all(&vec![0xA5; (len - from) as usize]).unwrap();
        }
    };
    garbage(&db, 4096);
    garbage(&nonstop_store::wal_path(&db), 32);

    let r = app.up();
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("is damaged"), "{}", r.stderr);
    assert!(daemon_not_running(&app));
    assert!(proxy_refuses(&app), "no half-started daemon serves the port");
    for pid in &pids {
        assert!(pid_alive(*pid), "instance {pid} kept running");
    }

    // `down` cannot start a daemon on this store, and stops them anyway.
    let r = app.run(&["down"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("stopped from the records under instances/"), "{}", r.stdout);
    for pid in &pids {
        wait_until(T, "the instances to stop", || !pid_alive(*pid));
    }
    let r = app.run(&["down"]);
    assert!(r.stdout.contains("nothing to do"), "{}", r.stdout);
}

#[test]
fn a_lost_store_without_backup_is_refused_and_repair_stops_the_instances_then_up_starts_again() {
    let app = TestApp::hello();
    app.up().ok();
    let pids: Vec<i32> = instance_pids(&app).into_iter().map(|(_, p)| p).collect();
    kill_daemon(&app);
    for f in ["state.db", "state.db-wal", "state.db-shm", "state.db.backup"] {
        let _ = std::fs::remove_file(app.home.path().join(f));
    }
    let r = app.up();
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("is missing") && r.stderr.contains("recorded under instances/"), "{}", r.stderr);
    assert!(daemon_not_running(&app));

    let r = app.run(&["doctor", "--repair"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("LOST") && r.stdout.contains("created a fresh store"), "{}", r.stdout);
    for pid in &pids {
        assert!(!pid_alive(*pid), "instance {pid} was not stopped by the repair");
    }
    app.up().ok();
    let (code, _) = app.get("/").unwrap();
    assert_eq!(code, 200);
}
