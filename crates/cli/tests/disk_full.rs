//! A full disk under NONSTOP_HOME (a size-limited tmpfs mounted there):
//! a killed instance cannot be restarted while its record cannot be
//! written, `status` and `events` say why, and it is back within seconds
//! of space being freed. Needs root (mount); fails clearly without it.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The app, its NONSTOP_HOME a tmpfs of `size`: on drop, `down` first
/// (while the daemon can still be reached), then the unmount.
struct OnTmpfs {
    app: TestApp,
    mount: PathBuf,
}

impl OnTmpfs {
    fn new(size: &str) -> OnTmpfs {
        let app = TestApp::hello();
        let mount = app.home.path().to_path_buf();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(&mount)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        OnTmpfs { app, mount }
    }
}

impl Drop for OnTmpfs {
    fn drop(&mut self) {
        let _ = self.app.run_with_timeout(&["down"], Duration::from_secs(60));
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// Write zeros to `path` until the file system is full.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial pages too.
    while let Ok(n) = f.write(&[0u8; 512]) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    written
}

/// Fill what is left in the last page of `path` (a log), so that the next
/// line written to it fails.
fn fill_tail(path: &Path) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    while let Ok(n) = f.write(b"# disk_full test: filling the disk\n") {
        if n == 0 {
            break;
        }
    }
}

fn waiting_slot(app: &TestApp, instance: &str) -> Option<serde_json::Value> {
    let daemon = app.daemon_pid().unwrap();
    assert!(pid_alive(daemon), "the daemon died on a full disk; its log:\n{}", app.log());
    app.status()["waiting"].as_array()?.iter().find(|w| w["instance"] == instance).cloned()
}

#[test]
fn with_the_disk_full_and_freed_a_killed_instance_is_back_within_seconds() {
    let t = OnTmpfs::new("32m");
    let app = &t.app;
    app.up().ok();
    let web1 = app.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["instance"] == "web.1")
        .and_then(|i| i["pid"].as_i64())
        .unwrap() as i32;

    let filler = t.mount.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0);
    fill_tail(&t.mount.join("daemon.log"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(web1), nix::sys::signal::Signal::SIGKILL).unwrap();

    // Not restarted (its record cannot be written), and `status` says why.
    let mut slot = None;
    wait_until(T, "status to say web.1 cannot restart", || {
        slot = waiting_slot(app, "web.1").filter(|w| w["state"] == "cannot-start");
        slot.is_some()
    });
    let slot = slot.unwrap();
    assert!(slot["problem"].as_str().unwrap().contains("disk is full"), "{slot:#}");
    assert!(app.pids("web").iter().all(|p| *p != web1));
    let text = app.run(&["status"]);
    assert!(text.stdout.contains("web.1 cannot restart: store write failed:"), "{}", text.stdout);
    assert!(text.stdout.contains("store: cannot write the store"), "{}", text.stdout);
    // And `events`, from memory.
    let evs = app.run(&["events"]);
    assert!(evs.stdout.contains("web.1 cannot start: store write failed"), "{}", evs.stdout);

    // Space is freed: back within seconds (the retry waits 2 s at most).
    std::fs::remove_file(&filler).unwrap();
    wait_until(Duration::from_secs(10), "web.1 to be started again", || {
        app.status()["instances"].as_array().unwrap().iter().any(|i| i["instance"] == "web.1")
    });
    wait_until(T, "web.1 healthy", || {
        app.status()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["instance"] == "web.1" && i["health"] == "healthy")
    });
    let st = app.status();
    assert!(st.get("store_error").is_none_or(|e| e.is_null()), "{st:#}");
    // The events kept in memory are in the store now.
    let evs = app.run(&["events"]);
    assert!(evs.stdout.contains("web.1 cannot start: store write failed"), "{}", evs.stdout);
    assert!(!evs.stdout.contains("not yet in the store"), "{}", evs.stdout);
    let (code, _) = app.get("/").unwrap();
    assert_eq!(code, 200);
}
