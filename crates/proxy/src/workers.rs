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
            // A task, not part of block_on's future: it must run in turn
            // with the other tasks (see `batch_end`). Spawned here, it is
            // the first to run.
            runtime.spawn(flusher(until.clone()));
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

/// Write batching: see [`batch_end`].
struct Gate {
    /// Tasks waiting for the end of the current batch.
    waiting: Vec<std::task::Waker>,
    /// The worker's [`flusher`] task, while it waits to be needed.
    flusher: Option<std::task::Waker>,
}

thread_local! {
    static GATE: std::cell::RefCell<Gate> = const {
        std::cell::RefCell::new(Gate { waiting: Vec::new(), flusher: None })
    };
}

/// Resolves once every task that was ready to run on this worker when it
/// was called has had its turn: the tasks that are about to write (a
/// request to an instance, a response to a client) wait here so that
/// their writes go out together, after the reads of the same batch of
/// events, as HAProxy's run queue does. A peer (an instance, a client)
/// woken by the first of a burst of writes is still busy when the next
/// ones arrive instead of going back to sleep between them: fewer
/// wake-ups and context switches on both sides, the main cost of a
/// loopback proxy after the system calls themselves. Immediately ready
/// outside the worker threads.
pub(crate) async fn batch_end() {
    let mut queued = false;
    std::future::poll_fn(|cx| {
        if queued {
            return std::task::Poll::Ready(());
        }
        GATE.with(|gate| {
            let mut gate = gate.borrow_mut();
            if gate.flusher.is_none() && gate.waiting.is_empty() {
                // Not on a worker thread (or the worker is stopping).
                return std::task::Poll::Ready(());
            }
            gate.waiting.push(cx.waker().clone());
            if let Some(flusher) = gate.flusher.take() {
                flusher.wake();
            }
            queued = true;
            std::task::Poll::Pending
        })
    })
    .await
}

/// One per worker: woken by the first [`batch_end`] of a batch, it runs
/// after every task queued before it and then lets the waiting tasks go,
/// in order.
async fn flusher(until: CancellationToken) {
    let wait = std::future::poll_fn(|cx| {
        GATE.with(|gate| {
            let mut gate = gate.borrow_mut();
            for waiting in gate.waiting.drain(..) {
                waiting.wake();
            }
            gate.flusher = Some(cx.waker().clone());
        });
        std::task::Poll::<()>::Pending
    });
    tokio::select! {
        _ = until.cancelled() => {}
        _ = wait => {}
    }
    GATE.with(|gate| {
        let mut gate = gate.borrow_mut();
        gate.flusher = None;
        for waiting in gate.waiting.drain(..) {
            waiting.wake();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn batch_end_is_immediate_outside_the_workers() {
        tokio::time::timeout(std::time::Duration::from_secs(1), batch_end()).await.expect("ready at once");
    }

    /// A task waiting at the end of the batch resumes after the tasks
    /// that were queued when it started waiting.
    #[test]
    fn batch_end_lets_the_tasks_queued_before_it_run_first() {
        let workers = Workers::start(1).unwrap();
        let handle = workers.handles()[0].clone();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawner = {
            let (handle, order) = (handle.clone(), Arc::clone(&order));
            let order: Arc<Mutex<Vec<&'static str>>> = order;
            async move {
                let log = move |what: &'static str| order.lock().unwrap().push(what);
                let first = {
                    let log = log.clone();
                    handle.spawn(async move {
                        log("first, before");
                        batch_end().await;
                        log("first, after");
                    })
                };
                let second = {
                    let log = log.clone();
                    handle.spawn(async move {
                        log("second");
                    })
                };
                first.await.unwrap();
                second.await.unwrap();
                done_tx.send(()).unwrap();
            }
        };
        handle.spawn(spawner);
        done_rx.recv_timeout(std::time::Duration::from_secs(5)).expect("tasks finished");
        assert_eq!(*order.lock().unwrap(), vec!["first, before", "second", "first, after"]);
    }
}
