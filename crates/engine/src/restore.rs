//! A controller's start: the app and its controls as stored, the instances
//! it re-adopts (one is forgotten only when proven gone), the orphans it
//! stops (started by a daemon that died before recording them), the stops
//! and the deployment it goes on with.

use super::*;

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    pub(crate) fn restore(&mut self) -> Result<(), EngineError> {
        let scope = self.scope.clone();
        let mine = move |r: &AppRecord| r.app == scope.app && r.environment == scope.env && r.running;
        let records = self.store.apps()?;
        // A deployment of this app that does not run (a first deploy
        // interrupted while building): nothing was started, end it as failed.
        let runs = records.iter().any(&mine);
        let stale = self.store.apps_with_running_deployments(&self.env)?.contains(&self.scope.app);
        if stale && !runs {
            let app = self.scope.app.clone();
            self.fail_stale_deployment(&app)?;
        }
        let Some(mut record) = records.into_iter().find(|r| mine(r)) else {
            return Ok(());
        };
        self.restore_counts(&mut record)?;
        let route = route_key(&record.app, &record.environment);
        // Maintenance (and a stop) survive the daemon: given to the proxy
        // again before it listens and before any instance is in rotation.
        self.load_controls(&record.app, &route)?;
        if record.spec.processes.iter().any(|p| p.kind == ProcessKind::Web) {
            if let Err(e) = self.expose(&record.spec, &route) {
                tracing::error!("the proxy cannot be set up: {}", e);
            }
        }
        let now = self.clock.now();
        let wall = self.clock.wall();
        let mut rt = AppRuntime::new(record);
        let recorded = self.store.instances(&rt.record.app, &self.env)?;
        let mut adopted = 0;
        for rec in recorded {
            let spec = rt.record.spec.process(&rec.id.process).cloned();
            // Forgotten only when proven gone: one the driver cannot tell
            // about now (out of file descriptors) is adopted, and its exit
            // watched like any other's.
            let liveness = rec.handle.as_ref().map(|h| self.driver.liveness(h));
            if let Some(Liveness::Unknown(why)) = &liveness {
                tracing::warn!("{} is adopted although its liveness is unknown ({why}); its exit is watched", rec.id);
            }
            let alive = matches!(liveness, Some(Liveness::Alive | Liveness::Unknown(_)));
            let (Some(handle), true) = (rec.handle.clone(), alive) else {
                if rec.phase == InstancePhase::Launching {
                    tracing::warn!("{} was being launched when the daemon stopped; forgetting it", rec.id);
                }
                if let Some(h) = rec.handle.clone() {
                    // Its monitor is gone, but its process may not be: the
                    // driver kills what is left (and does nothing if nothing is).
                    let driver = self.driver.clone();
                    self.tasks.spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(30),
                            driver.stop(&h, nonstop_core::Signal::Kill, Duration::from_secs(5)),
                        )
                        .await;
                    });
                }
                self.store.delete_instance(&rt.record.app, &self.env, &rec.id)?;
                self.event(&rt.record.app, EventKind::Gone, Some(&rec.id), "exited while the daemon was down");
                continue;
            };
            let kind = spec.as_ref().map(|s| s.kind).unwrap_or(ProcessKind::Worker);
            let age = wall.duration_since(rec.started_at).unwrap_or_default();
            let started = now.checked_sub(age).unwrap_or(now);
            let phase = match (rec.phase, kind) {
                (InstancePhase::Stopping, _) => InstPhase::Stopping,
                (_, ProcessKind::Web) if rec.was_healthy => InstPhase::Ready,
                (_, ProcessKind::Web) => InstPhase::Starting,
                _ => InstPhase::Starting, // workers: ready_after is checked in step()
            };
            if kind == ProcessKind::Web && phase != InstPhase::Stopping {
                if let (Some(addr), Some(check)) = (handle.addr, spec.as_ref().and_then(|s| s.health.clone())) {
                    let check = crate::preflight::instance_check(check, &rt.ctx_for(&rec.id.process).spec.statics);
                    let initial = if rec.was_healthy { InitialHealth::AssumeHealthy } else { InitialHealth::Pending };
                    self.traffic.add(&rt.route, Backend { instance: rec.id.clone(), addr }, check, initial);
                }
            }
            rt.backoff.insert(
                (rec.id.process.clone(), rec.id.slot),
                SlotBackoff { consecutive_failures: 0, restarts: rec.restarts, retry_at: None },
            );
            self.watch_exit(handle.clone());
            rt.instances.insert(
                rec.id.clone(),
                Inst::new(rec.id.clone(), kind, rec.release, Some(handle), phase, (started, rec.started_at)),
            );
            adopted += 1;
        }
        // Instances the driver runs that no record knows: a daemon died
        // between starting them and recording them. They are stopped, and
        // tracked as stopping until gone, so that a singleton's replacement
        // waits for them.
        for orphan in self.driver.running(&rt.record.app, &self.env) {
            if rt.instances.contains_key(&orphan.instance) {
                continue;
            }
            tracing::warn!("stopping {}: it runs, but no record of it survived the daemon's restart", orphan.instance);
            self.event(
                &rt.record.app,
                EventKind::Orphan,
                Some(&orphan.instance),
                "stopped: started by a daemon that died before recording it",
            );
            let kind = rt.record.spec.process(&orphan.instance.process).map(|s| s.kind).unwrap_or(ProcessKind::Worker);
            self.watch_exit(orphan.clone());
            let release = rt.record.release;
            rt.instances.insert(
                orphan.instance.clone(),
                Inst::new(orphan.instance.clone(), kind, release, Some(orphan), InstPhase::Stopping, (now, wall)),
            );
        }
        tracing::info!("restored app {} with {adopted} running instance(s)", rt.record.app);
        self.event(
            &rt.record.app,
            EventKind::Daemon,
            None,
            &format!("daemon started; re-adopted {adopted} running instance(s)"),
        );
        // Finish stops that were under way.
        let stopping: Vec<InstanceId> =
            rt.instances.values().filter(|i| i.phase == InstPhase::Stopping).map(|i| i.id.clone()).collect();
        self.app = Some(rt);
        for id in stopping {
            self.begin_stop(&id, true);
        }
        self.recover_deployment()?;
        if let Some(app) = self.app.as_ref().map(|rt| rt.record.app.clone()) {
            self.publish_statics(&app);
        }
        Ok(())
    }
}
