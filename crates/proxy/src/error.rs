//! The one error of the request path. It says what failed, whose fault it
//! was and whether the request may be tried again; the retry loop and the
//! 502/503/504 choice read nothing else.

use crate::body::BodyError;
use http::StatusCode;
use std::fmt;

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The instance refused or reset the connection: it is not listening.
    ConnectRefused,
    /// The TCP connect did not complete within `connect_timeout`.
    ConnectTimeout,
    /// Any other connect failure.
    Connect,
    /// The proxy could not open a connection to the instance for a
    /// shortage of its own (no file descriptor, socket memory or local
    /// port left): not the instance's fault, and another instance would
    /// not fare better. Answered 503.
    LocalExhaustion,
    /// The connection to the instance closed or broke before the response
    /// head arrived.
    UpstreamClosed,
    /// The instance sent no response head within `upstream_timeout`.
    UpstreamTimeout,
    /// The instance answered something that is not HTTP, or the response
    /// cannot be forwarded.
    UpstreamProtocol,
    /// No healthy instance of the route (after waiting `no_backend_wait`).
    NoHealthyBackend,
    /// The client's request body could not be read (e.g. a bad chunk).
    ClientBody,
    /// The client's request body grew past `max_body_bytes`.
    BodyTooLarge,
    /// The client stalled while sending its request body.
    ClientTimeout,
    /// The client sent its request body slower than `min_upload_rate`.
    ClientTooSlow,
    /// A bug or an impossible state in the proxy itself.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect refused",
            ErrorKind::ConnectTimeout => "connect timed out",
            ErrorKind::Connect => "connect failed",
            ErrorKind::LocalExhaustion => "no file descriptor or socket left in the proxy",
            ErrorKind::UpstreamClosed => "upstream closed before responding",
            ErrorKind::UpstreamTimeout => "upstream response timed out",
            ErrorKind::UpstreamProtocol => "upstream protocol error",
            ErrorKind::NoHealthyBackend => "no healthy backend",
            ErrorKind::ClientBody => "client request body error",
            ErrorKind::BodyTooLarge => "request body too large",
            ErrorKind::ClientTimeout => "client request body timed out",
            ErrorKind::ClientTooSlow => "client request body too slow",
            ErrorKind::Internal => "internal error",
        }
    }
}

/// Whose fault it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The instance (or the network to it).
    Upstream,
    /// The client.
    Downstream,
    /// The proxy.
    Internal,
}

/// Whether the request may be sent again (to another instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retry {
    /// Nothing reached the instance: any request may be sent again.
    Unsent,
    /// The request was sent but no response came back: only an idempotent
    /// request whose body is still at hand may be sent again.
    IfIdempotent,
    /// Never.
    Never,
}

/// A failed attempt to proxy one request.
#[derive(Debug)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub side: Side,
    pub retry: Retry,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProxyError {
    pub fn new(kind: ErrorKind, side: Side, retry: Retry) -> Self {
        Self { kind, side, retry, source: None }
    }

    pub fn with_source(mut self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Classify a failed TCP connect. Nothing was sent.
    pub(crate) fn connect(err: std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        if crate::limits::is_local_exhaustion(&err) {
            return Self::new(ErrorKind::LocalExhaustion, Side::Internal, Retry::Never).with_source(err);
        }
        let kind = match err.kind() {
            Io::ConnectionRefused | Io::ConnectionReset | Io::ConnectionAborted => ErrorKind::ConnectRefused,
            Io::TimedOut => ErrorKind::ConnectTimeout,
            _ => ErrorKind::Connect,
        };
        Self::new(kind, Side::Upstream, Retry::Unsent).with_source(err)
    }

    pub(crate) fn upstream_timeout() -> Self {
        Self::new(ErrorKind::UpstreamTimeout, Side::Upstream, Retry::Never)
    }

    pub(crate) fn no_healthy_backend() -> Self {
        Self::new(ErrorKind::NoHealthyBackend, Side::Internal, Retry::Never)
    }

    /// The status the client gets for this error.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::ConnectRefused
            | ErrorKind::ConnectTimeout
            | ErrorKind::Connect
            | ErrorKind::UpstreamClosed
            | ErrorKind::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::NoHealthyBackend | ErrorKind::LocalExhaustion => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ClientBody => StatusCode::BAD_REQUEST,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::ClientTimeout | ErrorKind::ClientTooSlow => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Passive health: does this failure prove the instance is down?
    pub fn marks_unhealthy(&self) -> bool {
        self.kind == ErrorKind::ConnectRefused
    }

    /// A short detail for health events and logs, without OS error numbers,
    /// e.g. `connect error: Connection refused`.
    pub fn detail(&self) -> String {
        if self.side == Side::Downstream {
            // The client's body: say why it failed, not how hyper saw it.
            let mut source = self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static));
            while let Some(err) = source {
                if let Some(body) = err.downcast_ref::<BodyError>() {
                    return body.to_string();
                }
                source = err.source();
            }
        }
        match (&self.source, self.kind) {
            (
                Some(src),
                ErrorKind::ConnectRefused | ErrorKind::ConnectTimeout | ErrorKind::Connect | ErrorKind::LocalExhaustion,
            ) => {
                format!("connect error: {}", clean_io_message(&src.to_string()))
            }
            (Some(src), _) => format!("{}: {}", self.kind.as_str(), clean_io_message(&src.to_string())),
            (None, _) => self.kind.as_str().to_string(),
        }
    }
}

impl BodyError {
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            BodyError::TooLarge { .. } => ErrorKind::BodyTooLarge,
            BodyError::Timeout { .. } => ErrorKind::ClientTimeout,
            BodyError::TooSlow { .. } => ErrorKind::ClientTooSlow,
            BodyError::Client(_) => ErrorKind::ClientBody,
            BodyError::Spill(_) => ErrorKind::Internal,
        }
    }

    /// Whose fault it was: the client's, but for a temporary file the
    /// proxy could not use.
    pub(crate) fn side(&self) -> Side {
        match self {
            BodyError::Spill(_) => Side::Internal,
            _ => Side::Downstream,
        }
    }
}

/// `Connection refused (os error 111)` → `Connection refused`.
pub(crate) fn clean_io_message(msg: &str) -> &str {
    match msg.find(" (os error") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = match self.side {
            Side::Upstream => "upstream",
            Side::Downstream => "downstream",
            Side::Internal => "internal",
        };
        write!(f, "{} ({side} fault)", self.kind.as_str())?;
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_are_classified() {
        let refused = ProxyError::connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(refused.kind, ErrorKind::ConnectRefused);
        assert_eq!(refused.retry, Retry::Unsent);
        assert!(refused.marks_unhealthy());
        assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);

        let slow = ProxyError::connect(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(slow.kind, ErrorKind::ConnectTimeout);
        assert!(!slow.marks_unhealthy());

        // Our own shortage: 503, not the instance's fault, no retry.
        for errno in [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE] {
            let ours = ProxyError::connect(std::io::Error::from_raw_os_error(errno.raw_os_error()));
            assert_eq!(ours.kind, ErrorKind::LocalExhaustion);
            assert_eq!((ours.side, ours.retry), (Side::Internal, Retry::Never));
            assert!(!ours.marks_unhealthy());
            assert_eq!(ours.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::upstream_timeout().status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(ProxyError::no_healthy_backend().status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn os_error_numbers_are_dropped() {
        assert_eq!(clean_io_message("Connection refused (os error 111)"), "Connection refused");
        assert_eq!(clean_io_message("plain"), "plain");
    }
}
