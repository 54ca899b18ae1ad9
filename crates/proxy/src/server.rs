//! The client side: accept loop, one hyper HTTP/1.1 connection task per
//! client, client timeouts, graceful shutdown.
//!
//! Client timeouts live in [`TimedStream`], a thin wrapper of the socket:
//! hyper's own `header_read_timeout` also starts when a keep-alive
//! connection goes idle, which would make the idle timeout and the slowloris
//! timeout one and the same. The wrapper tells them apart with a phase the
//! request path sets (one relaxed atomic per read, one timer per connection).

use crate::config::ProxyConfig;
use crate::Inner;
use atomic_waker::AtomicWaker;
use http::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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

/// At shutdown, how long a connection still waiting for a request head may
/// take to send it before it is closed.
const SHUTDOWN_HEAD_GRACE: Duration = Duration::from_secs(2);

/// No shutdown asked.
const RUN: u8 = 0;
/// Finish the request in progress, then close.
const GRACEFUL: u8 = 1;
/// Close now.
const FORCE: u8 = 2;

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
        Self {
            state: AtomicU8::new(RUN),
            waker: AtomicWaker::new(),
            tunnel_waker: AtomicWaker::new(),
        }
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

    /// For the tunnel task: resolves when the connection must close now.
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
    pub peer_ip: HeaderValue,
    phase: AtomicU8,
    /// Where upgraded connections are spawned (the serve loop's tracker).
    pub tasks: TaskTracker,
    pub signal: ConnSignal,
    /// Its entry in the serve loop's live set (weak: the set holds us).
    live: Weak<Mutex<Live>>,
    id: u64,
}

impl ConnCtx {
    fn new(peer: SocketAddr, tasks: TaskTracker, live: &Arc<Mutex<Live>>) -> Arc<Self> {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let mut reg = lock_live(live);
        let id = reg.next;
        reg.next += 1;
        let ctx = Arc::new(Self {
            peer_ip,
            phase: AtomicU8::new(HEAD),
            tasks,
            signal: ConnSignal::new(),
            live: Arc::downgrade(live),
            id,
        });
        reg.conns.insert(id, Arc::clone(&ctx));
        ctx
    }

    /// Leave the live set: called by the connection task when it ends, or
    /// by the upgraded tunnel when it ends (the tunnel outlives its
    /// connection task and must still get the shutdown signal).
    pub fn unregister(&self) {
        if let Some(live) = self.live.upgrade() {
            lock_live(&live).conns.remove(&self.id);
        }
    }

    fn is_upgraded(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == TUNNEL
    }

    /// A request head was read: no client timeout until its response body
    /// is done (the guard goes with the response body).
    pub fn begin_request(self: &Arc<Self>) -> PhaseGuard {
        self.phase.store(BUSY, Ordering::Relaxed);
        PhaseGuard(Arc::clone(self))
    }

    /// The connection was handed to an upgrade.
    pub fn upgraded(&self) {
        self.phase.store(TUNNEL, Ordering::Relaxed);
    }
}

/// Marks the connection idle when the response (body) is done.
pub(crate) struct PhaseGuard(Arc<ConnCtx>);

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        let _ = self
            .0
            .phase
            .compare_exchange(BUSY, IDLE, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The client socket with the header-read and idle timeouts.
pub(crate) struct TimedStream {
    inner: TcpStream,
    ctx: Arc<ConnCtx>,
    seen: u8,
    /// Whether `deadline` applies (not while busy or tunnelling).
    armed: bool,
    deadline: Instant,
    /// Fires at or before `deadline`. Moved only when the deadline comes
    /// closer, or when it fires early: a keep-alive request costs no timer
    /// re-registration, about one per `header_read_timeout` at most.
    sleep: Pin<Box<Sleep>>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

impl TimedStream {
    fn new(inner: TcpStream, ctx: Arc<ConnCtx>, config: &ProxyConfig) -> Self {
        Self {
            inner,
            ctx,
            seen: UNSEEN,
            armed: false,
            deadline: Instant::now(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
        }
    }

    fn enter(&mut self, phase: u8) {
        self.seen = phase;
        let timeout = match phase {
            HEAD => self.header_read_timeout,
            IDLE => self.idle_timeout,
            _ => {
                self.armed = false;
                return;
            }
        };
        self.deadline = Instant::now() + timeout;
        self.armed = true;
        if self.deadline < self.sleep.deadline() {
            self.sleep.as_mut().reset(self.deadline);
        }
    }

    /// Whether the armed deadline has passed; otherwise the sleep is
    /// registered to wake the task by then.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.deadline {
                return true;
            }
            // Fired for an earlier deadline that has since moved on.
            self.sleep.as_mut().reset(self.deadline);
        }
        false
    }
}

impl AsyncRead for TimedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.ctx.phase.load(Ordering::Relaxed);
        if phase != this.seen {
            this.enter(phase);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.seen == IDLE && buf.filled().len() > before {
                    // First bytes of the next request: the head must now
                    // arrive within header_read_timeout.
                    let _ = this.ctx.phase.compare_exchange(
                        IDLE,
                        HEAD,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    this.enter(HEAD);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.armed && this.expired(cx) {
                    this.armed = false;
                    if this.seen == IDLE {
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

impl AsyncWrite for TimedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
/// Locked once when a connection opens and once when it closes.
#[derive(Default)]
pub(crate) struct Live {
    next: u64,
    conns: HashMap<u64, Arc<ConnCtx>>,
}

fn lock_live(live: &Mutex<Live>) -> MutexGuard<'_, Live> {
    live.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn signal_all(live: &Mutex<Live>, to: u8) {
    let conns: Vec<Arc<ConnCtx>> = lock_live(live).conns.values().cloned().collect();
    for ctx in conns {
        ctx.signal.raise(to);
    }
}

/// The accept loop behind [`crate::Proxy::serve`].
pub(crate) async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let tasks = TaskTracker::new();
    let live = Arc::new(Mutex::new(Live::default()));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "proxy listening");
    }
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_error(err).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ConnCtx::new(peer, tasks.clone(), &live);
        tasks.spawn(serve_conn(Arc::clone(&inner), stream, peer, ctx));
    }
    // Stop accepting: new connections are refused from here on.
    drop(listener);
    signal_all(&live, GRACEFUL);
    tasks.close();
    let grace = inner.config.shutdown_grace;
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace period over; closing remaining connections"
        );
        signal_all(&live, FORCE);
        tasks.wait().await;
    }
    tracing::info!("proxy stopped");
    Ok(())
}

async fn accept_error(err: io::Error) {
    match err.kind() {
        // The client gave up between SYN and accept: nothing to do.
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted => {}
        _ => {
            // EMFILE and friends: back off instead of spinning.
            tracing::warn!(error = %err, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve_conn(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr, ctx: Arc<ConnCtx>) {
    let io = TokioIo::new(TimedStream::new(stream, Arc::clone(&ctx), &inner.config));
    let service = service_fn({
        let ctx = Arc::clone(&ctx);
        move |req| {
            let inner = Arc::clone(&inner);
            let ctx = Arc::clone(&ctx);
            async move { Ok::<_, Infallible>(crate::forward::handle(inner, ctx, req).await) }
        }
    });
    let mut builder = http1::Builder::new();
    // Client timeouts are TimedStream's (see the module docs).
    builder.header_read_timeout(None).keep_alive(true);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let mut graceful_sent = false;
    // A connection whose request head has not been read yet (typically one
    // accepted just before the listener was handed to another daemon) gets
    // a moment to send it: closing it now would answer nothing at all.
    let mut head_grace: Option<Pin<Box<Sleep>>> = None;
    let result = std::future::poll_fn(|cx| {
        match ctx.signal.poll_state(cx) {
            FORCE => return Poll::Ready(None),
            GRACEFUL if !graceful_sent => {
                let waiting_for_head = ctx.phase.load(Ordering::Relaxed) == HEAD;
                let grace = head_grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(SHUTDOWN_HEAD_GRACE)));
                if !waiting_for_head || grace.as_mut().poll(cx).is_ready() {
                    // Finish the request in progress (if any), then close.
                    graceful_sent = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ => {}
        }
        conn.as_mut().poll(cx).map(Some)
    })
    .await;
    if let Some(Err(err)) = result {
        tracing::debug!(%peer, error = %err, "client connection ended with an error");
    }
    if !ctx.is_upgraded() {
        ctx.unregister();
    }
}
