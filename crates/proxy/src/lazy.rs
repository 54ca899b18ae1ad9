//! A client socket that joins the worker's epoll set only when it has to
//! wait.
//!
//! Why: tokio registers every socket it wraps (`epoll_ctl(ADD)`) and
//! deregisters it when dropped (`epoll_ctl(DEL)`): two system calls per
//! connection, about 4 % of the CPU of a proxy serving a new connection
//! per request (`Connection: close`), where the request is usually in the
//! socket by the time it is accepted and the response fits in the socket
//! buffer, so nothing ever waits. HAProxy reads and writes speculatively
//! first and subscribes only on `EAGAIN` (0.2 `epoll_ctl` per connection
//! against nonstop's 2.0 before this).
//!
//! A [`LazyStream`] starts as the accepted non-blocking std socket and
//! tries each read and write directly; the first that would block turns
//! it into a tokio `TcpStream` (registering it), for good. Registering
//! after `EAGAIN` loses no wake-up: `epoll_ctl(ADD)` reports readiness
//! that arrived in between.
//!
//! One read is special: while an HTTP/1 request that was read whole waits
//! for its response, hyper keeps reading the client only to notice it
//! leaving (and then cancel the request upstream). That read would block
//! every time and register every connection, so it is put off for
//! [`LEAVE_CHECK_DELAY`] (a timer later than the worker's heartbeat costs
//! no system call): a response that comes sooner never needed it, and a
//! client that leaves during a longer request is still noticed, within
//! that delay.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpStream as StdStream};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::server::ConnCtx;
use crate::sockio;

/// How long the read that only watches for a client leaving is put off
/// (see the module docs). Above the worker heartbeat, so that arming it
/// never wakes the runtime's driver.
pub(crate) const LEAVE_CHECK_DELAY: Duration = Duration::from_secs(1);

pub(crate) struct LazyStream {
    socket: Socket,
    ctx: Option<Arc<ConnCtx>>,
    /// The put-off leave check of the current request, once armed.
    leave_check: Option<Pin<Box<Sleep>>>,
}

enum Socket {
    /// Not registered yet: every operation is tried directly.
    Unregistered(StdStream),
    Registered(TcpStream),
    /// Only while registering; never seen by a caller.
    Moving,
}

impl LazyStream {
    /// `stream` must be non-blocking.
    pub fn new(stream: StdStream, ctx: Arc<ConnCtx>) -> LazyStream {
        LazyStream { socket: Socket::Unregistered(stream), ctx: Some(ctx), leave_check: None }
    }

    /// Whether the socket joined the runtime's epoll set.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn is_registered(&self) -> bool {
        matches!(self.socket, Socket::Registered(_))
    }

    /// Register with the current runtime: from now on tokio waits for it.
    fn register(&mut self) -> io::Result<&mut TcpStream> {
        self.leave_check = None;
        if let Socket::Unregistered(_) = self.socket {
            let Socket::Unregistered(std) = std::mem::replace(&mut self.socket, Socket::Moving) else {
                unreachable!("checked above")
            };
            self.socket = Socket::Registered(TcpStream::from_std(std)?);
        }
        match &mut self.socket {
            Socket::Registered(tokio) => Ok(tokio),
            _ => Err(io::Error::other("client socket lost while registering it")),
        }
    }

    /// Whether this read only watches for the client leaving and is still
    /// to be put off (arming the delay the first time).
    fn put_off(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(ctx) = self.ctx.as_ref().filter(|ctx| ctx.only_awaits_the_response()) else {
            self.leave_check = None;
            return false;
        };
        let check = self.leave_check.get_or_insert_with(|| Box::pin(tokio::time::sleep(LEAVE_CHECK_DELAY)));
        if check.as_mut().poll(cx).is_ready() {
            return false;
        }
        // Woken when the request ends (`PhaseGuard`), or by the delay.
        ctx.leave_check.register(cx.waker());
        true
    }
}

/// What an operation tried directly on the unregistered socket comes to:
/// `None` when it would block (then the socket is registered and tokio
/// waits); an interrupted call is tried again at the next poll.
fn direct<T>(result: io::Result<T>, cx: &mut Context<'_>) -> Option<Poll<io::Result<T>>> {
    match result {
        Ok(done) => Some(Poll::Ready(Ok(done))),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => None,
        Err(err) if err.kind() == io::ErrorKind::Interrupted => {
            cx.waker().wake_by_ref();
            Some(Poll::Pending)
        }
        Err(err) => Some(Poll::Ready(Err(err))),
    }
}

impl AsyncRead for LazyStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if matches!(this.socket, Socket::Unregistered(_)) && this.put_off(cx) {
            return Poll::Pending;
        }
        if let Socket::Unregistered(std) = &this.socket {
            let read = sockio::recv_uninit(std, buf);
            if let Some(done) = direct(read, cx) {
                return done;
            }
        }
        match this.register() {
            Ok(tokio) => Pin::new(tokio).poll_read(cx, buf),
            Err(err) => Poll::Ready(Err(err)),
        }
    }
}

impl AsyncWrite for LazyStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Socket::Unregistered(std) = &this.socket {
            if let Some(done) = direct(sockio::send_vectored(std, bufs), cx) {
                return done;
            }
        }
        match this.register() {
            Ok(tokio) => sockio::poll_send_vectored(tokio, cx, bufs),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.socket {
            Socket::Unregistered(std) => Poll::Ready(std.shutdown(Shutdown::Write)),
            Socket::Registered(tokio) => Pin::new(tokio).poll_shutdown(cx),
            Socket::Moving => Poll::Ready(Err(io::Error::other("client socket lost while registering it"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (LazyStream, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (LazyStream { socket: Socket::Unregistered(ours), ctx: None, leave_check: None }, peer)
    }

    #[tokio::test]
    async fn data_already_there_is_read_and_answered_without_registering() {
        let (mut ours, mut peer) = pair().await;
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        // Let it arrive.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut buf = [0u8; 64];
        let n = ours.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        ours.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        ours.shutdown().await.unwrap();
        assert!(!ours.is_registered(), "nothing had to wait");
        let mut answer = Vec::new();
        peer.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
    }

    #[tokio::test]
    async fn a_read_that_would_block_registers_and_then_waits() {
        let (mut ours, mut peer) = pair().await;
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let n = ours.read(&mut buf).await.unwrap();
            (ours, buf[..n].to_vec())
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        peer.write_all(b"late").await.unwrap();
        let (ours, got) = tokio::time::timeout(std::time::Duration::from_secs(5), reader).await.unwrap().unwrap();
        assert_eq!(got, b"late");
        assert!(ours.is_registered());
    }

    #[tokio::test]
    async fn a_write_that_would_block_registers_and_completes_when_the_peer_reads() {
        let (mut ours, mut peer) = pair().await;
        let big = vec![7u8; 8 * 1024 * 1024];
        let writer = tokio::spawn(async move {
            ours.write_all(&big).await.unwrap();
            ours.shutdown().await.unwrap();
            ours
        });
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 8 * 1024 * 1024);
        let ours = writer.await.unwrap();
        assert!(ours.is_registered(), "8 MiB do not fit in a socket buffer");
    }

    /// Direct reads go into uninitialised memory: what a caller gets is
    /// exactly what was sent, however large its buffer.
    #[tokio::test]
    async fn a_direct_read_into_a_large_uninitialised_buffer_fills_exactly_what_came() {
        let (mut ours, mut peer) = pair().await;
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.unwrap();
        drop(peer);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut got = Vec::with_capacity(1 << 20);
        while ours.read_buf(&mut got).await.unwrap() > 0 {}
        assert_eq!(got, sent);
        assert!(!ours.is_registered(), "all of it was there: nothing had to wait");
    }

    #[tokio::test]
    async fn end_of_stream_reads_as_zero_bytes() {
        let (mut ours, peer) = pair().await;
        drop(peer);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut buf = [0u8; 8];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
    }
}
