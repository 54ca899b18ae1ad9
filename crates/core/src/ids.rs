//! Identifiers. Each is a validated newtype so that an `InstanceId` can never
//! be passed where a `ProcessName` is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a name was refused. The message names the rule and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {rule}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub rule: &'static str,
}

const NAME_RULE: &str = "use 1 to 63 characters: lowercase letters, digits, '-' and '_', starting with a letter";

fn check_name(what: &'static str, value: &str) -> Result<(), NameError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.as_bytes()[0].is_ascii_lowercase()
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NameError { what, value: value.to_string(), rule: NAME_RULE })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check_name($what, &value)?;
                Ok(Self(value))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::new(value)
            }
        }
        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
    };
}

name_type!(
    /// The application's name (`app = "..."` in nonstop.toml).
    AppName,
    "app name"
);
name_type!(
    /// A process type of the app (`[processes.web]` → `web`).
    ProcessName,
    "process name"
);
name_type!(
    /// An environment (production, staging, an ad hoc one). Every record
    /// carries one from the start; until environments land it is `default`.
    EnvironmentId,
    "environment name"
);

impl EnvironmentId {
    pub fn default_env() -> Self {
        Self("default".to_string())
    }
}

/// One environment of one app: what a controller owns, and the scope of
/// every record, instance and route. Rendered as `blog/staging`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AppEnv {
    pub app: AppName,
    pub env: EnvironmentId,
}

impl AppEnv {
    pub fn new(app: AppName, env: EnvironmentId) -> Self {
        Self { app, env }
    }

    /// The proxy route of this app in this environment (`app/env`): its
    /// backends, hosts, maintenance and static files.
    pub fn route(&self) -> crate::traffic::RouteKey {
        crate::traffic::RouteKey(self.to_string())
    }
}

impl fmt::Display for AppEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app, self.env)
    }
}

/// One running (or once running) instance: `<process>.<slot>` plus a
/// generation that grows every time the slot is (re)started, so that a
/// replacement never shares an id with the instance it replaces.
/// Rendered as `web.2#7`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceId {
    pub process: ProcessName,
    pub slot: u32,
    pub generation: u64,
}

impl InstanceId {
    pub fn new(process: ProcessName, slot: u32, generation: u64) -> Self {
        Self { process, slot, generation }
    }
    /// `web.2`: what users see and what `NONSTOP_INSTANCE` holds.
    pub fn slot_name(&self) -> String {
        format!("{}.{}", self.process, self.slot)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}#{}", self.process, self.slot, self.generation)
    }
}

/// Whether `name` is a DNS host name nonstop accepts (a TLS or route host,
/// without a leading `*.`): letters, digits, '-' and '.', no empty label,
/// at most 253 bytes. Case is the caller's (hosts are compared lowercase).
pub fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// An immutable release. Until deploys land (issue 3) the running spec is
/// recorded as release 0 ("working directory").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReleaseId(pub u64);

impl fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(AppName::new("blog").is_ok());
        assert!(AppName::new("my-app2").is_ok());
        assert!(ProcessName::new("celery_beat").is_ok());
        for bad in ["", "Web", "1web", "we b", "wéb", &"a".repeat(64)] {
            let err = ProcessName::new(bad).unwrap_err();
            assert!(err.to_string().contains("lowercase"), "{err}");
        }
    }

    #[test]
    fn instance_ids_render() {
        let id = InstanceId::new(ProcessName::new("web").unwrap(), 2, 7);
        assert_eq!(id.to_string(), "web.2#7");
        assert_eq!(id.slot_name(), "web.2");
    }
}
