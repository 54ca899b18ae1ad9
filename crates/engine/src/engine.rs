//! The engine: one [`Controller`] per app and environment, and the
//! dispatcher in front of them.
//!
//! Each controller is an actor that owns one environment's runtime,
//! operation and deployment (`controller.rs`); controllers share the
//! driver, the traffic layer, the store (which serialises writes) and the
//! builder, and nothing else, so an operation in one environment never
//! waits for another's. The dispatcher only routes: an [`EngineHandle`]
//! names an app and an environment (or leaves them to be inferred), and
//! each request goes to that controller's inbox. Controllers exist for
//! every app and environment the store knows at start, and are created by
//! the first `up` or `deploy` of a new one.

use crate::controller::{Command, Controller, EngineConfig, InstanceLogs, Reply};
use crate::error::EngineError;
use crate::Ingress;
use nonstop_core::driver::Driver;
use nonstop_core::traffic::Traffic;
use nonstop_core::{AppEnv, AppName, EnvironmentId};
use nonstop_store::Store;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// What every controller is given: the shared boundaries.
pub(crate) struct Parts<D, T, I, L> {
    pub(crate) driver: Arc<D>,
    pub(crate) traffic: Arc<T>,
    pub(crate) ingress: Arc<I>,
    pub(crate) logs: Arc<L>,
    pub(crate) store: Arc<Store>,
}

/// Spawns the engine.
pub struct Engine;

impl Engine {
    /// Start a controller for every app and environment the store knows
    /// (each restores its state, re-adopting live instances), then route
    /// requests until `shutdown` fires. The returned handle addresses the
    /// one app of `config.environment` (see [`EngineHandle::scoped`]); the
    /// join handle ends once every controller has stopped.
    pub fn spawn<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs>(
        config: EngineConfig,
        driver: Arc<D>,
        traffic: Arc<T>,
        ingress: Arc<I>,
        logs: Arc<L>,
        store: Arc<Store>,
        shutdown: CancellationToken,
    ) -> (EngineHandle, tokio::task::JoinHandle<()>) {
        let parts = Parts { driver, traffic, ingress, logs, store: store.clone() };
        let default_env = config.environment.clone();
        let token = shutdown.clone();
        let start: StartController =
            Box::new(move |scope: AppEnv| Controller::spawn(scope, &config, &parts, token.clone()));
        let dispatcher = Arc::new(Dispatcher {
            default_env: default_env.clone(),
            store,
            start,
            controllers: Mutex::new(BTreeMap::new()),
            shutdown: shutdown.clone(),
        });
        // Apps that ran, deployments that never got as far as running
        // their app (a first deploy interrupted), and destroys that did not
        // finish: their controllers end them.
        let known = dispatcher.store.apps().and_then(|records| {
            let mut scopes: Vec<AppEnv> = records.into_iter().map(|r| AppEnv::new(r.app, r.environment)).collect();
            scopes.extend(dispatcher.store.scopes_being_destroyed()?);
            Ok(scopes)
        });
        match (known, dispatcher.store.scopes_with_running_deployments()) {
            (Ok(apps), Ok(deploying)) => {
                for scope in apps.into_iter().chain(deploying) {
                    dispatcher.controller(scope);
                }
            }
            (Err(e), _) | (_, Err(e)) => tracing::error!("could not read the apps from the store: {e}"),
        }
        let joiner = dispatcher.clone();
        let join = tokio::spawn(async move {
            shutdown.cancelled().await;
            let joins: Vec<_> = {
                let mut map = joiner.controllers.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::take(&mut *map).into_values().map(|c| c.join).collect()
            };
            for join in joins {
                let _ = join.await;
            }
        });
        (EngineHandle { dispatcher, app: None, env: default_env }, join)
    }
}

type StartController = Box<dyn Fn(AppEnv) -> (mpsc::Sender<Command>, tokio::task::JoinHandle<()>) + Send + Sync>;

struct Running {
    inbox: mpsc::Sender<Command>,
    join: tokio::task::JoinHandle<()>,
}

/// The controllers by app and environment.
struct Dispatcher {
    default_env: EnvironmentId,
    store: Arc<Store>,
    start: StartController,
    controllers: Mutex<BTreeMap<AppEnv, Running>>,
    shutdown: CancellationToken,
}

impl Dispatcher {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<AppEnv, Running>> {
        self.controllers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The inbox of `scope`'s controller, started if there is none.
    fn controller(&self, scope: AppEnv) -> Option<mpsc::Sender<Command>> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        let mut map = self.map();
        let running = map.entry(scope.clone()).or_insert_with(|| {
            tracing::debug!("controller for {scope} started");
            let (inbox, join) = (self.start)(scope);
            Running { inbox, join }
        });
        Some(running.inbox.clone())
    }

    /// Which controller a request goes to. `creates`: the app an `up` or
    /// `deploy` brings (its spec names it).
    fn target(
        &self,
        app: Option<&AppName>,
        env: &EnvironmentId,
        creates: Option<&AppName>,
    ) -> Result<mpsc::Sender<Command>, EngineError> {
        let known: Vec<AppEnv> = self.map().keys().cloned().collect();
        let app = match (app, creates) {
            (Some(app), _) => app.clone(),
            (None, Some(app)) => app.clone(),
            (None, None) => {
                let here: Vec<&AppName> = known.iter().filter(|s| &s.env == env).map(|s| &s.app).collect();
                match here.as_slice() {
                    [one] => (*one).clone(),
                    [] => return Err(EngineError::NotUp),
                    many => {
                        return Err(EngineError::AmbiguousApp {
                            env: env.to_string(),
                            apps: many.iter().map(|a| a.to_string()).collect(),
                        })
                    }
                }
            }
        };
        let scope = AppEnv::new(app, env.clone());
        if !known.contains(&scope) {
            match creates {
                // A new app or environment: it gets its own controller
                // (apps share the proxy, told apart by their hosts; the
                // ingress refuses a [proxy] of another app that differs).
                Some(new) if new == &scope.app => {}
                _ => {
                    let mut envs: Vec<String> =
                        known.iter().filter(|s| s.app == scope.app).map(|s| s.env.to_string()).collect();
                    if envs.is_empty() {
                        return Err(EngineError::NotUp);
                    }
                    envs.sort();
                    return Err(EngineError::UnknownEnvironment {
                        app: scope.app.to_string(),
                        env: scope.env.to_string(),
                        known: envs,
                    });
                }
            }
        }
        self.controller(scope).ok_or(EngineError::ShuttingDown)
    }

    /// Stop and forget `scope`'s controller if the store knows nothing of
    /// it (no app record, no deployment): its inbox is dropped, so it ends.
    fn forget_if_unused(&self, scope: &AppEnv) {
        let known = self.store.apps().map(|r| r.iter().any(|r| r.app == scope.app && r.environment == scope.env));
        let deployed = self.store.deployments(&scope.app, &scope.env, 1).map(|d| !d.is_empty());
        let destroying = self.store.pending_destroy(&scope.app, &scope.env).map(|p| p.is_some());
        if let (Ok(false), Ok(false), Ok(false)) = (known, deployed, destroying) {
            if let Some(gone) = self.map().remove(scope) {
                tracing::debug!("controller for {scope} forgotten: nothing of it was recorded");
                drop(gone.inbox);
            }
        }
    }
}

/// Talks to the engine: to the controller of one app and environment.
/// Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    dispatcher: Arc<Dispatcher>,
    /// `None`: the environment's one app (or the app an `up` or `deploy`
    /// brings).
    app: Option<AppName>,
    env: EnvironmentId,
}

impl EngineHandle {
    /// The same engine, addressing `app` (or the environment's one app)
    /// in `env` (or the engine's default environment).
    pub fn scoped(&self, app: Option<AppName>, env: Option<EnvironmentId>) -> EngineHandle {
        EngineHandle {
            dispatcher: self.dispatcher.clone(),
            app,
            env: env.unwrap_or_else(|| self.dispatcher.default_env.clone()),
        }
    }

    /// Returns once every controller started so far has restored its
    /// environment (each answers requests only then): what a daemon waits
    /// for before it brings the data plane in line with what was
    /// re-adopted. Not bounded in time: the caller puts a timeout on it.
    pub async fn restored(&self) {
        for scope in self.environments() {
            // An answer, even an error (an environment that does not run),
            // means that controller is past its restore.
            let _ = self.scoped(Some(scope.app), Some(scope.env)).status().await;
        }
    }

    /// Every app and environment that has a controller.
    pub fn environments(&self) -> Vec<AppEnv> {
        self.dispatcher.map().keys().cloned().collect()
    }

    /// Forget the controller of `scope` (destroyed, or never created): it
    /// ends with its inbox, and requests to `scope` find nothing.
    pub(crate) fn forget(&self, scope: &AppEnv) {
        if self.dispatcher.map().remove(scope).is_some() {
            tracing::debug!("controller for {scope} forgotten");
        }
    }

    /// The environment requests go to.
    pub fn environment(&self) -> &EnvironmentId {
        &self.env
    }

    /// The app requests go to, when named (`None`: the environment's one
    /// app).
    pub(crate) fn named_app(&self) -> Option<&AppName> {
        self.app.as_ref()
    }

    pub(crate) async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        let command = make(reply);
        let creates = command.brings_app().cloned();
        let inbox = self.dispatcher.target(self.app.as_ref(), &self.env, creates.as_ref())?;
        inbox.send(command).await.map_err(|_| EngineError::ShuttingDown)?;
        let answer = rx.await.map_err(|_| EngineError::ShuttingDown)?;
        if let (Err(_), Some(app)) = (&answer, creates) {
            // A first `up` or `deploy` refused before it recorded anything
            // leaves no environment behind.
            self.dispatcher.forget_if_unused(&AppEnv::new(app, self.env.clone()));
        }
        answer
    }
}
