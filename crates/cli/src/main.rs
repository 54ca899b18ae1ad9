//! `nonstop`: the command line and the daemon, in one binary.
#![forbid(unsafe_code)]

mod base_services;
mod cli;
mod commands;
mod config;
mod daemon;
mod env;
mod home;
mod keeper;
mod limits;
mod maintenance;
mod metrics;
mod output;
mod plane;
mod promote;
mod queue;
mod recovery;
mod schema_gate;
mod secrets;
mod start_env;
mod statics;
mod upgrade;

use clap::Parser;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The per-instance monitor: a tiny synchronous program, no runtime.
    if args.get(1).is_some_and(|a| a == "__monitor") {
        let mut rest = args[2..].to_vec();
        // `--umask OOOO` (from the daemon, which runs with umask 077): the
        // umask the app gets; the monitor's own files have explicit modes.
        if rest.first().is_some_and(|a| a == "--umask") && rest.len() >= 2 {
            if let Some(m) = rest[1].to_str().and_then(|m| u32::from_str_radix(m, 8).ok()) {
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(m));
            }
            rest.drain(..2);
        }
        std::process::exit(nonstop_supervisor::monitor_main(rest));
    }
    let cli = cli::Cli::parse();
    if matches!(cli.command, cli::Command::Daemon { .. }) {
        close_inherited_fds();
        // Before the runtime's threads: see `start_env`.
        start_env::capture();
    }
    // The daemon and `doctor` create state: private from the start (before
    // the runtime's threads exist). Other commands keep the user's umask
    // (`init` writes nonstop.toml, `run` runs a command of the user's) and
    // create what they put in the state directory with explicit modes.
    if matches!(cli.command, cli::Command::Daemon { .. } | cli::Command::Doctor { .. }) {
        home::private_umask();
    }
    let code = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt.block_on(commands::dispatch(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// The daemon (and its keeper) keep only stdin, stdout, stderr and the
/// sockets handed to them on purpose (`LISTEN_FDS`, from 3 on): whatever
/// else the calling shell had open (a `flock` held by a deploy script, a
/// pipe) would otherwise stay open in the daemon and in every process it
/// starts, for as long as they run. Done before any thread or runtime
/// opens descriptors of its own (parsing the command line opens none).
fn close_inherited_fds() {
    let ours = std::env::var("LISTEN_PID").ok().is_none_or(|p| p == std::process::id().to_string());
    let handed: i32 = if ours { std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok()).unwrap_or(0) } else { 0 };
    let keep_below = 3 + handed.max(0);
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> =
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|&fd| fd >= keep_below).collect();
    for fd in fds {
        // The directory's own descriptor is among them, closed already.
        let _ = nix::unistd::close(fd);
    }
}
