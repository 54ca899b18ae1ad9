//! Build an [`AppSpec`] in a few lines, without TOML.
//!
//! ```
//! use nonstop_testkit::spec::app;
//! use std::time::Duration;
//! let spec = app("blog")
//!     .web("web", 2)
//!     .worker("worker", 1)
//!     .singleton("beat")
//!     .env("DJANGO_SETTINGS_MODULE", "blog.settings")
//!     .with("web", |p| p.rollout.health_timeout = Duration::from_secs(5))
//!     .build();
//! assert_eq!(spec.processes.len(), 3);
//! ```

use nonstop_core::process::{
    AppSpec, Canary, HealthCheck, ProcessKind, ProcessSpec, ProxySpec, Quantity, ReleaseSpec, RestartPolicy, Rollout,
    StatusRange,
};
use nonstop_core::{AppName, Signal};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// The address specs built here listen on unless told otherwise.
pub const LISTEN: &str = "127.0.0.1:8080";

/// The command of every process built here: the engine's preflight lets
/// shell builtins through, and the fake driver runs nothing anyway.
pub const COMMAND: &str = "sleep infinity";

/// The health check of web processes built here.
pub fn health_check() -> HealthCheck {
    HealthCheck {
        path: "/health".into(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        expect_status: StatusRange { min: 200, max: 399 },
        host: None,
        smoke: Vec::new(),
    }
}

/// A process with the spec defaults: SIGTERM, 10 s stop timeout, 30 s
/// drain, 1 s `ready_after`, default restart policy and rollout (surge 1,
/// unavailable 0, 60 s health timeout) but no canary ramp (tests of other
/// features; `canary` turns it on); a health check for web processes.
pub fn process(name: &str, kind: ProcessKind, count: u32) -> ProcessSpec {
    ProcessSpec {
        name: crate::pn(name),
        kind,
        command: COMMAND.into(),
        count,
        stop_signal: Signal::Term,
        stop_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(30),
        ready_after: Duration::from_secs(1),
        health: (kind == ProcessKind::Web).then(health_check),
        restart: RestartPolicy::default(),
        rollout: Rollout { canary: Canary { steps: Vec::new(), ..Canary::default() }, ..Rollout::default() },
        env: BTreeMap::new(),
        autoscale: None,
        queue: None,
    }
}

pub fn app(name: &str) -> AppBuilder {
    AppBuilder {
        spec: AppSpec {
            app: AppName::new(name).unwrap_or_else(|e| panic!("{e}")),
            env: BTreeMap::new(),
            processes: Vec::new(),
            proxy: ProxySpec::new(LISTEN.parse().unwrap_or_else(|e| panic!("{e}"))),
            build: Vec::new(),
            release: ReleaseSpec {
                task_timeout: Duration::from_secs(600),
                retain_releases: 5,
                ..ReleaseSpec::default()
            },
            statics: Vec::new(),
            database: None,
            hosts: vec![],
            default_host: true,
            protected: false,
            base: None,
            metrics: None,
        },
    }
}

#[derive(Debug, Clone)]
pub struct AppBuilder {
    spec: AppSpec,
}

impl AppBuilder {
    pub fn web(self, name: &str, count: u32) -> Self {
        self.process(process(name, ProcessKind::Web, count))
    }

    pub fn worker(self, name: &str, count: u32) -> Self {
        self.process(process(name, ProcessKind::Worker, count))
    }

    pub fn singleton(self, name: &str) -> Self {
        self.process(process(name, ProcessKind::Singleton, 1))
    }

    pub fn process(mut self, p: ProcessSpec) -> Self {
        self.spec.processes.push(p);
        self
    }

    /// Change a process added before.
    pub fn with(mut self, name: &str, change: impl FnOnce(&mut ProcessSpec)) -> Self {
        let p = self
            .spec
            .processes
            .iter_mut()
            .find(|p| p.name.as_str() == name)
            .unwrap_or_else(|| panic!("no process {name} in the spec yet"));
        change(p);
        self
    }

    /// Set a rollout's surge and unavailability (counts) on a process.
    pub fn rollout(self, name: &str, surge: u32, unavailable: u32, health_timeout: Duration) -> Self {
        self.with(name, |p| {
            p.rollout = Rollout {
                max_surge: Quantity::Count(surge),
                max_unavailable: Quantity::Count(unavailable),
                health_timeout,
                canary: p.rollout.canary.clone(),
            }
        })
    }

    /// An app-wide `[env]` variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.spec.env.insert(key.into(), value.into());
        self
    }

    /// Release tasks (run once per deploy, before instances change).
    pub fn release_tasks(mut self, tasks: &[&str], timeout: Duration) -> Self {
        self.spec.release.tasks = tasks.iter().map(|t| t.to_string()).collect();
        self.spec.release.task_timeout = timeout;
        self
    }

    /// `[database] url = url`.
    pub fn database(mut self, url: &str) -> Self {
        let url = nonstop_core::database::DatabaseUrl::parse(url).unwrap_or_else(|e| panic!("{e}"));
        self.spec.database = Some(nonstop_core::database::DatabaseSpec::new(url));
        self
    }

    /// The live-traffic gate's ramp on process `name`: these shares, each
    /// held up to `hold`.
    pub fn canary(self, name: &str, steps: &[u8], hold: Duration) -> Self {
        self.with(name, |p| {
            p.rollout.canary = Canary { steps: steps.to_vec(), hold, ..Canary::default() };
        })
    }

    pub fn post_tasks(mut self, tasks: &[&str]) -> Self {
        self.spec.release.post_tasks = tasks.iter().map(|t| t.to_string()).collect();
        self
    }

    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.spec.proxy.listen = addr;
        self
    }

    pub fn build(self) -> AppSpec {
        self.spec
    }
}
