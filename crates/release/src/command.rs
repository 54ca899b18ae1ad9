//! Running one build command: `sh -c` in its own process group, output
//! timestamped into the build log and streamed as events, the whole group
//! killed on timeout, on cancel, and when the command's shell exits.

use crate::{BuildEvent, Stream};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use nonstop_core::driver::ExitStatus;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Lines of output kept for error reports.
pub const TAIL_LINES: usize = 20;

/// Longest line kept (in the log, events and the tail); longer ones are cut.
const MAX_LINE: usize = 16 * 1024;

/// After the command's shell exited and the rest of its group was killed,
/// how long to keep reading output still buffered in the pipes (only a
/// process that left the group can hold them open longer).
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How long to wait for a SIGKILLed shell to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// How a command ended.
pub(crate) enum Ended {
    Exited { status: ExitStatus, tail: Vec<String>, duration: Duration },
    TimedOut { tail: Vec<String> },
    Cancelled,
}

/// The build log: one line per output line, `<timestamp> <out|err|sys> <text>`,
/// the format of nonstop's instance logs.
pub(crate) struct BuildLog {
    file: File,
}

impl BuildLog {
    pub(crate) fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self { file: File::create(path)? })
    }

    pub(crate) fn line(&mut self, stream: Stream, text: &str) {
        let ts = nonstop_core::logline::format_ts(time::OffsetDateTime::now_utc());
        // A failed log write must not fail the build: the output still goes
        // to the events and the error's tail.
        let _ = writeln!(self.file, "{ts} {} {text}", stream.as_str());
    }

    pub(crate) fn sync(&mut self) {
        let _ = self.file.sync_all();
    }
}

pub(crate) struct Run<'a> {
    pub index: usize,
    pub total: usize,
    pub command: &'a str,
    pub dir: &'a Path,
    pub env: &'a [(String, String)],
    pub timeout: Duration,
    pub cancel: &'a CancellationToken,
}

/// Kills the command's process group when dropped while armed, so that a
/// dropped build future leaves no processes behind.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) async fn run(
    run: Run<'_>,
    log: &mut BuildLog,
    events: &mut (impl FnMut(BuildEvent) + Send),
) -> std::io::Result<Ended> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + run.timeout;
    let mut child: Child = Command::new("/bin/sh")
        .arg("-c")
        .arg(run.command)
        .current_dir(run.dir)
        .env_clear()
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().expect("a just spawned child has a pid");
    let mut group = GroupGuard(Some(Pid::from_raw(pid as i32)));
    if let Some(process) = crate::leftover::locator_of(pid) {
        events(BuildEvent::CommandSpawned { index: run.index, process });
    }
    log.line(Stream::Sys, &format!("build command {} of {}: {}", run.index + 1, run.total, run.command));

    let mut out = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut err = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let (mut out_buf, mut err_buf) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open) = (true, true);
    let mut sink = Sink { index: run.index, log, events, tail: VecDeque::with_capacity(TAIL_LINES) };
    let mut exited: Option<ExitStatus> = None;
    let timeout = tokio::time::sleep_until(deadline);
    tokio::pin!(timeout);
    // Armed (reset) once the shell has exited.
    let drain = tokio::time::sleep_until(deadline);
    tokio::pin!(drain);

    loop {
        if exited.is_some() && !out_open && !err_open {
            break;
        }
        tokio::select! {
            r = out.read_until(b'\n', &mut out_buf), if out_open => match r {
                Ok(n) if n > 0 && out_buf.last() == Some(&b'\n') => emit(&mut sink, Stream::Out, &mut out_buf),
                _ => {
                    if !out_buf.is_empty() {
                        emit(&mut sink, Stream::Out, &mut out_buf);
                    }
                    out_open = false;
                }
            },
            r = err.read_until(b'\n', &mut err_buf), if err_open => match r {
                Ok(n) if n > 0 && err_buf.last() == Some(&b'\n') => emit(&mut sink, Stream::Err, &mut err_buf),
                _ => {
                    if !err_buf.is_empty() {
                        emit(&mut sink, Stream::Err, &mut err_buf);
                    }
                    err_open = false;
                }
            },
            status = child.wait(), if exited.is_none() => {
                let status = status?;
                // Whatever the command left running in its group (a
                // forgotten `&`) goes with it: a build leaves no processes.
                group.kill();
                exited = Some(convert(status));
                drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            () = &mut drain, if exited.is_some() => {
                sink.log.line(Stream::Sys, "output still held open by a process outside the command's process group; stopped reading it");
                break;
            },
            () = &mut timeout, if exited.is_none() => {
                kill_and_reap(&mut group, &mut child).await;
                sink.log.line(Stream::Sys, &format!("timed out after {}; process group killed", fmt_duration(run.timeout)));
                return Ok(Ended::TimedOut { tail: sink.tail.into() });
            },
            () = run.cancel.cancelled(), if exited.is_none() => {
                kill_and_reap(&mut group, &mut child).await;
                sink.log.line(Stream::Sys, "cancelled; process group killed");
                return Ok(Ended::Cancelled);
            },
        }
    }

    let status = exited.expect("loop ends after exit");
    let duration = started.elapsed();
    sink.log.line(Stream::Sys, &format!("{status} after {}", fmt_duration(duration)));
    Ok(Ended::Exited { status, tail: sink.tail.into(), duration })
}

/// Where output lines go: the log, the events, the tail for error reports.
struct Sink<'l, 'e, E> {
    index: usize,
    log: &'l mut BuildLog,
    events: &'e mut E,
    tail: VecDeque<String>,
}

fn emit<E: FnMut(BuildEvent)>(sink: &mut Sink<'_, '_, E>, stream: Stream, buf: &mut Vec<u8>) {
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    buf.truncate(MAX_LINE);
    let line = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    sink.log.line(stream, &line);
    if sink.tail.len() == TAIL_LINES {
        sink.tail.pop_front();
    }
    sink.tail.push_back(line.clone());
    (sink.events)(BuildEvent::Output { index: sink.index, stream, line });
}

async fn kill_and_reap(group: &mut GroupGuard, child: &mut Child) {
    group.kill();
    let _ = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
}

fn convert(status: std::process::ExitStatus) -> ExitStatus {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus::Code(code),
        (None, Some(sig)) => ExitStatus::Signal(sig),
        (None, None) => ExitStatus::Unknown,
    }
}

pub(crate) fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
