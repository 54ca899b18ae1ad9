//! The runtime owns each process type's count (`nonstop scale`); a spec
//! being applied gets the counts `nonstop_plan::counts::choose` decides,
//! and the store keeps them, with where each came from, in
//! `process_counts`.

use super::*;
use nonstop_core::{CountSource, RuntimeCount};
use nonstop_plan::counts::{self, Apply};

/// A spec with the counts that apply to it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counted {
    /// What the store keeps once the spec applies.
    pub(crate) records: BTreeMap<ProcessName, RuntimeCount>,
    /// The plan's words about counts ("web: count 2 → 4 (changed in
    /// nonstop.toml)").
    pub(crate) lines: Vec<String>,
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// Give `spec` (as its toml says) the counts that apply when it is
    /// applied as `apply`; nothing is written.
    pub(crate) fn count_spec(&self, spec: &mut AppSpec, apply: Apply) -> Result<Counted, EngineError> {
        let known = self.store.process_counts(&spec.app, &self.env)?;
        let mut out = Counted::default();
        for p in &mut spec.processes {
            let choice = counts::choose(p.count, known.get(&p.name).copied(), apply, p.kind == ProcessKind::Singleton);
            p.count = choice.count;
            out.records.insert(p.name.clone(), choice.record);
            out.lines.extend(counts::describe(p.name.as_str(), &choice));
        }
        Ok(out)
    }

    /// Record the counts of a spec that now applies (the app's process
    /// types exactly: a type it no longer has loses its count).
    pub(crate) fn record_counts(&self, app: &AppName, counted: &Counted) -> Result<(), EngineError> {
        Ok(self.store.put_process_counts(app, &self.env, &counted.records, true)?)
    }

    /// `nonstop scale` set `count` for `process` (whose toml count in the
    /// running release is `toml`).
    pub(crate) fn record_scaled(
        &self,
        app: &AppName,
        scaled: &BTreeMap<ProcessName, (u32, u32)>,
    ) -> Result<(), EngineError> {
        let known = self.store.process_counts(app, &self.env)?;
        let records = scaled
            .iter()
            .map(|(name, (toml, count))| (name.clone(), counts::scaled(known.get(name).copied(), *toml, *count)))
            .collect();
        Ok(self.store.put_process_counts(app, &self.env, &records, false)?)
    }

    /// At start: the recorded app runs the counts the store keeps. A
    /// process type without one (a store written before counts were kept)
    /// gets the one its record runs, compared with its release's toml.
    pub(crate) fn restore_counts(&self, record: &mut AppRecord) -> Result<(), EngineError> {
        let known = self.store.process_counts(&record.app, &self.env)?;
        let release_spec =
            if record.release.0 > 0 { self.store.release(&record.app, record.release)?.map(|r| r.spec) } else { None };
        let mut missing = BTreeMap::new();
        for p in &mut record.spec.processes {
            match known.get(&p.name) {
                Some(c) => {
                    p.count = if p.kind == ProcessKind::Singleton { c.count.min(1) } else { c.count };
                }
                None => {
                    let toml = release_spec.as_ref().and_then(|s| s.process(&p.name)).map_or(p.count, |t| t.count);
                    let source = if toml == p.count { CountSource::Toml } else { CountSource::Scale };
                    missing.insert(p.name.clone(), RuntimeCount { count: p.count, source, toml_at_apply: toml });
                }
            }
        }
        if !missing.is_empty() {
            self.store.put_process_counts(&record.app, &self.env, &missing, false)?;
        }
        Ok(())
    }
}
