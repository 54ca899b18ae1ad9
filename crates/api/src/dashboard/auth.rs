//! The dashboard's authentication: single-use login tokens exchanged for a
//! session token that the page keeps in `sessionStorage` and sends in
//! `Authorization: Session <token>`. No cookie: nothing is sent by the
//! browser on its own, so no other server on 127.0.0.1 (the apps, the
//! proxy) ever sees a session, and no other site can make the browser use
//! one (no CSRF to guard against).
//!
//! - A **login token** (`nonstop dashboard`) is 32 random bytes, valid for
//!   [`LOGIN_TTL`], once: only its SHA-256 is kept, in memory, and redeeming
//!   it removes it. A daemon restarted in between has forgotten it (run
//!   `nonstop dashboard` again).
//! - A **session** is `EPOCH.EXPIRY.NONCE.MAC`, the MAC an HMAC-SHA256 under
//!   a key derived from the API token. It lasts [`SESSION_TTL`] from the
//!   login (not extended by use), survives daemon restarts and upgrades,
//!   and ends with the API token, or when any session logs out: that
//!   replaces the **session epoch** (random, kept by the daemon in
//!   `$NONSTOP_HOME`, see [`super::Dashboard`]), which every session
//!   names, so every session opened before is refused from then on.
//!
//! Time is a parameter everywhere: the tests move it instead of sleeping.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;

/// How long a login token may wait to be used.
pub const LOGIN_TTL: Duration = Duration::from_secs(120);
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Login tokens kept at most (the oldest go first): `nonstop dashboard`
/// run in a loop cannot grow the daemon's memory.
const MAX_PENDING: usize = 256;

/// Why a login token was refused. The words go to the browser.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error(
        "this login link was already used, or was made by a daemon that has restarted since; run `nonstop dashboard` \
         for a new one"
    )]
    Unknown,
    #[error("this login link expired (they last {} s); run `nonstop dashboard` for a new one", LOGIN_TTL.as_secs())]
    Expired,
}

/// A session that was opened: the token the page sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub value: String,
    pub expires: SystemTime,
}

/// The session epoch: every session names the one it was opened in, and
/// only the current one's are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(pub u64);

impl Epoch {
    /// A new random epoch.
    pub fn random() -> Result<Epoch, getrandom::Error> {
        Ok(Epoch(u64::from_be_bytes(random::<8>()?)))
    }

    /// As it is written down (16 hex digits).
    pub fn to_text(self) -> String {
        format!("{:016x}", self.0)
    }

    /// As [`Epoch::to_text`] writes it; `None` for anything else.
    pub fn parse(text: &str) -> Option<Epoch> {
        let t = text.trim();
        let hex = t.len() == 16 && t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        hex.then(|| u64::from_str_radix(t, 16).ok().map(Epoch)).flatten()
    }
}

pub struct Auth {
    key: [u8; 32],
    /// The API's bearer token (also accepted by the dashboard's listener).
    api_token: String,
    /// SHA-256 of each login token not yet used, and when it expires.
    pending: Mutex<HashMap<[u8; 32], SystemTime>>,
    /// The current session epoch.
    epoch: Mutex<Epoch>,
}

fn millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 (RFC 2104), by RustCrypto's `hmac`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Equal without telling where they differ (`subtle`); an empty `b` is
/// never matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    !b.is_empty() && bool::from(a.ct_eq(b))
}

/// Random bytes from the OS.
fn random<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf)?;
    Ok(buf)
}

impl Auth {
    /// Sessions are signed with a key derived from `api_token`; those of
    /// `epoch` are accepted.
    pub fn new(api_token: &str, epoch: Epoch) -> Auth {
        Auth {
            key: hmac_sha256(api_token.as_bytes(), b"nonstop dashboard sessions v2"),
            api_token: api_token.to_string(),
            pending: Mutex::new(HashMap::new()),
            epoch: Mutex::new(epoch),
        }
    }

    /// A new login token, valid once until `now + LOGIN_TTL`.
    pub fn issue_login(&self, now: SystemTime) -> Result<String, getrandom::Error> {
        let token = hex(&random::<32>()?);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, expires| *expires > now);
        while pending.len() >= MAX_PENDING {
            let Some(oldest) = pending.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) else { break };
            pending.remove(&oldest);
        }
        pending.insert(Sha256::digest(token.as_bytes()).into(), now + LOGIN_TTL);
        Ok(token)
    }

    /// Use a login token (it is gone afterwards, whatever the answer) and
    /// open a session.
    pub fn redeem(&self, token: &str, now: SystemTime) -> Result<Session, LoginError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let expires = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&digest);
        match expires {
            None => Err(LoginError::Unknown),
            Some(e) if e <= now => Err(LoginError::Expired),
            Some(_) => Ok(self.open_session(now).map_err(|_| LoginError::Unknown)?),
        }
    }

    fn mac(&self, payload: &str) -> String {
        hex(&hmac_sha256(&self.key, format!("session.{payload}").as_bytes()))
    }

    fn open_session(&self, now: SystemTime) -> Result<Session, getrandom::Error> {
        let expires = now + SESSION_TTL;
        let payload = format!("{}.{}.{}", self.epoch().to_text(), millis(expires), hex(&random::<16>()?));
        Ok(Session { value: format!("{payload}.{}", self.mac(&payload)), expires })
    }

    /// Whether `value` is a session this daemon (or one with the same API
    /// token) opened in the current epoch, not yet expired.
    pub fn session_valid(&self, value: &str, now: SystemTime) -> bool {
        let Some((payload, mac)) = value.rsplit_once('.') else { return false };
        let mut parts = payload.split('.');
        let (Some(epoch), Some(expires), Some(_nonce), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        if !constant_time_eq(mac.as_bytes(), self.mac(payload).as_bytes()) {
            return false;
        }
        Epoch::parse(epoch) == Some(self.epoch()) && expires.parse::<u64>().is_ok_and(|e| e > millis(now))
    }

    /// The current session epoch.
    pub fn epoch(&self) -> Epoch {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every session opened so far is refused from now on: a new random
    /// epoch, returned for the caller to keep where a restarted daemon
    /// finds it.
    pub fn revoke_all(&self) -> Result<Epoch, getrandom::Error> {
        let mut epoch = self.epoch.lock().unwrap_or_else(|e| e.into_inner());
        let next = loop {
            let e = Epoch::random()?;
            if e != *epoch {
                break e;
            }
        };
        *epoch = next;
        Ok(next)
    }

    /// Whether `given` is the API's bearer token.
    pub fn bearer_valid(&self, given: &str) -> bool {
        constant_time_eq(given.as_bytes(), self.api_token.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    const E: Epoch = Epoch(0x0123_4567_89ab_cdef);

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(hex(&mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    #[test]
    fn a_login_token_works_once() {
        let auth = Auth::new("api-token", E);
        let token = auth.issue_login(t(0)).unwrap();
        let session = auth.redeem(&token, t(1)).unwrap();
        assert!(auth.session_valid(&session.value, t(2)));
        assert_eq!(auth.redeem(&token, t(2)), Err(LoginError::Unknown));
        // The session is not the login token, nor the other way round.
        assert!(!auth.session_valid(&token, t(2)));
        assert_ne!(session.value, token);
    }

    #[test]
    fn a_login_token_expires_and_is_gone_after_a_late_try() {
        let auth = Auth::new("api-token", E);
        let token = auth.issue_login(t(0)).unwrap();
        assert_eq!(auth.redeem(&token, t(LOGIN_TTL.as_secs())), Err(LoginError::Expired));
        assert_eq!(auth.redeem(&token, t(1)), Err(LoginError::Unknown));
        assert_eq!(auth.redeem("", t(0)), Err(LoginError::Unknown));
    }

    #[test]
    fn sessions_expire_and_belong_to_their_api_token_and_epoch() {
        let auth = Auth::new("api-token", E);
        let token = auth.issue_login(t(0)).unwrap();
        let session = auth.redeem(&token, t(0)).unwrap();
        assert_eq!(session.expires, t(SESSION_TTL.as_secs()));
        assert!(auth.session_valid(&session.value, t(SESSION_TTL.as_secs() - 1)));
        assert!(!auth.session_valid(&session.value, t(SESSION_TTL.as_secs())));
        // Another daemon (another API token), or the same after the token
        // was replaced, does not know it; a daemon restarted with the same
        // token and epoch does, one with another epoch does not.
        assert!(!Auth::new("other-token", E).session_valid(&session.value, t(1)));
        assert!(Auth::new("api-token", E).session_valid(&session.value, t(1)));
        assert!(!Auth::new("api-token", Epoch(E.0 + 1)).session_valid(&session.value, t(1)));
    }

    #[test]
    fn revoking_ends_every_session_of_the_epoch_and_not_the_next_ones() {
        let auth = Auth::new("api-token", E);
        let a = auth.redeem(&auth.issue_login(t(0)).unwrap(), t(0)).unwrap();
        let b = auth.redeem(&auth.issue_login(t(0)).unwrap(), t(0)).unwrap();
        let next = auth.revoke_all().unwrap();
        assert_ne!(next, E);
        assert_eq!(auth.epoch(), next);
        assert!(!auth.session_valid(&a.value, t(1)));
        assert!(!auth.session_valid(&b.value, t(1)));
        let c = auth.redeem(&auth.issue_login(t(1)).unwrap(), t(1)).unwrap();
        assert!(auth.session_valid(&c.value, t(2)));
        // A daemon restarted with the new epoch agrees; one with the old
        // (a lost write) would not refuse a and b, hence the file.
        assert!(Auth::new("api-token", next).session_valid(&c.value, t(2)));
        assert!(!Auth::new("api-token", next).session_valid(&a.value, t(2)));
    }

    #[test]
    fn pending_logins_are_bounded() {
        let auth = Auth::new("api-token", E);
        let first = auth.issue_login(t(0)).unwrap();
        for i in 0..MAX_PENDING as u64 {
            auth.issue_login(t(1 + i / 100)).unwrap();
        }
        assert!(auth.pending.lock().unwrap().len() <= MAX_PENDING);
        assert_eq!(auth.redeem(&first, t(5)), Err(LoginError::Unknown));
    }

    proptest! {
        #[test]
        fn a_changed_session_is_refused(flip in 0usize..200, secs in 0u64..1000) {
            let auth = Auth::new("api-token", E);
            let session = auth.redeem(&auth.issue_login(t(0)).unwrap(), t(0)).unwrap().value;
            let mut bytes = session.clone().into_bytes();
            let i = flip % bytes.len();
            bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert!(!auth.session_valid(&changed, t(secs)));
            prop_assert!(auth.session_valid(&session, t(secs)));
        }

        #[test]
        fn epochs_read_as_they_are_written(n in any::<u64>(), junk in "[^0-9a-f]{0,20}") {
            prop_assert_eq!(Epoch::parse(&Epoch(n).to_text()), Some(Epoch(n)));
            prop_assert_eq!(Epoch::parse(&format!("{}\n", Epoch(n).to_text())), Some(Epoch(n)));
            prop_assert_eq!(Epoch::parse(&junk), None);
        }
    }
}
