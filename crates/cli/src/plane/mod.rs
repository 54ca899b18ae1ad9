//! The split between the control plane (the daemon: engine, supervisor,
//! API, store) and the data plane (the proxy: listeners, client
//! connections, route table, health checks, static files, TLS).
//!
//! When a keeper runs (`nonstop daemon`, what `up` and the systemd unit
//! start), the data plane runs in the keeper (`server.rs`), which outlives
//! daemons; the daemon drives it through [`client::PlaneClient`], a remote
//! implementation of the traffic boundary, over `$NONSTOP_HOME/plane.sock`
//! (`wire.rs`). Client connections live in the data plane: a daemon that
//! is SIGKILLed takes none with it. A daemon that (re)starts beside a
//! running data plane resyncs with its table (`resync.rs`).
//!
//! A daemon without a keeper (`--no-keeper`) runs the proxy in its own
//! process ([`PlaneIngress::Local`]).

pub mod client;
pub mod ingress;
pub mod resync;
pub mod server;
#[cfg(test)]
mod tests;
pub mod wire;

use crate::home::Home;
use client::PlaneClient;
use ingress::ProxyIngress;
use nonstop_core::traffic::RouteKey;
use nonstop_core::AppEnv;
use nonstop_engine::{Ingress, IngressError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Set by the keeper on the daemons it starts: the data plane's socket.
pub const SOCKET_VAR: &str = "NONSTOP_PLANE_SOCKET";

pub fn socket_path(home: &Home) -> PathBuf {
    home.dir.join("plane.sock")
}

/// The data plane socket this daemon was started with ([`SOCKET_VAR`]),
/// for its successor.
pub fn from_env() -> Option<&'static Path> {
    crate::start_env::get().plane_socket.as_deref()
}

/// The daemon's ingress: listeners in this process, or in the data plane.
pub enum PlaneIngress {
    Local(Arc<ProxyIngress>),
    Remote(Arc<PlaneClient>),
}

impl Ingress for PlaneIngress {
    fn listen(&self, spec: &nonstop_core::process::ProxySpec, route: &RouteKey) -> Result<(), IngressError> {
        match self {
            PlaneIngress::Local(i) => i.listen(spec, route),
            PlaneIngress::Remote(c) => c.listen(spec, route),
        }
    }

    fn set_hosts(&self, route: &RouteKey, hosts: &[String], default: bool) -> Result<(), IngressError> {
        match self {
            PlaneIngress::Local(i) => i.set_hosts(route, hosts, default),
            PlaneIngress::Remote(c) => c.set_hosts(route, hosts, default),
        }
    }

    fn remove_route(&self, route: &RouteKey) {
        match self {
            PlaneIngress::Local(i) => i.remove_route(route),
            PlaneIngress::Remote(c) => c.remove_route(route),
        }
    }

    fn close(&self) {
        match self {
            PlaneIngress::Local(i) => i.close(),
            PlaneIngress::Remote(c) => c.close(),
        }
    }
}

/// Where the static files of live releases are served from.
pub enum PlaneStatics {
    Local(crate::statics::StaticPublisher),
    Remote(Arc<PlaneClient>),
}

impl PlaneStatics {
    pub fn publish(&self, scope: &AppEnv, live: Vec<nonstop_engine::LiveStatics>) {
        match self {
            PlaneStatics::Local(p) => p.publish(&scope.route(), live),
            PlaneStatics::Remote(c) => c.publish_statics(scope, live),
        }
    }
}
