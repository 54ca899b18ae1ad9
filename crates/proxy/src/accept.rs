//! Accepting client connections: every worker accepts on the shared
//! listening socket, and a worker that already serves clearly more
//! connections than the least loaded one lets it take the next one.
//!
//! Why: without it the kernel hands a burst of new connections (a load
//! balancer or a client pool opening its 64 connections at once) to
//! whichever worker asks first, and that worker keeps them all: in
//! `bench/proxy`, one run in three or four ended with one worker serving
//! every connection while the other idled, at 0.8× the throughput and
//! twice the p99 of a balanced run. HAProxy hands each accepted
//! connection to its least loaded thread for the same reason; here no
//! connection crosses threads, the busier worker just steps aside.
//!
//! How: every worker registers the listener with its own runtime, so each
//! new connection wakes all of them (the kernel signals every epoll
//! instance watching the socket). A worker that [`yields`] forgets that
//! wake-up and kicks the least loaded worker ([`Kicks`]): its readiness
//! may be spent already (it saw the burst arrive while it was the busier
//! one) and no further connection may come to wake it, so it is told to
//! try `accept` until the backlog is empty or it becomes the busier one
//! in turn. The least loaded worker never yields, so someone always
//! accepts. Loads are read without locks, so two workers can in principle
//! both see themselves as the busier one; a yielding worker therefore
//! looks again after [`RECHECK`] and then accepts whatever is still
//! waiting, whatever the loads. Kicks cross threads (a wake-up), but only
//! when the loads are uneven: in a steady state nobody yields.
//!
//! Accepting with `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)` (rustix) gives
//! a socket ready for tokio in one system call and the peer's address
//! with it.

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use atomic_waker::AtomicWaker;
use rustix::net::SocketFlags;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::limits::{ClientCounts, ClientSlots, Refusal, NO_SLOTS};

/// How long a worker that yielded a connection waits before it takes
/// whatever is still waiting, loads or not (see the module docs): the
/// worst case for a connection, in a rare race or when the other workers
/// are stuck (then this worker accepts everything, as without balancing).
pub(crate) const RECHECK: Duration = Duration::from_millis(10);

/// How long the kernel may hold a new connection that has sent nothing yet
/// before handing it to `accept` anyway (`TCP_DEFER_ACCEPT`, whole
/// seconds). See [`defer_accept`].
pub(crate) const DEFER_ACCEPT: Duration = Duration::from_secs(1);

/// Sets `TCP_DEFER_ACCEPT` on the listening socket: the kernel completes
/// the handshake but queues the connection for `accept` only once its
/// first bytes (the request line, a TLS ClientHello: the client always
/// speaks first here) have arrived, or once `wait` has passed.
///
/// Why: accepted before its request arrives, a connection's first read
/// would block, and the socket would then join the worker's epoll set (a
/// wake-up and two `epoll_ctl`s more, see `lazy.rs`): in `bench/proxy`,
/// new connection per request at 256 connections, that was two
/// connections in three, and about 15 % of the proxy's CPU per request.
/// With it, the request is usually in the socket when it is accepted (a
/// TLS handshake, a body or a head in several segments still wait). A
/// client that connects and stays silent costs an entry in the SYN queue
/// (bounded by the listen backlog, 4096, beyond which the kernel answers
/// with SYN cookies) instead of a descriptor and a task until `wait` is
/// over, then is accepted and meets `header_timeout` as before; meanwhile
/// it is not counted against `max_connections` or the per-client limit.
/// A connection refused by those limits is closed with its request
/// unread, so the client sees a reset rather than an orderly close.
/// nginx (`listen ... deferred`) and HAProxy (`bind ... defer-accept`)
/// offer the same.
///
/// Returns whether the option is set (Linux only).
#[allow(unsafe_code)]
pub(crate) fn defer_accept(listener: &StdListener, wait: Duration) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let secs = libc::c_int::try_from(wait.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid descriptor (borrowed from the listener), and a
        // pointer to a live `c_int` with its exact size, as
        // `setsockopt(IPPROTO_TCP, TCP_DEFER_ACCEPT)` reads it.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                std::ptr::from_ref(&secs).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (listener, wait);
        false
    }
}

/// Whether a worker serving `mine` connections leaves the next one to a
/// less loaded worker, when the least loaded of the others serves
/// `least_other`. Pure; the slack grows with the load (1 + 1/16) so that
/// steady-state jitter in a busy proxy does not make workers yield back
/// and forth.
pub(crate) fn yields(mine: usize, least_other: usize) -> bool {
    mine > least_other + 1 + least_other / 16
}

/// One worker's count of open client connections, on its own cache line
/// (it changes on every accept and close; the others only read it). With
/// it, the proxy's per-client counts (the same for every worker; here so
/// that a [`Counted`] needs only its worker's `Arc`).
#[repr(align(128))]
pub(crate) struct Load {
    open: AtomicUsize,
    clients: Arc<ClientCounts>,
}

/// Every worker's [`Load`], shared by all listeners of one proxy.
pub(crate) struct Loads {
    workers: Box<[Arc<Load>]>,
}

impl Loads {
    pub fn new(workers: usize) -> Arc<Loads> {
        let clients = Arc::new(ClientCounts::new());
        Arc::new(Loads {
            workers: (0..workers)
                .map(|_| Arc::new(Load { open: AtomicUsize::new(0), clients: Arc::clone(&clients) }))
                .collect(),
        })
    }

    /// Worker `index`'s counter (for the connections it accepts).
    #[cfg(test)]
    pub fn of(&self, index: usize) -> &Arc<Load> {
        &self.workers[index]
    }

    /// The least loaded other worker, if worker `index` should leave the
    /// next connection to it.
    pub fn should_yield(&self, index: usize) -> Option<usize> {
        let mine = self.workers[index].open.load(Ordering::Relaxed);
        let (least, least_load) = self
            .workers
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(other, load)| (other, load.open.load(Ordering::Relaxed)))
            .min_by_key(|(_, load)| *load)?;
        yields(mine, least_load).then_some(least)
    }

    /// Open connections per worker.
    pub fn snapshot(&self) -> Vec<usize> {
        self.workers.iter().map(|load| load.open.load(Ordering::Relaxed)).collect()
    }

    /// Open client connections in all (read without locks: while
    /// connections open and close, it may be off by the ones in progress).
    pub fn total(&self) -> usize {
        self.workers.iter().map(|load| load.open.load(Ordering::Relaxed)).sum()
    }

    /// Count a connection from `ip` on worker `index`, unless it would make
    /// more than `limits` allow: `max_total` in all, `per_client` from its
    /// address (0: no limit; `exempt`: not counted per client). Two workers
    /// admitting at once may go past `max_total` by one each.
    pub fn admit(&self, index: usize, ip: IpAddr, limits: Admission, exempt: bool) -> Result<Counted, Refusal> {
        if self.total() >= limits.max_total {
            return Err(Refusal::Total);
        }
        let load = &self.workers[index];
        let client = if limits.per_client == 0 || exempt {
            NO_SLOTS
        } else {
            load.clients.try_add(ip, limits.per_client).ok_or(Refusal::PerClient)?
        };
        load.open.fetch_add(1, Ordering::Relaxed);
        Ok(Counted { load: Arc::clone(load), client })
    }
}

/// The limits a new connection is admitted under (see `limits.rs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admission {
    pub max_total: usize,
    /// 0: no limit.
    pub per_client: u32,
}

impl Admission {
    /// `(max_connections, max_connections_per_client)`, for log lines.
    pub fn limits(self) -> (usize, u32) {
        (self.max_total, self.per_client)
    }
}

/// Counts one connection in its worker's [`Load`] (and its address in the
/// per-client counts) while it lives.
pub(crate) struct Counted {
    load: Arc<Load>,
    client: ClientSlots,
}

impl Counted {
    #[cfg(test)]
    pub fn new(load: &Arc<Load>) -> Counted {
        load.open.fetch_add(1, Ordering::Relaxed);
        Counted { load: Arc::clone(load), client: NO_SLOTS }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.load.open.fetch_sub(1, Ordering::Relaxed);
        self.load.clients.remove(self.client);
    }
}

/// Per listener: a flag and a waker per worker, for "connections are
/// waiting and you are the least loaded: accept them" from a worker that
/// yields. A worker's readiness may already be cleared by then (it saw
/// the connections arrive while it was the busier one), and no further
/// connection may come to wake it.
pub(crate) struct Kicks {
    workers: Box<[Kick]>,
}

#[repr(align(128))]
#[derive(Default)]
struct Kick {
    kicked: AtomicBool,
    waker: AtomicWaker,
}

impl Kicks {
    pub fn new(workers: usize) -> Arc<Kicks> {
        Arc::new(Kicks { workers: (0..workers).map(|_| Kick::default()).collect() })
    }

    fn kick(&self, index: usize) {
        let kick = &self.workers[index];
        kick.kicked.store(true, Ordering::Release);
        kick.waker.wake();
    }

    /// Resolves when worker `index` was kicked (and takes the kick).
    async fn kicked(&self, index: usize) {
        let kick = &self.workers[index];
        std::future::poll_fn(|cx| {
            if kick.kicked.swap(false, Ordering::Acquire) {
                return Poll::Ready(());
            }
            kick.waker.register(cx.waker());
            if kick.kicked.swap(false, Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// A listening socket registered with the current worker's runtime.
pub(crate) struct Acceptor {
    listener: AsyncFd<StdListener>,
    loads: Arc<Loads>,
    kicks: Arc<Kicks>,
    index: usize,
    /// Connections may be waiting whatever tokio's readiness says (this
    /// worker was kicked, or just accepted one that way): try `accept`
    /// directly until it would block.
    pending: bool,
    /// A connection this worker yielded was still waiting after
    /// [`RECHECK`]: take every waiting connection, loads or not, until
    /// none is left.
    forced: bool,
    /// `TCP_NODELAY` is set on the listening socket, and Linux gives it to
    /// every socket accepted from it: no `setsockopt` per connection.
    pub inherits_nodelay: bool,
    /// A descriptor (of `/dev/null`) kept to be closed when `accept` fails
    /// for want of one, so that the waiting connection can be accepted and
    /// closed instead of left in the queue while the listener stays
    /// readable (see `limits.rs`). A `Cell`: it is swapped inside tokio's
    /// `try_io`, which borrows the listener.
    spare: Cell<Option<OwnedFd>>,
}

/// What [`Acceptor::accept`] got.
pub(crate) enum Accepted {
    /// A connection to serve.
    Conn(StdStream, SocketAddr),
    /// No descriptor was left for a waiting connection: it was accepted
    /// with the spare descriptor and closed at once.
    Shed(Option<SocketAddr>),
}

fn open_spare() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

impl Acceptor {
    /// Must be called on the worker's runtime. `listener` is set
    /// non-blocking here.
    #[allow(unsafe_code)]
    pub fn new(listener: StdListener, loads: Arc<Loads>, kicks: Arc<Kicks>, index: usize) -> io::Result<Acceptor> {
        listener.set_nonblocking(true)?;
        // Every worker's listener is the same socket: setting it again is
        // harmless. Not a TCP socket (never here), or refused: each
        // accepted connection gets it instead.
        let inherits_nodelay =
            cfg!(target_os = "linux") && rustix::net::sockopt::set_tcp_nodelay(&listener, true).is_ok();
        // Likewise; refused or unsupported: connections are accepted at
        // once, as before (the first read may then wait).
        if !defer_accept(&listener, DEFER_ACCEPT) && cfg!(target_os = "linux") {
            tracing::debug!("TCP_DEFER_ACCEPT refused on the listening socket: connections are accepted at once");
        }
        // SAFETY: the AsyncFd owns the listener, so its fd stays open (and
        // is the same socket) for as long as it is registered; that is
        // all `register_with_interest` asks for.
        let listener = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
            .map_err(|err| err.into_parts().1)?;
        Ok(Acceptor {
            listener,
            loads,
            kicks,
            index,
            pending: false,
            forced: false,
            inherits_nodelay,
            spare: Cell::new(open_spare()),
        })
    }

    /// The next connection for this worker: waits while there is none, or
    /// while another worker is clearly less loaded (which it then wakes;
    /// and takes the connection anyway after [`RECHECK`] if nobody did).
    /// `Err`: `accept` failed (with no spare descriptor left for a
    /// connection waiting for want of one, too): the caller backs off.
    pub async fn accept(&mut self) -> io::Result<Accepted> {
        let mut yielded = false;
        loop {
            if !self.forced {
                if let Some(least) = self.loads.should_yield(self.index) {
                    if !yielded {
                        self.kicks.kick(least);
                        yielded = true;
                    }
                    tokio::select! {
                        // A new connection: look at the loads again.
                        ready = self.listener.readable() => ready?.clear_ready(),
                        () = self.kicks.kicked(self.index) => self.pending = true,
                        () = tokio::time::sleep(RECHECK) => self.forced = true,
                    }
                    continue;
                }
            }
            yielded = false;
            if self.forced || self.pending {
                match self.try_accept() {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        self.forced = false;
                        self.pending = false;
                    }
                    // More may be waiting: stay pending (or forced).
                    other => return other,
                }
            }
            tokio::select! {
                ready = self.listener.readable() => match ready?.try_io(|_| self.try_accept()) {
                    Ok(accepted) => return accepted,
                    // Another worker took it; readiness is cleared.
                    Err(_would_block) => {}
                },
                () = self.kicks.kicked(self.index) => self.pending = true,
            }
        }
    }

    /// Counts a connection this worker accepted from `ip` while it lives,
    /// unless `limits` refuse it (see [`Loads::admit`]).
    pub fn admit(&self, ip: IpAddr, limits: Admission, exempt: bool) -> Result<Counted, Refusal> {
        self.loads.admit(self.index, ip, limits, exempt)
    }

    fn try_accept(&self) -> io::Result<Accepted> {
        match self.accept_one() {
            Ok((stream, peer)) => Ok(Accepted::Conn(stream, peer)),
            Err(err) if crate::limits::is_local_exhaustion(&err) => self.shed(err),
            Err(err) => Err(err),
        }
    }

    /// `accept` failed for want of a descriptor: close the spare, accept
    /// the waiting connection, close it, and open the spare again.
    fn shed(&self, err: io::Error) -> io::Result<Accepted> {
        let Some(spare) = self.spare.take() else {
            // Lost at an earlier try (another thread took the descriptor
            // the spare freed): try to get it back for the next time.
            self.spare.set(open_spare());
            return Err(err);
        };
        drop(spare);
        let accepted = self.accept_one();
        let shed = match accepted {
            Ok((stream, peer)) => {
                drop(stream);
                Ok(Accepted::Shed(Some(peer)))
            }
            // Another worker took it meanwhile, or the peer is not an IP one.
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Err(err),
            Err(_) => Ok(Accepted::Shed(None)),
        };
        self.spare.set(open_spare());
        shed
    }

    fn accept_one(&self) -> io::Result<(StdStream, SocketAddr)> {
        let (fd, addr) =
            rustix::net::acceptfrom_with(self.listener.get_ref(), SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
        let peer = addr
            .and_then(|addr| SocketAddr::try_from(addr).ok())
            .ok_or_else(|| io::Error::other("accepted a connection without an IP peer address"))?;
        Ok((StdStream::from(fd), peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_loaded_worker_never_yields() {
        for mine in 0..500 {
            assert!(!yields(mine, mine), "{mine}");
            for least in mine..500 {
                assert!(!yields(mine, least), "{mine} vs {least}");
            }
        }
    }

    #[test]
    fn a_worker_yields_only_beyond_the_slack() {
        assert!(!yields(1, 0));
        assert!(yields(2, 0));
        assert!(!yields(33, 32));
        assert!(!yields(35, 32));
        assert!(yields(36, 32));
        // The slack grows with the load: 1 + 1/16.
        assert!(!yields(160, 150));
        assert!(yields(161, 150));
    }

    #[test]
    fn loads_compare_against_the_least_loaded_other_worker() {
        let loads = Loads::new(3);
        let _a: Vec<Counted> = (0..10).map(|_| Counted::new(loads.of(0))).collect();
        let b: Vec<Counted> = (0..10).map(|_| Counted::new(loads.of(1))).collect();
        assert_eq!(loads.snapshot(), vec![10, 10, 0]);
        assert_eq!(loads.should_yield(0), Some(2));
        assert_eq!(loads.should_yield(1), Some(2));
        assert_eq!(loads.should_yield(2), None);
        drop(b);
        assert_eq!(loads.snapshot(), vec![10, 0, 0]);
        assert_eq!(loads.should_yield(0), Some(1));
        assert_eq!(loads.should_yield(1), None);
        // A single worker never yields.
        let alone = Loads::new(1);
        let _c: Vec<Counted> = (0..100).map(|_| Counted::new(alone.of(0))).collect();
        assert_eq!(alone.should_yield(0), None);
    }

    #[tokio::test]
    async fn accepted_connections_get_nodelay_from_the_listener() {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acceptor = Acceptor::new(listener, Loads::new(1), Kicks::new(1), 0).unwrap();
        assert!(acceptor.inherits_nodelay, "set on the listening socket");
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        // A byte, or the accept waits for TCP_DEFER_ACCEPT's second.
        std::io::Write::write_all(&mut client, b"G").unwrap();
        let Accepted::Conn(stream, _) = acceptor.accept().await.unwrap() else { panic!("not accepted") };
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY comes with the accepted socket, without a setsockopt");
    }

    #[tokio::test]
    async fn a_connection_is_accepted_once_its_first_bytes_arrive_and_a_silent_one_after_the_wait() {
        use std::io::Write;
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acceptor = Acceptor::new(listener, Loads::new(1), Kicks::new(1), 0).unwrap();
        let silent = std::net::TcpStream::connect(addr).unwrap();
        let mut speaking = std::net::TcpStream::connect(addr).unwrap();
        speaking.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), acceptor.accept()).await.expect("accepted");
        let Accepted::Conn(stream, peer) = first.unwrap() else { panic!("not accepted") };
        assert_eq!(peer, speaking.local_addr().unwrap(), "the connection that spoke comes first");
        // Non-blocking, as accepted: one read finds the request, no wait.
        let mut request = [0u8; 64];
        let n = std::io::Read::read(&mut &stream, &mut request).expect("the request is already in the socket");
        assert_eq!(&request[..n], b"GET / HTTP/1.1\r\n\r\n");
        // The silent one is not lost: it is handed over once the wait is
        // over (the kernel resends its SYN-ACK, the client acknowledges).
        let second = tokio::time::timeout(DEFER_ACCEPT + Duration::from_secs(10), acceptor.accept())
            .await
            .expect("the silent connection is accepted after the wait");
        let Accepted::Conn(_, peer) = second.unwrap() else { panic!("not accepted") };
        assert_eq!(peer, silent.local_addr().unwrap());
    }

    #[test]
    fn admission_counts_in_all_and_per_client() {
        let loads = Loads::new(2);
        let limits = Admission { max_total: 4, per_client: 2 };
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = loads.admit(0, a, limits, false).unwrap();
        let _second = loads.admit(1, a, limits, false).unwrap();
        assert_eq!(loads.admit(0, a, limits, false).err(), Some(Refusal::PerClient), "per address, on any worker");
        let _trusted = loads.admit(0, a, limits, true).expect("a trusted proxy is not limited per client");
        let _third = loads.admit(1, b, limits, false).unwrap();
        assert_eq!(loads.total(), 4);
        assert_eq!(loads.admit(0, b, limits, false).err(), Some(Refusal::Total));
        drop(first);
        assert_eq!(loads.total(), 3);
        let _again = loads.admit(0, a, limits, false).expect("room again for the address and in all");
        let unlimited = Admission { max_total: usize::MAX, per_client: 0 };
        let many: Vec<Counted> = (0..50).map(|_| loads.admit(1, a, unlimited, false).unwrap()).collect();
        assert_eq!(loads.total(), 54);
        drop(many);
        assert_eq!(loads.snapshot(), vec![2, 2]);
    }
}
