//! The proxy's own threads: one single-threaded tokio runtime per worker,
//! each running an accept loop on every listener (Pingora's "no steal"
//! runtimes; nginx's and HAProxy's thread- or process-per-core model).
//!
//! A client connection is accepted, served and closed on one thread, and
//! so are the upstream connections it uses (each worker has its own share
//! of every backend's pool). Nothing on the request path wakes another
//! thread: with tokio's work-stealing runtime, every new connection woke
//! an idle worker to steal it (a futex and an eventfd write per
//! connection), and a connection's task and its upstream sockets could sit
//! on different threads. The cost is balance: a thread keeps the
//! connections it accepted, so accepts are balanced instead: a worker that
//! serves clearly more connections than another leaves new ones to it
//! (`accept.rs`).
//!
//! Health checks, TLS reloads and the control plane stay on the runtime of
//! the caller (the daemon's).
//!
//! # Lifetime
//! The threads start with the first listener ([`crate::Proxy::serve`]) and
//! stop when the proxy is dropped. A serve loop always ends (drains and
//! returns) before that: it holds the proxy.

use std::cell::Cell;
use std::io;
use std::sync::Arc;

use crate::accept::Loads;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// 1 + this worker's index on a worker thread, 0 elsewhere.
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Which share of a per-worker structure the current thread uses: 1 + the
/// worker's index on a worker thread, 0 on any other thread (tests, the
/// daemon's runtime). Always below [`slots`].
pub(crate) fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// How many shares a per-worker structure needs for `workers` workers.
pub(crate) fn slots(workers: usize) -> usize {
    workers + 1
}

/// The worker count for a configured value: 0 means one per core.
pub(crate) fn resolve(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }
}

pub(crate) struct Workers {
    handles: Vec<Handle>,
    loads: Arc<Loads>,
    stop: CancellationToken,
}

impl Workers {
    /// Start `count` threads, each driving a current-thread runtime until
    /// the `Workers` are dropped.
    pub fn start(count: usize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("nonstop-proxy-{index}"))
                .build()?;
            handles.push(runtime.handle().clone());
            let until = stop.clone();
            let started = std::thread::Builder::new().name(format!("nonstop-proxy-{index}")).spawn(move || {
                SLOT.with(|slot| slot.set(index + 1));
                runtime.block_on(heartbeat(until));
                // Whatever is still on it (nothing, once every serve loop
                // returned) is dropped with the runtime, here.
            });
            if let Err(err) = started {
                stop.cancel();
                return Err(err);
            }
        }
        Ok(Workers { handles, loads: Loads::new(count), stop })
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Open client connections per worker, for balancing accepts.
    pub fn loads(&self) -> &Arc<Loads> {
        &self.loads
    }
}

/// Wake up every [`HEARTBEAT`] until `until` is cancelled.
///
/// Why: tokio's timer writes to the runtime's eventfd (a system call)
/// whenever a timer is set earlier than the wake-up time the runtime last
/// parked with, even when the runtime is busy and not parked at all. Every
/// new client connection sets its header-read timer (10 s by default); with
/// no timer due sooner, each one cost an eventfd write. A timer that is
/// always due within a second keeps the planned wake-up close, so timers of
/// a second or more, which all of the proxy's are, never cause one.
async fn heartbeat(until: CancellationToken) {
    loop {
        tokio::select! {
            _ = until.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// See [`heartbeat`].
const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(500);

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
