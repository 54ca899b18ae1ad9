//! Body types of both directions. Enums rather than boxed trait objects:
//! nothing is allocated per request to carry a body, and streaming bodies
//! are passed frame by frame, never buffered.

use crate::backend::InFlight;
use crate::server::PhaseGuard;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A request body on its way to an instance.
pub(crate) enum UpBody {
    /// Empty or buffered: can be sent again on a retry.
    Full(Option<Bytes>),
    /// The client's body, streamed: can be sent only once.
    Stream(Incoming),
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
    pub conn: Option<SendRequest<UpBody>>,
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
    Upstream {
        body: Incoming,
        lease: Option<Lease>,
    },
}

/// A response body on its way to the client.
pub struct ProxyBody {
    kind: Kind,
    _phase: Option<PhaseGuard>,
}

impl ProxyBody {
    pub(crate) fn full(bytes: Bytes, phase: Option<PhaseGuard>) -> Self {
        let bytes = if bytes.is_empty() { None } else { Some(bytes) };
        Self {
            kind: Kind::Full(bytes),
            _phase: phase,
        }
    }

    pub(crate) fn upstream(body: Incoming, lease: Lease, phase: Option<PhaseGuard>) -> Self {
        Self {
            kind: Kind::Upstream {
                body,
                lease: Some(lease),
            },
            _phase: phase,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { body, lease } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(lease) = lease.take() {
                            lease.finish();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        // The upstream broke mid-body: drop the connection.
                        lease.take();
                    }
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        if let Some(lease) = lease.take() {
                            lease.finish();
                        }
                    }
                    _ => {}
                }
                polled
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
            Kind::Upstream { body, .. } => body.size_hint(),
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
