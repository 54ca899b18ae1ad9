//! Authenticated encryption of secret values: XChaCha20-Poly1305
//! (RustCrypto's `chacha20poly1305`), a fresh random 24-byte nonce per
//! value (random nonces of that size never repeat in practice, so no
//! counter has to be kept), and associated data that binds a ciphertext
//! to its app, environment, name and version: a ciphertext copied to
//! another secret, environment or version does not decrypt.
//!
//! A wrong key is told apart from a damaged ciphertext by the **key
//! check**: a fixed constant encrypted with the key, stored once with the
//! secrets. [`SecretsKey::verify`] decrypts it and only then gives a
//! [`CheckedKey`], the one type that seals and opens values, so no value
//! is ever decrypted with a key that was not checked.

use crate::key::{KeySource, SecretsKey};
use crate::value::SecretValue;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use nonstop_core::{AppName, EnvironmentId};
use zeroize::{Zeroize, Zeroizing};

/// A nonce's length in bytes.
pub const NONCE_LEN: usize = 24;

/// The authentication tag's length (a ciphertext is the value's length
/// plus this).
pub const TAG_LEN: usize = 16;

const VALUE_AAD: &[u8] = b"nonstop secret value v1";
const CHECK_AAD: &[u8] = b"nonstop secrets key check v1";
const CHECK_PLAINTEXT: &[u8] = b"nonstop: this key encrypts these secrets";

/// Which secret a ciphertext is: what its associated data binds it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretAddress<'a> {
    pub app: &'a AppName,
    pub environment: &'a EnvironmentId,
    /// The secret's name as stored (a [`crate::SecretName`] when written;
    /// a plain string here so that reading never depends on the rules of
    /// the day).
    pub name: &'a str,
    /// The version this ciphertext is (1, 2, ...).
    pub version: u64,
}

impl SecretAddress<'_> {
    /// The associated data: a label, then each field with its length, so
    /// that no two addresses give the same bytes.
    fn associated_data(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(VALUE_AAD.len() + 64);
        aad.extend_from_slice(VALUE_AAD);
        for field in [self.app.as_str(), self.environment.as_str(), self.name] {
            aad.extend_from_slice(&(field.len() as u64).to_be_bytes());
            aad.extend_from_slice(field.as_bytes());
        }
        aad.extend_from_slice(&self.version.to_be_bytes());
        aad
    }
}

/// An encrypted value, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: [u8; NONCE_LEN],
    /// The encrypted value followed by its tag.
    pub ciphertext: Vec<u8>,
}

/// The key check, as stored: nonce, then the encrypted constant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCheck(Vec<u8>);

impl KeyCheck {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A key that matched the stored key check: it seals and opens values.
#[derive(Debug)]
pub struct CheckedKey<'k> {
    key: &'k SecretsKey,
}

/// Why a value could not be sealed or opened. No variant carries a value.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "the secrets key does not match the one these secrets were written with (the key used: {key}): restore the key file from your backup, or set NONSTOP_SECRETS_KEY to the key they were written with"
    )]
    WrongKey { key: KeySource },
    #[error(
        "the stored secrets key check is damaged ({len} bytes, expected {expected}): restore the state database from a backup"
    )]
    DamagedKeyCheck { len: usize, expected: usize },
    #[error(
        "secret {name} (version {version}) of {app} in {environment} does not decrypt: its stored bytes were altered, or copied from another secret; set it again with `nonstop secrets set {name}`"
    )]
    Tampered { app: AppName, environment: EnvironmentId, name: String, version: u64 },
    #[error("the system's random number generator failed: {0}")]
    Random(#[source] getrandom::Error),
    #[error("secret {name} could not be encrypted (a value of {len} bytes)")]
    Encrypt { name: String, len: usize },
}

/// Fill `buf` from the operating system's random number generator.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(CryptoError::Random)
}

fn cipher(key: &SecretsKey) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(key.bytes().into())
}

/// Encrypt `plain` (what `name` holds, for the error) with a fresh nonce;
/// the plaintext copy is wiped.
fn seal_bytes(key: &SecretsKey, aad: &[u8], plain: &[u8], name: &str) -> Result<Sealed, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    random(&mut nonce)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(plain.len() + TAG_LEN));
    buf.extend_from_slice(plain);
    cipher(key)
        .encrypt_in_place(&XNonce::from(nonce), aad, &mut *buf)
        .map_err(|_| CryptoError::Encrypt { name: name.to_string(), len: plain.len() })?;
    // Encrypted now: nothing to wipe.
    Ok(Sealed { nonce, ciphertext: std::mem::take(&mut *buf) })
}

/// Decrypt, or `None` when the tag does not verify. The result is wiped
/// when dropped.
fn open_bytes(key: &SecretsKey, aad: &[u8], nonce: &[u8], ciphertext: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    let mut buf = Zeroizing::new(Vec::with_capacity(ciphertext.len()));
    buf.extend_from_slice(ciphertext);
    cipher(key).decrypt_in_place(&XNonce::from(nonce), aad, &mut *buf).ok()?;
    Some(buf)
}

impl SecretsKey {
    /// A new key check for this key, to store when there is none yet.
    pub fn key_check(&self) -> Result<KeyCheck, CryptoError> {
        let sealed = seal_bytes(self, CHECK_AAD, CHECK_PLAINTEXT, "key check")?;
        let mut bytes = sealed.nonce.to_vec();
        bytes.extend_from_slice(&sealed.ciphertext);
        Ok(KeyCheck(bytes))
    }

    /// Check this key against the stored key check: the key the secrets
    /// were written with, or [`CryptoError::WrongKey`].
    pub fn verify(&self, stored: &KeyCheck) -> Result<CheckedKey<'_>, CryptoError> {
        let expected = NONCE_LEN + CHECK_PLAINTEXT.len() + TAG_LEN;
        if stored.0.len() != expected {
            return Err(CryptoError::DamagedKeyCheck { len: stored.0.len(), expected });
        }
        let (nonce, ciphertext) = stored.0.split_at(NONCE_LEN);
        match open_bytes(self, CHECK_AAD, nonce, ciphertext) {
            Some(plain) if plain.as_slice() == CHECK_PLAINTEXT => Ok(CheckedKey { key: self }),
            _ => Err(CryptoError::WrongKey { key: self.source().clone() }),
        }
    }
}

impl CheckedKey<'_> {
    /// Encrypt `value` as the secret at `at`, with a fresh nonce.
    pub fn seal(&self, at: &SecretAddress<'_>, value: &SecretValue) -> Result<Sealed, CryptoError> {
        seal_bytes(self.key, &at.associated_data(), value.expose().as_bytes(), at.name)
    }

    /// Decrypt the secret at `at`. Bytes that were altered, or that are
    /// another secret's (name, environment, app or version), are
    /// [`CryptoError::Tampered`].
    pub fn open(&self, at: &SecretAddress<'_>, nonce: &[u8], ciphertext: &[u8]) -> Result<SecretValue, CryptoError> {
        let tampered = || CryptoError::Tampered {
            app: at.app.clone(),
            environment: at.environment.clone(),
            name: at.name.to_string(),
            version: at.version,
        };
        let mut plain = open_bytes(self.key, &at.associated_data(), nonce, ciphertext).ok_or_else(tampered)?;
        match String::from_utf8(std::mem::take(&mut *plain)) {
            Ok(text) => Ok(SecretValue::from_checked(Zeroizing::new(text))),
            Err(e) => {
                e.into_bytes().zeroize();
                Err(tampered())
            }
        }
    }

    /// Where the key came from.
    pub fn source(&self) -> &KeySource {
        self.key.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn app() -> AppName {
        AppName::new("blog").unwrap()
    }
    fn prod() -> EnvironmentId {
        EnvironmentId::new("production").unwrap()
    }
    fn value(s: &str) -> SecretValue {
        SecretValue::new(s.to_string()).unwrap()
    }

    #[test]
    fn round_trip() {
        let key = SecretsKey::generate().unwrap();
        let check = key.key_check().unwrap();
        let checked = key.verify(&check).unwrap();
        let (app, env) = (app(), prod());
        let at = SecretAddress { app: &app, environment: &env, name: "DATABASE_URL", version: 1 };
        let v = value("postgres://blog:hunter2@db/blog");
        let sealed = checked.seal(&at, &v).unwrap();
        assert_eq!(sealed.ciphertext.len(), v.len() + TAG_LEN);
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(checked.open(&at, &sealed.nonce, &sealed.ciphertext).unwrap(), v);
        // A fresh nonce every time: the same value never seals the same.
        let again = checked.seal(&at, &v).unwrap();
        assert_ne!(again.nonce, sealed.nonce);
        assert_ne!(again.ciphertext, sealed.ciphertext);
        // Empty values too.
        let empty = checked.seal(&at, &value("")).unwrap();
        assert!(checked.open(&at, &empty.nonce, &empty.ciphertext).unwrap().is_empty());
    }

    #[test]
    fn wrong_key_is_named_before_anything_is_decrypted() {
        let right = SecretsKey::generate().unwrap();
        let check = right.key_check().unwrap();
        let wrong = SecretsKey::from_bytes([7; 32]);
        let e = wrong.verify(&check).unwrap_err();
        assert!(matches!(e, CryptoError::WrongKey { .. }));
        assert!(
            e.to_string().starts_with("the secrets key does not match the one these secrets were written with"),
            "{e}"
        );
        assert!(e.to_string().contains("NONSTOP_SECRETS_KEY"));
        // A damaged check is not taken for a wrong key.
        let mut cut = check.as_bytes().to_vec();
        cut.pop();
        assert!(matches!(
            right.verify(&KeyCheck::from_bytes(cut)),
            Err(CryptoError::DamagedKeyCheck { len, .. }) if len == check.as_bytes().len() - 1
        ));
    }

    #[test]
    fn tampered_or_moved_ciphertexts_are_refused() {
        let key = SecretsKey::generate().unwrap();
        let check = key.key_check().unwrap();
        let checked = key.verify(&check).unwrap();
        let (app, env) = (app(), prod());
        let staging = EnvironmentId::new("staging").unwrap();
        let other_app = AppName::new("shop").unwrap();
        let at = SecretAddress { app: &app, environment: &env, name: "API_TOKEN", version: 3 };
        let sealed = checked.seal(&at, &value("tok-123456")).unwrap();

        for moved in [
            SecretAddress { name: "OTHER_TOKEN", ..at },
            SecretAddress { environment: &staging, ..at },
            SecretAddress { app: &other_app, ..at },
            SecretAddress { version: 2, ..at },
        ] {
            let e = checked.open(&moved, &sealed.nonce, &sealed.ciphertext).unwrap_err();
            assert!(matches!(e, CryptoError::Tampered { .. }), "{moved:?}: {e}");
        }
        let mut flipped = sealed.ciphertext.clone();
        flipped[0] ^= 1;
        let e = checked.open(&at, &sealed.nonce, &flipped).unwrap_err();
        assert_eq!(
            e.to_string(),
            "secret API_TOKEN (version 3) of blog in production does not decrypt: its stored bytes were altered, \
             or copied from another secret; set it again with `nonstop secrets set API_TOKEN`"
        );
        let mut nonce = sealed.nonce;
        nonce[23] ^= 0x80;
        assert!(matches!(checked.open(&at, &nonce, &sealed.ciphertext), Err(CryptoError::Tampered { .. })));
        assert!(matches!(checked.open(&at, &nonce[..12], &sealed.ciphertext), Err(CryptoError::Tampered { .. })));
        assert!(matches!(checked.open(&at, &sealed.nonce, &[]), Err(CryptoError::Tampered { .. })));
        assert!(checked.open(&at, &sealed.nonce, &sealed.ciphertext).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_value_round_trips_and_any_flip_is_caught(
            text in "[^\u{0}]{0,200}",
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let key = SecretsKey::from_bytes([42; 32]);
            let check = key.key_check().unwrap();
            let checked = key.verify(&check).unwrap();
            let (app, env) = (app(), prod());
            let at = SecretAddress { app: &app, environment: &env, name: "X", version: 1 };
            let v = value(&text);
            let sealed = checked.seal(&at, &v).unwrap();
            prop_assert_eq!(checked.open(&at, &sealed.nonce, &sealed.ciphertext).unwrap(), v);
            let mut bad = sealed.ciphertext.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(checked.open(&at, &sealed.nonce, &bad).is_err());
        }

        #[test]
        fn addresses_never_share_associated_data(
            a in ("[a-z]{1,4}", "[a-z]{1,4}", "[A-Z_]{1,4}", 1u64..4),
            b in ("[a-z]{1,4}", "[a-z]{1,4}", "[A-Z_]{1,4}", 1u64..4),
        ) {
            let (app_a, env_a) = (AppName::new(a.0.clone()).unwrap(), EnvironmentId::new(a.1.clone()).unwrap());
            let (app_b, env_b) = (AppName::new(b.0.clone()).unwrap(), EnvironmentId::new(b.1.clone()).unwrap());
            let x = SecretAddress { app: &app_a, environment: &env_a, name: &a.2, version: a.3 };
            let y = SecretAddress { app: &app_b, environment: &env_b, name: &b.2, version: b.3 };
            prop_assert_eq!(x == y, x.associated_data() == y.associated_data());
        }
    }
}
