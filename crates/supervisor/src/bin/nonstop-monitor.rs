fn main() {
    std::process::exit(nonstop_supervisor::monitor_main(std::env::args_os().skip(1).collect()))
}
