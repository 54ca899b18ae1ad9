//! Maintenance mode, as an engine operation: `nonstop maintenance on|off`,
//! and what `stop`/`start` (and, later, a deploy's maintenance fallback)
//! switch.
//!
//! The setting is the app's (and its environment's): it is written to the
//! store's `app_controls` *before* the traffic layer gets it, and given to
//! it again whenever the engine takes the app up (a daemon restart, an
//! upgrade's successor, `up` after `down`). Switching it is not an
//! operation that holds the app: it is allowed during a deploy, a rolling
//! restart or a stop, and it changes no instance.

use super::*;
use nonstop_core::maintenance::{Maintenance, MaintenanceBy, MaintenanceState};
use nonstop_store::Controls;

impl EngineHandle {
    /// Put the app in maintenance with `setting`, or take it out (`None`).
    /// Answers once the setting is stored and applied.
    pub async fn maintenance(&self, setting: Option<Maintenance>, who: String) -> Result<OpReport, EngineError> {
        self.ask(|reply| Command::Maintenance { setting, who, reply }).await
    }
}

pub(crate) fn wall_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// `nonstop maintenance on|off`.
    pub(crate) fn maintenance_command(
        &mut self,
        setting: Option<Maintenance>,
        who: &str,
    ) -> Result<OpReport, EngineError> {
        let rt = self.app.as_ref().ok_or(EngineError::NotUp)?;
        let app = rt.record.app.clone();
        let was = self.controls.maintenance.clone();
        let stopped = self.controls.stopped.is_some();
        let report = match setting {
            Some(m) => {
                // Replacing the page or the allow list keeps who turned it
                // on: maintenance that `stop` turned on still goes off with
                // `start`.
                let by = was.as_ref().map_or(MaintenanceBy::User, |w| w.by);
                let summary = describe_on(&m, was.is_some());
                let changed = was.as_ref().map(|w| &w.maintenance) != Some(&m);
                self.switch_maintenance(Some((m, by)))?;
                OpReport { summary, changed }
            }
            None => {
                if was.is_none() {
                    OpReport { summary: "maintenance is already off; nothing changed".into(), changed: false }
                } else {
                    self.switch_maintenance(None)?;
                    let summary = if stopped {
                        "maintenance off; the app is stopped, so requests get 503 (no instance runs) until \
                         `nonstop start`"
                            .to_string()
                    } else {
                        "maintenance off: requests reach the app again".to_string()
                    };
                    OpReport { summary, changed: true }
                }
            }
        };
        if report.changed {
            self.event(&app, EventKind::Maintenance, None, &format!("{} (by {who})", report.summary));
        }
        Ok(report)
    }

    /// Turn maintenance on (`Some((setting, by))`) or off: stored first,
    /// then given to the traffic layer. The engine-level switch that
    /// `maintenance`, `stop` and `start` use (and a deploy's maintenance
    /// fallback will).
    pub(crate) fn switch_maintenance(&mut self, to: Option<(Maintenance, MaintenanceBy)>) -> Result<(), EngineError> {
        let rt = self.app.as_ref().ok_or(EngineError::NotUp)?;
        let (app, route) = (rt.record.app.clone(), rt.route.clone());
        let since_ms = match (&to, &self.controls.maintenance) {
            // Still on: since when it went on.
            (Some(_), Some(was)) => was.since_ms,
            _ => wall_ms(self.clock.wall()),
        };
        let next = Controls {
            maintenance: to.map(|(maintenance, by)| MaintenanceState { maintenance, by, since_ms }),
            stopped: self.controls.stopped.clone(),
        };
        self.store.put_controls(&app, &self.env, &next, None, self.clock.wall())?;
        self.controls = next;
        self.traffic.set_maintenance(&route, self.controls.maintenance.as_ref().map(|m| &m.maintenance));
        Ok(())
    }

    /// The controls of `app` from the store, and its maintenance given to
    /// the traffic layer: when the engine takes an app up (restore, `up`),
    /// before the proxy listens for it, so no request gets past a
    /// maintenance that was on.
    pub(crate) fn load_controls(&mut self, app: &AppName, route: &RouteKey) -> Result<(), EngineError> {
        self.controls = self.store.controls(app, &self.env)?;
        if let Some(m) = &self.controls.maintenance {
            tracing::info!("{app} is in maintenance (since {})", fmt_wall(from_ms(m.since_ms)));
        }
        self.traffic.set_maintenance(route, self.controls.maintenance.as_ref().map(|m| &m.maintenance));
        Ok(())
    }

    /// For `status`.
    pub(crate) fn maintenance_status(&self) -> Option<MaintenanceStatus> {
        self.controls.maintenance.as_ref().map(|m| MaintenanceStatus {
            since_ms: m.since_ms,
            by: match m.by {
                MaintenanceBy::User => MaintenanceOwner::User,
                MaintenanceBy::Stop => MaintenanceOwner::Stop,
                MaintenanceBy::Deploy => MaintenanceOwner::Deploy,
            },
            allow: m.maintenance.allow.iter().map(|n| n.to_string()).collect(),
            retry_after_secs: m.maintenance.retry_after_secs,
            custom_page: m.maintenance.page.is_some(),
        })
    }
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn describe_on(m: &Maintenance, already: bool) -> String {
    let page = match &m.page {
        Some(p) => format!("your page ({} bytes)", p.len()),
        None => "the built-in page".to_string(),
    };
    let allow = if m.allow.is_empty() {
        "no address is let through".to_string()
    } else {
        format!("{} let through", m.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "))
    };
    format!(
        "maintenance {}: every request gets 503 with {page} and Retry-After: {}; {allow}; instances keep running",
        if already { "still on, settings replaced" } else { "on" },
        m.retry_after_secs
    )
}
