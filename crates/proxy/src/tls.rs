//! TLS termination with rustls (ring provider): certificates from PEM
//! files, one per set of host names chosen by SNI (the first is the
//! default for clients that send none, or an unknown name), reloaded
//! without a restart when their files change.
//!
//! # Shape
//! One `rustls::ServerConfig` per [`crate::Proxy::configure_tls`] call,
//! whose certificate resolver reads an `ArcSwap<CertSet>`: a reload builds
//! a whole new `CertSet` from the files and swaps it in atomically;
//! handshakes in progress keep the set they loaded. The handshake path
//! takes no lock: one `ArcSwap` load and a hash lookup per handshake.
//!
//! A reloader task polls the files' metadata (modification time, size,
//! inode) every `reload_interval`. A pair that fails to load on reload is
//! logged (naming the file and the problem) and its previous certificate
//! stays in use; at start, the same failure is an error and nothing
//! changes.

use crate::Inner;
use arc_swap::ArcSwap;
use http::{header, Request};
use nonstop_core::process::ProxySpec;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Default for [`TlsSettings::reload_interval`].
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// One certificate chain and its key, served for `hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCert {
    /// Host names; `*.example.com` matches one label below `example.com`.
    pub hosts: Vec<String>,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Everything TLS termination needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// In order: the first is the default certificate.
    pub certs: Vec<TlsCert>,
    /// Answer plain-HTTP requests for a host with a certificate with a 308
    /// to `https://host[:https_port]/same/path?query`.
    pub redirect_http: bool,
    /// The port HTTPS is served on, for redirects (443 is left out).
    pub https_port: u16,
    /// How often the files are checked for changes (1 s).
    pub reload_interval: Duration,
}

impl TlsSettings {
    /// The TLS settings of a `[proxy]` section, if it has certificates.
    pub fn from_spec(spec: &ProxySpec) -> Option<TlsSettings> {
        if spec.tls.is_empty() {
            return None;
        }
        Some(TlsSettings {
            certs: spec
                .tls
                .iter()
                .map(|t| TlsCert { hosts: t.hosts.clone(), cert: t.cert.clone(), key: t.key.clone() })
                .collect(),
            redirect_http: spec.redirects_http(),
            https_port: spec.https_listen.map_or(443, |a| a.port()),
            reload_interval: DEFAULT_TLS_RELOAD_INTERVAL,
        })
    }
}

/// Why certificates could not be loaded. Each names the file and the
/// problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no TLS certificate configured")]
    NoCertificates,
    #[error("TLS certificate {cert}: no host names")]
    NoHosts { cert: PathBuf },
    #[error("TLS certificate {cert}: invalid host name {host:?}")]
    InvalidHost { cert: PathBuf, host: String },
    #[error("TLS host {host:?} is given two certificates: {first} and {second}")]
    DuplicateHost { host: String, first: PathBuf, second: PathBuf },
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")]
    NoCertificate { file: PathBuf },
    #[error("{file}: no PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY) in it")]
    NoKey { file: PathBuf },
    #[error("{file}: invalid PEM: {detail}")]
    BadPem { file: PathBuf, detail: String },
    #[error("{file}: unsupported private key: {detail}")]
    UnsupportedKey { file: PathBuf, detail: String },
    #[error("{key} is not the private key of the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{file}: invalid certificate: {detail}")]
    BadCertificate { file: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// One configured certificate, as `tls_status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStatus {
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Successful reloads since it was configured.
    pub reloads: u64,
    /// Why the last reload failed (the previous certificate is in use),
    /// if it did.
    pub last_error: Option<String>,
}

/// The certificates in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsStatus {
    pub certificates: Vec<CertStatus>,
}

/// Certificates by host: what the resolver and the HTTP redirect read.
pub(crate) struct CertSet {
    exact: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<Box<str>, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl CertSet {
    /// The certificate configured for `host` (lowercase, no port).
    fn lookup(&self, host: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(found) = self.exact.get(host) {
            return Some(found);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }

    fn has_host(&self, host: &str) -> bool {
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.lookup(&host.to_ascii_lowercase()).is_some()
        } else {
            self.lookup(host).is_some()
        }
    }
}

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct SniResolver(Arc<ArcSwap<CertSet>>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.0.load();
        let found = hello.server_name().and_then(|name| {
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                set.lookup(&name.to_ascii_lowercase()).cloned()
            } else {
                set.lookup(name).cloned()
            }
        });
        Some(found.unwrap_or_else(|| Arc::clone(&set.default)))
    }
}

/// What identifies a file's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp { modified: meta.modified().ok(), len: meta.len(), ino: meta.ino() })
}

struct Entry {
    hosts: Vec<String>,
    cert: PathBuf,
    key_file: PathBuf,
    key: Arc<CertifiedKey>,
    stamps: (Option<Stamp>, Option<Stamp>),
    reloads: u64,
    last_error: Option<String>,
}

/// The TLS side of a proxy, replaced as a whole by `configure_tls`.
pub(crate) struct TlsState {
    certs: Arc<ArcSwap<CertSet>>,
    pub acceptor: tokio_rustls::TlsAcceptor,
    redirect_http: bool,
    https_port: u16,
    entries: Mutex<Vec<Entry>>,
    provider: Arc<CryptoProvider>,
    /// Stops the reloader.
    pub token: CancellationToken,
}

impl TlsState {
    /// Loads every certificate; an error changes nothing.
    pub fn load(settings: &TlsSettings, token: CancellationToken) -> Result<Self, TlsError> {
        if settings.certs.is_empty() {
            return Err(TlsError::NoCertificates);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut entries = Vec::with_capacity(settings.certs.len());
        let mut seen: HashMap<String, PathBuf> = HashMap::new();
        for c in &settings.certs {
            if c.hosts.is_empty() {
                return Err(TlsError::NoHosts { cert: c.cert.clone() });
            }
            let mut hosts = Vec::with_capacity(c.hosts.len());
            for h in &c.hosts {
                let Some(host) = normalize_tls_host(h) else {
                    return Err(TlsError::InvalidHost { cert: c.cert.clone(), host: h.clone() });
                };
                if let Some(first) = seen.insert(host.clone(), c.cert.clone()) {
                    return Err(TlsError::DuplicateHost { host, first, second: c.cert.clone() });
                }
                hosts.push(host);
            }
            let stamps = (stamp(&c.cert), stamp(&c.key));
            let key = load_pair(&c.cert, &c.key, &provider)?;
            entries.push(Entry {
                hosts,
                cert: c.cert.clone(),
                key_file: c.key.clone(),
                key,
                stamps,
                reloads: 0,
                last_error: None,
            });
        }
        let certs = Arc::new(ArcSwap::from_pointee(cert_set(&entries)));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver(Arc::clone(&certs))));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Session tickets: resumed TLS 1.3 handshakes skip the signature.
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Self {
            certs,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            redirect_http: settings.redirect_http,
            https_port: settings.https_port,
            entries: Mutex::new(entries),
            provider,
            token,
        })
    }

    fn entries(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn redirects(&self) -> bool {
        self.redirect_http
    }

    /// Reload every pair whose files changed; swap in a new set if any
    /// did. Blocking file I/O: run off the async threads.
    pub fn reload_changed(&self) {
        let mut entries = self.entries();
        let mut changed = false;
        for e in entries.iter_mut() {
            let stamps = (stamp(&e.cert), stamp(&e.key_file));
            if stamps == e.stamps {
                continue;
            }
            e.stamps = stamps;
            match load_pair(&e.cert, &e.key_file, &self.provider) {
                Ok(key) => {
                    e.key = key;
                    e.reloads += 1;
                    e.last_error = None;
                    changed = true;
                    tracing::info!(cert = %e.cert.display(), hosts = ?e.hosts, "TLS certificate reloaded");
                }
                Err(err) => {
                    tracing::warn!(cert = %e.cert.display(), error = %err, "TLS certificate not reloaded; the previous one stays in use");
                    e.last_error = Some(err.to_string());
                }
            }
        }
        if changed {
            self.certs.store(Arc::new(cert_set(&entries)));
        }
    }

    pub fn status(&self) -> TlsStatus {
        TlsStatus {
            certificates: self
                .entries()
                .iter()
                .map(|e| CertStatus {
                    hosts: e.hosts.clone(),
                    cert: e.cert.clone(),
                    key: e.key_file.clone(),
                    reloads: e.reloads,
                    last_error: e.last_error.clone(),
                })
                .collect(),
        }
    }
}

/// Polls the files of `state` until its token is cancelled.
pub(crate) async fn reload_loop(state: Arc<TlsState>, interval: Duration) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = state.token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = Arc::clone(&state);
        if tokio::task::spawn_blocking(move || s.reload_changed()).await.is_err() {
            tracing::warn!("TLS certificate check failed");
        }
    }
}

fn cert_set(entries: &[Entry]) -> CertSet {
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for e in entries {
        for host in &e.hosts {
            match host.strip_prefix("*.") {
                Some(parent) => wildcard.insert(parent.into(), Arc::clone(&e.key)),
                None => exact.insert(host.as_str().into(), Arc::clone(&e.key)),
            };
        }
    }
    CertSet { exact, wildcard, default: Arc::clone(&entries[0].key) }
}

/// A configured TLS host, lowercase: `example.com` or `*.example.com`.
/// No port, no scheme, no path.
pub(crate) fn normalize_tls_host(raw: &str) -> Option<String> {
    let host = raw.trim().to_ascii_lowercase();
    let name = host.strip_prefix("*.").unwrap_or(&host);
    nonstop_core::ids::is_host_name(name).then_some(host)
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|source| TlsError::Read { file: file.to_path_buf(), source })
}

fn pem_error(file: &Path, err: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::BadPem { file: file.to_path_buf(), detail: err.to_string() }
}

/// A certificate chain and its key, checked to belong together.
fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    use rustls::pki_types::pem::Error as PemError;
    let cert_pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<_, _>>().map_err(|e| pem_error(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { file: cert.to_path_buf() });
    }
    let key_pem = read(key)?;
    let key_der = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(PemError::NoItemsFound) => return Err(TlsError::NoKey { file: key.to_path_buf() }),
        Err(e) => return Err(pem_error(key, e)),
    };
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::UnsupportedKey { file: key.to_path_buf(), detail: e.to_string() })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::KeyMismatch { cert: cert.to_path_buf(), key: key.to_path_buf() })
        }
        Err(e) => return Err(TlsError::BadCertificate { file: cert.to_path_buf(), detail: e.to_string() }),
    }
    Ok(Arc::new(certified))
}

/// For a plain-HTTP request to a host that has a certificate (and
/// redirects on): where the 308 points. ACME HTTP-01 challenges are never
/// redirected.
pub(crate) fn redirect_location<B>(inner: &Inner, req: &Request<B>) -> Option<String> {
    let tls = inner.tls.load();
    let tls = tls.as_ref()?;
    if !tls.redirect_http {
        return None;
    }
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if path.starts_with("/.well-known/acme-challenge/") {
        return None;
    }
    let host = match req.uri().authority() {
        Some(a) => a.host(),
        None => {
            let value = req.headers().get(header::HOST)?.to_str().ok()?;
            match value.rfind(':') {
                Some(colon) if !value[colon..].contains(']') => &value[..colon],
                _ => value,
            }
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if !tls.certs.load().has_host(host) {
        return None;
    }
    let path = if path.starts_with('/') { path } else { "/" };
    Some(if tls.https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{}{path}", tls.https_port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_hosts_are_names_or_wildcards() {
        assert_eq!(normalize_tls_host("Example.TEST").as_deref(), Some("example.test"));
        assert_eq!(normalize_tls_host("*.example.test").as_deref(), Some("*.example.test"));
        for bad in ["", "*.", "example.test:443", "https://x", "a..b", "a b", "*.*.x"] {
            assert_eq!(normalize_tls_host(bad), None, "{bad}");
        }
    }
}
