//! Process limits the daemon sets for itself at start.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// What [`raise_fd_limit`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit before (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
}

/// The soft limit to ask for: the hard limit, or, when that is unlimited
/// (which Linux refuses for `RLIMIT_NOFILE`), the kernel's per-process
/// ceiling (`/proc/sys/fs/nr_open`, 2^20 by default).
fn target(hard: Option<u64>, nr_open: Option<u64>) -> u64 {
    hard.unwrap_or_else(|| nr_open.unwrap_or(1 << 20))
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, and log both once.
///
/// Why: every client connection of the proxy, every upstream connection
/// and health check, every instance's log and pidfd costs a descriptor,
/// and the soft limit a daemon usually starts with is 1024 (systemd's
/// default, and a login shell's), which a thousand idle clients used up
/// (issue 15). The hard limit is what the administrator allows
/// (`LimitNOFILE=` in the systemd unit, `ulimit -Hn`); raising the soft
/// limit up to it needs no privilege. The proxy derives its connection
/// limit from the soft limit (`nonstop_proxy::derived_max_connections`),
/// keeping a reserve for the rest. Children (monitors, the app's
/// instances) inherit the raised limit, as they would under a unit that
/// sets `LimitNOFILE=`. A failure is logged and the daemon goes on with
/// the limit it has.
pub fn raise_fd_limit() -> FdLimit {
    let limit = getrlimit(Resource::Nofile);
    let (before, hard) = (limit.current, limit.maximum);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok());
    let wanted = target(hard, nr_open);
    let mut now = before;
    if before.is_some_and(|soft| soft < wanted) {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(wanted), maximum: hard }) {
            Ok(()) => now = Some(wanted),
            Err(e) => tracing::warn!(
                soft = before,
                hard,
                "could not raise the file descriptor limit (RLIMIT_NOFILE) to {wanted}: {e}; going on with the soft limit"
            ),
        }
    }
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |v| v.to_string());
    tracing::info!(
        soft_before = %show(before),
        soft = %show(now),
        hard = %show(hard),
        "file descriptor limit (RLIMIT_NOFILE): soft {} (was {}), hard {}",
        show(now),
        show(before),
        show(hard)
    );
    FdLimit { before, now, hard }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_hard_limit_or_the_kernel_ceiling() {
        assert_eq!(target(Some(4096), Some(1 << 20)), 4096);
        assert_eq!(target(None, Some(1 << 20)), 1 << 20);
        assert_eq!(target(None, None), 1 << 20);
    }

    /// In a child process (this test binary again), so that the test
    /// process's own limit is left alone.
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        const CHILD: &str = "NONSTOP_TEST_RAISE_FD_LIMIT";
        if std::env::var_os(CHILD).is_some() {
            let hard = getrlimit(Resource::Nofile).maximum;
            let hard = hard.map_or(4096, |h| h.min(4096));
            setrlimit(Resource::Nofile, Rlimit { current: Some(hard.min(512)), maximum: Some(hard) }).unwrap();
            let got = raise_fd_limit();
            assert_eq!(got.before, Some(hard.min(512)));
            assert_eq!(got.now, Some(hard));
            assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
            // Already at the hard limit: nothing changes.
            assert_eq!(raise_fd_limit().before, Some(hard));
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["limits::tests::the_soft_limit_is_raised_to_the_hard_limit", "--exact", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "the child ran the test");
    }
}
