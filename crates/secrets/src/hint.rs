//! [`looks_like_credential`]: does a plain `[env]` variable of
//! `nonstop.toml` look like something that belongs in `nonstop secrets`?
//! Pure; a hint for a warning, never a refusal, so it leans towards
//! saying nothing when unsure.
//!
//! The rules, first match wins:
//!
//! 1. **A password in a URL**: `scheme://user:password@host`, anywhere in
//!    the value (a list of URLs too), whatever the name. The user may be
//!    empty (`redis://:password@host`); `scheme://user@host` has no
//!    password and is fine. The userinfo is read as RFC 3986 has it: it
//!    ends before the first `/`, `?` or `#` after `://`.
//! 2. **A well-known credential format**: a PEM private key
//!    (`-----BEGIN ... PRIVATE KEY-----`), or a token with the prefix of a
//!    well-known service and at least 20 characters (GitHub `ghp_`,
//!    `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`; GitLab `glpat-`;
//!    Slack `xoxb-`, `xoxp-`, `xoxa-`; Stripe `sk_live_`, `rk_live_`).
//! 3. **A name that says credential**, case-insensitive, read word by
//!    word (words are split at `_` and any other character that is not a
//!    letter or digit):
//!    - a word ending in `SECRET`/`SECRETS` (`JWT_SECRET`, `CLIENTSECRET`),
//!      `PASSWORD`/`PASSWORDS`, `PASSWD`, `PASSPHRASE`, `TOKEN`/`TOKENS`
//!      (`GITHUB_TOKEN`, `ACCESSTOKEN`), `CREDENTIAL`/`CREDENTIALS`;
//!    - the word `PASS` (`SMTP_PASS`);
//!    - the word `KEY` or `KEYS` (`*_KEY`, `KEY_*`, `*_KEY_*`), or a word
//!      ending in `KEY` after a credential prefix (`APIKEY`, `SECRETKEY`,
//!      `PRIVATEKEY`, `ACCESSKEY`, ... see [`KEY_PREFIXES`]). A word that
//!      merely ends in KEY (`MONKEY_PATCH`, `HOTKEY`) or starts with it
//!      (`KEYBOARD_LAYOUT`) is not one.
//!
//!    Not when the name says the value is not the credential itself:
//!    - its last word is a reference or a setting *about* a credential
//!      ([`REFERENCE_SUFFIXES`]: `PASSWORD_FILE`, `TOKEN_URL`,
//!      `AWS_ACCESS_KEY_ID`, `TOKEN_TTL`, `CACHE_KEY_PREFIX`, ...);
//!    - a word says it is public (`PUBLIC`, `PUB`, `PUBLISHABLE`:
//!      `VAPID_PUBLIC_KEY`, `STRIPE_PUBLISHABLE_KEY`);
//!
//!    nor when the value cannot be a credential: empty, a boolean or
//!    `none`/`null` word, or a path (starting with `/`, `./`, `../`, `~/`).

use std::fmt;

/// Last words that make a variable a reference to a credential, or a
/// setting about one, rather than the credential.
pub const REFERENCE_SUFFIXES: &[&str] = &[
    "FILE",
    "FILES",
    "PATH",
    "DIR",
    "URL",
    "URI",
    "ENDPOINT",
    "HOST",
    "PORT",
    "NAME",
    "ID",
    "USER",
    "USERNAME",
    "HEADER",
    "PREFIX",
    "FIELD",
    "PARAM",
    "LENGTH",
    "LEN",
    "SIZE",
    "BITS",
    "TTL",
    "TIMEOUT",
    "EXPIRY",
    "EXPIRES",
    "EXPIRATION",
    "LIFETIME",
    "AGE",
    "ALGORITHM",
    "ALG",
    "TYPE",
    "FORMAT",
    "VERSION",
    "COUNT",
    "ENABLED",
    "DISABLED",
    "REQUIRED",
    "MIN",
    "MAX",
    "POLICY",
];

/// Prefixes that make a word ending in KEY a credential (`APIKEY`).
pub const KEY_PREFIXES: &[&str] = &[
    "API",
    "ACCESS",
    "SECRET",
    "PRIVATE",
    "SIGNING",
    "MASTER",
    "ENCRYPTION",
    "LICENSE",
    "AUTH",
    "APP",
    "CLIENT",
    "SERVICE",
    "SESSION",
    "CRYPT",
    "HMAC",
    "JWT",
    "WEBHOOK",
    "DEPLOY",
];

const PUBLIC_WORDS: &[&str] = &["PUBLIC", "PUB", "PUBLISHABLE"];

const WORD_SUFFIXES: &[&str] = &[
    "SECRET",
    "SECRETS",
    "PASSWORD",
    "PASSWORDS",
    "PASSWD",
    "PASSPHRASE",
    "TOKEN",
    "TOKENS",
    "CREDENTIAL",
    "CREDENTIALS",
];

const NOT_CREDENTIAL_VALUES: &[&str] = &["true", "false", "yes", "no", "on", "off", "none", "null", "0", "1"];

const TOKEN_PREFIXES: &[(&str, &str)] = &[
    ("ghp_", "a GitHub token"),
    ("gho_", "a GitHub token"),
    ("ghu_", "a GitHub token"),
    ("ghs_", "a GitHub token"),
    ("ghr_", "a GitHub token"),
    ("github_pat_", "a GitHub token"),
    ("glpat-", "a GitLab token"),
    ("xoxb-", "a Slack token"),
    ("xoxp-", "a Slack token"),
    ("xoxa-", "a Slack token"),
    ("sk_live_", "a Stripe secret key"),
    ("rk_live_", "a Stripe restricted key"),
];

/// Why a variable looks like a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HintReason {
    /// `scheme://user:password@...`
    PasswordInUrl { scheme: String },
    /// The value has the shape of a known credential (`a PEM private key`).
    KnownFormat { what: &'static str },
    /// A word of the name says credential (`PASSWORD`, as written).
    SensitiveName { word: String },
}

/// A plain `[env]` variable that looks like a credential, and what to do.
/// Its `Display` is the whole message; it never shows the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialHint {
    pub name: String,
    pub reason: HintReason,
}

impl fmt::Display for CredentialHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.name;
        write!(f, "[env] {name} looks like a credential (")?;
        match &self.reason {
            HintReason::PasswordInUrl { scheme } if scheme.is_empty() => write!(f, "its URL holds a password")?,
            HintReason::PasswordInUrl { scheme } => write!(f, "its {scheme}:// URL holds a password")?,
            HintReason::KnownFormat { what } => write!(f, "its value looks like {what}")?,
            HintReason::SensitiveName { word } => write!(f, "its name says {word}")?,
        }
        write!(
            f,
            "): nonstop.toml is plain text that ends up in version control and backups; \
             store it with `nonstop secrets set {name}` and remove it from [env]"
        )
    }
}

/// Whether the plain `[env]` variable `name = value` looks like a
/// credential (see the module's documentation for the rules).
pub fn looks_like_credential(name: &str, value: &str) -> Option<CredentialHint> {
    let hint = |reason| Some(CredentialHint { name: name.to_string(), reason });
    if let Some(scheme) = url_with_password(value) {
        return hint(HintReason::PasswordInUrl { scheme: scheme.to_string() });
    }
    if let Some(what) = known_format(value) {
        return hint(HintReason::KnownFormat { what });
    }
    if value_may_be_credential(value) {
        if let Some(word) = sensitive_word(name) {
            return hint(HintReason::SensitiveName { word });
        }
    }
    None
}

/// The scheme of the first URL in `value` that carries a password.
fn url_with_password(value: &str) -> Option<&str> {
    let mut from = 0;
    while let Some(found) = value[from..].find("://") {
        let at = from + found;
        let scheme_start = value[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
            .map_or(0, |i| i + 1);
        let rest = &value[at + 3..];
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some(userinfo_end) = authority.rfind('@') {
            // The userinfo cannot hold whitespace: what is before it is
            // another word of the value.
            let userinfo = &authority[..userinfo_end];
            let userinfo = &userinfo[userinfo.rfind(char::is_whitespace).map_or(0, |i| i + 1)..];
            if userinfo.split_once(':').is_some_and(|(_, password)| !password.is_empty()) {
                return Some(&value[scheme_start..at]);
            }
        }
        from = at + 3;
    }
    None
}

fn known_format(value: &str) -> Option<&'static str> {
    let v = value.trim();
    if v.contains("-----BEGIN") && v.contains("PRIVATE KEY-----") {
        return Some("a PEM private key");
    }
    if v.len() >= 20 {
        return TOKEN_PREFIXES.iter().find(|(p, _)| v.starts_with(p)).map(|(_, what)| *what);
    }
    None
}

fn value_may_be_credential(value: &str) -> bool {
    let v = value.trim();
    !(v.is_empty()
        || NOT_CREDENTIAL_VALUES.iter().any(|w| v.eq_ignore_ascii_case(w))
        || ["/", "./", "../", "~/"].iter().any(|p| v.starts_with(p)))
}

/// The word of `name` that makes it a credential's name, as written.
fn sensitive_word(name: &str) -> Option<String> {
    let words: Vec<&str> = name.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let last = upper.last()?;
    if REFERENCE_SUFFIXES.contains(&last.as_str()) || upper.iter().any(|w| PUBLIC_WORDS.contains(&w.as_str())) {
        return None;
    }
    let sensitive = |w: &str| {
        WORD_SUFFIXES.iter().any(|s| w.ends_with(s))
            || w == "PASS"
            || w == "KEY"
            || w == "KEYS"
            || w.strip_suffix("KEY").is_some_and(|prefix| KEY_PREFIXES.contains(&prefix))
    };
    upper.iter().position(|w| sensitive(w)).map(|i| words[i].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reason(name: &str, value: &str) -> Option<HintReason> {
        looks_like_credential(name, value).map(|h| h.reason)
    }
    fn url(scheme: &str) -> Option<HintReason> {
        Some(HintReason::PasswordInUrl { scheme: scheme.into() })
    }
    fn word(w: &str) -> Option<HintReason> {
        Some(HintReason::SensitiveName { word: w.into() })
    }

    #[test]
    fn passwords_in_urls() {
        assert_eq!(reason("DATABASE_URL", "postgres://blog:hunter2@db:5432/blog"), url("postgres"));
        assert_eq!(reason("REDIS_URL", "redis://:s3cret@127.0.0.1:6379/0"), url("redis"));
        assert_eq!(reason("X", "amqp+ssl://u:p@h"), url("amqp+ssl"));
        assert_eq!(reason("NODES", "redis://a:6379, redis://user:pw@b:6379"), url("redis"));
        assert_eq!(reason("X", "see ://u:p@h"), url(""));
        // No password: nothing to hide.
        assert_eq!(reason("DATABASE_URL", "postgres://blog@db/blog"), None);
        assert_eq!(reason("DATABASE_URL", "postgres://blog:@db/blog"), None);
        assert_eq!(reason("DATABASE_URL", "postgres:///blog"), None);
        assert_eq!(reason("SITE", "https://example.com/a:b@c"), None);
        assert_eq!(reason("SITE", "https://example.com?x=a:b@c"), None);
        assert_eq!(reason("SITE", "https://example.com:8443/"), None);
        assert_eq!(reason("MAILTO", "contact me:now at a@b.c, https://x.y/"), None);
        // The name does not matter.
        assert_eq!(reason("TOKEN_URL", "https://id:secret@auth.example.com/token"), url("https"));
    }

    #[test]
    fn known_formats() {
        let pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1r\n-----END OPENSSH PRIVATE KEY-----";
        assert_eq!(reason("DEPLOY", pem), Some(HintReason::KnownFormat { what: "a PEM private key" }));
        assert_eq!(reason("CERT", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"), None);
        assert_eq!(
            reason("GH", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
            Some(HintReason::KnownFormat { what: "a GitHub token" })
        );
        assert_eq!(
            reason("STRIPE", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
            Some(HintReason::KnownFormat { what: "a Stripe secret key" })
        );
        assert_eq!(reason("PREFIX", "ghp_"), None);
    }

    #[test]
    fn names() {
        for (name, w) in [
            ("SECRET_KEY", "SECRET"),
            ("DJANGO_SECRET_KEY", "SECRET"),
            ("SECRET_KEY_BASE", "SECRET"),
            ("JWT_SECRET", "SECRET"),
            ("OAUTH_CLIENTSECRET", "CLIENTSECRET"),
            ("DB_PASSWORD", "PASSWORD"),
            ("db_password", "password"),
            ("SMTP_PASS", "PASS"),
            ("MYSQL_PASSWD", "PASSWD"),
            ("GPG_PASSPHRASE", "PASSPHRASE"),
            ("GITHUB_TOKEN", "TOKEN"),
            ("SLACK_ACCESSTOKEN", "ACCESSTOKEN"),
            ("AWS_SECRET_ACCESS_KEY", "SECRET"),
            ("STRIPE_API_KEY", "KEY"),
            ("KEY", "KEY"),
            ("KEY_PASSWORD", "KEY"),
            ("SENDGRID_APIKEY", "APIKEY"),
            ("apiKey", "apiKey"),
            ("SIGNING_KEYS", "KEYS"),
            ("SERVICE_CREDENTIALS", "CREDENTIALS"),
            ("my-app.token", "token"),
        ] {
            assert_eq!(reason(name, "c0rrect-h0rse-battery"), word(w), "{name}");
        }
        for name in [
            "KEYBOARD_LAYOUT",
            "MONKEY_PATCH",
            "HOTKEY",
            "TOKENIZERS_PARALLELISM",
            "SECRETARY_EMAIL",
            "PASSWORDLESS_LOGIN",
            "PASSENGERS",
            "POSTGRES_PASSWORD_FILE",
            "AWS_ACCESS_KEY_ID",
            "OAUTH_TOKEN_URL",
            "TOKEN_TTL",
            "CACHE_KEY_PREFIX",
            "PASSWORD_MIN_LENGTH",
            "VAPID_PUBLIC_KEY",
            "STRIPE_PUBLISHABLE_KEY",
            "SSH_PUB_KEY",
            "DATABASE_URL",
            "PORT",
            "",
            "___",
        ] {
            assert_eq!(reason(name, "c0rrect-h0rse-battery"), None, "{name}");
        }
        // Values that cannot be the credential.
        for value in ["", "  ", "true", "False", "0", "1", "none", "/run/secrets/db", "./key.pem", "~/.token"] {
            assert_eq!(reason("DB_PASSWORD", value), None, "{value:?}");
        }
        assert_eq!(reason("DB_PASSWORD", "12345678"), word("PASSWORD"));
    }

    #[test]
    fn message_says_what_to_do_and_never_shows_the_value() {
        let h = looks_like_credential("DATABASE_URL", "postgres://blog:hunter2@db/blog").unwrap();
        let msg = h.to_string();
        assert_eq!(
            msg,
            "[env] DATABASE_URL looks like a credential (its postgres:// URL holds a password): nonstop.toml is \
             plain text that ends up in version control and backups; store it with `nonstop secrets set \
             DATABASE_URL` and remove it from [env]"
        );
        let h = looks_like_credential("API_TOKEN", "hunter2hunter2").unwrap();
        assert!(h.to_string().contains("(its name says TOKEN)"));
        assert!(!h.to_string().contains("hunter2"));
    }

    proptest! {
        #[test]
        fn ordinary_names_and_values_get_no_hint(
            // Letters that spell none of the words the rules look for.
            name in "[BFGJMQUVXZ_]{1,24}",
            value in "[^:]{0,40}",
        ) {
            prop_assume!(known_format(&value).is_none());
            prop_assert_eq!(looks_like_credential(&name, &value), None);
        }

        #[test]
        fn a_password_in_a_url_is_always_found(
            name in "[A-Za-z_]{0,20}",
            scheme in "[a-z][a-z0-9+.-]{0,10}",
            user in "[a-z0-9]{0,8}",
            password in "[A-Za-z0-9._~!$&'()*+,;=-]{1,16}",
            host in "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
            path in "(/[a-z0-9]{0,8}){0,3}",
            before in "([a-z ]{0,10} )?",
        ) {
            let value = format!("{before}{scheme}://{user}:{password}@{host}{path}");
            prop_assert_eq!(reason(&name, &value), url(&scheme));
        }

        #[test]
        fn a_url_without_a_password_is_not_one(
            scheme in "[a-z][a-z0-9+.-]{0,10}",
            user in "([a-z0-9]{1,8}@)?",
            host in "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
            path in "(/[a-z0-9:@]{0,8}){0,3}",
        ) {
            let value = format!("{scheme}://{user}{host}{path}");
            prop_assert_eq!(url_with_password(&value), None);
        }

        #[test]
        fn sensitive_words_are_found_in_any_case_and_position(
            before in "([BFGJMQUVXZ]{1,6}_){0,2}",
            w in prop::sample::select(vec!["SECRET", "PASSWORD", "PASSWD", "TOKEN", "KEY", "APIKEY", "PASS"]),
            after in "(_[BFGJMQUVXZ]{1,6}){0,2}",
            lower in any::<bool>(),
            value in "[A-Za-z0-9]{8,30}",
        ) {
            let name = format!("{before}{w}{after}");
            let name = if lower { name.to_lowercase() } else { name };
            prop_assume!(!value.eq_ignore_ascii_case("none") && !value.eq_ignore_ascii_case("null"));
            let expected = if lower { w.to_lowercase() } else { w.to_string() };
            prop_assert_eq!(reason(&name, &value), word(&expected));
        }

        #[test]
        fn reference_suffixes_silence_the_name_rule(
            w in prop::sample::select(vec!["SECRET", "PASSWORD", "TOKEN", "KEY"]),
            suffix in prop::sample::select(REFERENCE_SUFFIXES.to_vec()),
            value in "[A-Za-z0-9]{8,30}",
        ) {
            prop_assert_eq!(reason(&format!("APP_{w}_{suffix}"), &value), None);
        }
    }
}
