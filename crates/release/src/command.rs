//! Running one build command: `sh -c` in its own process group, held at a
//! gate until its process is recorded (see [`GATE`]), output timestamped
//! into the build log and streamed as events, the whole group killed on
//! timeout, on cancel, and when the command's shell exits.

use crate::{BuildEvent, Stream};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use nonstop_core::build::{NotPermitted, RunPermit};
use nonstop_core::driver::ExitStatus;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

/// The script of the shell a build command is spawned as (`sh -c GATE sh
/// <command>`): before it runs anything of the command, it reads one line
/// from its stdin, a pipe from the builder, which the builder writes only
/// once the command's process (pid and start time) has been recorded (its
/// [`RunPermit`] granted). On `go` it becomes `/bin/sh -c <command>` with
/// stdin on /dev/null: the same process, so the recorded pid and start
/// time and the process group stay the command's. On anything else (the
/// pipe closed: the daemon died before the record, or refused it) it exits
/// 125 without running the command. So a command never runs unrecorded.
pub(crate) const GATE: &str = r#"IFS= read -r go && [ "$go" = go ] || exit 125; exec /bin/sh -c "$1" </dev/null"#;

/// The line that opens the gate.
const GO: &[u8] = b"go\n";

/// How a command ended.
pub(crate) enum Ended {
    Exited {
        status: ExitStatus,
        tail: Vec<String>,
        duration: Duration,
    },
    TimedOut {
        tail: Vec<String>,
    },
    Cancelled,
    /// Not let run: its process could not be recorded. Killed at the gate.
    NotRun(NotPermitted),
    /// Its start time could not be read from `/proc`, so its process could
    /// not be recorded. Killed at the gate.
    Unlocatable {
        pid: u32,
    },
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
        .arg(GATE)
        .arg("sh")
        .arg(run.command)
        .current_dir(run.dir)
        .env_clear()
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().expect("a just spawned child has a pid");
    let mut group = GroupGuard(Some(Pid::from_raw(pid as i32)));
    let mut gate = child.stdin.take().expect("stdin is piped");
    // Held at the gate until its process is recorded.
    let Some(process) = crate::leftover::locator_of(pid) else {
        kill_and_reap(&mut group, &mut child).await;
        return Ok(Ended::Unlocatable { pid });
    };
    let (permit, answer) = RunPermit::new();
    events(BuildEvent::CommandSpawned { index: run.index, process, permit });
    let timeout = tokio::time::sleep_until(deadline);
    tokio::pin!(timeout);
    tokio::select! {
        answer = answer.answer() => match answer {
            Ok(()) => {
                // A shell that died at the gate (killed by someone) closed
                // its end: its exit is seen below.
                let _ = gate.write_all(GO).await;
                drop(gate);
            }
            Err(not) => {
                kill_and_reap(&mut group, &mut child).await;
                log.line(Stream::Sys, &format!("build command {} of {} not run: {not}", run.index + 1, run.total));
                return Ok(Ended::NotRun(not));
            }
        },
        () = &mut timeout => {
            kill_and_reap(&mut group, &mut child).await;
            log.line(Stream::Sys, &format!("timed out after {} before its process was recorded; process group killed", fmt_duration(run.timeout)));
            return Ok(Ended::TimedOut { tail: Vec::new() });
        },
        () = run.cancel.cancelled() => {
            kill_and_reap(&mut group, &mut child).await;
            log.line(Stream::Sys, "cancelled before its process was recorded; process group killed");
            return Ok(Ended::Cancelled);
        },
    }
    log.line(Stream::Sys, &format!("build command {} of {}: {}", run.index + 1, run.total, run.command));

    let mut out = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut err = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let (mut out_buf, mut err_buf) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open) = (true, true);
    let mut sink = Sink { index: run.index, log, events, tail: VecDeque::with_capacity(TAIL_LINES) };
    let mut exited: Option<ExitStatus> = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Read;
    use std::process::{Command, Stdio};

    /// `sh -c GATE sh <command>` with `gate` written to its stdin (then
    /// closed): its exit code and output.
    fn through_gate(command: &str, gate: &[u8]) -> (Option<i32>, String) {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(GATE)
            .arg("sh")
            .arg(command)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(gate);
        drop(stdin);
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        (child.wait().unwrap().code(), out)
    }

    fn direct(command: &str) -> (Option<i32>, String) {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    #[test]
    fn the_gate_runs_nothing_unless_told_go() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let command = format!("touch '{}'", marker.display());
        // The pipe closed (the daemon died before the record), or anything
        // but the whole line.
        for gate in [&b""[..], b"g", b"go", b"no\n", b"go on\n"] {
            assert_eq!(through_gate(&command, gate).0, Some(125), "{gate:?}");
            assert!(!marker.exists(), "ran on {gate:?}");
        }
        assert_eq!(through_gate(&command, GO).0, Some(0));
        assert!(marker.exists());
    }

    #[test]
    fn the_command_runs_as_the_gated_process_with_stdin_on_dev_null() {
        let (code, out) = through_gate("echo $$; cat; echo end", GO);
        assert_eq!(code, Some(0));
        assert!(out.ends_with("\nend\n") && out.lines().count() == 2, "nothing read from stdin: {out:?}");
        assert_eq!(through_gate("exit 7", GO).0, Some(7));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever the command's text (quotes, `$1`, backslashes, new
        /// lines), through the gate it runs as `sh -c` would run it.
        #[test]
        fn a_command_runs_through_the_gate_as_sh_c_runs_it(text in r#"[a-z0-9 '"\\$;|()`\n{}*#=-]{0,24}"#) {
            // `$$` is the shell's pid: two shells, two pids.
            prop_assume!(!text.contains("$$"));
            let command = format!("printf '%s\\n' {text}; echo \"[$0] [$1] [$#]\"");
            prop_assert_eq!(through_gate(&command, GO), direct(&command));
        }
    }
}
