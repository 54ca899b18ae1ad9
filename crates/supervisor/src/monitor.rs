//! The per-instance monitor (like conmon or a containerd shim).
//!
//! The driver runs `<monitor_command...> <staging-dir>`; the monitor
//!
//! 1. leaves the daemon's session (`setsid`), blocks SIGHUP, SIGINT, SIGQUIT
//!    and SIGPIPE, takes SIGTERM and SIGCHLD through a signalfd, and becomes a
//!    child subreaper so that orphaned grandchildren are reparented to it;
//! 2. reads and deletes `params.json`, opens the log file;
//! 3. starts `/bin/sh -c <command>` in a new process group (pgid = pid) with
//!    exactly the given environment and stdin on /dev/null;
//! 4. moves its directory to `instances/<pid>-<start_time>`, writes
//!    `instance.json`, and prints one [`Handshake`] line on stdout, which it
//!    then points at /dev/null (if nobody reads the line, the daemon died
//!    mid-start: it kills the app and exits);
//! 5. writes the app's output lines to the log file;
//! 6. when the app's main process exits: writes `exit.json` atomically,
//!    gives what is left of the process group [`LEFTOVER_SELF_EXIT`] to end
//!    by itself, then SIGTERM and [`LEFTOVER_GRACE`], then SIGKILL; drains
//!    the output (bounded), waits (bounded) until the group is empty, and
//!    exits.
//!
//! SIGTERM to the monitor is forwarded to the app's process group.

use crate::logfile::{LineSplitter, LogWriter, Stream};
use crate::procinfo;
use crate::state::{
    instance_dir_name, read_json, unix_ms_now, write_atomic, ExitRecord, Handshake, InstanceRecord, MonitorParams,
    PARAMS_FILE, RECORD_FILE,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nonstop_core::driver::ExitStatus;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// How long output is still collected after the main process exited and
/// the leftovers were killed (a process that left the group may hold the
/// pipes open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// When the main process dies (e.g. `kill -9` of gunicorn's master), what is
/// left of its group (the workers) first gets this long to finish by
/// itself, untouched, while the daemon takes the instance out of rotation:
/// gunicorn's sync workers go on serving the connections already queued on
/// the listening socket and exit once it is empty (they look at their
/// parent only then). Told to stop at once, they stop accepting, and the
/// queued requests are reset unanswered: a POST among them is lost.
const LEFTOVER_SELF_EXIT: Duration = Duration::from_secs(1);
/// Then what is still left gets SIGTERM and this long to finish the
/// requests it is serving before SIGKILL: killing it at once would cut
/// requests that cannot be retried (a POST in flight).
const LEFTOVER_GRACE: Duration = Duration::from_secs(5);
/// How long the monitor waits for the process group to be empty after
/// SIGKILL before it gives up (processes stuck in uninterruptible I/O).
const GROUP_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Entry point of the hidden `__monitor` subcommand. `args` are the
/// arguments after the subcommand: the staging directory. Synchronous;
/// returns the process exit code.
pub fn monitor_main(args: Vec<OsString>) -> i32 {
    let [dir] = args.as_slice() else {
        eprintln!(
            "usage: nonstop __monitor <staging-dir>\n\
             This is an internal command: the nonstop daemon starts it for each instance."
        );
        return 2;
    };
    let staging = PathBuf::from(dir);
    match Monitor::start(&staging) {
        Ok(monitor) => monitor.run(),
        Err(e) => {
            eprintln!("nonstop monitor: {e}");
            // The daemon reads it in another process: its words.
            let _ = send_handshake(&Handshake::Failed { reason: e.to_string() });
            1
        }
    }
}

/// Why a monitor could not start its app (sent to the daemon as the
/// handshake's reason).
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("could not block signals: {0}")]
    BlockSignals(#[source] Errno),
    #[error("could not create a signalfd: {0}")]
    SignalFd(#[source] Errno),
    #[error("could not become a child subreaper: {0}")]
    Subreaper(#[source] Errno),
    #[error("could not read {}; the daemon writes it before starting the monitor", .0.display())]
    Params(PathBuf),
    #[error("workdir {} does not exist or is not a directory; check the release directory", .0.display())]
    Workdir(PathBuf),
    #[error("could not open the log file {}: {source}; check that the state directory is writable", path.display())]
    LogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not run /bin/sh for {label}: {source}")]
    Spawn {
        label: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read /proc/{pid}/stat of {label}")]
    AppStat { pid: u32, label: String },
    #[error("could not read /proc/self/stat")]
    OwnStat,
    #[error("could not move {} to {}: {source}", from.display(), to.display())]
    Move {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write {}: {source}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not send the handshake: {0}")]
    Handshake(#[source] std::io::Error),
}

struct Monitor {
    dir: PathBuf,
    tmpdir: Option<PathBuf>,
    pid: u32,
    pgid: nix::unistd::Pid,
    signals: SignalFd,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    out_lines: LineSplitter,
    err_lines: LineSplitter,
    log: LogWriter,
    status: Option<ExitStatus>,
}

fn send_handshake(h: &Handshake) -> std::io::Result<()> {
    let mut line = serde_json::to_string(h).map_err(std::io::Error::other)?;
    line.push('\n');
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.flush()
}

/// Point stdout at /dev/null once the handshake is done, so that a later
/// write cannot fail or block on a pipe nobody reads.
fn detach_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), std::io::stdout().as_raw_fd());
    }
}

impl Monitor {
    fn start(staging: &Path) -> Result<Monitor, StartError> {
        // Our own session: no terminal's SIGINT/SIGHUP, and not in the
        // daemon's process group. Fails only if we already lead a group.
        let _ = nix::unistd::setsid();

        let mut blocked = SigSet::empty();
        for s in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGQUIT, Signal::SIGPIPE] {
            blocked.add(s);
        }
        let mut handled = SigSet::empty();
        handled.add(Signal::SIGTERM);
        handled.add(Signal::SIGCHLD);
        // Blocked, not ignored: the app gets a clean signal state (see
        // `reset_signals_in_child`).
        blocked.thread_block().map_err(StartError::BlockSignals)?;
        handled.thread_block().map_err(StartError::BlockSignals)?;
        let signals = SignalFd::with_flags(&handled, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(StartError::SignalFd)?;
        // Orphaned grandchildren come to us, so we can reap them and know
        // when the group is really empty, whatever pid 1 does.
        nix::sys::prctl::set_child_subreaper(true).map_err(StartError::Subreaper)?;

        let params_path = staging.join(PARAMS_FILE);
        let params: MonitorParams = read_json(&params_path).ok_or_else(|| StartError::Params(params_path.clone()))?;
        // It holds the environment, which may hold secrets.
        let _ = std::fs::remove_file(&params_path);
        let label = params.label();

        if !params.workdir.is_dir() {
            return Err(StartError::Workdir(params.workdir.clone()));
        }
        let mut log = LogWriter::open(&params.log_path, params.log_max_bytes, params.log_keep)
            .map_err(|source| StartError::LogFile { path: params.log_path.clone(), source })?;

        let mut command = Command::new("/bin/sh");
        reset_signals_in_child(&mut command);
        let mut child = command
            .arg("-c")
            .arg(&params.command)
            .current_dir(&params.workdir)
            .env_clear()
            .envs(params.env.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| StartError::Spawn { label: label.clone(), source })?;
        let pid = child.id();
        let pgid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        // Not reaped yet (SIGCHLD is blocked and we have not waited), so
        // the pid is still ours to read.
        let kill_app = |why: StartError| -> StartError {
            let _ = procinfo::signal_group(pid, Signal::SIGKILL);
            let _ = waitpid(pgid, None);
            why
        };
        let start_time =
            procinfo::start_time(pid).ok_or_else(|| kill_app(StartError::AppStat { pid, label: label.clone() }))?;
        let monitor_pid = std::process::id();
        let monitor_start_time = procinfo::self_start_time().ok_or_else(|| kill_app(StartError::OwnStat))?;

        let dir = params.instances_dir.join(instance_dir_name(pid, start_time));
        std::fs::rename(staging, &dir)
            .map_err(|source| kill_app(StartError::Move { from: staging.to_path_buf(), to: dir.clone(), source }))?;
        let record = InstanceRecord {
            app: params.app.clone(),
            environment: params.environment.clone(),
            instance: params.instance.clone(),
            task: params.task.clone(),
            pid,
            start_time,
            monitor_pid,
            monitor_start_time,
            log_path: params.log_path.clone(),
            started_at: crate::logfile::timestamp_now(),
        };
        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
        write_atomic(&dir.join(RECORD_FILE), &json)
            .map_err(|source| kill_app(StartError::Record { path: dir.join(RECORD_FILE), source }))?;

        let _ = log.write_line(Stream::Sys, format!("started {label} (pid {pid})").as_bytes());
        let _ = log.flush();

        let hs = Handshake::Started { pid, start_time, monitor_pid, monitor_start_time, dir: dir.clone() };
        if let Err(e) = send_handshake(&hs) {
            // The daemon went away before it learnt about the instance:
            // nobody would ever manage it.
            let _ = log.write_line(
                Stream::Sys,
                format!("the daemon did not take the start handshake ({e}); stopping {label}").as_bytes(),
            );
            return Err(kill_app(StartError::Handshake(e)));
        }
        detach_stdout();

        Ok(Monitor {
            dir,
            tmpdir: params.tmpdir.clone(),
            pid,
            pgid,
            signals,
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            out_lines: LineSplitter::default(),
            err_lines: LineSplitter::default(),
            log,
            status: None,
        })
    }

    fn run(mut self) -> i32 {
        let mut buf = vec![0u8; 64 * 1024];
        let mut drain_deadline: Option<Instant> = None;
        let mut term_at: Option<Instant> = None;
        let mut kill_at: Option<Instant> = None;
        loop {
            let wake = [drain_deadline, term_at, kill_at].into_iter().flatten().min();
            let timeout = match wake {
                None => PollTimeout::NONE,
                Some(d) => {
                    let ms = d.saturating_duration_since(Instant::now()).as_millis();
                    PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
                }
            };
            let (sig_ready, out_ready, err_ready) = {
                let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
                let out_idx = self.stdout.as_ref().map(|s| {
                    fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                let err_idx = self.stderr.as_ref().map(|s| {
                    fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => {
                        // Should not happen; do not spin.
                        eprintln!("nonstop monitor: poll failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                let ready = |i: Option<usize>| {
                    i.and_then(|i| fds[i].revents())
                        .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR))
                };
                (ready(Some(0)), ready(out_idx), ready(err_idx))
            };
            if sig_ready {
                self.handle_signals();
            }
            if out_ready {
                self.read_stream(Stream::Out, &mut buf);
            }
            if err_ready {
                self.read_stream(Stream::Err, &mut buf);
            }
            let _ = self.log.flush();

            if self.status.is_some() && drain_deadline.is_none() {
                self.record_exit();
                let now = Instant::now();
                if procinfo::group_exists(self.pid) {
                    let _ = self.log.write_line(
                        Stream::Sys,
                        format!(
                            "the main process exited; the processes left in its group get {}s to finish by \
                             themselves, then SIGTERM and {}s more",
                            LEFTOVER_SELF_EXIT.as_secs(),
                            LEFTOVER_GRACE.as_secs()
                        )
                        .as_bytes(),
                    );
                    term_at = Some(now + LEFTOVER_SELF_EXIT);
                    kill_at = Some(now + LEFTOVER_SELF_EXIT + LEFTOVER_GRACE);
                    drain_deadline = Some(now + LEFTOVER_SELF_EXIT + LEFTOVER_GRACE + DRAIN_TIMEOUT);
                } else {
                    drain_deadline = Some(now + DRAIN_TIMEOUT);
                }
            }
            if term_at.is_some_and(|t| Instant::now() >= t) {
                term_at = None;
                if let Ok(true) = procinfo::signal_group(self.pid, Signal::SIGTERM) {
                    let _ = self.log.write_line(
                        Stream::Sys,
                        format!(
                            "the processes left in the group got SIGTERM and {}s to finish",
                            LEFTOVER_GRACE.as_secs()
                        )
                        .as_bytes(),
                    );
                }
            }
            if kill_at.is_some_and(|k| Instant::now() >= k) {
                kill_at = None;
                if let Ok(true) = procinfo::signal_group(self.pid, Signal::SIGKILL) {
                    let _ = self.log.write_line(Stream::Sys, b"killed the processes left in the process group");
                }
            }
            if let Some(deadline) = drain_deadline {
                // Leftovers that do not hold the output pipes still get
                // their time (and their SIGTERM) before the SIGKILLs of
                // `wait_group_empty`. (The group is only looked at once the
                // pipes are closed, not for every line of output.)
                let done = self.stdout.is_none()
                    && self.stderr.is_none()
                    && !((term_at.is_some() || kill_at.is_some()) && procinfo::group_exists(self.pid));
                if done || Instant::now() >= deadline {
                    break;
                }
            }
        }
        self.finish_output();
        let status = self.status.unwrap_or(ExitStatus::Unknown);
        let _ = self.log.write_line(Stream::Sys, format!("process exited: {status}").as_bytes());
        let _ = self.log.flush();
        self.wait_group_empty();
        if let Some(tmp) = &self.tmpdir {
            // Nothing of the instance is left to use it.
            if let Err(e) = remove_tree(tmp) {
                let _ = self.log.write_line(
                    Stream::Sys,
                    format!("could not remove the instance's TMPDIR {}: {e}", tmp.display()).as_bytes(),
                );
            }
        }
        let _ = self.log.flush();
        0
    }

    fn handle_signals(&mut self) {
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => {
                    let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                    if signo == Signal::SIGCHLD as i32 {
                        self.reap();
                    } else if signo == Signal::SIGTERM as i32 && self.status.is_none() {
                        let _ = procinfo::signal_group(self.pid, Signal::SIGTERM);
                        let _ = self
                            .log
                            .write_line(Stream::Sys, b"the monitor got SIGTERM and passed it on to the process group");
                    }
                }
                Ok(None) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("nonstop monitor: reading the signalfd failed: {e}");
                    self.reap();
                    break;
                }
            }
        }
    }

    /// Reap every exited child (the app and any reparented orphan).
    fn reap(&mut self) {
        loop {
            match waitpid(None::<nix::unistd::Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == self.pgid => {
                    self.status = Some(ExitStatus::Code(code));
                }
                Ok(WaitStatus::Signaled(p, sig, _)) if p == self.pgid => {
                    self.status = Some(ExitStatus::Signal(sig as i32));
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => {
                    // ECHILD: nothing left to wait for.
                    if self.status.is_none() {
                        self.status = Some(ExitStatus::Unknown);
                    }
                    break;
                }
            }
        }
    }

    fn read_stream(&mut self, stream: Stream, buf: &mut [u8]) {
        match stream {
            Stream::Out => read_pipe(&mut self.stdout, &mut self.out_lines, &mut self.log, stream, buf),
            _ => read_pipe(&mut self.stderr, &mut self.err_lines, &mut self.log, stream, buf),
        }
    }

    /// Emit partial last lines of pipes that are still open at the end.
    fn finish_output(&mut self) {
        let log = &mut self.log;
        self.out_lines.finish(|l| {
            let _ = log.write_line(Stream::Out, l);
        });
        self.err_lines.finish(|l| {
            let _ = log.write_line(Stream::Err, l);
        });
        self.stdout = None;
        self.stderr = None;
    }

    fn record_exit(&mut self) {
        let status = self.status.unwrap_or(ExitStatus::Unknown);
        let rec = ExitRecord { status, exited_at_ms: unix_ms_now() };
        let path = self.dir.join(crate::state::EXIT_FILE);
        let json = serde_json::to_vec(&rec).unwrap_or_default();
        if let Err(e) = write_atomic(&path, &json) {
            eprintln!("nonstop monitor: could not write {}: {e}", path.display());
        }
    }

    fn wait_group_empty(&mut self) {
        let deadline = Instant::now() + GROUP_EXIT_TIMEOUT;
        let mut last_kill = Instant::now();
        loop {
            self.reap();
            if !procinfo::group_exists(self.pid) {
                return;
            }
            if Instant::now() >= deadline {
                let _ = self.log.write_line(
                    Stream::Sys,
                    format!(
                        "processes of group {} still exist {}s after SIGKILL (stuck in uninterruptible I/O?); giving up on them",
                        self.pid,
                        GROUP_EXIT_TIMEOUT.as_secs()
                    )
                    .as_bytes(),
                );
                return;
            }
            if last_kill.elapsed() >= Duration::from_millis(100) {
                let _ = procinfo::signal_group(self.pid, Signal::SIGKILL);
                last_kill = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Give the app a clean signal state: the monitor blocks signals (to read
/// them from a signalfd), and it may have inherited ignored dispositions
/// (a daemon started with `nohup` or `&`); both would otherwise pass on to
/// the app across `exec`, and an app that cannot see SIGTERM cannot stop
/// gracefully.
#[allow(unsafe_code)]
fn reset_signals_in_child(command: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec. It only
    // calls sigaction and pthread_sigmask, which are async-signal-safe, and
    // it neither allocates nor takes locks.
    unsafe {
        command.pre_exec(|| {
            for sig in Signal::iterator() {
                if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
                    let _ = nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl);
                }
            }
            SigSet::empty().thread_set_mask().map_err(std::io::Error::from)
        });
    }
}

fn read_pipe<R: Read>(
    pipe: &mut Option<R>,
    lines: &mut LineSplitter,
    log: &mut LogWriter,
    stream: Stream,
    buf: &mut [u8],
) {
    let Some(p) = pipe.as_mut() else { return };
    match p.read(buf) {
        Ok(n) if n > 0 => lines.push(&buf[..n], |l| {
            let _ = log.write_line(stream, l);
        }),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => {}
        _ => {
            // End of file (or a broken pipe): the last partial line is a line.
            *pipe = None;
            lines.finish(|l| {
                let _ = log.write_line(stream, l);
            });
        }
    }
}

/// Remove a tree the app wrote, also when it left directories without
/// write permission in it. A missing tree is fine.
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fn writable(dir: &Path) {
        let Ok(meta) = std::fs::symlink_metadata(dir) else { return };
        if !meta.is_dir() {
            return;
        }
        let mode = meta.permissions().mode() & 0o7777;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            writable(&entry.path());
        }
    }
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            writable(path);
            match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
        Ok(()) => Ok(()),
    }
}
