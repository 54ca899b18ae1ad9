//! Releases against real files and real processes, in temporary directories.

use nonstop_core::ReleaseId;
use nonstop_release::{
    BuildEvent, BuildRequest, BuiltRelease, ExitStatus, ReleaseBuilder, ReleaseError, Stream, BUILD_LOG,
};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn chmod(root: &Path, rel: &str, mode: u32) {
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
}

fn base_env() -> Vec<(String, String)> {
    vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())]
}

/// A releases root and an app directory side by side.
struct Fixture {
    _tmp: TempDir,
    app: PathBuf,
    root: PathBuf,
    builder: ReleaseBuilder,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let app = tmp.path().join("app");
        fs::create_dir(&app).unwrap();
        let root = tmp.path().join("home/releases/app");
        let builder = ReleaseBuilder::new(&root);
        Self { _tmp: tmp, app, root, builder }
    }

    async fn build_with(
        &self,
        n: u64,
        commands: &[&str],
        env: &[(String, String)],
        timeout: Duration,
        cancel: CancellationToken,
    ) -> (Result<BuiltRelease, ReleaseError>, Vec<BuildEvent>) {
        let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let req =
            BuildRequest { source: &self.app, release: ReleaseId(n), build_commands: &commands, env, timeout, cancel };
        let result = self
            .builder
            .build(req, move |e| {
                grant(&e);
                sink.lock().unwrap().push(e)
            })
            .await;
        let events = std::mem::take(&mut *events.lock().unwrap());
        (result, events)
    }

    async fn build(&self, n: u64, commands: &[&str]) -> (Result<BuiltRelease, ReleaseError>, Vec<BuildEvent>) {
        self.build_with(n, commands, &base_env(), Duration::from_secs(60), CancellationToken::new()).await
    }

    /// Everything in the releases root, sorted.
    fn root_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = match fs::read_dir(&self.root) {
            Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }
}

/// Relative paths of everything under `dir` (not following symlinks),
/// without the release's own `.nonstop/`.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if rel == ".nonstop" {
                continue;
            }
            let ft = entry.file_type().unwrap();
            if ft.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &path, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// What the daemon does once it has recorded a spawned command's process:
/// lets it run.
fn grant(e: &BuildEvent) {
    if let BuildEvent::CommandSpawned { permit, .. } = e {
        permit.grant();
    }
}

fn output_lines(events: &[BuildEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Output { line, .. } => Some(line.clone()),
            _ => None,
        })
        .collect()
}

/// Whether a process is gone (or a zombie: dead, waiting to be reaped by
/// whoever adopted it).
fn is_dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap().trim_start().chars().next().unwrap();
            state == 'Z' || state == 'X'
        }
    }
}

/// SIGKILL is delivered asynchronously: poll (with a deadline) until the
/// process is dead.
fn assert_dies(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_dead(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) is still alive");
        std::thread::yield_now();
    }
}

fn read_pid(path: &Path) -> i32 {
    fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

// ---------------------------------------------------------------- snapshot

#[tokio::test]
async fn snapshot_honours_ignore_files_and_always_skips() {
    let f = Fixture::new();
    let app = &f.app;
    // A .gitignore above the app directory does not count.
    write(app.parent().unwrap(), ".gitignore", "app.py\n");
    write(app, "app.py", "print('hi')\n");
    write(app, ".gitignore", "*.log\n!keep.log\n/build/\n");
    write(app, "debug.log", "x");
    write(app, "keep.log", "x");
    write(app, "build/out.bin", "x");
    write(app, "sub/build/kept.txt", "x"); // `/build/` is anchored at the top
    write(app, "sub/.gitignore", "secret.txt\n");
    write(app, "sub/secret.txt", "x");
    write(app, "secret.txt", "not ignored here");
    write(app, ".nonstopignore", "local.env\nmedia/\n");
    write(app, "local.env", "x");
    write(app, "media/upload.png", "x");
    write(app, "deep/.nonstopignore", "*.tmp\n");
    write(app, "deep/a.tmp", "x");
    write(app, "deep/a.txt", "x");
    // .git/info/exclude counts even though this is not a real repository.
    write(app, ".git/info/exclude", "excluded.txt\n");
    write(app, ".git/HEAD", "ref: refs/heads/main\n");
    write(app, "excluded.txt", "x");
    write(app, "vendor/lib/.git", "gitdir: ../../.git/modules/lib\n");
    write(app, "vendor/lib/lib.py", "x");
    write(app, "pkg/__pycache__/m.cpython-312.pyc", "x");
    write(app, "pkg/m.py", "x");
    write(app, "pkg/old.pyc", "x");
    write(app, "node_modules/.cache/babel/x.json", "x");
    write(app, "node_modules/left-pad/index.js", "x");
    write(app, ".nonstop/state.db", "x");
    write(app, ".env.example", "hidden files are kept");
    fs::create_dir(app.join("empty")).unwrap();

    let (built, events) = f.build(1, &[]).await;
    let built = built.unwrap();
    assert_eq!(
        tree(&built.dir),
        [
            ".env.example",
            ".gitignore",
            ".nonstopignore",
            "app.py",
            "deep/",
            "deep/.nonstopignore",
            "deep/a.txt",
            "empty/",
            "keep.log",
            "node_modules/",
            "node_modules/left-pad/",
            "node_modules/left-pad/index.js",
            "pkg/",
            "pkg/m.py",
            "secret.txt",
            "sub/",
            "sub/.gitignore",
            "sub/build/",
            "sub/build/kept.txt",
            "vendor/",
            "vendor/lib/",
            "vendor/lib/lib.py",
        ]
    );
    assert!(matches!(&events[0], BuildEvent::Snapshotted(s) if s == &built.stats));
    assert_eq!(built.stats.files, 13);
    // The hash without copying agrees with the build's.
    assert_eq!(ReleaseBuilder::content_hash(app).unwrap(), built.stats);
}

#[tokio::test]
async fn releases_root_and_state_dir_inside_the_app_are_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    write(&app, "app.py", "x");
    write(&app, "state/state.db", "x");
    let before = ReleaseBuilder::content_hash(&app).unwrap();
    let builder = ReleaseBuilder::new(app.join("state/releases/app")).with_excluded(app.join("state"));
    let hash = builder.snapshot_hash(&app).unwrap();
    assert_ne!(hash, before, "content_hash alone does not know the state dir");
    let req = BuildRequest {
        source: &app,
        release: ReleaseId(1),
        build_commands: &[],
        env: &[],
        timeout: Duration::from_secs(10),
        cancel: CancellationToken::new(),
    };
    let built = builder.build(req, |_| {}).await.unwrap();
    assert_eq!(tree(&built.dir), ["app.py"]);
    assert_eq!(built.stats, hash);
    // Building again (the releases root now exists and has v1) gives the same hash.
    assert_eq!(builder.snapshot_hash(&app).unwrap(), hash);
}

#[tokio::test]
async fn symlinks_are_copied_as_symlinks() {
    let f = Fixture::new();
    write(&f.app, "target.txt", "content");
    write(&f.app, "sub/inner.txt", "x");
    symlink("target.txt", f.app.join("link")).unwrap();
    symlink("/etc/hostname", f.app.join("outside")).unwrap();
    symlink("../../nowhere", f.app.join("dangling")).unwrap();
    symlink("sub", f.app.join("dirlink")).unwrap();

    let built = f.build(1, &[]).await.0.unwrap();
    for (name, target) in
        [("link", "target.txt"), ("outside", "/etc/hostname"), ("dangling", "../../nowhere"), ("dirlink", "sub")]
    {
        let path = built.dir.join(name);
        assert!(path.symlink_metadata().unwrap().file_type().is_symlink(), "{name}");
        assert_eq!(fs::read_link(&path).unwrap(), Path::new(target), "{name}");
    }
    // The linked directory was not followed into.
    assert!(!tree(&built.dir).iter().any(|p| p.starts_with("dirlink/")));
    assert_eq!(fs::read_to_string(built.dir.join("link")).unwrap(), "content");
}

#[tokio::test]
async fn file_modes_are_kept() {
    let f = Fixture::new();
    write(&f.app, "bin/run.sh", "#!/bin/sh\necho run\n");
    chmod(&f.app, "bin/run.sh", 0o755);
    write(&f.app, "conf.ini", "x");
    chmod(&f.app, "conf.ini", 0o640);
    let built = f.build(1, &["./bin/run.sh > ran.txt"]).await.0.unwrap();
    let mode = |rel: &str| fs::metadata(built.dir.join(rel)).unwrap().permissions().mode() & 0o777;
    // Kept, but for the write bits: a published release is read-only,
    // what the build wrote included, and still pruned.
    assert_eq!(mode("bin/run.sh"), 0o555);
    assert_eq!(mode("conf.ini"), 0o440);
    assert_eq!(mode("ran.txt") & 0o222, 0);
    assert_eq!(mode("bin") & 0o222, 0);
    assert_eq!(mode(".") & 0o222, 0);
    assert_eq!(fs::read_to_string(built.dir.join("ran.txt")).unwrap(), "run\n");
    f.builder.prune(&[]).unwrap();
    assert!(!built.dir.exists());
}

// ------------------------------------------------------------------ hashing

fn sample_tree(dir: &Path) {
    write(dir, "app.py", "print('hello')\n");
    write(dir, "pkg/__init__.py", "");
    write(dir, "pkg/views.py", "def view(): pass\n");
    write(dir, "run.sh", "#!/bin/sh\n");
    chmod(dir, "run.sh", 0o755);
    symlink("pkg/views.py", dir.join("views")).unwrap();
    fs::create_dir(dir.join("static")).unwrap();
}

fn hash(dir: &Path) -> String {
    ReleaseBuilder::content_hash(dir).unwrap().content_hash
}

#[test]
fn content_hash_is_stable() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    sample_tree(a.path());
    // Same content, created in another order, other mtimes, other group/other bits.
    fs::create_dir(b.path().join("static")).unwrap();
    symlink("pkg/views.py", b.path().join("views")).unwrap();
    write(b.path(), "run.sh", "#!/bin/sh\n");
    chmod(b.path(), "run.sh", 0o700);
    write(b.path(), "pkg/views.py", "def view(): pass\n");
    write(b.path(), "pkg/__init__.py", "");
    write(b.path(), "app.py", "print('hello')\n");
    chmod(b.path(), "app.py", 0o600);
    // Ignored and always-skipped things do not count.
    write(b.path(), ".git/HEAD", "x");
    write(b.path(), "pkg/__pycache__/views.cpython-312.pyc", "x");

    let stats = ReleaseBuilder::content_hash(a.path()).unwrap();
    assert_eq!(stats, ReleaseBuilder::content_hash(b.path()).unwrap());
    assert_eq!(stats.content_hash, hash(a.path()), "same run, same hash");
    assert_eq!(stats.files, 5);
    assert_eq!(stats.bytes, 15 + 17 + 10);
    // Pinned: the encoding must not change between versions or machines.
    assert_eq!(stats.content_hash, "4cac2410f76caaa7c49dc7bbed40eb32aa1f12c16e07a5674074c2c2654d41a4");
}

#[test]
fn content_hash_sees_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sample_tree(d);
    let mut seen = vec![hash(d)];
    let changed = |what: &str, seen: &mut Vec<String>| {
        let h = hash(d);
        assert!(!seen.contains(&h), "{what} did not change the hash");
        seen.push(h);
    };

    write(d, "app.py", "print('hello!')\n");
    changed("file content", &mut seen);
    fs::rename(d.join("pkg/views.py"), d.join("pkg/view.py")).unwrap();
    changed("file rename", &mut seen);
    chmod(d, "app.py", 0o744);
    changed("exec bit", &mut seen);
    fs::remove_file(d.join("views")).unwrap();
    symlink("pkg/view.py", d.join("views")).unwrap();
    changed("symlink target", &mut seen);
    fs::create_dir(d.join("static/empty")).unwrap();
    changed("new empty directory", &mut seen);
    fs::rename(d.join("pkg"), d.join("pkg2")).unwrap();
    changed("directory rename", &mut seen);
    write(d, "new.txt", "");
    changed("new empty file", &mut seen);
    // A file replaced by a symlink whose target equals its old content.
    write(d, "alias", "app.py");
    changed("new file", &mut seen);
    fs::remove_file(d.join("alias")).unwrap();
    symlink("app.py", d.join("alias")).unwrap();
    changed("file became symlink", &mut seen);

    // Ignored files and non-exec mode bits do not count.
    let before = hash(d);
    write(d, ".gitignore", "*.log\n");
    let with_gitignore = hash(d);
    assert_ne!(before, with_gitignore, ".gitignore itself is part of the release");
    write(d, "debug.log", "x");
    chmod(d, "app.py", 0o700);
    assert_eq!(hash(d), with_gitignore);
}

#[test]
fn missing_app_directory_is_named() {
    let err = ReleaseBuilder::content_hash(Path::new("/nonexistent/app")).unwrap_err();
    assert!(matches!(err, ReleaseError::SourceMissing(_)));
    assert!(err.to_string().contains("app directory /nonexistent/app does not exist"), "{err}");
}

// ------------------------------------------------------------------- builds

#[tokio::test]
async fn build_commands_run_in_order_in_the_release_dir_with_the_env() {
    let f = Fixture::new();
    write(&f.app, "app.py", "x");
    let mut env = base_env();
    env.push(("GREETING".into(), "hello world".into()));
    let commands = [
        "echo one >> order.txt",
        "echo \"$GREETING\" >> order.txt; pwd -P > pwd.txt; env > env.txt; echo to-stderr >&2",
        "test -f app.py && echo three >> order.txt",
    ];
    let (built, events) = f.build_with(7, &commands, &env, Duration::from_secs(60), CancellationToken::new()).await;
    let built = built.unwrap();
    assert_eq!(built.release, ReleaseId(7));
    assert_eq!(built.dir, f.root.join("v7"));
    assert_eq!(fs::read_to_string(built.dir.join("order.txt")).unwrap(), "one\nhello world\nthree\n");

    // cwd was the release directory itself: what the build produces may
    // hold its own path.
    let pwd = fs::read_to_string(built.dir.join("pwd.txt")).unwrap();
    assert_eq!(Path::new(pwd.trim()), f.root.canonicalize().unwrap().join("v7"), "{pwd}");
    assert_eq!(f.root_entries(), ["v7"], "no marker left");

    // Exactly the given environment (plus what sh sets itself).
    let env_txt = fs::read_to_string(built.dir.join("env.txt")).unwrap();
    let keys: Vec<&str> = env_txt.lines().filter_map(|l| l.split('=').next()).collect();
    assert!(env_txt.contains("GREETING=hello world"), "{env_txt}");
    for key in keys {
        assert!(["PATH", "GREETING", "PWD", "SHLVL", "_", "OLDPWD"].contains(&key), "unexpected {key} in {env_txt}");
    }

    // Events, in order.
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e {
            BuildEvent::Snapshotted(_) => "snapshot".to_string(),
            BuildEvent::CommandStarted { index, total, .. } => format!("start {index}/{total}"),
            BuildEvent::Output { index, stream, line } => format!("{index} {} {line}", stream.as_str()),
            BuildEvent::CommandFinished { index, status, .. } => format!("end {index} {status}"),
            BuildEvent::CommandSpawned { index, process, .. } => {
                assert!(process.pid().is_some_and(|p| p > 1), "{process:?}");
                format!("spawned {index}")
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "snapshot",
            "start 0/3",
            "spawned 0",
            "end 0 exit code 0",
            "start 1/3",
            "spawned 1",
            "1 err to-stderr",
            "end 1 exit code 0",
            "start 2/3",
            "spawned 2",
            "end 2 exit code 0",
        ]
    );

    // The build log: timestamped lines, in the release.
    assert_eq!(built.build_log, built.dir.join(BUILD_LOG));
    let log = fs::read_to_string(&built.build_log).unwrap();
    assert!(log.lines().any(|l| l.ends_with(" err to-stderr") && l.len() > 27 && l.as_bytes()[26] == b'Z'), "{log}");
    assert!(log.contains("sys build command 2 of 3: echo \"$GREETING\""), "{log}");
    assert!(log.contains("sys exit code 0 after"), "{log}");
    assert_eq!(f.root_entries(), ["v7"]);
    assert_eq!(f.builder.list(), [ReleaseId(7)]);
}

#[tokio::test]
async fn output_is_streamed_line_by_line() {
    let f = Fixture::new();
    let (built, events) = f.build(1, &["printf 'a\\nb\\r\\nno newline'; printf 'e1\\n' >&2"]).await;
    built.unwrap();
    let mut lines = output_lines(&events);
    lines.sort();
    assert_eq!(lines, ["a", "b", "e1", "no newline"]);
    assert!(events.iter().any(|e| matches!(e, BuildEvent::Output { stream: Stream::Err, line, .. } if line == "e1")));
}

#[tokio::test]
async fn a_failing_command_leaves_no_release_and_reports_its_tail() {
    let f = Fixture::new();
    write(&f.app, "app.py", "x");
    let commands = [
        "echo first ok",
        "for i in $(seq 1 30); do echo line $i; done; mkdir ro; chmod 555 ro; exit 3",
        "echo never > never.txt",
    ];
    let (result, events) = f.build(2, &commands).await;
    let err = result.unwrap_err();
    match &err {
        ReleaseError::BuildFailed { index, total, command, status, output_tail } => {
            assert_eq!((*index, *total), (1, 3));
            assert_eq!(command, commands[1]);
            assert_eq!(*status, ExitStatus::Code(3));
            let expected: Vec<String> = (11..=30).map(|i| format!("line {i}")).collect();
            assert_eq!(output_tail, &expected);
        }
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.starts_with("build command 2 of 3 `for i in"), "{msg}");
    assert!(msg.contains("failed with exit code 3; last output:\n    line 11\n"), "{msg}");
    assert!(msg.ends_with("    line 30"), "{msg}");
    assert!(!events.iter().any(|e| matches!(e, BuildEvent::CommandStarted { index: 2, .. })));
    assert_eq!(f.root_entries(), Vec::<String>::new(), "no release and no marker left");
    assert!(f.builder.list().is_empty());
}

#[tokio::test]
async fn a_command_that_cannot_run_fails_the_build() {
    let f = Fixture::new();
    let (result, _) = f.build(1, &["definitely-not-a-command-xyz"]).await;
    let err = result.unwrap_err();
    assert!(matches!(err, ReleaseError::BuildFailed { status: ExitStatus::Code(127), .. }), "{err:?}");
    assert!(err.to_string().contains("not found"), "{err}");
    assert!(f.root_entries().is_empty());
}

/// A command whose shell starts a background and a foreground `sleep 1000`,
/// writes their pids (outside the release: a failed build's directory is
/// gone afterwards), then says `ready`.
const SPAWNS_SLEEPERS: &str = "sleep 1000 & echo $! > \"$PIDS/bg\"; sleep 1000 & echo $! > \"$PIDS/fg\"; \
                               echo $$ > \"$PIDS/sh\"; echo ready; wait";

fn pid_env(pids: &Path) -> Vec<(String, String)> {
    let mut env = base_env();
    env.push(("PIDS".into(), pids.display().to_string()));
    env
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let f = Fixture::new();
    let pids = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (result, events) = f
        .build_with(
            1,
            &["echo before", SPAWNS_SLEEPERS],
            &pid_env(pids.path()),
            Duration::from_secs(3),
            CancellationToken::new(),
        )
        .await;
    let err = result.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(output_lines(&events).contains(&"ready".to_string()), "the command did not get to start its sleepers");
    match &err {
        ReleaseError::BuildTimedOut { index: 1, total: 2, output_tail, timeout, .. } => {
            assert_eq!(output_tail, &["ready"]);
            assert_eq!(*timeout, Duration::from_secs(3));
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("build command 2 of 2"), "{err}");
    assert!(err.to_string().contains("timed out after 3.0s"), "{err}");
    for name in ["sh", "bg", "fg"] {
        assert_dies(read_pid(&pids.path().join(name)), name);
    }
    assert!(f.root_entries().is_empty(), "{:?}", f.root_entries());
}

#[tokio::test]
async fn cancel_kills_the_running_command_and_leaves_nothing() {
    let f = Fixture::new();
    let pids = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let commands: Vec<String> = vec![SPAWNS_SLEEPERS.to_string()];
    let env = pid_env(pids.path());
    let req = BuildRequest {
        source: &f.app,
        release: ReleaseId(3),
        build_commands: &commands,
        env: &env,
        timeout: Duration::from_secs(600),
        cancel,
    };
    let err = f
        .builder
        .build(req, move |e| {
            grant(&e);
            if matches!(&e, BuildEvent::Output { line, .. } if line == "ready") {
                trigger.cancel();
            }
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ReleaseError::Cancelled { release: ReleaseId(3), .. }), "{err:?}");
    assert!(err.to_string().contains("during build command 1 of 1"), "{err}");
    for name in ["sh", "bg", "fg"] {
        assert_dies(read_pid(&pids.path().join(name)), name);
    }
    assert!(f.root_entries().is_empty(), "{:?}", f.root_entries());
}

/// What a daemon that died mid-build leaves: a build command running on,
/// recorded by pid and start time. The next daemon kills its whole group
/// from that record alone.
#[tokio::test]
async fn a_build_command_is_reported_as_it_starts_and_can_be_killed_from_its_record() {
    let f = Fixture::new();
    let pids = tempfile::tempdir().unwrap();
    let commands: Vec<String> = vec![SPAWNS_SLEEPERS.to_string()];
    let env = pid_env(pids.path());
    let req = BuildRequest {
        source: &f.app,
        release: ReleaseId(4),
        build_commands: &commands,
        env: &env,
        timeout: Duration::from_secs(600),
        cancel: CancellationToken::new(),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (mut tx, mut process) = (Some(tx), None);
    let build = f.builder.build(req, move |e| match e {
        BuildEvent::CommandSpawned { process: p, permit, .. } => {
            permit.grant();
            process = Some(p)
        }
        BuildEvent::Output { line, .. } if line == "ready" => {
            if let Some(tx) = tx.take() {
                let _ = tx.send(process.clone());
            }
        }
        _ => {}
    });
    let killer = async {
        let process = rx.await.unwrap().expect("the command's process was reported before its output");
        assert_eq!(process.pid(), Some(read_pid(&pids.path().join("sh")) as u32));
        assert!(nonstop_release::command_alive(&process));
        let killed = nonstop_release::kill_command(&process).await.unwrap();
        assert_eq!(killed, nonstop_core::driver::StopOutcome::Killed);
        assert!(!nonstop_release::command_alive(&process));
        process
    };
    let (built, process) = tokio::join!(build, killer);
    assert!(matches!(built, Err(ReleaseError::BuildFailed { .. })), "{built:?}");
    for name in ["sh", "bg", "fg"] {
        assert_dies(read_pid(&pids.path().join(name)), name);
    }
    let again = nonstop_release::kill_command(&process).await.unwrap();
    assert_eq!(again, nonstop_core::driver::StopOutcome::AlreadyGone);
}

#[tokio::test]
async fn dropping_the_build_future_kills_and_cleans_up() {
    let f = Fixture::new();
    let pids = tempfile::tempdir().unwrap();
    let commands: Vec<String> = vec![SPAWNS_SLEEPERS.to_string()];
    let env = pid_env(pids.path());
    let req = BuildRequest {
        source: &f.app,
        release: ReleaseId(1),
        build_commands: &commands,
        env: &env,
        timeout: Duration::from_secs(600),
        cancel: CancellationToken::new(),
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let build = f.builder.build(req, move |e| {
        grant(&e);
        if matches!(&e, BuildEvent::Output { line, .. } if line == "ready") {
            if let Some(tx) = ready_tx.take() {
                let _ = tx.send(());
            }
        }
    });
    tokio::select! {
        r = build => panic!("the build ended by itself: {r:?}"),
        _ = ready_rx => {}
    }
    // The build future is dropped here, mid-command.
    for name in ["sh", "bg", "fg"] {
        assert_dies(read_pid(&pids.path().join(name)), name);
    }
    assert!(f.root_entries().is_empty(), "{:?}", f.root_entries());
}

#[tokio::test]
async fn cancel_before_the_build_copies_nothing() {
    let f = Fixture::new();
    write(&f.app, "app.py", "x");
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (result, events) = f.build_with(1, &["echo hi"], &base_env(), Duration::from_secs(10), cancel).await;
    let err = result.unwrap_err();
    assert!(matches!(err, ReleaseError::Cancelled { .. }), "{err:?}");
    assert!(events.is_empty());
    assert!(f.root_entries().is_empty());
}

#[tokio::test]
async fn processes_left_behind_by_a_successful_command_are_killed() {
    let f = Fixture::new();
    let pids = tempfile::tempdir().unwrap();
    let (result, _) = f
        .build_with(
            1,
            &["sleep 1000 & echo $! > \"$PIDS/bg\"; echo started"],
            &pid_env(pids.path()),
            Duration::from_secs(600),
            CancellationToken::new(),
        )
        .await;
    result.unwrap();
    assert_dies(read_pid(&pids.path().join("bg")), "background sleep");
}

#[tokio::test]
async fn an_existing_release_is_never_rebuilt() {
    let f = Fixture::new();
    write(&f.app, "app.py", "v1");
    let first = f.build(1, &["echo built > marker.txt"]).await.0.unwrap();
    write(&f.app, "app.py", "changed");
    let (result, events) = f.build(1, &["echo again > marker.txt"]).await;
    let err = result.unwrap_err();
    assert!(matches!(&err, ReleaseError::ReleaseExists { release: ReleaseId(1), path } if path == &first.dir));
    let msg = err.to_string();
    assert!(msg.contains(&format!("release v1 already exists at {}", first.dir.display())), "{msg}");
    assert!(events.is_empty());
    assert_eq!(fs::read_to_string(first.dir.join("app.py")).unwrap(), "v1");
    assert_eq!(fs::read_to_string(first.dir.join("marker.txt")).unwrap(), "built\n");
    assert_eq!(f.root_entries(), ["v1"]);
}

#[tokio::test]
async fn a_build_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let f = Fixture::new();
    let req = BuildRequest {
        source: &f.app,
        release: ReleaseId(1),
        build_commands: &[],
        env: &[],
        timeout: Duration::from_secs(1),
        cancel: CancellationToken::new(),
    };
    let fut = f.builder.build(req, |_| {});
    assert_send(&fut);
    fut.await.unwrap();
}

/// The arguments a process runs with, from `/proc`.
fn cmdline(pid: u32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// Build release 1 of `f` with `command`, handing each spawned command's
/// process and permit to `answer`.
async fn build_answering<F>(
    f: &Fixture,
    command: &str,
    env: &[(String, String)],
    answer: F,
) -> Result<BuiltRelease, ReleaseError>
where
    F: AsyncFnOnce(nonstop_core::driver::Locator, nonstop_release::RunPermit),
{
    let commands = vec![command.to_string()];
    let req = BuildRequest {
        source: &f.app,
        release: ReleaseId(1),
        build_commands: &commands,
        env,
        timeout: Duration::from_secs(600),
        cancel: CancellationToken::new(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let build = f.builder.build(req, move |e| {
        if let BuildEvent::CommandSpawned { process, permit, .. } = e {
            let _ = tx.send((process, permit));
        }
    });
    let answering = async {
        let (process, permit) = rx.recv().await.expect("the command's process is reported");
        answer(process, permit).await;
    };
    let (built, ()) = tokio::join!(build, answering);
    built
}

/// A command runs only once its process is recorded: until its permit is
/// granted its process waits at the gate, having run nothing of it; then
/// the same process (pid, start time, group) runs it.
#[tokio::test]
async fn a_build_command_runs_only_once_its_permit_is_granted() {
    let f = Fixture::new();
    let pids = tempfile::tempdir().unwrap();
    let ran = pids.path().join("ran");
    let built = build_answering(&f, "echo $$ > \"$PIDS/ran\"", &pid_env(pids.path()), async |process, permit| {
        let pid = process.pid().unwrap();
        assert!(nonstop_release::command_alive(&process));
        let args = cmdline(pid);
        assert!(args.len() == 5 && args[2].contains("read -r go"), "not at its gate: {args:?}");
        assert!(!ran.exists(), "ran before it was recorded");
        permit.grant();
    })
    .await
    .unwrap();
    assert!(ran.exists());
    assert_eq!(f.root_entries(), ["v1"]);
    assert_eq!(built.release, ReleaseId(1));
}

/// A command whose process could not be recorded never runs: it is killed
/// at its gate and the build fails, saying why, leaving nothing.
#[tokio::test]
async fn a_build_command_whose_permit_is_refused_or_dropped_never_runs() {
    for refuse in [true, false] {
        let f = Fixture::new();
        let pids = tempfile::tempdir().unwrap();
        let ran = pids.path().join("ran");
        let mut held = None;
        let err = build_answering(&f, "touch \"$PIDS/ran\"", &pid_env(pids.path()), async |process, permit| {
            held = process.pid();
            if refuse {
                permit.refuse("database or disk is full".into());
            } else {
                drop(permit);
            }
        })
        .await
        .unwrap_err();
        let want = if refuse {
            "its process could not be recorded: database or disk is full"
        } else {
            "nobody recorded its process"
        };
        assert!(matches!(err, ReleaseError::NotRecorded { index: 0, total: 1, .. }), "{err:?}");
        assert!(err.to_string().starts_with("build command 1 of 1 `touch \"$PIDS/ran\"` was not run: "), "{err}");
        assert!(err.to_string().contains(want), "{err}");
        assert_dies(held.unwrap() as i32, "the command held at its gate");
        assert!(!ran.exists(), "it ran");
        assert!(f.root_entries().is_empty(), "{:?}", f.root_entries());
    }
}

// ------------------------------------------------------- list, prune, clean

#[tokio::test]
async fn list_and_prune() {
    let f = Fixture::new();
    write(&f.app, "app.py", "x");
    for n in [1, 2, 3, 4, 10] {
        f.build(n, &[]).await.0.unwrap();
    }
    // Not releases (v6: its build is in progress, or crashed).
    fs::create_dir(f.root.join(".staging-v9-abcdef")).unwrap();
    fs::create_dir(f.root.join("v6")).unwrap();
    fs::write(f.root.join(".building-v6"), "").unwrap();
    fs::create_dir(f.root.join("v05")).unwrap();
    fs::create_dir(f.root.join("notes")).unwrap();
    fs::write(f.root.join("v7"), "a file").unwrap();
    symlink("v1", f.root.join("v8")).unwrap();
    assert_eq!(f.builder.list(), [1, 2, 3, 4, 10].map(ReleaseId));

    let removed = f.builder.prune(&[ReleaseId(2), ReleaseId(10), ReleaseId(99)]).unwrap();
    assert_eq!(removed, [1, 3, 4].map(ReleaseId));
    assert_eq!(f.builder.list(), [2, 10].map(ReleaseId));
    assert_eq!(f.root_entries(), [".building-v6", ".staging-v9-abcdef", "notes", "v05", "v10", "v2", "v6", "v7", "v8"]);
    assert_eq!(f.builder.prune(&[ReleaseId(2), ReleaseId(10)]).unwrap(), []);
    assert_eq!(f.builder.prune(&[]).unwrap(), [2, 10].map(ReleaseId));
    assert!(f.builder.list().is_empty());
    assert!(ReleaseBuilder::new(f.root.join("missing")).list().is_empty());
}

#[tokio::test]
async fn clean_staging_removes_leftovers_but_not_a_build_in_progress() {
    let f = Fixture::new();
    write(&f.app, "app.py", "x");
    f.build(1, &[]).await.0.unwrap();
    // What crashes leave: a marked release directory, with a read-only
    // directory in it; an older version's staging dir; a half-pruned
    // release.
    write(&f.root, "v4/app.py", "x");
    write(&f.root, "v4/ro/f", "x");
    chmod(&f.root, "v4/ro", 0o555);
    fs::write(f.root.join(".building-v4"), "").unwrap();
    write(&f.root, ".staging-v2-crashed/app.py", "x");
    write(&f.root, ".staging-v2-crashed/ro/f", "x");
    chmod(&f.root, ".staging-v2-crashed/ro", 0o555);
    write(&f.root, ".trash-v0-crashed/v0/app.py", "x");

    let cleaned = Arc::new(Mutex::new(None));
    let seen = cleaned.clone();
    let builder = f.builder.clone();
    let commands = vec!["echo ready".to_string(), "ls -d ../.building-v3 > ../marker-seen.txt".to_string()];
    let req = BuildRequest {
        source: &f.app,
        release: ReleaseId(3),
        build_commands: &commands,
        env: &base_env(),
        timeout: Duration::from_secs(60),
        cancel: CancellationToken::new(),
    };
    let built = f
        .builder
        .build(req, move |e| {
            grant(&e);
            // While the build runs (between its commands).
            if matches!(&e, BuildEvent::Output { line, .. } if line == "ready") {
                *seen.lock().unwrap() = Some(builder.clean_staging().unwrap());
            }
        })
        .await
        .unwrap();
    let mut cleaned: Vec<String> = cleaned
        .lock()
        .unwrap()
        .take()
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    cleaned.sort();
    assert_eq!(cleaned, [".staging-v2-crashed", ".trash-v0-crashed", "v4"]);
    // The running build and its marker survived, and it was published.
    assert!(fs::read_to_string(f.root.join("marker-seen.txt")).unwrap().contains(".building-v3"));
    assert_eq!(f.builder.list(), [1, 3].map(ReleaseId));
    assert!(built.dir.join("app.py").exists());
    assert_eq!(f.root_entries(), ["marker-seen.txt", "v1", "v3"]);
    assert!(f.builder.clean_staging().unwrap().is_empty());
}

/// The reason to build in place: a virtualenv made by a build command
/// names its own absolute path (scripts' `#!`, `pyvenv.cfg`), and works
/// from the published release.
#[tokio::test]
async fn a_virtualenv_made_by_the_build_works_in_the_published_release() {
    let f = Fixture::new();
    write(&f.app, "app.py", "print('hi')");
    let mut env = base_env();
    env.retain(|(k, _)| k != "PATH");
    env.push(("PATH".into(), std::env::var("PATH").unwrap()));
    let commands = [
        "python3 -m venv --without-pip .venv",
        "printf '#!%s/.venv/bin/python\\nimport sys; print(sys.prefix)\\n' \"$(pwd)\" > where.py && chmod +x where.py",
    ];
    let (built, _) = f.build_with(3, &commands, &env, Duration::from_secs(120), CancellationToken::new()).await;
    let built = built.unwrap();
    let out = std::process::Command::new(built.dir.join("where.py")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let prefix = String::from_utf8(out.stdout).unwrap();
    assert_eq!(Path::new(prefix.trim()), built.dir.canonicalize().unwrap().join(".venv"));
}

/// A build that crashed (the daemon was killed mid-way) left its marked
/// directory: the next build of that number takes it over, a finished
/// release is never rebuilt, and a live build is not touched.
#[tokio::test]
async fn a_crashed_build_is_replaced_by_the_next_build_of_its_number() {
    let f = Fixture::new();
    write(&f.app, "app.py", "new");
    write(&f.root, "v5/app.py", "half-copied");
    fs::write(f.root.join(".building-v5"), "").unwrap();
    assert!(f.builder.list().is_empty());
    let built = f.build(5, &[]).await.0.unwrap();
    assert_eq!(fs::read_to_string(built.dir.join("app.py")).unwrap(), "new");
    assert_eq!(f.builder.list(), [ReleaseId(5)]);
    assert_eq!(f.root_entries(), ["v5"]);
    // Published: never again.
    let again = f.build(5, &[]).await.0.unwrap_err();
    assert!(matches!(again, ReleaseError::ReleaseExists { .. }), "{again}");
    assert_eq!(f.root_entries(), ["v5"], "the release and no marker");
    // A live build of a number holds its marker: a second one is refused
    // and leaves it alone.
    let marker = fs::File::create(f.root.join(".building-v6")).unwrap();
    let held = nix::fcntl::Flock::lock(marker, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    let refused = f.build(6, &[]).await.0.unwrap_err();
    assert!(matches!(refused, ReleaseError::ReleaseExists { .. }), "{refused}");
    assert!(f.root.join(".building-v6").exists());
    drop(held);
}
