//! `nonstop promote --from ENV --to ENV`: the client side.
//!
//! The target environment's spec is resolved here from `nonstop.toml`
//! (`SpecSet::resolve`), as `deploy` does, and checked before the daemon is
//! asked; the daemon finds the release the source runs and the target
//! rolls it out (see `nonstop_engine`'s `promote.rs`).

use crate::commands::{
    client_for, print_spec_errors, run_op_waiting, say_serving, scoped_app, warn_plain_credentials, who,
};
use crate::home::Home;
use nonstop_api::config::PromoteRequest;
use std::path::PathBuf;

/// `nonstop promote`.
#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    /// The environment whose running release is promoted.
    #[arg(long, value_name = "ENV")]
    pub from: String,
    /// The environment that gets it (its spec, config, secrets, gates and
    /// release tasks).
    #[arg(long, value_name = "ENV")]
    pub to: String,
    /// A note for the history (default: "promoted from ENV").
    #[arg(long, short = 'm')]
    pub message: Option<String>,
    /// The spec file the target's spec is read from.
    #[arg(long, short = 'f', default_value = "nonstop.toml")]
    pub file: PathBuf,
    /// If another operation is running in the target, wait for it instead
    /// of failing.
    #[arg(long)]
    pub wait: bool,
    /// Print progress events and the result as JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// Bad input: said, nothing sent; exit code 2.
fn refuse(message: &str, json: bool) -> i32 {
    if json {
        crate::commands::emit(&serde_json::json!({"type": "error", "exit_code": 2, "message": message}).to_string());
    } else {
        eprintln!("error: {message}");
    }
    2
}

pub(crate) async fn promote(home: &Home, env_flag: Option<&str>, args: PromoteArgs) -> anyhow::Result<i32> {
    let PromoteArgs { from, to, message, file, wait, json } = args;
    let set = match nonstop_spec::load_set(&file) {
        Ok(s) => s,
        Err(errors) => {
            print_spec_errors(&file, &errors, json);
            return Ok(2);
        }
    };
    let app = set.app().to_string();
    if let Some(named) = scoped_app().filter(|a| *a != app) {
        return Ok(refuse(
            &format!(
                "--app {named} (or NONSTOP_APP) names another app than {} ({app}); drop it, or run the command in \
                 {named}'s directory",
                file.display()
            ),
            json,
        ));
    }
    let name = |given: &str, flag: &str| {
        nonstop_core::environment::environment_name(given.trim())
            .map_err(|e| format!("--{flag} names an invalid environment {given:?}: {}", e.rule))
    };
    let (from, to) = match (name(&from, "from"), name(&to, "to")) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return Ok(refuse(&e, json)),
    };
    if let Some(e) = env_flag.map(str::trim).filter(|e| *e != to.as_str()) {
        return Ok(refuse(&format!("-e {e} and --to {to} disagree: promote goes to --to; drop -e"), json));
    }
    if from == to {
        return Ok(refuse(
            &format!(
                "--from and --to are both `{to}`: promote rolls out what one environment runs in another; to roll \
                 out this directory, use `nonstop -e {to} deploy`"
            ),
            json,
        ));
    }
    let c = client_for(home, Some(&app), Some(to.as_str()));
    // A target the file does not name is most likely a typo: refused,
    // unless the daemon has it already (an environment made ad hoc).
    if !set.is_declared(&to) {
        let known: Vec<nonstop_api::wire::EnvironmentInfo> = c.get("/v1/environments").await.unwrap_or_default();
        if !known.iter().any(|e| e.app == app && e.environment == to.as_str()) {
            let declared: Vec<String> = set.environments().iter().map(|e| e.to_string()).collect();
            return Ok(refuse(
                &format!(
                    "{} declares no environment `{to}` (it has: {}) and this daemon runs none by that name; check \
                     --to",
                    file.display(),
                    declared.join(", ")
                ),
                json,
            ));
        }
    }
    let spec = match set.resolve(&to) {
        Ok(s) => s,
        Err(errors) => {
            print_spec_errors(&file, &errors, json);
            return Ok(2);
        }
    };
    warn_plain_credentials(&spec);
    let request = PromoteRequest {
        from: from.to_string(),
        spec: spec.clone(),
        base_env: crate::commands::base_env(),
        message,
        who: who(),
    };
    let code = run_op_waiting(&c, "/v1/promote", &request, wait, json).await?;
    say_serving(&spec, code, json);
    Ok(code)
}
