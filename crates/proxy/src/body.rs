//! Body types of both directions. Enums rather than boxed trait objects:
//! nothing is allocated per request to carry a body. Request bodies are
//! read whole first (in memory or a temporary file, `spool.rs`) unless
//! their path is one of `unbuffered_paths`; those, and response bodies,
//! are passed frame by frame.

use crate::backend::InFlight;
use crate::config::ProxyConfig;
use crate::rate::RateWindow;
use crate::server::{ConnCtx, PhaseGuard};
use crate::spool::{Buffered, Spill};
use crate::upstream::{Upstream, UpstreamBody, UpstreamBodyError};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Why a client's request body stopped.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// It grew past `max_body_bytes`, or a chunk declared a size that
    /// would.
    TooLarge { limit: u64 },
    /// Nothing of it came for `body_timeout` while it was awaited.
    Timeout { after: Duration },
    /// Fewer than `min_upload_rate × upload_rate_window` bytes came in the
    /// last `upload_rate_window` it was awaited.
    TooSlow { need: u64, window: Duration },
    /// The client's connection or framing failed (e.g. a bad chunk size).
    Client(hyper::Error),
    /// The body could not be written to (or read back from) its temporary
    /// file: the proxy's fault (e.g. a full disk).
    Spill(std::io::Error),
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
            BodyError::TooSlow { need, window } => write!(
                f,
                "request body slower than min_upload_rate: under {need} bytes in {} ms (upload_rate_window)",
                window.as_millis()
            ),
            BodyError::Client(err) => write!(f, "request body could not be read: {err}"),
            BodyError::Spill(err) => write!(f, "request body could not be buffered in a temporary file: {err}"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Client(err) => Some(err),
            BodyError::Spill(err) => Some(err),
            _ => None,
        }
    }
}

/// A client's request body with its size limit, gap timeout and minimum
/// rate.
///
/// Time counts only while the body is awaited and nothing comes
/// (`poll_frame` pending): an instance slow to read a streamed body does
/// not make the client late. The timer is allocated the first time the
/// body is awaited at all (a body that arrives with its head costs none,
/// and reads no clock) and is moved only when it fires early, as
/// `TimedStream`'s; so is the rate's state (`rate.rs`), boxed: this is
/// carried by every request (`UpBody`), so it stays small.
pub(crate) struct ClientBody {
    body: Incoming,
    /// Bytes still allowed.
    left: u64,
    /// The connection's configuration (limits, timeout, rate).
    config: Arc<ProxyConfig>,
    /// Since when the body is awaited (pending), if it is.
    waiting_since: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Once awaited, with `min_upload_rate` set.
    rate: Option<Box<Rate>>,
    /// HTTP/1 chunked: the connection whose head scan may find a chunk
    /// size above the limit before its data comes (`server.rs`).
    chunks: Option<Arc<ConnCtx>>,
}

/// The rate check of one body.
struct Rate {
    window: RateWindow,
    /// Time awaited before `waiting_since`.
    awaited: Duration,
}

impl ClientBody {
    pub fn new(body: Incoming, config: &Arc<ProxyConfig>) -> Self {
        Self {
            body,
            left: config.max_body_bytes,
            config: Arc::clone(config),
            waiting_since: None,
            sleep: None,
            rate: None,
            chunks: None,
        }
    }

    /// Also ends the body (413) as soon as the connection's scan finds a
    /// chunk size that would take it past `max_body_bytes`.
    pub fn watching_chunk_sizes(mut self, ctx: &Arc<ConnCtx>) -> Self {
        self.chunks = Some(Arc::clone(ctx));
        self
    }

    fn received(&self) -> u64 {
        self.config.max_body_bytes - self.left
    }

    fn too_large(&self) -> BodyError {
        BodyError::TooLarge { limit: self.config.max_body_bytes }
    }

    /// Pending: the gap timeout or the rate, whichever comes first.
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Option<BodyError> {
        let min_rate = self.config.min_upload_rate;
        // Each round either arms the timer for later, or finds the rate's
        // check due and observes again (which moves the check on).
        for _ in 0..4 {
            let now = if min_rate > 0 || self.waiting_since.is_none() { Some(Instant::now()) } else { None };
            let since = *self.waiting_since.get_or_insert_with(|| now.unwrap_or_else(Instant::now));
            let gap = since + self.config.body_timeout;
            let mut deadline = gap;
            if min_rate > 0 {
                let received = self.received();
                let window = self.config.upload_rate_window;
                let rate = self.rate.get_or_insert_with(|| {
                    Box::new(Rate { window: RateWindow::new(min_rate, window), awaited: Duration::ZERO })
                });
                let awaited = rate.awaited + now.unwrap_or(since).saturating_duration_since(since);
                if rate.window.observe(awaited, received) {
                    return Some(self.too_slow());
                }
                let check = rate.window.next_check(received);
                deadline = deadline.min(since + check.saturating_sub(rate.awaited));
            }
            if !crate::deadline::passed(&mut self.sleep, deadline, cx) {
                return None;
            }
            if Instant::now() >= gap {
                return Some(BodyError::Timeout { after: self.config.body_timeout });
            }
        }
        // (Not reached: a due check moves on once observed.) Poll again.
        cx.waker().wake_by_ref();
        None
    }

    fn too_slow(&self) -> BodyError {
        let need = self.rate.as_ref().map_or(0, |r| r.window.need());
        BodyError::TooSlow { need, window: self.config.upload_rate_window }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.chunks.as_ref().is_some_and(|ctx| ctx.declared_body_too_large()) {
            this.chunks = None;
            this.left = 0;
            return Poll::Ready(Some(Err(this.too_large())));
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(since) = this.waiting_since.take() {
                    if let Some(rate) = this.rate.as_mut() {
                        rate.awaited += since.elapsed();
                    }
                }
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.left = 0;
                        return Poll::Ready(Some(Err(this.too_large())));
                    }
                    this.left -= n;
                }
                let received = this.received();
                if let Some(rate) = this.rate.as_mut() {
                    if rate.window.observe(rate.awaited, received) {
                        return Poll::Ready(Some(Err(this.too_slow())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(BodyError::Client(err)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.poll_wait(cx) {
                Some(err) => Poll::Ready(Some(Err(err))),
                None => Poll::Pending,
            },
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
    /// Empty or buffered in memory: can be sent again on a retry.
    Full(Option<Bytes>),
    /// Buffered in a temporary file: can be sent again on a retry. The
    /// offset is how far [`Body::poll_frame`] read it (`upstream.rs` reads
    /// the file itself).
    File(Arc<Spill>, u64),
    /// The client's body, streamed: can be sent only once.
    Stream(ClientBody),
}

/// Pieces a file body is read in.
pub(crate) const FILE_PIECE: usize = 64 * 1024;

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

    pub fn buffered(body: Buffered) -> Self {
        match body {
            Buffered::Memory(bytes) => Self::full(bytes),
            Buffered::File(spill) => UpBody::File(spill, 0),
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            UpBody::File(spill, offset) => {
                let left = spill.len().saturating_sub(*offset);
                if left == 0 {
                    return Poll::Ready(None);
                }
                let mut piece = vec![0u8; left.min(FILE_PIECE as u64) as usize];
                match spill.read_at(&mut piece, *offset) {
                    Ok(0) => Poll::Ready(Some(Err(BodyError::Spill(std::io::ErrorKind::UnexpectedEof.into())))),
                    Ok(n) => {
                        piece.truncate(n);
                        *offset += n as u64;
                        Poll::Ready(Some(Ok(Frame::data(Bytes::from(piece)))))
                    }
                    Err(err) => Poll::Ready(Some(Err(BodyError::Spill(err)))),
                }
            }
            UpBody::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Full(bytes) => bytes.is_none(),
            UpBody::File(spill, offset) => *offset >= spill.len(),
            UpBody::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            UpBody::Full(None) => SizeHint::with_exact(0),
            UpBody::File(spill, offset) => SizeHint::with_exact(spill.len().saturating_sub(*offset)),
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
    Upstream {
        body: UpstreamBody,
        lease: Option<Lease>,
    },
    /// A static file read from disk (see `statics.rs`).
    File(crate::statics::FileBody),
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

    pub(crate) fn file(file: crate::statics::FileBody, phase: PhaseGuard) -> Self {
        Self { kind: Kind::File(file), _phase: Some(phase) }
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
            Kind::File(file) => {
                file.poll_chunk(cx).map(|c| c.map(|r| r.map(Frame::data).map_err(UpstreamBodyError::from)))
            }
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
            Kind::File(file) => file.left() == 0,
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::File(file) => SizeHint::with_exact(file.left()),
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
