//! Connection limits: how many client connections the proxy keeps open in
//! all, and from one client address, and what it does beyond them.
//!
//! Why: every client connection costs a file descriptor, and so may the
//! upstream connection it uses. Without a limit, a thousand idle
//! connections used up the daemon's descriptors (the default soft limit is
//! 1024): health checks could not connect, the store and the supervisor
//! could not open files, and the app went down for everyone. So the proxy
//! keeps a reserve of descriptors for its own work and refuses clients
//! beyond what is left, instead of failing in every other place at once.
//!
//! - **Total**: `[proxy] max_connections`, by default derived from the soft
//!   `RLIMIT_NOFILE` when the proxy is configured ([`derived_max_connections`]):
//!   a reserve of `max(256, limit / 8)` descriptors for the daemon (the
//!   store, logs, health checks, instance starts, the API), half of the rest
//!   for client connections and half for the upstream connections they use.
//!   Counted from the per-worker counts of open connections that balance
//!   accepts (`accept.rs`): no shared counter is written per connection.
//! - **Per client**: `[proxy] max_connections_per_client` (256; 0: no
//!   limit), per IPv4 address or IPv6 /64 (an IPv6 client can use any
//!   address of its /64, so counting single addresses would limit nothing).
//!   Trusted proxies (`trusted_proxies`) are not limited: every client of a
//!   load balancer in front comes from its address. Counted in a fixed
//!   table of atomic counters ([`ClientCounts`]): no lock and no allocation
//!   per connection.
//!
//! A connection beyond a limit is accepted and closed at once (the client
//! sees its connection reset before any answer: its request, usually in
//! the socket by the time it is accepted, is left unread), except that one over
//! the per-client limit may first wait up to 50 ms for one of its
//! address's connections to close (`server.rs`' `WaitingRoom`, at most 64
//! per worker): a client that closes a connection and opens the next at
//! once is otherwise refused now and then while the proxy's other worker
//! is still closing the old one. The listening socket's
//! queue keeps moving, so a client queued behind the refused ones is not
//! left waiting, and the accept loop does not spin on a socket that stays
//! readable. When `accept` itself fails because no descriptor is left
//! (`EMFILE`, `ENFILE`: something else used the reserve), the worker closes
//! a spare descriptor it keeps for this, accepts the waiting connection,
//! closes it and opens its spare again (as libuv and HAProxy do); without a
//! spare it stops accepting for [`NO_FD_BACKOFF`]. Refusals are counted and
//! logged at most once per [`REFUSAL_LOG_INTERVAL`], with the counts.

use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Descriptors kept for the daemon's own work at least (see the module
/// docs).
pub const FD_RESERVE_MIN: u64 = 256;

/// The soft `RLIMIT_NOFILE` assumed when it is unlimited.
const UNLIMITED_FDS: u64 = 1 << 20;

/// At most one refusal log line per this interval.
pub(crate) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long a worker stops accepting when `accept` fails for want of a
/// descriptor and it has no spare to shed the connection with.
pub(crate) const NO_FD_BACKOFF: Duration = Duration::from_millis(50);

/// The client connections a process with a soft `RLIMIT_NOFILE` of
/// `soft_fds` keeps open at most, when `max_connections` is not set: what
/// is left after a reserve of `max(256, soft_fds / 8)`, halved (each client
/// connection may hold an upstream one); at least a quarter of the limit
/// when the limit is too small for that reserve (only in tests).
pub fn derived_max_connections(soft_fds: u64) -> usize {
    let reserve = FD_RESERVE_MIN.max(soft_fds / 8);
    let limit = (soft_fds.saturating_sub(reserve) / 2).max(soft_fds / 4).max(1);
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// This process's soft `RLIMIT_NOFILE` (unlimited counts as 2^20).
pub fn soft_fd_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(UNLIMITED_FDS)
}

/// Whether a failed `socket`, `accept` or `connect` means that this process
/// (or the system) is out of file descriptors or socket memory, or of
/// local ports: a shortage of our own, which says nothing about the peer.
pub fn is_local_exhaustion(err: &std::io::Error) -> bool {
    use rustix::io::Errno;
    let Some(code) = err.raw_os_error() else { return false };
    [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM, Errno::ADDRNOTAVAIL]
        .iter()
        .any(|errno| errno.raw_os_error() == code)
}

/// Why a client connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max_connections` client connections were open.
    Total,
    /// Its address had `max_connections_per_client` open.
    PerClient,
    /// No file descriptor was left to accept it with (it was closed with
    /// the worker's spare).
    NoFd,
}

/// Rows of [`ClientCounts`]: a connection is counted in one counter per
/// row, and an address's count is the smallest of its counters.
const ROWS: usize = 2;
/// Counters per row (a power of two).
const SLOTS: usize = 4096;
/// A [`ClientSlots`] that counts nothing.
pub(crate) const NO_SLOTS: u32 = u32::MAX;

/// Open connections per client address, approximately and from above: a
/// count-min sketch (two rows of 4096 atomic counters, indexed by two
/// slices of a keyed hash of the address). An address's count is the
/// smaller of its two counters, which only exceeds its true count when
/// other addresses share both of its counters: with the total limit in
/// force, a false refusal needs about `max_connections_per_client`
/// connections from other addresses in both counters at once (with
/// 10,000 open connections from many addresses, about 2.5 per counter on
/// average). Never below the true count, so no address ever holds more
/// than its limit (except for one connection per worker in a race).
///
/// The hash key is random per proxy, so nobody can choose addresses that
/// collide with another's.
pub(crate) struct ClientCounts {
    hasher: std::hash::RandomState,
    counters: Box<[AtomicU32]>,
}

/// The two counters a connection is counted in, packed (`row 0 << 16 |
/// row 1`), or [`NO_SLOTS`].
pub(crate) type ClientSlots = u32;

impl ClientCounts {
    pub fn new() -> Self {
        Self { hasher: std::hash::RandomState::new(), counters: (0..ROWS * SLOTS).map(|_| AtomicU32::new(0)).collect() }
    }

    /// The key an address is counted under: IPv4 addresses (mapped ones
    /// too) one by one, IPv6 addresses by /64.
    fn key(ip: IpAddr) -> u128 {
        match ip.to_canonical() {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => (u128::from(v6) & !u128::from(u64::MAX)) | 1,
        }
    }

    fn slots(&self, ip: IpAddr) -> (usize, usize) {
        let hash = self.hasher.hash_one(Self::key(ip));
        let a = (hash as usize) & (SLOTS - 1);
        let b = ((hash >> 32) as usize) & (SLOTS - 1);
        (a, SLOTS + b)
    }

    /// Count a connection from `ip` unless that makes more than `limit`.
    pub fn try_add(&self, ip: IpAddr, limit: u32) -> Option<ClientSlots> {
        let (a, b) = self.slots(ip);
        let before_a = self.counters[a].fetch_add(1, Ordering::Relaxed);
        let before_b = self.counters[b].fetch_add(1, Ordering::Relaxed);
        if before_a.min(before_b) >= limit {
            self.counters[a].fetch_sub(1, Ordering::Relaxed);
            self.counters[b].fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(((a as u32) << 16) | (b - SLOTS) as u32)
    }

    /// Uncount a connection counted by [`ClientCounts::try_add`].
    pub fn remove(&self, slots: ClientSlots) {
        if slots == NO_SLOTS {
            return;
        }
        let (a, b) = ((slots >> 16) as usize, SLOTS + (slots & 0xffff) as usize);
        self.counters[a].fetch_sub(1, Ordering::Relaxed);
        self.counters[b].fetch_sub(1, Ordering::Relaxed);
    }

    /// The open connections counted for `ip` (from above, see the type's
    /// docs).
    #[cfg(test)]
    pub fn count(&self, ip: IpAddr) -> u32 {
        let (a, b) = self.slots(ip);
        self.counters[a].load(Ordering::Relaxed).min(self.counters[b].load(Ordering::Relaxed))
    }
}

/// The refusal counts since the last log line, and when that was: at most
/// one line per [`REFUSAL_LOG_INTERVAL`] (under exhaustion, a line per
/// refusal or per failed accept was tens of thousands of lines in seconds).
/// Connections closed because their request head did not come within
/// `header_timeout` (an idle or slowloris client, a browser's unused
/// preconnection) are counted here too rather than logged one by one: a
/// thousand idle connections would be a thousand lines. The first event
/// after a quiet interval is logged at once; the rest by the next event
/// after the interval, or by [`report_loop`]. Shared by every worker and
/// listener of a proxy; atomics only.
pub(crate) struct RefusalLog {
    start: Instant,
    total: AtomicU64,
    per_client: AtomicU64,
    no_fd: AtomicU64,
    /// `accept` failed otherwise (nothing was refused: the connection
    /// waits in the queue while the worker backs off).
    accept_errors: AtomicU64,
    /// Requests answered 503 because no connection to an instance could be
    /// opened for want of a descriptor.
    requests_no_fd: AtomicU64,
    /// Connections closed without a complete request head (or TLS
    /// handshake) within `header_timeout`.
    slow_heads: AtomicU64,
    /// Milliseconds since `start` of the last line, plus one (0: none yet).
    last_line: AtomicU64,
    /// Some count is not logged yet.
    pending: AtomicBool,
}

/// What a [`RefusalLog`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Refused(Refusal),
    /// `accept` failed (not a refusal).
    AcceptError,
    /// A request answered 503 because no connection to an instance could
    /// be opened ([`crate::ErrorKind::LocalExhaustion`]).
    RequestWithoutFd,
    /// A connection closed for not sending its head within
    /// `header_timeout`.
    SlowHead,
}

impl RefusalLog {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            total: AtomicU64::new(0),
            per_client: AtomicU64::new(0),
            no_fd: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            requests_no_fd: AtomicU64::new(0),
            slow_heads: AtomicU64::new(0),
            last_line: AtomicU64::new(0),
            pending: AtomicBool::new(false),
        }
    }

    /// Count one event (about `peer`, if known; `error`: the failed
    /// accept's) and log if the last line is old enough. `limits`:
    /// `max_connections` and `max_connections_per_client`, for the line.
    pub fn count(&self, what: Event, peer: Option<SocketAddr>, limits: (usize, u32), error: Option<&std::io::Error>) {
        let counter = match what {
            Event::Refused(Refusal::Total) => &self.total,
            Event::Refused(Refusal::PerClient) => &self.per_client,
            Event::Refused(Refusal::NoFd) => &self.no_fd,
            Event::AcceptError => &self.accept_errors,
            Event::RequestWithoutFd => &self.requests_no_fd,
            Event::SlowHead => &self.slow_heads,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.pending.store(true, Ordering::Release);
        self.flush(peer, limits, error);
    }

    /// Whether some count is not logged yet.
    #[cfg(test)]
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// Log the counts if any and if the last line is at least
    /// [`REFUSAL_LOG_INTERVAL`] old. Returns whether nothing is left to
    /// log.
    pub fn flush(&self, peer: Option<SocketAddr>, limits: (usize, u32), error: Option<&std::io::Error>) -> bool {
        if !self.pending.load(Ordering::Acquire) {
            return true;
        }
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.last_line.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < REFUSAL_LOG_INTERVAL.as_millis() as u64 {
            return false;
        }
        if self.last_line.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            // Another thread is logging right now.
            return true;
        }
        self.pending.store(false, Ordering::Release);
        let total = self.total.swap(0, Ordering::Relaxed);
        let per_client = self.per_client.swap(0, Ordering::Relaxed);
        let no_fd = self.no_fd.swap(0, Ordering::Relaxed);
        let accept_errors = self.accept_errors.swap(0, Ordering::Relaxed);
        let requests_503 = self.requests_no_fd.swap(0, Ordering::Relaxed);
        let slow_heads = self.slow_heads.swap(0, Ordering::Relaxed);
        let refused = total + per_client + no_fd;
        if refused == 0 && accept_errors == 0 && requests_503 == 0 && slow_heads == 0 {
            // An event counted in the previous line set `pending` again:
            // no line now, and none held back by this one.
            let _ = self.last_line.compare_exchange(now, last, Ordering::AcqRel, Ordering::Relaxed);
            return true;
        }
        let (max_connections, max_per_client) = limits;
        let since = if last == 0 { "so far".to_string() } else { format!("in the last {}s", (now - last) / 1000) };
        let last_client = peer.map_or_else(|| "-".to_string(), |p| p.to_string());
        let error =
            error.map_or_else(|| "-".to_string(), |e| crate::error::clean_io_message(&e.to_string()).to_string());
        let every = REFUSAL_LOG_INTERVAL.as_secs();
        if refused == 0 && accept_errors == 0 && requests_503 == 0 {
            // Slow or idle clients alone: nothing is short.
            tracing::info!(
                closed_without_a_complete_head = slow_heads,
                last_client = %last_client,
                "{slow_heads} client connections closed {since} for not sending a complete request head (or TLS handshake) within header_timeout (at most one such line every {every}s)"
            );
            return true;
        }
        tracing::warn!(
            refused,
            at_max_connections = total,
            over_max_connections_per_client = per_client,
            no_file_descriptor = no_fd,
            accept_errors,
            requests_503_no_file_descriptor = requests_503,
            closed_without_a_complete_head = slow_heads,
            max_connections,
            max_connections_per_client = max_per_client,
            last_client = %last_client,
            error = %error,
            "client connections refused {since}: {refused} closed at once ({total} at max_connections, {per_client} over max_connections_per_client, {no_fd} with no file descriptor left); {requests_503} requests answered 503 and {accept_errors} accepts failed for want of a descriptor; {slow_heads} connections closed without a complete request head or TLS handshake within header_timeout (at most one such line every {every}s)"
        );
        true
    }
}

/// Logs what a proxy's [`RefusalLog`] counted since its last line, every
/// [`REFUSAL_LOG_INTERVAL`], until `stop` (then once more): the counts of
/// a burst that ended are logged even if nothing else happens. Holds the
/// proxy weakly, so that dropping it is not delayed.
pub(crate) async fn report_loop(inner: std::sync::Weak<crate::Inner>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let stopped = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(REFUSAL_LOG_INTERVAL) => false,
        };
        let Some(inner) = inner.upgrade() else { return };
        inner.refusals.flush(None, inner.limits(), None);
        if stopped {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_limit_keeps_a_reserve_and_room_for_upstreams() {
        assert_eq!(derived_max_connections(1024), 384, "(1024 - 256) / 2");
        assert_eq!(derived_max_connections(65536), (65536 - 8192) / 2);
        assert_eq!(derived_max_connections(4096), (4096 - 512) / 2);
        // Too small for the reserve: a quarter, at least one.
        assert_eq!(derived_max_connections(300), 75);
        assert_eq!(derived_max_connections(2), 1);
        assert_eq!(derived_max_connections(0), 1);
        // Never more than the limit leaves after the reserve, and never
        // less as the limit grows.
        let mut previous = 0;
        for soft in (0..200_000u64).step_by(7) {
            let n = derived_max_connections(soft) as u64;
            assert!(n >= previous, "{soft}");
            if soft >= 1024 {
                assert!(2 * n + FD_RESERVE_MIN.max(soft / 8) <= soft, "{soft}");
            }
            previous = n;
        }
    }

    #[test]
    fn fd_shortages_are_told_from_the_peers_failures() {
        let os = |errno: rustix::io::Errno| std::io::Error::from_raw_os_error(errno.raw_os_error());
        use rustix::io::Errno;
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM, Errno::ADDRNOTAVAIL] {
            assert!(is_local_exhaustion(&os(errno)), "{errno:?}");
        }
        for errno in [Errno::CONNREFUSED, Errno::CONNRESET, Errno::TIMEDOUT, Errno::HOSTUNREACH, Errno::ACCESS] {
            assert!(!is_local_exhaustion(&os(errno)), "{errno:?}");
        }
        assert!(!is_local_exhaustion(&std::io::Error::other("no errno")));
    }

    #[test]
    fn client_counts_limit_each_address() {
        let counts = ClientCounts::new();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<ClientSlots> = (0..3).map(|_| counts.try_add(a, 3).expect("below the limit")).collect();
        assert_eq!(counts.try_add(a, 3), None, "a fourth from the same address");
        assert_eq!(counts.count(a), 3, "a refusal is not counted");
        assert!(counts.try_add(b, 3).is_some(), "another address is not limited by the first");
        // The mapped form of an IPv4 address is the same client.
        assert_eq!(counts.try_add("::ffff:192.0.2.1".parse().unwrap(), 3), None);
        counts.remove(held[0]);
        assert_eq!(counts.count(a), 2);
        assert!(counts.try_add(a, 3).is_some(), "room again once one closed");
        counts.remove(NO_SLOTS);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let counts = ClientCounts::new();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(counts.try_add(one, 2).is_some());
        assert!(counts.try_add(same_64, 2).is_some());
        assert_eq!(counts.try_add(same_64, 2), None);
        assert!(counts.try_add(other_64, 2).is_some());
    }

    /// Many addresses with a few connections each (far more than the
    /// table's counters): none is refused below its limit, since an
    /// address would need both of its counters shared with enough others.
    #[test]
    fn many_small_clients_are_not_refused() {
        let counts = ClientCounts::new();
        for i in 0..20_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            for _ in 0..2 {
                assert!(counts.try_add(ip, 256).is_some(), "{ip}");
            }
        }
    }

    #[test]
    fn the_refusal_log_counts_between_lines() {
        let mut log = RefusalLog::new();
        // As if the proxy had run for a minute.
        log.start = Instant::now().checked_sub(Duration::from_secs(60)).expect("the clock started a minute ago");
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        // The first refusal is logged at once; the next ones are counted.
        log.count(Event::Refused(Refusal::Total), Some(peer), (10, 2), None);
        assert!(!log.pending());
        log.count(Event::Refused(Refusal::PerClient), Some(peer), (10, 2), None);
        log.count(Event::Refused(Refusal::NoFd), None, (10, 2), None);
        log.count(Event::SlowHead, None, (10, 2), None);
        assert!(log.pending());
        assert!(!log.flush(None, (10, 2), None), "too soon for another line");
        assert_eq!(log.per_client.load(Ordering::Relaxed), 1);
        assert_eq!(log.no_fd.load(Ordering::Relaxed), 1);
        // Once the last line is old enough, the next flush takes the counts.
        log.last_line.store(1, Ordering::Relaxed);
        assert!(log.flush(None, (10, 2), None));
        assert!(!log.pending());
        assert_eq!(
            log.per_client.load(Ordering::Relaxed)
                + log.no_fd.load(Ordering::Relaxed)
                + log.slow_heads.load(Ordering::Relaxed),
            0
        );
        assert!(log.flush(None, (10, 2), None), "nothing left");
    }
}
