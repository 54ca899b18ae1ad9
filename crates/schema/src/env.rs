//! How an app reads its database: the variables `[database]` fills. Pure.

use nonstop_core::database::{DatabaseUrl, UrlPart};
use std::collections::BTreeMap;

/// The variables that point an app at `url`: each variable of `mapping`
/// with the part of the URL it holds, sorted by name. The engine puts them
/// in every process's environment; the migration gate runs the release
/// tasks with them pointing at the scratch copy.
///
/// The values hold the password (in `url` and `password` parts): they go
/// to processes, never to a log or a report.
pub fn env_for(url: &DatabaseUrl, mapping: &BTreeMap<String, UrlPart>) -> Vec<(String, String)> {
    nonstop_core::database::env_for(url, mapping)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::database::{encode, DatabaseSpec};
    use proptest::prelude::*;

    fn django_mapping() -> BTreeMap<String, UrlPart> {
        [
            ("POSTGRES_NAME", UrlPart::Name),
            ("POSTGRES_SERVICE_HOST", UrlPart::Host),
            ("POSTGRES_PASSWORD", UrlPart::Password),
            ("POSTGRES_PORT", UrlPart::Port),
            ("POSTGRES_USER", UrlPart::User),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn the_default_mapping_is_database_url() {
        let url = DatabaseUrl::parse("postgres://u:p@h:5433/blog").unwrap();
        let spec = DatabaseSpec::new(url.clone());
        assert_eq!(env_for(&url, &spec.env), vec![("DATABASE_URL".to_string(), url.expose().to_string())]);
    }

    #[test]
    fn a_mapping_gives_each_variable_its_part() {
        let url = DatabaseUrl::parse("postgresql://blog:s%3Acret@db.internal/blog_prod?sslmode=disable").unwrap();
        let env = env_for(&url, &django_mapping());
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("POSTGRES_NAME"), Some("blog_prod"));
        assert_eq!(get("POSTGRES_SERVICE_HOST"), Some("db.internal"));
        assert_eq!(get("POSTGRES_PASSWORD"), Some("s:cret"));
        assert_eq!(get("POSTGRES_PORT"), Some("5432"));
        assert_eq!(get("POSTGRES_USER"), Some("blog"));
        // Sorted by name.
        let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    fn text() -> impl Strategy<Value = String> {
        // Anything printable, including what must be escaped: @ : / ? # % and non-ASCII.
        proptest::string::string_regex("[a-zA-Z0-9@:/?#%&=+ é_.~-]{1,12}").unwrap()
    }

    fn host() -> impl Strategy<Value = (String, String)> {
        prop_oneof![
            proptest::string::string_regex("[a-z][a-z0-9.-]{0,15}").unwrap().prop_map(|h| (h.clone(), h)),
            Just(("::1".to_string(), "[::1]".to_string())),
            Just(("127.0.0.1".to_string(), "127.0.0.1".to_string())),
        ]
    }

    proptest! {
        /// Parts written into a URL (escaped) come back out of env_for as
        /// they were, and pointing the URL at another database changes the
        /// name only.
        #[test]
        fn parts_round_trip(
            user in proptest::option::of(text()),
            password in proptest::option::of(text()),
            (host, host_raw) in host(),
            port in proptest::option::of(1u16..),
            name in text(),
            other in text(),
            postgresql in any::<bool>(),
        ) {
            let build = |password_text: Option<String>| {
                let mut url = format!("{}://", if postgresql { "postgresql" } else { "postgres" });
                if let Some(u) = &user {
                    url.push_str(&encode(u));
                    if let Some(p) = &password_text {
                        url.push(':');
                        url.push_str(p);
                    }
                    url.push('@');
                }
                url.push_str(&host_raw);
                if let Some(p) = port {
                    url.push_str(&format!(":{p}"));
                }
                url.push('/');
                url.push_str(&encode(&name));
                url
            };
            let url = build(password.as_deref().map(encode));
            let parsed = DatabaseUrl::parse(&url).unwrap();
            let mut mapping = django_mapping();
            mapping.insert("DATABASE_URL".into(), UrlPart::Url);
            let env: BTreeMap<String, String> = env_for(&parsed, &mapping).into_iter().collect();
            prop_assert_eq!(&env["DATABASE_URL"], &url);
            prop_assert_eq!(&env["POSTGRES_NAME"], &name);
            prop_assert_eq!(&env["POSTGRES_SERVICE_HOST"], &host);
            prop_assert_eq!(env["POSTGRES_PORT"].clone(), port.unwrap_or(5432).to_string());
            prop_assert_eq!(env["POSTGRES_USER"].clone(), user.clone().unwrap_or_default());
            let expected_password = if user.is_some() { password.clone().unwrap_or_default() } else { String::new() };
            prop_assert_eq!(env["POSTGRES_PASSWORD"].clone(), expected_password.clone());

            let moved = parsed.with_database(&other);
            let env2: BTreeMap<String, String> = env_for(&moved, &mapping).into_iter().collect();
            prop_assert_eq!(&env2["POSTGRES_NAME"], &other);
            for k in ["POSTGRES_SERVICE_HOST", "POSTGRES_PORT", "POSTGRES_USER", "POSTGRES_PASSWORD"] {
                prop_assert_eq!(&env2[k], &env[k]);
            }
            // Printing shows `***` where the password was.
            let shown = build(password.as_ref().map(|_| "***".to_string()));
            prop_assert_eq!(parsed.to_string(), shown.clone());
            prop_assert_eq!(format!("{parsed:?}"), format!("DatabaseUrl({shown:?})"));
        }
    }
}
