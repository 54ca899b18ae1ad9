//! Secrets in the engine: `nonstop secrets set|unset|list`, answered by
//! the addressed environment's controller, and the values its processes
//! and release tasks receive as environment variables.
//!
//! **Where values go.** Into the environment of every instance
//! ([`with_secrets`] at the `LaunchSpec`), of every release and post task,
//! and of the migration gate's run of the release tasks; nowhere else: not
//! into the spec (stored in clear), the app record, events, progress,
//! errors, status, history or the API's answers, and not into builds (a
//! release is built once per app and run in every environment). A secret
//! wins over a plain `[env]` variable of the same name; the `[database]`
//! variables win over a secret (the migration gate points them at its
//! scratch copy, and a secret must not send the tasks elsewhere).
//!
//! **When a change takes effect.** A controller holds one snapshot of its
//! environment's decrypted values ([`SecretsState`]); every process it
//! starts gets that snapshot, crash restarts and scale-ups included, so
//! instances never run a mix of versions by accident. The snapshot is
//! read again from the store (**refreshed**) when a `deploy`, `rollback`,
//! `restart`, `start`, or an `up` of an app that is not running begins:
//! a `secrets set` takes effect there, not before. A refresh that cannot
//! decrypt (a missing or wrong key) fails the command before anything
//! starts or stops, and keeps the snapshot it had. A daemon that starts
//! reads the snapshot when it first needs one (a crashed instance); if it
//! cannot, that start fails with the reason (shown in `status` and the
//! events, retried on the usual backoff) and nothing starts without its
//! secrets.
//!
//! **Redaction.** Text the engine relays from processes (build output,
//! task output tails, migration gate reports, instance log tails in
//! errors) passes through the snapshot's [`Redactor`] (which also knows
//! the values of the snapshot before it) before it becomes progress, an
//! event, an error or a deployment's reason.
//!
//! **`nonstop run`** gets them too, through the same code: the CLI runs
//! as the daemon's user, opens the store and the key itself, and calls
//! [`EnvironmentSecrets::read`] and [`EnvironmentSecrets::add_to`] for the
//! environment it runs in (its current values, and the base services'
//! database password and `REDIS_URL`); no value goes through the API.
//!
//! **The key** is loaded when needed and not kept: from
//! `NONSTOP_SECRETS_KEY` in the daemon's environment, else
//! `NONSTOP_HOME/secrets.key`, created by the first `set` only while no
//! secret was ever written (a store with secrets never gets a new key by
//! accident: a missing key is an error that names the fix).

use super::base::{is_base_secret, BaseSecrets, BASE_DATABASE_SECRET};
use super::*;
use nonstop_core::database::{DatabaseSpec, DatabaseUrl};
use nonstop_secrets::{
    CryptoError, KeyCheck, KeyError, KeySource, Redactor, SecretAddress, SecretName, SecretValue, SecretsKey, KEY_ENV,
};
use nonstop_store::{NewSecretVersion, Store, StoreError};
use zeroize::Zeroizing;

/// A process (instance, task, the gate's run of the tasks) that cannot
/// have its secrets is not started: why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not started: its secrets cannot be read: {0}")]
pub(crate) struct SecretsUnavailable(#[source] pub(crate) EngineError);

impl From<SecretsUnavailable> for EngineError {
    fn from(e: SecretsUnavailable) -> Self {
        EngineError::Secrets { reason: e.to_string() }
    }
}

/// Where a daemon finds its secrets key: `NONSTOP_SECRETS_KEY` (the value
/// the daemon was started with), else `HOME/secrets.key`.
#[derive(Clone, Default)]
pub struct SecretsKeyConfig {
    /// `None`: this engine has no place for a key (tests of other
    /// features): secrets cannot be set, and an app with secrets cannot
    /// start.
    home: Option<PathBuf>,
    env_value: Option<Arc<Zeroizing<String>>>,
}

impl std::fmt::Debug for SecretsKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsKeyConfig")
            .field("home", &self.home)
            .field("from_env", &self.env_value.is_some())
            .finish()
    }
}

impl SecretsKeyConfig {
    /// The key of state directory `home`, or `env_value` (the value of
    /// `NONSTOP_SECRETS_KEY`, if set), which wins.
    pub fn new(home: PathBuf, env_value: Option<String>) -> Self {
        Self { home: Some(home), env_value: env_value.map(|v| Arc::new(Zeroizing::new(v))) }
    }

    /// No key anywhere.
    pub fn none() -> Self {
        Self::default()
    }

    fn env(&self) -> Option<&str> {
        self.env_value.as_deref().map(|v| v.as_str())
    }

    fn home(&self) -> Result<&std::path::Path, EngineError> {
        self.home.as_deref().ok_or_else(|| EngineError::Secrets { reason: SecretsReadError::NoHome.to_string() })
    }

    /// The key to read with (never created).
    fn key(&self) -> Result<SecretsKey, SecretsReadError> {
        let home = self.home.as_deref().ok_or(SecretsReadError::NoHome)?;
        Ok(SecretsKey::load(home, self.env())?)
    }

    /// [`SecretsKeyConfig::key`], worded for the daemon.
    fn load(&self) -> Result<SecretsKey, EngineError> {
        self.key().map_err(read_error)
    }

    /// The key to write with: created if there is none (only called
    /// while no secret was ever written).
    fn load_or_create(&self) -> Result<SecretsKey, EngineError> {
        SecretsKey::load_or_create(self.home()?, self.env()).map_err(|e| key_error(&e))
    }
}

/// A key that cannot be had, worded for the person who runs the daemon.
fn key_error(e: &KeyError) -> EngineError {
    let hint = match e {
        KeyError::Missing { .. } | KeyError::MalformedFile { .. } | KeyError::MalformedEnv { .. } => format!(
            " ({KEY_ENV} is read from the daemon's own environment: set it where the daemon starts, e.g. the \
             systemd unit, then restart the daemon)"
        ),
        _ => String::new(),
    };
    EngineError::Secrets { reason: format!("{e}{hint}") }
}

fn crypto_error(e: &CryptoError) -> EngineError {
    let hint = match e {
        CryptoError::WrongKey { .. } => format!(" ({KEY_ENV} is read from the daemon's own environment)"),
        _ => String::new(),
    };
    EngineError::Secrets { reason: format!("{e}{hint}") }
}

/// A daemon's words for why secrets cannot be read.
fn read_error(e: SecretsReadError) -> EngineError {
    match e {
        SecretsReadError::Key(e) => key_error(&e),
        SecretsReadError::Crypto(e) => crypto_error(&e),
        SecretsReadError::Store(e) => e.into(),
        e @ (SecretsReadError::NoHome | SecretsReadError::NoKeyCheck) => EngineError::Secrets { reason: e.to_string() },
    }
}

/// Why the secrets of an environment cannot be read
/// ([`EnvironmentSecrets::read`]): said for whoever reads them (the
/// daemon, `nonstop run`), each with its source.
#[derive(Debug, thiserror::Error)]
pub enum SecretsReadError {
    #[error("this daemon has no secrets key configured (no state directory); run it with NONSTOP_HOME set")]
    NoHome,
    /// Missing, malformed, or not private.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The wrong key, or altered data.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("secrets are stored without their key check (the state database was altered): restore it from a backup")]
    NoKeyCheck,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The decrypted values of one environment, as processes get them: the
/// secrets set with `nonstop secrets`, and the base services' own (the
/// environment's database URL with its role's password, its `REDIS_URL`).
pub struct EnvironmentSecrets {
    /// By name.
    values: Vec<(String, SecretValue)>,
    /// Every version, the base services' secrets included.
    versions: BTreeMap<String, u64>,
    /// The base services' own (`base.rs`): not variables of their own.
    base: BaseSecrets,
    /// Hides these values (and the base services') and those of the
    /// snapshot before.
    redactor: Arc<Redactor>,
}

impl EnvironmentSecrets {
    /// These secrets without `name`: what processes get once it is unset.
    pub(crate) fn without(&self, name: &str) -> EnvironmentSecrets {
        EnvironmentSecrets {
            values: self.values.iter().filter(|(n, _)| n != name).cloned().collect(),
            versions: self.versions.clone(),
            base: self.base.clone(),
            redactor: Arc::clone(&self.redactor),
        }
    }

    /// Decrypt the current secrets of `app` in `env` from `store` with the
    /// key `key` says: the one way processes get them, whether the daemon
    /// starts them or `nonstop run` does. No key is needed while there are
    /// none; a key that cannot be had, or is not the one they were sealed
    /// with, is an error before anything is decrypted.
    pub fn read(
        store: &Store,
        key: &SecretsKeyConfig,
        app: &AppName,
        env: &EnvironmentId,
    ) -> Result<Self, SecretsReadError> {
        Self::read_after(store, key, app, env, None)
    }

    /// [`EnvironmentSecrets::read`], whose redactor also hides the values
    /// of `before` (the snapshot it replaces).
    fn read_after(
        store: &Store,
        key: &SecretsKeyConfig,
        app: &AppName,
        env: &EnvironmentId,
        before: Option<&Self>,
    ) -> Result<Self, SecretsReadError> {
        let rows = store.current_secrets(app, env)?;
        if rows.is_empty() {
            return Ok(Self::new(Vec::new(), before));
        }
        let key = key.key()?;
        let check = store.secrets_key_check()?.ok_or(SecretsReadError::NoKeyCheck)?;
        let checked = key.verify(&KeyCheck::from_bytes(check))?;
        let mut values = Vec::with_capacity(rows.len());
        for row in rows {
            let at = SecretAddress { app, environment: env, name: &row.name, version: row.version };
            let value = checked.open(&at, &row.nonce, &row.ciphertext)?;
            values.push((row.name, value, row.version));
        }
        Ok(Self::new(values, before))
    }

    /// Adds what a process gets beyond its plain variables to `vars` (which
    /// hold the `[database]` variables of `database`, the spec's): every
    /// secret, winning over a plain variable of its name but not over a
    /// `[database]` one; then the base services' (`base.rs`): the
    /// environment's own database with its role's password, and
    /// `REDIS_URL` when the spec has its `REDIS_KEY_PREFIX`.
    pub fn add_to(&self, vars: &mut BTreeMap<String, String>, database: Option<&DatabaseSpec>) {
        add_secrets(vars, self, database)
    }

    /// The names of the secrets set (not the base services').
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.iter().map(|(n, _)| n.as_str())
    }

    fn new(values: Vec<(String, SecretValue, u64)>, before: Option<&EnvironmentSecrets>) -> Self {
        let versions = values.iter().map(|(n, _, v)| (n.clone(), *v)).collect();
        let (internal, values): (Vec<_>, Vec<_>) = values.into_iter().partition(|(n, _, _)| is_base_secret(n));
        let mut base = BaseSecrets::default();
        for (name, value, _) in internal {
            match name.as_str() {
                BASE_DATABASE_SECRET => match DatabaseUrl::parse(value.expose()) {
                    Ok(url) => base.database_url = Some(url),
                    Err(e) => tracing::error!("the stored URL of the environment's database cannot be read: {e}"),
                },
                _ => base.redis_url = Some(value),
            }
        }
        let values: Vec<(String, SecretValue)> = values.into_iter().map(|(n, v, _)| (n, v)).collect();
        let hidden = base.redacted();
        let older = before.into_iter().flat_map(|b| b.values.iter());
        let older_base = before.map(|b| b.base.redacted()).unwrap_or_default();
        let redactor = Arc::new(Redactor::new(
            values.iter().chain(hidden.iter()).chain(older).chain(older_base.iter()).map(|(n, v)| (n.as_str(), v)),
        ));
        Self { values, versions, base, redactor }
    }

    /// The environment's database URL with its role's password, if base
    /// services made one.
    pub(crate) fn base_database_url(&self) -> Option<&DatabaseUrl> {
        self.base.database_url.as_ref()
    }

    /// The environment's `REDIS_URL`, if base services gave it one.
    pub(crate) fn base_redis_url(&self) -> Option<&SecretValue> {
        self.base.redis_url.as_ref()
    }

    /// `database` with the role's password when it is the environment's
    /// own (see `base.rs`).
    pub(crate) fn complete_database(&self, database: DatabaseSpec) -> DatabaseSpec {
        self.base.complete(database)
    }
}

/// A controller's secrets: the snapshot its processes get, and what the
/// running release was last given.
#[derive(Default)]
pub(crate) struct SecretsState {
    config: SecretsKeyConfig,
    /// What processes started from now on get; `None` until first needed
    /// (or refreshed) in this daemon's life.
    current: Option<Arc<EnvironmentSecrets>>,
    /// The versions every process had when the running release went live
    /// (a deploy or rollback that promoted); `None` when not known (a
    /// daemon that started since).
    applied: Option<BTreeMap<String, u64>>,
}

impl SecretsState {
    pub(crate) fn new(config: SecretsKeyConfig) -> Self {
        Self { config, current: None, applied: None }
    }
}

/// `nonstop secrets ...`, to a controller.
pub(crate) enum SecretsRequest {
    Set { name: SecretName, value: SecretValue, who: String, reply: Reply<SecretReport> },
    Unset { name: SecretName, who: String, reply: Reply<SecretReport> },
    List { reply: Reply<SecretsList> },
}

/// What `secrets set` and `secrets unset` did. Never holds a value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretReport {
    pub summary: String,
    pub changed: bool,
    pub app: String,
    pub environment: String,
    pub name: String,
    /// The version written (a tombstone's for `unset`).
    pub version: Option<u64>,
    /// Where the key that encrypted it is: `NONSTOP_SECRETS_KEY` or the
    /// key file's path (`set` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The key file was created by this `set`: back it up.
    #[serde(default)]
    pub key_created: bool,
    /// Things worth knowing (a plain `[env]` variable of the same name...).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One secret that is set, without its value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretInfo {
    pub name: String,
    pub version: u64,
    pub set_at_ms: u64,
    pub set_by: String,
}

/// `secrets list`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretsList {
    pub app: String,
    pub environment: String,
    pub secrets: Vec<SecretInfo>,
}

impl EngineHandle {
    /// Store a new version of secret `name` for the addressed app and
    /// environment. Named explicitly (`scoped(Some(app), ..)`), an app
    /// that does not run here yet may get secrets before its first deploy.
    pub async fn set_secret(
        &self,
        name: SecretName,
        value: SecretValue,
        who: String,
    ) -> Result<SecretReport, EngineError> {
        let app = self.named_app().cloned();
        self.ask(|reply| Command::Secrets { app, request: SecretsRequest::Set { name, value, who, reply } }).await
    }

    /// Unset secret `name` (a tombstone version; the history stays).
    pub async fn unset_secret(&self, name: SecretName, who: String) -> Result<SecretReport, EngineError> {
        let app = self.named_app().cloned();
        self.ask(|reply| Command::Secrets { app, request: SecretsRequest::Unset { name, who, reply } }).await
    }

    /// The secrets that are set: names, versions, when and by whom.
    pub async fn secrets(&self) -> Result<SecretsList, EngineError> {
        let app = self.named_app().cloned();
        self.ask(|reply| Command::Secrets { app, request: SecretsRequest::List { reply } }).await
    }
}

/// `vars` with the secrets of `loaded` added: a secret replaces a plain
/// variable of the same name, except the variables of `database` (the
/// spec's `[database]`).
pub(crate) fn with_secrets(
    vars: Vec<(String, String)>,
    loaded: &EnvironmentSecrets,
    database: Option<&DatabaseSpec>,
) -> Vec<(String, String)> {
    let mut map: BTreeMap<String, String> = vars.into_iter().collect();
    add_secrets(&mut map, loaded, database);
    map.into_iter().collect()
}

/// [`with_secrets`] on a map. The base services' variables (`base.rs`)
/// come last: the environment's own database (with its role's password)
/// and `REDIS_URL` win over a secret.
pub(crate) fn add_secrets(
    vars: &mut BTreeMap<String, String>,
    loaded: &EnvironmentSecrets,
    database: Option<&DatabaseSpec>,
) {
    for (name, value) in &loaded.values {
        if database.is_some_and(|db| db.env.contains_key(name)) {
            continue;
        }
        vars.insert(name.clone(), value.expose().to_string());
    }
    loaded.base.add_to(vars, database);
}

/// The last log lines of an instance, redacted, for errors and events.
/// (A free function: callers hold the app runtime mutably.)
pub(crate) fn log_tail<L: InstanceLogs>(
    logs: &L,
    secrets: &SecretsState,
    app: &AppName,
    env: &EnvironmentId,
    id: &InstanceId,
    lines: usize,
) -> Vec<String> {
    let tail = logs.tail(app, env, id, lines);
    match &secrets.current {
        Some(l) if !l.redactor.is_empty() => tail.into_iter().map(|t| l.redactor.redact(&t).into_owned()).collect(),
        _ => tail,
    }
}

fn wall_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    pub(crate) fn on_secrets(&mut self, request: SecretsRequest) {
        match request {
            SecretsRequest::Set { name, value, who, reply } => {
                let _ = reply.send(self.set_secret(&name, &value, &who));
            }
            SecretsRequest::Unset { name, who, reply } => {
                let _ = reply.send(self.unset_secret(&name, &who));
            }
            SecretsRequest::List { reply } => {
                let _ = reply.send(self.list_secrets());
            }
        }
    }

    /// Whether the app runs here (its processes would pick a change up).
    fn app_runs(&self) -> bool {
        self.app.as_ref().is_some_and(|rt| rt.record.running && rt.record.app == self.scope.app)
    }

    fn set_secret(&mut self, name: &SecretName, value: &SecretValue, who: &str) -> Result<SecretReport, EngineError> {
        let (app, env) = (self.scope.app.clone(), self.env.clone());
        let (version, key) = self.seal_and_put(name.as_str(), value, who)?;
        let (key_where, key_created) = match key.source() {
            KeySource::Env => (KEY_ENV.to_string(), false),
            KeySource::File(p) => (p.display().to_string(), false),
            KeySource::Created(p) => (p.display().to_string(), true),
            KeySource::Memory => ("memory".to_string(), false),
        };
        self.event(&app, EventKind::Secrets, None, &format!("secret {name} set (version {version}) by {who}"));
        let runs = self.app_runs();
        let when = if runs {
            "takes effect at the next `nonstop deploy` or `nonstop restart`"
        } else {
            "the app's processes here get it from its next `nonstop deploy` (or `nonstop up`)"
        };
        Ok(SecretReport {
            summary: format!("{name} set for {app} in {env} (version {version}); {when}"),
            changed: true,
            app: app.to_string(),
            environment: env.to_string(),
            name: name.to_string(),
            version: Some(version),
            key: Some(key_where),
            key_created,
            notes: self.shadow_notes(name),
        })
    }

    /// The key to seal a new secret with, its check stored: a store that
    /// has secrets already has their key check, and then the key must be
    /// that one, never a new one (a lost key file would otherwise be
    /// replaced, and the secrets written before lost).
    fn writing_key(&self) -> Result<SecretsKey, EngineError> {
        let key = match self.store.secrets_key_check()? {
            Some(_) => self.secrets.config.load()?,
            None => self.secrets.config.load_or_create()?,
        };
        let new_check = key.key_check().map_err(|e| crypto_error(&e))?;
        let stored = self.store.put_secrets_key_check_if_absent(new_check.as_bytes(), self.clock.wall())?;
        key.verify(&KeyCheck::from_bytes(stored)).map_err(|e| crypto_error(&e))?;
        Ok(key)
    }

    /// Checks, changing nothing, that a secret can be sealed (the key can
    /// be had, and is the one the stored secrets were sealed with; with
    /// none stored yet, there is a place for one), before something is made
    /// whose secret must be kept (base services).
    pub(crate) fn secrets_key_for_writing(&self) -> Result<(), EngineError> {
        match self.store.secrets_key_check()? {
            Some(check) => {
                let key = self.secrets.config.load()?;
                key.verify(&KeyCheck::from_bytes(check)).map_err(|e| crypto_error(&e))?;
                Ok(())
            }
            None if self.secrets.config.env().is_some() => self.secrets.config.load().map(drop),
            None => self.secrets.config.home().map(drop),
        }
    }

    /// Seal `value` as the next version of `name` of this environment and
    /// store it; the version and the key used.
    fn seal_and_put(&mut self, name: &str, value: &SecretValue, who: &str) -> Result<(u64, SecretsKey), EngineError> {
        let (app, env) = (self.scope.app.clone(), self.env.clone());
        let key = self.writing_key()?;
        let check = self.store.secrets_key_check()?.ok_or(nonstop_store::StoreError::SecretsKeyCheckMissing)?;
        let checked = key.verify(&KeyCheck::from_bytes(check)).map_err(|e| crypto_error(&e))?;
        let version = self.store.next_secret_version(&app, &env, name)?;
        let at = SecretAddress { app: &app, environment: &env, name, version };
        let sealed = checked.seal(&at, value).map_err(|e| crypto_error(&e))?;
        self.store.put_secret(&NewSecretVersion {
            app: &app,
            environment: &env,
            name,
            version,
            nonce: &sealed.nonce,
            ciphertext: &sealed.ciphertext,
            created_by: who,
            created_at: self.clock.wall(),
        })?;
        Ok((version, key))
    }

    /// Keep a secret of the base services (`base.rs`): the environment's
    /// database URL with its role's password, its `REDIS_URL`.
    pub(crate) fn put_base_secret(&mut self, name: &str, value: &SecretValue, who: &str) -> Result<(), EngineError> {
        let (version, _) = self.seal_and_put(name, value, who)?;
        let app = self.scope.app.clone();
        let what = if name == BASE_DATABASE_SECRET { "the database's role password" } else { "REDIS_URL" };
        self.event(
            &app,
            EventKind::Secrets,
            None,
            &format!("base services: {what} sealed (version {version}) for {who}"),
        );
        Ok(())
    }

    /// How `name` meets the running spec's plain variables.
    fn shadow_notes(&self, name: &SecretName) -> Vec<String> {
        let Some(rt) = self.app.as_ref().filter(|rt| rt.record.app == self.scope.app) else { return Vec::new() };
        let spec = &rt.record.spec;
        let mut notes = Vec::new();
        if spec.database.as_ref().is_some_and(|db| db.env.contains_key(name.as_str())) {
            notes.push(format!(
                "[database] sets {name} for every process and task, and wins over the secret; choose another \
                 name, or take {name} out of [database] env"
            ));
        } else if spec.env.contains_key(name.as_str())
            || spec.processes.iter().any(|p| p.env.contains_key(name.as_str()))
        {
            notes.push(format!("nonstop.toml also sets {name} in [env]: the secret wins; remove it from nonstop.toml"));
        }
        notes
    }

    fn unset_secret(&mut self, name: &SecretName, who: &str) -> Result<SecretReport, EngineError> {
        let (app, env) = (self.scope.app.clone(), self.env.clone());
        let problems = self.queues_left_without(name.as_str());
        if !problems.is_empty() {
            return Err(EngineError::SecretInUse { name: name.to_string(), env: env.to_string(), problems });
        }
        let Some(version) = self.store.unset_secret(&app, &env, name.as_str(), who, self.clock.wall())? else {
            let known = self
                .store
                .list_secrets(&app, &env)?
                .into_iter()
                .map(|s| s.name)
                .filter(|n| !is_base_secret(n))
                .collect();
            return Err(EngineError::UnknownSecret {
                name: name.to_string(),
                app: app.to_string(),
                env: env.to_string(),
                known,
            });
        };
        self.event(&app, EventKind::Secrets, None, &format!("secret {name} unset (version {version}) by {who}"));
        let when = if self.app_runs() {
            "its processes keep it until the next `nonstop deploy` or `nonstop restart`"
        } else {
            "the app's processes here will not get it"
        };
        Ok(SecretReport {
            summary: format!("{name} unset for {app} in {env} (its history is kept); {when}"),
            changed: true,
            app: app.to_string(),
            environment: env.to_string(),
            name: name.to_string(),
            version: Some(version),
            key: None,
            key_created: false,
            notes: Vec::new(),
        })
    }

    fn list_secrets(&self) -> Result<SecretsList, EngineError> {
        let (app, env) = (&self.scope.app, &self.env);
        let secrets = self
            .store
            .list_secrets(app, env)?
            .into_iter()
            .filter(|s| !is_base_secret(&s.name))
            .map(|s| SecretInfo {
                name: s.name,
                version: s.version,
                set_at_ms: wall_ms(s.created_at),
                set_by: s.created_by,
            })
            .collect();
        Ok(SecretsList { app: app.to_string(), environment: env.to_string(), secrets })
    }

    /// Decrypt the current secrets of this environment (no key needed
    /// when there are none).
    fn load_secrets(&self) -> Result<EnvironmentSecrets, EngineError> {
        let (app, env) = (&self.scope.app, &self.env);
        EnvironmentSecrets::read_after(&self.store, &self.secrets.config, app, env, self.secrets.current.as_deref())
            .map_err(read_error)
    }

    /// Read the secrets again for an operation that starts processes
    /// (`deploy`, `rollback`, `restart`, `start`, `up`): from now on
    /// processes get the current values. On error nothing changed (the
    /// snapshot is kept) and the operation must not begin.
    pub(crate) fn refresh_secrets(&mut self) -> Result<(), EngineError> {
        let loaded = self.load_secrets().map_err(|e| match e {
            EngineError::Secrets { reason } => EngineError::Secrets {
                reason: format!(
                    "the secrets of {} in {} cannot be read: {reason}; nothing was changed",
                    self.scope.app, self.env
                ),
            },
            other => other,
        })?;
        self.secrets.current = Some(Arc::new(loaded));
        Ok(())
    }

    /// The snapshot a process starting now gets: read on first need. The
    /// error says why it cannot start.
    pub(crate) fn launch_secrets(&mut self) -> Result<Arc<EnvironmentSecrets>, SecretsUnavailable> {
        if let Some(loaded) = &self.secrets.current {
            return Ok(loaded.clone());
        }
        match self.load_secrets() {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                self.secrets.current = Some(loaded.clone());
                Ok(loaded)
            }
            Err(e) => Err(SecretsUnavailable(e)),
        }
    }

    /// Whether the secrets (as last refreshed) differ from those the
    /// running release went live with: a deploy of unchanged code and
    /// config is then not "nothing to deploy".
    pub(crate) fn secrets_changed_since_live(&self) -> bool {
        let now = self.secrets.current.as_ref().map(|l| &l.versions);
        match (&self.secrets.applied, now) {
            (Some(applied), Some(now)) => applied != now,
            // Not known since the daemon started: a deploy rolls them out
            // if there are any.
            (None, Some(now)) => !now.is_empty(),
            (_, None) => false,
        }
    }

    /// The deployment in progress went live: every process has the
    /// current snapshot.
    pub(crate) fn mark_secrets_live(&mut self) {
        self.secrets.applied = self.secrets.current.as_ref().map(|l| l.versions.clone());
    }

    /// The redactor of the current snapshot (an empty one when nothing
    /// was read yet).
    pub(crate) fn redactor(&self) -> Arc<Redactor> {
        self.secrets.current.as_ref().map_or_else(|| Arc::new(Redactor::empty()), |l| l.redactor.clone())
    }

    /// `text` without any secret value.
    pub(crate) fn redact(&self, text: &str) -> String {
        match &self.secrets.current {
            Some(l) => l.redactor.redact(text).into_owned(),
            None => text.to_string(),
        }
    }

    /// The migration gate's reports, redacted (its errors are, as they
    /// become the verdict's words).
    pub(crate) fn redact_gate(&self, answer: gate::GateAnswer) -> gate::GateAnswer {
        use gate::GateAnswer;
        let r = |s: String| self.redact(&s);
        match answer {
            GateAnswer::Deploy(Ok(mut outcome)) => {
                outcome.report = r(outcome.report);
                GateAnswer::Deploy(Ok(outcome))
            }
            GateAnswer::Rollback(Ok(report)) => GateAnswer::Rollback(Ok(report.map(r))),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> SecretValue {
        SecretValue::new(s.to_string()).unwrap()
    }

    #[test]
    fn secrets_win_over_env_but_not_over_database_variables() {
        let database =
            DatabaseSpec::new(nonstop_core::database::DatabaseUrl::parse("postgres://blog@db/blog").unwrap());
        let loaded = EnvironmentSecrets::new(
            vec![("API_TOKEN".into(), value("tok-1234"), 1), ("DATABASE_URL".into(), value("postgres://evil/x"), 1)],
            None,
        );
        let vars = vec![
            ("API_TOKEN".to_string(), "plain".to_string()),
            ("DATABASE_URL".to_string(), "postgres://blog@db/blog".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let out: BTreeMap<String, String> = with_secrets(vars, &loaded, Some(&database)).into_iter().collect();
        assert_eq!(out["API_TOKEN"], "tok-1234");
        assert_eq!(out["DATABASE_URL"], "postgres://blog@db/blog");
        assert_eq!(out["PATH"], "/bin");
    }

    #[test]
    fn the_redactor_knows_the_snapshot_before() {
        let first = EnvironmentSecrets::new(vec![("TOKEN".into(), value("old-value-1"), 1)], None);
        let second = EnvironmentSecrets::new(vec![("TOKEN".into(), value("new-value-2"), 2)], Some(&first));
        let text = second.redactor.redact("a old-value-1 b new-value-2");
        assert_eq!(text, "a [secret TOKEN] b [secret TOKEN]");
        // ...but only one snapshot back.
        let third = EnvironmentSecrets::new(vec![("TOKEN".into(), value("third-value"), 3)], Some(&second));
        assert_eq!(third.redactor.redact("old-value-1"), "old-value-1");
    }

    #[test]
    fn debug_of_the_key_config_hides_the_key() {
        let c = SecretsKeyConfig::new(PathBuf::from("/home/x"), Some("c2VjcmV0LWtleS1ieXRlcw==".into()));
        let shown = format!("{c:?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains("from_env: true"), "{shown}");
    }
}
