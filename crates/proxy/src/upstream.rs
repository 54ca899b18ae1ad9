//! One HTTP/1.1 connection to an instance: the proxy's own client side of
//! HTTP/1, driven by the client connection's task that uses it.
//!
//! Why not hyper's client: hyper splits a client connection into a
//! `SendRequest` handle and a connection future, with a channel, a oneshot
//! and a body channel between them; in callgrind that machinery was 36 %
//! of the proxy's instructions per request (keep-alive, small responses),
//! for a job that is a fixed, small part of HTTP/1 here: the instance is
//! always HTTP/1.1 behind a proxy that has already parsed, checked and
//! rewritten the request. What is left is writing a head the proxy built,
//! reading one response head (`httparse`, as hyper does), and framing its
//! body (RFC 9112 §6.3): no body, `Content-Length`, chunked, or until the
//! connection closes.
//!
//! # Rules
//! - A connection carries one exchange at a time: [`Upstream::send`] up to
//!   the response head, then [`Upstream::poll_body`] until the body ends.
//!   It goes back to the pool only when both the request and the response
//!   were complete, the response allowed keep-alive and nothing more came
//!   after it (`reusable`). Anything else (an error, a timeout, an early
//!   answer to a body still being sent, a client that left) drops it, which
//!   closes it.
//! - A pooled connection is not polled. A close by the instance shows in
//!   the socket's readiness, checked without a system call when the
//!   connection is taken again ([`Upstream::ready`]), or at the next read.
//! - A failed request comes back to the caller (for a retry anywhere) if
//!   not one byte of it was written, or if its body is empty or buffered
//!   (then only an idempotent one is sent again, by the caller's rule): the
//!   exchange keeps the request it wrote, so the caller keeps no copy. A
//!   request whose streamed body started going out never comes back.
//! - A protocol switch (101) hands the socket, with whatever the instance
//!   already sent past the head, to a tunnel ([`Upstream::into_upgraded`]).
//! - Response heads are copied out of the read buffer (one allocation,
//!   together with a small body that came with them), so that the read
//!   buffer stays owned by the connection and is reused, not reallocated,
//!   request after request.

use crate::body::UpBody;
use crate::error::{ErrorKind, ProxyError, Retry, Side};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Why a send failed, and the request if it can be sent again: it never
/// reached the instance (`Retry::Unsent`), or its body is empty or
/// buffered (in memory or a file), so that it can be written again as it
/// was (`Retry::IfIdempotent`: the caller decides by its method).
pub(crate) type Failed = (ProxyError, Option<Request<UpBody>>);

/// The largest response head accepted (hyper's client allowed ~400 KiB of
/// buffer; heads of web apps are a few hundred bytes).
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head (hyper's default is 100).
const MAX_HEADERS: usize = 128;
/// Spare room asked for before a read.
const READ_CHUNK: usize = 16 * 1024;
/// Up to this many body bytes are copied out of the read buffer instead of
/// splitting it (which would make the next read allocate a new buffer).
const COPY_MAX: usize = 4 * 1024;
/// Header fields a response's map has room for at least. The proxy adds
/// `X-Request-Id` to it (hence `count + 1`), and hyper parses the next
/// request on the client connection into it once the response is written
/// (its cached headers), to which the proxy adds its `X-Forwarded-*` and
/// `X-Request-Id`: a map made to fit the response alone grew twice per
/// keep-alive request (1,400 instructions in callgrind). Six fields take
/// eight slots, whose buckets still fit one small allocation.
const RESPONSE_HEADERS_ROOM: usize = 6;
/// The longest chunk-size line or trailer line of a chunked body.
const MAX_LINE: usize = 4 * 1024;
/// The most trailer bytes read (and dropped) after a chunked body.
const MAX_TRAILERS: usize = 64 * 1024;

pub(crate) struct Upstream {
    io: TcpStream,
    /// What was read and not consumed yet.
    rbuf: BytesMut,
    /// The request head (and body chunks) being written.
    wbuf: Vec<u8>,
    /// The response-head timer, kept across requests: a request moves it
    /// only when its deadline is earlier than the armed one, or when it
    /// fires early (about once per `upstream_timeout` on a busy
    /// connection), instead of registering and removing a timer each time.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the connection may carry another request once the current
    /// exchange ends cleanly.
    reusable: bool,
    /// A streamed request body still being sent (boxed: rare, and large).
    upload: Option<Box<Upload>>,
}

/// How a response body is delimited, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Done,
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the instance closes the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes of the current chunk still to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; the count is
    /// what was read of them so far.
    Trailers(usize),
}

/// The body of a response from an instance, read from its connection by
/// [`Upstream::poll_body`].
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    framing: Framing,
    /// Body bytes that came with the head.
    first: Option<Bytes>,
}

impl UpstreamBody {
    /// Nothing more will come.
    pub fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done && self.first.is_none()
    }

    /// The exact length left, when the response declared one.
    pub fn exact_len(&self) -> Option<u64> {
        let first = self.first.as_ref().map_or(0, |b| b.len() as u64);
        match self.framing {
            Framing::Done => Some(first),
            Framing::Length(left) => Some(first + left),
            Framing::Chunked(_) | Framing::Close => None,
        }
    }
}

/// A response body that broke off: the instance closed or reset the
/// connection, or sent a malformed chunk. The client's connection is then
/// aborted, so that the response never looks complete.
#[derive(Debug)]
pub struct UpstreamBodyError(String);

impl std::fmt::Display for UpstreamBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream response body: {}", self.0)
    }
}

impl std::error::Error for UpstreamBodyError {}

/// A static file that failed mid-body (see `statics.rs`).
impl From<io::Error> for UpstreamBodyError {
    fn from(err: io::Error) -> Self {
        UpstreamBodyError(format!("static file: {err}"))
    }
}

/// How reading a response head failed.
enum HeadError {
    /// The connection ended (EOF, reset) before a whole head came.
    Closed(io::Error),
    /// Bytes came that are not an acceptable response head.
    Protocol(String),
}

/// The request head (and a buffered body) on its way out.
struct Exchange {
    /// The request, for as long as it can be sent again (see [`Failed`]):
    /// until its first byte is written, and after that if its body is
    /// empty or buffered (kept by reference, nothing copied). A streamed
    /// body is taken out with the first byte, and the request dropped.
    req: Option<Request<UpBody>>,
    head_request: bool,
    /// A buffered body, written right after the head.
    full: Bytes,
    /// Bytes of head + `full` written.
    written: usize,
    head_sent: bool,
    chunked: bool,
    /// A streamed (or file) body, taken out of `req` once a byte went out;
    /// it becomes the connection's upload when the head is all out.
    stream: Option<Source>,
}

/// Where the bytes of an upload come from.
enum Source {
    /// The client, as they arrive.
    Client(crate::body::ClientBody),
    /// A body buffered in a temporary file, from `offset` on.
    File(std::sync::Arc<crate::spool::Spill>, u64),
}

/// A streamed request body still being sent. It keeps going while the
/// response comes back (an instance may answer, and even stream its
/// answer, before it has read the whole upload: an echo, a 413).
struct Upload {
    body: Source,
    chunked: bool,
    /// `wbuf[written..]` is still to be written; then the next frame, or
    /// nothing more after the last one.
    written: usize,
    last: bool,
}

impl Upstream {
    /// Open a connection to `addr` within `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Upstream, ProxyError> {
        let io = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ProxyError::connect(io::Error::from(io::ErrorKind::TimedOut))),
            Ok(Err(err)) => return Err(ProxyError::connect(err)),
            Ok(Ok(stream)) => stream,
        };
        let _ = io.set_nodelay(true);
        Ok(Upstream { io, rbuf: BytesMut::new(), wbuf: Vec::new(), timer: None, reusable: true, upload: None })
    }

    /// Whether the connection may be used again, as far as is known without
    /// looking at the socket.
    pub fn is_open(&self) -> bool {
        self.reusable && self.upload.is_none()
    }

    /// Whether a pooled connection can take a request: not closed by the
    /// instance meanwhile. Reads only when the socket is known to be
    /// readable (an idle connection that is readable was closed, or sent
    /// something unasked: either way it is done).
    pub fn ready(&mut self) -> bool {
        if !self.reusable || !self.rbuf.is_empty() {
            self.reusable = false;
            return false;
        }
        let mut probe = [0u8; 1];
        match self.io.try_read(&mut probe) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => true,
            _ => {
                self.reusable = false;
                false
            }
        }
    }

    /// Send `req` and wait for the response head, within `timeout` (504;
    /// the connection must then be dropped, which closes it). A streamed
    /// request body is sent meanwhile, and goes on being sent from
    /// [`poll_body`](Self::poll_body) if the answer comes first. On failure
    /// the request comes back if not one byte of it was written.
    pub async fn send(&mut self, req: Request<UpBody>, timeout: Duration) -> Result<Response<UpstreamBody>, Failed> {
        let deadline = Instant::now() + timeout;
        let chunked = encode_head(&mut self.wbuf, &req);
        let full = match req.body() {
            UpBody::Full(Some(bytes)) => bytes.clone(),
            _ => Bytes::new(),
        };
        let mut exchange = Exchange {
            head_request: req.method() == Method::HEAD,
            req: Some(req),
            full,
            written: 0,
            head_sent: false,
            chunked,
            stream: None,
        };
        poll_fn(|cx| self.poll_exchange(cx, &mut exchange, deadline)).await
    }

    fn poll_exchange(
        &mut self,
        cx: &mut Context<'_>,
        ex: &mut Exchange,
        deadline: Instant,
    ) -> Poll<Result<Response<UpstreamBody>, Failed>> {
        if !ex.head_sent {
            if let Err(failed) = self.poll_write_head(cx, ex) {
                self.reusable = false;
                return Poll::Ready(Err(failed));
            }
        }
        if let Err(err) = self.poll_upload(cx) {
            // The client's upload (or its temporary file) failed: not the
            // instance's fault, and nothing to retry.
            let err = ProxyError::new(err.kind(), err.side(), Retry::Never).with_source(err);
            return Poll::Ready(Err((err, None)));
        }
        match self.poll_head(cx, ex.head_request) {
            Poll::Ready(Ok(resp)) => {
                if !ex.head_sent {
                    // An answer before the whole request head went out.
                    self.reusable = false;
                }
                return Poll::Ready(Ok(resp));
            }
            Poll::Ready(Err(err)) => {
                self.reusable = false;
                return Poll::Ready(Err(match err {
                    HeadError::Closed(io) => (
                        ProxyError::new(ErrorKind::UpstreamClosed, Side::Upstream, Retry::IfIdempotent).with_source(io),
                        ex.req.take(),
                    ),
                    HeadError::Protocol(what) => (
                        ProxyError::new(ErrorKind::UpstreamProtocol, Side::Upstream, Retry::Never).with_source(what),
                        None,
                    ),
                }));
            }
            Poll::Pending => {}
        }
        if crate::deadline::passed(&mut self.timer, deadline, cx) {
            self.reusable = false;
            return Poll::Ready(Err((ProxyError::upstream_timeout(), None)));
        }
        Poll::Pending
    }

    /// Write what can be written of the head and a buffered body without
    /// waiting; a streamed body then becomes the connection's upload.
    // The request itself comes back on failure, by value, as from `send`.
    #[allow(clippy::result_large_err)]
    fn poll_write_head(&mut self, cx: &mut Context<'_>, ex: &mut Exchange) -> Result<(), Failed> {
        let head = self.wbuf.len();
        let total = head + ex.full.len();
        while ex.written < total {
            let polled = if ex.written < head {
                let bufs = [IoSlice::new(&self.wbuf[ex.written..]), IoSlice::new(&ex.full)];
                crate::sockio::poll_send_vectored(&self.io, cx, &bufs)
            } else {
                Pin::new(&mut self.io).poll_write(cx, &ex.full[ex.written - head..])
            };
            match polled {
                Poll::Pending => return Ok(()),
                Poll::Ready(Ok(0)) => return Err(write_failed(ex, io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    if ex.written == 0 {
                        // Sent (in part): a streamed body can no longer be
                        // sent again; a buffered one can.
                        match ex.req.as_ref().map(Request::body) {
                            Some(UpBody::Stream(_)) => {
                                if let Some(UpBody::Stream(body)) = ex.req.take().map(Request::into_body) {
                                    ex.stream = Some(Source::Client(body));
                                }
                            }
                            Some(UpBody::File(spill, offset)) => {
                                ex.stream = Some(Source::File(std::sync::Arc::clone(spill), *offset));
                            }
                            Some(UpBody::Full(_)) | None => {}
                        }
                    }
                    ex.written += n;
                }
                Poll::Ready(Err(err)) => return Err(write_failed(ex, err)),
            }
        }
        ex.head_sent = true;
        if let Some(body) = ex.stream.take() {
            // The head is out: `wbuf` is the upload's from now on.
            self.wbuf.clear();
            self.upload = Some(Box::new(Upload { body, chunked: ex.chunked, written: 0, last: false }));
        }
        Ok(())
    }

    /// Send what can be sent of the upload, if any, without waiting; it
    /// ends (`upload` cleared) after its last byte. An instance that stops
    /// reading ends it too, and the connection cannot be reused: its
    /// answer may still come (e.g. a 413) and is read on. An error is the
    /// client's body failing (too large, too slow, malformed); the
    /// connection is then not reused either.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), crate::body::BodyError> {
        let Some(upload) = self.upload.as_mut() else { return Ok(()) };
        loop {
            while upload.written < self.wbuf.len() {
                let err = match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[upload.written..]) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(Ok(0)) => io::ErrorKind::WriteZero.into(),
                    Poll::Ready(Ok(n)) => {
                        upload.written += n;
                        continue;
                    }
                    Poll::Ready(Err(err)) => err,
                };
                tracing::debug!(error = %err, "upstream stopped reading the request body");
                self.upload = None;
                self.reusable = false;
                return Ok(());
            }
            if upload.last {
                break;
            }
            self.wbuf.clear();
            upload.written = 0;
            let body = match &mut upload.body {
                Source::Client(body) => body,
                Source::File(spill, offset) => {
                    // Already whole: no framing, no waiting (see `spool.rs`
                    // for why a plain read).
                    let left = spill.len().saturating_sub(*offset);
                    if left == 0 {
                        upload.last = true;
                        continue;
                    }
                    self.wbuf.resize(left.min(crate::body::FILE_PIECE as u64) as usize, 0);
                    match spill.read_at(&mut self.wbuf, *offset) {
                        Ok(n) if n > 0 => {
                            self.wbuf.truncate(n);
                            *offset += n as u64;
                        }
                        Ok(_) => {
                            self.reusable = false;
                            return Err(crate::body::BodyError::Spill(io::ErrorKind::UnexpectedEof.into()));
                        }
                        Err(err) => {
                            self.reusable = false;
                            return Err(crate::body::BodyError::Spill(err));
                        }
                    }
                    continue;
                }
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers of the client's body are dropped.
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if upload.chunked {
                        push_hex(&mut self.wbuf, data.len() as u64);
                        self.wbuf.extend_from_slice(b"\r\n");
                    }
                    self.wbuf.extend_from_slice(&data);
                    if upload.chunked {
                        self.wbuf.extend_from_slice(b"\r\n");
                    }
                }
                Poll::Ready(None) => {
                    if upload.chunked {
                        self.wbuf.extend_from_slice(b"0\r\n\r\n");
                    }
                    upload.last = true;
                }
                Poll::Ready(Some(Err(err))) => {
                    self.reusable = false;
                    return Err(err);
                }
            }
        }
        self.upload = None;
        Ok(())
    }

    /// Read until a final response head is parsed (informational 1xx
    /// answers other than 101 are skipped).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<Response<UpstreamBody>, HeadError>> {
        loop {
            if !self.rbuf.is_empty() {
                match self.parse_head(head_request) {
                    Ok(Some(resp)) => return Poll::Ready(Ok(resp)),
                    Ok(None) if self.rbuf.len() >= MAX_HEAD => return Poll::Ready(Err(head_too_large())),
                    Ok(None) => {}
                    Err(err) => return Poll::Ready(Err(err)),
                }
            }
            match self.poll_read(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(HeadError::Closed(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        if self.rbuf.is_empty() {
                            "connection closed before a response"
                        } else {
                            "connection closed in the middle of the response head"
                        },
                    ))))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(HeadError::Closed(err))),
            }
        }
    }

    /// One read into the spare room of `rbuf`.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.poll_read_up_to(cx, READ_CHUNK)
    }

    fn poll_read_up_to(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<usize>> {
        self.rbuf.reserve(room);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }

    /// A final response head from the start of `rbuf`, or `None` if it is
    /// not complete yet. Consumes it (and a small body that came whole
    /// with it) from `rbuf`.
    fn parse_head(&mut self, head_request: bool) -> Result<Option<Response<UpstreamBody>>, HeadError> {
        loop {
            let mut fields = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let status = httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut parsed, &self.rbuf, &mut fields)
                .map_err(|err| HeadError::Protocol(format!("invalid response head: {err}")))?;
            let httparse::Status::Complete(head_len) = status else {
                return Ok(None);
            };
            if head_len > MAX_HEAD {
                // (An incomplete one is refused by `poll_head` at this size.)
                return Err(head_too_large());
            }
            let code = parsed.code.unwrap_or(0);
            let status =
                StatusCode::from_u16(code).map_err(|_| HeadError::Protocol(format!("invalid status code {code}")))?;
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                // 100 Continue, 102, 103: not forwarded; the final answer follows.
                self.rbuf.advance(head_len);
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                continue;
            }
            // An app's own reason phrase ("200 Okay", "299 Custom") is
            // passed on; hyper writes the canonical one otherwise.
            let reason = parsed
                .reason
                .filter(|reason| !reason.is_empty() && Some(*reason) != status.canonical_reason())
                .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok());
            let http10 = parsed.version == Some(0);
            // Where each field is, relative to the start of the head: the
            // head is copied out of `rbuf` below.
            let base = self.rbuf.as_ptr() as usize;
            let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
            let count = parsed.headers.len();
            let mut length: Option<u64> = None;
            let mut chunked = false;
            let mut transfer_coded = false;
            let mut close = http10;
            for (field, span) in parsed.headers.iter().zip(spans.iter_mut()) {
                let name_at = field.name.as_ptr() as usize - base;
                let value_at = field.value.as_ptr() as usize - base;
                *span = (name_at as u32, field.name.len() as u32, value_at as u32, field.value.len() as u32);
                let name = field.name.as_bytes();
                if name.eq_ignore_ascii_case(b"content-length") {
                    let value = parse_length(field.value)
                        .ok_or_else(|| HeadError::Protocol("invalid Content-Length".to_string()))?;
                    if length.is_some_and(|seen| seen != value) {
                        return Err(HeadError::Protocol("conflicting Content-Length headers".to_string()));
                    }
                    length = Some(value);
                } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                    transfer_coded = true;
                    // Only the last coding says how the body ends.
                    chunked = last_token(field.value).eq_ignore_ascii_case(b"chunked");
                } else if name.eq_ignore_ascii_case(b"connection") {
                    if crate::headers::has_token(field.value, b"close") {
                        close = true;
                    } else if http10 && crate::headers::has_token(field.value, b"keep-alive") {
                        close = false;
                    }
                }
            }
            let no_body = head_request
                || status == StatusCode::SWITCHING_PROTOCOLS
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED;
            let mut framing = if no_body {
                Framing::Done
            } else if transfer_coded {
                if chunked {
                    Framing::Chunked(Chunk::Size)
                } else {
                    Framing::Close
                }
            } else {
                match length {
                    Some(0) => Framing::Done,
                    Some(n) => Framing::Length(n),
                    None => Framing::Close,
                }
            };
            if close || framing == Framing::Close || status == StatusCode::SWITCHING_PROTOCOLS {
                self.reusable = false;
            }
            // With Transfer-Encoding, a Content-Length is wrong (RFC 9112
            // §6.3): it is not forwarded, and the connection not reused.
            let drop_length = transfer_coded && length.is_some() && !no_body;
            if drop_length {
                self.reusable = false;
            }
            // Copy the head (and a small body that is all here) out of rbuf.
            let body_here = match framing {
                Framing::Length(n) if n as usize <= COPY_MAX && self.rbuf.len() - head_len >= n as usize => n as usize,
                _ => 0,
            };
            let copied = Bytes::copy_from_slice(&self.rbuf[..head_len + body_here]);
            self.rbuf.advance(head_len + body_here);
            let first = (body_here > 0).then(|| copied.slice(head_len..));
            if body_here > 0 {
                framing = Framing::Done;
            }

            let mut headers = HeaderMap::with_capacity((count + 1).max(RESPONSE_HEADERS_ROOM));
            for &(name_at, name_len, value_at, value_len) in &spans[..count] {
                let name = &copied[name_at as usize..(name_at + name_len) as usize];
                let name =
                    HeaderName::from_bytes(name).map_err(|_| HeadError::Protocol("invalid header name".to_string()))?;
                if drop_length && name == header::CONTENT_LENGTH {
                    continue;
                }
                let value = copied.slice(value_at as usize..(value_at + value_len) as usize);
                let value = HeaderValue::from_maybe_shared(value)
                    .map_err(|_| HeadError::Protocol(format!("invalid value of header {name}")))?;
                headers.append(name, value);
            }
            let mut resp = Response::new(UpstreamBody { framing, first });
            *resp.status_mut() = status;
            *resp.version_mut() = Version::HTTP_11;
            *resp.headers_mut() = headers;
            if let Some(reason) = reason {
                resp.extensions_mut().insert(reason);
            }
            if resp.body().is_end_stream() && !self.rbuf.is_empty() && status != StatusCode::SWITCHING_PROTOCOLS {
                // More than one answer to one request.
                self.reusable = false;
            }
            return Ok(Some(resp));
        }
    }

    /// The next piece of a response body, `None` at its end. After an error
    /// the connection must be dropped.
    pub fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
        body: &mut UpstreamBody,
    ) -> Poll<Option<Result<Bytes, UpstreamBodyError>>> {
        if let Err(err) = self.poll_upload(cx) {
            // The answer cannot be trusted to be complete either.
            return Poll::Ready(Some(Err(self.broke(&format!("request body failed: {err}")))));
        }
        if let Some(first) = body.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        loop {
            match body.framing {
                Framing::Done => {
                    if !self.rbuf.is_empty() || self.upload.is_some() {
                        self.reusable = false;
                    }
                    return Poll::Ready(None);
                }
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                    if !self.rbuf.is_empty() {
                        let n = (left.min(self.rbuf.len() as u64)) as usize;
                        let data = self.take(n);
                        let left = left - n as u64;
                        body.framing = match body.framing {
                            Framing::Length(_) if left == 0 => Framing::Done,
                            Framing::Length(_) => Framing::Length(left),
                            _ if left == 0 => Framing::Chunked(Chunk::DataEnd),
                            _ => Framing::Chunked(Chunk::Data(left)),
                        };
                        if body.framing == Framing::Done && !self.rbuf.is_empty() {
                            self.reusable = false;
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    let room = (left.min(64 * 1024) as usize).max(READ_CHUNK);
                    match self.poll_read_up_to(cx, room) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Some(Err(self.broke("connection closed before the end of the body"))))
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(err)) => return Poll::Ready(Some(Err(self.broke(&err.to_string())))),
                    }
                }
                Framing::Close => {
                    if !self.rbuf.is_empty() {
                        let n = self.rbuf.len();
                        return Poll::Ready(Some(Ok(self.take(n))));
                    }
                    match self.poll_read(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) => {
                            body.framing = Framing::Done;
                            return Poll::Ready(None);
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(err)) => return Poll::Ready(Some(Err(self.broke(&err.to_string())))),
                    }
                }
                Framing::Chunked(state) => {
                    let step = match state {
                        Chunk::Size => self.chunk_size_line(),
                        Chunk::DataEnd => self.chunk_data_end(),
                        Chunk::Trailers(seen) => self.trailer_line(seen),
                        Chunk::Data(_) => unreachable!("handled with Length"),
                    };
                    match step {
                        Ok(Some(next)) => body.framing = next,
                        Ok(None) => match self.poll_read(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Ok(0)) => {
                                return Poll::Ready(Some(Err(self.broke("connection closed inside a chunked body"))))
                            }
                            Poll::Ready(Ok(_)) => {}
                            Poll::Ready(Err(err)) => return Poll::Ready(Some(Err(self.broke(&err.to_string())))),
                        },
                        Err(what) => return Poll::Ready(Some(Err(self.broke(what)))),
                    }
                }
            }
        }
    }

    /// `n` bytes from the front of `rbuf`: copied when small (the buffer
    /// stays whole and is reused), split off when large (no copy).
    fn take(&mut self, n: usize) -> Bytes {
        if n <= COPY_MAX {
            let data = Bytes::copy_from_slice(&self.rbuf[..n]);
            self.rbuf.advance(n);
            data
        } else {
            self.rbuf.split_to(n).freeze()
        }
    }

    fn broke(&mut self, what: &str) -> UpstreamBodyError {
        self.reusable = false;
        UpstreamBodyError(what.to_string())
    }

    /// `read` applied to one line (without its line ending) at the front
    /// of `rbuf`, which is then consumed, if a whole line is there. In
    /// place: splitting lines off would make the read buffer shared, and
    /// the next read allocate a new one.
    fn line<T>(&mut self, read: impl FnOnce(&[u8]) -> T) -> Result<Option<T>, &'static str> {
        match self.rbuf.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line = &self.rbuf[..end];
                let value = read(line.strip_suffix(b"\r").unwrap_or(line));
                self.rbuf.advance(end + 1);
                Ok(Some(value))
            }
            None if self.rbuf.len() > MAX_LINE => Err("chunk-size or trailer line too long"),
            None => Ok(None),
        }
    }

    fn chunk_size_line(&mut self) -> Result<Option<Framing>, &'static str> {
        let Some(size) =
            self.line(|line| parse_hex(line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii()))?
        else {
            return Ok(None);
        };
        let size = size.ok_or("invalid chunk size")?;
        Ok(Some(if size == 0 { Framing::Chunked(Chunk::Trailers(0)) } else { Framing::Chunked(Chunk::Data(size)) }))
    }

    fn chunk_data_end(&mut self) -> Result<Option<Framing>, &'static str> {
        match self.rbuf.first() {
            None => Ok(None),
            Some(b'\n') => {
                self.rbuf.advance(1);
                Ok(Some(Framing::Chunked(Chunk::Size)))
            }
            Some(b'\r') if self.rbuf.len() < 2 => Ok(None),
            Some(b'\r') if self.rbuf[1] == b'\n' => {
                self.rbuf.advance(2);
                Ok(Some(Framing::Chunked(Chunk::Size)))
            }
            Some(_) => Err("chunk data longer than its size"),
        }
    }

    fn trailer_line(&mut self, seen: usize) -> Result<Option<Framing>, &'static str> {
        let before = self.rbuf.len();
        let Some(empty) = self.line(<[u8]>::is_empty)? else { return Ok(None) };
        if empty {
            return Ok(Some(Framing::Done));
        }
        let seen = seen + (before - self.rbuf.len());
        if seen > MAX_TRAILERS {
            return Err("trailers too large");
        }
        Ok(Some(Framing::Chunked(Chunk::Trailers(seen))))
    }

    /// The socket and what the instance sent past its 101 head, for the
    /// tunnel of a protocol switch.
    pub fn into_upgraded(self) -> (TcpStream, Bytes) {
        (self.io, self.rbuf.freeze())
    }
}

fn head_too_large() -> HeadError {
    HeadError::Protocol(format!("response head larger than {} KiB", MAX_HEAD / 1024))
}

/// The request could not be written. If nothing of it was, it comes back.
fn write_failed(ex: &mut Exchange, err: io::Error) -> Failed {
    let retry = if ex.written == 0 { Retry::Unsent } else { Retry::IfIdempotent };
    (ProxyError::new(ErrorKind::UpstreamClosed, Side::Upstream, retry).with_source(err), ex.req.take())
}

/// Write the request head into `out`. The proxy frames the body itself:
/// the client's `Content-Length` and `Transfer-Encoding` are replaced by
/// what the body is. Returns whether the body goes chunked.
fn encode_head(out: &mut Vec<u8>, req: &Request<UpBody>) -> bool {
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    match req.uri().path_and_query().map(|pq| pq.as_str()) {
        Some(target) if !target.is_empty() => out.extend_from_slice(target.as_bytes()),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    for (name, value) in req.headers() {
        if *name == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let length = match req.body() {
        UpBody::Full(Some(bytes)) => Some(bytes.len() as u64),
        UpBody::Full(None) => {
            let expects_body = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
            (had_length || expects_body).then_some(0)
        }
        UpBody::File(spill, offset) => Some(spill.len().saturating_sub(*offset)),
        UpBody::Stream(body) => match body.size_hint().exact() {
            Some(n) => Some(n),
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                return true;
            }
        },
    };
    if let Some(n) = length {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, n);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    false
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn push_hex(out: &mut Vec<u8>, n: u64) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{n:x}");
}

/// A Content-Length value: digits only (a list of equal values, which RFC
/// 9110 §8.6 lets a recipient accept, counts as one).
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut result = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
        if result.is_some_and(|seen| seen != n) {
            return None;
        }
        result = Some(n);
    }
    result
}

/// A chunk size: 1 to 16 hex digits.
fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = (d as char).to_digit(16)?;
        Some((acc << 4) | u64::from(v))
    })
}

fn last_token(value: &[u8]) -> &[u8] {
    value.rsplit(|&b| b == b',').next().unwrap_or_default().trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connection to a scripted instance: `script` gets the accepted
    /// socket.
    async fn with_instance<F, Fut>(script: F) -> Upstream
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            script(socket).await;
        });
        Upstream::connect(addr, Duration::from_secs(2)).await.unwrap()
    }

    async fn read_request(socket: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "request ended early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    fn get(path: &str) -> Request<UpBody> {
        let mut req = Request::new(UpBody::empty());
        *req.uri_mut() = path.parse().unwrap();
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("app"));
        req
    }

    async fn body_of(conn: &mut Upstream, mut body: UpstreamBody) -> Result<Vec<u8>, UpstreamBodyError> {
        let mut all = Vec::new();
        while let Some(piece) = poll_fn(|cx| conn.poll_body(cx, &mut body)).await {
            all.extend_from_slice(&piece?);
        }
        Ok(all)
    }

    #[tokio::test]
    async fn a_small_response_is_read_with_its_head_and_the_connection_is_reused() {
        let mut conn = with_instance(|mut s| async move {
            for _ in 0..2 {
                let req = read_request(&mut s).await;
                assert!(req.starts_with("GET /x?y=1 HTTP/1.1\r\nhost: app\r\n"), "{req}");
                assert!(!req.contains("content-length"), "{req}");
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nok\n").await.unwrap();
            }
        })
        .await;
        for _ in 0..2 {
            assert!(conn.ready());
            let resp = conn.send(get("/x?y=1"), Duration::from_secs(2)).await.map_err(|e| e.0).unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-a"], "b");
            assert_eq!(resp.headers()["content-length"], "3");
            assert_eq!(resp.body().exact_len(), Some(3));
            let body = resp.into_body();
            assert_eq!(body_of(&mut conn, body).await.unwrap(), b"ok\n");
            assert!(conn.is_open());
        }
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_across_reads_with_extensions_and_trailers() {
        let mut conn = with_instance(|mut s| async move {
            read_request(&mut s).await;
            let parts: [&[u8]; 6] = [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5",
                b";ext=1\r\nhel",
                b"lo\r\n",
                b"6\r\n world\r",
                b"\n0\r\nX-Trailer: t\r\n",
                b"\r\n",
            ];
            for part in parts {
                s.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let resp = conn.send(get("/"), Duration::from_secs(2)).await.map_err(|e| e.0).unwrap();
        assert_eq!(resp.body().exact_len(), None);
        let body = resp.into_body();
        assert_eq!(body_of(&mut conn, body).await.unwrap(), b"hello world");
        assert!(conn.is_open(), "a complete chunked body leaves the connection reusable");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_the_connection_is_not_reused() {
        for response in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let mut conn = with_instance(move |mut s| async move {
                read_request(&mut s).await;
                s.write_all(response).await.unwrap();
            })
            .await;
            let resp = conn.send(get("/"), Duration::from_secs(2)).await.map_err(|e| e.0).unwrap();
            let body = resp.into_body();
            assert!(body_of(&mut conn, body).await.is_err(), "{:?}", String::from_utf8_lossy(response));
            assert!(!conn.is_open());
        }
    }

    #[tokio::test]
    async fn bodies_end_at_close_without_length_and_not_at_all_for_head_204_304() {
        let mut conn = with_instance(|mut s| async move {
            read_request(&mut s).await;
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil close").await.unwrap();
        })
        .await;
        let resp = conn.send(get("/"), Duration::from_secs(2)).await.map_err(|e| e.0).unwrap();
        let body = resp.into_body();
        assert_eq!(body_of(&mut conn, body).await.unwrap(), b"until close");
        assert!(!conn.is_open());

        for (method, status) in [(Method::HEAD, 200), (Method::GET, 204), (Method::GET, 304)] {
            let mut conn = with_instance(move |mut s| async move {
                read_request(&mut s).await;
                let head = format!("HTTP/1.1 {status} X\r\nContent-Length: 42\r\n\r\n");
                s.write_all(head.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            })
            .await;
            let mut req = get("/");
            *req.method_mut() = method.clone();
            let resp = conn.send(req, Duration::from_secs(2)).await.map_err(|e| e.0).unwrap();
            assert!(resp.body().is_end_stream(), "{method} {status}");
            assert!(conn.is_open(), "{method} {status}: nothing more was sent, reusable");
        }
    }

    #[tokio::test]
    async fn keep_alive_follows_the_connection_header_and_close_wins() {
        for (head, reusable) in [
            ("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", true),
            ("HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok", false),
            ("HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 2\r\n\r\nok", false),
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true),
        ] {
            let mut conn = with_instance(move |mut s| async move {
                read_request(&mut s).await;
                s.write_all(head.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            })
            .await;
            let resp = conn.send(get("/"), Duration::from_secs(2)).await.map_err(|e| e.0).unwrap();
            assert_eq!(body_of(&mut conn, resp.into_body()).await.unwrap(), b"ok");
            assert_eq!(conn.is_open(), reusable, "{head:?}");
        }
    }

    #[tokio::test]
    async fn informational_answers_are_skipped() {
        let mut conn = with_instance(|mut s| async move {
            read_request(&mut s).await;
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n").await.unwrap();
        })
        .await;
        let resp = conn.send(get("/"), Duration::from_secs(2)).await.map_err(|e| e.0).unwrap();
        assert_eq!(resp.status(), 201);
        assert!(resp.headers().get("link").is_none());
    }

    #[tokio::test]
    async fn malformed_heads_and_conflicting_lengths_are_protocol_errors() {
        let huge = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n", "a".repeat(MAX_HEAD));
        for response in [
            huge.as_bytes(),
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 99 Low\r\n\r\n",
        ] {
            let shown: String = String::from_utf8_lossy(response).chars().take(60).collect();
            let response = response.to_vec();
            let mut conn = with_instance(move |mut s| async move {
                read_request(&mut s).await;
                s.write_all(&response).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            })
            .await;
            let (err, returned) = conn.send(get("/"), Duration::from_secs(2)).await.unwrap_err();
            assert_eq!(err.kind, ErrorKind::UpstreamProtocol, "{shown:?}");
            assert_eq!(err.retry, Retry::Never);
            assert!(returned.is_none());
            assert!(!conn.is_open());
        }
    }

    #[tokio::test]
    async fn a_close_before_the_head_may_be_retried_if_idempotent() {
        let mut conn = with_instance(|mut s| async move {
            read_request(&mut s).await;
        })
        .await;
        let (err, returned) = conn.send(get("/"), Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::UpstreamClosed);
        assert_eq!(err.retry, Retry::IfIdempotent);
        let returned = returned.expect("written, but without a body: it can be sent again");
        assert_eq!(returned.uri().path(), "/");
    }

    #[tokio::test]
    async fn a_silent_instance_times_out() {
        let mut conn = with_instance(|mut s| async move {
            read_request(&mut s).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        })
        .await;
        let (err, _) = conn.send(get("/"), Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::UpstreamTimeout);
        assert!(!conn.is_open());
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_by_the_instance_is_not_ready() {
        let mut conn = with_instance(|s| async move {
            drop(s);
        })
        .await;
        // Let the close arrive and the runtime see it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while conn.ready() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!conn.ready());
    }

    #[tokio::test]
    async fn request_bodies_are_framed_by_the_proxy() {
        let mut conn = with_instance(|mut s| async move {
            let req = read_request(&mut s).await;
            assert!(req.starts_with("POST /up HTTP/1.1\r\n"), "{req}");
            assert!(req.contains("content-length: 5\r\n"), "{req}");
            assert!(!req.contains("Content-Length: 99"), "the client's length is replaced: {req}");
            let mut body = req.split("\r\n\r\n").nth(1).unwrap().as_bytes().to_vec();
            while body.len() < 5 {
                let mut buf = [0u8; 16];
                let n = s.read(&mut buf).await.unwrap();
                body.extend_from_slice(&buf[..n]);
            }
            assert_eq!(body, b"hello");
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
            let req = read_request(&mut s).await;
            assert!(req.contains("content-length: 0\r\n"), "an empty POST says so: {req}");
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        })
        .await;
        let mut req = Request::new(UpBody::full(Bytes::from_static(b"hello")));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "/up".parse().unwrap();
        req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let resp = conn.send(req, Duration::from_secs(2)).await.map_err(|e| e.0).unwrap();
        assert_eq!(resp.status(), 204);
        let mut req = Request::new(UpBody::empty());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "/up".parse().unwrap();
        let resp = conn.send(req, Duration::from_secs(2)).await.map_err(|e| e.0).unwrap();
        assert_eq!(resp.status(), 204);
    }

    #[test]
    fn numbers() {
        let mut out = Vec::new();
        push_decimal(&mut out, 0);
        out.push(b' ');
        push_decimal(&mut out, 18_446_744_073_709_551_615);
        out.push(b' ');
        push_hex(&mut out, 0);
        out.push(b' ');
        push_hex(&mut out, 0xabc);
        assert_eq!(out, b"0 18446744073709551615 0 abc");
        assert_eq!(parse_length(b"42"), Some(42));
        assert_eq!(parse_length(b"42, 42"), Some(42));
        assert_eq!(parse_length(b"42, 43"), None);
        assert_eq!(parse_length(b"+42"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_hex(b"1aF"), Some(0x1af));
        assert_eq!(parse_hex(b"0x1"), None);
        assert_eq!(parse_hex(b"11111111111111111"), None);
        assert_eq!(last_token(b"gzip, chunked "), b"chunked");
    }
}
