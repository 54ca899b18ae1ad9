//! Zero-downtime restart of the daemon itself (`nonstop upgrade`, SIGUSR2,
//! a systemd reload).
//!
//! The running daemon starts the binary now on disk as its successor and
//! hands it its listening sockets (the proxy's, the API's) as inherited file
//! descriptors, using systemd's socket-activation protocol (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`): the sockets never close, so no connection is refused.
//! The successor says it is ready (`upgrade.ready`), the old daemon stops
//! its engine and releases the state lock, the successor takes the lock,
//! re-adopts the running instances (they never stopped) and says it serves
//! (`upgrade.serving`); only then does the old daemon stop accepting, finish
//! its in-flight requests and exit. Until then both accept on the same
//! sockets, so there is no moment when nobody does.
//!
//! A successor that dies or hangs after it took the lock (a new binary that
//! crashes on this machine's state) must not leave the app without a
//! daemon: the old daemon then starts its own image again
//! (`/proc/self/exe`, which still exists when the file on disk was
//! replaced) as the successor, with the same sockets, and reports the
//! upgrade as failed.
//!
//! Crates: `command-fds` maps file descriptors into the child without
//! unsafe code here; `listenfd` takes them on the other side. Together they
//! also make `nonstop daemon` usable under systemd socket activation.

use crate::home::Home;
use command_fds::{CommandFdExt, FdMapping};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Listening sockets received from a predecessor.
#[derive(Default)]
pub struct Inherited {
    /// Proxy listeners by address.
    pub proxy: HashMap<SocketAddr, std::net::TcpListener>,
    /// The API's unix socket.
    pub api: Option<std::os::unix::net::UnixListener>,
    /// The API's TCP listener, if it had one.
    pub api_tcp: Option<std::net::TcpListener>,
    /// The web dashboard's listener, if it had one.
    pub dashboard: Option<std::net::TcpListener>,
    /// What was wrong with a handed-over descriptor, to be logged (they are
    /// taken before logging starts: see `start_env`).
    pub warnings: Vec<String>,
}

/// Take the sockets passed by a predecessor (or by systemd), once, before
/// any other thread exists (`start_env::capture`). Names:
/// `proxy` (any number), `api`, `api-tcp`, `dashboard`.
pub fn take_inherited() -> Inherited {
    let mut out = Inherited::default();
    if std::env::var_os("LISTEN_FDS").is_none() {
        return out;
    }
    let names: Vec<String> =
        std::env::var("LISTEN_FDNAMES").unwrap_or_default().split(':').map(str::to_string).collect();
    let mut fds = listenfd::ListenFd::from_env();
    for i in 0..fds.len() {
        let name = names.get(i).map(String::as_str).unwrap_or("proxy");
        match name {
            "api" => match fds.take_unix_listener(i) {
                Ok(Some(l)) => out.api = Some(l),
                other => {
                    out.warnings.push(format!("inherited fd {i} ({name}) is not a unix listener: {:?}", other.err()))
                }
            },
            "api-tcp" => match fds.take_tcp_listener(i) {
                Ok(Some(l)) => out.api_tcp = Some(l),
                other => {
                    out.warnings.push(format!("inherited fd {i} ({name}) is not a TCP listener: {:?}", other.err()))
                }
            },
            "dashboard" => match fds.take_tcp_listener(i) {
                Ok(Some(l)) => out.dashboard = Some(l),
                other => {
                    out.warnings.push(format!("inherited fd {i} ({name}) is not a TCP listener: {:?}", other.err()))
                }
            },
            _ => match fds.take_tcp_listener(i) {
                Ok(Some(l)) => match l.local_addr() {
                    Ok(addr) => {
                        out.proxy.insert(addr, l);
                    }
                    Err(e) => out.warnings.push(format!("inherited fd {i}: {e}")),
                },
                other => {
                    out.warnings.push(format!("inherited fd {i} ({name}) is not a TCP listener: {:?}", other.err()))
                }
            },
        }
    }
    // Not for our children.
    for var in ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"] {
        std::env::remove_var(var);
    }
    out
}

fn ready_file(home: &Home) -> PathBuf {
    home.dir.join("upgrade.ready")
}

fn serving_file(home: &Home) -> PathBuf {
    home.dir.join("upgrade.serving")
}

fn announce(home: &Home, file: PathBuf) -> std::io::Result<()> {
    let tmp = home.dir.join(".upgrade.announce.tmp");
    let _ = std::fs::remove_file(&tmp);
    crate::home::write_private(&tmp, std::process::id().to_string().as_bytes())?;
    std::fs::rename(tmp, file)
}

/// Successor side: tell the predecessor that the sockets were taken (it
/// then stops its engine and releases the state lock).
pub fn announce_ready(home: &Home) -> std::io::Result<()> {
    announce(home, ready_file(home))
}

/// Successor side: tell the predecessor that this daemon holds the lock,
/// restored the app and serves every socket it was handed (the
/// predecessor then stops accepting and finishes).
pub fn announce_serving(home: &Home) -> std::io::Result<()> {
    announce(home, serving_file(home))
}

/// How long a successor has from being started to serving.
pub const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a successor has to take the sockets (say it is ready).
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a successor did not take over.
#[derive(Debug, thiserror::Error)]
pub enum SuccessorError {
    /// The daemon's log (the successor's stdout and stderr) cannot be
    /// opened.
    #[error(transparent)]
    Log(Box<dyn std::error::Error + Send + Sync + 'static>),
    #[error(transparent)]
    LogClone(std::io::Error),
    #[error(transparent)]
    Sockets(#[from] command_fds::FdMappingCollision),
    #[error("cannot start {}: {source}", exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the new daemon exited at start ({status}); see {}", log.display())]
    ExitedAtStart { status: std::process::ExitStatus, log: PathBuf },
    #[error("the new daemon (pid {pid}) exited before it served ({status}); see {}", log.display())]
    ExitedBeforeServing { pid: u32, status: std::process::ExitStatus, log: PathBuf },
    #[error("the new daemon (pid {pid}) did not {stage}; it was stopped (see {})", log.display())]
    Late { pid: u32, stage: Stage, log: PathBuf },
    /// The wait for it was lost (its thread panicked).
    #[error(transparent)]
    Lost(#[from] tokio::task::JoinError),
}

/// What a successor must do in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Take the sockets ([`announce_ready`]).
    Ready,
    /// Serve ([`announce_serving`]).
    Serving,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Ready => write!(f, "take the sockets within {}s", READY_TIMEOUT.as_secs()),
            Stage::Serving => write!(f, "serve within {}s of its start", TAKEOVER_TIMEOUT.as_secs()),
        }
    }
}

/// How a wait for a successor ended, when not in time.
enum Missed {
    Exited(std::process::ExitStatus),
    Late,
}

/// A daemon started by [`spawn_successor`] that has taken the sockets.
pub struct Successor {
    child: std::process::Child,
    started: Instant,
}

impl Successor {
    /// Wait until it serves ([`announce_serving`]): its pid, or why not.
    /// A successor that exits first or is not serving within
    /// [`TAKEOVER_TIMEOUT`] of its start is stopped.
    pub fn wait_serving(mut self, home: &Home) -> Result<u32, SuccessorError> {
        let pid = self.child.id();
        let log = home.daemon_log();
        match wait_for(serving_file(home), &mut self.child, self.started + TAKEOVER_TIMEOUT) {
            Ok(()) => {
                // Reap it when it ends, whenever that is.
                std::thread::spawn(move || {
                    let _ = self.child.wait();
                });
                Ok(pid)
            }
            Err(Missed::Exited(status)) => Err(SuccessorError::ExitedBeforeServing { pid, status, log }),
            Err(Missed::Late) => Err(SuccessorError::Late { pid, stage: Stage::Serving, log }),
        }
    }
}

/// Poll for `file` to hold `child`'s pid until `deadline`; a child that
/// exits first has missed it, and one that missed the deadline is killed.
fn wait_for(file: PathBuf, child: &mut std::process::Child, deadline: Instant) -> Result<(), Missed> {
    let pid = child.id().to_string();
    loop {
        if std::fs::read_to_string(&file).is_ok_and(|s| s.trim() == pid) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Missed::Exited(status));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Missed::Late);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Predecessor side: start `exe daemon` with `sockets` and wait until it
/// has taken them (then [`Successor::wait_serving`]). On failure nothing
/// changed: the caller keeps serving.
///
/// `upgrade_exe` is what the successor starts on its own next upgrade when
/// it is not `exe` itself: a predecessor that starts its own image again
/// (`/proc/self/exe`) because the binary on disk failed passes that binary's
/// path, so that the next upgrade tries the path again.
pub fn spawn_successor(
    exe: &Path,
    upgrade_exe: Option<&Path>,
    home: &Home,
    listen: Listen,
    sockets: Vec<(&'static str, OwnedFd)>,
) -> Result<Successor, SuccessorError> {
    let _ = std::fs::remove_file(ready_file(home));
    let _ = std::fs::remove_file(serving_file(home));
    let log = home.open_daemon_log().map_err(|e| SuccessorError::Log(e.into()))?;
    let log2 = log.try_clone().map_err(SuccessorError::LogClone)?;
    let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
    let mappings: Vec<FdMapping> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (_, fd))| FdMapping { parent_fd: fd, child_fd: 3 + i as i32 })
        .collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("daemon")
        .arg("--no-keeper")
        .env("NONSTOP_HOME", home.path())
        .env("NONSTOP_DETACH", "1")
        .env("NONSTOP_UPGRADE", "1")
        .env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        // The same dashboard choice, whether it came from the flag or the
        // variable (given here: setting our own environment is racy).
        .env("NONSTOP_DASHBOARD_LISTEN", listen.dashboard.to_string())
        .env_remove("LISTEN_PID")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    match listen.api {
        Some(a) => cmd.env("NONSTOP_API_LISTEN", a.to_string()),
        None => cmd.env_remove("NONSTOP_API_LISTEN"),
    };
    // The successor reports to our keeper, if we have one.
    match crate::keeper::kept_by() {
        Some(path) => cmd.env(crate::keeper::SOCKET_VAR, path),
        None => cmd.env_remove(crate::keeper::SOCKET_VAR),
    };
    // And uses its data plane.
    match crate::plane::from_env() {
        Some(path) => cmd.env(crate::plane::SOCKET_VAR, path),
        None => cmd.env_remove(crate::plane::SOCKET_VAR),
    };
    match upgrade_exe {
        Some(path) => cmd.env(UPGRADE_EXE_VAR, path),
        None => cmd.env_remove(UPGRADE_EXE_VAR),
    };
    cmd.fd_mappings(mappings)?;
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| SuccessorError::Spawn { exe: exe.to_path_buf(), source })?;
    let log = home.daemon_log();
    match wait_for(ready_file(home), &mut child, started + READY_TIMEOUT) {
        Ok(()) => Ok(Successor { child, started }),
        Err(Missed::Exited(status)) => Err(SuccessorError::ExitedAtStart { status, log }),
        Err(Missed::Late) => Err(SuccessorError::Late { pid: child.id(), stage: Stage::Ready, log }),
    }
}

/// The daemon's choices of where to listen (from its flags or
/// variables), which a successor is given on its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// `--api-listen`.
    pub api: Option<SocketAddr>,
    /// `--dashboard-listen`.
    pub dashboard: crate::cli::DashboardListen,
}

/// Set on a successor started from the predecessor's own image: the path
/// to start on the next upgrade (see [`spawn_successor`]).
pub const UPGRADE_EXE_VAR: &str = "NONSTOP_UPGRADE_EXE";

/// Tell systemd (if it supervises us: `Type=notify`, `NotifyAccess=all`).
pub fn sd_notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let path = path.to_string_lossy().into_owned();
    let r = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| sock.send_to_addr(message.as_bytes(), &a))
    } else {
        sock.send_to(message.as_bytes(), &path)
    };
    if let Err(e) = r {
        tracing::debug!("sd_notify: {e}");
    }
}
