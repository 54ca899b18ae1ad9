//! Checks that need the file system, done before anything changes: does
//! the first word of each command exist?

use nonstop_core::process::AppSpec;
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

#[cfg(test)]
mod tests {
    use super::*;

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
