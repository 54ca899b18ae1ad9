//! Which route a request's `Host` reaches: a pure lookup, without
//! allocation or lock, in maps built once per route snapshot.
//!
//! Rules (those of nginx's server names, and of
//! `nonstop_core::ingress`):
//! - case, a port and a trailing dot are ignored;
//! - an exact name beats any wildcard;
//! - `*.example.com` matches every host below `example.com` (one label or
//!   more), not `example.com` itself;
//! - of several matching wildcards the longest wins (`*.a.example.com`
//!   over `*.example.com` for `x.a.example.com`);
//! - no match: the caller's default (or the proxy's 404).

use nonstop_core::ingress::MAX_HOST_LEN;
use std::collections::HashMap;

/// Values by host: exact names, and wildcards stored without their `*.`.
pub(crate) struct HostMap<T> {
    exact: HashMap<Box<str>, T>,
    wildcard: HashMap<Box<str>, T>,
}

impl<T> Default for HostMap<T> {
    fn default() -> Self {
        Self { exact: HashMap::new(), wildcard: HashMap::new() }
    }
}

impl<T> HostMap<T> {
    /// Add a normalised host (`nonstop_core::ingress::normalize_host`):
    /// `blog.example.com` or `*.example.com`. The value of a host added
    /// twice is replaced (the caller's claims never do).
    pub fn insert(&mut self, host: &str, value: T) -> Option<T> {
        match host.strip_prefix("*.") {
            Some(parent) => self.wildcard.insert(parent.into(), value),
            None => self.exact.insert(host.into(), value),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// The value for a request's `Host` (or authority), by the rules above.
    pub fn lookup(&self, raw: &[u8]) -> Option<&T> {
        let name = host_name(raw)?;
        if name.len() > MAX_HOST_LEN {
            // No configured host is that long.
            return None;
        }
        let mut lower = [0u8; MAX_HOST_LEN];
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            let out = &mut lower[..name.len()];
            out.copy_from_slice(name.as_bytes());
            out.make_ascii_lowercase();
            // ASCII lowercasing keeps UTF-8 valid.
            std::str::from_utf8(out).ok()?
        } else {
            name
        };
        self.find(name)
    }

    /// `name` is lower case, without port or trailing dot.
    fn find(&self, name: &str) -> Option<&T> {
        if let Some(v) = self.exact.get(name) {
            return Some(v);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        // Parents from the longest: the first wildcard found is the
        // longest that matches.
        name.match_indices('.').find_map(|(dot, _)| self.wildcard.get(&name[dot + 1..]))
    }
}

/// The host part of a `Host` header: without port, without a trailing dot.
/// IPv6 literals keep their brackets.
pub(crate) fn host_name(raw: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    let host = if s.starts_with('[') {
        match s.find(']') {
            Some(end) => &s[..=end],
            None => s,
        }
    } else {
        match s.rfind(':') {
            Some(colon) => &s[..colon],
            None => s,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_core::ingress::normalize_host;
    use proptest::prelude::*;

    #[test]
    fn host_names_lose_port_and_dot() {
        assert_eq!(host_name(b"example.com:8080"), Some("example.com"));
        assert_eq!(host_name(b"example.com."), Some("example.com"));
        assert_eq!(host_name(b"[::1]:80"), Some("[::1]"));
        assert_eq!(host_name(b"localhost"), Some("localhost"));
        assert_eq!(host_name(b""), None);
    }

    fn map(hosts: &[&str]) -> HostMap<String> {
        let mut m = HostMap::default();
        for h in hosts {
            m.insert(&normalize_host(h).unwrap(), h.to_string());
        }
        m
    }

    #[test]
    fn exact_beats_wildcard_and_the_longest_wildcard_wins() {
        let m = map(&["example.com", "*.example.com", "*.a.example.com", "b.a.example.com", "[::1]"]);
        let find = |h: &str| m.lookup(h.as_bytes()).map(String::as_str);
        assert_eq!(find("example.com"), Some("example.com"));
        assert_eq!(find("x.example.com"), Some("*.example.com"));
        assert_eq!(find("x.y.example.com"), Some("*.example.com"), "a wildcard covers every depth");
        assert_eq!(find("a.example.com"), Some("*.example.com"), "`*.a.example.com` needs a label below");
        assert_eq!(find("x.a.example.com"), Some("*.a.example.com"));
        assert_eq!(find("b.a.example.com"), Some("b.a.example.com"));
        assert_eq!(find("X.A.Example.COM:8443"), Some("*.a.example.com"));
        assert_eq!(find("example.com."), Some("example.com"));
        assert_eq!(find("[::1]:8080"), Some("[::1]"));
        assert_eq!(find("example.org"), None);
        assert_eq!(find("com"), None);
        assert_eq!(find(&format!("{}.example.com", "a".repeat(300))), None, "longer than any host");
    }

    /// The rules written the obvious way (allocating), to check the lookup
    /// against.
    fn reference<'a>(patterns: &'a [String], request: &str) -> Option<&'a String> {
        let name = normalize_host(request).ok()?;
        if let Some(p) = patterns.iter().find(|p| **p == name) {
            return Some(p);
        }
        patterns
            .iter()
            .filter_map(|p| p.strip_prefix("*.").map(|parent| (p, parent)))
            .filter(|(_, parent)| name.ends_with(&format!(".{parent}")))
            .max_by_key(|(_, parent)| parent.len())
            .map(|(p, _)| p)
    }

    fn name() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("xn--c"), Just("d-1")], 1..5)
            .prop_map(|labels| labels.join("."))
    }

    fn pattern() -> impl Strategy<Value = String> {
        (name(), any::<bool>()).prop_map(|(n, wild)| if wild { format!("*.{n}") } else { n })
    }

    /// Random upper case, and maybe a port and a trailing dot.
    fn spelled(name: String) -> impl Strategy<Value = String> {
        let len = name.len();
        (proptest::collection::vec(any::<bool>(), len), proptest::option::of(1u16..), any::<bool>()).prop_map(
            move |(upper, port, dot)| {
                let mut s: String =
                    name.chars().zip(&upper).map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c }).collect();
                if dot {
                    s.push('.');
                }
                if let Some(port) = port {
                    s.push_str(&format!(":{port}"));
                }
                s
            },
        )
    }

    proptest! {
        #[test]
        fn lookup_follows_the_rules(
            patterns in proptest::collection::btree_set(pattern(), 0..8),
            request in name().prop_flat_map(spelled),
        ) {
            let patterns: Vec<String> = patterns.into_iter().collect();
            let mut m = HostMap::default();
            for p in &patterns {
                m.insert(p, p.clone());
            }
            prop_assert_eq!(m.lookup(request.as_bytes()), reference(&patterns, &request));
        }

        #[test]
        fn case_port_and_trailing_dot_do_not_matter(
            patterns in proptest::collection::btree_set(pattern(), 0..8),
            plain in name(),
            seed in any::<u64>(),
        ) {
            let mut m = HostMap::default();
            for p in &patterns {
                m.insert(p, p.clone());
            }
            let upper: String = plain
                .chars()
                .enumerate()
                .map(|(i, c)| if (seed >> (i % 64)) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                .collect();
            let spelled = format!("{upper}.:{}", seed % 65_536);
            prop_assert_eq!(m.lookup(spelled.as_bytes()), m.lookup(plain.as_bytes()));
        }

        #[test]
        fn an_exact_name_always_wins(
            patterns in proptest::collection::btree_set(pattern(), 0..8),
            exact in name(),
        ) {
            let mut m = HostMap::default();
            for p in &patterns {
                m.insert(p, p.clone());
            }
            m.insert(&exact, "exact".to_string());
            prop_assert_eq!(m.lookup(exact.as_bytes()).map(String::as_str), Some("exact"));
        }
    }
}
