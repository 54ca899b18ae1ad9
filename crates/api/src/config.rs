//! `POST /v1/promote`, `POST /v1/config/set`, `POST /v1/config/unset`,
//! `GET /v1/config`: wire types and handlers (parse, forward, encode).
//!
//! All are addressed like every request (`?app=NAME&env=NAME`); for
//! promote, `env` is the target and the body names the source.

use crate::server::{bad_request, engine_error, op_stream, ApiState, Scoped};
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nonstop_core::config::{check_value, ConfigName};
use nonstop_core::process::AppSpec;
use nonstop_core::EnvironmentId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// `POST /v1/promote?app=APP&env=TARGET`: roll out in TARGET the release
/// `from` runs. Answered with NDJSON progress, then the result.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The source environment.
    pub from: String,
    /// The target environment's spec, as `nonstop.toml` resolves it.
    pub spec: AppSpec,
    /// PATH, HOME, LANG... of the shell that ran `promote`.
    pub base_env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `user@host`, recorded in the history.
    pub who: String,
}

/// `POST /v1/config/set`: these variables, rolled out (NDJSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSetRequest {
    pub vars: BTreeMap<String, String>,
    /// Store values that look like credentials all the same.
    #[serde(default)]
    pub force: bool,
    pub who: String,
}

/// `POST /v1/config/unset`: without these variables, rolled out (NDJSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigUnsetRequest {
    pub names: Vec<String>,
    pub who: String,
}

/// The routes of this module, merged into the server's router.
pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/promote", post(promote))
        .route("/v1/config", get(config_get))
        .route("/v1/config/set", post(config_set))
        .route("/v1/config/unset", post(config_unset))
}

async fn promote(Scoped(engine): Scoped, body: Result<Json<PromoteRequest>, JsonRejection>) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid promote request: {e}")),
    };
    let from = match EnvironmentId::new(req.from.trim()) {
        Ok(env) => env,
        Err(e) => return bad_request(format!("{e} (given as --from)")),
    };
    let request = nonstop_engine::PromoteRequest {
        from,
        spec: req.spec,
        base_env: req.base_env,
        message: req.message,
        who: req.who,
    };
    op_stream(move |p| async move { engine.promote(request, p).await })
}

async fn config_set(Scoped(engine): Scoped, body: Result<Json<ConfigSetRequest>, JsonRejection>) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid config set request: {e}")),
    };
    if req.vars.is_empty() {
        return bad_request("nothing to set: give NAME=VALUE pairs, e.g. `nonstop config set GREETING=hello`".into());
    }
    let mut vars = BTreeMap::new();
    for (name, value) in req.vars {
        let name = match ConfigName::new(name) {
            Ok(n) => n,
            Err(e) => return bad_request(e.to_string()),
        };
        if let Err(e) = check_value(&name, &value) {
            return bad_request(e.to_string());
        }
        vars.insert(name, value);
    }
    op_stream(move |p| async move { engine.set_config(vars, req.force, req.who, p).await })
}

async fn config_unset(Scoped(engine): Scoped, body: Result<Json<ConfigUnsetRequest>, JsonRejection>) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid config unset request: {e}")),
    };
    let names = match nonstop_core::config::parse_names(&req.names) {
        Ok(n) => n,
        Err(e) => return bad_request(e.to_string()),
    };
    let names: BTreeSet<ConfigName> = names;
    op_stream(move |p| async move { engine.unset_config(names, req.who, p).await })
}

async fn config_get(Scoped(engine): Scoped) -> Response {
    match engine.config().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => engine_error(e),
    }
}
