//! Where nonstop keeps its state, and the rules that make it safe to use.
//!
//! The state directory (`NONSTOP_HOME`) holds what the daemon trusts: the
//! store, the API socket and token, the instance records and logs, the
//! releases it runs. As ssh does with `~/.ssh`, it is refused unless it
//! (and every directory above it) can only be changed by the user running
//! nonstop (or root), and so are the state files at its top. Nothing
//! existing is chmod-ed: the error says what to run. New files are private
//! (the daemon runs with umask 077; files are 0600, directories 0700) and
//! the files at its top are opened without following symbolic links.

use nix::sys::stat::Mode;
use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub struct Home {
    pub dir: PathBuf,
}

/// The entries at the top of a home that nonstop reads or writes; each one
/// that exists is checked (owner, mode, no symbolic link).
const STATE_ENTRIES: &[(&str, Kind)] = &[
    ("state.db", Kind::File),
    ("state.db-wal", Kind::File),
    ("state.db-shm", Kind::File),
    ("state.db.backup", Kind::File),
    ("daemon.log", Kind::File),
    ("daemon.pid", Kind::File),
    ("daemon.lock", Kind::File),
    ("api-token", Kind::File),
    ("secrets.key", Kind::File),
    ("upgrade.ready", Kind::File),
    ("upgrade.serving", Kind::File),
    ("nonstop.sock", Kind::Socket),
    ("instances", Kind::Dir),
    ("logs", Kind::Dir),
    ("releases", Kind::Dir),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Socket,
}

impl Kind {
    fn matches(self, m: &Metadata) -> bool {
        let t = m.file_type();
        match self {
            Kind::File => t.is_file(),
            Kind::Dir => t.is_dir(),
            Kind::Socket => t.is_socket(),
        }
    }
    fn noun(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Socket => "a socket",
        }
    }
}

/// The daemon refuses its state directory (unsafe home, damaged or lost
/// store): nothing was started, and starting it again changes nothing until
/// someone acts. The daemon exits with code 2 for it (1 for other
/// failures), so that whatever restarts it can tell.
#[derive(Debug)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Something about the home that makes it unsafe to use: the path, what
/// was found, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HomeProblem {
    pub path: PathBuf,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for HomeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.path.display(), self.problem, self.fix)
    }
}

/// `uid 1000 (alice)`.
fn describe_uid(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten() {
        Some(u) => format!("uid {uid} ({})", u.name),
        None => format!("uid {uid}"),
    }
}

fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Writable by group or others, and not protected by the sticky bit.
fn loosely_writable(m: &Metadata) -> bool {
    m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0
}

impl Home {
    pub fn resolve(flag: Option<PathBuf>) -> anyhow::Result<Home> {
        let dir = match flag {
            Some(d) => d,
            None => {
                let base = std::env::var_os("XDG_DATA_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
                    .ok_or_else(|| anyhow::anyhow!("cannot tell where to keep state: set NONSTOP_HOME or HOME"))?;
                base.join("nonstop")
            }
        };
        let dir = if dir.is_absolute() { dir } else { std::env::current_dir()?.join(dir) };
        Ok(Home { dir })
    }

    /// Create the directory (0700) if it does not exist, then check it
    /// ([`Home::verify`]). An existing directory is never chmod-ed.
    pub fn create(&self) -> anyhow::Result<()> {
        if std::fs::symlink_metadata(&self.dir).is_err() {
            if let Some(parent) = self.dir.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {} // checked below
                Err(e) => anyhow::bail!("cannot create NONSTOP_HOME {}: {e}", self.dir.display()),
            }
        }
        self.verify()
    }

    /// Refuse a home that someone else could change: see [`Home::problems`].
    /// A home that does not exist yet is fine.
    pub fn verify(&self) -> anyhow::Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        Err(Refused(format!(
            "refusing to use NONSTOP_HOME {}: another user could change what nonstop trusts there:\n{}",
            self.dir.display(),
            list.join("\n")
        ))
        .into())
    }

    /// What makes this home unsafe: it, or a directory above it, can be
    /// changed by someone other than the user (or root); a state file at
    /// its top is a symbolic link, of another kind than expected, owned by
    /// someone else, or writable by group or others. Empty when the home
    /// does not exist yet.
    pub fn problems(&self) -> Vec<HomeProblem> {
        let mut out = Vec::new();
        let meta = match std::fs::metadata(&self.dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
            Err(e) => {
                out.push(HomeProblem {
                    path: self.dir.clone(),
                    problem: format!("cannot be read ({e})"),
                    fix: "check the path and its permissions, or choose another NONSTOP_HOME".into(),
                });
                return out;
            }
        };
        let me = me();
        if !meta.is_dir() {
            out.push(HomeProblem {
                path: self.dir.clone(),
                problem: "is not a directory".into(),
                fix: "choose another NONSTOP_HOME".into(),
            });
            return out;
        }
        if meta.uid() != me {
            out.push(HomeProblem {
                path: self.dir.clone(),
                problem: format!("is owned by {}, not by you ({})", describe_uid(meta.uid()), describe_uid(me)),
                fix: format!(
                    "if it is yours, `chown -R {me} {}`; otherwise choose another NONSTOP_HOME",
                    self.dir.display()
                ),
            });
        }
        if meta.mode() & 0o022 != 0 {
            out.push(HomeProblem {
                path: self.dir.clone(),
                problem: format!("has mode {:04o}: writable by group or others", meta.mode() & 0o7777),
                fix: format!("check what is inside, then `chmod 700 {}`", self.dir.display()),
            });
        }
        // The directories above: whoever can write one can replace the home.
        let mut chain: Vec<PathBuf> = self.dir.ancestors().skip(1).map(Path::to_path_buf).collect();
        if let Ok(real) = self.dir.canonicalize() {
            if real != self.dir {
                chain.extend(real.ancestors().skip(1).map(Path::to_path_buf));
            }
        }
        let mut seen = std::collections::HashSet::new();
        chain.retain(|d| seen.insert(d.clone()));
        for dir in chain {
            let Ok(m) = std::fs::metadata(&dir) else { continue };
            if m.uid() != me && m.uid() != 0 {
                out.push(HomeProblem {
                    path: dir.clone(),
                    problem: format!(
                        "(above NONSTOP_HOME) is owned by {}: that user could replace {}",
                        describe_uid(m.uid()),
                        self.dir.display()
                    ),
                    fix: "choose a NONSTOP_HOME whose parent directories belong to you or root".into(),
                });
            } else if loosely_writable(&m) {
                out.push(HomeProblem {
                    path: dir.clone(),
                    problem: format!(
                        "(above NONSTOP_HOME) has mode {:04o}: group or others could replace {}",
                        m.mode() & 0o7777,
                        self.dir.display()
                    ),
                    fix: format!("`chmod go-w {}`, or choose another NONSTOP_HOME", dir.display()),
                });
            }
        }
        for (name, kind) in STATE_ENTRIES {
            let path = self.dir.join(name);
            let Ok(m) = std::fs::symlink_metadata(&path) else { continue };
            if m.file_type().is_symlink() {
                let target = std::fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_default();
                out.push(HomeProblem {
                    path: path.clone(),
                    problem: format!("is a symbolic link (to {target}); nonstop does not follow links in its state"),
                    fix: format!("remove it (`rm {}`)", path.display()),
                });
                continue;
            }
            if !kind.matches(&m) {
                out.push(HomeProblem {
                    path: path.clone(),
                    problem: format!("is not {}", kind.noun()),
                    fix: format!("remove it (`rm -r {}`)", path.display()),
                });
                continue;
            }
            if m.uid() != me {
                out.push(HomeProblem {
                    path: path.clone(),
                    problem: format!("is owned by {}, not by you ({})", describe_uid(m.uid()), describe_uid(me)),
                    fix: format!("`chown -R {me} {}` if it is yours, or remove it", path.display()),
                });
            } else if m.mode() & 0o022 != 0 {
                let private = if *kind == Kind::Dir { "700" } else { "600" };
                out.push(HomeProblem {
                    path: path.clone(),
                    problem: format!("has mode {:04o}: writable by group or others", m.mode() & 0o7777),
                    fix: format!("`chmod {private} {}`", path.display()),
                });
            }
        }
        out
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("nonstop.sock")
    }
    pub fn database(&self) -> PathBuf {
        self.dir.join("state.db")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("daemon.lock")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }
    pub fn token(&self) -> PathBuf {
        self.dir.join("api-token")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("daemon.pid")
    }
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `daemon.log`, opened for appending (created 0600), never through a
    /// symbolic link.
    pub fn open_daemon_log(&self) -> anyhow::Result<File> {
        let path = self.daemon_log();
        open_private(&path, OpenOptions::new().create(true).append(true))
            .map_err(|e| anyhow::anyhow!("cannot open {}: {}", path.display(), nofollow_hint(&e)))
    }
}

/// Open `path` with `options`, creating it 0600, without following a
/// symbolic link in its last component (ELOOP then).
pub fn open_private(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    options.mode(0o600).custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC).open(path)
}

/// An error from [`open_private`], with "a symbolic link" for ELOOP.
pub fn nofollow_hint(e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(nix::libc::ELOOP) {
        "it is a symbolic link, which nonstop does not follow in its state directory; remove it".to_string()
    } else {
        e.to_string()
    }
}

/// Write `contents` to `path` (created 0600, truncated), never through a
/// symbolic link.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = open_private(path, OpenOptions::new().write(true).create(true).truncate(true))?;
    f.write_all(contents)
}

/// The variable through which the umask of the user who started nonstop
/// reaches the daemon (and a daemon that replaces it on upgrade), which
/// itself runs with umask 077: instances and tasks get that umask back.
pub const APP_UMASK_VAR: &str = "NONSTOP_APP_UMASK";

/// The umask this process started with.
pub fn current_umask() -> u32 {
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    nix::sys::stat::umask(old);
    old.bits()
}

/// The umask for the app's processes: the one passed down by the command
/// that started this daemon, else this process's own.
pub fn app_umask() -> u32 {
    std::env::var(APP_UMASK_VAR)
        .ok()
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .filter(|m| *m <= 0o777)
        .unwrap_or_else(current_umask)
}

/// How the daemon runs a monitor: `EXE __monitor --umask OOOO` (the
/// driver appends the staging directory).
pub fn monitor_command(exe: PathBuf) -> Vec<std::ffi::OsString> {
    vec![exe.into_os_string(), "__monitor".into(), "--umask".into(), format!("{:04o}", app_umask()).into()]
}

/// For the daemon and `doctor`: from now on everything this process
/// creates is private to the user. Called before any thread exists (it
/// sets [`APP_UMASK_VAR`] for the daemon's children).
pub fn private_umask() {
    let app = app_umask();
    std::env::set_var(APP_UMASK_VAR, format!("{app:04o}"));
    nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn private_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    #[test]
    fn a_new_home_is_created_0700_and_passes() {
        let d = private_dir();
        let home = Home { dir: d.path().join("a/b/home") };
        home.create().unwrap();
        let m = std::fs::metadata(&home.dir).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        assert!(home.problems().is_empty(), "{:?}", home.problems());
    }

    #[test]
    fn a_world_writable_home_is_refused_and_left_as_it_is() {
        let d = private_dir();
        let home = Home { dir: d.path().join("home") };
        std::fs::create_dir(&home.dir).unwrap();
        std::fs::set_permissions(&home.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = home.create().unwrap_err().to_string();
        assert!(err.contains("mode 0777") && err.contains("chmod 700"), "{err}");
        assert_eq!(std::fs::metadata(&home.dir).unwrap().mode() & 0o777, 0o777, "never chmod-ed");
    }

    #[test]
    fn a_group_writable_parent_without_sticky_bit_is_refused() {
        let d = private_dir();
        let parent = d.path().join("shared");
        std::fs::create_dir(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o775)).unwrap();
        let home = Home { dir: parent.join("home") };
        let err = home.create().unwrap_err().to_string();
        assert!(err.contains("above NONSTOP_HOME") && err.contains("chmod go-w"), "{err}");
        // With the sticky bit (as /tmp) it is fine.
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o1777)).unwrap();
        home.create().unwrap();
    }

    #[test]
    fn a_foreign_owned_home_or_state_file_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (to give a directory to another user); run the tests as root");
        }
        let d = private_dir();
        let home = Home { dir: d.path().join("home") };
        std::fs::create_dir(&home.dir).unwrap();
        std::fs::set_permissions(&home.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let nobody = Some(nix::unistd::Uid::from_raw(65534));
        std::fs::write(home.dir.join("state.db"), b"").unwrap();
        nix::unistd::chown(&home.dir.join("state.db"), nobody, None).unwrap();
        let err = home.verify().unwrap_err().to_string();
        assert!(err.contains("state.db") && err.contains("uid 65534") && err.contains("chown"), "{err}");
        nix::unistd::chown(&home.dir, nobody, None).unwrap();
        let err = home.create().unwrap_err().to_string();
        assert!(err.contains("is owned by uid 65534") && err.contains("not by you"), "{err}");
    }

    #[test]
    fn a_planted_symlink_is_refused_and_not_followed() {
        let d = private_dir();
        let home = Home { dir: d.path().join("home") };
        home.create().unwrap();
        let target = d.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        std::os::unix::fs::symlink(&target, home.daemon_log()).unwrap();
        let err = home.verify().unwrap_err().to_string();
        assert!(err.contains("daemon.log") && err.contains("symbolic link"), "{err}");
        let err = home.open_daemon_log().unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(write_private(&home.daemon_log(), b"x").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }

    #[test]
    fn private_files_are_0600() {
        let d = private_dir();
        let home = Home { dir: d.path().join("home") };
        home.create().unwrap();
        drop(home.open_daemon_log().unwrap());
        write_private(&home.token(), b"t").unwrap();
        for p in [home.daemon_log(), home.token()] {
            assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600, "{}", p.display());
        }
    }
}
