//! Secrets of nonstop: values an app receives as environment variables
//! that must not sit in `nonstop.toml` (passwords, tokens, keys).
//!
//! The building blocks, each usable on its own:
//!
//! - [`SecretsKey`] (`key`): the 32-byte key, from `NONSTOP_SECRETS_KEY`
//!   or `NONSTOP_HOME/secrets.key` (0600, created on the first write);
//! - [`CheckedKey`] (`crypto`): XChaCha20-Poly1305 with a random nonce per
//!   value and associated data binding each ciphertext to its app,
//!   environment, name and version; a [`KeyCheck`] tells a wrong key from
//!   damaged data before anything is decrypted;
//! - [`SecretValue`] (`value`): clear text, wiped on drop, printed as
//!   `[secret]`;
//! - [`SecretName`] (`name`): the rules of a secret's name;
//! - [`looks_like_credential`] (`hint`, pure): a plain `[env]` value that
//!   should be a secret;
//! - [`Redactor`] (`redact`, pure): secret values hidden in output.
//!
//! The store (`nonstop-store`, `secrets` table) keeps what this crate
//! produces as bytes and never sees clear text. The intended flow:
//!
//! ```text
//! set:   key   = SecretsKey::load_or_create(home, env_var)?
//!        check = store.put_secrets_key_check_if_absent(key.key_check()?.as_bytes(), now)?
//!        key   = key.verify(&KeyCheck::from_bytes(check))?          // WrongKey stops here
//!        v     = store.next_secret_version(app, env, name)?
//!        sealed = key.seal(&SecretAddress { app, environment, name, version: v }, &value)?
//!        store.put_secret(.. v, &sealed.nonce, &sealed.ciphertext ..)?
//! read:  rows  = store.current_secrets(app, env)?;  if empty: nothing to do (no key needed)
//!        key   = SecretsKey::load(home, env_var)?                   // Missing: restore or set
//!        key   = key.verify(&KeyCheck::from_bytes(store.secrets_key_check()?..))?
//!        value = key.open(&SecretAddress { .. row.name, version: row.version }, &row.nonce, &row.ciphertext)?
//! ```
//!
//! Pure apart from [`SecretsKey::load`], [`SecretsKey::load_or_create`]
//! (the key file) and the operating system's random numbers.

#![forbid(unsafe_code)]

mod crypto;
mod hint;
mod key;
mod name;
mod redact;
mod value;

pub use crypto::{CheckedKey, CryptoError, KeyCheck, Sealed, SecretAddress, NONCE_LEN, TAG_LEN};
pub use hint::{looks_like_credential, CredentialHint, HintReason, KEY_PREFIXES, REFERENCE_SUFFIXES};
pub use key::{KeyError, KeyOrigin, KeySource, MalformedKey, SecretsKey, GENERATE_HINT, KEY_ENV, KEY_FILE, KEY_LEN};
pub use name::{SecretName, SecretNameError, MAX_NAME_BYTES, RESERVED_PREFIX};
pub use redact::{Redactor, MIN_REDACTED_LEN};
pub use value::{SecretValue, SecretValueError, MAX_VALUE_BYTES};
