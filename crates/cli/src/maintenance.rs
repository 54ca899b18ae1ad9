//! `nonstop maintenance on|off`, `nonstop stop`, `nonstop start`: the
//! client side. The page file is read here (a relative path is the user's
//! current directory) and its contents sent; every input is checked here
//! as the daemon checks it, so a mistake is named before anything changes.

use crate::cli::MaintenanceSwitch;
use crate::commands::{client, emit, run_op, who};
use crate::home::Home;
use nonstop_api::wire::{MaintenanceRequest, StopStartRequest};
use nonstop_core::maintenance::MAINTENANCE_PAGE_MAX;
use nonstop_engine::OpReport;
use std::path::Path;

pub(crate) async fn maintenance(home: &Home, switch: MaintenanceSwitch) -> anyhow::Result<i32> {
    let (request, json) = match switch {
        MaintenanceSwitch::Off { json } => (MaintenanceRequest { on: false, who: who(), ..Default::default() }, json),
        MaintenanceSwitch::On { page, allow, retry_after, json } => {
            let page = match page.as_deref().map(read_page).transpose() {
                Ok(page) => page,
                Err(e) => return Ok(refuse(&e, json)),
            };
            let request = MaintenanceRequest { on: true, page, allow, retry_after_secs: Some(retry_after), who: who() };
            (request, json)
        }
    };
    if let Err(e) = request.checked() {
        return Ok(refuse(&e.to_string(), json));
    }
    let r: OpReport = client(home).post("/v1/maintenance", &request).await?;
    if json {
        emit(&serde_json::to_string(&r)?);
    } else {
        emit(&r.summary);
    }
    Ok(0)
}

pub(crate) async fn stop(home: &Home, json: bool) -> anyhow::Result<i32> {
    run_op(&client(home), "/v1/stop", &StopStartRequest { who: who() }, json).await
}

pub(crate) async fn start(home: &Home, json: bool) -> anyhow::Result<i32> {
    run_op(&client(home), "/v1/start", &StopStartRequest { who: who() }, json).await
}

/// Bad input: said, nothing sent; exit code 2.
fn refuse(message: &str, json: bool) -> i32 {
    if json {
        emit(&serde_json::json!({"type": "error", "exit_code": 2, "message": message}).to_string());
    } else {
        eprintln!("error: {message}; nothing was changed");
    }
    2
}

/// The page's contents, or what is wrong with the file (named, with the fix).
fn read_page(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
            return Err(format!(
                "maintenance page {shown} does not exist (relative paths are from the current directory, {cwd}); \
                 give the path of an HTML file, or leave out --page for the built-in page"
            ));
        }
        Err(e) => return Err(format!("maintenance page {shown} cannot be read: {e}")),
    };
    if !meta.is_file() {
        return Err(format!("maintenance page {shown} is not a file; give the path of an HTML file"));
    }
    if meta.len() > MAINTENANCE_PAGE_MAX as u64 {
        return Err(format!(
            "maintenance page {shown} is {} bytes; at most {MAINTENANCE_PAGE_MAX} are accepted: keep it a single \
             small HTML file (inline its CSS, link images from elsewhere)",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("maintenance page {shown} cannot be read: {e}"))?;
    String::from_utf8(bytes).map_err(|_| {
        format!(
            "maintenance page {shown} is not UTF-8 text; save it as UTF-8 (it is served as text/html; charset=utf-8)"
        )
    })
}
