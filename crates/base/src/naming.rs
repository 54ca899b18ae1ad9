//! The names of an environment's PostgreSQL database and role, and the
//! mark nonstop leaves on the role it makes. Pure.
//!
//! A name is `APP_ENV` (`blog_staging`) when that is unambiguous: app and
//! environment names of lower-case letters and digits only, 63 bytes at
//! most in all, not a role name PostgreSQL reserves (`pg_…`) and not a SQL
//! keyword (`current_user`). Any other pair gets a readable stem and a hash
//! of the exact pair: `my_blog_staging__3f9a1c0b2e` — app names may hold
//! `_` and `-`, so `a_b` + `c` and `a` + `b_c` would otherwise meet.
//!
//! Every name is a valid unquoted PostgreSQL identifier: 1 to 63 bytes of
//! `[a-z0-9_]`, starting with a letter, so it reads the same quoted or not,
//! in SQL and in a URL. The SQL this crate sends quotes it all the same.
//!
//! Two pairs never get the same name: plain names have exactly one `_`,
//! hashed ones end in `__` and 10 hex digits of SHA-256 over `app/env` (`/`
//! is in no app or environment name). Two hashed names could only meet by
//! a 40-bit hash collision, and even then the role's mark (which holds the
//! pair itself) makes provisioning refuse rather than share.

use crate::error::BaseError;
use nonstop_core::{AppName, EnvironmentId};
use sha2::{Digest, Sha256};

/// PostgreSQL's longest identifier (NAMEDATALEN - 1), in bytes.
pub const MAX_IDENTIFIER: usize = 63;

/// Hex digits of the hash that ends a name that cannot be plain.
const HASH_DIGITS: usize = 10;

/// The SQL keywords that are `word_word`, which a plain name could spell (app
/// `current`, environment `user`). PostgreSQL's `pg_get_keywords()` lists
/// the ones with an underscore; the tests check this list still covers it.
pub const KEYWORDS: [&str; 9] = [
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "session_user",
    "system_user",
];

/// The database of `app` in environment `env`: `APP_ENV`, or a stem and
/// a hash when that would be ambiguous, too long or reserved (module doc).
pub fn database_name(app: &AppName, env: &EnvironmentId) -> String {
    name(app.as_str(), env.as_str())
}

/// The login role of `app` in environment `env`: the same text as
/// [`database_name`] (PostgreSQL keeps roles and databases apart), so the
/// app's URL reads `postgres://blog_staging:…@db/blog_staging`.
pub fn role_name(app: &AppName, env: &EnvironmentId) -> String {
    name(app.as_str(), env.as_str())
}

/// The comment nonstop puts on the role it makes (`COMMENT ON ROLE`): the
/// proof that a role of this name is nonstop's for this very pair. A role
/// without it is never altered or dropped.
pub fn marker(app: &AppName, env: &EnvironmentId) -> String {
    format!("nonstop: app {app}, environment {env}")
}

/// Checks the name typed to confirm `env destroy --drop-database`: it must
/// be the database's name exactly.
pub fn confirm_drop(app: &AppName, env: &EnvironmentId, typed: &str) -> Result<(), BaseError> {
    let database = database_name(app, env);
    if typed.trim() == database {
        Ok(())
    } else {
        Err(BaseError::DropNotConfirmed { database, typed: typed.to_string() })
    }
}

fn is_simple(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Would PostgreSQL refuse or misread `name` as a role name?
fn is_reserved(name: &str) -> bool {
    name.starts_with("pg_") || KEYWORDS.contains(&name)
}

fn name(app: &str, env: &str) -> String {
    let plain = format!("{app}_{env}");
    if is_simple(app) && is_simple(env) && plain.len() <= MAX_IDENTIFIER && !is_reserved(&plain) {
        return plain;
    }
    let mut stem: String = plain.chars().map(|c| if c == '-' { '_' } else { c }).collect();
    // `pg_x` is reserved for roles: `pgx`. (`pg__x` takes two rounds.)
    while stem.starts_with("pg_") {
        stem.remove(2);
    }
    stem.truncate(MAX_IDENTIFIER - 2 - HASH_DIGITS);
    let digest = Sha256::digest(format!("{app}/{env}").as_bytes());
    let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{stem}__{}", &hash[..HASH_DIGITS])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn app(s: &str) -> AppName {
        AppName::new(s).unwrap()
    }
    fn env(s: &str) -> EnvironmentId {
        EnvironmentId::new(s).unwrap()
    }

    /// A valid unquoted identifier, as PostgreSQL reads one, that it does
    /// not reserve for roles.
    fn assert_identifier(n: &str) {
        assert!(!n.is_empty() && n.len() <= MAX_IDENTIFIER, "{n}: length {}", n.len());
        assert!(n.as_bytes()[0].is_ascii_lowercase(), "{n}: must start with a letter");
        assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{n}");
        assert!(!is_reserved(n), "{n}: reserved");
    }

    #[test]
    fn simple_pairs_are_app_underscore_env() {
        assert_eq!(database_name(&app("blog"), &env("staging")), "blog_staging");
        assert_eq!(role_name(&app("blog"), &env("production")), "blog_production");
        assert_eq!(database_name(&app("shop2"), &env("pr42")), "shop2_pr42");
    }

    #[test]
    fn ambiguous_reserved_and_long_pairs_are_hashed() {
        let a = database_name(&app("a_b"), &env("c"));
        let b = database_name(&app("a"), &env("b_c"));
        let c = database_name(&app("a-b"), &env("c"));
        assert!(a.starts_with("a_b_c__") && b.starts_with("a_b_c__") && c.starts_with("a_b_c__"), "{a} {b} {c}");
        assert!(a != b && b != c && a != c);
        let my = database_name(&app("my-blog"), &env("staging"));
        assert!(my.starts_with("my_blog_staging__"), "{my}");
        assert_eq!(my.len(), "my_blog_staging__".len() + 10);

        let pg = role_name(&app("pg"), &env("x"));
        assert!(pg.starts_with("pgx__"), "{pg}");
        let pg2 = role_name(&app("pg_"), &env("x"));
        assert!(pg2.starts_with("pgx__") && pg2 != pg, "{pg2}");
        let kw = role_name(&app("current"), &env("user"));
        assert!(kw.starts_with("current_user__"), "{kw}");

        let long = "a".repeat(63);
        let l1 = database_name(&app(&long), &env("staging"));
        let l2 = database_name(&app(&long), &env("production"));
        assert_eq!(l1.len(), MAX_IDENTIFIER);
        assert_ne!(l1, l2);
        for n in [a, b, c, my, pg, pg2, kw, l1, l2] {
            assert_identifier(&n);
        }
    }

    #[test]
    fn names_are_deterministic() {
        // Fixed: a stored database must keep its name across versions.
        assert_eq!(database_name(&app("my-blog"), &env("staging")), name("my-blog", "staging"));
        let digest = Sha256::digest(b"my-blog/staging");
        let expected = format!("my_blog_staging__{}", &format!("{digest:x}")[..10]);
        assert_eq!(database_name(&app("my-blog"), &env("staging")), expected);
    }

    #[test]
    fn a_drop_is_confirmed_by_the_database_name_only() {
        assert!(confirm_drop(&app("blog"), &env("staging"), "blog_staging").is_ok());
        assert!(confirm_drop(&app("blog"), &env("staging"), " blog_staging\n").is_ok());
        for typed in ["", "blog", "staging", "BLOG_STAGING", "blog_production"] {
            let e = confirm_drop(&app("blog"), &env("staging"), typed).unwrap_err();
            assert!(matches!(e, BaseError::DropNotConfirmed { .. }));
            assert!(e.to_string().contains("type `blog_staging`"), "{e}");
        }
    }

    /// App and environment names as `core::ids` allows them, drawn from a
    /// small alphabet so that ambiguous pairs (`a_b`+`c`, `a`+`b_c`,
    /// `a-b`+`c`) and `pg_` come up often; or long, to be truncated.
    fn id() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ap][a-c_g-]{0,6}",
            "[a-z][a-z0-9_-]{0,62}",
            ("[a-z]{40,55}", "[a-z0-9_-]{0,8}").prop_map(|(a, b)| format!("{a}{b}")),
        ]
    }

    proptest! {
        #[test]
        fn every_name_is_a_valid_identifier(a in id(), e in id()) {
            let n = database_name(&app(&a), &env(&e));
            assert_identifier(&n);
            prop_assert_eq!(&n, &role_name(&app(&a), &env(&e)));
            prop_assert_eq!(&n, &database_name(&app(&a), &env(&e)));
        }

        #[test]
        fn different_pairs_get_different_names(a1 in id(), e1 in id(), a2 in id(), e2 in id()) {
            prop_assume!((&a1, &e1) != (&a2, &e2));
            prop_assert_ne!(database_name(&app(&a1), &env(&e1)), database_name(&app(&a2), &env(&e2)));
        }

        #[test]
        fn a_long_shared_prefix_still_differs(stem in "[a-z]{60}", x in "[a-z0-9]{1,3}", y in "[a-z0-9]{1,3}") {
            prop_assume!(x != y);
            let n1 = database_name(&app(&stem), &env(&format!("e{x}")));
            let n2 = database_name(&app(&stem), &env(&format!("e{y}")));
            prop_assert_eq!(n1.len(), MAX_IDENTIFIER);
            prop_assert_ne!(n1, n2);
        }

        #[test]
        fn simple_short_pairs_stay_plain(a in "[a-z][a-z0-9]{0,20}", e in "[a-z][a-z0-9]{0,20}") {
            let plain = format!("{a}_{e}");
            prop_assume!(!is_reserved(&plain));
            prop_assert_eq!(database_name(&app(&a), &env(&e)), plain);
        }
    }
}
