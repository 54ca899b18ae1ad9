//! The keeper: a long-lived process that runs the data plane (the proxy)
//! and starts a new daemon when the one it keeps dies.
//!
//! `nonstop daemon` (what `up` starts in the background, and what the
//! systemd unit runs) is the keeper. It runs the data plane
//! (`crate::plane::server`: the proxy, its listeners, every client
//! connection, health checks, static files), starts the real daemon (the
//! control plane) as its child, and stays beside it:
//!
//! - the daemon drives the data plane over `$NONSTOP_HOME/plane.sock`
//!   (`crate::plane`), and sends the keeper a duplicate of each of its API
//!   sockets over another unix stream socket (`$NONSTOP_HOME/keeper.sock`,
//!   0600; one line per message, a socket passed with `SCM_RIGHTS` beside
//!   its `hold` line), and tells it when it serves and when it stops on
//!   purpose;
//! - when the daemon it keeps dies without having said it stops (SIGKILL,
//!   the OOM killer, a panic), nothing of the proxy goes with it: requests
//!   in flight are answered, new ones served, health checks go on; the API
//!   sockets stay open in the keeper, so commands wait in the backlog; the
//!   keeper starts a daemon again at once (the binary now on disk) and
//!   hands it the API sockets with the socket-activation protocol the
//!   upgrade already uses (`LISTEN_FDS`); the new daemon re-adopts the
//!   running instances and resyncs with the data plane;
//! - a daemon upgraded in place (`nonstop upgrade`) hands over to its
//!   successor as before; the successor connects to the keeper and the
//!   data plane too and says it serves, and from then on it is the one
//!   kept. The data plane is not upgraded.
//!
//! (A daemon started by a keeper of an earlier version runs its own proxy
//! and hands the keeper its proxy sockets too: `hold proxy`, `release`.)
//!
//! The keeper is the process systemd (or `up`) knows: SIGTERM and SIGINT
//! are passed on to the daemon (which stops, leaving the app running, as
//! before) and the keeper exits after it; SIGUSR2 (`systemctl reload`) is
//! passed on and upgrades the daemon. A daemon that fails before it ever
//! served ends the keeper with the same failure, so `up` reports it instead
//! of a keeper restarting a broken daemon forever; later failures are
//! retried with a growing delay (see [`policy`]).

use crate::home::Home;
use anyhow::Context;
use command_fds::{CommandFdExt, FdMapping};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Set for a daemon that a keeper keeps: the keeper's socket.
pub const SOCKET_VAR: &str = "NONSTOP_KEEPER_SOCKET";
/// Set by the keeper on a daemon it starts after one died: why.
pub const RESTART_VAR: &str = "NONSTOP_KEEPER_RESTART";

/// How long the keeper waits for the daemon to stop when it is told to
/// stop itself (in-flight requests get 35 s in the daemon).
const STOP_WAIT: Duration = Duration::from_secs(45);

/// What kind of listening socket the daemon hands over; the names are the
/// ones `LISTEN_FDNAMES` uses (see `upgrade::take_inherited`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Proxy,
    Api,
    ApiTcp,
    /// The web dashboard's listener.
    Dashboard,
}

impl SocketKind {
    pub fn name(self) -> &'static str {
        match self {
            SocketKind::Proxy => "proxy",
            SocketKind::Api => "api",
            SocketKind::ApiTcp => "api-tcp",
            SocketKind::Dashboard => "dashboard",
        }
    }

    fn parse(s: &str) -> Option<SocketKind> {
        match s {
            "proxy" => Some(SocketKind::Proxy),
            "api" => Some(SocketKind::Api),
            "api-tcp" => Some(SocketKind::ApiTcp),
            "dashboard" => Some(SocketKind::Dashboard),
            _ => None,
        }
    }
}

/// A message from a daemon to its keeper (one line each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Keep this listening socket (passed with the line).
    Hold(SocketKind),
    /// The proxy no longer listens on this address: close it.
    Release(SocketAddr),
    /// This daemon serves: from now on it is the one kept.
    Serving,
    /// This daemon stops on purpose (`down`, SIGTERM): do not start
    /// another; the keeper exits once it is gone.
    Stopping,
}

impl Message {
    pub fn encode(&self) -> String {
        match self {
            Message::Hold(kind) => format!("hold {}", kind.name()),
            Message::Release(addr) => format!("release {addr}"),
            Message::Serving => "serving".into(),
            Message::Stopping => "stopping".into(),
        }
    }

    pub fn decode(s: &str) -> Option<Message> {
        let (word, rest) = s.split_once(' ').unwrap_or((s, ""));
        match (word, rest) {
            ("hold", kind) => SocketKind::parse(kind).map(Message::Hold),
            ("release", addr) => addr.parse().ok().map(Message::Release),
            ("serving", "") => Some(Message::Serving),
            ("stopping", "") => Some(Message::Stopping),
            _ => None,
        }
    }
}

/// The keeper's decisions, without I/O: what to do when the kept daemon is
/// gone. Time is a parameter.
pub mod policy {
    use std::time::{Duration, Instant};

    /// A restart sooner than this after the previous start counts as a
    /// crash loop and is delayed.
    pub const STABLE_AFTER: Duration = Duration::from_secs(10);
    /// The longest delay between two restarts.
    pub const MAX_DELAY: Duration = Duration::from_secs(30);

    /// How the kept daemon ended, as far as the keeper decides on it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Ended {
        /// It said it stops on purpose, or exited with status 0.
        OnPurpose,
        /// It refused its state directory (exit status 2: an unsafe home, a
        /// damaged store): starting it again changes nothing until someone
        /// acts (`nonstop doctor`).
        Refused,
        /// Anything else: a signal, a failure exit, a crash.
        Died,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Decision {
        /// Start a daemon again after this delay (zero: at once).
        Restart { after: Duration },
        /// Exit with this status: 0 after a stop on purpose, 2 after a
        /// refusal, 1 when the very first daemon failed before it served.
        Exit { code: i32 },
    }

    /// What the keeper knows of its daemons so far.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct History {
        /// Some daemon it kept has served.
        pub ever_served: bool,
        /// When the last daemon was started, and how many restarts in a
        /// row came sooner than [`STABLE_AFTER`] after their start.
        pub last_start: Instant,
        pub quick_failures: u32,
    }

    impl History {
        pub fn new(now: Instant) -> History {
            History { ever_served: false, last_start: now, quick_failures: 0 }
        }

        /// The kept daemon is gone: what now. Records the decision.
        pub fn on_gone(&mut self, ended: Ended, now: Instant) -> Decision {
            match ended {
                Ended::OnPurpose => return Decision::Exit { code: 0 },
                Ended::Refused => return Decision::Exit { code: 2 },
                Ended::Died => {}
            }
            if !self.ever_served {
                return Decision::Exit { code: 1 };
            }
            let quick = now.saturating_duration_since(self.last_start) < STABLE_AFTER;
            self.quick_failures = if quick { self.quick_failures.saturating_add(1) } else { 0 };
            Decision::Restart { after: delay(self.quick_failures) }
        }

        pub fn started(&mut self, now: Instant) {
            self.last_start = now;
        }
    }

    /// No delay for a daemon that had run a while; then 1, 2, 4 ... up to
    /// [`MAX_DELAY`] while it keeps failing soon after its start.
    pub fn delay(quick_failures: u32) -> Duration {
        match quick_failures {
            0 => Duration::ZERO,
            n => Duration::from_secs(1u64 << (n - 1).min(5)).min(MAX_DELAY),
        }
    }
}

// ---------------------------------------------------------------- daemon side

/// The daemon's end: a connection to its keeper. Sending never blocks for
/// long (a line on a local socket that the keeper reads at once); a
/// failure is logged and otherwise ignored: a daemon without a keeper
/// still serves.
pub struct KeeperLink {
    stream: Mutex<std::os::unix::net::UnixStream>,
    path: PathBuf,
}

impl std::fmt::Debug for KeeperLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeeperLink").field("path", &self.path).finish()
    }
}

/// The keeper socket this daemon was started with ([`SOCKET_VAR`]), for
/// its successor.
pub fn kept_by() -> Option<&'static Path> {
    crate::start_env::get().keeper_socket.as_deref()
}

impl KeeperLink {
    /// Connect to the keeper named by [`SOCKET_VAR`] when this daemon
    /// started, if any.
    pub fn from_env() -> Option<KeeperLink> {
        let path = kept_by()?;
        match Self::connect(path) {
            Ok(link) => Some(link),
            Err(e) => {
                tracing::warn!("cannot reach the keeper on {}: {e}; running without one", path.display());
                None
            }
        }
    }

    pub fn connect(path: &Path) -> std::io::Result<KeeperLink> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        Ok(KeeperLink { stream: Mutex::new(stream), path: path.to_path_buf() })
    }

    fn send(&self, message: &Message, socket: Option<BorrowedFd<'_>>) {
        let text = format!("{}\n", message.encode());
        let fd = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let fds: Vec<BorrowedFd<'_>> = socket.into_iter().collect();
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            tracing::warn!("keeper: cannot pass a socket ({text})");
            return;
        }
        // One line is a few bytes: a short write does not happen on a
        // local socket with room, and a full one times out (logged).
        let r = rustix::net::sendmsg(&*fd, &[IoSlice::new(text.as_bytes())], &mut control, SendFlags::NOSIGNAL);
        match r {
            Ok(n) if n == text.len() => {}
            Ok(n) => tracing::warn!("keeper: told it only {n} bytes of `{}`", text.trim_end()),
            Err(e) => tracing::warn!("keeper: cannot tell it `{}`: {e}", text.trim_end()),
        }
    }

    /// Keep this listening socket through a crash.
    pub fn hold(&self, kind: SocketKind, socket: BorrowedFd<'_>) {
        self.send(&Message::Hold(kind), Some(socket));
    }

    pub fn release(&self, addr: SocketAddr) {
        self.send(&Message::Release(addr), None);
    }

    pub fn serving(&self) {
        self.send(&Message::Serving, None);
    }

    pub fn stopping(&self) {
        self.send(&Message::Stopping, None);
    }
}

// ---------------------------------------------------------------- keeper side

pub fn socket_path(home: &Home) -> PathBuf {
    home.dir.join("keeper.sock")
}

fn lock_path(home: &Home) -> PathBuf {
    home.dir.join("keeper.lock")
}

pub fn pid_path(home: &Home) -> PathBuf {
    home.dir.join("keeper.pid")
}

/// A listening socket the keeper holds.
struct Held {
    kind: SocketKind,
    fd: OwnedFd,
    /// The TCP address, for `Release` and to replace a duplicate.
    addr: Option<SocketAddr>,
}

fn tcp_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    match rustix::net::getsockname(fd).ok()? {
        a if a.address_family() == AddressFamily::INET => {
            let v4 = rustix::net::SocketAddrV4::try_from(a).ok()?;
            Some(SocketAddr::V4(v4))
        }
        a if a.address_family() == AddressFamily::INET6 => {
            let v6 = rustix::net::SocketAddrV6::try_from(a).ok()?;
            Some(SocketAddr::V6(v6))
        }
        _ => None,
    }
}

/// The sockets held, one per kind and address: a newer one replaces an
/// older duplicate (the daemon hands each over again when it starts).
#[derive(Default)]
struct HeldSockets(Vec<Held>);

impl HeldSockets {
    fn hold(&mut self, kind: SocketKind, fd: OwnedFd) {
        let addr = tcp_addr(fd.as_fd());
        self.0.retain(|h| !(h.kind == kind && h.addr == addr));
        self.0.push(Held { kind, fd, addr });
    }

    fn release(&mut self, addr: SocketAddr) {
        self.0.retain(|h| !(h.kind == SocketKind::Proxy && h.addr == Some(addr)));
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self
            .0
            .iter()
            .map(|h| match h.addr {
                Some(a) => format!("{} {a}", h.kind.name()),
                None => h.kind.name().to_string(),
            })
            .collect();
        if names.is_empty() {
            "no sockets".into()
        } else {
            names.join(", ")
        }
    }
}

/// What the keeper's connection readers report.
enum Event {
    Message {
        pid: u32,
        message: Message,
        fd: Option<OwnedFd>,
    },
    Closed {
        pid: u32,
    },
    /// A daemon that is not our child (an upgrade's successor) is gone: its
    /// connection closed, then its process.
    Exited {
        pid: u32,
    },
}

/// Whether process `pid` still runs (a zombie does not; nor, here, one
/// whose `/proc` entry cannot be read).
fn process_runs(pid: u32) -> bool {
    matches!(nonstop_supervisor::procinfo::stat(pid), Ok(Some(s)) if !s.is_zombie())
}

/// How to start a daemon.
pub struct DaemonArgs {
    pub api_listen: Option<SocketAddr>,
    pub dashboard_listen: crate::cli::DashboardListen,
    pub proxy_workers: Option<u32>,
}

/// The binary to start: the one on disk at the path we were started from,
/// also when that file was replaced since (an upgrade), so a restarted
/// daemon is the newest version.
fn daemon_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the nonstop executable")?;
    if exe.exists() {
        return Ok(exe);
    }
    let s = exe.to_string_lossy();
    if let Some(p) = s.strip_suffix(" (deleted)") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok(p);
        }
    }
    Ok(PathBuf::from("/proc/self/exe"))
}

fn spawn_daemon(
    home: &Home,
    args: &DaemonArgs,
    held: &HeldSockets,
    restart_reason: Option<&str>,
) -> anyhow::Result<tokio::process::Child> {
    let exe = daemon_exe()?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("daemon")
        .arg("--no-keeper")
        .env("NONSTOP_HOME", home.path())
        .env(SOCKET_VAR, socket_path(home))
        .env(crate::plane::SOCKET_VAR, crate::plane::socket_path(home))
        .env_remove("NONSTOP_DETACH")
        .env_remove("NONSTOP_UPGRADE")
        .env_remove("LISTEN_PID")
        .stdin(std::process::Stdio::null());
    if let Some(n) = args.proxy_workers {
        cmd.arg("--proxy-workers").arg(n.to_string());
    }
    match args.api_listen {
        Some(a) => cmd.env("NONSTOP_API_LISTEN", a.to_string()),
        None => cmd.env_remove("NONSTOP_API_LISTEN"),
    };
    cmd.env("NONSTOP_DASHBOARD_LISTEN", args.dashboard_listen.to_string());
    match restart_reason {
        Some(r) => cmd.env(RESTART_VAR, r),
        None => cmd.env_remove(RESTART_VAR),
    };
    // The proxy's sockets stay with the data plane: a daemon serves only
    // its API on what it is handed.
    let handed: Vec<&Held> = held.0.iter().filter(|h| h.kind != SocketKind::Proxy).collect();
    if handed.is_empty() {
        cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
    } else {
        let names: Vec<&str> = handed.iter().map(|h| h.kind.name()).collect();
        let mut mappings = Vec::new();
        for (i, h) in handed.iter().enumerate() {
            let fd = h.fd.try_clone().context("cannot duplicate a held socket")?;
            mappings.push(FdMapping { parent_fd: fd, child_fd: 3 + i as i32 });
        }
        cmd.env("LISTEN_FDS", names.len().to_string()).env("LISTEN_FDNAMES", names.join(":"));
        cmd.fd_mappings(mappings).map_err(|e| anyhow::anyhow!("cannot pass the sockets: {e}"))?;
    }
    let child = tokio::process::Command::from(cmd)
        .spawn()
        .with_context(|| format!("cannot start the daemon ({})", exe.display()))?;
    Ok(child)
}

fn bind_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path); // stale: we hold the keeper lock
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Read one connection's lines until it closes. A socket passed with a
/// `hold` line arrives with (or before) the line's bytes: received sockets
/// wait in order for the `hold` lines that claim them.
async fn read_connection(conn: tokio::net::UnixStream, tx: mpsc::UnboundedSender<Event>) {
    let pid = rustix::net::sockopt::socket_peercred(&conn).map(|c| c.pid.as_raw_nonzero().get() as u32).unwrap_or(0);
    let mut pending = Vec::<u8>::new();
    let mut fds = std::collections::VecDeque::<OwnedFd>::new();
    loop {
        if conn.readable().await.is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = conn.try_io(tokio::io::Interest::READABLE, || {
            rustix::net::recvmsg(
                &conn,
                &mut [std::io::IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            )
            .map_err(std::io::Error::from)
        });
        let n = match r {
            Ok(msg) if msg.bytes == 0 => break,
            Ok(msg) => msg.bytes,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]).into_owned();
            match Message::decode(&text) {
                Some(message) => {
                    let fd = if matches!(message, Message::Hold(_)) { fds.pop_front() } else { None };
                    let _ = tx.send(Event::Message { pid, message, fd });
                }
                None => tracing::warn!("keeper: daemon {pid} sent {text:?}, which it does not understand"),
            }
        }
        if pending.len() > 4096 {
            tracing::warn!("keeper: daemon {pid} sent a line of over 4 KiB; closing its connection");
            break;
        }
    }
    let _ = tx.send(Event::Closed { pid });
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => {
            let name = nix::sys::signal::Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
            format!("killed by signal {s} ({name})")
        }
        _ => status.to_string(),
    }
}

fn signal_pid(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nonstop_supervisor::procinfo::signal_process(pid, signal);
}

/// Run as the keeper until the daemon stops on purpose: the exit code.
pub async fn run(home: Home, args: DaemonArgs) -> anyhow::Result<i32> {
    use nix::sys::signal::Signal;
    use policy::{Decision, Ended};
    // The data plane serves clients here: as many descriptors as allowed.
    crate::limits::raise_fd_limit();
    home.create()?;
    // One keeper per home.
    let _lock = crate::daemon::take_lock(&home, &lock_path(&home), false)?;
    crate::home::write_private(&pid_path(&home), std::process::id().to_string().as_bytes())?;
    let listener = bind_socket(&socket_path(&home))?;

    // Sockets systemd passed us (socket activation): the proxy's go to the
    // data plane, the API's are held for the daemons.
    let mut held = HeldSockets::default();
    let inherited = crate::start_env::get().take_inherited();
    for warning in &inherited.warnings {
        tracing::warn!("{warning}");
    }
    let plane = crate::plane::server::DataPlane::new(&home, inherited.proxy);
    plane.serve(bind_socket(&crate::plane::socket_path(&home))?);
    // The proxy's memory is here now: give freed memory back when idle.
    let trim = tokio_util::sync::CancellationToken::new();
    tokio::spawn(nonstop_supervisor::memory::trim_when_idle(trim.clone()));
    if let Some(l) = inherited.api {
        held.hold(SocketKind::Api, OwnedFd::from(l));
    }
    if let Some(l) = inherited.api_tcp {
        held.hold(SocketKind::ApiTcp, OwnedFd::from(l));
    }
    if let Some(l) = inherited.dashboard {
        held.hold(SocketKind::Dashboard, OwnedFd::from(l));
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let (Ok(mut term), Ok(mut int), Ok(mut usr2)) = (
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()),
    ) else {
        anyhow::bail!("cannot watch signals");
    };

    let mut history = policy::History::new(Instant::now());
    // Our child and its pid (tokio forgets the pid once it is reaped).
    let mut child = Some(spawn_daemon(&home, &args, &held, None)?);
    let mut child_pid: u32 = child.as_ref().and_then(|c| c.id()).unwrap_or(0);
    // The daemon kept: the one that last said it serves, else the one we
    // started last.
    let mut kept: u32 = child_pid;
    let mut stopping_pids: Vec<u32> = Vec::new();
    let mut told_to_stop = false;
    let mut stop_deadline: Option<tokio::time::Instant> = None;
    let mut restart_at: Option<(tokio::time::Instant, String)> = None;
    let mut last_exit: Option<String> = None;
    tracing::info!("keeper {} started daemon {kept}", std::process::id());

    let code = loop {
        let child_exit = async {
            match child.as_mut() {
                Some(c) => c.wait().await,
                None => std::future::pending().await,
            }
        };
        let restart_timer = async {
            match &restart_at {
                Some((at, _)) => tokio::time::sleep_until(*at).await,
                None => std::future::pending().await,
            }
        };
        let stop_timer = async {
            match stop_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        // What the select saw, decided on below (outside the borrows).
        enum Seen {
            Gone { pid: u32, how: Option<String> },
            Nothing,
        }
        let seen = tokio::select! {
            r = listener.accept() => {
                match r {
                    Ok((conn, _)) => { tokio::spawn(read_connection(conn, tx.clone())); }
                    Err(e) => {
                        tracing::warn!("keeper: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Seen::Nothing
            }
            Some(event) = rx.recv() => match event {
                Event::Message { pid, message, fd } => {
                    match message {
                        Message::Hold(kind) => match fd {
                            Some(fd) => held.hold(kind, fd),
                            None => tracing::warn!("keeper: daemon {pid} said hold {} without a socket", kind.name()),
                        },
                        Message::Release(addr) => held.release(addr),
                        Message::Serving => {
                            if kept != pid {
                                tracing::info!("keeper: daemon {pid} serves; it is the one kept now");
                            }
                            kept = pid;
                            history.ever_served = true;
                            tracing::info!("keeper holds {}", held.describe());
                            crate::upgrade::sd_notify("READY=1\nSTATUS=serving");
                        }
                        Message::Stopping => stopping_pids.push(pid),
                    }
                    Seen::Nothing
                }
                Event::Closed { pid } => {
                    // Its connection closes as it exits, a moment before the
                    // process is gone: wait for that (bounded), so that
                    // whoever waits for the keeper finds the daemon gone too.
                    // Our child's exit is seen by reaping it.
                    if !(child.is_some() && child_pid == pid) {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                            while process_runs(pid) && tokio::time::Instant::now() < deadline {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            let _ = tx.send(Event::Exited { pid });
                        });
                    }
                    Seen::Nothing
                }
                Event::Exited { pid } => Seen::Gone { pid, how: None },
            },
            status = child_exit => {
                let how = match status { Ok(s) => describe_exit(s), Err(e) => e.to_string() };
                child = None;
                Seen::Gone { pid: child_pid, how: Some(how) }
            }
            _ = restart_timer => {
                let reason = restart_at.take().map(|(_, r)| r).unwrap_or_default();
                history.started(Instant::now());
                match spawn_daemon(&home, &args, &held, Some(&reason)) {
                    Ok(c) => {
                        child_pid = c.id().unwrap_or(0);
                        kept = child_pid;
                        tracing::info!("keeper started daemon {kept} with {}", held.describe());
                        child = Some(c);
                    }
                    Err(e) => {
                        tracing::error!("keeper: {e:#}; trying again");
                        let after = policy::delay(history.quick_failures.max(1));
                        restart_at = Some((tokio::time::Instant::now() + after, reason));
                    }
                }
                Seen::Nothing
            }
            _ = stop_timer => {
                tracing::warn!("keeper: daemon {kept} did not stop within {}s; the keeper exits", STOP_WAIT.as_secs());
                break 0;
            }
            _ = term.recv() => { told_to_stop = true; Seen::Nothing }
            _ = int.recv() => { told_to_stop = true; Seen::Nothing }
            _ = usr2.recv() => {
                tracing::info!("keeper: SIGUSR2: upgrading daemon {kept}");
                signal_pid(kept, Signal::SIGUSR2);
                Seen::Nothing
            }
        };
        if told_to_stop && stop_deadline.is_none() {
            tracing::info!("keeper: stopping daemon {kept} (the app keeps running)");
            if restart_at.take().is_some() || kept == 0 {
                break 0;
            }
            stopping_pids.push(kept);
            signal_pid(kept, Signal::SIGTERM);
            stop_deadline = Some(tokio::time::Instant::now() + STOP_WAIT);
        }
        let Seen::Gone { pid, how } = seen else { continue };
        // A daemon that is not the kept one (the predecessor of an upgrade,
        // a successor that failed before it served) is not our business.
        if pid != kept || pid == 0 {
            continue;
        }
        if let Some(how) = how {
            last_exit = Some(how);
        }
        let ended = if stopping_pids.contains(&pid) || last_exit.as_deref() == Some("exited with status 0") {
            Ended::OnPurpose
        } else if last_exit.as_deref() == Some("exited with status 2") {
            Ended::Refused
        } else {
            Ended::Died
        };
        let how = last_exit.take().unwrap_or_else(|| "ended without saying it stops".to_string());
        match history.on_gone(ended, Instant::now()) {
            Decision::Exit { code } => {
                match ended {
                    Ended::Refused => tracing::error!(
                        "keeper: daemon {pid} refused the state directory; the keeper exits (see `nonstop doctor`)"
                    ),
                    Ended::Died => tracing::error!("keeper: daemon {pid} {how} before it served; the keeper gives up"),
                    Ended::OnPurpose => {}
                }
                break code;
            }
            Decision::Restart { after } => {
                let reason = format!("the previous daemon (pid {pid}) {how}");
                tracing::error!(
                    "keeper: daemon {pid} {how}; starting a new one {}with {} (connections wait meanwhile)",
                    if after.is_zero() { String::new() } else { format!("in {}s ", after.as_secs()) },
                    held.describe()
                );
                kept = 0;
                restart_at = Some((tokio::time::Instant::now() + after, reason));
            }
        }
    };
    // The data plane last: requests in flight finish.
    plane.stop().await;
    trim.cancel();
    let _ = std::fs::remove_file(crate::plane::socket_path(&home));
    let _ = std::fs::remove_file(socket_path(&home));
    let _ = std::fs::remove_file(pid_path(&home));
    tracing::info!("keeper {} stopped", std::process::id());
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::policy::{delay, Decision, Ended, History, MAX_DELAY, STABLE_AFTER};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Hold(SocketKind::Proxy),
            Message::Hold(SocketKind::Api),
            Message::Hold(SocketKind::ApiTcp),
            Message::Hold(SocketKind::Dashboard),
            Message::Release("127.0.0.1:8080".parse().unwrap()),
            Message::Release("[::1]:443".parse().unwrap()),
            Message::Serving,
            Message::Stopping,
        ] {
            assert_eq!(Message::decode(&m.encode()), Some(m.clone()), "{m:?}");
        }
        for bad in ["", "hold", "hold sockets", "release", "release here", "serving now", "STOP"] {
            assert_eq!(Message::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_daemon_that_never_served_ends_the_keeper() {
        let t0 = Instant::now();
        let mut h = History::new(t0);
        assert_eq!(h.on_gone(Ended::Died, t0 + Duration::from_secs(100)), Decision::Exit { code: 1 });
        assert_eq!(h.on_gone(Ended::OnPurpose, t0), Decision::Exit { code: 0 });
    }

    #[test]
    fn a_refusal_is_not_retried_even_after_serving() {
        let t0 = Instant::now();
        let mut h = History::new(t0);
        h.ever_served = true;
        assert_eq!(h.on_gone(Ended::Refused, t0 + Duration::from_secs(100)), Decision::Exit { code: 2 });
    }

    #[test]
    fn a_crash_after_serving_restarts_at_once_then_backs_off_while_it_repeats() {
        let t0 = Instant::now();
        let mut h = History::new(t0);
        h.ever_served = true;
        let t1 = t0 + Duration::from_secs(3600);
        assert_eq!(h.on_gone(Ended::Died, t1), Decision::Restart { after: Duration::ZERO });
        h.started(t1);
        assert_eq!(
            h.on_gone(Ended::Died, t1 + Duration::from_secs(1)),
            Decision::Restart { after: Duration::from_secs(1) }
        );
        h.started(t1 + Duration::from_secs(2));
        assert_eq!(
            h.on_gone(Ended::Died, t1 + Duration::from_secs(3)),
            Decision::Restart { after: Duration::from_secs(2) }
        );
        // Ran long enough: the count starts over.
        h.started(t1 + Duration::from_secs(10));
        assert_eq!(h.on_gone(Ended::Died, t1 + Duration::from_secs(100)), Decision::Restart { after: Duration::ZERO });
    }

    #[test]
    fn file_descriptors_pass_through_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = bind_socket(&path).unwrap();
            let link = KeeperLink::connect(&path).unwrap();
            let (conn, _) = listener.accept().await.unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            tokio::spawn(read_connection(conn, tx));
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = tcp.local_addr().unwrap();
            link.hold(SocketKind::Proxy, tcp.as_fd());
            link.serving();
            drop(tcp);
            let Some(Event::Message { pid, message: Message::Hold(SocketKind::Proxy), fd: Some(fd) }) = rx.recv().await
            else {
                panic!("expected a hold with a socket")
            };
            assert_eq!(pid, std::process::id());
            // The socket still listens in the keeper's hands.
            assert_eq!(tcp_addr(fd.as_fd()), Some(addr));
            assert!(std::net::TcpStream::connect(addr).is_ok());
            assert!(matches!(rx.recv().await, Some(Event::Message { message: Message::Serving, fd: None, .. })));
            drop(link);
            assert!(matches!(rx.recv().await, Some(Event::Closed { .. })));
        });
    }

    proptest! {
        /// Whatever the sequence of crashes: never an exit while the
        /// daemon did not stop on purpose after it served, and the delay
        /// stays within bounds; a daemon that ran STABLE_AFTER restarts
        /// at once.
        #[test]
        fn restarts_are_bounded(gaps in proptest::collection::vec(0u64..30_000, 1..40)) {
            let t0 = Instant::now();
            let mut h = History::new(t0);
            h.ever_served = true;
            let mut now = t0;
            for gap in gaps {
                now += Duration::from_millis(gap);
                match h.on_gone(Ended::Died, now) {
                    Decision::Restart { after } => {
                        prop_assert!(after <= MAX_DELAY);
                        if Duration::from_millis(gap) >= STABLE_AFTER {
                            prop_assert_eq!(after, Duration::ZERO);
                        }
                        now += after;
                        h.started(now);
                    }
                    Decision::Exit { .. } => prop_assert!(false, "exited while it should keep the daemon"),
                }
            }
        }
    }

    #[test]
    fn delays_grow_and_cap() {
        assert_eq!(delay(0), Duration::ZERO);
        assert_eq!(delay(1), Duration::from_secs(1));
        assert_eq!(delay(3), Duration::from_secs(4));
        assert_eq!(delay(100), MAX_DELAY);
    }
}
