//! Checks that need the file system, done before anything changes: does
//! the first word of each command exist? Are the static files the smoke
//! checks name in the built release?

use nonstop_core::process::{AppSpec, HealthCheck, StaticMount};
use std::path::{Path, PathBuf};

/// Shell words that are not programs on the PATH.
const SHELL_BUILTINS: &[&str] = &[
    "exec", "cd", "export", "set", "unset", "source", ".", "eval", "test", "[", "true", "false", "echo", "printf",
    "read", "trap", "wait", "sleep", "exit", "if", "while", "for", "until", "case", "{", "(", "!", "ulimit", "umask",
    "command", "env", "nohup", "time",
];

/// The program a `sh -c` command line starts, if it can be told without
/// running it: skips `VAR=value` assignments and `exec`; gives up (None) on
/// anything with shell expansion or compound syntax.
pub fn program_of(command: &str) -> Option<&str> {
    let mut words = command.split_whitespace();
    loop {
        let w = words.next()?;
        if w.contains('=') && !w.starts_with('=') && !w.contains('/') {
            continue; // VAR=value
        }
        if w == "exec" {
            continue;
        }
        if w.contains(['$', '`', '(', ')', '{', '}', ';', '&', '|', '<', '>', '"', '\'', '*', '?', '~']) {
            return None;
        }
        if SHELL_BUILTINS.contains(&w) {
            return None;
        }
        return Some(w);
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Where `program` would be found, like `sh` would find it.
pub fn resolve(program: &str, workdir: &Path, path_var: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = if Path::new(program).is_absolute() { PathBuf::from(program) } else { workdir.join(program) };
        return is_executable(&p).then_some(p);
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| {
            let d = Path::new(d);
            if d.is_absolute() {
                d.join(program)
            } else {
                workdir.join(d).join(program)
            }
        })
        .find(|p| is_executable(p))
}

/// Every process whose program cannot be found, as user-facing problems.
pub fn check_commands(spec: &AppSpec, workdir: &Path, path_var: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !workdir.is_dir() {
        problems.push(format!("the app directory {} does not exist", workdir.display()));
        return problems;
    }
    for p in &spec.processes {
        let path = p.env.get("PATH").or_else(|| spec.env.get("PATH")).map(String::as_str).unwrap_or(path_var);
        if let Some(program) = program_of(&p.command) {
            if resolve(program, workdir, path).is_none() {
                problems.push(format!(
                    "processes.{}.command: `{program}` was not found (PATH={path}, app directory {}); install it or fix the command",
                    p.name,
                    workdir.display()
                ));
            }
        }
    }
    problems
}

/// The static mount a smoke path falls under, and the file it names
/// relative to the mount's directory.
fn static_target<'a>(path: &'a str, statics: &'a [StaticMount]) -> Option<(&'a StaticMount, &'a str)> {
    let path = path.split('?').next().unwrap_or(path);
    statics.iter().find_map(|m| path.strip_prefix(m.url.as_str()).map(|rest| (m, rest)))
}

/// The health check an instance gets: smoke paths under a `[static]` url
/// are left out (the proxy answers those itself, from the release's
/// files, which [`check_smoke_assets`] checked after the build).
pub fn instance_check(mut check: HealthCheck, statics: &[StaticMount]) -> HealthCheck {
    check.smoke.retain(|s| static_target(&s.path, statics).is_none());
    check
}

/// Every web smoke path under a `[static]` url that the built release
/// `dir` does not have, as user-facing problems (a build that forgot
/// `collectstatic`).
pub fn check_smoke_assets(spec: &AppSpec, dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for p in spec.processes.iter().filter_map(|p| p.health.as_ref().map(|h| (p, h))) {
        for smoke in &p.1.smoke {
            let Some((mount, rest)) = static_target(&smoke.path, &spec.statics) else { continue };
            let file = dir.join(&mount.dir).join(rest);
            let inside = !rest.split('/').any(|s| s == ".." || s == ".");
            if !(inside && file.is_file()) {
                problems.push(format!(
                    "processes.{}.health.smoke: {} is not among the release's static files ({} is missing); did the build run collectstatic (or your asset build)?",
                    p.0.name,
                    smoke.path,
                    mount.dir.join(rest).display()
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web_with_smoke(paths: &[&str], statics: Vec<StaticMount>) -> AppSpec {
        use nonstop_core::process::{SmokeCheck, StatusRange};
        let mut spec = nonstop_testkit::spec::app("a").web("web", 1).build();
        spec.statics = statics;
        let health = spec.processes[0].health.as_mut().unwrap();
        health.smoke = paths
            .iter()
            .map(|p| SmokeCheck { path: p.to_string(), expect_status: StatusRange { min: 200, max: 399 } })
            .collect();
        spec
    }

    #[test]
    fn smoke_paths_under_a_static_url_are_checked_on_disk_not_on_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("staticfiles/css")).unwrap();
        std::fs::write(dir.path().join("staticfiles/css/app.3f2a.css"), "x").unwrap();
        let statics = vec![StaticMount { url: "/static/".into(), dir: "staticfiles".into() }];
        let spec = web_with_smoke(&["/", "/static/css/app.3f2a.css", "/static/css/gone.css", "/static/../x"], statics);
        let problems = check_smoke_assets(&spec, dir.path());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("/static/css/gone.css is not among the release's static files"), "{problems:?}");
        assert!(problems[0].contains("staticfiles/css/gone.css is missing"), "{problems:?}");
        let check = instance_check(spec.processes[0].health.clone().unwrap(), &spec.statics);
        let paths: Vec<&str> = check.smoke.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths, ["/"]);
    }

    #[test]
    fn finds_the_program_word() {
        assert_eq!(program_of("gunicorn app:wsgi"), Some("gunicorn"));
        assert_eq!(program_of("FOO=1 BAR=2 exec python3 -m x"), Some("python3"));
        assert_eq!(program_of("./bin/web --port $PORT"), Some("./bin/web"));
        assert_eq!(program_of("$HOME/bin/x"), None);
        assert_eq!(program_of("cd sub && python x"), None);
        assert_eq!(program_of(""), None);
    }

    #[test]
    fn resolves_on_path_and_relative_to_the_app() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resolve("sh", dir.path(), "/usr/bin:/bin").is_some());
        assert!(resolve("definitely-not-a-program-xyz", dir.path(), "/usr/bin:/bin").is_none());
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(resolve("./run.sh", dir.path(), "").is_none(), "not executable yet");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(resolve("./run.sh", dir.path(), "").is_some());
    }
}
