//! The proxy's listening sockets (plain and TLS) and the settings the
//! engine gives it from `[proxy]`: the `Ingress` over a `Proxy` in this
//! process. The data plane runs it (`plane::server`); a daemon without a
//! data plane (`--no-keeper`) runs it itself.

use crate::keeper::{KeeperLink, SocketKind};
use nonstop_core::traffic::RouteKey;
use nonstop_engine::{Ingress, IngressError};
use nonstop_proxy::{Proxy, ProxyConfig};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The listen backlog of the proxy's sockets (see where it is used).
const LISTEN_BACKLOG: u32 = 4096;

/// One listening socket of the proxy: its address, the token that stops
/// its accept loop, and a duplicate of the socket to hand to a successor.
struct Listening {
    addr: SocketAddr,
    token: CancellationToken,
    fd: std::os::fd::OwnedFd,
}

/// The proxy's listeners (plain and TLS) and settings, set by the engine
/// from `[proxy]`.
pub(crate) struct ProxyIngress {
    pub(crate) proxy: Proxy,
    plain: Mutex<Option<Listening>>,
    tls: Mutex<Option<Listening>>,
    /// Sockets received from a predecessor, used instead of binding.
    inherited: Mutex<HashMap<SocketAddr, std::net::TcpListener>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// What the spec does not set: where request bodies are buffered
    /// (`$NONSTOP_HOME/bodies`, made 0700 by the proxy).
    base: ProxyConfig,
    /// The keeper, if this daemon has one: it gets a duplicate of every
    /// listening socket, so that the socket outlives a crash.
    keeper: Option<Arc<KeeperLink>>,
    /// The `[proxy]` each route listened with: apps under one daemon share
    /// one proxy, so another app's must be the same (`listen` refuses a
    /// different one, naming both).
    specs: Mutex<BTreeMap<RouteKey, nonstop_core::process::ProxySpec>>,
}

/// The app part of a route key (`app/env`).
fn app_of(route: &RouteKey) -> &str {
    route.0.split_once('/').map_or(route.0.as_str(), |(app, _)| app)
}

/// Why `spec` cannot be `route`'s while `other` holds `held`: the first
/// setting that differs, and the fix. `None` when they agree.
fn spec_conflict(
    route: &RouteKey,
    spec: &nonstop_core::process::ProxySpec,
    other: &RouteKey,
    held: &nonstop_core::process::ProxySpec,
) -> Option<String> {
    if spec == held {
        return None;
    }
    let what = if spec.listen != held.listen {
        format!("listens on {} while {} listens on {}", spec.listen, other.0, held.listen)
    } else if spec.https_listen != held.https_listen {
        format!(
            "has https_listen {} while {} has {}",
            spec.https_listen.map_or("unset".to_string(), |a| a.to_string()),
            other.0,
            held.https_listen.map_or("unset".to_string(), |a| a.to_string())
        )
    } else {
        format!("has [proxy] settings (limits, timeouts or TLS) that differ from {}'s", other.0)
    };
    Some(format!(
        "{} {what}: the apps under one nonstop daemon share one proxy. Give `{}` the same [proxy] table as `{}` \
         (they are told apart by their hosts), or run it under another NONSTOP_HOME",
        route.0,
        app_of(route),
        app_of(other)
    ))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProxyIngress {
    pub(crate) fn new(
        proxy: Proxy,
        inherited: HashMap<SocketAddr, std::net::TcpListener>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        base: ProxyConfig,
        keeper: Option<Arc<KeeperLink>>,
    ) -> ProxyIngress {
        ProxyIngress {
            proxy,
            plain: Mutex::new(None),
            tls: Mutex::new(None),
            inherited: Mutex::new(inherited),
            shutdown,
            tasks,
            base,
            keeper,
            specs: Mutex::new(BTreeMap::new()),
        }
    }

    /// Addresses of sockets handed over that no listener took (yet).
    pub(crate) fn unused_inherited(&self) -> Vec<String> {
        lock(&self.inherited).keys().map(ToString::to_string).collect()
    }

    /// Tell the keeper about a new listener (and that an old one on
    /// another address is no longer wanted).
    fn keep(&self, new: &Listening, old: Option<&Listening>) {
        if let Some(k) = &self.keeper {
            use std::os::fd::AsFd;
            k.hold(SocketKind::Proxy, new.fd.as_fd());
            if let Some(old) = old.filter(|o| o.addr != new.addr) {
                k.release(old.addr);
            }
        }
    }

    fn unkeep(&self, old: &Listening) {
        if let Some(k) = &self.keeper {
            k.release(old.addr);
        }
    }

    /// Duplicates of the listening sockets, for a successor.
    pub(crate) fn handover(&self) -> Vec<std::os::fd::OwnedFd> {
        [
            lock(&self.plain).as_ref().and_then(|l| l.fd.try_clone().ok()),
            lock(&self.tls).as_ref().and_then(|l| l.fd.try_clone().ok()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Stop accepting; in-flight requests finish.
    pub(crate) fn stop_accepting(&self) {
        for slot in [&self.plain, &self.tls] {
            if let Some(l) = lock(slot).as_ref() {
                l.token.cancel();
            }
        }
    }

    /// A listening socket on `addr`: the predecessor's, or a new one.
    fn open(&self, addr: SocketAddr) -> Result<(tokio::net::TcpListener, std::os::fd::OwnedFd), IngressError> {
        let err = |e: std::io::Error| {
            IngressError::Listen(
                addr.to_string(),
                match e.kind() {
                    std::io::ErrorKind::AddrInUse => "the address is already in use by another program".to_string(),
                    std::io::ErrorKind::PermissionDenied => {
                        "permission denied (ports below 1024 need privileges)".to_string()
                    }
                    _ => e.to_string(),
                },
            )
        };
        let inherited = lock(&self.inherited).remove(&addr);
        let listener = match inherited {
            Some(l) => {
                l.set_nonblocking(true).map_err(err)?;
                tracing::info!("proxy takes over the listening socket on {addr} from the previous daemon");
                tokio::net::TcpListener::from_std(l).map_err(err)?
            }
            None => {
                let socket =
                    if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
                        .map_err(err)?;
                socket.set_reuseaddr(true).map_err(err)?;
                socket.bind(addr).map_err(err)?;
                // The accept queue, and the SYN queue of connections whose
                // request has not arrived yet (the proxy sets
                // TCP_DEFER_ACCEPT): beyond it new connections get SYN
                // cookies. The kernel caps it at net.core.somaxconn.
                socket.listen(LISTEN_BACKLOG).map_err(err)?
            }
        };
        let fd = {
            use std::os::fd::AsFd;
            listener.as_fd().try_clone_to_owned().map_err(err)?
        };
        Ok((listener, fd))
    }
}

impl Ingress for ProxyIngress {
    fn listen(&self, spec: &nonstop_core::process::ProxySpec, route: &RouteKey) -> Result<(), IngressError> {
        // Everything that can fail first: another app's [proxy], bind what
        // is new, check the settings and certificates; only then change
        // anything.
        if let Some(why) = lock(&self.specs)
            .iter()
            .filter(|(other, _)| app_of(other) != app_of(route))
            .find_map(|(other, held)| spec_conflict(route, spec, other, held))
        {
            return Err(IngressError::Config(why));
        }
        let plain_addr = spec.listen;
        let new_plain = match lock(&self.plain).as_ref() {
            Some(l) if l.addr == plain_addr => None,
            _ => Some(self.open(plain_addr)?),
        };
        let new_tls = match (spec.https_listen, lock(&self.tls).as_ref()) {
            (Some(a), Some(l)) if l.addr == a => None,
            (Some(a), _) => Some(self.open(a)?),
            (None, _) => None,
        };
        let config = self.base.clone().with_spec(spec).map_err(|e| IngressError::Config(e.to_string()))?;
        match nonstop_proxy::TlsSettings::from_spec(spec) {
            Some(t) => self.proxy.configure_tls(&t).map_err(|e| IngressError::Config(e.to_string()))?,
            None => self.proxy.clear_tls(),
        }
        self.proxy.set_config(config).map_err(|e| IngressError::Config(e.to_string()))?;
        self.proxy.set_default_route(route.clone());
        lock(&self.specs).insert(route.clone(), spec.clone());

        if let Some((listener, fd)) = new_plain {
            let token = self.shutdown.child_token();
            let (proxy, t) = (self.proxy.clone(), token.clone());
            self.tasks.spawn(async move {
                if let Err(e) = proxy.serve(listener, t).await {
                    tracing::error!("proxy on {plain_addr} stopped: {e}");
                }
            });
            tracing::info!("proxy listening on {plain_addr}");
            let new = Listening { addr: plain_addr, token, fd };
            let mut slot = lock(&self.plain);
            self.keep(&new, slot.as_ref());
            if let Some(old) = slot.replace(new) {
                old.token.cancel();
            }
        }
        match (spec.https_listen, new_tls) {
            (Some(addr), Some((listener, fd))) => {
                let token = self.shutdown.child_token();
                let (proxy, t) = (self.proxy.clone(), token.clone());
                self.tasks.spawn(async move {
                    if let Err(e) = proxy.serve_tls(listener, t).await {
                        tracing::error!("proxy (TLS) on {addr} stopped: {e}");
                    }
                });
                tracing::info!("proxy listening for TLS on {addr}");
                let new = Listening { addr, token, fd };
                let mut slot = lock(&self.tls);
                self.keep(&new, slot.as_ref());
                if let Some(old) = slot.replace(new) {
                    old.token.cancel();
                }
            }
            (None, _) => {
                if let Some(old) = lock(&self.tls).take() {
                    self.unkeep(&old);
                    old.token.cancel();
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn set_hosts(&self, route: &RouteKey, hosts: &[String], default: bool) -> Result<(), IngressError> {
        Ok(self.proxy.set_hosts(route, hosts, default)?)
    }

    fn remove_route(&self, route: &RouteKey) {
        self.proxy.remove_route(route);
        lock(&self.specs).remove(route);
    }

    fn close(&self) {
        // Another app or environment still served here: keep listening.
        if self.proxy.host_claims().route_keys().next().is_some() {
            return;
        }
        for slot in [&self.plain, &self.tls] {
            if let Some(l) = lock(slot).take() {
                tracing::info!("proxy on {} closing", l.addr);
                self.unkeep(&l);
                l.token.cancel();
            }
        }
    }
}
