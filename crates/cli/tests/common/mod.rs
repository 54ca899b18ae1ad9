//! Test harness: a private NONSTOP_HOME, a copy of an example app, a free
//! proxy port, and helpers that wait on conditions (never on fixed sleeps).
//! Whatever a test started is stopped when its `TestApp` is dropped, by pid
//! and process group, even if the test failed.
#![allow(dead_code)]

pub mod django;

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nonstop"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A port for a daemon to bind later: from outside the kernel's ephemeral
/// range, as the supervisor picks apps' ports, so that no outgoing
/// connection of a test running alongside can take it meanwhile.
pub fn free_port() -> u16 {
    nonstop_supervisor::free_port().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let n = name.to_string_lossy();
        if n.starts_with("beat.lock") || n == "__pycache__" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

pub struct TestApp {
    pub home: tempfile::TempDir,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Every pid/pgid seen, to clean up after a failed test.
    seen_pids: Mutex<BTreeSet<i32>>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "command failed:\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

impl TestApp {
    /// A copy of `examples/<example>` with nonstop.toml rewritten by `edit`.
    pub fn new(example: &str, edit: impl FnOnce(String) -> String) -> TestApp {
        let home = tempfile::Builder::new().prefix("nonstop-home-").tempdir().unwrap();
        let dir = tempfile::Builder::new().prefix("nonstop-app-").tempdir().unwrap();
        copy_dir(&repo_root().join("examples").join(example), dir.path());
        let spec_path = dir.path().join("nonstop.toml");
        let spec = std::fs::read_to_string(&spec_path).unwrap_or_default();
        std::fs::write(&spec_path, edit(spec)).unwrap();
        TestApp { home, dir, port: free_port(), seen_pids: Mutex::new(BTreeSet::new()) }
    }

    pub fn hello() -> TestApp {
        Self::new("hello", |s| s)
    }

    pub fn write_spec(&self, spec: &str) {
        std::fs::write(self.dir.path().join("nonstop.toml"), spec).unwrap();
    }

    pub fn spec(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nonstop.toml")).unwrap()
    }

    pub fn proxy(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_with(&bin(), args)
    }

    /// [`TestApp::cmd`] with another `nonstop` binary (a copy, say).
    pub fn cmd_with(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .current_dir(self.dir.path())
            .env("NONSTOP_HOME", self.home.path())
            .env("NONSTOP_PROXY_LISTEN", self.proxy().to_string())
            .env_remove("NONSTOP_API_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Run `nonstop ARGS` to completion (at most `timeout`).
    pub fn run_with_timeout(&self, args: &[&str], timeout: Duration) -> Run {
        let child = self.cmd(args).spawn().expect("spawn nonstop");
        let out = wait_output(child, timeout, &format!("nonstop {}", args.join(" ")));
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        self.note_daemon();
        run
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with_timeout(args, Duration::from_secs(120))
    }

    pub fn note_daemon(&self) {
        for file in ["daemon.pid", "keeper.pid"] {
            if let Ok(pid) = std::fs::read_to_string(self.home.path().join(file)) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    self.seen_pids.lock().unwrap().insert(pid);
                }
            }
        }
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.home.path().join("daemon.pid")).ok()?.trim().parse().ok()
    }

    /// The keeper (`nonstop daemon` as `up` starts it), if one was started.
    pub fn keeper_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.home.path().join("keeper.pid")).ok()?.trim().parse().ok()
    }

    pub fn status(&self) -> Value {
        let r = self.run(&["status", "--json"]);
        assert_eq!(r.code, 0, "status failed: {}", r.stderr);
        let v: Value = serde_json::from_str(&r.stdout).expect("status --json is JSON");
        for i in v["instances"].as_array().into_iter().flatten() {
            if let Some(pid) = i["pid"].as_i64() {
                self.seen_pids.lock().unwrap().insert(-(pid as i32)); // the group
            }
        }
        v
    }

    /// (process, pid) of every instance in `status`.
    pub fn pids(&self, process: &str) -> Vec<i32> {
        self.status()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["process"] == process)
            .filter_map(|i| i["pid"].as_i64().map(|p| p as i32))
            .collect()
    }

    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.proxy(), path)
    }

    pub fn up(&self) -> Run {
        self.run(&["up"])
    }

    /// `GET path` on the daemon's API socket: the raw answer (head and
    /// body), which must be a 200.
    pub fn api_get(&self, path: &str) -> String {
        let mut s = std::os::unix::net::UnixStream::connect(self.home.path().join("nonstop.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Every app and environment down, not only the default one (a
        // test with `-e production` left production's instances running).
        let listed = self.run_with_timeout(&["env", "list", "--json"], Duration::from_secs(30));
        if listed.code == 0 {
            let envs: Vec<Value> = serde_json::from_str(&listed.stdout).unwrap_or_default();
            for e in envs.iter().filter(|e| e["running"] == true) {
                let (Some(app), Some(env)) = (e["app"].as_str(), e["environment"].as_str()) else { continue };
                let _ = self.run_with_timeout(&["--app", app, "-e", env, "down"], Duration::from_secs(60));
            }
        }
        let _ = self.run_with_timeout(&["down"], Duration::from_secs(60));
        // Whatever is left (a failed test): kill by pid and process group.
        for pid in self.seen_pids.lock().unwrap().iter() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
        }
        kill_processes_naming(self.home.path());
    }
}

/// SIGKILL every process (and its process group) whose command line names
/// `dir`, and their children (and theirs): the instance monitors of a
/// test's home (`__monitor HOME/…`, which outlive a daemon by design) and
/// the apps they run. The home is the test's own temporary directory, so
/// nothing else matches.
pub fn kill_processes_naming(dir: &Path) {
    use nix::sys::signal::{kill, killpg, Signal};
    use nix::unistd::Pid;
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    // (pid, parent) of every process, and those naming the home.
    let mut all: Vec<(i32, i32)> = Vec::new();
    let mut doomed: BTreeSet<i32> = BTreeSet::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
        let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        else {
            continue;
        };
        all.push((pid, ppid));
        if std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle)) {
            doomed.insert(pid);
        }
    }
    // Their descendants.
    loop {
        let before = doomed.len();
        for (pid, ppid) in &all {
            if doomed.contains(ppid) {
                doomed.insert(*pid);
            }
        }
        if doomed.len() == before {
            break;
        }
    }
    for pid in doomed {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

pub fn wait_output(mut child: std::process::Child, timeout: Duration, what: &str) -> Output {
    let deadline = Instant::now() + timeout;
    // Read both pipes on threads so that a chatty child cannot block.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t1 = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let t2 = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Output { status, stdout: t1.join().unwrap(), stderr: t2.join().unwrap() };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Poll `cond` until it holds, or fail after `timeout` naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One GET over a fresh connection; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    host_get(addr, "test", path)
}

/// One GET for `host` (which picks the environment) over a fresh
/// connection; returns (status, body).
pub fn host_get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Is any process of group `pgid` alive?
pub fn group_alive(pgid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pgid), None).is_ok()
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie still "exists"; look at /proc state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// GETs of `/` for `host` until `stop` is set: (answers, failures with
/// reasons); an answer must be a 200 whose body starts with one of
/// `expect`.
pub fn host_load(
    addr: SocketAddr,
    host: &'static str,
    expect: &'static [&'static str],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failures) = (0u64, Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match host_get(addr, host, "/") {
                Ok((200, body)) if expect.iter().any(|e| body.starts_with(e)) => ok += 1,
                Ok((code, body)) => failures.push(format!("{host}: HTTP {code}: {}", body.trim())),
                Err(e) => failures.push(format!("{host}: I/O: {e}")),
            }
        }
        (ok, failures)
    })
}

/// Concurrent GET load: `workers` threads until `stop` is set. Returns
/// (ok, failures with reasons).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    pub fn start(addr: SocketAddr, path: &'static str, workers: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut ok = 0u64;
                    let mut failures = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match http_get(addr, path) {
                            Ok((200, _)) => ok += 1,
                            Ok((code, body)) => failures.push(format!("HTTP {code}: {}", body.trim())),
                            Err(e) => failures.push(format!("I/O: {e}")),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, threads }
    }

    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ok = 0;
        let mut failures = Vec::new();
        for t in self.threads {
            let (o, f) = t.join().unwrap();
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }
}

/// A `redis-server` of the test's own on a free port of 127.0.0.1,
/// stopped (by its pid) when dropped.
pub struct PrivateRedis {
    child: std::process::Child,
    pub port: u16,
    /// `requirepass`, if it has one.
    pub password: Option<String>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        PrivateRedis::on(free_port())
    }

    /// On `port` (again, after [`PrivateRedis::stop`]); ready once it
    /// answers.
    pub fn on(port: u16) -> PrivateRedis {
        PrivateRedis::on_with_password(port, None)
    }

    /// [`PrivateRedis::on`], with `requirepass password`.
    pub fn on_with_password(port: u16, password: Option<&str>) -> PrivateRedis {
        let mut args = vec!["--port".to_string(), port.to_string()];
        args.extend(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"].map(String::from));
        if let Some(p) = password {
            args.extend(["--requirepass".to_string(), p.to_string()]);
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (is Redis installed?)");
        let server = PrivateRedis { child, port, password: password.map(str::to_string) };
        wait_until(Duration::from_secs(30), "the private redis-server to answer", || {
            server.cli(0, &["PING"]) == "PONG"
        });
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` on database `db`: its output, trimmed ("" when the
    /// server does not answer).
    pub fn cli(&self, db: u8, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-n", &db.to_string()]);
        if let Some(p) = &self.password {
            cmd.args(["--no-auth-warning", "-a", p]);
        }
        let out = cmd.args(args).output().expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
