//! How many instances of a process type run, and who said so: the
//! runtime's count of each process type, as the store keeps it.

use serde::{Deserialize, Serialize};

/// Where a process type's runtime count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CountSource {
    /// `count` in `nonstop.toml` (the initial value, or a change to it).
    Toml,
    /// `nonstop scale`.
    Scale,
}

impl CountSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CountSource::Toml => "toml",
            CountSource::Scale => "scale",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "toml" => Some(CountSource::Toml),
            "scale" => Some(CountSource::Scale),
            _ => None,
        }
    }
}

/// A process type's count as the runtime owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeCount {
    /// The count that applies.
    pub count: u32,
    /// Who set it.
    pub source: CountSource,
    /// `count` in `nonstop.toml` the last time a toml was applied (`up`,
    /// `deploy`): a toml whose count differs from it changed the count.
    pub toml_at_apply: u32,
}
