//! Proxy tuning knobs, with defaults chosen for apps on the same machine.

use nonstop_core::process::ProxySpec;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default for [`ProxyConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default for [`ProxyConfig::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ProxyConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`ProxyConfig::upstream_timeout`].
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`ProxyConfig::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`ProxyConfig::upstream_idle_timeout`].
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`ProxyConfig::max_idle_per_backend`].
pub const DEFAULT_MAX_IDLE_PER_BACKEND: usize = 128;
/// Default for [`ProxyConfig::no_backend_wait`].
pub const DEFAULT_NO_BACKEND_WAIT: Duration = Duration::from_secs(2);
/// Default for [`ProxyConfig::retry_body_limit`].
pub const DEFAULT_RETRY_BODY_LIMIT: usize = 64 * 1024;
/// Default for [`ProxyConfig::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default for [`ProxyConfig::max_header_bytes`].
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default for [`ProxyConfig::max_headers`].
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default for [`ProxyConfig::max_request_line`].
pub const DEFAULT_MAX_REQUEST_LINE: usize = 8 * 1024;
/// Default for [`ProxyConfig::max_body_bytes`].
pub const DEFAULT_MAX_BODY_BYTES: u64 = 100 * 1024 * 1024;

/// Default for [`ProxyConfig::body_memory_bytes`].
pub const DEFAULT_BODY_MEMORY_BYTES: usize = 64 * 1024;
/// Default for [`ProxyConfig::min_upload_rate`]: 1 KiB/s.
pub const DEFAULT_MIN_UPLOAD_RATE: u64 = 1024;
/// Default for [`ProxyConfig::upload_rate_window`].
pub const DEFAULT_UPLOAD_RATE_WINDOW: Duration = Duration::from_secs(15);
/// Shortest [`ProxyConfig::upload_rate_window`]: a shorter one would
/// judge a pause, not a rate.
pub const MIN_UPLOAD_RATE_WINDOW: Duration = Duration::from_secs(1);
/// Default for [`ProxyConfig::outlier_consecutive_5xx`].
pub const DEFAULT_OUTLIER_CONSECUTIVE_5XX: u32 = 10;
/// Default for [`ProxyConfig::outlier_base_ejection`].
pub const DEFAULT_OUTLIER_BASE_EJECTION: Duration = Duration::from_secs(10);
/// Default for [`ProxyConfig::max_connections_per_client`].
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: u32 = 256;

/// Smallest [`ProxyConfig::max_header_bytes`]: hyper's smallest read
/// buffer (a smaller one makes it panic).
pub const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;
/// Largest [`ProxyConfig::max_header_bytes`].
pub const MAX_MAX_HEADER_BYTES: usize = 16 * 1024 * 1024;
/// Smallest [`ProxyConfig::max_request_line`].
pub const MIN_MAX_REQUEST_LINE: usize = 256;
/// Largest [`ProxyConfig::max_headers`].
pub const MAX_MAX_HEADERS: usize = 10_000;
/// Largest [`ProxyConfig::workers`].
pub const MAX_WORKERS: usize = 1024;

/// How the proxy treats clients, upstreams and the gaps in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Time allowed to open a TCP connection to an instance (3 s). A refused
    /// connection fails at once; this only bounds a silent one.
    pub connect_timeout: Duration,
    /// Time a client has to send a complete request head, counted from its
    /// first byte, or from the accept for a new connection (10 s; nginx
    /// `client_header_timeout`, HAProxy `timeout http-request`). Protects
    /// against slowloris clients. A TLS handshake must also complete
    /// within it.
    pub header_read_timeout: Duration,
    /// Time a keep-alive client connection may sit idle between requests
    /// (60 s, as an ALB; nginx uses 75 s). For HTTP/2: time without any
    /// request in progress.
    pub idle_timeout: Duration,
    /// Time an instance has to send the response head once the request was
    /// sent (60 s, as nginx `proxy_read_timeout`). Exceeding it answers 504.
    pub upstream_timeout: Duration,
    /// Longest wait for the next part of a request body while the instance
    /// waits for it (30 s; nginx `client_body_timeout` is 60 s). A client
    /// trickling its body is answered 408 (or, if the instance already
    /// answered, its connection is closed) and the upstream request is
    /// aborted. Time the instance takes to read the body does not count.
    pub body_timeout: Duration,
    /// Idle pooled connections to an instance older than this are closed
    /// rather than reused (30 s).
    pub upstream_idle_timeout: Duration,
    /// Idle pooled connections kept per instance (128).
    pub max_idle_per_backend: usize,
    /// How long a request waits for a healthy instance to appear before it
    /// is answered 503 (2 s). Covers brief gaps such as a restart of the
    /// only instance. Zero answers 503 at once.
    pub no_backend_wait: Duration,
    /// On `unbuffered_paths` (other bodies are read whole anyway): largest
    /// request body (by `Content-Length`) of an idempotent request that is
    /// buffered so that the request can be retried after its instance died
    /// (64 KiB). Larger or chunked bodies are streamed and such requests
    /// are retried only when nothing was sent.
    pub retry_body_limit: usize,
    /// On shutdown, how long in-flight requests and upgraded connections
    /// may take to finish before their connections are closed (30 s).
    pub shutdown_grace: Duration,
    /// Largest request head, request line and headers together (64 KiB,
    /// nginx's default is 4 × 8 KiB, HAProxy's `tune.bufsize` 16 KiB).
    /// Larger ones are answered 431. At least 8 KiB. For HTTP/2, the
    /// header list size (HPACK-decoded, 32 bytes counted per field).
    pub max_header_bytes: usize,
    /// Most header fields in a request (100, as HAProxy's
    /// `tune.http.maxhdr` 101). More are answered 431.
    pub max_headers: usize,
    /// Longest request target (URI) (8 KiB, nginx's per-line buffer).
    /// Longer ones are answered 414. A target longer than the whole
    /// `max_header_bytes` is answered 431 by the parser.
    pub max_request_line: usize,
    /// Largest request body (100 MiB). A larger `Content-Length` is
    /// answered 413 before anything is read or sent upstream, and so is an
    /// HTTP/1 chunk whose declared size would take the body past it, as
    /// soon as its size line arrives; a chunked (or HTTP/2) body that grows
    /// past it is answered 413 (when streamed, the upstream request is
    /// aborted, or, if the instance already answered, the connection
    /// closed).
    /// `u64::MAX`: no limit.
    pub max_body_bytes: u64,
    /// Threads that serve clients, each with a single-threaded runtime of
    /// its own (nginx's `worker_processes`, HAProxy's `nbthread`). 0: one
    /// per core (the default). At most [`MAX_WORKERS`]; `[proxy] workers`.
    /// Read when the [`crate::Proxy`] is made, which the daemon does when
    /// it starts: [`crate::Proxy::set_config`] does not change it, so a
    /// change applies after `nonstop upgrade` or a daemon restart.
    pub workers: usize,
    /// Peers (a load balancer or CDN in front, terminating TLS) whose
    /// `X-Forwarded-Proto` and `X-Forwarded-Host` are passed on and whose
    /// `X-Forwarded-For` chain is kept (the peer appended); from any other
    /// peer the proxy sets them itself, `X-Forwarded-For` to the peer's
    /// address alone (`[proxy] trusted_proxies`; empty: the proxy is the
    /// edge).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    // Request bodies (issue 15): read whole before an instance is chosen,
    // with a minimum rate. See `spool.rs` and `rate.rs`.
    /// A request body is read whole before an instance is chosen (so that
    /// a slow client never holds one of the app's workers): up to this
    /// many bytes in memory (64 KiB; nginx's `client_body_buffer_size` is
    /// 16 KiB), the rest in a temporary file in `body_buffer_dir`. Then it
    /// is sent with a `Content-Length`, and can be retried like an empty
    /// one. Paths in `unbuffered_paths` are streamed instead.
    pub body_memory_bytes: usize,
    /// Where bodies larger than `body_memory_bytes` are kept while they
    /// are read: unlinked temporary files (nothing is left behind). Made
    /// (0700) when missing. `None`: the system's temporary directory. The
    /// daemon sets `$NONSTOP_HOME/tmp`; not a `[proxy]` key.
    pub body_buffer_dir: Option<PathBuf>,
    /// Slowest request body accepted, in bytes per second, over
    /// `upload_rate_window` (1 KiB/s over 15 s). Counted only while the
    /// proxy waits for the body (an instance slow to read a streamed body
    /// does not count against its client), and only once a whole window
    /// was waited: a body that ends within 15 s is never judged. A client
    /// below it gets 408 with `Connection: close` (as for `body_timeout`),
    /// which ends a 1 byte/s drip after 15 s. Applies to streamed
    /// (`unbuffered_paths`) bodies too, against slowloris uploads. 0: no
    /// minimum (`body_timeout` alone).
    pub min_upload_rate: u64,
    /// See `min_upload_rate` (15 s). At least 1 s.
    pub upload_rate_window: Duration,
    /// Path prefixes (`"/upload/"`) whose request bodies are streamed to
    /// the instance as they arrive, as before buffering existed: for large
    /// uploads the app reads as a stream. `body_timeout` and
    /// `min_upload_rate` still apply; an idempotent one of at most
    /// `retry_body_limit` bytes is still buffered so that it can be
    /// retried. A plain prefix match on the path as the client sent it.
    pub unbuffered_paths: Vec<String>,
    /// Most client connections open at once, over every listener
    /// (`[proxy] max_connections`). `None` (the default): derived from the
    /// soft `RLIMIT_NOFILE` when the configuration is set, keeping a
    /// reserve of descriptors for the daemon and one upstream connection
    /// per client connection ([`crate::derived_max_connections`]: 384 for
    /// a limit of 1024). Beyond it, new connections are closed at once.
    pub max_connections: Option<usize>,
    /// Most client connections open at once from one IPv4 address or IPv6
    /// /64 (256; `[proxy] max_connections_per_client`); 0: no limit.
    /// Trusted proxies are not limited. Beyond it, new connections from
    /// that address are closed at once.
    pub max_connections_per_client: u32,
    /// Passive outlier detection (`outlier.rs`): a backend that answers
    /// 5xx to this many requests in a row while its peers in the route
    /// answer 2xx/3xx/4xx is taken out of rotation (10, as Envoy's
    /// `consecutive_5xx`; the proxy's own 502/504 for a failed attempt on
    /// it count). 0: never. Not a `[proxy]` key.
    pub outlier_consecutive_5xx: u32,
    /// How long an outlier stays out, per ejection it had (10 s, then
    /// 20 s, ... at most 5 minutes); passing health checks do not bring it
    /// back sooner. Not a `[proxy]` key.
    pub outlier_base_ejection: Duration,
}

impl ProxyConfig {
    /// Whether the body of a request for `path` is streamed rather than
    /// read whole first (`unbuffered_paths`).
    pub(crate) fn streams_body(&self, path: &str) -> bool {
        self.unbuffered_paths.iter().any(|prefix| path.starts_with(prefix.as_str()))
    }

    /// Where bodies are spilled (see `body_buffer_dir`).
    pub(crate) fn body_dir(&self) -> std::borrow::Cow<'_, Path> {
        match &self.body_buffer_dir {
            Some(dir) => std::borrow::Cow::Borrowed(dir),
            None => std::borrow::Cow::Owned(crate::spool::default_dir()),
        }
    }

    /// The outlier detection's thresholds.
    pub(crate) fn outlier_policy(&self) -> crate::outlier::Policy {
        crate::outlier::Policy { consecutive_5xx: self.outlier_consecutive_5xx, base: self.outlier_base_ejection }
    }

    /// Whether a client connecting from `ip` is a trusted proxy.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            upstream_idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            max_idle_per_backend: DEFAULT_MAX_IDLE_PER_BACKEND,
            no_backend_wait: DEFAULT_NO_BACKEND_WAIT,
            retry_body_limit: DEFAULT_RETRY_BODY_LIMIT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_request_line: DEFAULT_MAX_REQUEST_LINE,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            workers: 0,
            trusted_proxies: Vec::new(),
            body_memory_bytes: DEFAULT_BODY_MEMORY_BYTES,
            body_buffer_dir: None,
            min_upload_rate: DEFAULT_MIN_UPLOAD_RATE,
            upload_rate_window: DEFAULT_UPLOAD_RATE_WINDOW,
            unbuffered_paths: Vec::new(),
            max_connections: None,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            outlier_consecutive_5xx: DEFAULT_OUTLIER_CONSECUTIVE_5XX,
            outlier_base_ejection: DEFAULT_OUTLIER_BASE_EJECTION,
        }
    }
}

/// A setting the proxy cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid proxy setting `{key}`: {reason}")]
pub struct ConfigError {
    /// The `[proxy]` key.
    pub key: &'static str,
    pub reason: String,
}

impl ProxyConfig {
    /// The settings of a `[proxy]` section over the defaults. The spec was
    /// validated already; this checks again what the proxy cannot run with
    /// (e.g. a spec stored by an older version).
    pub fn from_spec(spec: &ProxySpec) -> Result<ProxyConfig, ConfigError> {
        Self::default().with_spec(spec)
    }

    /// `self` with the settings `spec` sets.
    pub fn with_spec(mut self, spec: &ProxySpec) -> Result<ProxyConfig, ConfigError> {
        fn size(key: &'static str, v: u64) -> Result<usize, ConfigError> {
            usize::try_from(v).map_err(|_| ConfigError { key, reason: format!("{v} is too large") })
        }
        if let Some(v) = spec.max_header_bytes {
            self.max_header_bytes = size("max_header_bytes", v)?;
        }
        if let Some(v) = spec.max_headers {
            self.max_headers = v as usize;
        }
        if let Some(v) = spec.max_request_line {
            self.max_request_line = size("max_request_line", v)?;
        }
        if let Some(v) = spec.max_body_bytes {
            self.max_body_bytes = if v == 0 { u64::MAX } else { v };
        }
        if let Some(v) = spec.header_timeout {
            self.header_read_timeout = v;
        }
        if let Some(v) = spec.idle_timeout {
            self.idle_timeout = v;
        }
        if let Some(v) = spec.upstream_timeout {
            self.upstream_timeout = v;
        }
        if let Some(v) = spec.body_timeout {
            self.body_timeout = v;
        }
        self.trusted_proxies = spec.trusted_proxies.clone();
        if let Some(v) = spec.workers {
            self.workers = v as usize;
        }
        if let Some(v) = spec.body_memory_bytes {
            self.body_memory_bytes = size("body_memory_bytes", v)?;
        }
        if let Some(v) = spec.min_upload_rate {
            self.min_upload_rate = v;
        }
        if let Some(v) = spec.upload_rate_window {
            self.upload_rate_window = v;
        }
        self.unbuffered_paths = spec.unbuffered_paths.clone();
        if let Some(v) = spec.max_connections {
            self.max_connections = Some(size("max_connections", v)?);
        }
        if let Some(v) = spec.max_connections_per_client {
            self.max_connections_per_client = v;
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks the limits hyper and the proxy rely on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, reason: String| Err(ConfigError { key, reason });
        if !(MIN_MAX_HEADER_BYTES..=MAX_MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return err(
                "max_header_bytes",
                format!("{} is outside {MIN_MAX_HEADER_BYTES}..={MAX_MAX_HEADER_BYTES}", self.max_header_bytes),
            );
        }
        if !(1..=MAX_MAX_HEADERS).contains(&self.max_headers) {
            return err("max_headers", format!("{} is outside 1..={MAX_MAX_HEADERS}", self.max_headers));
        }
        if self.max_request_line < MIN_MAX_REQUEST_LINE {
            return err("max_request_line", format!("{} is below {MIN_MAX_REQUEST_LINE}", self.max_request_line));
        }
        if self.workers > MAX_WORKERS {
            return err("workers", format!("{} is above {MAX_WORKERS}", self.workers));
        }
        if self.max_body_bytes == 0 {
            return err("max_body_bytes", "0 would refuse every body".into());
        }
        if self.upload_rate_window < MIN_UPLOAD_RATE_WINDOW {
            return err(
                "upload_rate_window",
                format!(
                    "{} ms is shorter than {} s",
                    self.upload_rate_window.as_millis(),
                    MIN_UPLOAD_RATE_WINDOW.as_secs()
                ),
            );
        }
        if let Some(path) = self.unbuffered_paths.iter().find(|p| !p.starts_with('/')) {
            return err("unbuffered_paths", format!("{path:?} does not start with '/'"));
        }
        if self.max_connections == Some(0) {
            return err("max_connections", "0 would refuse every connection".into());
        }
        for (key, d) in [
            ("header_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("upstream_timeout", self.upstream_timeout),
            ("body_timeout", self.body_timeout),
        ] {
            if d.is_zero() {
                return err(key, "must be longer than 0s".into());
            }
        }
        Ok(())
    }

    /// hyper's read buffer: bounds the request head (hyper answers 431 when
    /// a head does not fit). Never below hyper's minimum, whatever the
    /// configuration says.
    pub(crate) fn h1_buffer(&self) -> usize {
        self.max_header_bytes.max(MIN_MAX_HEADER_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_settings_override_defaults() {
        let mut spec = ProxySpec::new("127.0.0.1:8080".parse().unwrap());
        assert_eq!(ProxyConfig::from_spec(&spec).unwrap(), ProxyConfig::default());
        spec.max_header_bytes = Some(16 * 1024);
        spec.max_headers = Some(20);
        spec.max_request_line = Some(1024);
        spec.max_body_bytes = Some(0);
        spec.header_timeout = Some(Duration::from_secs(1));
        spec.idle_timeout = Some(Duration::from_secs(2));
        spec.upstream_timeout = Some(Duration::from_secs(3));
        spec.body_timeout = Some(Duration::from_secs(4));
        spec.workers = Some(3);
        spec.max_connections = Some(1000);
        spec.max_connections_per_client = Some(0);
        spec.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let c = ProxyConfig::from_spec(&spec).unwrap();
        assert!(c.trusts("10.1.2.3".parse().unwrap()) && c.trusts("::1".parse().unwrap()));
        assert!(c.trusts("::ffff:10.1.2.3".parse().unwrap()), "an IPv4 client on a dual-stack listener");
        assert!(
            !c.trusts("192.168.1.1".parse().unwrap()) && !ProxyConfig::default().trusts("10.1.2.3".parse().unwrap())
        );
        assert_eq!(c.max_header_bytes, 16 * 1024);
        assert_eq!(c.max_headers, 20);
        assert_eq!(c.max_request_line, 1024);
        assert_eq!(c.max_body_bytes, u64::MAX, "0 means no limit");
        assert_eq!(c.workers, 3);
        assert_eq!((c.max_connections, c.max_connections_per_client), (Some(1000), 0));
        assert_eq!(
            (c.header_read_timeout, c.idle_timeout, c.upstream_timeout, c.body_timeout),
            (Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(3), Duration::from_secs(4))
        );
    }

    #[test]
    fn the_spec_documents_the_proxy_defaults() {
        use nonstop_spec as spec;
        let c = ProxyConfig::default();
        assert_eq!(c.max_header_bytes as u64, spec::DEFAULT_PROXY_MAX_HEADER_BYTES);
        assert_eq!(c.max_headers as u32, spec::DEFAULT_PROXY_MAX_HEADERS);
        assert_eq!(c.max_request_line as u64, spec::DEFAULT_PROXY_MAX_REQUEST_LINE);
        assert_eq!(c.max_body_bytes, spec::DEFAULT_PROXY_MAX_BODY_BYTES);
        assert_eq!(c.header_read_timeout, spec::DEFAULT_PROXY_HEADER_TIMEOUT);
        assert_eq!(c.idle_timeout, spec::DEFAULT_PROXY_IDLE_TIMEOUT);
        assert_eq!(c.upstream_timeout, spec::DEFAULT_PROXY_UPSTREAM_TIMEOUT);
        assert_eq!(c.body_timeout, spec::DEFAULT_PROXY_BODY_TIMEOUT);
        assert_eq!(MIN_MAX_HEADER_BYTES as u64, spec::MIN_PROXY_MAX_HEADER_BYTES);
        assert_eq!(MAX_MAX_HEADER_BYTES as u64, spec::MAX_PROXY_MAX_HEADER_BYTES);
        assert_eq!(MIN_MAX_REQUEST_LINE as u64, spec::MIN_PROXY_MAX_REQUEST_LINE);
        assert_eq!(MAX_MAX_HEADERS as u32, spec::MAX_PROXY_MAX_HEADERS);
        assert_eq!(c.workers, 0, "one per core when [proxy] workers is left out");
        assert_eq!(MAX_WORKERS as u32, spec::MAX_PROXY_WORKERS);
        assert_eq!(c.body_memory_bytes as u64, spec::DEFAULT_PROXY_BODY_MEMORY_BYTES);
        assert_eq!(c.min_upload_rate, spec::DEFAULT_PROXY_MIN_UPLOAD_RATE);
        assert_eq!(c.upload_rate_window, spec::DEFAULT_PROXY_UPLOAD_RATE_WINDOW);
        assert_eq!(MIN_UPLOAD_RATE_WINDOW, spec::MIN_PROXY_UPLOAD_RATE_WINDOW);
        assert_eq!(c.max_connections, None, "derived from the file descriptor limit when left out");
        assert_eq!(c.max_connections_per_client, spec::DEFAULT_PROXY_MAX_CONNECTIONS_PER_CLIENT);
        assert_eq!(crate::FD_RESERVE_MIN, spec::PROXY_FD_RESERVE_MIN);
        assert!(spec::proxy_defaults_doc()
            .contains(&format!("{} at a limit of 1024", crate::derived_max_connections(1024))));
        // Whatever the spec accepts, the proxy runs with.
        let mut extreme = ProxySpec::new("127.0.0.1:8080".parse().unwrap());
        extreme.max_header_bytes = Some(spec::MIN_PROXY_MAX_HEADER_BYTES);
        extreme.max_request_line = Some(spec::MIN_PROXY_MAX_REQUEST_LINE);
        extreme.max_headers = Some(spec::MAX_PROXY_MAX_HEADERS);
        extreme.max_body_bytes = Some(0);
        extreme.workers = Some(spec::MAX_PROXY_WORKERS);
        extreme.max_connections = Some(spec::MAX_PROXY_MAX_CONNECTIONS);
        extreme.max_connections_per_client = Some(spec::MAX_PROXY_MAX_CONNECTIONS as u32);
        ProxyConfig::from_spec(&extreme).unwrap();
        extreme.workers = Some(spec::MIN_PROXY_WORKERS);
        extreme.body_memory_bytes = Some(spec::MAX_PROXY_BODY_MEMORY_BYTES);
        extreme.upload_rate_window = Some(spec::MIN_PROXY_UPLOAD_RATE_WINDOW);
        extreme.min_upload_rate = Some(0);
        ProxyConfig::from_spec(&extreme).unwrap();
    }

    #[test]
    fn body_settings_come_from_the_spec() {
        let mut spec = ProxySpec::new("127.0.0.1:8080".parse().unwrap());
        spec.body_memory_bytes = Some(1024);
        spec.min_upload_rate = Some(0);
        spec.upload_rate_window = Some(Duration::from_secs(30));
        spec.unbuffered_paths = vec!["/upload/".into()];
        let c =
            ProxyConfig { body_buffer_dir: Some("/var/x".into()), ..ProxyConfig::default() }.with_spec(&spec).unwrap();
        assert_eq!((c.body_memory_bytes, c.min_upload_rate), (1024, 0));
        assert_eq!(c.upload_rate_window, Duration::from_secs(30));
        assert_eq!(c.body_dir(), Path::new("/var/x"), "the daemon's directory stays");
        assert!(c.streams_body("/upload/a.bin") && !c.streams_body("/uploads") && !c.streams_body("/"));
        assert_eq!(ProxyConfig::default().body_dir(), std::env::temp_dir());
        spec.upload_rate_window = Some(Duration::from_millis(10));
        assert_eq!(ProxyConfig::from_spec(&spec).unwrap_err().key, "upload_rate_window");
        spec.upload_rate_window = None;
        spec.unbuffered_paths = vec!["upload".into()];
        assert_eq!(ProxyConfig::from_spec(&spec).unwrap_err().key, "unbuffered_paths");
    }

    #[test]
    fn settings_hyper_cannot_run_with_are_errors() {
        let mut spec = ProxySpec::new("127.0.0.1:8080".parse().unwrap());
        spec.max_header_bytes = Some(1024);
        let e = ProxyConfig::from_spec(&spec).unwrap_err();
        assert_eq!(e.key, "max_header_bytes");
        spec.max_header_bytes = None;
        spec.max_headers = Some(0);
        assert_eq!(ProxyConfig::from_spec(&spec).unwrap_err().key, "max_headers");
        spec.max_headers = None;
        spec.body_timeout = Some(Duration::ZERO);
        assert_eq!(ProxyConfig::from_spec(&spec).unwrap_err().key, "body_timeout");
        spec.body_timeout = None;
        spec.workers = Some(5000);
        assert_eq!(ProxyConfig::from_spec(&spec).unwrap_err().key, "workers");
        // Even an unchecked config never makes hyper panic.
        let c = ProxyConfig { max_header_bytes: 10, ..ProxyConfig::default() };
        assert_eq!(c.h1_buffer(), MIN_MAX_HEADER_BYTES);
    }
}
