//! `nonstop`: the command line and the daemon, in one binary.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod daemon;
mod home;
mod output;
mod upgrade;

use clap::Parser;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The per-instance monitor: a tiny synchronous program, no runtime.
    if args.get(1).is_some_and(|a| a == "__monitor") {
        std::process::exit(nonstop_supervisor::monitor_main(args[2..].to_vec()));
    }
    let cli = cli::Cli::parse();
    let code = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt.block_on(commands::dispatch(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            1
        }
    };
    std::process::exit(code);
}
