//! Maintenance mode and a stopped app, as data: what the engine persists,
//! hands to the traffic layer, and reports.
//!
//! Maintenance: every request to the app (static files included) gets `503`
//! with a page and `Retry-After`, except requests from allowed addresses;
//! instances keep running and keep being health-checked. A stopped app
//! (`nonstop stop`) is in maintenance with every process at zero, its
//! counts remembered for `nonstop start`.
//!
//! Parsing here is pure and names the problem and the fix: the CLI and the
//! API refuse the same input with the same words.

use crate::counts::RuntimeCount;
use crate::ids::ProcessName;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// The largest maintenance page accepted.
pub const MAINTENANCE_PAGE_MAX: usize = 1024 * 1024;
/// `Retry-After` when none is given.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The largest `Retry-After` accepted (a day).
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(86_400);
/// The most allow-list entries accepted.
pub const ALLOW_MAX: usize = 1024;

/// The page served when none is given: plain, self-contained, no assets.
pub const DEFAULT_MAINTENANCE_PAGE: &str = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>Down for maintenance</title>\
<style>body{font-family:system-ui,sans-serif;max-width:34rem;margin:18vh auto;padding:0 1.5rem;color:#222;line-height:1.5}\
h1{font-size:1.6rem;font-weight:600}</style></head>\n\
<body><h1>Down for maintenance</h1>\n\
<p>This site is being worked on and will be back shortly. Please try again in a few minutes.</p></body></html>\n";

/// What an app in maintenance answers, and to whom it does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maintenance {
    /// The page (HTML, UTF-8); `None`: [`DEFAULT_MAINTENANCE_PAGE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    /// Clients from these addresses or networks reach the app as usual.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// `Retry-After`, in seconds.
    pub retry_after_secs: u64,
}

impl Maintenance {
    /// The page's bytes as served.
    pub fn page_or_default(&self) -> &str {
        self.page.as_deref().unwrap_or(DEFAULT_MAINTENANCE_PAGE)
    }

    /// Whether a client at `addr` gets through (an IPv4 address mapped into
    /// IPv6, as a dual-stack listener reports it, counts as the IPv4 one).
    pub fn allows(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.allow.iter().any(|net| net.contains(&addr))
    }
}

/// Why a maintenance setting is refused (nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaintenanceInputError {
    #[error("allow-list entry `{entry}` is not an IP address or a CIDR network; give e.g. `203.0.113.7`, `10.0.0.0/8` or `2001:db8::/32`")]
    BadAllow { entry: String },
    #[error("allow-list entry `{entry}` has host bits set after the prefix; did you mean `{network}`?")]
    AllowHostBits { entry: String, network: String },
    #[error("the allow list has {count} entries; at most {ALLOW_MAX} are accepted: use wider networks (CIDR)")]
    TooManyAllowed { count: usize },
    #[error("the maintenance page is {size} bytes; at most {} are accepted: keep it a single small HTML file (inline its CSS, link images from elsewhere)", MAINTENANCE_PAGE_MAX)]
    PageTooLarge { size: usize },
    #[error(
        "the maintenance page is empty; give an HTML file with some text, or leave out --page for the built-in page"
    )]
    PageEmpty,
    #[error("Retry-After of {secs}s is more than a day; give at most {} seconds", RETRY_AFTER_MAX.as_secs())]
    RetryAfterTooLong { secs: u64 },
}

/// One allow-list entry: an address (`203.0.113.7`, `::1`) or a network
/// (`10.0.0.0/8`). A network with host bits set (`10.1.2.3/8`) is refused,
/// naming the network meant: it is nearly always a typo.
pub fn parse_allow(entry: &str) -> Result<IpNet, MaintenanceInputError> {
    let trimmed = entry.trim();
    if let Ok(addr) = trimmed.parse::<IpAddr>() {
        return Ok(IpNet::from(addr.to_canonical()));
    }
    match trimmed.parse::<IpNet>() {
        Ok(net) if net.trunc() != net => {
            Err(MaintenanceInputError::AllowHostBits { entry: entry.to_string(), network: net.trunc().to_string() })
        }
        Ok(net) => Ok(net),
        Err(_) => Err(MaintenanceInputError::BadAllow { entry: entry.to_string() }),
    }
}

/// A whole allow list, checked entry by entry (the first bad one is named).
pub fn parse_allow_list<S: AsRef<str>>(entries: &[S]) -> Result<Vec<IpNet>, MaintenanceInputError> {
    if entries.len() > ALLOW_MAX {
        return Err(MaintenanceInputError::TooManyAllowed { count: entries.len() });
    }
    let mut out: Vec<IpNet> = Vec::with_capacity(entries.len());
    for e in entries {
        let net = parse_allow(e.as_ref())?;
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// A maintenance setting from user input, checked: the page's size, the
/// allow list, `Retry-After` (`None`: [`DEFAULT_RETRY_AFTER`]).
pub fn build_maintenance<S: AsRef<str>>(
    page: Option<String>,
    allow: &[S],
    retry_after_secs: Option<u64>,
) -> Result<Maintenance, MaintenanceInputError> {
    if let Some(p) = &page {
        if p.len() > MAINTENANCE_PAGE_MAX {
            return Err(MaintenanceInputError::PageTooLarge { size: p.len() });
        }
        if p.trim().is_empty() {
            return Err(MaintenanceInputError::PageEmpty);
        }
    }
    let secs = retry_after_secs.unwrap_or(DEFAULT_RETRY_AFTER.as_secs());
    if secs > RETRY_AFTER_MAX.as_secs() {
        return Err(MaintenanceInputError::RetryAfterTooLong { secs });
    }
    Ok(Maintenance { page, allow: parse_allow_list(allow)?, retry_after_secs: secs })
}

/// Who turned maintenance on: `nonstop maintenance on` (then only
/// `nonstop maintenance off` turns it off) or `nonstop stop` (then
/// `nonstop start` turns it off once web is healthy) or a deploy's
/// maintenance fallback (`nonstop deploy --allow-breaking`: the deploy turns
/// it off when it ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceBy {
    User,
    Stop,
    Deploy,
}

/// Maintenance as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceState {
    pub maintenance: Maintenance,
    pub by: MaintenanceBy,
    /// Milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// Where a stopped app is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopPhase {
    /// `nonstop stop`: every count is zero (instances may still be
    /// stopping).
    Stopped,
    /// `nonstop start`: the counts are back; maintenance goes off once web
    /// is healthy, and then the record goes.
    Starting,
}

/// A stopped app as the store keeps it: the counts `nonstop start` brings
/// back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedState {
    pub phase: StopPhase,
    /// The runtime counts before the stop, exactly (source and toml's
    /// count included).
    pub counts: BTreeMap<ProcessName, RuntimeCount>,
    /// Milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// Who asked (`user@host`).
    pub who: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries() {
        assert_eq!(parse_allow("203.0.113.7").unwrap().to_string(), "203.0.113.7/32");
        assert_eq!(parse_allow(" 10.0.0.0/8 ").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_allow("::1").unwrap().to_string(), "::1/128");
        assert_eq!(parse_allow("::ffff:192.0.2.1").unwrap().to_string(), "192.0.2.1/32");
        assert_eq!(parse_allow("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        for bad in ["", "office", "10.0.0.0/33", "1.2.3", "10.0.0.0/", "example.com", "1.2.3.4:80"] {
            let e = parse_allow(bad).unwrap_err();
            assert!(matches!(e, MaintenanceInputError::BadAllow { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("not an IP address or a CIDR network"), "{e}");
        }
        let e = parse_allow("10.1.2.3/8").unwrap_err();
        assert_eq!(
            e.to_string(),
            "allow-list entry `10.1.2.3/8` has host bits set after the prefix; did you mean `10.0.0.0/8`?"
        );
    }

    #[test]
    fn matching_addresses() {
        let m = build_maintenance(None, &["10.0.0.0/8", "::1"], None).unwrap();
        assert_eq!(m.retry_after_secs, 60);
        assert!(m.allows("10.9.8.7".parse().unwrap()));
        assert!(m.allows("::ffff:10.1.1.1".parse().unwrap()), "mapped IPv4 counts as IPv4");
        assert!(m.allows("::1".parse().unwrap()));
        assert!(!m.allows("127.0.0.1".parse().unwrap()));
        assert!(!m.allows("11.0.0.1".parse().unwrap()));
        assert_eq!(m.page_or_default(), DEFAULT_MAINTENANCE_PAGE);
    }

    #[test]
    fn bad_settings_are_named() {
        let big = "x".repeat(MAINTENANCE_PAGE_MAX + 1);
        let e = build_maintenance::<&str>(Some(big), &[], None).unwrap_err();
        assert!(e.to_string().contains("at most 1048576"), "{e}");
        assert_eq!(
            build_maintenance::<&str>(Some(" \n".into()), &[], None).unwrap_err(),
            MaintenanceInputError::PageEmpty
        );
        assert!(matches!(
            build_maintenance::<&str>(None, &[], Some(90_000)).unwrap_err(),
            MaintenanceInputError::RetryAfterTooLong { .. }
        ));
        let e = build_maintenance(None, &["10.0.0.1", "nope"], None).unwrap_err();
        assert_eq!(e, MaintenanceInputError::BadAllow { entry: "nope".into() });
    }
}
