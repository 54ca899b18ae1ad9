//! Where nonstop keeps its state.

use std::path::{Path, PathBuf};

pub struct Home {
    pub dir: PathBuf,
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

    /// Create the directory, private to the user.
    pub fn create(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| anyhow::anyhow!("cannot create NONSTOP_HOME {}: {e}", self.dir.display()))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(())
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
    pub fn path(&self) -> &Path {
        &self.dir
    }
}
