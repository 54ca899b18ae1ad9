//! A worker's queue (`queue = { redis_list = "celery" }`): the Redis its
//! depth is read from, and the check that it has one.
//!
//! **Which Redis.** The `REDIS_URL` the process's instances get, found
//! the way they get it (`instances.rs`, `secrets.rs`): the daemon's base
//! environment, the spec's `[env]` (with the environment's overrides and
//! its config, already applied to the spec), the `[database]` variables,
//! the process's `env`, then the secrets and the base services' own (the
//! environment's Redis database of `[base] redis`). The daemon's metrics
//! task asks for it at every step ([`EngineHandle::queue_reads`]); the
//! value never goes through the API.
//!
//! **The check.** The file cannot say whether an environment has a Redis:
//! `REDIS_URL` may be a secret or a config variable of the environment,
//! which the spec does not see. So the spec does not refuse a `queue`;
//! the engine does, before anything changes, when an `up`, a `deploy`, a
//! `promote` or a config change would run a process with a `queue` and no
//! `REDIS_URL` at all ([`queue_redis_problems`], pure), and when a
//! `secrets unset REDIS_URL` would leave a running one without. A `REDIS_URL` that
//! is there but does not answer is not refused: the metrics task logs it
//! and takes no sample (`cli/src/queue.rs`).

use super::base::REDIS_URL_VAR;
use super::secrets::{add_secrets, EnvironmentSecrets};
use super::*;
use nonstop_core::autoscale::QueueSource;
use nonstop_secrets::SecretValue;

/// Where the metrics task reads the depth of a process's queue.
#[derive(Debug, Clone)]
pub struct QueueRead {
    pub process: ProcessName,
    pub source: QueueSource,
    pub redis: QueueRedis,
}

/// The Redis of a [`QueueRead`].
#[derive(Debug, Clone)]
pub enum QueueRedis {
    /// The process's `REDIS_URL` (it may hold a password: never print it).
    Url(SecretValue),
    /// Its instances get no `REDIS_URL` (a secret or config variable
    /// unset since the deploy).
    Missing,
    /// Its `REDIS_URL` holds a NUL byte: no process can be given it.
    Unusable,
    /// The secrets cannot be read (the same error keeps its instances
    /// from starting).
    SecretsUnavailable(String),
}

/// The `REDIS_URL` a process of `spec` gets: as `instance_env` and
/// `with_secrets` build its environment (`secrets`: `None` when they
/// cannot be read). An empty value is none. Pure.
pub(crate) fn redis_url_of(
    base_env: &BTreeMap<String, String>,
    spec: &AppSpec,
    process: &ProcessSpec,
    secrets: Option<&EnvironmentSecrets>,
) -> Option<String> {
    let mut vars = base_env.clone();
    vars.extend(spec.env.clone());
    if let Some(db) = &spec.database {
        vars.extend(db.env_vars());
    }
    vars.extend(process.env.clone());
    if let Some(s) = secrets {
        add_secrets(&mut vars, s, spec.database.as_ref());
    }
    vars.remove(REDIS_URL_VAR).filter(|v| !v.trim().is_empty())
}

/// What keeps `spec` from running in `env`: each process with a `queue`
/// whose instances would get no `REDIS_URL` (`has_redis` says whether one
/// does), worded with where one can come from. Pure.
pub(crate) fn queue_redis_problems(
    spec: &AppSpec,
    env: &EnvironmentId,
    has_redis: impl Fn(&ProcessSpec) -> bool,
) -> Vec<String> {
    spec.processes
        .iter()
        .filter_map(|p| Some((p, p.queue.as_ref()?)))
        .filter(|(p, _)| !has_redis(p))
        .map(|(p, queue)| {
            let QueueSource::RedisList(list) = queue;
            format!(
                "`queue` of {name} reads the Redis list {list:?} from REDIS_URL, but {name}'s processes in \
                 environment `{env}` get no REDIS_URL (not in [env], [processes.{name}.env] or \
                 [environments.{env}.env], not a config variable or secret of `{env}`, and no [base] redis); \
                 set it (`nonstop -e {env} secrets set REDIS_URL`, or `nonstop -e {env} config set \
                 REDIS_URL=redis://…`), or give the environments a Redis with [base] redis = \"redis://…\" in \
                 nonstop.toml",
                name = p.name
            )
        })
        .collect()
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// Refuses `spec` (what is about to run here, config applied) when a
    /// process with a `queue` would get no `REDIS_URL`. Secrets that
    /// cannot be read are not this check's to report (the command stops on
    /// them, or the starts do).
    pub(crate) fn check_queue_redis(
        &mut self,
        spec: &AppSpec,
        base_env: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        if spec.processes.iter().all(|p| p.queue.is_none()) {
            return Ok(());
        }
        let Ok(secrets) = self.launch_secrets() else { return Ok(()) };
        let problems =
            queue_redis_problems(spec, &self.env, |p| redis_url_of(base_env, spec, p, Some(&secrets)).is_some());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(EngineError::Preflight { problems })
        }
    }

    /// What unsetting secret `name` would break in the running app: each
    /// process with a `queue` whose instances would be left without a
    /// `REDIS_URL` at their next start (nothing else gives them one).
    pub(crate) fn queues_left_without(&mut self, name: &str) -> Vec<String> {
        if name != REDIS_URL_VAR || !self.app.as_ref().is_some_and(runs_a_queue) {
            return Vec::new();
        }
        let Ok(secrets) = self.launch_secrets() else { return Vec::new() };
        let without = secrets.without(name);
        let Some(rt) = self.app.as_ref() else { return Vec::new() };
        queue_redis_problems(&rt.record.spec, &self.env, |p| {
            rt.process_spec(&p.name).is_some_and(|spec| redis_url_now(rt, &spec, &without).is_some())
        })
    }

    /// Where each running process with a `queue` has its depth read: the
    /// Redis its instances get now (the release it is rolled to, during a
    /// rollout). Nothing when the app is not running.
    pub(crate) fn queue_reads(&mut self) -> Vec<QueueRead> {
        if !self.app.as_ref().is_some_and(runs_a_queue) {
            return Vec::new();
        }
        let secrets = self.launch_secrets();
        let Some(rt) = self.app.as_ref() else { return Vec::new() };
        rt.record
            .spec
            .processes
            .iter()
            .filter_map(|p| {
                let spec = rt.process_spec(&p.name)?;
                let source = spec.queue.clone()?;
                let redis = match &secrets {
                    Err(e) => QueueRedis::SecretsUnavailable(e.to_string()),
                    Ok(s) => match redis_url_now(rt, &spec, s).map(SecretValue::new) {
                        Some(Ok(url)) => QueueRedis::Url(url),
                        Some(Err(_)) => QueueRedis::Unusable,
                        None => QueueRedis::Missing,
                    },
                };
                Some(QueueRead { process: spec.name, source, redis })
            })
            .collect()
    }
}

/// Whether `rt` runs a process with a `queue` (in the release each process
/// runs now).
fn runs_a_queue(rt: &AppRuntime) -> bool {
    rt.record.running
        && rt.record.spec.processes.iter().any(|p| rt.process_spec(&p.name).is_some_and(|spec| spec.queue.is_some()))
}

/// The `REDIS_URL` the instances of `process` (as it runs now: see
/// `AppRuntime::process_spec`) get with `secrets`.
fn redis_url_now(rt: &AppRuntime, process: &ProcessSpec, secrets: &EnvironmentSecrets) -> Option<String> {
    redis_url_of(&rt.record.base_env, &rt.ctx_for(&process.name).spec, process, Some(secrets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_testkit::spec::app;

    fn spec() -> AppSpec {
        app("shop")
            .web("web", 1)
            .worker("worker", 1)
            .with("worker", |p| p.queue = Some(QueueSource::RedisList("celery".into())))
            .build()
    }

    fn worker(spec: &AppSpec) -> ProcessSpec {
        spec.process(&ProcessName::new("worker").unwrap()).unwrap().clone()
    }

    #[test]
    fn the_redis_url_is_the_one_the_process_gets() {
        let base = BTreeMap::new();
        let mut s = spec();
        assert_eq!(redis_url_of(&base, &s, &worker(&s), None), None);
        s.env.insert(REDIS_URL_VAR.into(), "redis://app-wide:6379/1".into());
        assert_eq!(redis_url_of(&base, &s, &worker(&s), None).as_deref(), Some("redis://app-wide:6379/1"));
        // The process's own wins over the app's.
        let mut own = worker(&s);
        own.env.insert(REDIS_URL_VAR.into(), "redis://own:6379/2".into());
        assert_eq!(redis_url_of(&base, &s, &own, None).as_deref(), Some("redis://own:6379/2"));
        // A blank one is none.
        own.env.insert(REDIS_URL_VAR.into(), "  ".into());
        assert_eq!(redis_url_of(&base, &s, &own, None), None);
    }

    #[test]
    fn a_queue_without_redis_is_named_with_where_one_comes_from() {
        let s = spec();
        let env = EnvironmentId::new("staging").unwrap();
        let problems = queue_redis_problems(&s, &env, |_| false);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let p = &problems[0];
        for part in ["`queue` of worker", "\"celery\"", "`staging`", "secrets set REDIS_URL", "[base] redis"] {
            assert!(p.contains(part), "{part} missing from: {p}");
        }
        assert!(queue_redis_problems(&s, &env, |_| true).is_empty());
        // No queue: nothing to check.
        let plain = app("shop").web("web", 1).worker("worker", 1).build();
        assert!(queue_redis_problems(&plain, &env, |_| false).is_empty());
    }
}
