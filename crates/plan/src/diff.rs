//! The difference between the spec that runs and the spec that is asked
//! for: which process types are added, removed, replaced (their instances
//! must be rolled) or only rescaled. `up` on a running app applies it.

use nonstop_core::process::{AppSpec, ProcessSpec};
use nonstop_core::ProcessName;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecDiff {
    pub added: Vec<ProcessName>,
    pub removed: Vec<ProcessName>,
    /// Anything but `count` changed (or the app's `[env]`): roll.
    pub replaced: Vec<ProcessName>,
    /// Only `count` changed.
    pub rescaled: Vec<(ProcessName, u32, u32)>,
    pub listen_changed: bool,
}

impl SpecDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.replaced.is_empty()
            && self.rescaled.is_empty()
            && !self.listen_changed
    }
}

fn same_but_count(a: &ProcessSpec, b: &ProcessSpec) -> bool {
    let mut b = b.clone();
    b.count = a.count;
    *a == b
}

pub fn diff(old: &AppSpec, new: &AppSpec) -> SpecDiff {
    // `[database]` fills variables of every process too.
    let env_changed = old.env != new.env || old.database != new.database;
    let mut d = SpecDiff { listen_changed: old.proxy.listen != new.proxy.listen, ..Default::default() };
    for p in &new.processes {
        match old.process(&p.name) {
            None => d.added.push(p.name.clone()),
            Some(o) => {
                if env_changed || !same_but_count(o, p) {
                    d.replaced.push(p.name.clone());
                }
                if o.count != p.count {
                    d.rescaled.push((p.name.clone(), o.count, p.count));
                }
            }
        }
    }
    for p in &old.processes {
        if new.process(&p.name).is_none() {
            d.removed.push(p.name.clone());
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{app, names, process};
    use nonstop_core::process::ProcessKind;

    fn proc(name: &str, count: u32, command: &str) -> ProcessSpec {
        ProcessSpec { command: command.into(), ..process(name, ProcessKind::Worker, count) }
    }

    #[test]
    fn unchanged_spec_is_an_empty_diff() {
        let a = app(vec![proc("web", 2, "x")]);
        assert!(diff(&a, &a.clone()).is_empty());
    }

    #[test]
    fn classifies_each_change() {
        let old = app(vec![proc("web", 2, "x"), proc("worker", 1, "w"), proc("gone", 1, "g")]);
        let new = app(vec![proc("web", 4, "x"), proc("worker", 1, "w2"), proc("beat", 1, "b")]);
        let d = diff(&old, &new);
        assert_eq!(names(&d.added), ["beat"]);
        assert_eq!(names(&d.removed), ["gone"]);
        assert_eq!(names(&d.replaced), ["worker"]);
        assert_eq!(d.rescaled.len(), 1);
        assert_eq!(d.rescaled[0].0.as_str(), "web");
        assert_eq!((d.rescaled[0].1, d.rescaled[0].2), (2, 4));
        assert!(!d.listen_changed);
    }

    #[test]
    fn app_env_change_replaces_every_process() {
        let old = app(vec![proc("web", 1, "x"), proc("worker", 1, "w")]);
        let mut new = old.clone();
        new.env.insert("A".into(), "1".into());
        assert_eq!(names(&diff(&old, &new).replaced), ["web", "worker"]);
    }

    #[test]
    fn a_database_change_replaces_every_process() {
        let old = app(vec![proc("web", 1, "x"), proc("worker", 1, "w")]);
        let mut new = old.clone();
        let url = nonstop_core::database::DatabaseUrl::parse("postgres://127.0.0.1/blog").unwrap();
        new.database = Some(nonstop_core::database::DatabaseSpec::new(url));
        assert_eq!(names(&diff(&old, &new).replaced), ["web", "worker"]);
    }
}
