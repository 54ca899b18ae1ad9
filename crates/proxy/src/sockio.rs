//! Reads and writes on TCP sockets through the socket calls (`recv`,
//! `sendmsg`) instead of the file ones (`read`, `writev`).
//!
//! Why: `read` and `writev` on a socket go through the VFS layer first
//! (`vfs_read`/`vfs_writev`: `rw_verify_area`, the security hook,
//! fsnotify) before they reach the same `sock_recvmsg`/`sock_sendmsg`; on a
//! new connection per request that layer was about 2 % of the proxy's CPU
//! (`bench/proxy --profile-seconds`, close/c256/small). std and tokio
//! write vectored data with `writev`, and the direct read of an
//! unregistered client socket was a `read(2)`; these take the socket
//! calls, through rustix.

use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::task::{Context, Poll};

use rustix::net::{RecvFlags, SendAncillaryBuffer, SendFlags};
use tokio::io::{Interest, ReadBuf};
use tokio::net::TcpStream;

/// One `recv(2)` straight into the unfilled part of `buf`, which hyper
/// hands over uninitialised (a fresh `ReadBuf` over its read buffer's
/// spare capacity on every call). Through `std::io::Read` the memory would
/// have to be zeroed first: 16 KiB per read, a tenth of the proxy's
/// instructions per request (callgrind, keep-alive, small responses).
#[allow(unsafe_code)]
pub(crate) fn recv_uninit(socket: impl AsFd, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    // SAFETY: `unfilled_mut` only asks that no initialised byte be
    // de-initialised, and `recv(2)` only writes bytes. The kernel filled
    // the first `n` bytes of that region (rustix returns them as an
    // initialised slice), which is what `assume_init(n)` claims.
    let n = unsafe {
        let ((filled, _), _) =
            rustix::net::recv(socket, buf.unfilled_mut(), RecvFlags::empty()).map_err(io::Error::from)?;
        let n = filled.len();
        buf.assume_init(n);
        n
    };
    buf.advance(n);
    Ok(())
}

/// One `sendmsg(2)` of `bufs` (`WouldBlock` when the socket buffer is
/// full). `MSG_NOSIGNAL`: a peer gone is an `EPIPE` error, never a
/// `SIGPIPE`, whatever the process's signal disposition.
pub(crate) fn send_vectored(socket: impl AsFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    Ok(rustix::net::sendmsg(socket, bufs, &mut SendAncillaryBuffer::default(), SendFlags::NOSIGNAL)?)
}

/// [`send_vectored`] on a registered tokio socket: waits for it to be
/// writable as `poll_write_vectored` would.
pub(crate) fn poll_send_vectored(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(stream.poll_write_ready(cx))?;
        // `try_io` clears the readiness when the call would block.
        match stream.try_io(Interest::WRITABLE, || send_vectored(stream, bufs)) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn vectored_sends_arrive_in_order_and_a_full_socket_waits() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        // More than the socket buffers hold: some sends would block and
        // must wait for the peer to read.
        let part: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn(async move {
            for round in 0..16u8 {
                let head = [round; 3];
                let total = head.len() + part.len();
                let mut sent = 0;
                while sent < total {
                    let rest: Vec<IoSlice<'_>> = if sent < head.len() {
                        vec![IoSlice::new(&head[sent..]), IoSlice::new(&part)]
                    } else {
                        vec![IoSlice::new(&part[sent - head.len()..])]
                    };
                    sent += std::future::poll_fn(|cx| poll_send_vectored(&ours, cx, &rest)).await.unwrap();
                }
            }
        });
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while got.len() < 16 * (3 + 256 * 1024) {
            let n = peer.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.unwrap();
        for (round, piece) in got.chunks(3 + 256 * 1024).enumerate() {
            assert_eq!(&piece[..3], &[round as u8; 3]);
            assert!(piece[3..].iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        }
    }
}
