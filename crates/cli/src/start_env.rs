//! What a daemon or keeper is handed through its environment when it
//! starts: by an upgrading predecessor (`NONSTOP_UPGRADE`,
//! `NONSTOP_UPGRADE_EXE`, `LISTEN_FDS`), by its keeper
//! (`NONSTOP_KEEPER_SOCKET`, `NONSTOP_PLANE_SOCKET`,
//! `NONSTOP_KEEPER_RESTART`) or by systemd (`LISTEN_FDS`).
//!
//! These are for this process, not for the instances and tasks it starts,
//! so they are taken out of the environment, and that happens once, in
//! `main`, before the async runtime's threads exist ([`capture`]):
//! changing the environment while another thread may read it is a data
//! race in libc (`getenv` against `unsetenv`; `std::env::remove_var` is
//! `unsafe` from Rust 2024 on for that reason). Everything else reads the
//! captured values ([`get`]).

use crate::upgrade::Inherited;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// The start-up variables of this process, read once.
#[derive(Default)]
pub struct StartEnv {
    /// `NONSTOP_UPGRADE=1`: started by an upgrade, as the successor.
    pub upgrade_successor: bool,
    /// `NONSTOP_UPGRADE_EXE`: the binary a failed upgrade tried (in a
    /// daemon started again from its predecessor's image).
    pub upgrade_exe: Option<PathBuf>,
    /// `NONSTOP_KEEPER_SOCKET`: the keeper that started this daemon.
    pub keeper_socket: Option<PathBuf>,
    /// `NONSTOP_PLANE_SOCKET`: the data plane's socket (in the keeper).
    pub plane_socket: Option<PathBuf>,
    /// `NONSTOP_KEEPER_RESTART`: why the keeper started this daemon again.
    pub keeper_restart: Option<String>,
    /// The listening sockets handed over (`LISTEN_FDS`), until taken.
    inherited: Mutex<Option<Inherited>>,
}

static START: OnceLock<StartEnv> = OnceLock::new();

/// Read the start-up variables and take them out of the environment. Call
/// it in `main`, before any other thread exists (for the commands that
/// run a daemon or keeper; the others never read them).
pub fn capture() {
    START.get_or_init(|| {
        let var = |name: &str| std::env::var_os(name).inspect(|_| std::env::remove_var(name));
        StartEnv {
            upgrade_successor: var("NONSTOP_UPGRADE").is_some_and(|v| v == "1"),
            upgrade_exe: var(crate::upgrade::UPGRADE_EXE_VAR).map(PathBuf::from),
            keeper_socket: var(crate::keeper::SOCKET_VAR).map(PathBuf::from),
            plane_socket: var(crate::plane::SOCKET_VAR).map(PathBuf::from),
            keeper_restart: var(crate::keeper::RESTART_VAR).map(|v| v.to_string_lossy().into_owned()),
            // Takes LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID out as well.
            inherited: Mutex::new(Some(crate::upgrade::take_inherited())),
        }
    });
}

/// The captured start-up variables (all empty when [`capture`] was not
/// called: a command that runs no daemon).
pub fn get() -> &'static StartEnv {
    START.get_or_init(StartEnv::default)
}

impl StartEnv {
    /// The sockets handed over, once (later calls get none).
    pub fn take_inherited(&self) -> Inherited {
        self.inherited.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default()
    }
}
