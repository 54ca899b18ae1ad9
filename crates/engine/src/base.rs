//! Base services in the engine: an environment's own PostgreSQL database
//! and login role, and its Redis database, made from the spec's `[base]`
//! before a deploy (or an `up`, or `env create`) changes anything.
//!
//! **The boundary.** [`BaseServices`] checks the servers and makes what an
//! environment needs; the daemon fills it with `nonstop-base`
//! (`cli/src/base_services.rs`), tests with a fake. One call
//! ([`BaseServices::prepare`]) checks every server first (reachable, the
//! login accepted, the rights there, no object of the environment's names
//! that nonstop did not make): a refusal changes nothing.
//!
//! `env destroy --drop-database` (`environments.rs`) undoes it through the
//! same boundary: [`BaseServices::drop_database`] (only what nonstop made),
//! then [`BaseServices::flush_redis`] (the environment's own Redis
//! database emptied, or its keys in the shared one deleted).
//!
//! **Where it fits.** A `deploy`, `up` or `env create` whose spec has
//! `[base] postgres` and no `[database]` of its own for the environment,
//! or `[base] redis`, is held (the controller is busy with it, `nonstop
//! cancel` drops it) while `prepare` runs off the controller's task;
//! then the spec's `[database]` becomes the environment's database (so
//! the `[database]` machinery applies: its variables, the migration gate)
//! and the command goes on as if the spec had said so. `[base]` itself is
//! taken off the spec: the stored spec never holds an administrator's URL.
//!
//! **Passwords.** The role's password is generated once
//! ([`BaseServices::new_password`]) and kept as a secret of the
//! environment under the reserved name [`BASE_DATABASE_SECRET`] (the
//! environment's URL with it, sealed like any secret; `NONSTOP_*` names
//! are refused to users); the stored spec holds the URL without it. It is
//! added to the `[database]` variables of processes, tasks and the gate the
//! way secrets are (`secrets.rs`), and only when the spec's database is
//! that very URL. Redis: the environment's database number on the server
//! is decided once and kept in the store; its `REDIS_URL` (which may hold
//! the server's password) is the secret [`BASE_REDIS_SECRET`], and
//! `REDIS_KEY_PREFIX` (`APP:ENV:`) a plain variable of the spec, which is
//! what makes processes get `REDIS_URL`.

use super::deploy::DeployRequest;
use super::promote::PromoteRequest;
use super::*;
use nonstop_core::database::{DatabaseSpec, DatabaseUrl};
use nonstop_core::environment::RedisUrl;
use nonstop_secrets::SecretValue;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

/// The secret holding an environment's database URL with its role's
/// password (reserved: users cannot set `NONSTOP_*` secrets).
pub const BASE_DATABASE_SECRET: &str = "NONSTOP_BASE_DATABASE_URL";
/// The secret holding an environment's `REDIS_URL`.
pub const BASE_REDIS_SECRET: &str = "NONSTOP_BASE_REDIS_URL";
/// The variable with an environment's Redis URL.
pub const REDIS_URL_VAR: &str = "REDIS_URL";
/// The variable with an environment's Redis key prefix (`APP:ENV:`).
pub const REDIS_KEY_PREFIX_VAR: &str = "REDIS_KEY_PREFIX";

/// Whether `name` is one of the secrets the engine keeps for base
/// services (never listed, never a variable of its own).
pub fn is_base_secret(name: &str) -> bool {
    name == BASE_DATABASE_SECRET || name == BASE_REDIS_SECRET
}

pub type BaseFuture<T> = Pin<Box<dyn Future<Output = Result<T, BaseServiceError>> + Send>>;

/// Why a base service could not be used: its message says what and how to
/// fix it (and never holds a password).
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct BaseServiceError {
    /// The user's input or servers (a `[base]` URL, a server that does not
    /// answer or refuses the login, missing rights, a name taken): exit
    /// code 2. Otherwise a failure along the way: 1.
    pub bad_input: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl BaseServiceError {
    pub fn new(bad_input: bool, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { bad_input, source: source.into() }
    }
}

/// What to make for one app's environment.
#[derive(Debug, Clone)]
pub struct BaseRequest {
    pub app: AppName,
    pub env: EnvironmentId,
    pub postgres: Option<PostgresRequest>,
    pub redis: Option<RedisRequest>,
}

/// The environment's PostgreSQL database and role.
#[derive(Debug, Clone)]
pub struct PostgresRequest {
    /// `[base] postgres`: an administrator's connection.
    pub admin: DatabaseUrl,
    /// The role's password (the stored one, or a new one).
    pub password: SecretValue,
    /// The role may create databases (the migration gate's scratch copy:
    /// the spec has release tasks).
    pub create_db: bool,
    /// Fill the new database with a copy of this environment's (`env
    /// create --from`). Refused, changing nothing, when the new one exists
    /// already.
    pub copy_from: Option<EnvironmentId>,
}

/// The environment's Redis database.
#[derive(Debug, Clone)]
pub struct RedisRequest {
    /// `[base] redis`.
    pub url: RedisUrl,
    /// The number the environment holds already, if any (kept).
    pub assigned: Option<u8>,
    /// The numbers other environments hold on this server.
    pub taken: Vec<u8>,
}

/// What `prepare` made.
#[derive(Debug, Clone)]
pub struct BaseReady {
    pub postgres: Option<ProvisionedDatabase>,
    pub redis: Option<RedisShare>,
}

/// An environment's database, ready.
#[derive(Debug, Clone)]
pub struct ProvisionedDatabase {
    /// `postgres://ROLE:PASSWORD@HOST:PORT/DATABASE` (printed redacted).
    pub url: DatabaseUrl,
    pub database: String,
    pub role: String,
    pub created_role: bool,
    pub created_database: bool,
    /// `host:port`, for messages.
    pub server: String,
    pub copied: Option<CopiedDatabase>,
}

/// The copy `env create --from` made.
#[derive(Debug, Clone, PartialEq)]
pub struct CopiedDatabase {
    pub from_database: String,
    /// How (`pg_dump | psql`).
    pub method: String,
    pub seconds: f64,
}

/// An environment's share of the Redis server.
#[derive(Debug, Clone)]
pub struct RedisShare {
    /// Its database number; 0: the shared database (keep to the prefix).
    pub number: u8,
    /// `REDIS_URL` (with the server's password, if any).
    pub url: SecretValue,
    /// The URL with its password hidden, for messages.
    pub shown: String,
    /// `APP:ENV:`.
    pub key_prefix: String,
}

/// What [`BaseServices::drop_database`] dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedDatabase {
    pub database: String,
    pub database_dropped: bool,
    pub role_dropped: bool,
}

/// What [`BaseServices::flush_redis`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushedRedis {
    /// `host:port`.
    pub server: String,
    /// The environment's database number; 0: the shared one, where only
    /// its keys went.
    pub number: u8,
    /// How many keys were removed.
    pub keys: u64,
}

/// The servers environments' databases live on (PostgreSQL and Redis, in
/// the daemon).
pub trait BaseServices: Send + Sync + 'static {
    /// A new password for an environment's role.
    fn new_password(&self) -> Result<SecretValue, BaseServiceError>;
    /// The name of `app`'s database (and role) for `env`.
    fn database_name(&self, app: &AppName, env: &EnvironmentId) -> String;
    /// Check every server the request names, then make (or bring back in
    /// line: idempotent) the environment's database and role, copy
    /// another's data into it if asked, and give it a Redis database. A
    /// check that fails changes nothing.
    fn prepare(&self, request: BaseRequest) -> BaseFuture<BaseReady>;
    /// Drop `app`'s database of `env` and its role (only what nonstop made
    /// for them).
    fn drop_database(&self, admin: DatabaseUrl, app: AppName, env: EnvironmentId) -> BaseFuture<DroppedDatabase>;
    /// Remove `app`'s data of `env` from the Redis server at `url`: empty
    /// its database `number`, or, for 0 (the shared database), delete only
    /// its keys (`APP:ENV:*`). Removing what is gone already is fine.
    fn flush_redis(&self, url: RedisUrl, number: u8, app: AppName, env: EnvironmentId) -> BaseFuture<FlushedRedis>;
}

/// For engines without base services: a spec with `[base]` cannot be
/// deployed.
pub struct NoBaseServices;

fn none() -> BaseServiceError {
    BaseServiceError::new(false, "this daemon has no base services (it cannot make databases from [base])")
}

impl BaseServices for NoBaseServices {
    fn new_password(&self) -> Result<SecretValue, BaseServiceError> {
        Err(none())
    }
    fn database_name(&self, app: &AppName, env: &EnvironmentId) -> String {
        format!("{app}_{env}")
    }
    fn prepare(&self, _: BaseRequest) -> BaseFuture<BaseReady> {
        Box::pin(async { Err(none()) })
    }
    fn drop_database(&self, _: DatabaseUrl, _: AppName, _: EnvironmentId) -> BaseFuture<DroppedDatabase> {
        Box::pin(async { Err(none()) })
    }
    fn flush_redis(&self, _: RedisUrl, _: u8, _: AppName, _: EnvironmentId) -> BaseFuture<FlushedRedis> {
        Box::pin(async { Err(none()) })
    }
}

/// A command held while its environment's base services are made.
pub(crate) enum Waiting {
    Deploy {
        request: Box<DeployRequest>,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    Up {
        spec: Box<AppSpec>,
        workdir: PathBuf,
        base_env: BTreeMap<String, String>,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
    /// `nonstop promote` (and `env create --from`, which `copy`s the
    /// source's database into the new one): `release` of `request.from`.
    Promote {
        release: ReleaseId,
        request: Box<PromoteRequest>,
        copy: bool,
        progress: ProgressTx,
        reply: Reply<OpReport>,
    },
}

impl Waiting {
    fn spec_mut(&mut self) -> &mut AppSpec {
        match self {
            Waiting::Deploy { request, .. } => &mut request.spec,
            Waiting::Promote { request, .. } => &mut request.spec,
            Waiting::Up { spec, .. } => spec,
        }
    }

    fn progress(&self) -> &ProgressTx {
        match self {
            Waiting::Deploy { progress, .. } | Waiting::Up { progress, .. } | Waiting::Promote { progress, .. } => {
                progress
            }
        }
    }

    fn who(&self) -> String {
        match self {
            Waiting::Deploy { request, .. } => format!("deploy by {}", request.who),
            Waiting::Promote { request, .. } => format!("promote by {}", request.who),
            Waiting::Up { .. } => "up".to_string(),
        }
    }

    fn fail(self, e: EngineError) {
        let reply = match self {
            Waiting::Deploy { reply, .. } | Waiting::Up { reply, .. } | Waiting::Promote { reply, .. } => reply,
        };
        let _ = reply.send(Err(e));
    }
}

/// A command held for its base services.
pub(crate) struct PendingBase {
    id: u64,
    waiting: Waiting,
    since: SystemTime,
    /// `[base] redis`'s server key, when Redis was asked for.
    redis_server: Option<String>,
}

static NEXT_PENDING: AtomicU64 = AtomicU64::new(1);

/// What the daemon's answer to `prepare` says, back on the controller.
pub(crate) struct BaseAnswer {
    id: u64,
    result: Result<BaseReady, BaseServiceError>,
}

fn base_error(e: &BaseServiceError, app: &AppName, env: &EnvironmentId) -> EngineError {
    EngineError::Base {
        reason: format!("{e}\nthe command stopped before anything of {app} in {env} changed"),
        bad_input: e.bad_input,
    }
}

impl<D: Driver, T: Traffic, I: Ingress, L: InstanceLogs> Controller<D, T, I, L> {
    /// Before a deploy, `up` or promotion: takes `[base]` off the
    /// spec and, if it asks for anything, starts making it and holds the
    /// command (`None`); otherwise gives the command back to go on.
    pub(crate) fn hold_for_base(&mut self, mut waiting: Waiting) -> Option<Waiting> {
        let copy_from = match &waiting {
            Waiting::Promote { request, copy: true, .. } => Some(request.from.clone()),
            _ => None,
        };
        let spec = waiting.spec_mut();
        let Some(base) = spec.base.take() else { return Some(waiting) };
        let (app, env) = (spec.app.clone(), self.env.clone());
        let postgres = base.postgres.filter(|_| spec.database.is_none());
        let create_db = !spec.release.tasks.is_empty();
        if postgres.is_none() && base.redis.is_none() {
            return Some(waiting);
        }
        // Another operation runs: the command is refused as it would be.
        if self.busy().is_some() {
            return Some(waiting);
        }
        let request = match self.base_request(&app, postgres, base.redis, create_db, copy_from) {
            Ok(r) => r,
            Err(e) => {
                waiting.fail(e);
                return None;
            }
        };
        let mut servers = Vec::new();
        if let Some(pg) = &request.postgres {
            servers.push(format!("PostgreSQL at {}:{}", pg.admin.host(), pg.admin.port()));
        }
        if let Some(r) = &request.redis {
            servers.push(format!("Redis at {}", r.url.server()));
        }
        let _ = waiting
            .progress()
            .send(Progress::note(format!("base services: checking {} for {app} in {env}", servers.join(" and "))));
        let id = NEXT_PENDING.fetch_add(1, Ordering::Relaxed);
        let redis_server = request.redis.as_ref().map(|r| r.url.server());
        let (services, tx, cancel) = (self.base.clone(), self.events_tx.clone(), self.cancel.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                result = services.prepare(request) => {
                    let _ = tx.send(Internal::Base(Box::new(BaseAnswer { id, result })));
                }
            }
        });
        self.pending_base = Some(PendingBase { id, waiting, since: self.clock.wall(), redis_server });
        None
    }

    /// The request to the base services: the role's password (the one
    /// stored, else a new one), the Redis number held. Checks that the
    /// password can be sealed (the secrets key) before anything is made.
    fn base_request(
        &mut self,
        app: &AppName,
        postgres: Option<DatabaseUrl>,
        redis: Option<RedisUrl>,
        create_db: bool,
        copy_from: Option<EnvironmentId>,
    ) -> Result<BaseRequest, EngineError> {
        let env = self.env.clone();
        let postgres = match postgres {
            None => None,
            Some(admin) => {
                self.secrets_key_for_writing()?;
                let stored = self.launch_secrets()?;
                let password = match stored.base_database_url().and_then(|u| u.password().map(str::to_string)) {
                    Some(p) => SecretValue::new(p).map_err(|e| EngineError::Secrets { reason: e.to_string() })?,
                    None => self.base.new_password().map_err(|e| base_error(&e, app, &env))?,
                };
                Some(PostgresRequest { admin, password, create_db, copy_from })
            }
        };
        let redis = match redis {
            None => None,
            Some(url) => {
                self.secrets_key_for_writing()?;
                let server = url.server();
                let assigned = self.store.redis_assignment(&server, app, &env)?;
                let taken = self.store.redis_numbers_taken(&server)?;
                Some(RedisRequest { url, assigned, taken })
            }
        };
        Ok(BaseRequest { app: app.clone(), env, postgres, redis })
    }

    /// `prepare` answered: keep what it made, then let the held command go
    /// on (or fail it, nothing having changed).
    pub(crate) fn on_base_answer(&mut self, answer: BaseAnswer) {
        let Some(pending) = self.pending_base.take_if(|p| p.id == answer.id) else { return };
        let PendingBase { mut waiting, redis_server, .. } = pending;
        let (app, env) = (waiting.spec_mut().app.clone(), self.env.clone());
        let ready = match answer.result {
            Ok(ready) => ready,
            Err(e) => {
                let _ = waiting.progress().send(Progress::note(format!("base services: {e}")));
                waiting.fail(base_error(&e, &app, &env));
                return;
            }
        };
        if let Err(e) = self.apply_base(&mut waiting, ready, redis_server) {
            waiting.fail(e);
            return;
        }
        match waiting {
            Waiting::Deploy { request, progress, reply } => self.begin_deploy(*request, progress, reply),
            Waiting::Up { spec, workdir, base_env, progress, reply } => {
                self.on_command(Command::Up { spec, workdir, base_env, progress, reply })
            }
            Waiting::Promote { release, request, progress, reply, .. } => {
                self.begin_promote(release, *request, progress, reply)
            }
        }
    }

    /// Seal and keep what `prepare` made, point the spec at it, and read
    /// the secrets again (processes started from here get the password).
    fn apply_base(
        &mut self,
        waiting: &mut Waiting,
        ready: BaseReady,
        redis_server: Option<String>,
    ) -> Result<(), EngineError> {
        let progress = waiting.progress().clone();
        let note = |m: String| {
            let _ = progress.send(Progress::note(format!("base services: {m}")));
        };
        let (app, env) = (waiting.spec_mut().app.clone(), self.env.clone());
        let who = waiting.who();
        let current = self.launch_secrets()?;
        if let Some(db) = ready.postgres {
            let made = |created: bool| if created { "created" } else { "ready" };
            note(format!(
                "database {} ({}) and role {} ({}) on {}",
                db.database,
                made(db.created_database),
                db.role,
                made(db.created_role),
                db.server
            ));
            if let Some(c) = &db.copied {
                note(format!(
                    "copied database {} into {} ({}, {:.1}s)",
                    c.from_database, db.database, c.method, c.seconds
                ));
            }
            if current.base_database_url() != Some(&db.url) {
                let value = SecretValue::new(db.url.expose().to_string())
                    .map_err(|e| EngineError::Secrets { reason: e.to_string() })?;
                self.put_base_secret(BASE_DATABASE_SECRET, &value, &who)?;
            }
            let stored = DatabaseUrl::parse(&db.url.without_password()).map_err(|e| EngineError::Base {
                reason: format!("the database URL made is not usable: {e}"),
                bad_input: false,
            })?;
            waiting.spec_mut().database = Some(DatabaseSpec::new(stored));
        }
        match (ready.redis, redis_server) {
            (Some(share), Some(server)) => {
                self.store.assign_redis(&server, &app, &env, share.number)?;
                let place = if share.number == 0 {
                    format!("the shared database 0 (keep to the key prefix {})", share.key_prefix)
                } else {
                    format!("database {}", share.number)
                };
                note(format!("Redis {place} on {server} (REDIS_URL {})", share.shown));
                if current.base_redis_url().map(|v| v.expose()) != Some(share.url.expose()) {
                    self.put_base_secret(BASE_REDIS_SECRET, &share.url, &who)?;
                }
                waiting.spec_mut().env.insert(REDIS_KEY_PREFIX_VAR.to_string(), share.key_prefix);
            }
            _ => {
                if current.base_redis_url().is_some() {
                    self.store.unset_secret(&app, &env, BASE_REDIS_SECRET, &who, self.clock.wall())?;
                }
            }
        }
        self.refresh_secrets()
    }

    /// The held command, for `status`.
    pub(crate) fn base_summary(&self) -> Option<String> {
        self.pending_base.as_ref().map(|p| format!("{} (making its base services)", p.waiting.who()))
    }

    /// The held command's part of `busy`.
    pub(crate) fn base_busy(&self) -> Option<EngineError> {
        let p = self.pending_base.as_ref()?;
        Some(EngineError::Busy {
            operation: format!("{} (making its base services)", p.waiting.who()),
            since: fmt_wall(p.since),
        })
    }

    /// `nonstop cancel` of a command held for its base services: dropped
    /// (what the base services made stays: the database is the
    /// environment's, and made again the same way next time).
    pub(crate) fn cancel_pending_base(&mut self, why: &str) -> Option<OpReport> {
        let pending = self.pending_base.take()?;
        pending.waiting.fail(EngineError::DeployFailed { release: "the new release".into(), reason: why.to_string() });
        Some(OpReport {
            summary: "the command was cancelled while its base services were being made; nothing that runs changed"
                .into(),
            changed: true,
        })
    }
}

/// The secrets of the base services, as loaded with an environment's
/// secrets: its database URL with the role's password, its `REDIS_URL`.
#[derive(Default, Clone)]
pub(crate) struct BaseSecrets {
    pub(crate) database_url: Option<DatabaseUrl>,
    pub(crate) redis_url: Option<SecretValue>,
}

impl BaseSecrets {
    /// Values to hide in output: each whole, and each password alone.
    pub(crate) fn redacted(&self) -> Vec<(String, SecretValue)> {
        let mut out = Vec::new();
        let mut add = |name: &str, text: &str| {
            if let Ok(v) = SecretValue::new(text.to_string()) {
                out.push((name.to_string(), v));
            }
        };
        if let Some(url) = &self.database_url {
            add(BASE_DATABASE_SECRET, url.expose());
            if let Some(p) = url.password() {
                add("database password", p);
            }
        }
        if let Some(url) = &self.redis_url {
            add(BASE_REDIS_SECRET, url.expose());
            if let Ok(u) = RedisUrl::parse(url.expose().rsplit_once('/').map_or(url.expose(), |(a, _)| a)) {
                if let Some(p) = u.password() {
                    add("redis password", p);
                }
            }
        }
        out
    }

    /// Adds the base services' variables to `vars`: the `[database]`
    /// variables of `database` with the role's password when `database` is
    /// the environment's own (the stored URL, without its password), and
    /// `REDIS_URL` when the spec has the environment's `REDIS_KEY_PREFIX`.
    pub(crate) fn add_to(&self, vars: &mut BTreeMap<String, String>, database: Option<&DatabaseSpec>) {
        if let (Some(db), Some(url)) = (database, &self.database_url) {
            if is_own_database(db, url) {
                vars.extend(db.env.iter().map(|(var, part)| (var.clone(), url.part(*part))));
            }
        }
        if let Some(url) = &self.redis_url {
            if vars.contains_key(REDIS_KEY_PREFIX_VAR) {
                vars.insert(REDIS_URL_VAR.to_string(), url.expose().to_string());
            }
        }
    }

    /// `database` with the role's password, when it is the environment's
    /// own (for the migration gate, which connects with it).
    pub(crate) fn complete(&self, database: DatabaseSpec) -> DatabaseSpec {
        match &self.database_url {
            Some(url) if is_own_database(&database, url) => DatabaseSpec { url: url.clone(), ..database },
            _ => database,
        }
    }
}

/// The spec's database is the environment's own: its URL, stored without
/// the password, is the provisioned one.
fn is_own_database(db: &DatabaseSpec, provisioned: &DatabaseUrl) -> bool {
    db.url.password().is_none() && db.url.without_password() == provisioned.without_password()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> DatabaseUrl {
        DatabaseUrl::parse(s).unwrap()
    }

    #[test]
    fn the_password_goes_only_to_the_environments_own_database() {
        let base = BaseSecrets {
            database_url: Some(url("postgres://blog_staging:s3cret-pw-123@db:5432/blog_staging")),
            redis_url: Some(SecretValue::new("redis://:rpw-4567@cache:6379/2".into()).unwrap()),
        };
        let own = DatabaseSpec::new(url("postgres://blog_staging@db:5432/blog_staging"));
        let mut vars = BTreeMap::new();
        base.add_to(&mut vars, Some(&own));
        assert_eq!(vars["DATABASE_URL"], "postgres://blog_staging:s3cret-pw-123@db:5432/blog_staging");
        assert!(!vars.contains_key(REDIS_URL_VAR), "no REDIS_URL without the spec's prefix");
        assert_eq!(base.complete(own.clone()).url.password(), Some("s3cret-pw-123"));

        // Another database (an explicit [database]) gets nothing.
        for other in ["postgres://blog@db:5432/blog", "postgres://blog_staging:given@db:5432/blog_staging"] {
            let spec = DatabaseSpec::new(url(other));
            let mut vars = BTreeMap::new();
            base.add_to(&mut vars, Some(&spec));
            assert!(vars.is_empty(), "{other}: {vars:?}");
            assert_eq!(base.complete(spec.clone()), spec);
        }

        let mut vars = BTreeMap::from([(REDIS_KEY_PREFIX_VAR.to_string(), "blog:staging:".to_string())]);
        base.add_to(&mut vars, None);
        assert_eq!(vars[REDIS_URL_VAR], "redis://:rpw-4567@cache:6379/2");
        let hidden: Vec<String> = base.redacted().iter().map(|(_, v)| v.expose().to_string()).collect();
        assert!(
            hidden.contains(&"s3cret-pw-123".to_string()) && hidden.contains(&"rpw-4567".to_string()),
            "{hidden:?}"
        );
    }

    #[test]
    fn base_secrets_are_reserved_names() {
        assert!(is_base_secret(BASE_DATABASE_SECRET) && is_base_secret(BASE_REDIS_SECRET));
        assert!(!is_base_secret("DATABASE_URL"));
        for name in [BASE_DATABASE_SECRET, BASE_REDIS_SECRET] {
            assert!(nonstop_secrets::SecretName::new(name).is_err(), "{name} must be refused to users");
        }
    }
}
