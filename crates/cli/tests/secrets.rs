//! End-to-end tests of `nonstop secrets` with the real binary, real
//! processes and the hello example: a secret set through stdin reaches the
//! instances and the release task (seen through the SHA-256 of the value,
//! never the value), and its bytes are nowhere else: no file under
//! NONSTOP_HOME (store, WAL, logs, instances, releases), no output of the
//! CLI. Bad input changes nothing.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// The brief's words for a value on the command line.
const ARGV_REFUSAL: &str = "secret values are never taken from the command line (shell history, ps); pipe it: \
printf %s \"$VALUE\" | nonstop secrets set NAME";

/// A small hello: one web instance, one worker, a release task that writes
/// the SHA-256 of API_TOKEN (`-` when unset) to `task_out`, and a plain
/// `[env]` URL with a password (which `deploy` warns about).
fn app_with_task(task_out: &Path) -> TestApp {
    let spec = format!(
        r#"app = "hello"

[env]
GREETING = "hello"
TASK_OUT = "{out}"
CACHE_URL = "redis://:plain-password@127.0.0.1:6379/0"

[release]
tasks = ["python3 task_sha.py"]

[proxy]
listen = "127.0.0.1:8080"

[processes.web]
command = "exec python3 app.py"
kind = "web"
count = 1
drain_timeout = "1s"

[processes.web.health]
path = "/health"
interval = "200ms"
healthy_threshold = 1

[processes.worker]
command = "exec python3 worker.py"
kind = "worker"
count = 1
ready_after = "500ms"
"#,
        out = task_out.display()
    );
    let app = TestApp::new("hello", |_| spec);
    std::fs::write(
        app.dir.path().join("task_sha.py"),
        "import hashlib, os\n\
         v = os.environ.get('API_TOKEN')\n\
         d = '-' if v is None else hashlib.sha256(v.encode()).hexdigest()\n\
         open(os.environ['TASK_OUT'], 'a').write(d + '\\n')\n",
    )
    .unwrap();
    app
}

/// A value nobody could have typed elsewhere: its bytes found anywhere are
/// a leak.
fn random_value(tag: &str) -> String {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("tok-{tag}-{hex}")
}

fn sha(value: &str) -> String {
    Sha256::digest(value.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// `nonstop ARGS` with `input` on stdin.
fn run_with_stdin(app: &TestApp, args: &[&str], input: &[u8], env: &[(&str, &str)]) -> Run {
    let mut cmd = app.cmd(args);
    cmd.stdin(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = wait_output(child, T, &format!("nonstop {}", args.join(" ")));
    app.note_daemon();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What instances see of API_TOKEN: its SHA-256, or `-`.
fn token_sha(app: &TestApp) -> String {
    let (code, body) = app.get("/env-sha256?name=API_TOKEN").unwrap();
    assert_eq!(code, 200, "{body}");
    body.trim().to_string()
}

/// Every regular file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(t) = entry.file_type() else { continue };
            if t.is_dir() {
                stack.push(entry.path());
            } else if t.is_file() {
                if let Ok(bytes) = std::fs::read(entry.path()) {
                    if bytes.windows(needle.len()).any(|w| w == needle) {
                        found.push(entry.path().display().to_string());
                    }
                }
            }
        }
    }
    found
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => n += 1,
                _ => {}
            }
        }
    }
    n
}

#[test]
fn a_secret_reaches_instances_and_release_tasks_and_its_bytes_are_nowhere_else() {
    let out_dir = tempfile::tempdir().unwrap();
    let task_out = out_dir.path().join("task-sha.txt");
    let app = app_with_task(&task_out);
    let (v1, v2) = (random_value("one"), random_value("two"));
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut keep = |what: &str, r: &Run| outputs.push((what.to_string(), format!("{}\n{}", r.stdout, r.stderr)));

    // Through stdin, with the newline `echo` adds; before the first deploy
    // (this starts the daemon).
    let r = run_with_stdin(&app, &["secrets", "set", "API_TOKEN"], format!("{v1}\n").as_bytes(), &[]);
    r.ok();
    keep("secrets set", &r);
    assert!(r.stdout.contains("API_TOKEN set for hello in default (version 1)"), "{}", r.stdout);
    assert!(r.stderr.contains("created the secrets key"), "{}", r.stderr);
    let key = app.home.path().join("secrets.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);

    let r = app.run(&["deploy"]);
    r.ok();
    keep("deploy", &r);
    // A plain [env] credential draws a warning, not an error, and its value
    // is not repeated.
    assert!(r.stderr.contains("warning: [env] CACHE_URL looks like a credential"), "{}", r.stderr);
    assert!(r.stderr.contains("nonstop secrets set CACHE_URL"), "{}", r.stderr);
    assert!(!r.stderr.contains("plain-password"), "{}", r.stderr);
    // The instance and the release task saw the value (without the newline).
    assert_eq!(token_sha(&app), sha(&v1));
    assert_eq!(std::fs::read_to_string(&task_out).unwrap().lines().collect::<Vec<_>>(), [sha(&v1)]);
    // So does `nonstop run` (decrypted by the CLI itself), while the run
    // context the daemon answers with has no trace of it.
    let r = app.run(&["run", "--", "sh", "-c", "printf '%s|%s' \"$API_TOKEN\" \"$GREETING\""]);
    r.ok();
    assert_eq!(r.stdout, format!("{v1}|hello"));
    let ctx = app.api_get("/v1/run-context?app=hello&env=default");
    assert!(ctx.contains("\"environment\":\"default\"") && ctx.contains("GREETING"), "{ctx}");
    assert!(!ctx.contains(&v1) && !ctx.contains("API_TOKEN"), "the run context holds the secret: {ctx}");

    // A new version from a file: nothing changes until the next deploy.
    let file = out_dir.path().join("value.txt");
    std::fs::write(&file, &v2).unwrap();
    let r = app.run(&["secrets", "set", "API_TOKEN", "--from-file", file.to_str().unwrap()]);
    r.ok();
    keep("secrets set --from-file", &r);
    assert!(
        r.stdout.contains("(version 2); takes effect at the next `nonstop deploy` or `nonstop restart`"),
        "{}",
        r.stdout
    );
    std::fs::remove_file(&file).unwrap();
    assert_eq!(token_sha(&app), sha(&v1));
    // Unchanged code and config: the changed secret is deployed all the same.
    let r = app.run(&["deploy"]);
    r.ok();
    keep("second deploy", &r);
    assert!(!r.stdout.contains("nothing to deploy"), "{}", r.stdout);
    assert_eq!(token_sha(&app), sha(&v2));
    assert_eq!(std::fs::read_to_string(&task_out).unwrap().lines().last(), Some(sha(&v2).as_str()));

    let r = app.run(&["secrets", "list", "--json"]);
    r.ok();
    keep("secrets list --json", &r);
    let list: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(list["app"], "hello");
    assert_eq!(list["secrets"][0]["name"], "API_TOKEN");
    assert_eq!(list["secrets"][0]["version"], 2);
    assert!(list["secrets"][0]["set_by"].as_str().unwrap().contains('@'), "{list}");
    let r = app.run(&["secrets", "list"]);
    r.ok();
    keep("secrets list", &r);
    assert!(r.stdout.contains("API_TOKEN") && r.stdout.contains("v2"), "{}", r.stdout);

    for args in [
        &["status", "--json"][..],
        &["status"],
        &["history", "--json"],
        &["events", "--json", "-n", "1000"],
        &["events", "-n", "1000"],
        &["releases", "--json"],
        &["logs", "--tail", "10000"],
        &["logs", "--json", "--tail", "10000"],
    ] {
        let r = app.run(args);
        r.ok();
        keep(&args.join(" "), &r);
    }

    // Unset: gone at the next restart; its history stays.
    let r = app.run(&["secrets", "unset", "API_TOKEN"]);
    r.ok();
    keep("secrets unset", &r);
    assert!(r.stdout.contains("API_TOKEN unset for hello in default"), "{}", r.stdout);
    assert_eq!(token_sha(&app), sha(&v2));
    let r = app.run(&["restart"]);
    r.ok();
    keep("restart", &r);
    assert_eq!(token_sha(&app), "-");
    let r = app.run(&["secrets", "list", "--json"]);
    keep("secrets list after unset", &r);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()["secrets"], serde_json::json!([]));

    // The values' bytes: in no output, in no file of the state directory
    // (store, its WAL, logs, instances, releases, the daemon's log), while
    // the daemon runs and after it stopped.
    for (what, text) in &outputs {
        for v in [&v1, &v2] {
            assert!(!text.contains(v.as_str()), "`nonstop {what}` showed a secret value:\n{text}");
        }
    }
    assert!(app.home.path().join("state.db-wal").exists() || app.home.path().join("state.db").exists());
    assert!(count_files(app.home.path()) > 10, "the home has its files");
    // The search finds what is there (the release task's file of hashes).
    assert_eq!(files_containing(out_dir.path(), sha(&v2).as_bytes()), [task_out.display().to_string()]);
    for v in [&v1, &v2] {
        let found = files_containing(app.home.path(), v.as_bytes());
        assert!(found.is_empty(), "secret bytes found in {found:?}");
    }
    app.run(&["down"]).ok();
    for v in [&v1, &v2] {
        let found = files_containing(app.home.path(), v.as_bytes());
        assert!(found.is_empty(), "secret bytes found in {found:?} after down");
    }
}

#[test]
fn bad_input_and_a_key_that_cannot_be_had_change_nothing() {
    let out_dir = tempfile::tempdir().unwrap();
    let app = app_with_task(&out_dir.path().join("task-sha.txt"));
    let value = random_value("bad");

    // A value on the command line, either way: refused, nothing sent (no
    // daemon is even started), the value not repeated.
    for args in [vec!["secrets", "set", "API_TOKEN=hunter2-argv"], vec!["secrets", "set", "API_TOKEN", "hunter2-argv"]]
    {
        let r = app.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}\n{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(ARGV_REFUSAL), "{}", r.stderr);
        assert!(!r.stderr.contains("hunter2"), "{}", r.stderr);
    }
    // An invalid name, an empty value, a malformed NONSTOP_SECRETS_KEY.
    let r = run_with_stdin(&app, &["secrets", "set", "api-token"], value.as_bytes(), &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("invalid secret name \"api-token\"") && r.stderr.contains("API_TOKEN"), "{}", r.stderr);
    let r = run_with_stdin(&app, &["secrets", "set", "API_TOKEN"], b"", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is empty"), "{}", r.stderr);
    let r = run_with_stdin(
        &app,
        &["secrets", "set", "API_TOKEN"],
        value.as_bytes(),
        &[("NONSTOP_SECRETS_KEY", "not-a-key")],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("NONSTOP_SECRETS_KEY is not a secrets key"), "{}", r.stderr);
    assert!(!r.stderr.contains("not-a-key"), "{}", r.stderr);
    assert!(app.daemon_pid().is_none(), "no daemon was started");
    assert!(!app.home.path().join("secrets.key").exists());

    // The app runs without secrets; nothing was stored.
    app.run(&["deploy"]).ok();
    assert_eq!(token_sha(&app), "-");
    let r = app.run(&["secrets", "list", "--json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()["secrets"], serde_json::json!([]));
    let r = app.run(&["secrets", "unset", "API_TOKEN"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("secret API_TOKEN is not set for hello in default"), "{}", r.stderr);

    run_with_stdin(&app, &["secrets", "set", "API_TOKEN"], value.as_bytes(), &[]).ok();
    app.run(&["restart"]).ok();
    assert_eq!(token_sha(&app), sha(&value));
    let pid = app.pids("web");

    // The key file gone: restart and deploy fail before anything, naming
    // the fix; the running release keeps running.
    let key = app.home.path().join("secrets.key");
    let saved = out_dir.path().join("saved.key");
    std::fs::rename(&key, &saved).unwrap();
    let r = app.run(&["restart"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("the secrets key is missing: restore"), "{}", r.stderr);
    assert!(r.stderr.contains("nothing was changed"), "{}", r.stderr);
    app.write_spec(&app.spec().replace("GREETING = \"hello\"", "GREETING = \"hi\""));
    let r = app.run(&["deploy"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("the secrets key is missing"), "{}", r.stderr);
    assert_eq!(app.pids("web"), pid, "the running instance was not touched");
    // `nonstop run` cannot have them either: it runs nothing, and says how
    // to give it the key.
    let ran = out_dir.path().join("ran");
    let touch = format!("touch {}", ran.display());
    let r = app.run(&["run", "--", &touch]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("the secrets of hello in default cannot be read, so nothing was run"), "{}", r.stderr);
    assert!(r.stderr.contains("the secrets key is missing"), "{}", r.stderr);
    assert!(r.stderr.contains("`nonstop run` decrypts the environment's secrets itself"), "{}", r.stderr);
    // ...nor with another key in NONSTOP_SECRETS_KEY.
    let mut cmd = app.cmd(&["run", "--", &touch]);
    cmd.env("NONSTOP_SECRETS_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
    let out = wait_output(cmd.spawn().unwrap(), T, "run with another key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not match the one these secrets were written with"), "{stderr}");
    assert!(!ran.exists(), "nothing ran without its secrets");
    assert_eq!(app.status()["release"], 1);
    assert_eq!(token_sha(&app), sha(&value));
    // `set` does not create a new key while secrets exist.
    let r = run_with_stdin(&app, &["secrets", "set", "OTHER_TOKEN"], b"other-value-1234", &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!key.exists());

    // A wrong key (another valid one): named, nothing changes.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key).unwrap();
        f.write_all(b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    }
    let r = app.run(&["restart"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("does not match the one these secrets were written with"), "{}", r.stderr);
    assert_eq!(app.pids("web"), pid);

    // The key back: a release task that prints the secret and fails shows
    // it redacted.
    std::fs::rename(&saved, &key).unwrap();
    let r = app.run(&["run", "--", &touch]);
    r.ok();
    assert!(ran.exists());
    app.write_spec(
        &app.spec().replace("tasks = [\"python3 task_sha.py\"]", "tasks = [\"echo token is $API_TOKEN; exit 3\"]"),
    );
    let r = app.run(&["deploy"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("token is [secret API_TOKEN]"), "{}", r.stderr);
    assert!(!format!("{}{}", r.stdout, r.stderr).contains(&value), "{}", r.stderr);
    let h = app.run(&["history", "--json"]);
    assert!(h.stdout.contains("[secret API_TOKEN]") && !h.stdout.contains(&value), "{}", h.stdout);

    // A daemon started with a malformed NONSTOP_SECRETS_KEY: a deploy fails
    // before anything starts, naming the variable.
    app.run(&["down"]).ok();
    app.write_spec(&app.spec().replace("tasks = [\"echo token is $API_TOKEN; exit 3\"]", "tasks = []"));
    let mut cmd = app.cmd(&["deploy"]);
    cmd.env("NONSTOP_SECRETS_KEY", "zz-not-base64-zz");
    let out = wait_output(cmd.spawn().unwrap(), T, "deploy with a malformed key");
    app.note_daemon();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NONSTOP_SECRETS_KEY is not a secrets key"), "{stderr}");
    assert!(!stderr.contains("zz-not-base64-zz"), "{stderr}");
    assert!(app.get("/").is_err(), "nothing serves");
}
