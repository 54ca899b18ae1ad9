//! Secret names: what a secret is called, which is the name of the
//! environment variable its processes receive.
//!
//! Rules: `[A-Z_][A-Z0-9_]*`, at most [`MAX_NAME_BYTES`] bytes, not
//! `NONSTOP_*` (the variables nonstop sets for every process) and not
//! `PORT` (set by nonstop for every web instance). Names are what the
//! store keys secrets by; uppercase only, so that `db_url` and `DB_URL`
//! are never two secrets that both reach a process.

use std::fmt;

/// The longest name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// The prefix of the variables nonstop itself sets (`NONSTOP_INSTANCE`, ...).
pub const RESERVED_PREFIX: &str = "NONSTOP_";

/// A valid secret name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretName(String);

/// Why a secret name was refused. Each message names the rule and a fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretNameError {
    #[error("a secret needs a name: use uppercase letters, digits and '_', e.g. DATABASE_URL")]
    Empty,
    #[error(
        "invalid secret name {name:?}: {found:?} (byte {at}) is not allowed; use uppercase letters, digits and '_'{}",
        suggest(suggestion)
    )]
    Character { name: String, found: char, at: usize, suggestion: Option<String> },
    #[error(
        "invalid secret name {name:?}: it starts with a digit; start it with a letter or '_'{}",
        suggest(suggestion)
    )]
    LeadingDigit { name: String, suggestion: Option<String> },
    #[error("secret name of {len} bytes is too long: use at most {MAX_NAME_BYTES}")]
    TooLong { len: usize },
    #[error(
        "secret name {name:?} is reserved: nonstop sets the NONSTOP_* variables of every process itself; choose a name without that prefix"
    )]
    Reserved { name: String },
    #[error(
        "secret name PORT is reserved: nonstop sets PORT for every web instance (the port it must listen on); choose another name"
    )]
    Port,
}

fn suggest(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!(" (e.g. {s})"),
        None => String::new(),
    }
}

/// The valid name closest to `name`, if there is one: uppercase, other
/// characters turned into '_', a leading digit prefixed with '_'.
fn suggestion(name: &str) -> Option<String> {
    let mut s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    if s.as_bytes().first().is_some_and(u8::is_ascii_digit) {
        s.insert(0, '_');
    }
    SecretName::new(s.clone()).ok().map(|_| s)
}

impl SecretName {
    /// Check `name` against the rules (see the module's documentation).
    pub fn new(name: impl Into<String>) -> Result<Self, SecretNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(SecretNameError::Empty);
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(SecretNameError::TooLong { len: name.len() });
        }
        if let Some((at, found)) =
            name.char_indices().find(|(_, c)| !(c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_'))
        {
            let suggestion = suggestion(&name);
            return Err(SecretNameError::Character { name, found, at, suggestion });
        }
        if name.as_bytes()[0].is_ascii_digit() {
            let suggestion = suggestion(&name);
            return Err(SecretNameError::LeadingDigit { name, suggestion });
        }
        if name.starts_with(RESERVED_PREFIX) {
            return Err(SecretNameError::Reserved { name });
        }
        if name == "PORT" {
            return Err(SecretNameError::Port);
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SecretName {
    type Err = SecretNameError;
    fn from_str(s: &str) -> Result<Self, SecretNameError> {
        Self::new(s)
    }
}

impl TryFrom<String> for SecretName {
    type Error = SecretNameError;
    fn try_from(s: String) -> Result<Self, SecretNameError> {
        Self::new(s)
    }
}

impl AsRef<str> for SecretName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        for ok in ["DATABASE_URL", "_PRIVATE", "A", "A1", "S3_KEY", "NONSTOP", "PORTS", "X_PORT"] {
            assert_eq!(SecretName::new(ok).unwrap().as_str(), ok);
        }
        assert_eq!(SecretName::new(""), Err(SecretNameError::Empty));
        assert_eq!(SecretName::new("PORT"), Err(SecretNameError::Port));
        assert!(matches!(SecretName::new("NONSTOP_INSTANCE"), Err(SecretNameError::Reserved { .. })));
        assert!(matches!(SecretName::new("NONSTOP_"), Err(SecretNameError::Reserved { .. })));
        assert_eq!(SecretName::new("A".repeat(129)), Err(SecretNameError::TooLong { len: 129 }));
        assert!(SecretName::new("A".repeat(128)).is_ok());
        let e = SecretName::new("db-url").unwrap_err();
        assert_eq!(
            e,
            SecretNameError::Character { name: "db-url".into(), found: 'd', at: 0, suggestion: Some("DB_URL".into()) }
        );
        assert_eq!(
            e.to_string(),
            "invalid secret name \"db-url\": 'd' (byte 0) is not allowed; use uppercase letters, digits and '_' (e.g. DB_URL)"
        );
        assert!(matches!(
            SecretName::new("3SCALE_KEY"),
            Err(SecretNameError::LeadingDigit { suggestion: Some(s), .. }) if s == "_3SCALE_KEY"
        ));
        assert!(matches!(SecretName::new("A B"), Err(SecretNameError::Character { found: ' ', at: 1, .. })));
        assert!(matches!(SecretName::new("CAFÉ"), Err(SecretNameError::Character { found: 'É', at: 3, .. })));
        // A lowercase reserved name is refused for its case, and the
        // suggestion is not offered since it would be reserved too.
        assert!(matches!(SecretName::new("nonstop_x"), Err(SecretNameError::Character { suggestion: None, .. })));
        assert!(SecretName::new("PORT").unwrap_err().to_string().contains("choose another name"));
    }

    proptest! {
        #[test]
        fn names_of_the_rule_are_accepted(name in "[A-Z_][A-Z0-9_]{0,127}") {
            let reserved = name.starts_with("NONSTOP_") || name == "PORT";
            prop_assert_eq!(SecretName::new(name.clone()).is_ok(), !reserved);
        }

        #[test]
        fn a_character_outside_the_rule_is_refused(
            head in "[A-Z_]{0,10}",
            bad in "[^A-Z0-9_]",
            tail in "[A-Z0-9_]{0,10}",
        ) {
            let name = format!("X{head}{bad}{tail}");
            let e = SecretName::new(name.clone()).unwrap_err();
            let refused_for_length = matches!(e, SecretNameError::TooLong { .. });
            prop_assert!(matches!(e, SecretNameError::Character { .. }) || refused_for_length, "{}", e);
            // A suggestion, when given, is itself a valid name.
            if let SecretNameError::Character { suggestion: Some(s), .. } = e {
                prop_assert!(SecretName::new(s).is_ok());
            }
        }
    }
}
