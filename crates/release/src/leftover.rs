//! Build commands a daemon that died left running.
//!
//! A build command runs as a child of the daemon, in its own process group
//! (pgid = its pid). Its pid and start time are reported as soon as it
//! exists ([`crate::BuildEvent::CommandSpawned`]), so that the caller can
//! record them, and its command runs only once the caller says they are
//! recorded (the [`crate::RunPermit`]): every command that ever ran has a
//! record. If the daemon dies mid-build the command goes on as an orphan,
//! and the next daemon finds it from that record and kills its group: its
//! output went to the dead daemon, so nothing could tell a finished build
//! from a broken one. (Its half-built release directory is then removed by
//! [`crate::ReleaseBuilder::clean_staging`].) A daemon that died between
//! the spawn and the record left a process held at its gate, which exits
//! by itself, without running the command, once the gate's pipe closes
//! with the daemon.

use nix::sys::signal::Signal;
use nonstop_core::driver::{Locator, StopOutcome};
use nonstop_supervisor::procinfo;
use std::time::Duration;

/// How long the group gets to be gone after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The locator of a build command just spawned (not reaped yet, so its pid
/// is still its own). `monitor_pid` is 0: a build command has no monitor.
pub(crate) fn locator_of(pid: u32) -> Option<Locator> {
    let start_time = procinfo::start_time(pid)?;
    Some(Locator::Local { pid, start_time, monitor_pid: 0, monitor_start_time: 0 })
}

fn pid_and_start(command: &Locator) -> (u32, u64) {
    match *command {
        Locator::Local { pid, start_time, .. } => (pid, start_time),
    }
}

/// Whether the recorded build command still runs (or cannot be told not
/// to: an unreadable `/proc` counts as running, never as an exit).
pub fn command_alive(command: &Locator) -> bool {
    let (pid, start_time) = pid_and_start(command);
    procinfo::is_running(pid, start_time).unwrap_or(true)
}

/// Why a recorded build command could not be killed.
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("could not read /proc/{pid}/stat ({source}); nothing was signalled")]
    Proc {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("could not kill process group {pid}: {source}; is it running as another user?")]
    Signal {
        pid: u32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error(
        "process group {pid} is still there {}s after SIGKILL; check `ps -o pid,stat,wchan:20,cmd -g {pid}`",
        after.as_secs()
    )]
    Lingering { pid: u32, after: Duration },
}

/// Kill a recorded build command's process group (only while its leader is
/// provably the recorded process) and wait until the group is gone.
pub async fn kill_command(command: &Locator) -> Result<StopOutcome, KillError> {
    let (pid, start_time) = pid_and_start(command);
    let ours = procinfo::is_running(pid, start_time).map_err(|source| KillError::Proc { pid, source })?;
    if !ours {
        return Ok(StopOutcome::AlreadyGone);
    }
    procinfo::signal_group(pid, Signal::SIGKILL).map_err(|source| KillError::Signal { pid, source })?;
    let deadline = tokio::time::Instant::now() + KILL_WAIT;
    while procinfo::group_exists(pid) {
        if tokio::time::Instant::now() >= deadline {
            return Err(KillError::Lingering { pid, after: KILL_WAIT });
        }
        let _ = procinfo::signal_group(pid, Signal::SIGKILL);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(StopOutcome::Killed)
}
