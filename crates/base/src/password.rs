//! Role passwords: made from the operating system's random number
//! generator, never shown.

use crate::error::BaseError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Length of a generated password, in characters.
pub const PASSWORD_LEN: usize = 32;

/// The characters of a generated password: URL-safe (RFC 3986 unreserved)
/// so that it stands in a URL as it is, and 64 of them, so that each byte
/// of randomness masked to 6 bits picks one without bias (192 bits in all).
pub const PASSWORD_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A role's password. `Debug` prints `Password(***)`, and there is no
/// `Display`: only [`Password::expose`] gives the text. Serialized whole
/// (the caller keeps it with the environment's secrets).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    /// A password the caller already has (stored, or chosen).
    pub fn new(text: impl Into<String>) -> Password {
        Password(text.into())
    }

    /// The real text. Never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A new password: [`PASSWORD_LEN`] characters of [`PASSWORD_ALPHABET`]
/// from the operating system's random number generator.
pub fn generate_password() -> Result<Password, BaseError> {
    let mut bytes = [0u8; PASSWORD_LEN];
    getrandom::getrandom(&mut bytes).map_err(|source| BaseError::NoRandomness { source })?;
    Ok(Password(from_random(&bytes)))
}

/// The password spelled by `bytes` (each masked to 6 bits). Pure.
fn from_random(bytes: &[u8]) -> String {
    bytes.iter().map(|b| PASSWORD_ALPHABET[usize::from(b & 63)] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::database::encode;
    use proptest::prelude::*;

    #[test]
    fn generated_passwords_are_long_url_safe_and_different() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.expose().len(), PASSWORD_LEN);
        assert_ne!(a, b);
        assert_eq!(encode(a.expose()), a.expose(), "needs no escape in a URL");
    }

    #[test]
    fn a_password_is_never_debug_printed() {
        let p = Password::new("hunter2-secret");
        assert_eq!(format!("{p:?}"), "Password(***)");
        assert_eq!(format!("{:?}", Some(&p)), "Some(Password(***))");
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"hunter2-secret\"");
    }

    #[test]
    fn every_character_of_the_alphabet_is_reachable() {
        let all: Vec<u8> = (0..=255).collect();
        let text = from_random(&all);
        for c in PASSWORD_ALPHABET {
            assert_eq!(text.bytes().filter(|b| b == c).count(), 4, "{}", *c as char);
        }
    }

    proptest! {
        #[test]
        fn any_randomness_spells_a_url_safe_password(bytes in proptest::collection::vec(any::<u8>(), PASSWORD_LEN)) {
            let p = from_random(&bytes);
            prop_assert_eq!(p.len(), PASSWORD_LEN);
            prop_assert!(p.bytes().all(|b| PASSWORD_ALPHABET.contains(&b)));
            prop_assert_eq!(encode(&p), p);
        }
    }
}
