//! Where the proxy listens and which route answers which `Host`: the
//! [`Ingress`] boundary, and the rules host claims follow
//! ([`HostClaims`], pure).
//!
//! Several apps and environments share one proxy listen address. Each
//! route (an environment, `RouteKey("app/env")`) claims its hosts, exact
//! (`blog.example.com`) or wildcard (`*.staging.example.com`: any host
//! below it, not itself), and at most one route is the *default*: it
//! answers every host no route claims. A host no route claims, with no
//! default, is answered by the proxy itself (404, naming the host), never
//! by another environment's app.
//!
//! A host is claimed by one route at most; a second default is refused.
//! Either refusal names the route that holds the claim and changes
//! nothing. Hosts are compared normalised ([`normalize_host`]): lower
//! case, without port or trailing dot.
//!
//! Compatibility: [`Ingress::listen`] still names a route. That route is
//! the *fallback* default as long as it has no hosts set (it answers every
//! host, as before hosts existed), unless another route claimed the
//! default.

use crate::process::ProxySpec;
use crate::traffic::RouteKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The longest host name (DNS: 253 characters), wildcard prefix included.
pub const MAX_HOST_LEN: usize = 253;

/// Where the proxy listens and which hosts each route answers.
/// Implemented by the binary over the proxy (in process or in the data
/// plane), and by a recording fake in the testkit.
pub trait Ingress: Send + Sync + 'static {
    /// Listen as `proxy` says (binding what is new) and apply its settings
    /// and certificates; `route` answers every host while it has no hosts
    /// set (see the module docs). Moving to another address closes the old
    /// listener after the new one is bound. Errors name the cause (e.g.
    /// address in use) and change nothing.
    fn listen(&self, proxy: &ProxySpec, route: &RouteKey) -> Result<(), IngressError>;

    /// Set the hosts `route` answers (replacing its previous ones; exact
    /// names or `*.example.com` wildcards, case and port ignored) and
    /// whether it is the default for every host no route claims. A host
    /// another route claims, a second default, or something that is not a
    /// host name is refused ([`HostsError`], naming the other route) and
    /// nothing changes. An empty list with `default: false`: the route
    /// answers no host.
    fn set_hosts(&self, route: &RouteKey, hosts: &[String], default: bool) -> Result<(), IngressError>;

    /// Release `route`'s hosts and its default claim (and its fallback
    /// from [`Ingress::listen`]). Its backends are not touched.
    fn remove_route(&self, route: &RouteKey);

    /// Stop listening, once no route is left (another app or environment
    /// may still be served on the same listeners).
    fn close(&self);
}

/// Why the proxy could not be set up as asked. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngressError {
    /// An address could not be bound: `(address, why)`.
    #[error("cannot listen on {0}: {1}")]
    Listen(String, String),
    /// A setting or a TLS file is wrong.
    #[error("{0}")]
    Config(String),
    /// A host claim was refused.
    #[error(transparent)]
    Hosts(#[from] HostsError),
    /// The proxy could not be asked: the data plane did not answer, or
    /// runs an older nonstop that does not know the call (the text says
    /// which, and what to do).
    #[error("{0}")]
    Unavailable(String),
}

/// A refused [`Ingress::set_hosts`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "refused", rename_all = "snake_case")]
pub enum HostsError {
    /// `host` is claimed by the route `by` already.
    #[error(
        "host `{host}` already belongs to {}, so {} cannot answer it; a host belongs to one environment: remove it from one of the two", by.0, route.0
    )]
    Claimed { route: RouteKey, host: String, by: RouteKey },
    /// The route `by` is the default already.
    #[error(
        "{} is already the default environment (for hosts no environment claims), so {} cannot be too; only one may be the default: set `default = false` (and `hosts` of its own) in the other's [environments.NAME] table; without such tables an app's environment is the default", by.0, route.0
    )]
    SecondDefault { route: RouteKey, by: RouteKey },
    /// `host` is not a host name.
    #[error("host `{host}` of {} {problem}", route.0)]
    Invalid { route: RouteKey, host: String, problem: HostProblem },
}

/// What is wrong with a configured host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostProblem {
    #[error("is empty: give a host name such as `blog.example.com`")]
    Empty,
    #[error("is `*`: to answer every host no one claims, make the environment the default instead")]
    CatchAll,
    #[error("has a `*` that is not the whole first label: a wildcard is written `*.example.com`")]
    MisplacedWildcard,
    #[error("has non-ASCII characters: write an international name in its punycode form (`xn--...`)")]
    NotAscii,
    #[error("has `{0}`, which a host name cannot have (letters, digits, `-`, `_` and `.` only)")]
    Character(char),
    #[error("has an empty label (`..`, or a dot at the start): remove the extra dot")]
    EmptyLabel,
    #[error("has a port that is not a number: write the host alone (the port is ignored)")]
    BadPort,
    #[error("is longer than {MAX_HOST_LEN} characters")]
    TooLong,
}

/// A configured host in the form routes are matched in: lower case,
/// without port or trailing dot; a wildcard keeps its `*.` prefix. IPv6
/// literals keep their brackets (`[::1]`).
pub fn normalize_host(raw: &str) -> Result<String, HostProblem> {
    let s = raw.trim();
    if s.is_empty() {
        return Err(HostProblem::Empty);
    }
    if !s.is_ascii() {
        return Err(HostProblem::NotAscii);
    }
    if s == "*" || s == "*." {
        return Err(HostProblem::CatchAll);
    }
    let (wild, rest) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (host, port) = if rest.starts_with('[') {
        let end = rest.find(']').ok_or(HostProblem::Character('['))?;
        let (literal, after) = rest.split_at(end + 1);
        if wild {
            return Err(HostProblem::MisplacedWildcard);
        }
        if let Some(c) = literal[1..end].chars().find(|c| !(c.is_ascii_hexdigit() || *c == ':' || *c == '.')) {
            return Err(HostProblem::Character(c));
        }
        if end == 1 {
            return Err(HostProblem::Empty);
        }
        match after.strip_prefix(':') {
            Some(port) => (literal, Some(port)),
            None if after.is_empty() => (literal, None),
            None => return Err(HostProblem::Character(after.chars().next().unwrap_or(']'))),
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HostProblem::BadPort);
        }
    }
    if !host.starts_with('[') {
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() {
            return Err(if wild { HostProblem::CatchAll } else { HostProblem::Empty });
        }
        for label in host.split('.') {
            if label.is_empty() {
                return Err(HostProblem::EmptyLabel);
            }
            if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
                return Err(if c == '*' { HostProblem::MisplacedWildcard } else { HostProblem::Character(c) });
            }
        }
        let name = host.to_ascii_lowercase();
        let name = if wild { format!("*.{name}") } else { name };
        return if name.len() > MAX_HOST_LEN { Err(HostProblem::TooLong) } else { Ok(name) };
    }
    Ok(host.to_ascii_lowercase())
}

/// The hosts of one route, normalised, in the order given (without
/// repeats), and whether it is the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteHosts {
    pub hosts: Vec<String>,
    pub default: bool,
}

/// Which route claims which host, and which is the default: the rules of
/// [`Ingress::set_hosts`] as data, shared by the proxy and the testkit's
/// fake so that both refuse the same claims. No I/O.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostClaims {
    routes: BTreeMap<RouteKey, RouteHosts>,
    /// The route [`Ingress::listen`] named.
    fallback: Option<RouteKey>,
}

impl HostClaims {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set `route`'s hosts and default claim (see [`Ingress::set_hosts`]).
    /// On error nothing changed.
    pub fn set(&mut self, route: &RouteKey, hosts: &[String], default: bool) -> Result<(), HostsError> {
        let mut normalized: Vec<String> = Vec::with_capacity(hosts.len());
        for raw in hosts {
            let host = normalize_host(raw).map_err(|problem| HostsError::Invalid {
                route: route.clone(),
                host: raw.trim().to_string(),
                problem,
            })?;
            if !normalized.contains(&host) {
                normalized.push(host);
            }
        }
        for host in &normalized {
            if let Some(by) = self.owner(host).filter(|by| *by != route) {
                return Err(HostsError::Claimed { route: route.clone(), host: host.clone(), by: by.clone() });
            }
        }
        if default {
            if let Some(by) = self.default_claim().filter(|by| *by != route) {
                return Err(HostsError::SecondDefault { route: route.clone(), by: by.clone() });
            }
        }
        self.routes.insert(route.clone(), RouteHosts { hosts: normalized, default });
        Ok(())
    }

    /// Release `route`'s hosts, default claim and fallback. Whether it
    /// had any.
    pub fn remove(&mut self, route: &RouteKey) -> bool {
        let fallback = self.fallback.take_if(|f| f == route).is_some();
        self.routes.remove(route).is_some() || fallback
    }

    /// The route [`Ingress::listen`] named: the default while it has no
    /// hosts set and no route claimed the default.
    pub fn set_fallback(&mut self, route: Option<RouteKey>) {
        self.fallback = route;
    }

    /// The route that answers hosts no route claims: the one that claimed
    /// the default, else the fallback if it has no hosts set.
    pub fn default_route(&self) -> Option<&RouteKey> {
        self.default_claim().or_else(|| self.fallback.as_ref().filter(|f| !self.routes.contains_key(*f)))
    }

    /// The route that claimed the default with [`HostClaims::set`].
    fn default_claim(&self) -> Option<&RouteKey> {
        self.routes.iter().find(|(_, r)| r.default).map(|(k, _)| k)
    }

    /// The route that claims `host` (normalised, e.g. `*.example.com`).
    pub fn owner(&self, host: &str) -> Option<&RouteKey> {
        self.routes.iter().find(|(_, r)| r.hosts.iter().any(|h| h == host)).map(|(k, _)| k)
    }

    /// `route`'s hosts, if they were set.
    pub fn get(&self, route: &RouteKey) -> Option<&RouteHosts> {
        self.routes.get(route)
    }

    /// Every route whose hosts were set, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&RouteKey, &RouteHosts)> {
        self.routes.iter()
    }

    /// Every route that takes part in routing: those with hosts set and
    /// the fallback.
    pub fn route_keys(&self) -> impl Iterator<Item = &RouteKey> {
        self.routes.keys().chain(self.fallback.iter().filter(|f| !self.routes.contains_key(*f)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(s: &str) -> RouteKey {
        RouteKey(s.to_string())
    }

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn hosts_are_normalised() {
        let ok = |raw: &str| normalize_host(raw).unwrap();
        assert_eq!(ok("Example.COM:443"), "example.com");
        assert_eq!(ok(" blog.example.com. "), "blog.example.com");
        assert_eq!(ok("*.Staging.Example.com"), "*.staging.example.com");
        assert_eq!(ok("staging.blog.localhost"), "staging.blog.localhost");
        assert_eq!(ok("[::1]:8080"), "[::1]");
        assert_eq!(ok("[FE80::1]"), "[fe80::1]");
        assert_eq!(ok("127.0.0.1:80"), "127.0.0.1");
        assert_eq!(ok("my_host"), "my_host");
    }

    #[test]
    fn what_is_not_a_host_is_refused_with_its_problem() {
        let bad = |raw: &str| normalize_host(raw).unwrap_err();
        assert_eq!(bad(""), HostProblem::Empty);
        assert_eq!(bad("  "), HostProblem::Empty);
        assert_eq!(bad("*"), HostProblem::CatchAll);
        assert_eq!(bad("*."), HostProblem::CatchAll);
        assert_eq!(bad("a.*.example.com"), HostProblem::MisplacedWildcard);
        assert_eq!(bad("*example.com"), HostProblem::MisplacedWildcard);
        assert_eq!(bad("*.*.example.com"), HostProblem::MisplacedWildcard);
        assert_eq!(bad("*.[::1]"), HostProblem::MisplacedWildcard);
        assert_eq!(bad("bücher.example"), HostProblem::NotAscii);
        assert_eq!(bad("a b.test"), HostProblem::Character(' '));
        assert_eq!(bad("example.com/path"), HostProblem::Character('/'));
        assert_eq!(bad("user@example.com"), HostProblem::Character('@'));
        assert_eq!(bad("a..test"), HostProblem::EmptyLabel);
        assert_eq!(bad(".test"), HostProblem::EmptyLabel);
        assert_eq!(bad("a.test:http"), HostProblem::BadPort);
        assert_eq!(bad("a.test:"), HostProblem::BadPort);
        assert_eq!(bad("[::1"), HostProblem::Character('['));
        assert_eq!(bad("[zz]"), HostProblem::Character('z'));
        assert_eq!(bad(&format!("{}.test", "a".repeat(250))), HostProblem::TooLong);
    }

    #[test]
    fn a_host_belongs_to_one_route_and_a_refusal_changes_nothing() {
        let (a, b) = (key("blog/production"), key("blog/staging"));
        let mut claims = HostClaims::new();
        claims.set(&a, &hosts(&["blog.test", "*.blog.test"]), true).unwrap();
        let before = claims.clone();
        let err = claims.set(&b, &hosts(&["staging.test", "BLOG.test:8080"]), false).unwrap_err();
        assert_eq!(err, HostsError::Claimed { route: b.clone(), host: "blog.test".into(), by: a.clone() });
        let text = err.to_string();
        assert!(text.contains("blog/production") && text.contains("blog/staging") && text.contains("remove"), "{text}");
        assert_eq!(claims, before, "nothing changed");

        let err = claims.set(&b, &hosts(&["staging.test"]), true).unwrap_err();
        assert_eq!(err, HostsError::SecondDefault { route: b.clone(), by: a.clone() });
        assert!(err.to_string().contains("blog/production"), "{err}");
        assert_eq!(claims, before);

        let err = claims.set(&b, &hosts(&["ok.test", "a b"]), false).unwrap_err();
        assert!(
            matches!(&err, HostsError::Invalid { host, problem: HostProblem::Character(' '), .. } if host == "a b")
        );
        assert!(err.to_string().contains("`a b` of blog/staging"), "{err}");
        assert_eq!(claims, before);

        // A wildcard and an exact name below it are different claims
        // (the exact one wins at matching).
        claims.set(&b, &hosts(&["staging.blog.test", "staging.blog.test"]), false).unwrap();
        assert_eq!(claims.get(&b).unwrap().hosts, ["staging.blog.test"], "repeats dropped");
        // A route may set its own hosts again, and keep its default.
        claims.set(&a, &hosts(&["blog.test"]), true).unwrap();
        assert_eq!(claims.owner("*.blog.test"), None, "released by the new list");
        assert_eq!(claims.default_route(), Some(&a));
        assert!(claims.remove(&a));
        assert_eq!(claims.default_route(), None);
        claims.set(&b, &hosts(&["blog.test"]), true).unwrap();
        assert_eq!(claims.default_route(), Some(&b));
        assert!(!claims.remove(&key("nope")));
    }

    #[test]
    fn the_listen_route_is_the_default_until_it_has_hosts_or_another_claims_it() {
        let (a, b) = (key("a/default"), key("b/default"));
        let mut claims = HostClaims::new();
        claims.set_fallback(Some(a.clone()));
        assert_eq!(claims.default_route(), Some(&a));
        assert_eq!(claims.route_keys().collect::<Vec<_>>(), [&a]);
        claims.set(&b, &hosts(&["b.test"]), false).unwrap();
        assert_eq!(claims.default_route(), Some(&a), "hosts of another route leave the fallback");
        claims.set(&b, &hosts(&["b.test"]), true).unwrap();
        assert_eq!(claims.default_route(), Some(&b), "a claimed default wins over the fallback");
        claims.set(&b, &hosts(&["b.test"]), false).unwrap();
        claims.set(&a, &hosts(&["a.test"]), false).unwrap();
        assert_eq!(claims.default_route(), None, "the fallback has hosts now");
        assert_eq!(claims.route_keys().collect::<Vec<_>>(), [&a, &b]);
        claims.remove(&a);
        assert_eq!(claims.default_route(), None, "removing the route drops its fallback too");
    }

    #[test]
    fn errors_serialize_for_the_data_plane() {
        let all = [
            HostsError::Claimed { route: key("a"), host: "x.test".into(), by: key("b") },
            HostsError::SecondDefault { route: key("a"), by: key("b") },
            HostsError::Invalid { route: key("a"), host: "x y".into(), problem: HostProblem::Character(' ') },
            HostsError::Invalid { route: key("a"), host: "".into(), problem: HostProblem::Empty },
        ];
        for e in all {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<HostsError>(&json).unwrap(), e, "{json}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(usize, Vec<String>, bool),
        Remove(usize),
        Fallback(Option<usize>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let host = prop_oneof![
            Just("a.test"),
            Just("A.TEST"),
            Just("b.test:8080"),
            Just("*.test"),
            Just("*.a.test"),
            Just("c.test."),
            Just("bad host"),
        ]
        .prop_map(String::from);
        prop_oneof![
            (0..4usize, proptest::collection::vec(host, 0..4), any::<bool>()).prop_map(|(r, h, d)| Op::Set(r, h, d)),
            (0..4usize).prop_map(Op::Remove),
            proptest::option::of(0..4usize).prop_map(Op::Fallback),
        ]
    }

    proptest! {
        /// Whatever the calls: a host has one owner, one default at most,
        /// a refused call changes nothing, an accepted one sets exactly
        /// what was asked, and the default is a route that takes part.
        #[test]
        fn claims_stay_exclusive(ops in proptest::collection::vec(op(), 0..40)) {
            let routes: Vec<RouteKey> = (0..4).map(|i| key(&format!("app/env{i}"))).collect();
            let mut claims = HostClaims::new();
            for op in ops {
                let before = claims.clone();
                match op {
                    Op::Set(r, hosts, default) => match claims.set(&routes[r], &hosts, default) {
                        Ok(()) => {
                            let set = claims.get(&routes[r]).unwrap();
                            prop_assert_eq!(set.default, default);
                            for h in &hosts {
                                let n = normalize_host(h).unwrap();
                                prop_assert!(set.hosts.contains(&n));
                            }
                            prop_assert!(set.hosts.len() <= hosts.len());
                        }
                        Err(_) => prop_assert_eq!(&claims, &before),
                    },
                    Op::Remove(r) => {
                        claims.remove(&routes[r]);
                        prop_assert!(claims.get(&routes[r]).is_none());
                    }
                    Op::Fallback(r) => claims.set_fallback(r.map(|r| routes[r].clone())),
                }
                let mut seen = std::collections::BTreeSet::new();
                for (_, r) in claims.iter() {
                    for h in &r.hosts {
                        prop_assert!(seen.insert(h.clone()), "{} claimed twice", h);
                    }
                }
                prop_assert!(claims.iter().filter(|(_, r)| r.default).count() <= 1);
                if let Some(d) = claims.default_route() {
                    prop_assert!(claims.route_keys().any(|k| k == d));
                }
            }
        }
    }
}
