//! The command line, declared with clap. `--help` is the first manual a
//! user reads: every command says what it does and shows an example.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "nonstop",
    version,
    about = "Keep a 12-factor web app running and deploying with zero downtime",
    long_about = "nonstop runs the processes of a 12-factor app (web, workers, a scheduler) described in \
nonstop.toml, behind its own health-checking load balancer. Killed instances come back by themselves; \
restarts are rolling and drop no request.\n\nStart with `nonstop init` in an app directory (it reads a \
Procfile if there is one), then `nonstop up`.",
    after_help = "Exit codes: 0 success, 1 the operation failed, 2 bad input (spec, flags), 3 conflict \
(daemon not running, another operation in progress, another app).\n\nEnvironment: NONSTOP_HOME (state \
directory, default ~/.local/share/nonstop), NONSTOP_ENV (as -e/--env), NONSTOP_APP (as --app), NONSTOP_PROXY_LISTEN (overrides [proxy] listen), NONSTOP_LOG \
(daemon log filter, e.g. debug)."
)]
pub struct Cli {
    /// State directory: database, logs, the daemon's socket.
    #[arg(long, global = true, env = "NONSTOP_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// The environment a command is about (default: the spec's
    /// `environment`, else the daemon's default).
    /// `NONSTOP_ENV` when not given (read apart, so that errors name which).
    #[arg(short = 'e', long = "env", global = true, value_name = "ENV")]
    pub env: Option<String>,

    /// The app a command is about, when the daemon runs several (default:
    /// the environment's one app).
    #[arg(long = "app", global = true, env = "NONSTOP_APP", value_name = "APP")]
    pub app: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented nonstop.toml, from the Procfile if there is one.
    #[command(after_help = "Example:\n  cd myapp && nonstop init && $EDITOR nonstop.toml && nonstop up")]
    Init {
        /// Overwrite an existing nonstop.toml.
        #[arg(long)]
        force: bool,
        /// App name (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Start the daemon if needed and run the app as nonstop.toml says.
    ///
    /// Waits until every instance is ready (web: passing health checks). On a
    /// running app, applies the changes: counts are scaled, changed process
    /// types are replaced with a rolling restart.
    #[command(
        after_help = "Examples:\n  nonstop up\n  nonstop up --file deploy/nonstop.toml\n  NONSTOP_PROXY_LISTEN=127.0.0.1:9000 nonstop up"
    )]
    Up {
        /// The spec file.
        #[arg(long, short = 'f', default_value = "nonstop.toml")]
        file: PathBuf,
        /// Print progress and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Stop every instance gracefully (drain, stop signal, SIGKILL after
    /// stop_timeout), then the daemon. Whatever else still runs from the
    /// records under $NONSTOP_HOME/instances (instances a lost or damaged
    /// store no longer knows, tasks) is stopped too: SIGTERM, SIGKILL after
    /// 10s.
    Down {
        /// Print progress and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Run nonstop in the foreground (`up` starts it in the background for
    /// you).
    ///
    /// This process is the keeper: it runs the proxy (the data plane:
    /// listeners, client connections, health checks, static files, TLS)
    /// and starts the daemon proper (the control plane: engine, API, store)
    /// as its child, which drives the proxy over $NONSTOP_HOME/plane.sock.
    /// When the daemon dies (SIGKILL, OOM, a crash), no request is lost:
    /// the proxy goes on serving, the keeper starts a new daemon at once
    /// (API requests wait in the backlog meanwhile), and it re-adopts the
    /// running app and resyncs with the proxy. SIGTERM/SIGINT stop the
    /// daemon (the app keeps running), then the keeper (requests in flight
    /// finish); SIGUSR2 upgrades the daemon in place (not the keeper).
    ///
    /// Exits with code 2, before binding anything, when it refuses its
    /// state directory (an unsafe NONSTOP_HOME, a damaged or lost store:
    /// see `nonstop doctor`); 1 for other failures.
    #[command(
        after_help = "Examples:\n  nonstop daemon                 # in the foreground, e.g. under systemd\n  nonstop daemon --no-keeper     # when something else restarts it"
    )]
    Daemon {
        /// Also serve the API on this TCP address; requests need the token
        /// in $NONSTOP_HOME/api-token.
        #[arg(long, env = "NONSTOP_API_LISTEN", value_name = "ADDR")]
        api_listen: Option<std::net::SocketAddr>,
        /// Where the web dashboard listens (`nonstop dashboard` prints its
        /// address with a login token): a loopback address (127.0.0.1:PORT,
        /// [::1]:PORT; it is plain HTTP), or `off`. Default: a free port on
        /// 127.0.0.1, kept across daemon restarts by the keeper and across
        /// upgrades.
        #[arg(long, env = "NONSTOP_DASHBOARD_LISTEN", value_name = "ADDR|off")]
        dashboard_listen: Option<DashboardListen>,
        /// Proxy worker threads, unless the running app's stored spec sets
        /// `[proxy] workers` (that wins). Default: one per core. `up` and
        /// `deploy` pass the value of the spec they bring when they start
        /// the daemon.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
        proxy_workers: Option<u32>,
        /// Run the daemon in this process, with the proxy, without a
        /// keeper: if it dies, its connections die with it, nothing holds
        /// the listening sockets, and nothing starts it again.
        #[arg(long)]
        no_keeper: bool,
    },
    /// Show every instance: process, pid, port, state, health, restarts, uptime.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change instance counts and wait until done.
    #[command(after_help = "Examples:\n  nonstop scale web=4\n  nonstop scale web=2 worker=3")]
    Scale {
        /// PROCESS=COUNT pairs.
        #[arg(required = true, value_name = "PROCESS=COUNT")]
        counts: Vec<String>,
        /// Print progress and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Run a one-off command with the app's environment (like `heroku run`);
    /// its exit code becomes nonstop's.
    #[command(
        after_help = "Examples:\n  nonstop run -- python manage.py createsuperuser\n  nonstop run -- 'python manage.py shell -c \"print(1)\"'\n  nonstop run --release v3 -- python manage.py migrate notes 0004"
    )]
    Run {
        /// Run with the code and config of this retained release (`v3` or
        /// `3`) instead of the current one, e.g. to reverse its migration.
        #[arg(long, value_name = "vN")]
        release: Option<String>,
        /// The command. One argument is run with `sh -c`; several are run as they are.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Show the app's logs, merged and timestamped.
    #[command(after_help = "Examples:\n  nonstop logs\n  nonstop logs -f web\n  nonstop logs --tail 1000 worker")]
    Logs {
        /// Only this process type.
        process: Option<String>,
        /// Keep printing new lines.
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many past lines.
        #[arg(long, short = 'n')]
        tail: Option<usize>,
        /// Print each line as a JSON object (ts, instance, generation, stream, text).
        #[arg(long)]
        json: bool,
    },
    /// Rolling restart of one process type or all: a new instance is healthy
    /// before an old one is drained and stopped; singletons never overlap.
    Restart {
        process: Option<String>,
        /// Print progress and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Build an immutable release of this directory and roll it out with
    /// zero downtime.
    ///
    /// Steps: snapshot the directory (honouring .gitignore and
    /// .nonstopignore) and run the `build` commands once; run `[release]
    /// tasks` (migrations) once; replace the instances process type by
    /// process type (web, workers, singletons); run `[release] post_tasks`.
    /// A failing build or task changes nothing; new instances that do not
    /// become healthy are removed and the previous release keeps serving.
    #[command(
        after_help = "Examples:\n  nonstop deploy -m 'fix the login page'\n  nonstop deploy --wait --json    # in CI: wait for a running deploy, print JSON events\n\nExit code 0 only when the new release is live."
    )]
    Deploy {
        /// A note for the history.
        #[arg(long, short = 'm')]
        message: Option<String>,
        /// The spec file (its directory is what gets deployed).
        #[arg(long, short = 'f', default_value = "nonstop.toml")]
        file: PathBuf,
        /// If another deployment is running, wait for it instead of failing.
        #[arg(long)]
        wait: bool,
        /// When the content is that of a retained release (which is then
        /// rolled to without building), run its `[release] tasks` again.
        #[arg(long)]
        run_tasks: bool,
        /// When the migration gate finds that the release tasks break the
        /// running release (a dropped or renamed column…), ship it anyway
        /// through the maintenance fallback: maintenance on, the old release
        /// stopped, the tasks run, the new release started, maintenance off.
        /// The app is down meanwhile.
        #[arg(long)]
        allow_breaking: bool,
        /// Print progress events and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Roll back to the previous release (or the one given) with the same
    /// rolling mechanics; nothing is rebuilt.
    #[command(after_help = "Examples:\n  nonstop rollback\n  nonstop rollback v3\n  nonstop rollback v3 --run-tasks")]
    Rollback {
        /// A retained release (`v3` or `3`); default: the one before the current.
        release: Option<String>,
        /// Run `[release] tasks` of that release again.
        #[arg(long)]
        run_tasks: bool,
        /// Roll back even to a release that expects a database schema the
        /// database no longer has (a later migration dropped or renamed
        /// what it uses); without it such a rollback is refused.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        wait: bool,
        /// Print progress events and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Stop the deploy, rollback or rolling restart in progress. A deploy
    /// still building or running its release tasks ends with nothing
    /// changed (the running command is killed); one that is already rolling
    /// rolls back to the release that ran before; post tasks are stopped
    /// and the release stays live; a rolling restart keeps the instances
    /// that ran before. Returns at once; the operation's own command
    /// reports how it ended.
    #[command(after_help = "Examples:\n  nonstop cancel\n  nonstop cancel --reason \"wrong branch\"")]
    Cancel {
        /// Why, in one line (at most 200 characters): recorded with your
        /// name in the events and in the deployment's history.
        #[arg(long, short = 'm')]
        reason: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Maintenance mode: every request to the app (static files included)
    /// gets 503 with a page and Retry-After, except from the addresses you
    /// allow; instances keep running and keep being health-checked.
    ///
    /// Switching is immediate: every request that starts after the command
    /// returns sees it, on connections already open too; requests in flight
    /// finish. The setting is stored before it applies and survives daemon
    /// restarts and upgrades. `nonstop status` shows it.
    #[command(
        after_help = "Examples:\n  nonstop maintenance on\n  nonstop maintenance on --page maintenance.html --allow 203.0.113.7 10.0.0.0/8\n  nonstop maintenance on --retry-after 600\n  nonstop maintenance off"
    )]
    Maintenance {
        #[command(subcommand)]
        switch: MaintenanceSwitch,
    },
    /// Stop the app on purpose: maintenance on, then every process scaled to
    /// zero gracefully (web drained, workers get their stop signal and
    /// stop_timeout to finish their current job); the counts are remembered.
    ///
    /// The daemon and the proxy keep running, and a daemon restart keeps the
    /// app stopped. While stopped, `up`, `deploy`, `rollback`, `scale` and
    /// `restart` are refused: `nonstop start` first. `status` shows the app
    /// as stopped (not failed). Stopping a stopped app changes nothing.
    #[command(after_help = "Examples:\n  nonstop stop\n  nonstop stop && pg_dump mydb > backup.sql && nonstop start")]
    Stop {
        /// Print progress and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped app: the remembered counts come back, and maintenance
    /// goes off once every web instance is healthy (if `stop` turned it on;
    /// maintenance you turned on yourself stays on).
    ///
    /// If an instance does not become healthy within its health_timeout,
    /// start fails and the app stays in maintenance (maintenance goes off by
    /// itself once web is healthy: fix it with a deploy or a restart, which
    /// work again once the app is started). Starting an app that is not
    /// stopped changes nothing.
    #[command(after_help = "Example:\n  nonstop start")]
    Start {
        /// Print progress and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Secrets: values the app's processes get as environment variables
    /// that must not sit in nonstop.toml (passwords, tokens, keys).
    ///
    /// Values are encrypted (XChaCha20-Poly1305) in the state database with
    /// the key in $NONSTOP_HOME/secrets.key (created by the first `set`; back
    /// it up apart from the state directory) or NONSTOP_SECRETS_KEY in the
    /// daemon's environment. Each secret belongs to the app and environment
    /// (-e) it was set for, and goes into the environment of every instance
    /// and every release and post task, nowhere else: never into status,
    /// events, history or logs nonstop writes. A change takes effect at the
    /// next `nonstop deploy` or `nonstop restart`. The app is the one --app
    /// names, else the one of ./nonstop.toml, else the environment's one app.
    #[command(
        after_help = "Examples:\n  printf %s \"$STRIPE_KEY\" | nonstop secrets set STRIPE_KEY\n  nonstop secrets set DATABASE_URL -e staging      # prompts, input hidden\n  nonstop secrets set TLS_KEY --from-file key.pem\n  nonstop secrets list\n  nonstop secrets unset STRIPE_KEY"
    )]
    Secrets {
        #[command(subcommand)]
        action: SecretsAction,
    },
    /// Roll out, in one environment, exactly the release another runs: the
    /// same code (same content hash, same release directory: nothing is
    /// hashed or built), with the target's spec from nonstop.toml, its
    /// config and secrets, through its migration gate, canary and release
    /// tasks. A rollback in the target goes back to the target's own
    /// previous release and config. Refused when the source runs nothing,
    /// is in the middle of a deployment, or its release is no longer on
    /// disk, and when nonstop.toml's build, release tasks or process
    /// commands changed since that release was built.
    #[command(after_help = "Examples:
  nonstop promote --from staging --to production
  nonstop promote --from staging --to production -m 'release 2024-06' --wait --json

Exit code 0 only when the release is live in the target.")]
    Promote(crate::promote::PromoteArgs),
    /// Config: plain variables of an environment, over nonstop.toml's
    /// `[env]`, changed without a deploy. A change is a new release of the
    /// running build (nothing rebuilt) rolled out with zero downtime;
    /// later deploys and promotions keep it; a rollback brings back the
    /// config of the release it goes to. Credentials belong in `nonstop
    /// secrets`.
    #[command(after_help = "Examples:
  nonstop config set GREETING=hello
  nonstop config get -e production
  nonstop config unset GREETING")]
    Config {
        #[command(subcommand)]
        action: crate::config::ConfigAction,
    },
    /// Deployments: release, status, duration, who; with an ID, that
    /// deployment's timeline (phases, gate verdicts, rollbacks, outcome).
    #[command(
        after_help = "Examples:\n  nonstop history\n  nonstop history 7          # deployment #7, step by step\n  nonstop history --json"
    )]
    History {
        /// A deployment (the ID column, with or without `#`): print it with
        /// its timeline.
        #[arg(value_name = "ID", value_parser = parse_deployment_id)]
        id: Option<i64>,
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// Print the deployments as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Environments: each app and environment this daemon runs.
    #[command(
        after_help = "Examples:\n  nonstop env list\n  nonstop env create review --from staging\n  nonstop env destroy review\n  nonstop -e staging status\n  NONSTOP_ENV=staging nonstop deploy"
    )]
    Env {
        #[command(subcommand)]
        command: EnvCommand,
    },
    /// Current metrics per process type, each with a sparkline of the
    /// last 5 minutes: requests/s, latency p50/p95/p99, responses by
    /// class, upstream errors, static hits, CPU %, memory, instances.
    #[command(after_help = "Examples:\n  nonstop metrics\n  nonstop metrics -e staging web\n  nonstop metrics --json")]
    Metrics {
        /// Only this process type.
        process: Option<String>,
        /// Print the daemon's JSON report (rates per second, totals, recent points).
        #[arg(long)]
        json: bool,
    },
    /// Open the web dashboard: prints its address with a single-use login
    /// token (valid for 2 minutes); the browser that opens it gets a
    /// session cookie for 12 hours. Environments, processes and instances
    /// with their health, deployments with their timelines, live charts
    /// with deploys and scaling decisions marked, maintenance on and off.
    #[command(
        after_help = "Examples:\n  nonstop dashboard\n  nonstop dashboard --open\n  nonstop -e staging dashboard --json\n\nThe daemon serves it on 127.0.0.1 (a free port, or --dashboard-listen / NONSTOP_DASHBOARD_LISTEN of `nonstop daemon`)."
    )]
    Dashboard {
        /// Also open it in the desktop's browser (`xdg-open`).
        #[arg(long)]
        open: bool,
        /// Print the address and login link as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Releases kept on disk; the current one is marked.
    Releases {
        /// Print the releases as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recent events: starts, exits, health changes, operations.
    Events {
        #[arg(long, short = 'n', default_value_t = 50)]
        limit: usize,
        /// Print the events as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restart the daemon from the binary now on disk without dropping a
    /// request: the listening sockets are handed to the new daemon, the app's
    /// instances keep running and are re-adopted, the old daemon finishes its
    /// in-flight requests. Same as `kill -USR2 $(cat $NONSTOP_HOME/daemon.pid)`
    /// or `systemctl reload nonstop`.
    #[command(after_help = "Example:\n  cargo build --release && nonstop upgrade")]
    Upgrade {
        /// Print the result (old and new pid and version) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the state directory, and repair a damaged or lost store.
    ///
    /// Checks NONSTOP_HOME (owned by you, not writable by group or others,
    /// no symbolic links among its state files), the store (state.db: a
    /// whole SQLite database that passes its integrity check), its backup
    /// (state.db.backup, which the daemon refreshes within 10s of every
    /// change), and the records under instances/: what still runs, and
    /// whether the store knows it. Exit code 0 when nothing is wrong, 1
    /// otherwise.
    ///
    /// With --repair (refused while a daemon runs; owners and modes are
    /// never changed, doctor prints the command to run): a damaged or lost
    /// store is kept aside as state.db.damaged-<time>. If the backup is
    /// usable it is restored and the daemon started: it takes over the
    /// running instances the backup knows and stops (and replaces) the
    /// others. Without a usable backup, every instance and task still
    /// running is stopped cleanly (SIGTERM, SIGKILL after 10s) instead of
    /// being left unmanaged, a fresh store is created, releases/ is set
    /// aside as releases.lost-<time>, and you run `nonstop up` again. With
    /// a healthy store, --repair only stops instances the store does not
    /// know.
    #[command(after_help = "Examples:\n  nonstop doctor\n  nonstop doctor --repair\n  nonstop doctor --json")]
    Doctor {
        /// Repair what can be repaired (see above).
        #[arg(long)]
        repair: bool,
        /// Print the findings (and what was repaired) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions.
    #[command(after_help = "Example:\n  nonstop completions bash > /etc/bash_completion.d/nonstop")]
    Completions { shell: clap_complete::Shell },
}

/// `nonstop secrets set|unset|list`.
#[derive(Debug, Subcommand)]
pub enum SecretsAction {
    /// Set a secret: a new version of NAME for the app and environment.
    ///
    /// The value is read from stdin (one trailing newline removed, so
    /// `echo "$V" |` works), or from --from-file (the file's bytes as they
    /// are), or, when stdin is a terminal, typed at a prompt that does not
    /// echo. Never from the command line: shell history and `ps` would show
    /// it. At most 64 KiB of UTF-8 text without NUL bytes. NAME is the
    /// variable's name: uppercase letters, digits and '_', not starting with
    /// a digit, not NONSTOP_* or PORT. Takes effect at the next `nonstop
    /// deploy` or `nonstop restart`.
    #[command(
        after_help = "Examples:\n  printf %s \"$STRIPE_KEY\" | nonstop secrets set STRIPE_KEY\n  nonstop secrets set STRIPE_KEY            # prompts, input hidden\n  nonstop secrets set TLS_KEY --from-file key.pem -e production"
    )]
    Set {
        /// The secret's name, which is the environment variable's.
        name: String,
        /// Read the value from this file instead of stdin.
        #[arg(long, value_name = "PATH")]
        from_file: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// A value given here is refused (shell history, ps).
        #[arg(hide = true, trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Unset a secret: the app's processes no longer get it from the next
    /// deploy or restart on. Its history (who set which version when) is
    /// kept.
    #[command(after_help = "Example:\n  nonstop secrets unset STRIPE_KEY")]
    Unset {
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The secrets that are set: name, version, when and by whom. Never
    /// their values.
    #[command(after_help = "Examples:\n  nonstop secrets list\n  nonstop secrets list -e production --json")]
    List {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `nonstop maintenance on|off`.
#[derive(Debug, Subcommand)]
pub enum MaintenanceSwitch {
    /// Turn maintenance on (or, if it is on, replace its page, allow list
    /// and Retry-After).
    #[command(
        after_help = "Examples:\n  nonstop maintenance on\n  nonstop maintenance on --page maintenance.html --allow 203.0.113.7 10.0.0.0/8 --retry-after 600"
    )]
    On {
        /// An HTML file (UTF-8, at most 1 MiB) to serve instead of the
        /// built-in page; a relative path is from the current directory.
        /// Its contents are stored: later edits to the file need another
        /// `maintenance on`.
        #[arg(long, value_name = "FILE")]
        page: Option<PathBuf>,
        /// Addresses or CIDR networks that reach the app as usual (e.g. your
        /// office, to check the site before opening it). The client address
        /// is the TCP peer's; behind a proxy listed in [proxy]
        /// trusted_proxies, the last address of its X-Forwarded-For.
        #[arg(long, value_name = "ADDR|CIDR", num_args = 1..)]
        allow: Vec<String>,
        /// Retry-After in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        retry_after: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Turn maintenance off: requests reach the app again.
    Off {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Each app and environment with its release, instances and URLs.
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create an environment in one command and wait until it serves.
    ///
    /// Deploys this directory's nonstop.toml resolved for NAME (an
    /// environment the file does not name gets the file's spec and the host
    /// NAME.APP.localhost); with --from ENV, the release ENV runs instead,
    /// not built again, with NAME's config. With [base] postgres, NAME first
    /// gets a database and role of its own (APP_NAME), a copy of ENV's with
    /// --from; with [base] redis, a Redis database of its own. Refused if
    /// NAME exists (even down).
    #[command(
        after_help = "Examples:\n  nonstop env create pr-42\n  nonstop env create review --from staging\n  nonstop env create qa -f deploy/nonstop.toml --json"
    )]
    Create {
        /// The new environment: 1 to 32 lowercase letters, digits and '-',
        /// starting with a letter.
        name: String,
        /// Start with the release this environment runs (and a copy of its
        /// database, with [base] postgres).
        #[arg(long, value_name = "ENV")]
        from: Option<String>,
        /// The spec file (its directory is what gets deployed).
        #[arg(long, short = 'f', default_value = "nonstop.toml")]
        file: PathBuf,
        /// Print progress events and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Stop an environment and forget it: every instance stopped, its
    /// routes and hosts released, its secrets and config removed. Its
    /// history and releases stay, and its database and Redis data (its
    /// Redis number reserved for the name) too unless --drop-database
    /// names the database again. A `protected = true` environment is
    /// refused; one whose destroy failed half way is finished by running
    /// the command again.
    #[command(
        after_help = "Examples:\n  nonstop env destroy pr-42\n  nonstop env destroy pr-42 --drop-database hello_pr_42__3f9a1c0b2e"
    )]
    Destroy {
        /// The environment to destroy.
        name: String,
        /// Drop its database and role too (on the [base] postgres server),
        /// and remove its Redis data (its database on [base] redis emptied
        /// and its number freed; in the shared database 0, its keys):
        /// type the database's name, as `env create` and `status` show it.
        #[arg(long, value_name = "DATABASE")]
        drop_database: Option<String>,
        /// The spec file ([base] and `protected` are read from it).
        #[arg(long, short = 'f', default_value = "nonstop.toml")]
        file: PathBuf,
        /// Print progress events and the result as JSON lines.
        #[arg(long)]
        json: bool,
    },
}

/// Where the daemon serves the web dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DashboardListen {
    Off,
    At(std::net::SocketAddr),
}

impl Default for DashboardListen {
    /// A free port on the loopback address.
    fn default() -> Self {
        DashboardListen::At(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

impl std::str::FromStr for DashboardListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(DashboardListen::Off);
        }
        let addr: std::net::SocketAddr = s
            .parse()
            .map_err(|_| format!("`{s}` is not an address such as 127.0.0.1:8900 (or `off` for no dashboard)"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "`{s}` is not a loopback address: the dashboard is plain HTTP and its login links carry tokens, so \
                  it listens on this machine only; use 127.0.0.1:PORT (or [::1]:PORT), and from another machine \
                  reach it through an SSH tunnel (`ssh -L PORT:127.0.0.1:PORT HOST`, the same PORT on both ends), \
                 or `off` for no dashboard"
            ));
        }
        Ok(DashboardListen::At(addr))
    }
}

impl std::fmt::Display for DashboardListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DashboardListen::Off => f.write_str("off"),
            DashboardListen::At(a) => write!(f, "{a}"),
        }
    }
}

/// `7` or `#7`: a deployment's ID as `nonstop history` shows it.
fn parse_deployment_id(s: &str) -> Result<i64, String> {
    s.strip_prefix('#').unwrap_or(s).parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        format!("`{s}` is not a deployment ID: give the number of the ID column of `nonstop history`, e.g. 7")
    })
}

#[cfg(test)]
mod dashboard_listen_tests {
    use super::DashboardListen;
    use proptest::prelude::*;

    #[test]
    fn off_and_loopback_addresses_are_taken_others_refused_naming_why_and_the_fix() {
        assert_eq!("off".parse::<DashboardListen>(), Ok(DashboardListen::Off));
        assert_eq!("OFF".parse::<DashboardListen>(), Ok(DashboardListen::Off));
        for ok in ["127.0.0.1:8900", "127.0.0.1:0", "127.1.2.3:80", "[::1]:8900"] {
            assert_eq!(ok.parse::<DashboardListen>().map(|l| l.to_string()), Ok(ok.to_string()));
        }
        for bad in ["0.0.0.0:8900", "[::]:8900", "192.168.1.2:8900", "[2001:db8::1]:80"] {
            let e = bad.parse::<DashboardListen>().unwrap_err();
            assert!(
                e.contains("not a loopback address") && e.contains("127.0.0.1:PORT") && e.contains("ssh -L"),
                "{e}"
            );
        }
        assert!("localhost:8900".parse::<DashboardListen>().unwrap_err().contains("not an address"));
    }

    proptest! {
        #[test]
        fn an_ipv4_address_is_taken_exactly_when_it_is_loopback(ip in any::<[u8; 4]>(), port in any::<u16>()) {
            let addr = std::net::SocketAddr::from((ip, port));
            let parsed = addr.to_string().parse::<DashboardListen>();
            prop_assert_eq!(parsed.is_ok(), ip[0] == 127);
            if let Ok(l) = parsed {
                prop_assert_eq!(l, DashboardListen::At(addr));
            }
        }
    }
}
