//! `[static]` files: which releases' files the proxy serves. The engine
//! only says *which* releases are live (every built release not pruned, of
//! the app, with its directory and mounts); indexing and serving belong to
//! the builder's side (`Builder::index_statics`, `Builder::serve_statics`).
//!
//! - A build is followed by indexing its static files (off the engine's
//!   task, as part of the build): a mount's directory missing after the
//!   build fails the deploy before any instance changes, naming it.
//! - After a build, after pruning, when a deployment fails or rolls back,
//!   and when a daemon starts, the live set is published again: a page of
//!   any retained release finds its hashed assets, a pruned release's
//!   assets go with it, and a release newer than the running one is served
//!   only while its deployment is in progress (the newest release that has
//!   a path wins).

use super::*;
use nonstop_core::process::StaticMount;
use nonstop_store::ReleaseStatus;

/// One release whose static files are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveStatics {
    pub release: ReleaseId,
    pub dir: PathBuf,
    pub mounts: Vec<StaticMount>,
}

/// A finished build, followed by the index of its static files.
pub(crate) async fn index_built(
    builder: Arc<dyn Builder>,
    built: Result<BuildOutput, String>,
    mounts: Vec<StaticMount>,
) -> Result<BuildOutput, String> {
    let out = built?;
    if mounts.is_empty() {
        return Ok(out);
    }
    let dir = out.dir.clone();
    match tokio::task::spawn_blocking(move || builder.index_statics(&dir, &mounts)).await {
        Ok(Ok(())) => Ok(out),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(format!("indexing the static files failed: {e}")),
    }
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Engine<D, T, I, L> {
    /// Tell the builder which releases of `app` are live (built, not
    /// pruned, with `[static]` mounts), newest first.
    pub(crate) fn publish_statics(&self, app: &AppName) {
        let all = match self.store.releases(app) {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!("cannot read the releases of {app}, static files unchanged: {e}");
                return;
            }
        };
        // Releases newer than the running one are served only while they
        // are the target of the deployment in progress: a release whose
        // deploy failed or rolled back must not win a path.
        let current = self.app.as_ref().filter(|rt| &rt.record.app == app).map(|rt| rt.record.release);
        let target = self.deployment.as_ref().map(|d| d.to.id);
        let mut live: Vec<LiveStatics> = all
            .into_iter()
            .filter(|r| r.status == ReleaseStatus::Ready && !r.spec.statics.is_empty())
            .filter(|r| current.is_none_or(|c| r.id <= c) || Some(r.id) == target)
            .map(|r| LiveStatics { release: r.id, dir: r.dir, mounts: r.spec.statics })
            .collect();
        live.sort_by_key(|l| std::cmp::Reverse(l.release));
        self.builder.serve_statics(app, live);
    }
}
