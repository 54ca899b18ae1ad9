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
use http::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
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

/// Per client connection, shared by its requests.
pub(crate) struct ConnCtx {
    pub peer_ip: HeaderValue,
    phase: AtomicU8,
    /// Where upgraded connections are spawned (the serve loop's tracker).
    pub tasks: TaskTracker,
    /// Cancelled when the shutdown grace period is over.
    pub force: CancellationToken,
}

impl ConnCtx {
    fn new(peer: SocketAddr, tasks: TaskTracker, force: CancellationToken) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer_ip,
            phase: AtomicU8::new(HEAD),
            tasks,
            force,
        }
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
    armed: bool,
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
        self.sleep.as_mut().reset(Instant::now() + timeout);
        self.armed = true;
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
                if this.armed && this.sleep.as_mut().poll(cx).is_ready() {
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

/// The accept loop behind [`crate::Proxy::serve`].
pub(crate) async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let tasks = TaskTracker::new();
    let force = CancellationToken::new();
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
        tasks.spawn(serve_conn(
            Arc::clone(&inner),
            stream,
            peer,
            shutdown.clone(),
            force.clone(),
            tasks.clone(),
        ));
    }
    // Stop accepting: new connections are refused from here on.
    drop(listener);
    tasks.close();
    let grace = inner.config.shutdown_grace;
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace period over; closing remaining connections"
        );
        force.cancel();
        tasks.wait().await;
    }
    force.cancel();
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

async fn serve_conn(
    inner: Arc<Inner>,
    stream: TcpStream,
    peer: SocketAddr,
    graceful: CancellationToken,
    force: CancellationToken,
    tasks: TaskTracker,
) {
    let ctx = Arc::new(ConnCtx::new(peer, tasks, force.clone()));
    let io = TokioIo::new(TimedStream::new(stream, Arc::clone(&ctx), &inner.config));
    let service = service_fn(move |req| {
        let inner = Arc::clone(&inner);
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(crate::forward::handle(inner, ctx, req).await) }
    });
    let mut builder = http1::Builder::new();
    // Client timeouts are TimedStream's (see the module docs).
    builder.header_read_timeout(None).keep_alive(true);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = graceful.cancelled() => {
            // Finish the request in progress (if any), then close.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                _ = force.cancelled() => return,
            }
        }
        _ = force.cancelled() => return,
    };
    if let Err(err) = result {
        tracing::debug!(%peer, error = %err, "client connection ended with an error");
    }
}
