//! [`SecretValue`]: a secret's clear text, held so that it is wiped from
//! memory when dropped and never printed by accident.

use std::fmt;
use zeroize::Zeroizing;

/// The largest value accepted, in bytes. A process receives a secret as
/// an environment variable, and Linux refuses to start a process with one
/// longer than 128 KiB (`MAX_ARG_STRLEN`, name included).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The clear text of a secret.
///
/// Its memory is zeroed when it is dropped (`zeroize`), and `Debug` and
/// `Display` print `[secret]`: a value that ends up in a log line, an
/// error or a `{:?}` of a larger structure shows nothing. Only
/// [`SecretValue::expose`] gives the text (to fill a process's
/// environment, or to build a [`crate::Redactor`]). It implements neither
/// `Serialize` nor `AsRef<str>` on purpose.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

/// Why a value cannot be a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretValueError {
    #[error(
        "the value holds a NUL byte (at byte {at}): a process receives it as an environment variable, which ends at the first NUL; remove it (encode binary data, e.g. in base64)"
    )]
    Nul { at: usize },
    #[error(
        "the value is {len} bytes long: a secret holds at most {MAX_VALUE_BYTES} bytes (an environment variable); keep larger data in a file and put its path in a variable"
    )]
    TooLong { len: usize },
}

impl SecretValue {
    /// `value` as a secret, if a process can receive it as an environment
    /// variable. On refusal, `value` is wiped before the error returns.
    pub fn new(value: String) -> Result<Self, SecretValueError> {
        let value = Zeroizing::new(value);
        if value.len() > MAX_VALUE_BYTES {
            return Err(SecretValueError::TooLong { len: value.len() });
        }
        if let Some(at) = value.bytes().position(|b| b == 0) {
            return Err(SecretValueError::Nul { at });
        }
        Ok(Self(value))
    }

    /// The clear text. Do not keep copies of it around: what is copied out
    /// of a `SecretValue` is not wiped.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Wrap a string already checked (a decrypted value, checked when it
    /// was sealed).
    pub(crate) fn from_checked(value: Zeroizing<String>) -> Self {
        Self(value)
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[secret]")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[secret]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let v = SecretValue::new("hunter2-hunter2".into()).unwrap();
        assert_eq!(format!("{v}"), "[secret]");
        assert_eq!(format!("{v:?}"), "[secret]");
        assert_eq!(format!("{:?}", Some(vec![v.clone()])), "Some([[secret]])");
        assert_eq!(v.expose(), "hunter2-hunter2");
        assert_eq!(v.len(), 15);
    }

    #[test]
    fn refused_values() {
        assert_eq!(SecretValue::new("a\0b".into()), Err(SecretValueError::Nul { at: 1 }));
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        assert_eq!(SecretValue::new(big), Err(SecretValueError::TooLong { len: MAX_VALUE_BYTES + 1 }));
        assert!(SecretValue::new("x".repeat(MAX_VALUE_BYTES)).is_ok());
        assert!(SecretValue::new(String::new()).unwrap().is_empty());
        // The error never carries the value.
        let e = SecretValue::new("s3cr3t\0".into()).unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"));
    }
}
