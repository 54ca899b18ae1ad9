//! One HTTP/1.1 connection to an instance, driven by whoever uses it.
//!
//! hyper splits a client connection in two: a `SendRequest` handle and the
//! connection future that does the I/O. The usual way is to spawn that
//! future as a task of its own; then every request crosses tasks twice
//! (the request through hyper's channel to the driver task, the response
//! head back through a oneshot) and the two tasks may run on different
//! worker threads. Here the connection future lives next to its handle in
//! [`Upstream`], and the task that uses the connection polls it: the client
//! connection's task while it waits for the response head
//! ([`Upstream::send`]) and while it streams the response body
//! (`ProxyBody::poll_frame`). A request costs no task switch; an idle
//! pooled connection costs no task at all.
//!
//! # Rules
//! - Whoever holds an `Upstream` and waits on it polls [`Upstream::drive`]
//!   with its own context before it polls anything hyper completes from
//!   that connection (the response future, the response body). Nothing
//!   else moves the connection.
//! - Before a request is handed to hyper, [`Upstream::ready`] drives the
//!   connection with the new user's context, so that hyper's wakers point
//!   at the task that now owns it and not at the previous one.
//! - A pooled connection is not polled: a close by the instance is seen at
//!   the next [`Upstream::ready`] (hyper reads the EOF) or by the pool's age
//!   limit.
//! - A protocol switch (101) hands the connection future to a task of its
//!   own ([`Upstream::detach`]), which completes the upgrade.
//! - Dropping an `Upstream` closes the connection.

use crate::body::UpBody;
use crate::error::{ErrorKind, ProxyError, Retry, Side};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;

/// hyper's connection future (with upgrades). Its type cannot be named
/// outside hyper, hence the box: one allocation per connection.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// Why a send failed, and the request if it never reached the instance.
pub(crate) type Failed = (ProxyError, Option<Request<UpBody>>);

pub(crate) struct Upstream {
    tx: SendRequest<UpBody>,
    /// `None` once the connection has ended.
    driver: Option<Driver>,
    /// The response-head timer, kept across requests: a request moves it
    /// only when its deadline is earlier than the armed one, or when it
    /// fires early (about once per `upstream_timeout` on a busy
    /// connection), instead of registering and removing a timer each time.
    timer: Option<Pin<Box<Sleep>>>,
    addr: SocketAddr,
}

impl Upstream {
    /// Open a connection to `addr` within `timeout`. Nothing is spawned.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Upstream, ProxyError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ProxyError::connect(std::io::Error::from(std::io::ErrorKind::TimedOut))),
            Ok(Err(err)) => return Err(ProxyError::connect(err)),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        let (tx, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, UpBody>(TokioIo::new(stream))
            .await
            .map_err(|err| ProxyError::new(ErrorKind::Internal, Side::Internal, Retry::Unsent).with_source(err))?;
        Ok(Upstream { tx, driver: Some(Box::pin(conn.with_upgrades())), timer: None, addr })
    }

    /// Move the connection's I/O along with `cx`'s waker. False once the
    /// connection has ended (closed by either side, or failed).
    pub fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        drive(&mut self.driver, self.addr, cx)
    }

    /// Whether the connection has not ended, as of its last poll.
    pub fn is_open(&self) -> bool {
        self.driver.is_some() && !self.tx.is_closed()
    }

    /// Drive the connection until hyper takes a request on it. False when
    /// the connection ended, or did not become ready within `timeout` (a
    /// pooled connection is normally ready at the first poll).
    pub async fn ready(&mut self, timeout: Duration) -> bool {
        let mut deadline: Option<Pin<Box<Sleep>>> = None;
        poll_fn(|cx| {
            let open = self.drive(cx);
            match self.tx.poll_ready(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(true),
                Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Pending if !open => return Poll::Ready(false),
                Poll::Pending => {}
            }
            let sleep = deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            Poll::Pending
        })
        .await
    }

    /// Send `req` (after [`ready`](Self::ready)) and drive the connection
    /// until the response head arrives, or `timeout` passes (504; the
    /// connection must then be dropped, which closes it). On failure the
    /// request comes back if it never reached the instance.
    pub async fn send(&mut self, req: Request<UpBody>, timeout: Duration) -> Result<Response<Incoming>, Failed> {
        let deadline = Instant::now() + timeout;
        let Upstream { tx, driver, timer, addr } = self;
        let exchange = tx.try_send_request(req);
        let mut exchange = std::pin::pin!(exchange);
        let result = poll_fn(|cx| {
            drive(driver, *addr, cx);
            // hyper answers the exchange (response or error) from the
            // driver, polled just above, or when the driver is dropped.
            if let Poll::Ready(result) = exchange.as_mut().poll(cx) {
                return Poll::Ready(Some(result));
            }
            if crate::deadline::passed(timer, deadline, cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match result {
            Some(Ok(resp)) => Ok(resp),
            Some(Err(mut failed)) => {
                let returned = failed.take_message();
                let err = ProxyError::exchange(failed.into_error(), returned.is_some());
                Err((err, returned))
            }
            None => Err((ProxyError::upstream_timeout(), None)),
        }
    }

    /// Let the connection run on a task of its own (for a protocol switch,
    /// whose upgrade hyper completes from the connection future). The
    /// request handle is dropped: the task ends when the connection does.
    pub fn detach(self, tasks: &TaskTracker) {
        let Upstream { driver, addr, .. } = self;
        if let Some(driver) = driver {
            tasks.spawn(async move {
                if let Err(err) = driver.await {
                    tracing::debug!(%addr, error = %err, "upstream connection ended with an error");
                }
            });
        }
    }
}

/// [`Upstream::drive`], on the driver alone (so that `send` can drive it
/// while its request handle is borrowed).
fn drive(driver: &mut Option<Driver>, addr: SocketAddr, cx: &mut Context<'_>) -> bool {
    let Some(running) = driver.as_mut() else {
        return false;
    };
    match running.as_mut().poll(cx) {
        Poll::Pending => true,
        Poll::Ready(result) => {
            if let Err(err) = result {
                tracing::debug!(%addr, error = %err, "upstream connection ended with an error");
            }
            *driver = None;
            false
        }
    }
}
