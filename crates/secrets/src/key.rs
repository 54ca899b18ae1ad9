//! The secrets key: 32 random bytes that encrypt every secret value.
//!
//! It lives in `NONSTOP_HOME/secrets.key` (mode 0600, base64 and a
//! newline), or comes from `NONSTOP_SECRETS_KEY` (base64 or hex), which
//! wins when set: a host whose state directory is backed up or shared can
//! keep the key elsewhere (a systemd credential, a secret manager). The
//! library never reads the process environment: the caller passes the
//! variable's value in.
//!
//! The store holds ciphertexts only, so a backup of the state database is
//! useless without the key, and the key must be backed up on its own.

use crate::crypto::CryptoError;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The key file's name in the state directory.
pub const KEY_FILE: &str = "secrets.key";

/// The environment variable that gives the key instead of the file.
pub const KEY_ENV: &str = "NONSTOP_SECRETS_KEY";

/// The key's length in bytes.
pub const KEY_LEN: usize = 32;

/// How to make a key by hand, for messages.
pub const GENERATE_HINT: &str = "head -c 32 /dev/urandom | base64";

/// Standard base64, with or without its padding.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_encode_padding(true).with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A key file larger than this is not a key (base64 of 32 bytes is 44).
const MAX_KEY_FILE: u64 = 1024;

/// The key that encrypts secret values. Its bytes are wiped when it is
/// dropped; `Debug` shows where it came from, never the bytes.
pub struct SecretsKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    source: KeySource,
}

/// Where a key came from (for messages and `doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `NONSTOP_SECRETS_KEY`.
    Env,
    /// The key file, as found.
    File(PathBuf),
    /// The key file, created by this call.
    Created(PathBuf),
    /// Made in memory ([`SecretsKey::generate`], [`SecretsKey::from_bytes`]).
    Memory,
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Env => write!(f, "{KEY_ENV}"),
            KeySource::File(p) => write!(f, "{}", p.display()),
            KeySource::Created(p) => write!(f, "{} (created now)", p.display()),
            KeySource::Memory => f.write_str("a key in memory"),
        }
    }
}

/// Where a malformed key was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOrigin {
    Env,
    File(PathBuf),
}

/// What is wrong with a malformed key's text (which is never repeated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MalformedKey {
    Empty,
    /// Neither 64 hex digits nor base64.
    NotEncoded {
        chars: usize,
    },
    /// Decodes, but not to 32 bytes.
    WrongLength {
        bytes: usize,
    },
    /// Not UTF-8 text at all.
    NotText,
}

impl fmt::Display for MalformedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MalformedKey::Empty => f.write_str("it is empty"),
            MalformedKey::NotEncoded { chars } => {
                write!(f, "its {chars} characters are neither base64 nor 64 hex digits")
            }
            MalformedKey::WrongLength { bytes } => write!(f, "it decodes to {bytes} bytes, not {KEY_LEN}"),
            MalformedKey::NotText => f.write_str("it is not text"),
        }
    }
}

/// Why no key could be had. Messages name the file or variable and the fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{KEY_ENV} is not a secrets key ({problem}): it must be {KEY_LEN} random bytes in base64 (44 characters) or hex (64 characters); generate one with `{GENERATE_HINT}`"
    )]
    MalformedEnv { problem: MalformedKey },
    #[error(
        "{path} is not a secrets key ({problem}): it must hold {KEY_LEN} bytes in base64 or hex; restore it from your backup, or set {KEY_ENV}"
    )]
    MalformedFile { path: PathBuf, problem: MalformedKey },
    #[error("the secrets key is missing: restore {path} from your backup or set {KEY_ENV}")]
    Missing { path: PathBuf },
    #[error(
        "the secrets key file {path} can be read by other users (mode {mode:03o}): make it private with `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the secrets key file {path} is not a regular file: replace it with the key file from your backup")]
    NotAFile { path: PathBuf },
    #[error("secrets key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Random(#[from] CryptoError),
}

impl KeyError {
    fn malformed(origin: &KeyOrigin, problem: MalformedKey) -> Self {
        match origin {
            KeyOrigin::Env => KeyError::MalformedEnv { problem },
            KeyOrigin::File(path) => KeyError::MalformedFile { path: path.clone(), problem },
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_path_buf(), source }
}

impl SecretsKey {
    /// A new random key, in memory only.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        crate::crypto::random(&mut bytes[..])?;
        Ok(Self { bytes, source: KeySource::Memory })
    }

    /// A key of the given bytes (tests, a future key rotation).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self { bytes: Zeroizing::new(bytes), source: KeySource::Memory }
    }

    /// Parse a key's text: 32 bytes as standard base64 (padding optional)
    /// or 64 hex digits, surrounding whitespace ignored. The error never
    /// repeats the text.
    pub fn parse(text: &str, origin: KeyOrigin) -> Result<Self, KeyError> {
        let source = match &origin {
            KeyOrigin::Env => KeySource::Env,
            KeyOrigin::File(p) => KeySource::File(p.clone()),
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(KeyError::malformed(&origin, MalformedKey::Empty));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            for (i, pair) in text.as_bytes().chunks(2).enumerate() {
                bytes[i] = (hex_digit(pair[0]) << 4) | hex_digit(pair[1]);
            }
            return Ok(Self { bytes, source });
        }
        let decoded = Zeroizing::new(
            BASE64
                .decode(text)
                .map_err(|_| KeyError::malformed(&origin, MalformedKey::NotEncoded { chars: text.chars().count() }))?,
        );
        if decoded.len() != KEY_LEN {
            return Err(KeyError::malformed(&origin, MalformedKey::WrongLength { bytes: decoded.len() }));
        }
        bytes.copy_from_slice(&decoded);
        Ok(Self { bytes, source })
    }

    /// The key to *write* secrets with: `env_var` (the value of
    /// `NONSTOP_SECRETS_KEY`, if set) when given, else `home/secrets.key`,
    /// created when missing (a new random key, mode 0600, written to a
    /// temporary file with `O_EXCL`, synced, and linked into place without
    /// replacing a key file another process created meanwhile; that one
    /// is used then).
    pub fn load_or_create(home: &Path, env_var: Option<&str>) -> Result<Self, KeyError> {
        if let Some(text) = env_var {
            return Self::parse(text, KeyOrigin::Env);
        }
        let path = home.join(KEY_FILE);
        match read_key_file(&path) {
            Err(KeyError::Missing { .. }) => create_key_file(home, &path),
            found => found,
        }
    }

    /// The key to *read* secrets with: like [`SecretsKey::load_or_create`]
    /// but never creates one. Call it when there are secrets to decrypt:
    /// a missing key file is then [`KeyError::Missing`].
    pub fn load(home: &Path, env_var: Option<&str>) -> Result<Self, KeyError> {
        if let Some(text) = env_var {
            return Self::parse(text, KeyOrigin::Env);
        }
        read_key_file(&home.join(KEY_FILE))
    }

    /// Where this key came from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// The key as standard base64 (what the key file holds, and what
    /// `NONSTOP_SECRETS_KEY` accepts): for a command that backs it up.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE64.encode(&self.bytes[..]))
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretsKey(from {})", self.source)
    }
}

fn hex_digit(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// Read and check the key file: a regular file, private to its owner,
/// holding a key.
fn read_key_file(path: &Path) -> Result<SecretsKey, KeyError> {
    let file = match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyError::Missing { path: path.to_path_buf() });
        }
        other => other.map_err(io_err(path))?,
    };
    // The opened file's metadata: what was checked is what is read.
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile { path: path.to_path_buf() });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed { path: path.to_path_buf(), mode });
    }
    let mut text = Zeroizing::new(String::new());
    match file.take(MAX_KEY_FILE + 1).read_to_string(&mut text) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(KeyError::MalformedFile { path: path.to_path_buf(), problem: MalformedKey::NotText });
        }
        Err(e) => return Err(io_err(path)(e)),
    }
    SecretsKey::parse(&text, KeyOrigin::File(path.to_path_buf()))
}

/// Create `path` with a new key. A plain `rename` would replace a key file
/// that another process created between our look and our write (and whose
/// key may already have encrypted something); a hard link fails instead,
/// and the key found there is used.
fn create_key_file(home: &Path, path: &Path) -> Result<SecretsKey, KeyError> {
    let key = SecretsKey::generate()?;
    let mut tag = [0u8; 8];
    crate::crypto::random(&mut tag)?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = home.join(format!(".{KEY_FILE}.{}.{tag}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true) // O_CREAT | O_EXCL
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let mut text = key.to_base64();
        text.push('\n');
        file.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return read_key_file(path),
        Err(e) => return Err(io_err(path)(e)),
    }
    // The new directory entry must survive a crash as well.
    std::fs::File::open(home).and_then(|d| d.sync_all()).map_err(io_err(home))?;
    Ok(SecretsKey { bytes: key.bytes.clone(), source: KeySource::Created(path.to_path_buf()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::MetadataExt;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn env_key_in_base64_or_hex() {
        let home = tempfile::tempdir().unwrap();
        let from_hex = SecretsKey::load_or_create(home.path(), Some(HEX)).unwrap();
        let b64 = BASE64.encode((0u8..32).collect::<Vec<_>>());
        let from_b64 = SecretsKey::load(home.path(), Some(&format!("  {b64}\n"))).unwrap();
        let unpadded = SecretsKey::load(home.path(), Some(b64.trim_end_matches('='))).unwrap();
        assert_eq!(from_hex.bytes(), from_b64.bytes());
        assert_eq!(from_hex.bytes(), unpadded.bytes());
        assert_eq!(from_hex.bytes()[31], 31);
        assert_eq!(from_hex.source(), &KeySource::Env);
        assert_eq!(SecretsKey::load(home.path(), Some(&HEX.to_uppercase())).unwrap().bytes(), from_hex.bytes());
        // The environment wins: no file was created.
        assert!(!home.path().join(KEY_FILE).exists());
    }

    #[test]
    fn malformed_env_key_names_the_format_and_how_to_make_one() {
        let home = tempfile::tempdir().unwrap();
        let short = BASE64.encode([7u8; 31]);
        for (text, problem) in [
            ("", MalformedKey::Empty),
            ("  \n", MalformedKey::Empty),
            ("not a key!", MalformedKey::NotEncoded { chars: 10 }),
            ("c2hvcnQ=", MalformedKey::WrongLength { bytes: 5 }),
            (&short, MalformedKey::WrongLength { bytes: 31 }),
            (&HEX[..62], MalformedKey::NotEncoded { chars: 62 }),
        ] {
            let e = SecretsKey::load_or_create(home.path(), Some(text)).unwrap_err();
            assert!(matches!(e, KeyError::MalformedEnv { problem: p } if p == problem), "{text:?}: {e}");
            let msg = e.to_string();
            assert!(msg.contains("NONSTOP_SECRETS_KEY"), "{msg}");
            assert!(msg.contains("base64") && msg.contains("hex"), "{msg}");
            assert!(msg.contains("head -c 32 /dev/urandom | base64"), "{msg}");
        }
        // Never creates a file in place of a bad variable.
        assert!(!home.path().join(KEY_FILE).exists());
        // The message never repeats the text (it may be a real key cut short).
        let e = SecretsKey::load(home.path(), Some("c2VjcmV0LXNlY3JldA")).unwrap_err();
        assert!(!e.to_string().contains("c2VjcmV0LXNlY3JldA"));
    }

    #[test]
    fn created_once_private_and_found_again() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join(KEY_FILE);
        let first = SecretsKey::load_or_create(home.path(), None).unwrap();
        assert_eq!(first.source(), &KeySource::Created(path.clone()));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 45, "base64 of 32 bytes and a newline");
        let again = SecretsKey::load_or_create(home.path(), None).unwrap();
        assert_eq!(again.source(), &KeySource::File(path.clone()));
        assert_eq!(first.bytes(), again.bytes());
        assert_eq!(SecretsKey::load(home.path(), None).unwrap().bytes(), first.bytes());
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(home.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEY_FILE)]);
        // The text it holds is accepted as NONSTOP_SECRETS_KEY.
        assert_eq!(SecretsKey::load(home.path(), Some(&text)).unwrap().bytes(), first.bytes());
    }

    #[test]
    fn load_never_creates_and_says_how_to_recover() {
        let home = tempfile::tempdir().unwrap();
        let e = SecretsKey::load(home.path(), None).unwrap_err();
        let path = home.path().join(KEY_FILE);
        assert!(matches!(&e, KeyError::Missing { path: p } if *p == path));
        assert_eq!(
            e.to_string(),
            format!(
                "the secrets key is missing: restore {} from your backup or set NONSTOP_SECRETS_KEY",
                path.display()
            )
        );
        assert!(!path.exists());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join(KEY_FILE);
        SecretsKey::load_or_create(home.path(), None).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            for e in [
                SecretsKey::load(home.path(), None).unwrap_err(),
                SecretsKey::load_or_create(home.path(), None).unwrap_err(),
            ] {
                assert!(matches!(e, KeyError::Exposed { mode: m, .. } if m == mode), "{e}");
                let msg = e.to_string();
                assert!(msg.contains(&format!("chmod 600 {}", path.display())), "{msg}");
            }
        }
        // Refusing changed nothing: the file is still there, as it was.
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o660);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(SecretsKey::load(home.path(), None).is_ok());
    }

    #[test]
    fn a_damaged_key_file_is_refused_not_replaced() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join(KEY_FILE);
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
        let e = SecretsKey::load_or_create(home.path(), None).unwrap_err();
        assert!(matches!(e, KeyError::MalformedFile { problem: MalformedKey::Empty, .. }), "{e}");
        assert!(e.to_string().contains("restore it from your backup"));
        std::fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            SecretsKey::load(home.path(), None),
            Err(KeyError::MalformedFile { problem: MalformedKey::NotText, .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), [0xff, 0xfe, 0x00]);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(SecretsKey::load(home.path(), None), Err(KeyError::NotAFile { .. })));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = SecretsKey::from_bytes([0xab; 32]);
        let shown = format!("{key:?}");
        assert_eq!(shown, "SecretsKey(from a key in memory)");
        assert!(!shown.to_lowercase().contains("abab"));
    }

    proptest! {
        #[test]
        fn base64_and_hex_round_trip(bytes in proptest::array::uniform32(any::<u8>())) {
            let key = SecretsKey::from_bytes(bytes);
            let b64 = key.to_base64();
            let back = SecretsKey::parse(&b64, KeyOrigin::Env).unwrap();
            prop_assert_eq!(back.bytes(), &bytes);
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let from_hex = SecretsKey::parse(&hex, KeyOrigin::Env).unwrap();
            prop_assert_eq!(from_hex.bytes(), &bytes);
        }

        #[test]
        fn any_text_is_a_key_or_a_clear_error(text in ".{0,80}") {
            match SecretsKey::parse(&text, KeyOrigin::Env) {
                Ok(_) => {}
                Err(e) => {
                    prop_assert!(matches!(e, KeyError::MalformedEnv { .. }), "{}", e);
                    prop_assert!(e.to_string().contains(GENERATE_HINT));
                }
            }
        }
    }
}
