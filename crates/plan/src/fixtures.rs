//! Specs for the tests of this crate.

use nonstop_core::process::{
    AppSpec, ProcessKind, ProcessSpec, ProxySpec, ReleaseSpec, RestartPolicy, Rollout, Signal,
};
use nonstop_core::{AppName, ProcessName};
use std::time::Duration;

/// A process type with short timeouts and default policies.
pub fn process(name: &str, kind: ProcessKind, count: u32) -> ProcessSpec {
    ProcessSpec {
        name: ProcessName::new(name).unwrap(),
        kind,
        command: "true".into(),
        count,
        stop_signal: Signal::Term,
        stop_timeout: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(1),
        ready_after: Duration::from_secs(1),
        health: None,
        restart: RestartPolicy::default(),
        rollout: Rollout::default(),
        env: Default::default(),
        autoscale: None,
        queue: None,
    }
}

/// App `a` with these process types.
pub fn app(processes: Vec<ProcessSpec>) -> AppSpec {
    AppSpec {
        app: AppName::new("a").unwrap(),
        env: Default::default(),
        processes,
        proxy: ProxySpec::new("127.0.0.1:8080".parse().unwrap()),
        build: vec![],
        release: ReleaseSpec::default(),
        statics: vec![],
        database: None,
        hosts: vec![],
        default_host: true,
        protected: false,
        base: None,
        metrics: None,
    }
}

pub fn names(v: &[ProcessName]) -> Vec<&str> {
    v.iter().map(|n| n.as_str()).collect()
}
