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
//!   assets go with it, and a release whose deployment failed before its
//!   rollout began is served only while that deployment is in progress.
//!   The running release wins a path that several have, then the
//!   deployment's target, then the newest (`nonstop_plan::statics`).

use super::*;
use nonstop_core::process::StaticMount;
use nonstop_plan::statics::{serve_order, StaticCandidate};
use nonstop_store::{DeploymentStatus, ReleaseStatus};

pub use nonstop_core::build::LiveStatics;

/// A finished build, followed by the index of its static files.
pub(crate) async fn index_built(
    builder: Arc<dyn Builder>,
    built: Result<BuildOutput, BuildError>,
    mounts: Vec<StaticMount>,
) -> Result<BuildOutput, BuildError> {
    let out = built?;
    if mounts.is_empty() {
        return Ok(out);
    }
    let dir = out.dir.clone();
    match tokio::task::spawn_blocking(move || builder.index_statics(&dir, &mounts)).await {
        Ok(Ok(())) => Ok(out),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(BuildError::Interrupted { what: "indexing the static files", source: Box::new(e) }),
    }
}

/// The releases of `app` whose `[static]` files are served (built, not
/// pruned, with mounts), in precedence order: the running release
/// (`current`), the deployment's target, then the others whose instances
/// may have rendered pages, newest first (`nonstop_plan::statics`).
pub(crate) fn live_statics(
    store: &Store,
    env: &EnvironmentId,
    app: &AppName,
    current: Option<ReleaseId>,
    target: Option<ReleaseId>,
) -> nonstop_store::Result<Vec<LiveStatics>> {
    let all = store.releases(app)?;
    let deployments = store.deployments(app, env, 10_000)?;
    // Its instances may have rendered pages: it went live, or its rollout
    // began (a rolled-back deployment changed instances; a failed one did
    // not).
    let rendered = |id: ReleaseId| {
        deployments.iter().any(|d| {
            d.to_release == id && matches!(d.status, DeploymentStatus::Succeeded | DeploymentStatus::RolledBack)
        })
    };
    let mut built: Vec<_> =
        all.into_iter().filter(|r| r.status == ReleaseStatus::Ready && !r.spec.statics.is_empty()).collect();
    let candidates: Vec<StaticCandidate> =
        built.iter().map(|r| StaticCandidate { release: r.id, rendered: rendered(r.id) }).collect();
    Ok(serve_order(&candidates, current, target)
        .iter()
        .filter_map(|id| {
            let i = built.iter().position(|r| r.id == *id)?;
            let r = built.swap_remove(i);
            Some(LiveStatics { release: r.id, dir: r.dir, mounts: r.spec.statics })
        })
        .collect())
}

/// What a starting daemon serves before its engines run (so that its
/// proxy never accepts a request for a static file it has not loaded yet):
/// the live static files of every app running in every environment, each
/// for its own route, as the controllers will publish them once they have
/// restored their app (the target of a deployment that was running
/// included; the controller corrects the list if it ends that deployment).
pub fn live_statics_at_start(store: &Store) -> nonstop_store::Result<Vec<(AppEnv, Vec<LiveStatics>)>> {
    let mut all = Vec::new();
    for record in store.apps()?.into_iter().filter(|r| r.running) {
        let env = &record.environment;
        let target = store
            .deployments(&record.app, env, 10_000)?
            .into_iter()
            .find(|d| d.status == DeploymentStatus::Running)
            .map(|d| d.to_release);
        let live = live_statics(store, env, &record.app, Some(record.release), target)?;
        all.push((AppEnv::new(record.app, record.environment), live));
    }
    Ok(all)
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// Tell the builder which releases of `app` are live, in precedence
    /// order ([`live_statics`]).
    pub(crate) fn publish_statics(&self, app: &AppName) {
        let current = self.app.as_ref().filter(|rt| &rt.record.app == app).map(|rt| rt.record.release);
        let target = self.deployment.as_ref().map(|d| d.to.id);
        match live_statics(&self.store, &self.env, app, current, target) {
            Ok(live) => self.builder.serve_statics(&AppEnv::new(app.clone(), self.env.clone()), live),
            Err(e) => tracing::warn!("cannot read the releases of {app}, static files unchanged: {e}"),
        }
    }
}
