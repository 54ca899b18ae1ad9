//! Body types of both directions. Enums rather than boxed trait objects:
//! nothing is allocated per request to carry a body, and streaming bodies
//! are passed frame by frame, never buffered.

use crate::backend::InFlight;
use crate::server::PhaseGuard;
use crate::upstream::{Upstream, UpstreamBody, UpstreamBodyError};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Why a client's request body stopped.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// It grew past `max_body_bytes`.
    TooLarge { limit: u64 },
    /// Nothing of it came for `body_timeout` while it was awaited.
    Timeout { after: Duration },
    /// The client's connection or framing failed (e.g. a bad chunk size).
    Client(hyper::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge { limit } => {
                write!(f, "request body larger than max_body_bytes ({limit} bytes)")
            }
            BodyError::Timeout { after } => {
                write!(f, "request body stalled for {} ms (body_timeout)", after.as_millis())
            }
            BodyError::Client(err) => write!(f, "request body could not be read: {err}"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Client(err) => Some(err),
            _ => None,
        }
    }
}

/// A client's request body with its size limit and read timeout.
///
/// The timeout counts only while the body is awaited and nothing comes
/// (`poll_frame` pending): an instance slow to read does not make the
/// client late. Its timer is allocated the first time the body is
/// awaited at all (a body that arrives with its head costs none) and is
/// moved only when it fires early, as `TimedStream`'s.
pub(crate) struct ClientBody {
    body: Incoming,
    /// Bytes still allowed.
    left: u64,
    limit: u64,
    timeout: Duration,
    /// When the body, awaited since then, times out.
    deadline: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ClientBody {
    pub fn new(body: Incoming, limit: u64, timeout: Duration) -> Self {
        Self { body, left: limit, limit, timeout, deadline: None, sleep: None }
    }

    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + self.timeout);
        crate::deadline::passed(&mut self.sleep, deadline, cx)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.deadline = None;
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.left = 0;
                        return Poll::Ready(Some(Err(BodyError::TooLarge { limit: this.limit })));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(BodyError::Client(err)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.timed_out(cx) {
                    return Poll::Ready(Some(Err(BodyError::Timeout { after: this.timeout })));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body on its way to an instance.
pub(crate) enum UpBody {
    /// Empty or buffered: can be sent again on a retry.
    Full(Option<Bytes>),
    /// The client's body, streamed: can be sent only once.
    Stream(ClientBody),
}

impl UpBody {
    pub fn full(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            UpBody::Full(None)
        } else {
            UpBody::Full(Some(bytes))
        }
    }

    pub fn empty() -> Self {
        UpBody::Full(None)
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            UpBody::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Full(bytes) => bytes.is_none(),
            UpBody::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            UpBody::Full(None) => SizeHint::with_exact(0),
            UpBody::Stream(body) => body.size_hint(),
        }
    }
}

/// What a response body holds of its upstream exchange: the in-flight
/// count (released when the body ends) and the connection (pooled again if
/// the body ended cleanly).
pub(crate) struct Lease {
    pub in_flight: InFlight,
    pub conn: Option<Upstream>,
}

impl Lease {
    /// The body was read to its end: the connection can serve again.
    fn finish(self) {
        if let Some(conn) = self.conn {
            self.in_flight.backend().recycle(conn);
        }
    }
}

enum Kind {
    Full(Option<Bytes>),
    Upstream { body: UpstreamBody, lease: Option<Lease> },
}

/// A response body on its way to the client.
pub struct ProxyBody {
    kind: Kind,
    _phase: Option<PhaseGuard>,
}

impl ProxyBody {
    pub(crate) fn full(bytes: Bytes, phase: Option<PhaseGuard>) -> Self {
        let bytes = if bytes.is_empty() { None } else { Some(bytes) };
        Self { kind: Kind::Full(bytes), _phase: phase }
    }

    pub(crate) fn upstream(body: UpstreamBody, lease: Lease, phase: Option<PhaseGuard>) -> Self {
        Self { kind: Kind::Upstream { body, lease: Some(lease) }, _phase: phase }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { body, lease } => {
                // The body's bytes are read from the connection by this
                // task (see `upstream.rs`).
                let Some(conn) = lease.as_mut().and_then(|lease| lease.conn.as_mut()) else {
                    return Poll::Ready(None);
                };
                match conn.poll_body(cx, body) {
                    Poll::Ready(None) => {
                        if let Some(lease) = lease.take() {
                            lease.finish();
                        }
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(data))) => {
                        if body.is_end_stream() {
                            if let Some(lease) = lease.take() {
                                lease.finish();
                            }
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Err(err))) => {
                        // The upstream broke mid-body: drop the connection.
                        lease.take();
                        Poll::Ready(Some(Err(err)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream { body, .. } => match body.exact_len() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Kind::Upstream { body, lease } = &mut self.kind {
            if let Some(lease) = lease.take() {
                // An empty body (HEAD, 204, 304) may be dropped unread.
                if body.is_end_stream() {
                    lease.finish();
                }
            }
        }
    }
}
