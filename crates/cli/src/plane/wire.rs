//! The data plane's protocol: one JSON object per line over
//! `$NONSTOP_HOME/plane.sock` (0600). Control traffic only: nothing here is
//! on a request's path.
//!
//! A connection starts with [`Request::Hello`] carrying [`VERSION`]; the
//! data plane refuses another version (naming both). Then either calls,
//! each a [`Call`] answered by one [`Answer`] with the same `id`, in order;
//! or, after [`Request::Subscribe`] is answered, a stream of [`Event`]s
//! (health changes and finished drains) until either side closes.
//!
//! Compatibility: calls added within a version (`maintenance`, `split`,
//! `figures`, `hosts`, `remove_route`) are new variants; a data plane that predates one answers it
//! with a protocol error naming the unknown variant and closes the
//! connection, which the daemon reports as "restart the keeper" (see
//! [`PlaneError::too_old`]). Everything else about a version is fixed.

use nonstop_core::ingress::HostsError;
use nonstop_core::process::{HealthCheck, ProxySpec, StaticMount};
use nonstop_core::traffic::{
    Backend, BackendFigures, BackendHealth, BackendStatus, DrainOutcome, HealthEvent, InitialHealth, RouteFigures,
    RouteKey, Split,
};
use nonstop_core::{AppName, InstanceId, ReleaseId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The protocol's version; a daemon and a data plane must speak the same.
pub const VERSION: u32 = 1;

/// The longest line either side reads (a `listen` carries the whole
/// `[proxy]` spec; a `statics` every retained release's mounts).
pub const MAX_LINE: usize = 4 << 20;

/// What a daemon asks of the data plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First on every connection. `workers`: the proxy's worker threads
    /// (0: one per core), used only by the data plane's first hello.
    Hello {
        version: u32,
        workers: usize,
    },
    /// The backend table, for a resync and for `status`.
    Table,
    Add {
        route: RouteKey,
        backend: Backend,
        check: HealthCheck,
        initial: InitialHealth,
    },
    Remove {
        instance: InstanceId,
    },
    /// Start draining now; the outcome comes as [`Event::Drained`] with the
    /// same `drain` number on the event stream. The drain runs in the data
    /// plane to its end whether or not the daemon lives.
    Drain {
        drain: u64,
        instance: InstanceId,
        timeout_ms: u64,
    },
    /// Listen as `spec` says (binding what is new), apply its settings and
    /// certificates, and send unrouted hosts to `route`.
    Listen {
        spec: Box<ProxySpec>,
        route: RouteKey,
    },
    /// Stop listening.
    Close,
    /// Serve the static files of exactly these releases of `app` to
    /// `route` (its environment's). A daemon that predates environments
    /// sends no route: its app's default environment then.
    Statics {
        app: AppName,
        live: Vec<LiveRelease>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        route: Option<RouteKey>,
    },
    /// Maintenance mode of `route` on (`Some`) or off.
    Maintenance {
        route: RouteKey,
        maintenance: Option<nonstop_core::maintenance::Maintenance>,
    },
    /// A traffic split of `route` (`Some`), or none.
    Split {
        route: RouteKey,
        split: Option<Split>,
    },
    /// Every backend of `route` with its counters, and the route's own
    /// (static files, no instance): answered by [`Reply::Figures`].
    Figures {
        route: RouteKey,
    },
    /// The hosts `route` answers and whether it is the default for hosts
    /// no route claims (`Ingress::set_hosts`); a conflicting claim is
    /// answered [`PlaneError::Hosts`] and changes nothing.
    Hosts {
        route: RouteKey,
        hosts: Vec<String>,
        default: bool,
    },
    /// Release `route`'s hosts and default (`Ingress::remove_route`).
    RemoveRoute {
        route: RouteKey,
    },
    /// Turn this connection into an event stream.
    Subscribe,
}

/// A retained release whose `[static]` files are served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRelease {
    pub release: ReleaseId,
    pub dir: PathBuf,
    pub mounts: Vec<StaticMount>,
}

impl From<nonstop_engine::LiveStatics> for LiveRelease {
    fn from(l: nonstop_engine::LiveStatics) -> Self {
        LiveRelease { release: l.release, dir: l.dir, mounts: l.mounts }
    }
}

impl From<LiveRelease> for nonstop_engine::LiveStatics {
    fn from(l: LiveRelease) -> Self {
        nonstop_engine::LiveStatics { release: l.release, dir: l.dir, mounts: l.mounts }
    }
}

/// A request with its number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub id: u64,
    pub request: Request,
}

/// A backend as the data plane holds it: what it was added with, and its
/// state now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaneBackend {
    pub route: RouteKey,
    pub backend: Backend,
    pub check: HealthCheck,
    pub status: BackendStatus,
}

impl PlaneBackend {
    pub fn health(&self) -> BackendHealth {
        self.status.health
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        version: u32,
        pid: u32,
        backends: Vec<PlaneBackend>,
    },
    /// `routes`: those the data plane holds hosts, a default, static
    /// files or maintenance for ([`nonstop_proxy::Proxy::routes`]); empty
    /// from a data plane that predates environments.
    Table {
        backends: Vec<PlaneBackend>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        routes: Vec<RouteKey>,
    },
    /// `route`: zeros from a data plane that predates route counters.
    Figures {
        backends: Vec<BackendFigures>,
        #[serde(default)]
        route: RouteFigures,
    },
    Done,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum PlaneError {
    /// The two sides speak different protocol versions.
    Version { plane: u32, daemon: u32 },
    /// An address could not be bound.
    Listen { addr: String, reason: String },
    /// A `[proxy]` setting or a certificate is wrong.
    Config { reason: String },
    /// A host claim was refused (another route holds the host or the
    /// default, or it is not a host name); nothing changed.
    Hosts { refusal: HostsError },
    /// A malformed line, or a call out of order.
    Protocol { reason: String },
    /// The data plane cannot be reached or did not answer in time.
    Unreachable { reason: String },
}

impl std::fmt::Display for PlaneError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlaneError::Version { plane, daemon } => write!(
                f,
                "the data plane speaks protocol {plane} and this daemon {daemon}: restart the keeper with this \
                 version (`nonstop down` then `nonstop up`, or `systemctl restart nonstop`)"
            ),
            PlaneError::Listen { addr, reason } => write!(f, "cannot listen on {addr}: {reason}"),
            PlaneError::Config { reason } => f.write_str(reason),
            PlaneError::Hosts { refusal } => write!(f, "{refusal}"),
            PlaneError::Protocol { reason } => write!(f, "data plane protocol error: {reason}"),
            PlaneError::Unreachable { reason } => write!(f, "the data plane did not answer: {reason}"),
        }
    }
}

impl std::error::Error for PlaneError {}

impl PlaneError {
    /// A protocol error because the data plane did not know the call
    /// (`what`): it runs an older binary than this daemon. Says so, and
    /// the fix; other errors are kept as they are.
    pub fn too_old(self, what: &str) -> PlaneError {
        match self {
            PlaneError::Protocol { reason } if reason.contains("unknown variant") => PlaneError::Protocol {
                reason: format!(
                    "the data plane does not know `{what}`: it runs an older nonstop than this daemon (a keeper \
                     keeps its binary across `nonstop upgrade`); restart the keeper (`nonstop down` then `nonstop \
                     up`, or `systemctl restart nonstop`) ({reason})"
                ),
            },
            other => other,
        }
    }
}

/// The answer to a [`Call`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub id: u64,
    pub result: Result<Reply, PlaneError>,
}

/// What the data plane streams to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Health { change: HealthEvent },
    Drained { drain: u64, instance: InstanceId, outcome: DrainOutcome },
}

/// One message as one line (with its `\n`).
pub fn encode<T: Serialize>(message: &T) -> String {
    // Serializing these types cannot fail: plain structs and enums with
    // string keys.
    let mut line = serde_json::to_string(message).unwrap_or_else(|e| {
        serde_json::json!({"error": "protocol", "reason": format!("cannot encode: {e}")}).to_string()
    });
    line.push('\n');
    line
}

/// One line (with or without its `\n`) as a message.
pub fn decode<T: DeserializeOwned>(line: &str) -> Result<T, PlaneError> {
    if line.len() > MAX_LINE {
        return Err(PlaneError::Protocol { reason: format!("a line of {} bytes (at most {MAX_LINE})", line.len()) });
    }
    serde_json::from_str(line.trim_end_matches(['\n', '\r'])).map_err(|e| PlaneError::Protocol {
        reason: format!("cannot read `{}`: {e}", line.chars().take(120).collect::<String>().trim_end()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nonstop_core::traffic::BackendHealth;
    use std::time::Duration;

    pub(crate) fn id(s: &str) -> InstanceId {
        let (process, rest) = s.split_once('.').unwrap();
        let (slot, generation) = rest.split_once('#').unwrap();
        InstanceId::new(
            nonstop_core::ProcessName::new(process).unwrap(),
            slot.parse().unwrap(),
            generation.parse().unwrap(),
        )
    }

    pub(crate) fn check() -> HealthCheck {
        HealthCheck {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expect_status: nonstop_core::process::StatusRange { min: 200, max: 399 },
            host: None,
            smoke: vec![],
        }
    }

    fn backend(i: &str, port: u16) -> Backend {
        Backend { instance: id(i), addr: format!("127.0.0.1:{port}").parse().unwrap() }
    }

    #[test]
    fn every_message_round_trips() {
        let status = BackendStatus {
            instance: id("web.1#3"),
            addr: "127.0.0.1:5000".parse().unwrap(),
            health: BackendHealth::Healthy,
            in_flight: 2,
            last_checks: vec!["GET /health -> 200".into()],
        };
        let table = vec![PlaneBackend {
            route: RouteKey("app/default".into()),
            backend: backend("web.1#3", 5000),
            check: check(),
            status,
        }];
        let calls = vec![
            Request::Hello { version: VERSION, workers: 2 },
            Request::Table,
            Request::Add {
                route: RouteKey("app/default".into()),
                backend: backend("web.2#4", 5001),
                check: check(),
                initial: InitialHealth::AssumeHealthy,
            },
            Request::Remove { instance: id("web.2#4") },
            Request::Drain { drain: 7, instance: id("web.2#4"), timeout_ms: 30_000 },
            Request::Listen {
                spec: Box::new(ProxySpec::new("127.0.0.1:8080".parse().unwrap())),
                route: RouteKey("app/default".into()),
            },
            Request::Close,
            Request::Statics {
                app: AppName::new("blog").unwrap(),
                live: vec![LiveRelease { release: ReleaseId(3), dir: "/srv/releases/blog/v3".into(), mounts: vec![] }],
                route: Some(RouteKey("blog/staging".into())),
            },
            Request::Statics {
                app: AppName::new("blog").unwrap(),
                live: vec![LiveRelease { release: ReleaseId(3), dir: "/srv/releases/blog/v3".into(), mounts: vec![] }],
                route: None,
            },
            Request::Maintenance {
                route: RouteKey("app/default".into()),
                maintenance: Some(nonstop_core::maintenance::Maintenance {
                    page: Some("<h1>back soon</h1>".into()),
                    allow: vec!["10.0.0.0/8".parse().unwrap()],
                    retry_after_secs: 120,
                }),
            },
            Request::Maintenance { route: RouteKey("app/default".into()), maintenance: None },
            Request::Split {
                route: RouteKey("app/default".into()),
                split: Some(Split { instances: vec![id("web.1#4")], percent: 5 }),
            },
            Request::Split { route: RouteKey("app/default".into()), split: None },
            Request::Figures { route: RouteKey("app/default".into()) },
            Request::Hosts {
                route: RouteKey("blog/staging".into()),
                hosts: vec!["staging.blog.localhost".into(), "*.review.example.com".into()],
                default: false,
            },
            Request::Hosts { route: RouteKey("blog/production".into()), hosts: vec![], default: true },
            Request::RemoveRoute { route: RouteKey("blog/staging".into()) },
            Request::Subscribe,
        ];
        for (n, request) in calls.into_iter().enumerate() {
            let call = Call { id: n as u64, request };
            let line = encode(&call);
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'), "one line: {line:?}");
            assert_eq!(decode::<Call>(&line).unwrap(), call);
        }
        let answers = vec![
            Answer { id: 1, result: Ok(Reply::Hello { version: VERSION, pid: 42, backends: table.clone() }) },
            Answer {
                id: 2,
                result: Ok(Reply::Table { backends: table.clone(), routes: vec![RouteKey("blog/staging".into())] }),
            },
            Answer { id: 2, result: Ok(Reply::Table { backends: table, routes: vec![] }) },
            Answer { id: 3, result: Ok(Reply::Done) },
            Answer {
                id: 7,
                result: Ok(Reply::Figures {
                    backends: vec![BackendFigures {
                        requests: 20,
                        errors_5xx: 2,
                        latency: {
                            let mut h = nonstop_core::traffic::LatencyHistogram::new();
                            h.record(Duration::from_millis(12));
                            h
                        },
                        responses_4xx: 3,
                        upstream_errors: 1,
                        ..BackendFigures::new(id("web.1#4"))
                    }],
                    route: RouteFigures { static_hits: 7, no_backend: 1 },
                }),
            },
            Answer { id: 4, result: Err(PlaneError::Version { plane: 2, daemon: 1 }) },
            Answer {
                id: 5,
                result: Err(PlaneError::Listen { addr: "0.0.0.0:80".into(), reason: "permission denied".into() }),
            },
            Answer { id: 6, result: Err(PlaneError::Config { reason: "bad certificate".into() }) },
            Answer {
                id: 8,
                result: Err(PlaneError::Hosts {
                    refusal: HostsError::Claimed {
                        route: RouteKey("blog/staging".into()),
                        host: "blog.test".into(),
                        by: RouteKey("blog/production".into()),
                    },
                }),
            },
            Answer {
                id: 9,
                result: Err(PlaneError::Hosts {
                    refusal: HostsError::Invalid {
                        route: RouteKey("blog/staging".into()),
                        host: "*".into(),
                        problem: nonstop_core::ingress::HostProblem::CatchAll,
                    },
                }),
            },
        ];
        for a in answers {
            assert_eq!(decode::<Answer>(&encode(&a)).unwrap(), a);
        }
        let events = vec![
            Event::Health {
                change: HealthEvent {
                    instance: id("web.1#3"),
                    health: BackendHealth::Unhealthy,
                    detail: "connect: connection refused".into(),
                    cause: nonstop_core::traffic::HealthCause::Smoke,
                },
            },
            Event::Drained { drain: 7, instance: id("web.2#4"), outcome: DrainOutcome::TimedOut { in_flight: 3 } },
            Event::Drained { drain: 8, instance: id("web.2#4"), outcome: DrainOutcome::Drained },
        ];
        for e in events {
            assert_eq!(decode::<Event>(&encode(&e)).unwrap(), e);
        }
    }

    #[test]
    fn garbage_is_a_protocol_error_that_quotes_the_line() {
        for bad in ["", "hello", "{}", r#"{"id":1}"#, r#"{"id":1,"request":{"op":"explode"}}"#, "[1,2"] {
            match decode::<Call>(bad) {
                Err(PlaneError::Protocol { reason }) => assert!(reason.contains("cannot read"), "{reason}"),
                other => panic!("{bad:?} decoded as {other:?}"),
            }
        }
        let long = "x".repeat(MAX_LINE + 1);
        assert!(matches!(decode::<Call>(&long), Err(PlaneError::Protocol { reason }) if reason.contains("at most")));
    }

    #[test]
    fn a_call_an_older_data_plane_does_not_know_says_restart_the_keeper() {
        // What an older data plane answers to a call it does not know.
        let line = encode(&Call { id: 3, request: Request::Figures { route: RouteKey("r".into()) } });
        let old = line.replace("\"figures\"", "\"not_yet_invented\"");
        let err = decode::<Call>(&old).unwrap_err().too_old("figures").to_string();
        assert!(err.contains("does not know `figures`") && err.contains("restart the keeper"), "{err}");
        let other = PlaneError::Protocol { reason: "a line of 9 bytes".into() };
        assert_eq!(other.clone().too_old("figures"), other);
        // The same for the host calls, as an older data plane reads them.
        for (request, op) in [
            (Request::Hosts { route: RouteKey("r".into()), hosts: vec!["a.test".into()], default: true }, "hosts"),
            (Request::RemoveRoute { route: RouteKey("r".into()) }, "remove_route"),
        ] {
            let line = encode(&Call { id: 4, request });
            let old = line.replace(&format!("\"{op}\""), "\"not_yet_invented\"");
            let err = decode::<Call>(&old).unwrap_err().too_old(op).to_string();
            assert!(err.contains(&format!("does not know `{op}`")) && err.contains("restart the keeper"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_problem_and_the_fix() {
        let v = PlaneError::Version { plane: 2, daemon: 1 }.to_string();
        assert!(v.contains("protocol 2") && v.contains("restart the keeper"), "{v}");
        let l = PlaneError::Listen { addr: "0.0.0.0:80".into(), reason: "permission denied".into() }.to_string();
        assert!(l.contains("0.0.0.0:80") && l.contains("permission denied"), "{l}");
    }
}
