//! The client side: accept loops (plain and TLS, one per worker thread),
//! one hyper connection task per client (HTTP/1.1; h2c by prior knowledge,
//! told apart by the connection preface in the first read; h2 over TLS by
//! ALPN), client timeouts, graceful shutdown.
//!
//! Client timeouts live in [`TimedStream`], a thin wrapper of the
//! (plaintext) stream: hyper's own `header_read_timeout` also starts when a
//! keep-alive connection goes idle, which would make the idle timeout and
//! the slowloris timeout one and the same. The wrapper tells them apart
//! from what the request path records on the connection (a few relaxed
//! atomics per read, one timer per connection).
//!
//! The wrapper also scans each HTTP/1 request head it reads for what hyper
//! accepts silently: a repeated `Content-Length` (hyper merges equal ones)
//! and `Content-Length` with `Transfer-Encoding` (hyper drops the length
//! and closes the connection after the response). The request path
//! answers both with 400. Only heads that arrive while the connection
//! waits for a request are scanned; a request pipelined behind another is
//! read while the first is answered and keeps hyper's (safe) handling.
//!
//! After a scanned head with `Transfer-Encoding` (HTTP/1), the scan goes on
//! over the chunked body's size lines: a chunk that declares a size taking
//! the body past `max_body_bytes` is known as soon as its size line
//! arrives, and the request is answered 413 at once rather than after its
//! data (hyper only reports data as it comes).

use crate::accept::{Accepted, Acceptor, Counted, Kicks};
use crate::config::ProxyConfig;
use crate::lazy::LazyStream;
use crate::limits::{Event, Refusal};
use crate::Inner;
use atomic_waker::AtomicWaker;
use bytes::{Buf, BytesMut};
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Waiting for (the rest of) a request head.
const HEAD: u8 = 0;
/// A request is being answered.
const BUSY: u8 = 1;
/// Keep-alive, between requests.
const IDLE: u8 = 2;
/// Upgraded: bytes flow both ways, no HTTP timeouts.
const TUNNEL: u8 = 3;
/// Not a phase: what `TimedStream` starts from, so the first read arms.
const UNSEEN: u8 = u8::MAX;

/// No shutdown asked.
/// At shutdown, how long a connection between requests (a keep-alive one,
/// or one still waiting for a request head) may take to send its next
/// request, which is then answered with `Connection: close`, before it is
/// closed. Closing an idle keep-alive connection at once races with a
/// client that is sending on it just then: its request gets no answer.
const SHUTDOWN_HEAD_GRACE: Duration = Duration::from_secs(2);

const RUN: u8 = 0;
/// Finish the request in progress, then close.
const GRACEFUL: u8 = 1;
/// Close now.
const FORCE: u8 = 2;

/// Head scan results (see the module docs), read by the request path.
pub(crate) const SAW_CONTENT_LENGTH: u8 = 1;
pub(crate) const DUPLICATE_CONTENT_LENGTH: u8 = 2;
pub(crate) const SAW_TRANSFER_ENCODING: u8 = 4;

/// How the serve loop tells one connection (and its upgraded tunnel) to
/// stop. Polled on every wake-up of the connection task, so it must be
/// cheap and private to the connection: an atomic and an `AtomicWaker`,
/// rather than a shared `CancellationToken` (whose `cancelled()` takes the
/// token's mutex and its `Notify`'s mutex on every poll, contended by every
/// connection).
pub(crate) struct ConnSignal {
    state: AtomicU8,
    /// The connection task.
    waker: AtomicWaker,
    /// The upgraded tunnel's task, if any (an `AtomicWaker` holds one waker).
    tunnel_waker: AtomicWaker,
}

impl ConnSignal {
    fn new() -> Self {
        Self { state: AtomicU8::new(RUN), waker: AtomicWaker::new(), tunnel_waker: AtomicWaker::new() }
    }

    fn raise(&self, to: u8) {
        self.state.fetch_max(to, Ordering::AcqRel);
        self.waker.wake();
        self.tunnel_waker.wake();
    }

    /// Register the connection task and read the state.
    fn poll_state(&self, cx: &Context<'_>) -> u8 {
        self.waker.register(cx.waker());
        self.state.load(Ordering::Acquire)
    }

    /// For the tunnel task (or a TLS handshake): resolves when the
    /// connection must close now.
    pub async fn forced(&self) {
        std::future::poll_fn(|cx| {
            self.tunnel_waker.register(cx.waker());
            if self.state.load(Ordering::Acquire) == FORCE {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Per client connection, shared by its requests.
pub(crate) struct ConnCtx {
    pub peer: SocketAddr,
    pub peer_ip: HeaderValue,
    /// The configuration when the connection was accepted.
    pub config: Arc<ProxyConfig>,
    /// Accepted on a TLS listener.
    pub tls: bool,
    /// The peer is one of `trusted_proxies`: its `X-Forwarded-Proto` and
    /// `X-Forwarded-Host` are passed on.
    pub trusted: bool,
    /// HEAD or IDLE while no request is in progress (`busy == 0`).
    phase: AtomicU8,
    /// Requests in progress: at most one for HTTP/1, any number for h2.
    busy: AtomicU32,
    /// Bumped whenever the connection becomes idle, so that the stream
    /// restarts the idle timer even if it never saw the busy phase.
    epoch: AtomicU32,
    tunnel: AtomicBool,
    /// HTTP/2: bytes while idle are not a request head.
    multiplexed: AtomicBool,
    /// HTTP/1: the request in progress was read whole (no body, or a body
    /// read to its end); the client's reads only watch for it leaving.
    request_read: AtomicBool,
    /// HTTP/1: the response to the request in progress was handed to
    /// hyper, which writes its head at once: from then on it can no longer
    /// say `Connection: close`.
    responding: AtomicBool,
    /// The client read [`crate::lazy::LazyStream`] put off while the
    /// response was awaited: woken when the request ends, so that the next
    /// request on the connection is read at once.
    pub(crate) leave_check: atomic_waker::AtomicWaker,
    /// What the head scan found in the last request head.
    head_flags: AtomicU8,
    /// The chunk scan found a declared chunk size that takes the body of
    /// the request in progress past `max_body_bytes`.
    body_too_large: AtomicBool,
    /// Where upgraded connections are spawned (the serve loop's tracker).
    pub tasks: TaskTracker,
    pub signal: ConnSignal,
    /// Its entry in the serve loop's live set (weak: the set holds us).
    live: Weak<Mutex<Live>>,
    /// Its slot in the live set.
    id: usize,
    /// In its worker's count of open connections until dropped.
    _counted: Counted,
}

impl ConnCtx {
    fn new(
        peer: SocketAddr,
        config: Arc<ProxyConfig>,
        trusted: bool,
        tls: bool,
        tasks: TaskTracker,
        live: &Arc<Mutex<Live>>,
        counted: Counted,
    ) -> Arc<Self> {
        let peer_ip = crate::headers::ip_value(peer.ip());
        let mut reg = lock_live(live);
        let id = reg.reserve();
        let ctx = Arc::new(Self {
            peer,
            peer_ip,
            config,
            tls,
            trusted,
            phase: AtomicU8::new(HEAD),
            busy: AtomicU32::new(0),
            epoch: AtomicU32::new(0),
            tunnel: AtomicBool::new(false),
            multiplexed: AtomicBool::new(false),
            request_read: AtomicBool::new(false),
            responding: AtomicBool::new(false),
            leave_check: atomic_waker::AtomicWaker::new(),
            head_flags: AtomicU8::new(0),
            body_too_large: AtomicBool::new(false),
            tasks,
            signal: ConnSignal::new(),
            live: Arc::downgrade(live),
            id,
            _counted: counted,
        });
        reg.conns[id] = Some(Arc::clone(&ctx));
        ctx
    }

    /// Leave the live set: called by the connection task when it ends, or
    /// by the upgraded tunnel when it ends (the tunnel outlives its
    /// connection task and must still get the shutdown signal).
    pub fn unregister(&self) {
        if let Some(live) = self.live.upgrade() {
            lock_live(&live).remove(self.id);
        }
    }

    fn is_upgraded(&self) -> bool {
        self.tunnel.load(Ordering::Relaxed)
    }

    /// The phase the stream's timers follow, and the idle epoch.
    fn phase(&self) -> (u8, u32) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let phase = if self.tunnel.load(Ordering::Relaxed) {
            TUNNEL
        } else if self.busy.load(Ordering::Relaxed) > 0 {
            BUSY
        } else {
            self.phase.load(Ordering::Relaxed)
        };
        (phase, epoch)
    }

    /// A request head was read: no client timeout until its response body
    /// is done (the guard goes with the response body).
    pub fn begin_request(self: &Arc<Self>, http2: bool) -> PhaseGuard {
        if http2 && !self.multiplexed.load(Ordering::Relaxed) {
            self.multiplexed.store(true, Ordering::Relaxed);
        }
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.responding.store(false, Ordering::Relaxed);
        PhaseGuard(Arc::clone(self))
    }

    /// The response to the request in progress was handed to hyper.
    fn responding(&self) {
        self.responding.store(true, Ordering::Relaxed);
    }

    /// HTTP/1: the request in progress has been read whole; until the
    /// response is done, reads from the client only detect it leaving
    /// (see `LazyStream`).
    pub fn request_read_whole(&self) {
        self.request_read.store(true, Ordering::Relaxed);
    }

    /// See [`ConnCtx::request_read_whole`].
    pub fn only_awaits_the_response(&self) -> bool {
        self.request_read.load(Ordering::Relaxed) && !self.tunnel.load(Ordering::Relaxed)
    }

    /// An HTTP/2 connection (known once its first request came).
    pub fn is_multiplexed(&self) -> bool {
        self.multiplexed.load(Ordering::Relaxed)
    }

    /// The connection was handed to an upgrade.
    pub fn upgraded(&self) {
        self.tunnel.store(true, Ordering::Relaxed);
    }

    /// HTTP/1 chunked: a chunk of the request in progress declared a size
    /// that takes its body past `max_body_bytes`.
    pub fn declared_body_too_large(&self) -> bool {
        self.body_too_large.load(Ordering::Relaxed)
    }

    /// What the head scan found in this request's head (HTTP/1), cleared.
    pub fn take_head_flags(&self) -> u8 {
        if self.head_flags.load(Ordering::Relaxed) == 0 {
            0
        } else {
            self.head_flags.swap(0, Ordering::Relaxed)
        }
    }
}

/// Marks the connection idle when the last response (body) is done.
pub(crate) struct PhaseGuard(Arc<ConnCtx>);

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        let ctx = &self.0;
        if ctx.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            ctx.request_read.store(false, Ordering::Relaxed);
            ctx.phase.store(IDLE, Ordering::Relaxed);
            ctx.epoch.fetch_add(1, Ordering::Relaxed);
            // hyper may have polled the read (for the next request) before
            // the response went out, and been put off: it would wait for
            // the put-off delay otherwise.
            ctx.leave_check.wake();
        }
    }
}

/// Incremental scan of an HTTP/1 request head for the header lines hyper
/// merges or drops (see the module docs). Stops at the blank line.
struct HeadScan {
    /// Where the head ended in the bytes of the last `feed` (when `complete`).
    end: usize,
    active: bool,
    /// The blank line ending the head was seen (not set when the scan
    /// stopped at something malformed).
    complete: bool,
    state: ScanState,
    /// Bytes of the current header name seen.
    pos: usize,
    /// Which names the current line may still be.
    candidates: u8,
    flags: u8,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ScanState {
    RequestLine,
    LineStart,
    /// A `\r` at the start of a line: the head ends with the next `\n`.
    BlankCr,
    Name,
    SkipLine,
}

const CL_NAME: &[u8] = b"content-length";
const TE_NAME: &[u8] = b"transfer-encoding";
const CAND_CL: u8 = 1;
const CAND_TE: u8 = 2;

impl HeadScan {
    fn new() -> Self {
        Self { end: 0, active: true, complete: false, state: ScanState::RequestLine, pos: 0, candidates: 0, flags: 0 }
    }

    fn restart(&mut self) {
        *self = Self::new();
    }

    /// Feeds bytes; returns the flags once the head is complete.
    fn feed(&mut self, bytes: &[u8]) -> Option<u8> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                ScanState::RequestLine | ScanState::SkipLine => match bytes[i..].iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        i += at + 1;
                        self.state = ScanState::LineStart;
                    }
                    None => return None,
                },
                ScanState::LineStart | ScanState::BlankCr => {
                    let b = bytes[i];
                    if b == b'\n' {
                        self.active = false;
                        self.complete = true;
                        self.end = i + 1;
                        return Some(self.flags);
                    }
                    if self.state == ScanState::LineStart && b == b'\r' {
                        self.state = ScanState::BlankCr;
                        i += 1;
                        continue;
                    }
                    if self.state == ScanState::BlankCr {
                        // Malformed: hyper rejects it; stop looking.
                        self.active = false;
                        return Some(self.flags);
                    }
                    self.state = ScanState::Name;
                    self.pos = 0;
                    self.candidates = CAND_CL | CAND_TE;
                }
                ScanState::Name => {
                    let b = bytes[i];
                    i += 1;
                    if b == b':' {
                        if self.candidates & CAND_CL != 0 && self.pos == CL_NAME.len() {
                            self.flags |= if self.flags & SAW_CONTENT_LENGTH != 0 {
                                DUPLICATE_CONTENT_LENGTH
                            } else {
                                SAW_CONTENT_LENGTH
                            };
                        }
                        if self.candidates & CAND_TE != 0 && self.pos == TE_NAME.len() {
                            self.flags |= SAW_TRANSFER_ENCODING;
                        }
                        self.state = ScanState::SkipLine;
                        continue;
                    }
                    if b == b'\n' {
                        self.state = ScanState::LineStart;
                        continue;
                    }
                    let lower = b.to_ascii_lowercase();
                    if CL_NAME.get(self.pos) != Some(&lower) {
                        self.candidates &= !CAND_CL;
                    }
                    if TE_NAME.get(self.pos) != Some(&lower) {
                        self.candidates &= !CAND_TE;
                    }
                    self.pos += 1;
                    if self.candidates == 0 {
                        self.state = ScanState::SkipLine;
                    }
                }
            }
        }
        None
    }
}

/// Scan of a chunked request body's size lines (see the module docs):
/// the sum of the declared sizes against the limit. Stops at the last
/// chunk, or at anything malformed (hyper refuses that itself).
struct ChunkScan {
    state: ChunkState,
    /// The size being read, and its digits so far.
    size: u64,
    digits: u8,
    /// Sizes declared before this one.
    declared: u64,
    limit: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkState {
    Size,
    /// The rest of a size line (extensions), up to its `\n`.
    SizeLine,
    /// Data bytes still to come.
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkFeed {
    More,
    /// The last chunk came, or something malformed: nothing more to scan.
    Done,
    /// A declared size takes the body past the limit.
    TooLarge,
}

impl ChunkScan {
    fn new(limit: u64) -> Self {
        Self { state: ChunkState::Size, size: 0, digits: 0, declared: 0, limit }
    }

    fn feed(&mut self, bytes: &[u8]) -> ChunkFeed {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                ChunkState::Size => {
                    let b = bytes[i];
                    if let Some(d) = (b as char).to_digit(16) {
                        self.digits += 1;
                        if self.digits > 16 {
                            return ChunkFeed::Done;
                        }
                        self.size = (self.size << 4) | u64::from(d);
                        i += 1;
                        continue;
                    }
                    if self.digits == 0 {
                        return ChunkFeed::Done;
                    }
                    let total = self.declared.saturating_add(self.size);
                    if total > self.limit {
                        return ChunkFeed::TooLarge;
                    }
                    if self.size == 0 {
                        return ChunkFeed::Done;
                    }
                    self.declared = total;
                    self.state = ChunkState::SizeLine;
                }
                ChunkState::SizeLine | ChunkState::DataEnd => match bytes[i..].iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        i += at + 1;
                        self.state = if self.state == ChunkState::SizeLine {
                            ChunkState::Data(self.size)
                        } else {
                            self.size = 0;
                            self.digits = 0;
                            ChunkState::Size
                        };
                    }
                    None => return ChunkFeed::More,
                },
                ChunkState::Data(left) => {
                    let n = left.min((bytes.len() - i) as u64);
                    i += n as usize;
                    self.state = if n == left { ChunkState::DataEnd } else { ChunkState::Data(left - n) };
                }
            }
        }
        ChunkFeed::More
    }
}

/// The client stream with the header-read and idle timeouts and the head
/// scan. Wraps the TCP stream, or the TLS stream over it.
pub(crate) struct TimedStream<IO> {
    inner: IO,
    ctx: Arc<ConnCtx>,
    seen: (u8, u32),
    /// Whether `deadline` applies (not while busy or tunnelling).
    armed: bool,
    deadline: Instant,
    /// Fires at or before `deadline`. Made the first time a read waits
    /// while armed (most connections that send their request at once never
    /// need one); then moved only when the deadline comes closer, or when
    /// it fires early: a keep-alive request costs no timer
    /// re-registration, about one per `header_read_timeout` at most.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The connection speaks HTTP/2: its bytes are frames, never an
    /// HTTP/1 head to scan.
    http2: bool,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    scan: HeadScan,
    /// The chunk scan of the request whose head was scanned, if chunked.
    chunks: Option<ChunkScan>,
    /// The first bytes of a plain connection, read to tell HTTP/1 from h2c
    /// (see [`sniff`]); handed to hyper before anything else is read.
    first: BytesMut,
}

impl<IO> TimedStream<IO> {
    fn new(inner: IO, ctx: Arc<ConnCtx>) -> Self {
        let (header_read_timeout, idle_timeout) = (ctx.config.header_read_timeout, ctx.config.idle_timeout);
        Self {
            inner,
            ctx,
            seen: (UNSEEN, 0),
            armed: false,
            deadline: Instant::now(),
            sleep: None,
            http2: false,
            header_read_timeout,
            idle_timeout,
            scan: HeadScan::new(),
            chunks: None,
            first: BytesMut::new(),
        }
    }

    fn enter(&mut self, seen: (u8, u32)) {
        self.seen = seen;
        let timeout = match seen.0 {
            HEAD => self.header_read_timeout,
            IDLE => self.idle_timeout,
            _ => {
                self.armed = false;
                return;
            }
        };
        self.deadline = Instant::now() + timeout;
        self.armed = true;
        if let Some(sleep) = self.sleep.as_mut() {
            if self.deadline < sleep.deadline() {
                sleep.as_mut().reset(self.deadline);
            }
        }
    }

    /// Whether the armed deadline has passed; otherwise the sleep is
    /// registered to wake the task by then.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        crate::deadline::passed(&mut self.sleep, self.deadline, cx)
    }

    /// A whole HTTP/1 request head has been read in the HEAD phase: hyper
    /// needs nothing more from the client to go on, so the header-read
    /// timer need not run (the request's phase starts right after).
    fn head_complete(&self) -> bool {
        self.seen.0 == HEAD && self.scan.complete && !self.http2
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for TimedStream<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.first.is_empty() {
            // Read (and scanned, and timed) already.
            let n = this.first.len().min(buf.remaining());
            buf.put_slice(&this.first[..n]);
            if n == this.first.len() {
                this.first = BytesMut::new();
            } else {
                this.first.advance(n);
            }
            return Poll::Ready(Ok(()));
        }
        let phase = this.ctx.phase();
        if phase != this.seen {
            this.enter(phase);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                if this.seen.0 == IDLE && !this.ctx.multiplexed.load(Ordering::Relaxed) {
                    // First bytes of the next request: the head must now
                    // arrive within header_read_timeout.
                    let _ = this.ctx.phase.compare_exchange(IDLE, HEAD, Ordering::Relaxed, Ordering::Relaxed);
                    this.enter((HEAD, this.seen.1));
                    this.scan.restart();
                    if this.chunks.take().is_some() || this.ctx.declared_body_too_large() {
                        this.ctx.body_too_large.store(false, Ordering::Relaxed);
                    }
                }
                let mut body_bytes = None;
                if this.scan.active {
                    if let Some(flags) = this.scan.feed(new) {
                        if flags != 0 {
                            this.ctx.head_flags.store(flags, Ordering::Relaxed);
                        }
                        if this.scan.complete && !this.http2 {
                            if flags & (SAW_CONTENT_LENGTH | SAW_TRANSFER_ENCODING) == 0 {
                                // No body: the request is read whole.
                                this.ctx.request_read_whole();
                            } else if flags & SAW_TRANSFER_ENCODING != 0 {
                                this.chunks = Some(ChunkScan::new(this.ctx.config.max_body_bytes));
                                body_bytes = Some(&new[this.scan.end..]);
                            }
                        }
                    }
                } else if this.chunks.is_some() {
                    body_bytes = Some(new);
                }
                if let (Some(bytes), Some(chunks)) = (body_bytes, this.chunks.as_mut()) {
                    match chunks.feed(bytes) {
                        ChunkFeed::More => {}
                        ChunkFeed::Done => this.chunks = None,
                        ChunkFeed::TooLarge => {
                            this.chunks = None;
                            this.ctx.body_too_large.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.armed && !this.head_complete() && this.expired(cx) {
                    this.armed = false;
                    if this.seen.0 == IDLE {
                        // Idle keep-alive: end quietly, as if the client left.
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client did not send a complete request head in time",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TimedStream<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The live connections of one serve loop, to signal them at shutdown.
/// Locked once when a connection opens and once when it closes. A slab
/// (a connection's id is its slot, freed slots are reused): no hashing.
#[derive(Default)]
pub(crate) struct Live {
    conns: Vec<Option<Arc<ConnCtx>>>,
    /// Empty slots of `conns`.
    free: Vec<usize>,
}

impl Live {
    /// An empty slot, for the caller to fill.
    fn reserve(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        })
    }

    fn remove(&mut self, id: usize) {
        if self.conns.get_mut(id).and_then(Option::take).is_some() {
            self.free.push(id);
        }
    }
}

fn lock_live(live: &Mutex<Live>) -> MutexGuard<'_, Live> {
    live.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn signal_all(live: &Mutex<Live>, to: u8) {
    let conns: Vec<Arc<ConnCtx>> = lock_live(live).conns.iter().flatten().cloned().collect();
    for ctx in conns {
        ctx.signal.raise(to);
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// HTTP/1.1 and h2c.
    Plain,
    /// TLS with the proxy's current certificates; HTTP/1.1 or h2 by ALPN.
    Tls,
}

/// [`crate::Proxy::serve`] and [`crate::Proxy::serve_tls`]: an accept
/// loop on each worker thread (see `workers.rs`), all on the one listening
/// socket; returns when all of them have drained.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    shutdown: CancellationToken,
    mode: Mode,
) -> io::Result<()> {
    let (workers, loads) = inner.worker_handles()?;
    let listener = listener.into_std()?;
    if let Ok(addr) = listener.local_addr() {
        let max_connections = inner.max_connections.load(Ordering::Relaxed);
        let max_connections_per_client = inner.config.load().max_connections_per_client;
        let workers = workers.len();
        match mode {
            Mode::Plain => {
                tracing::info!(%addr, workers, max_connections, max_connections_per_client, "proxy listening")
            }
            Mode::Tls => {
                tracing::info!(%addr, workers, max_connections, max_connections_per_client, "proxy listening (TLS)")
            }
        }
    }
    if !inner.reporting.swap(true, Ordering::Relaxed) {
        inner.tasks.spawn(crate::limits::report_loop(Arc::downgrade(&inner), inner.root.clone()));
    }
    // If this future is dropped (its caller gave up on it), the loops
    // drain and stop as at shutdown.
    let stop = shutdown.child_token();
    let _stop_when_dropped = stop.clone().drop_guard();
    let mut loops = Vec::with_capacity(workers.len());
    let kicks = Kicks::new(workers.len());
    for (index, worker) in workers.iter().enumerate() {
        let listener = listener.try_clone()?;
        let (inner, stop) = (Arc::clone(&inner), stop.clone());
        let (loads, kicks) = (Arc::clone(&loads), Arc::clone(&kicks));
        loops.push(worker.spawn(async move {
            let acceptor = Acceptor::new(listener, loads, kicks, index)?;
            accept_loop(inner, acceptor, stop, mode, index == 0).await
        }));
    }
    drop(listener);
    let mut result = Ok(());
    for one in loops {
        match one.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => result = Err(err),
            Err(err) => result = Err(io::Error::other(err)),
        }
    }
    tracing::info!("proxy stopped");
    result
}

/// One worker's accept loop: serves the connections it accepts until
/// `shutdown`, then lets them finish within `shutdown_grace`.
async fn accept_loop(
    inner: Arc<Inner>,
    mut acceptor: Acceptor,
    shutdown: CancellationToken,
    mode: Mode,
    first: bool,
) -> io::Result<()> {
    let mut conns = Starter {
        inner: &inner,
        tasks: TaskTracker::new(),
        live: Arc::new(Mutex::new(Live::default())),
        mode,
        // One warning per burst of refused TLS connections, from one worker.
        no_tls_logged: !first,
    };
    let mut waiting = WaitingRoom::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            () = tokio::time::sleep_until(waiting.next_try), if !waiting.is_empty() => {
                waiting.try_again(&acceptor, &mut conns);
                continue;
            }
            accepted = acceptor.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(Accepted::Conn(stream, peer)) => (stream, peer),
            Ok(Accepted::Shed(peer)) => {
                inner.refusals.count(Event::Refused(Refusal::NoFd), peer, inner.limits(), None);
                continue;
            }
            Err(err) => {
                accept_error(&inner, err).await;
                continue;
            }
        };
        let config = inner.config.load_full();
        let trusted = config.trusts(peer.ip());
        let admission = inner.admission(&config);
        match acceptor.admit(peer.ip(), admission, trusted) {
            Ok(counted) => conns.start(stream, peer, config, trusted, counted, acceptor.inherits_nodelay),
            Err(Refusal::PerClient) if waiting.has_room() => waiting.add(stream, peer, trusted),
            Err(why) => {
                // Closed at once (see `limits.rs`).
                drop(stream);
                inner.refusals.count(Event::Refused(why), Some(peer), admission.limits(), None);
            }
        }
    }
    // Stop accepting: new connections are refused from here on.
    drop(acceptor);
    drop(waiting);
    let Starter { tasks, live, .. } = conns;
    signal_all(&live, GRACEFUL);
    tasks.close();
    let grace = inner.config.load().shutdown_grace;
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace period over; closing remaining connections"
        );
        signal_all(&live, FORCE);
        tasks.wait().await;
    }
    Ok(())
}

/// Starts serving the connections one worker admitted.
struct Starter<'a> {
    inner: &'a Arc<Inner>,
    tasks: TaskTracker,
    live: Arc<Mutex<Live>>,
    mode: Mode,
    no_tls_logged: bool,
}

impl Starter<'_> {
    fn start(
        &mut self,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        config: Arc<ProxyConfig>,
        trusted: bool,
        counted: Counted,
        has_nodelay: bool,
    ) {
        if !has_nodelay {
            let _ = stream.set_nodelay(true);
        }
        match self.mode {
            Mode::Plain => {
                let ctx = ConnCtx::new(peer, config, trusted, false, self.tasks.clone(), &self.live, counted);
                // Joins this worker's epoll set only if it has to wait.
                let stream = LazyStream::new(stream, Arc::clone(&ctx));
                // Boxed: the task then holds a pointer, where it held the
                // whole connection future (hyper's connection state, the
                // client stream), which tokio moved about four times when
                // spawning and again when the task ended: 3,000
                // instructions of memcpy per connection in callgrind.
                self.tasks.spawn(Box::pin(serve_conn(Arc::clone(self.inner), stream, ctx, None)));
            }
            Mode::Tls => {
                let Some(tls) = self.inner.tls.load_full() else {
                    if !self.no_tls_logged {
                        tracing::warn!(client = %peer, "TLS connection refused: no certificate is configured");
                        self.no_tls_logged = true;
                    }
                    return;
                };
                self.no_tls_logged = false;
                let ctx = ConnCtx::new(peer, config, trusted, true, self.tasks.clone(), &self.live, counted);
                let stream = LazyStream::new(stream, Arc::clone(&ctx));
                self.tasks.spawn(Box::pin(serve_tls_conn(Arc::clone(self.inner), stream, ctx, tls.acceptor.clone())));
            }
        }
    }
}

/// Connections over `max_connections_per_client` that one worker holds
/// for up to [`PER_CLIENT_GRACE`] before it refuses them: a client that
/// closes a connection and opens the next at once (`Connection: close`, a
/// pool replacing a connection) can be one ahead of the proxy, whose other
/// worker has not yet dropped the closed connection's count. Without the
/// wait, such a client, never over the limit by its own count, saw a
/// connection closed without an answer now and then (`bench/proxy`, 256
/// connections from one address: a few in 100,000). At most
/// [`PER_CLIENT_WAITING_MAX`] wait per worker; beyond that, and after the
/// grace, they are closed at once as before.
struct WaitingRoom {
    conns: Vec<(std::net::TcpStream, SocketAddr, bool, Instant)>,
    next_try: Instant,
}

impl Default for WaitingRoom {
    fn default() -> Self {
        WaitingRoom { conns: Vec::new(), next_try: Instant::now() }
    }
}

/// How long a connection over `max_connections_per_client` may wait for
/// one of its address's connections to close.
const PER_CLIENT_GRACE: Duration = Duration::from_millis(50);
/// How often a waiting connection's admission is tried again.
const PER_CLIENT_RETRY: Duration = Duration::from_millis(2);
/// Connections that may wait per worker.
const PER_CLIENT_WAITING_MAX: usize = 64;

impl WaitingRoom {
    fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    fn has_room(&self) -> bool {
        self.conns.len() < PER_CLIENT_WAITING_MAX
    }

    fn add(&mut self, stream: std::net::TcpStream, peer: SocketAddr, trusted: bool) {
        let now = Instant::now();
        if self.conns.is_empty() {
            self.next_try = now + PER_CLIENT_RETRY;
        }
        self.conns.push((stream, peer, trusted, now));
    }

    /// Admit the waiting connections there is room for now, refuse the
    /// ones whose grace is over.
    fn try_again(&mut self, acceptor: &Acceptor, conns: &mut Starter<'_>) {
        let inner = conns.inner;
        let config = inner.config.load_full();
        let admission = inner.admission(&config);
        let now = Instant::now();
        for (stream, peer, trusted, since) in std::mem::take(&mut self.conns) {
            match acceptor.admit(peer.ip(), admission, trusted) {
                Ok(counted) => {
                    conns.start(stream, peer, Arc::clone(&config), trusted, counted, acceptor.inherits_nodelay)
                }
                Err(why) if why != Refusal::PerClient || now.duration_since(since) >= PER_CLIENT_GRACE => {
                    drop(stream);
                    inner.refusals.count(Event::Refused(why), Some(peer), admission.limits(), None);
                }
                Err(_) => self.conns.push((stream, peer, trusted, since)),
            }
        }
        self.next_try = now + PER_CLIENT_RETRY;
    }
}

/// `accept` failed: nothing to do when the client gave up before it was
/// accepted; otherwise (out of descriptors with no spare left, or out of
/// memory) the worker stops accepting for a moment instead of spinning on
/// a socket that stays readable, and the failure goes to the rate-limited
/// refusal log.
async fn accept_error(inner: &Inner, err: io::Error) {
    match err.kind() {
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted => {}
        _ => {
            inner.refusals.count(Event::AcceptError, None, inner.limits(), Some(&err));
            tokio::time::sleep(crate::limits::NO_FD_BACKOFF).await;
        }
    }
}

/// The TLS handshake (within `header_read_timeout`), then HTTP.
async fn serve_tls_conn(inner: Arc<Inner>, stream: LazyStream, ctx: Arc<ConnCtx>, acceptor: tokio_rustls::TlsAcceptor) {
    let peer = ctx.peer;
    let handshake = tokio::time::timeout(ctx.config.header_read_timeout, acceptor.accept(stream));
    let outcome = tokio::select! {
        outcome = handshake => Some(outcome),
        _ = ctx.signal.forced() => None,
    };
    match outcome {
        Some(Ok(Ok(tls))) => {
            let protocol = match tls.get_ref().1.alpn_protocol() {
                Some(b"h2") => Protocol::Http2,
                _ => Protocol::Http1,
            };
            serve_conn(inner, tls, ctx, Some(protocol)).await
        }
        Some(Ok(Err(err))) => {
            tracing::info!(client = %peer, error = %err, "TLS handshake failed");
            ctx.unregister();
        }
        Some(Err(_)) => {
            // Counted, not logged one by one (see `limits::RefusalLog`).
            inner.refusals.count(Event::SlowHead, Some(peer), inner.limits(), None);
            ctx.unregister();
        }
        None => ctx.unregister(),
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes read at first from a plain connection: a whole ordinary request
/// head, mostly, so that hyper needs no read of its own for it.
const FIRST_READ: usize = 1024;

/// What a client connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// Tell HTTP/1 from h2c (prior knowledge) by the first bytes, keeping them
/// for hyper. One read, as large as what has arrived (up to
/// [`FIRST_READ`]): hyper-util's auto builder reads exactly 24 bytes first,
/// which costs every connection one more system call. `None`: the client
/// closed (or failed, or timed out) before sending anything decisive.
async fn sniff<IO: AsyncRead + Unpin>(stream: &mut TimedStream<IO>, ctx: &ConnCtx, inner: &Inner) -> Option<Protocol> {
    // Read into uninitialised memory (`poll_read_buf`): a zeroed buffer
    // (`vec![0; FIRST_READ]`, a `calloc`) was 700 instructions per
    // connection.
    let mut first = BytesMut::with_capacity(FIRST_READ);
    let mut head_grace: Option<Pin<Box<Sleep>>> = None;
    let protocol = std::future::poll_fn(|cx| loop {
        match ctx.signal.poll_state(cx) {
            FORCE => return Poll::Ready(None),
            GRACEFUL => {
                // As for a connection still waiting for its head (see
                // `serve_conn`): a moment to send it, then closed.
                let grace = head_grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(SHUTDOWN_HEAD_GRACE)));
                if grace.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
            }
            _ => {}
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut first) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(err)) => {
                if err.kind() == io::ErrorKind::TimedOut {
                    // Counted, not logged one by one (see `limits::RefusalLog`).
                    inner.refusals.count(Event::SlowHead, Some(ctx.peer), inner.limits(), None);
                }
                return Poll::Ready(None);
            }
            // (The buffer never fills: the preface is decided within
            // its first 24 bytes.)
            Poll::Ready(Ok(0)) => return Poll::Ready(None),
            Poll::Ready(Ok(_)) => {
                let seen = &first[..];
                let shared = seen.len().min(H2_PREFACE.len());
                if seen[..shared] != H2_PREFACE[..shared] {
                    return Poll::Ready(Some(Protocol::Http1));
                }
                if shared == H2_PREFACE.len() {
                    return Poll::Ready(Some(Protocol::Http2));
                }
                // A prefix of the preface so far: read on.
            }
        }
    })
    .await?;
    stream.first = first;
    stream.http2 = protocol == Protocol::Http2;
    if stream.http2 {
        // The preface looked like a head without a body to the scan.
        ctx.request_read.store(false, Ordering::Relaxed);
    }
    Some(protocol)
}

/// Serve one client connection: HTTP/1.1 (with upgrades) or HTTP/2, as
/// `protocol` says (ALPN for TLS), or as the first bytes say (plain).
async fn serve_conn<IO>(inner: Arc<Inner>, stream: IO, ctx: Arc<ConnCtx>, protocol: Option<Protocol>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = Arc::clone(&ctx.config);
    let mut stream = TimedStream::new(stream, Arc::clone(&ctx));
    stream.http2 = protocol == Some(Protocol::Http2);
    let protocol = match protocol {
        Some(known) => Some(known),
        None => sniff(&mut stream, &ctx, &inner).await,
    };
    let Some(protocol) = protocol else {
        ctx.unregister();
        return;
    };
    let io = TokioIo::new(stream);
    let service = service_fn({
        let ctx = Arc::clone(&ctx);
        // (Kept here as well: a head that timed out is counted after.)
        let inner = Arc::clone(&inner);
        move |req| {
            let inner = Arc::clone(&inner);
            let ctx = Arc::clone(&ctx);
            async move {
                let response = crate::forward::handle(inner, &ctx, req).await;
                ctx.responding();
                Ok::<_, Infallible>(response)
            }
        }
    });
    let result = match protocol {
        Protocol::Http1 => {
            let mut h1 = hyper::server::conn::http1::Builder::new();
            // Client timeouts are TimedStream's (see the module docs).
            h1.header_read_timeout(None).keep_alive(true).max_buf_size(config.h1_buffer());
            if config.max_headers != crate::config::DEFAULT_MAX_HEADERS {
                // hyper's default is ours; another value costs it an
                // allocation per request, so it is set only when asked for.
                h1.max_headers(config.max_headers);
            }
            let conn = h1.serve_connection(io, service).with_upgrades();
            drive(conn, &ctx, true, |conn| conn.graceful_shutdown()).await
        }
        Protocol::Http2 => {
            let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            h2.max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
            let conn = h2.serve_connection(io, service);
            drive(conn, &ctx, false, |conn| conn.graceful_shutdown()).await
        }
    };
    if let Some(Err(err)) = result {
        log_connection_error(&inner, ctx.peer, &err);
    }
    if !ctx.is_upgraded() {
        ctx.unregister();
    }
}

/// Poll a hyper connection to its end, minding the shutdown signal: on a
/// graceful shutdown finish the request in progress (if any) and close; on
/// a forced one return at once (`None`).
///
/// HTTP/1 (`http1`) has no way to say "closing" but `Connection: close` on
/// a response, so the connection is only closed once a response said it,
/// or after a moment without a request:
/// - between requests (keep-alive, or accepted just before the listener
///   was handed to another daemon), the client gets [`SHUTDOWN_HEAD_GRACE`]
///   to send its next request, answered with `Connection: close`: closing
///   at once could drop a request already on its way;
/// - during a request whose response has not started, hyper is told now,
///   and the response says `Connection: close`;
/// - during a response already started (its head went out without it),
///   nothing is done until it ends: then as between requests. Closing right
///   after it would race with the client's next request, which it had no
///   reason to hold back.
async fn drive<C, E>(conn: C, ctx: &ConnCtx, http1: bool, graceful: impl Fn(Pin<&mut C>)) -> Option<Result<(), E>>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let mut graceful_sent = false;
    let mut head_grace: Option<Pin<Box<Sleep>>> = None;
    std::future::poll_fn(|cx| loop {
        let state = ctx.signal.poll_state(cx);
        match state {
            FORCE => return Poll::Ready(None),
            GRACEFUL if !graceful_sent => {
                let between_requests = matches!(ctx.phase().0, HEAD | IDLE);
                if between_requests {
                    let grace = head_grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(SHUTDOWN_HEAD_GRACE)));
                    if grace.as_mut().poll(cx).is_ready() {
                        graceful_sent = true;
                        graceful(conn.as_mut());
                    }
                } else if !(http1 && ctx.responding.load(Ordering::Relaxed)) {
                    graceful_sent = true;
                    graceful(conn.as_mut());
                }
            }
            _ => {}
        }
        let waiting_for_a_response_to_end = state == GRACEFUL && !graceful_sent && head_grace.is_none();
        match conn.as_mut().poll(cx) {
            Poll::Ready(done) => return Poll::Ready(Some(done)),
            // The started response ended in that poll: go round once more
            // to start the grace (its timer then wakes the task).
            Poll::Pending if waiting_for_a_response_to_end && matches!(ctx.phase().0, HEAD | IDLE) => {}
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// One line for a connection hyper or a client timeout ended: at info for
/// requests the parser rejected (hyper answered 400, 414 or 431 before
/// closing) and heads that came too slowly, at debug for the rest (resets,
/// clients leaving).
fn log_connection_error(inner: &Inner, peer: SocketAddr, err: &(dyn std::error::Error + 'static)) {
    if let Some(h) = err.downcast_ref::<hyper::Error>() {
        if h.is_parse_too_large() {
            let status = if h.to_string().contains("URI") { 414 } else { 431 };
            tracing::info!(client = %peer, status, reason = %h, "request rejected");
            return;
        }
        if h.is_parse() || h.is_parse_status() {
            tracing::info!(client = %peer, status = 400, reason = %h, "request rejected");
            return;
        }
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::TimedOut {
                // Counted, not logged one by one (see `limits::RefusalLog`).
                inner.refusals.count(Event::SlowHead, Some(peer), inner.limits(), None);
                return;
            }
        }
        source = e.source();
    }
    tracing::debug!(client = %peer, error = %err, "client connection ended with an error");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Option<u8> {
        let mut s = HeadScan::new();
        for c in chunks {
            if let Some(flags) = s.feed(c) {
                return Some(flags);
            }
        }
        None
    }

    #[test]
    fn head_scan_finds_what_hyper_merges() {
        let plain = b"GET / HTTP/1.1\r\nHost: a\r\nX-Content-Length: 1\r\n\r\n";
        assert_eq!(scan(&[plain]), Some(0));
        let both = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n";
        assert_eq!(scan(&[both]), Some(SAW_CONTENT_LENGTH | SAW_TRANSFER_ENCODING));
        let dup = b"POST / HTTP/1.1\r\ncontent-LENGTH: 5\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(scan(&[dup]), Some(SAW_CONTENT_LENGTH | DUPLICATE_CONTENT_LENGTH));
        // Split anywhere, bare LF line ends.
        let split: Vec<&[u8]> = both.chunks(3).collect();
        assert_eq!(scan(&split), Some(SAW_CONTENT_LENGTH | SAW_TRANSFER_ENCODING));
        assert_eq!(scan(&[b"GET / HTTP/1.1\nTransfer-Encoding: chunked\n\n"]), Some(SAW_TRANSFER_ENCODING));
        // A name that only starts like one, and values that contain one.
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nContent-Lengthy: 1\r\nX: content-length: 2\r\n\r\n"]), Some(0));
        // Incomplete heads report nothing yet.
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nContent-Length: 1\r\n"]), None);
    }

    fn chunks(limit: u64, parts: &[&[u8]]) -> ChunkFeed {
        let mut scan = ChunkScan::new(limit);
        for part in parts {
            let fed = scan.feed(part);
            if fed != ChunkFeed::More {
                return fed;
            }
        }
        ChunkFeed::More
    }

    #[test]
    fn chunk_scan_adds_up_declared_sizes() {
        // Within the limit, split anywhere, with extensions; ends at the
        // last chunk.
        let body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(chunks(15, &[body]), ChunkFeed::Done);
        let split: Vec<&[u8]> = body.chunks(2).collect();
        assert_eq!(chunks(15, &split), ChunkFeed::Done);
        // One byte too many, known from the size line alone.
        assert_eq!(chunks(14, &[b"5\r\nhello\r\n", b"a"]), ChunkFeed::More, "the size line is not over yet");
        assert_eq!(chunks(14, &[b"5\r\nhello\r\n", b"a\r"]), ChunkFeed::TooLarge);
        assert_eq!(chunks(100, &[b"ffffffff\r\n"]), ChunkFeed::TooLarge);
        // Data that looks like a size line is data.
        assert_eq!(chunks(10, &[b"3\r\nfff\r\n", b"2\r\nff\r\n"]), ChunkFeed::More);
        // Malformed: left to hyper.
        assert_eq!(chunks(10, &[b"zz\r\n"]), ChunkFeed::Done);
        assert_eq!(chunks(10, &[b"11111111111111111\r\n"]), ChunkFeed::Done);
    }

    #[test]
    fn head_scan_knows_a_complete_head_from_a_malformed_one() {
        let mut s = HeadScan::new();
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert!(s.active && !s.complete, "still reading the head");
        assert_eq!(s.feed(b"\r\n"), Some(0));
        assert!(!s.active && s.complete);
        let mut s = HeadScan::new();
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\rX"), Some(0));
        assert!(!s.active && !s.complete, "a bare CR is not the end of a head: the header timer keeps running");
    }
}
