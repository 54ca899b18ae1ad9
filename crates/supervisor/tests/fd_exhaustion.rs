//! Out of file descriptors, `/proc` cannot be read: that is not an exit.
//! Its own test binary (one test), as it lowers the process's fd limit and
//! fills it.

use nix::sys::signal::Signal as NixSignal;
use nonstop_core::driver::{Driver, InstanceHandle, LaunchSpec, Liveness, Locator};
use nonstop_core::ids::{AppName, EnvironmentId, InstanceId, ProcessName, ReleaseId};
use nonstop_supervisor::procinfo;
use nonstop_supervisor::{LocalDriver, LocalDriverConfig};
use std::ffi::OsString;
use std::fs::File;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// Every file descriptor the process may still open, held until dropped;
/// the fd limit is lowered for the fill and put back on drop.
struct Exhausted {
    files: Vec<File>,
    limit: rustix::process::Rlimit,
}

impl Exhausted {
    fn now() -> Exhausted {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let lowered = rustix::process::Rlimit { current: Some(256), maximum: limit.maximum };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, lowered).expect("lower RLIMIT_NOFILE");
        let mut files = Vec::new();
        loop {
            match File::open("/dev/null") {
                Ok(f) => files.push(f),
                Err(e) if e.raw_os_error() == Some(libc_emfile()) => break,
                Err(e) => panic!("unexpected error while filling the fd table: {e}"),
            }
            assert!(files.len() < 10_000, "the fd limit was not lowered");
        }
        let held = files.len();
        let exhausted = Exhausted { files, limit };
        assert!(
            procinfo::stat(std::process::id()).is_err(),
            "/proc is still readable with {held} more fds open; the test proves nothing"
        );
        exhausted
    }
}

impl Drop for Exhausted {
    fn drop(&mut self) {
        self.files.clear();
        let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, self.limit);
    }
}

fn libc_emfile() -> i32 {
    nix::errno::Errno::EMFILE as i32
}

/// SIGKILLs the instance's group and monitor when dropped, test failed or not.
struct Kill(InstanceHandle);

impl Drop for Kill {
    fn drop(&mut self) {
        let Locator::Local { pid, start_time, monitor_pid, monitor_start_time } = self.0.locator;
        if procinfo::exists(pid, start_time).unwrap_or(true) {
            let _ = procinfo::signal_group(pid, NixSignal::SIGKILL);
        }
        if procinfo::is_running(monitor_pid, monitor_start_time).unwrap_or(true) {
            let _ = procinfo::signal_process(monitor_pid, NixSignal::SIGKILL);
        }
    }
}

#[tokio::test]
async fn an_instance_is_not_declared_gone_while_proc_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("release");
    std::fs::create_dir(&work).unwrap();
    let config = || {
        LocalDriverConfig::new(dir.path().join("state"), vec![OsString::from(env!("CARGO_BIN_EXE_nonstop-monitor"))])
    };
    // The daemon that started it, and one that adopted it (a restarted
    // daemon: it sees the monitor only through /proc).
    let driver = LocalDriver::new(config()).unwrap();
    let adopter = LocalDriver::new(config()).unwrap();
    let id = InstanceId::new(ProcessName::new("web").unwrap(), 1, 1);
    let h = driver
        .start(LaunchSpec {
            app: AppName::new("blog").unwrap(),
            environment: EnvironmentId::new("staging").unwrap(),
            release: ReleaseId(1),
            instance: id,
            command: "exec sleep 1000".to_string(),
            workdir: work,
            env: Vec::new(),
            wants_port: false,
        })
        .await
        .expect("start");
    let _kill = Kill(h.clone());
    assert_eq!(driver.liveness(&h), Liveness::Alive);
    assert_eq!(adopter.liveness(&h), Liveness::Alive);

    // Watched through a pidfd, opened while fds were left.
    let watched = tokio::spawn({
        let (driver, h) = (driver.clone(), h.clone());
        async move { driver.main_exited(&h).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let exhausted = Exhausted::now();
    assert!(matches!(driver.liveness(&h), Liveness::Unknown(_)), "{:?}", driver.liveness(&h));
    assert!(matches!(adopter.liveness(&h), Liveness::Unknown(_)), "{:?}", adopter.liveness(&h));
    // No pidfd can be opened now: these poll /proc.
    let polled = tokio::spawn({
        let (adopter, h) = (adopter.clone(), h.clone());
        async move { adopter.main_exited(&h).await }
    });
    let exit_of_adopted = tokio::spawn({
        let (adopter, h) = (adopter.clone(), h.clone());
        async move { adopter.wait_exit(&h).await }
    });
    // Every poll (each 50 ms; /proc every 1 s) and every safety-net check
    // (each 1 s) of the pidfd watch comes round in this time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!watched.is_finished(), "main_exited (pidfd) took an unreadable /proc for an exit");
    assert!(!polled.is_finished(), "main_exited (polling) took an unreadable /proc for an exit");
    assert!(!exit_of_adopted.is_finished(), "wait_exit took an unreadable /proc for an exit");
    drop(exhausted);

    // Descriptors back: it runs, as it did all along; its real exit is seen.
    assert_eq!(driver.liveness(&h), Liveness::Alive);
    assert_eq!(adopter.liveness(&h), Liveness::Alive);
    assert!(!watched.is_finished() && !polled.is_finished() && !exit_of_adopted.is_finished());
    procinfo::signal_group(h.locator.pid().unwrap(), NixSignal::SIGKILL).unwrap();
    tokio::time::timeout(WAIT, watched).await.expect("main_exited (pidfd) after the kill").unwrap();
    tokio::time::timeout(WAIT, polled).await.expect("main_exited (polling) after the kill").unwrap();
    let status = tokio::time::timeout(WAIT, exit_of_adopted).await.expect("wait_exit after the kill").unwrap();
    assert_eq!(status, nonstop_core::driver::ExitStatus::Signal(9));
    assert_eq!(adopter.liveness(&h), Liveness::Gone);
}
