//! Human output: tables, durations, progress.

use indicatif::{ProgressBar, ProgressStyle};
use nonstop_engine::{Progress, StatusReport};
use std::io::IsTerminal;
use std::time::Duration;

pub fn fmt_uptime(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{}h{:02}m", s / 3600, (s / 60) % 60)
    } else {
        format!("{}d{:02}h", s / 86400, (s / 3600) % 24)
    }
}

/// A plain text table, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub fn status_text(s: &StatusReport) -> String {
    let mut out = format!(
        "app {}  environment {}  release v{}  proxy http://{}{}\n\n",
        s.app,
        s.environment,
        s.release,
        s.proxy_listen,
        s.operation.as_ref().map(|o| format!("  ({o} in progress)")).unwrap_or_default()
    );
    let mut rows: Vec<Vec<String>> = s
        .instances
        .iter()
        .map(|i| {
            vec![
                i.process.clone(),
                i.instance.clone(),
                i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                i.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                i.state.to_string(),
                i.health.map(|h| h.as_str().to_string()).unwrap_or_else(|| "-".into()),
                format!("v{}", i.release),
                i.restarts.to_string(),
                fmt_uptime(i.uptime_ms),
            ]
        })
        .collect();
    for w in &s.waiting {
        rows.push(vec![
            w.process.clone(),
            w.instance.clone(),
            "-".into(),
            "-".into(),
            match w.state {
                nonstop_engine::SlotState::CrashLoop => "crash-loop".into(),
                nonstop_engine::SlotState::CannotStart => "cannot restart".into(),
                nonstop_engine::SlotState::Backoff => format!("restart in {}", fmt_uptime(w.retry_in_ms.max(1000))),
            },
            "-".into(),
            "-".into(),
            w.restarts.to_string(),
            w.last_exit.clone().unwrap_or_default(),
        ]);
    }
    out.push_str(&table(
        &["PROCESS", "INSTANCE", "PID", "PORT", "STATE", "HEALTH", "RELEASE", "RESTARTS", "UPTIME"],
        &rows,
    ));
    let summary: Vec<String> =
        s.processes.iter().map(|p| format!("{} {}/{} ({})", p.process, p.ready, p.desired, p.kind.as_str())).collect();
    out.push_str(&format!("\n{}\n", summary.join("   ")));
    for w in s.waiting.iter().filter(|w| w.problem.is_some()) {
        out.push_str(&format!(
            "\n{} cannot restart: {} (retrying)",
            w.instance,
            w.problem.as_deref().unwrap_or_default()
        ));
    }
    if let Some(st) = &s.stopped {
        let counts: Vec<String> = st.counts.iter().map(|(p, n)| format!("{p}={n}")).collect();
        match s.state {
            nonstop_engine::AppState::Starting => out.push_str(&format!(
                "\nstarting: the counts are back ({}); maintenance goes off once web is healthy\n",
                counts.join(", ")
            )),
            _ => out.push_str(&format!(
                "\nstopped since {} by {} (on purpose, not failed); `nonstop start` brings back {}\n",
                crate::commands::fmt_time(st.since_ms),
                st.who,
                counts.join(", ")
            )),
        }
    }
    if let Some(m) = &s.maintenance {
        let by = match m.by {
            nonstop_engine::MaintenanceOwner::User => "`nonstop maintenance on`; off with `nonstop maintenance off`",
            nonstop_engine::MaintenanceOwner::Stop => "`nonstop stop`; off when `nonstop start` has web healthy",
            nonstop_engine::MaintenanceOwner::Deploy => {
                "`nonstop deploy --allow-breaking` (its maintenance fallback); off when that deploy ends"
            }
        };
        let allow = if m.allow.is_empty() { "none".to_string() } else { m.allow.join(", ") };
        out.push_str(&format!(
            "\nmaintenance on since {} (by {by}): requests get 503 with {} page, Retry-After {}s; allowed: {allow}\n",
            crate::commands::fmt_time(m.since_ms),
            if m.custom_page { "your" } else { "the built-in" },
            m.retry_after_secs
        ));
    }
    if let Some(e) = &s.store_error {
        out.push_str(&format!("\nstore: {e}"));
    }
    if s.store_error.is_some() || s.waiting.iter().any(|w| w.problem.is_some()) {
        out.push('\n');
    }
    out
}

/// Progress display: a spinner on a terminal, plain lines otherwise.
pub struct ProgressView {
    bar: Option<ProgressBar>,
}

impl ProgressView {
    pub fn new() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            Self { bar: Some(bar) }
        } else {
            Self { bar: None }
        }
    }

    pub fn update(&self, p: &Progress) {
        match &self.bar {
            Some(bar) => {
                let mut status = String::new();
                if let Some(phase) = &p.phase {
                    status.push_str(phase);
                    status.push_str(" · ");
                }
                match (p.new, p.old) {
                    (Some(new), Some(old)) => {
                        status.push_str(&format!("new {new} ({} healthy of {}) · old {old} · ", p.ready, p.desired))
                    }
                    _ if p.desired > 0 => status.push_str(&format!("{}/{} ready · ", p.ready, p.desired)),
                    _ => {}
                }
                bar.set_message(format!("{status}{}", p.message));
                bar.println(format!("  {}", p.message));
            }
            None => eprintln!("  {}", p.message),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
