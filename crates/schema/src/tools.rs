//! pg_dump and psql: finding them, their versions, and reading their
//! errors. The parsing is pure and unit-tested; [`tool_version`] runs the
//! program.

use crate::error::GateError;
use std::path::Path;
use std::time::Duration;

/// A version as `server_version_num` writes it: 150020 for 15.20, 90624
/// for 9.6.24.
pub fn version_num(text: &str) -> Option<u32> {
    // "pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)" or "15.20" or "16beta1".
    let after = text.split_once("(PostgreSQL)").map(|(_, v)| v).unwrap_or(text);
    let version = after.split_whitespace().next()?;
    let mut nums = version.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse::<u32>());
    let major = nums.next()?.ok()?;
    let minor = nums.next().and_then(Result::ok).unwrap_or(0);
    if major >= 10 {
        Some(major * 10000 + minor)
    } else {
        let patch = nums.next().and_then(Result::ok).unwrap_or(0);
        Some(major * 10000 + minor * 100 + patch)
    }
}

/// The major version of a `server_version_num`: `15` or `9.6`.
pub fn major(num: u32) -> String {
    if num >= 100_000 {
        (num / 10000).to_string()
    } else {
        format!("{}.{}", num / 10000, num / 100 % 100)
    }
}

/// pg_dump refuses to dump a server of a newer major version.
pub fn dump_can_read(tool: u32, server: u32) -> bool {
    let key = |n: u32| if n >= 100_000 { n / 10000 * 100 } else { n / 100 };
    key(tool) >= key(server)
}

/// Runs `PROGRAM --version` (with a timeout) and reads its version.
pub async fn tool_version(program: &Path, server_num: u32, timeout: Duration) -> Result<u32, GateError> {
    let name = program.display().to_string();
    let run = tokio::process::Command::new(program).arg("--version").kill_on_drop(true).output();
    let output = match tokio::time::timeout(timeout, run).await {
        Err(_) => {
            return Err(GateError::Timeout {
                what: format!("`{name} --version`"),
                server: "this machine".into(),
                after: timeout,
            })
        }
        Ok(Err(source)) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(GateError::ToolMissing { program: name, server_major: major(server_num), source })
        }
        Ok(Err(source)) => return Err(GateError::Spawn { program: name, source }),
        Ok(Ok(o)) => o,
    };
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    version_num(&text).filter(|_| output.status.success()).ok_or(GateError::ToolVersion { program: name, output: text })
}

/// What a failed restore says about an extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtensionProblem {
    /// The server has no such extension (its files are not installed).
    Missing(String),
    /// The user may not create it.
    NotPermitted(String),
}

/// Reads psql's error output for an extension the scratch copy could not
/// get.
pub fn extension_problem(stderr: &str) -> Option<ExtensionProblem> {
    for line in stderr.lines() {
        // PostgreSQL 13-15: could not open extension control file ".../NAME.control": No such file or directory
        if let Some(rest) = line.split_once("could not open extension control file \"").map(|(_, r)| r) {
            let path = rest.split('"').next().unwrap_or("");
            let file = path.rsplit('/').next().unwrap_or(path);
            if let Some(name) = file.strip_suffix(".control") {
                return Some(ExtensionProblem::Missing(name.to_string()));
            }
        }
        // PostgreSQL 16+: extension "NAME" is not available
        // Any: extension "NAME" has no installation script nor update path for version "1.0"
        if let Some(rest) = line.split_once("extension \"").map(|(_, r)| r) {
            if let Some((name, tail)) = rest.split_once('"') {
                if tail.starts_with(" is not available") || tail.starts_with(" has no installation script") {
                    return Some(ExtensionProblem::Missing(name.to_string()));
                }
            }
        }
        // permission denied to create extension "NAME"
        if let Some(rest) = line.split_once("permission denied to create extension \"").map(|(_, r)| r) {
            if let Some(name) = rest.split('"').next() {
                return Some(ExtensionProblem::NotPermitted(name.to_string()));
            }
        }
    }
    None
}

/// The last `lines` lines of `text`, at most `bytes` bytes (cut at a
/// character boundary).
pub fn tail(text: &str, lines: usize, bytes: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    let start = all.len().saturating_sub(lines);
    let joined = all[start..].join("\n");
    if joined.len() <= bytes {
        return joined;
    }
    let mut cut = joined.len() - bytes;
    while !joined.is_char_boundary(cut) {
        cut += 1;
    }
    format!("…{}", &joined[cut..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_as_server_version_nums() {
        assert_eq!(version_num("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"), Some(150020));
        assert_eq!(version_num("psql (PostgreSQL) 16.1"), Some(160001));
        assert_eq!(version_num("pg_dump (PostgreSQL) 17beta2"), Some(170002));
        assert_eq!(version_num("pg_dump (PostgreSQL) 9.6.24"), Some(90624));
        assert_eq!(version_num("not a version"), None);
        assert_eq!((major(150020), major(90624)), ("15".to_string(), "9.6".to_string()));
    }

    #[test]
    fn pg_dump_must_be_at_least_the_servers_major() {
        assert!(dump_can_read(150020, 150004));
        assert!(dump_can_read(160001, 150020));
        assert!(!dump_can_read(140010, 150001));
        assert!(dump_can_read(100000, 90624));
        assert!(!dump_can_read(90624, 100000));
        assert!(!dump_can_read(90500, 90624));
    }

    #[test]
    fn extension_errors_name_the_extension() {
        let pg15 = "psql:<stdin>:20: ERROR:  could not open extension control file \"/usr/share/postgresql/15/extension/nonexistent_ext.control\": No such file or directory";
        assert_eq!(extension_problem(pg15), Some(ExtensionProblem::Missing("nonexistent_ext".into())));
        let pg16 = "psql:<stdin>:20: ERROR:  extension \"postgis\" is not available\nDETAIL: ...";
        assert_eq!(extension_problem(pg16), Some(ExtensionProblem::Missing("postgis".into())));
        let perm = "ERROR:  permission denied to create extension \"plperlu\"\nHINT:  Must be superuser";
        assert_eq!(extension_problem(perm), Some(ExtensionProblem::NotPermitted("plperlu".into())));
        assert_eq!(extension_problem("ERROR:  relation \"x\" already exists"), None);
    }

    #[test]
    fn tails_keep_the_end() {
        let text: String = (1..=50).map(|i| format!("line {i}\n")).collect();
        assert_eq!(tail(&text, 2, 1000), "line 49\nline 50");
        assert_eq!(tail("ééé", 5, 3), "…é");
        assert_eq!(tail("", 5, 10), "");
    }
}
