//! Where `parse` reads environment overrides from, so that validation
//! stays pure and testable.

use std::collections::{BTreeMap, HashMap};

/// Read access to environment variables.
pub trait EnvLookup {
    fn get(&self, key: &str) -> Option<String>;
}

/// The real process environment. Variables that are not valid Unicode
/// read as unset.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvLookup for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl<S: std::hash::BuildHasher> EnvLookup for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl EnvLookup for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        BTreeMap::get(self, key).cloned()
    }
}

/// An empty environment (tests, `nonstop init`'s round trip).
impl EnvLookup for () {
    fn get(&self, _key: &str) -> Option<String> {
        None
    }
}

impl<T: EnvLookup + ?Sized> EnvLookup for &T {
    fn get(&self, key: &str) -> Option<String> {
        (**self).get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_and_unit_are_environments() {
        let mut h = HashMap::new();
        h.insert("A".to_string(), "1".to_string());
        assert_eq!(EnvLookup::get(&h, "A").as_deref(), Some("1"));
        assert_eq!(EnvLookup::get(&h, "B"), None);
        let b: BTreeMap<String, String> = [("A".to_string(), "2".to_string())].into();
        assert_eq!(EnvLookup::get(&b, "A").as_deref(), Some("2"));
        assert_eq!(().get("A"), None);
        assert_eq!(EnvLookup::get(&&b, "A").as_deref(), Some("2"));
    }

    #[test]
    fn process_env_reads_the_real_environment() {
        // PATH is set wherever tests run.
        assert!(ProcessEnv.get("PATH").is_some());
        assert_eq!(ProcessEnv.get("NONSTOP_SPEC_TEST_SURELY_UNSET_VARIABLE"), None);
    }
}
