//! `nonstop env create` / `env destroy` and base services end to end: the
//! real binary, the hello example, the real PostgreSQL on 127.0.0.1:5432
//! (user postgres, trust auth) and the real Redis on 127.0.0.1:6379.
//!
//! Each test's app has a name of its own (`e2e<pid>x<n>`), so its
//! databases and roles (`APP_staging`, ...) are its own; a guard drops
//! every one of them at the end, also when the test fails. A test whose
//! destroy empties Redis databases (`--drop-database`) uses a private
//! `redis-server` of its own (a free port, nothing saved, stopped by a
//! guard): emptying a database of the shared server would take other
//! tests' keys with it.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `sql` through psql as postgres on `db`; the output, trimmed.
fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-tAc", sql])
        .output()
        .expect("psql runs (is postgresql-client installed?)");
    assert!(
        out.status.success(),
        "psql {sql}: {} (is PostgreSQL running on 127.0.0.1:5432 with trust auth for postgres?)",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default();
    (status, body)
}

/// The app, its environments brought down and their databases and roles
/// dropped when it goes.
struct Fixture {
    app: TestApp,
    name: String,
    envs: Vec<&'static str>,
}

impl Fixture {
    fn new(base: &str, envs: &[&'static str]) -> Fixture {
        let name = format!("e2e{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let spec = format!(
            r#"app = "{name}"

[env]
GREETING = "hello"

[proxy]
listen = "127.0.0.1:8080"

[release]
tasks = ["psql \"$DATABASE_URL\" -X -q -v ON_ERROR_STOP=1 -c 'CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, title text)'"]

[processes.web]
command = "exec python3 app.py"
kind = "web"
count = 1
drain_timeout = "1s"

[processes.web.health]
path = "/health"
interval = "200ms"
healthy_threshold = 1

[base]
{base}

[environments.production]
default = true
protected = true

[environments.staging]
"#
        );
        let fixture = Fixture { app: TestApp::new("hello", |_| spec), name, envs: envs.to_vec() };
        fixture.clean();
        fixture
    }

    fn host(&self, env: &str) -> String {
        format!("{env}.{}.localhost", self.name)
    }

    fn db(&self, env: &str) -> String {
        format!("{}_{env}", self.name)
    }

    fn get(&self, env: &str, path: &str) -> (u16, String) {
        get(self.app.proxy(), &self.host(env), path)
    }

    fn exists(&self, kind: &str, name: &str) -> bool {
        let sql = match kind {
            "database" => format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
            _ => format!("SELECT count(*) FROM pg_roles WHERE rolname = '{name}'"),
        };
        psql("postgres", &sql) == "1"
    }

    /// The variables of the running web instance of `env`, read from
    /// /proc (the same user's process).
    fn web_env(&self, env: &str) -> Vec<(String, String)> {
        let st = self.app.run(&["-e", env, "status", "--json"]);
        st.ok();
        let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
        let pid = st["instances"][0]["pid"].as_i64().expect("a web instance");
        let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        raw.split(|b| *b == 0)
            .filter_map(|kv| String::from_utf8_lossy(kv).split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }

    fn clean(&self) {
        for env in &self.envs {
            let db = self.db(env);
            psql("postgres", &format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"));
            psql("postgres", &format!("DROP ROLE IF EXISTS \"{db}\""));
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for env in &self.envs {
            let _ = self.app.run_with_timeout(&["-e", env, "down"], Duration::from_secs(60));
        }
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.clean()));
    }
}

/// Whether `password` is the one PostgreSQL keeps (as a SCRAM-SHA-256
/// verifier) for `role`: the server trusts 127.0.0.1, so connecting proves
/// nothing about a password.
fn password_is_the_roles(role: &str, password: &str) -> bool {
    let verifier = psql("postgres", &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"));
    let check = "import sys, base64, hashlib, hmac\n\
                 pw, v = sys.argv[1], sys.argv[2]\n\
                 _, params, keys = v.split('$')\n\
                 it, salt = params.split(':')\n\
                 salted = hashlib.pbkdf2_hmac('sha256', pw.encode(), base64.b64decode(salt), int(it))\n\
                 client = hmac.new(salted, b'Client Key', 'sha256').digest()\n\
                 print(base64.b64encode(hashlib.sha256(client).digest()).decode() == keys.split(':')[0])\n";
    let out = Command::new("python3").args(["-c", check, password, &verifier]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim() == "True"
}

/// `nonstop -e ENV run -- SCRIPT` (through `sh -c`): its stdout.
fn run_in(app: &TestApp, env: &str, script: &str) -> String {
    let r = app.run(&["-e", env, "run", "--", script]);
    r.ok();
    r.stdout
}

fn var<'a>(vars: &'a [(String, String)], name: &str) -> Option<&'a str> {
    vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn environments_get_their_own_databases_and_env_create_from_copies_one() {
    let redis = PrivateRedis::start();
    let f = Fixture::new(
        &format!("postgres = \"postgres://postgres@127.0.0.1:5432/\"\nredis = \"{}\"", redis.url()),
        &["staging", "production", "review", "qa"],
    );
    let app = &f.app;
    app.run_with_timeout(&["-e", "staging", "deploy"], T).ok();
    app.run_with_timeout(&["-e", "production", "deploy"], T).ok();

    // Each environment its own database, owned by a role of its own.
    assert_eq!(f.get("staging", "/database"), (200, f.db("staging")));
    assert_eq!(f.get("production", "/database"), (200, f.db("production")));
    for env in ["staging", "production"] {
        let db = f.db(env);
        assert_eq!(
            psql("postgres", &format!("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{db}'")),
            db
        );
        assert_eq!(
            psql("postgres", &format!("SELECT rolcanlogin AND NOT rolsuper FROM pg_roles WHERE rolname = '{db}'")),
            "t"
        );
        // The release task created its table, as the environment's role.
        assert_eq!(psql(&db, "SELECT tableowner FROM pg_tables WHERE tablename = 'notes'"), db);
    }
    // The password is in the processes' environment, never in the state
    // directory; each environment has a Redis database of its own.
    let (staging, production) = (f.web_env("staging"), f.web_env("production"));
    let url = var(&staging, "DATABASE_URL").expect("DATABASE_URL");
    let password = url.split_once("://").unwrap().1.split_once('@').unwrap().0.split_once(':').unwrap().1.to_string();
    assert!(password.len() >= 20, "a generated password: {url}");
    assert_ne!(var(&production, "DATABASE_URL").unwrap(), url);
    let (r1, r2) = (var(&staging, "REDIS_URL").unwrap(), var(&production, "REDIS_URL").unwrap());
    assert!(r1.starts_with(&format!("{}/", redis.url())) && r2.starts_with(&format!("{}/", redis.url())), "{r1} {r2}");
    assert_ne!(r1, r2);
    assert_eq!(var(&staging, "REDIS_KEY_PREFIX"), Some(format!("{}:staging:", f.name).as_str()));
    for entry in std::fs::read_dir(app.home.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(password.len()).any(|w| w == password.as_bytes()),
                "the role's password is in {}",
                path.display()
            );
        }
    }

    // `nonstop run` gets the same: the generated password (decrypted by
    // the CLI itself; the role's, as PostgreSQL keeps it) and REDIS_URL;
    // its command reaches the database as the environment's role. The
    // daemon's run context has the URL without the password.
    assert!(password_is_the_roles(&f.db("staging"), &password), "the instances' password is the role's");
    assert_eq!(run_in(app, "staging", "printf %s \"$DATABASE_URL\""), url);
    assert_eq!(run_in(app, "staging", "printf %s \"$REDIS_URL\""), r1);
    assert_eq!(
        run_in(app, "staging", "psql \"$DATABASE_URL\" -X -tAc 'SELECT current_user || count(*) FROM notes'").trim(),
        format!("{}0", f.db("staging"))
    );
    let ctx = app.api_get(&format!("/v1/run-context?app={}&env=staging", f.name));
    assert!(ctx.contains(&format!("postgres://{0}@127.0.0.1:5432/{0}", f.db("staging"))), "{ctx}");
    assert!(!ctx.contains(&password) && !ctx.contains("REDIS_URL"), "the run context holds a secret: {ctx}");

    // A second deploy of staging goes through the migration gate, run by
    // the environment's own role on its scratch copy.
    std::fs::write(app.dir.path().join("VERSION"), "2\n").unwrap();
    let deploy = app.run_with_timeout(&["-e", "staging", "deploy"], T);
    deploy.ok();
    assert!(deploy.stdout.contains("migration gate") || deploy.stderr.contains("migration gate"), "{}", deploy.stdout);

    // Staging's data, copied into a new environment that runs the same
    // release (not built again).
    psql(&f.db("staging"), "INSERT INTO notes (title) VALUES ('from staging')");
    std::fs::write(app.dir.path().join("VERSION"), "3\n").unwrap();
    let create = app.run_with_timeout(&["env", "create", "review", "--from", "staging"], T);
    create.ok();
    let said = format!("{}{}", create.stdout, create.stderr);
    assert!(said.contains("pg_dump | psql"), "{said}");
    assert!(said.contains(&format!("serving review on http://{}", f.host("review"))), "{said}");
    assert_eq!(f.get("review", "/database"), (200, f.db("review")));
    let review_db = f.db("review");
    assert_eq!(psql(&review_db, "SELECT title FROM notes"), "from staging");
    assert_eq!(psql(&review_db, "SELECT tableowner FROM pg_tables WHERE tablename = 'notes'"), review_db);
    let release = |env: &str| -> u64 {
        let st = app.run(&["-e", env, "status", "--json"]);
        serde_json::from_str::<serde_json::Value>(&st.stdout).unwrap()["release"].as_u64().unwrap()
    };
    assert_eq!(release("review"), release("staging"), "the release staging runs");
    let list = app.run(&["env", "list", "--json"]);
    list.ok();
    assert!(list.stdout.contains("\"review\""), "{}", list.stdout);
    let again = app.run(&["env", "create", "review"]);
    assert_eq!(again.code, 3, "an existing environment is refused: {}", again.stderr);

    // Protected: refused, nothing stopped.
    let refused = app.run(&["env", "destroy", "production"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("protected"), "{}", refused.stderr);
    assert_eq!(f.get("production", "/database"), (200, f.db("production")));

    // Review gets a secret, config, and Redis data of its own.
    let mut set = app.cmd(&["-e", "review", "secrets", "set", "API_TOKEN"]);
    set.stdin(std::process::Stdio::piped());
    let mut child = set.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"tok-review-e2e-5b1c").unwrap();
    assert!(wait_output(child, T, "secrets set").status.success());
    app.note_daemon();
    app.run_with_timeout(&["-e", "review", "config", "set", "GREETING=from-config"], T).ok();
    assert_eq!(var(&f.web_env("review"), "API_TOKEN"), Some("tok-review-e2e-5b1c"));
    assert_eq!(var(&f.web_env("review"), "GREETING"), Some("from-config"));
    let review_redis = var(&f.web_env("review"), "REDIS_URL").unwrap().to_string();
    let number: u8 = review_redis.rsplit('/').next().unwrap().parse().unwrap();
    assert_eq!(run_in(app, "review", "redis-cli -u \"$REDIS_URL\" SET e2e-key kept").trim(), "OK");

    // Destroyed: stopped, its host now reaches the default environment,
    // no longer listed; its secrets and config go, its database and Redis
    // data stay (the number reserved for the name).
    let wrong = app.run(&["env", "destroy", "review", "--drop-database", "nope"]);
    assert_eq!(wrong.code, 2, "{}", wrong.stderr);
    assert!(wrong.stderr.contains(&format!("type `{review_db}`")), "{}", wrong.stderr);
    let destroy = app.run(&["env", "destroy", "review"]);
    destroy.ok();
    assert!(destroy.stdout.contains("its secrets and config removed"), "{}", destroy.stdout);
    assert!(destroy.stdout.contains(&format!("database {review_db} kept")), "{}", destroy.stdout);
    let kept = format!("Redis database {number} on 127.0.0.1:{} kept with its data, reserved for `review`", redis.port);
    assert!(destroy.stdout.contains(&kept), "{}", destroy.stdout);
    assert_eq!(f.get("review", "/database"), (200, f.db("production")), "the default environment answers now");
    let list = app.run(&["env", "list", "--json"]);
    assert!(!list.stdout.contains("\"review\""), "{}", list.stdout);
    assert!(f.exists("database", &review_db) && f.exists("role", &review_db));
    assert_eq!(redis.cli(number, &["GET", "e2e-key"]), "kept");

    // Created again: its kept database and Redis data, neither its
    // secrets nor its config.
    app.run_with_timeout(&["env", "create", "review"], T).ok();
    assert_eq!(psql(&review_db, "SELECT title FROM notes"), "from staging", "the kept database is used again");
    let again = f.web_env("review");
    assert_eq!(var(&again, "API_TOKEN"), None, "the secret did not come back");
    assert_eq!(var(&again, "GREETING"), Some("hello"), "the config did not come back");
    assert_eq!(var(&again, "REDIS_URL"), Some(review_redis.as_str()));
    assert_eq!(run_in(app, "review", "redis-cli -u \"$REDIS_URL\" GET e2e-key").trim(), "kept");

    // Destroyed with its database: dropped, its Redis database emptied and
    // its number free for the next environment.
    let destroy = app.run(&["env", "destroy", "review", "--drop-database", &review_db]);
    destroy.ok();
    assert!(destroy.stdout.contains(&format!("database {review_db} dropped")), "{}", destroy.stdout);
    assert!(
        destroy
            .stdout
            .contains(&format!("Redis database {number} on 127.0.0.1:{} emptied (1 keys) and freed", redis.port)),
        "{}",
        destroy.stdout
    );
    assert!(!f.exists("database", &review_db) && !f.exists("role", &review_db));
    assert_eq!(redis.cli(number, &["DBSIZE"]), "0");
    assert_eq!(f.get("staging", "/database"), (200, f.db("staging")), "staging serves on");
    app.run_with_timeout(&["env", "create", "qa"], T).ok();
    assert_eq!(var(&f.web_env("qa"), "REDIS_URL"), Some(review_redis.as_str()), "the number was freed");
}

#[test]
fn a_destroy_that_fails_half_way_is_finished_by_the_next() {
    let mut redis = PrivateRedis::start();
    let f = Fixture::new(
        &format!("postgres = \"postgres://postgres@127.0.0.1:5432/\"\nredis = \"{}\"", redis.url()),
        &["staging", "review"],
    );
    let app = &f.app;
    app.run_with_timeout(&["env", "create", "review"], T).ok();
    let review_db = f.db("review");
    assert!(f.exists("database", &review_db));

    // The Redis server is gone: the database is dropped, then the destroy
    // stops, saying how to finish it.
    redis.stop();
    let destroy = app.run(&["env", "destroy", "review", "--drop-database", &review_db]);
    assert_eq!(destroy.code, 2, "{}\n{}", destroy.stdout, destroy.stderr);
    assert!(destroy.stderr.contains("removing its Redis data failed"), "{}", destroy.stderr);
    assert!(destroy.stderr.contains("run `nonstop env destroy review` again"), "{}", destroy.stderr);
    assert!(!f.exists("database", &review_db), "dropped before the failure");
    let list = app.run(&["env", "list", "--json"]);
    assert!(list.stdout.contains("\"review\""), "kept until finished: {}", list.stdout);
    // Nothing else is done there meanwhile.
    let deploy = app.run_with_timeout(&["-e", "review", "deploy"], T);
    assert_eq!(deploy.code, 3, "{}", deploy.stderr);
    assert!(deploy.stderr.contains("is being destroyed"), "{}", deploy.stderr);

    // The server back: the next destroy, without --drop-database, finishes
    // the drop that was confirmed.
    let redis = PrivateRedis::on(redis.port);
    let destroy = app.run(&["env", "destroy", "review"]);
    destroy.ok();
    let said = format!("{}{}", destroy.stdout, destroy.stderr);
    assert!(said.contains("finishing the destroy") && said.contains("(with --drop-database)"), "{said}");
    assert!(destroy.stdout.contains("on 127.0.0.1:") && destroy.stdout.contains("emptied"), "{}", destroy.stdout);
    assert!(destroy.stdout.contains(&format!("database {review_db} was not there")), "{}", destroy.stdout);
    let list = app.run(&["env", "list", "--json"]);
    assert!(!list.stdout.contains("\"review\""), "{}", list.stdout);
    drop(redis);
}

#[test]
fn an_unreachable_base_is_a_clear_error_and_nothing_starts() {
    let f = Fixture::new("postgres = \"postgres://postgres@127.0.0.1:1/\"", &["staging", "broken"]);
    let app = &f.app;
    let create = app.run_with_timeout(&["env", "create", "broken"], T);
    assert_eq!(create.code, 2, "{}{}", create.stdout, create.stderr);
    assert!(
        create.stderr.contains("cannot reach the PostgreSQL server at 127.0.0.1:1")
            && create.stderr.contains("before anything"),
        "{}",
        create.stderr
    );
    let deploy = app.run_with_timeout(&["-e", "staging", "deploy"], T);
    assert_eq!(deploy.code, 2, "{}", deploy.stderr);
    assert!(deploy.stderr.contains("[base] postgres"), "{}", deploy.stderr);
    let list = app.run(&["env", "list", "--json"]);
    list.ok();
    assert_eq!(list.stdout.trim(), "[]", "nothing was created");
    let releases = std::fs::read_dir(app.home.path().join("releases")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(releases, 0, "nothing was built");
    assert!(!f.exists("database", &f.db("broken")));
    assert!(!app.home.path().join("secrets.key").exists(), "no key was made for nothing");
}
