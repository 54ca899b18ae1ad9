//! Proxy tuning knobs, with defaults chosen for apps on the same machine.

use std::time::Duration;

/// Default for [`ProxyConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default for [`ProxyConfig::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ProxyConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`ProxyConfig::upstream_timeout`].
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
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

/// How the proxy treats clients, upstreams and the gaps in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Time allowed to open a TCP connection to an instance (3 s). A refused
    /// connection fails at once; this only bounds a silent one.
    pub connect_timeout: Duration,
    /// Time a client has to send a complete request head, counted from its
    /// first byte, or from the accept for a new connection (10 s; nginx
    /// `client_header_timeout`, HAProxy `timeout http-request`). Protects
    /// against slowloris clients.
    pub header_read_timeout: Duration,
    /// Time a keep-alive client connection may sit idle between requests
    /// (60 s, as an ALB; nginx uses 75 s).
    pub idle_timeout: Duration,
    /// Time an instance has to send the response head once the request was
    /// sent (60 s, as nginx `proxy_read_timeout`). Exceeding it answers 504.
    pub upstream_timeout: Duration,
    /// Idle pooled connections to an instance older than this are closed
    /// rather than reused (30 s).
    pub upstream_idle_timeout: Duration,
    /// Idle pooled connections kept per instance (128).
    pub max_idle_per_backend: usize,
    /// How long a request waits for a healthy instance to appear before it
    /// is answered 503 (2 s). Covers brief gaps such as a restart of the
    /// only instance. Zero answers 503 at once.
    pub no_backend_wait: Duration,
    /// Largest request body (by `Content-Length`) of an idempotent request
    /// that is buffered so that the request can be retried after its
    /// instance died (64 KiB). Larger or chunked bodies are streamed and
    /// such requests are retried only when nothing was sent.
    pub retry_body_limit: usize,
    /// On shutdown, how long in-flight requests and upgraded connections
    /// may take to finish before their connections are closed (30 s).
    pub shutdown_grace: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            upstream_idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            max_idle_per_backend: DEFAULT_MAX_IDLE_PER_BACKEND,
            no_backend_wait: DEFAULT_NO_BACKEND_WAIT,
            retry_body_limit: DEFAULT_RETRY_BODY_LIMIT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}
