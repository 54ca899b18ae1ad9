//! The daemon and everything it starts get only fds 0-2 plus what nonstop
//! passes on purpose: a descriptor the calling shell holds (a `flock` in a
//! deploy script) must not stay open in them.

mod common;

use common::*;
use std::os::fd::AsRawFd;

/// Every process whose open files include `path`.
fn holders(path: &std::path::Path) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t == path) {
                let cmd = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default().replace('\0', " ");
                out.push((pid, cmd));
            }
        }
    }
    out
}

#[test]
fn a_descriptor_held_by_the_caller_reaches_no_nonstop_or_app_process() {
    let app = TestApp::hello();
    let lock_path = app.dir.path().join("deploy.lock");
    let lock = std::fs::File::create(&lock_path).unwrap();
    // As a shell's `exec 9>deploy.lock; flock 9` leaves it: inheritable.
    nix::fcntl::fcntl(lock.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).unwrap();
    let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).unwrap();
    let lock_path = lock_path.canonicalize().unwrap();
    app.up().ok();
    app.run(&["deploy"]).ok();
    // The caller still holds it; nothing nonstop started does.
    let me = std::process::id() as i32;
    let others: Vec<(i32, String)> = holders(&lock_path).into_iter().filter(|(pid, _)| *pid != me).collect();
    assert!(others.is_empty(), "processes started by nonstop hold the caller's descriptor: {others:#?}");
    // And the proof that the test can see one: a child that does inherit it.
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    assert!(holders(&lock_path).iter().any(|(pid, _)| *pid == child.id() as i32), "the check cannot see holders");
    child.kill().unwrap();
    child.wait().unwrap();
    drop(lock);
}
