//! Reading `/proc`: process start times (to tell a live instance from a
//! recycled pid), states (to tell a zombie from a live process) and
//! process-group liveness.

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The fields of `/proc/PID/stat` that the supervisor needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z`, `T`, `X`, ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcStat {
    /// Exited but not yet reaped (or being torn down).
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parse the content of `/proc/PID/stat`. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(content: &str) -> Option<ProcStat> {
    let rest = &content[content.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// `/proc/PID/stat` of a process: `Ok(None)` when no such process exists
/// (`ENOENT`, or `ESRCH` for one torn down while read). Any other failure
/// (out of file descriptors, `EIO`, ...) is an error, never "gone": a
/// process is only ever declared gone on evidence.
pub fn stat(pid: u32) -> io::Result<Option<ProcStat>> {
    if pid == 0 {
        return Ok(None);
    }
    read_stat(&format!("/proc/{pid}/stat"))
}

fn read_stat(path: &str) -> io::Result<Option<ProcStat>> {
    let content = match std::fs::read_to_string(path) {
        Ok(c) => c,
        Err(e) if gone_error(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    // A process torn down between the open and the read reads as empty.
    if content.is_empty() {
        return Ok(None);
    }
    parse_stat(&content)
        .map(Some)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path} could not be parsed: {content:?}")))
}

/// The errors that mean "no such process" when reading `/proc/PID/...`.
fn gone_error(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(Errno::ESRCH as i32)
}

/// The start time (clock ticks since boot) of a process, `None` if it does
/// not exist or `/proc` could not be read.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).ok().flatten().map(|s| s.start_time)
}

/// The start time of the calling process.
pub fn self_start_time() -> Option<u64> {
    read_stat("/proc/self/stat").ok().flatten().map(|s| s.start_time)
}

/// The process `pid` exists and is the one that started at `start_time`,
/// zombie or not. While this holds, its pid (and so its process group id)
/// cannot have been recycled. An error: `/proc` could not be read, which
/// says nothing about the process.
pub fn exists(pid: u32, start_time: u64) -> io::Result<bool> {
    Ok(stat(pid)?.is_some_and(|s| s.start_time == start_time))
}

/// A pidfd on a process (Linux 5.3+): it turns readable the moment the
/// process exits (becomes a zombie), whoever its parent is, so an exit is
/// seen without polling.
pub struct PidFd(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl PidFd {
    /// A pidfd on the process `pid` that started at `start_time`; `None`
    /// when that process is not running (any more). An error when the
    /// system offers no pidfds (kernel, seccomp): the caller polls then.
    /// Must be called within a tokio runtime.
    #[allow(unsafe_code)]
    pub fn open(pid: u32, start_time: u64) -> std::io::Result<Option<PidFd>> {
        let Some(raw) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
            return Ok(None);
        };
        let fd = match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        // Checked after the open: a pid recycled before it would show
        // another start time; from now on the fd names this process. (An
        // unreadable `/proc` leaves it unproven: an error, the caller polls.)
        if !is_running(pid, start_time)? {
            return Ok(None);
        }
        // SAFETY: the AsyncFd owns the fd, so it stays open (and is the
        // same pidfd) for as long as it is registered: all that
        // `register_with_interest` asks for.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|err| err.into_parts().1)?;
        Ok(Some(PidFd(fd)))
    }

    /// Resolves once the process has exited (at once if it has).
    pub async fn exited(&self) {
        match self.0.readable().await {
            // A pidfd stays readable once the process has exited.
            Ok(_) => {}
            // Not expected; the caller's own polling still sees the exit.
            Err(_) => std::future::pending().await,
        }
    }
}

/// The process `pid` is the one that started at `start_time` and is still
/// running (not a zombie): `Ok(false)` only on evidence (no such process,
/// another start time, a zombie); an error when `/proc` could not be read
/// (e.g. `EMFILE`), which the caller must not take for an exit.
pub fn is_running(pid: u32, start_time: u64) -> io::Result<bool> {
    Ok(stat(pid)?.is_some_and(|s| s.start_time == start_time && !s.is_zombie()))
}

/// `is_running` for loops that wait for an exit: an error counts as still
/// running (the wait goes on and asks again), and is logged, rate-limited.
pub fn running_or_unknown(pid: u32, start_time: u64) -> bool {
    match is_running(pid, start_time) {
        Ok(running) => running,
        Err(err) => {
            log_unknown(pid, &err);
            true
        }
    }
}

/// Log that the liveness of `pid` could not be read: at most one line per
/// [`UNKNOWN_LOG_EVERY`], with how many were left out (under fd exhaustion
/// every check of every instance fails, many times a second).
pub fn log_unknown(pid: u32, err: &io::Error) {
    static LAST: Mutex<Option<(Instant, u64)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    match last.as_mut() {
        Some((at, left_out)) if now.duration_since(*at) < UNKNOWN_LOG_EVERY => *left_out += 1,
        _ => {
            let left_out = last.map(|(_, n)| n).unwrap_or(0);
            *last = Some((now, 0));
            drop(last);
            tracing::warn!(
                pid,
                error = %err,
                "could not read /proc/{pid}/stat: {err}; the process is not taken for exited, and is checked again \
                 ({left_out} more such failures in the last {}s)",
                UNKNOWN_LOG_EVERY.as_secs()
            );
        }
    }
}

/// How often [`log_unknown`] logs at most.
pub const UNKNOWN_LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether any process (zombies included) is still in process group `pgid`.
pub fn group_exists(pgid: u32) -> bool {
    let Ok(raw) = i32::try_from(pgid) else {
        return false;
    };
    if raw <= 1 {
        return false;
    }
    // EPERM means it exists but belongs to someone else now (setuid).
    !matches!(killpg(Pid::from_raw(raw), None), Err(Errno::ESRCH))
}

/// Send `signal` to process group `pgid`. `Ok(false)` if the group is gone.
pub fn signal_group(pgid: u32, signal: Signal) -> Result<bool, Errno> {
    let raw = i32::try_from(pgid).map_err(|_| Errno::EINVAL)?;
    if raw <= 1 {
        // Never signal -1 (everything) or -0 (our own group).
        return Err(Errno::EINVAL);
    }
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Send `signal` to one process. `Ok(false)` if it is gone.
pub fn signal_process(pid: u32, signal: Signal) -> Result<bool, Errno> {
    let raw = i32::try_from(pid).map_err(|_| Errno::EINVAL)?;
    if raw <= 1 {
        return Err(Errno::EINVAL);
    }
    match kill(Pid::from_raw(raw), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Map the spec's signal names to the OS's.
pub fn to_nix(signal: nonstop_core::process::Signal) -> Signal {
    use nonstop_core::process::Signal as S;
    match signal {
        S::Term => Signal::SIGTERM,
        S::Int => Signal::SIGINT,
        S::Quit => Signal::SIGQUIT,
        S::Hup => Signal::SIGHUP,
        S::Usr1 => Signal::SIGUSR1,
        S::Usr2 => Signal::SIGUSR2,
        S::Winch => Signal::SIGWINCH,
        S::Kill => Signal::SIGKILL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pidfd_turns_ready_when_its_process_exits() {
        let mut child = std::process::Command::new("sleep").arg("1000").spawn().unwrap();
        let pid = child.id();
        let started = start_time(pid).unwrap();
        // Another start time: a recycled pid, not this process.
        assert!(PidFd::open(pid, started + 1).unwrap().is_none());
        let pidfd = PidFd::open(pid, started).unwrap().expect("running");
        tokio::select! {
            () = pidfd.exited() => panic!("ready while the process runs"),
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
        }
        child.kill().unwrap();
        // A zombie (not reaped yet) counts as exited.
        tokio::time::timeout(std::time::Duration::from_secs(10), pidfd.exited()).await.expect("ready after the exit");
        assert!(PidFd::open(pid, started).unwrap().is_none(), "a zombie is not running");
        child.wait().unwrap();
        assert!(PidFd::open(pid, started).unwrap().is_none());
    }

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "1234 (we ird) (name)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.pgrp, 1234);
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn reads_own_start_time() {
        let me = std::process::id();
        let st = start_time(me).unwrap();
        assert_eq!(Some(st), self_start_time());
        assert!(is_running(me, st).unwrap());
        assert!(!is_running(me, st + 1).unwrap());
        assert!(!exists(me, st + 1).unwrap());
        // No such process is an answer, not an error.
        assert!(!is_running(u32::MAX - 1, st).unwrap());
        assert!(stat(u32::MAX - 1).unwrap().is_none());
    }

    #[test]
    fn refuses_to_signal_everything() {
        assert_eq!(signal_group(0, Signal::SIGTERM), Err(Errno::EINVAL));
        assert_eq!(signal_group(1, Signal::SIGTERM), Err(Errno::EINVAL));
        assert_eq!(signal_process(1, Signal::SIGTERM), Err(Errno::EINVAL));
    }
}
