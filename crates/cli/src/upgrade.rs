//! Zero-downtime restart of the daemon itself (`nonstop upgrade`, SIGUSR2,
//! a systemd reload).
//!
//! The running daemon starts the binary now on disk as its successor and
//! hands it its listening sockets (the proxy's, the API's) as inherited file
//! descriptors, using systemd's socket-activation protocol (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`): the sockets never close, so no connection is refused.
//! The successor says it is ready (`upgrade.ready`), the old daemon stops
//! its engine and releases the state lock, the successor takes the lock,
//! re-adopts the running instances (they never stopped) and serves; the old
//! daemon finishes its in-flight requests and exits.
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
}

/// Take the sockets passed by a predecessor (or by systemd). Names:
/// `proxy` (any number), `api`, `api-tcp`.
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
                other => tracing::warn!("inherited fd {i} ({name}) is not a unix listener: {:?}", other.err()),
            },
            "api-tcp" => match fds.take_tcp_listener(i) {
                Ok(Some(l)) => out.api_tcp = Some(l),
                other => tracing::warn!("inherited fd {i} ({name}) is not a TCP listener: {:?}", other.err()),
            },
            _ => match fds.take_tcp_listener(i) {
                Ok(Some(l)) => match l.local_addr() {
                    Ok(addr) => {
                        out.proxy.insert(addr, l);
                    }
                    Err(e) => tracing::warn!("inherited fd {i}: {e}"),
                },
                other => tracing::warn!("inherited fd {i} ({name}) is not a TCP listener: {:?}", other.err()),
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

/// Successor side: tell the predecessor that the sockets were taken.
pub fn announce_ready(home: &Home) -> std::io::Result<()> {
    let tmp = home.dir.join(".upgrade.ready.tmp");
    std::fs::write(&tmp, std::process::id().to_string())?;
    std::fs::rename(tmp, ready_file(home))
}

/// Predecessor side: start `exe daemon` with `sockets` and wait until it
/// has taken them. Returns its pid. On failure nothing changed: the caller
/// keeps serving.
pub fn spawn_successor(
    exe: &Path,
    home: &Home,
    api_listen: Option<SocketAddr>,
    sockets: Vec<(&'static str, OwnedFd)>,
) -> Result<u32, String> {
    let _ = std::fs::remove_file(ready_file(home));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.daemon_log())
        .map_err(|e| format!("cannot open {}: {e}", home.daemon_log().display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
    let mappings: Vec<FdMapping> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (_, fd))| FdMapping { parent_fd: fd, child_fd: 3 + i as i32 })
        .collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("daemon")
        .env("NONSTOP_HOME", home.path())
        .env("NONSTOP_DETACH", "1")
        .env("NONSTOP_UPGRADE", "1")
        .env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    match api_listen {
        Some(a) => cmd.env("NONSTOP_API_LISTEN", a.to_string()),
        None => cmd.env_remove("NONSTOP_API_LISTEN"),
    };
    cmd.fd_mappings(mappings).map_err(|e| e.to_string())?;
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(s) = std::fs::read_to_string(ready_file(home)) {
            if s.trim() == pid.to_string() {
                // Reap it when it ends, whenever that is.
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return Ok(pid);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the new daemon exited at start ({status}); see {}", home.daemon_log().display()));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the new daemon did not take over within 15s; it was stopped".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

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
