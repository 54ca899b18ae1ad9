//! Test harness: in-process upstreams, a proxy on 127.0.0.1:0, a small
//! keep-alive client, and waiting helpers (events and conditions, never
//! bare sleeps).
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nonstop_core::ids::{InstanceId, ProcessName};
use nonstop_core::process::{HealthCheck, StatusRange};
use nonstop_core::traffic::{Backend, BackendHealth, HealthEvent, InitialHealth, RouteKey, Traffic};
use nonstop_proxy::{Proxy, ProxyConfig};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub type TBody = BoxBody<Bytes, hyper::Error>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<TBody>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>, Arc<UpstreamState>) -> HandlerFuture + Send + Sync>;

pub fn full(body: impl Into<Bytes>) -> TBody {
    Full::new(body.into()).map_err(|never: Infallible| match never {}).boxed()
}

pub fn text(status: u16, body: impl Into<Bytes>) -> Response<TBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp
}

/// What an upstream records and what a test can change on it.
pub struct UpstreamState {
    pub name: String,
    /// Non-health requests received.
    pub hits: AtomicUsize,
    /// Health checks received.
    pub checks: AtomicUsize,
    /// Status `/health` answers.
    pub health_status: AtomicU16,
    /// Every request in order: `health` or the path.
    pub log: Mutex<Vec<String>>,
    /// Signalled when a request to `/slow` arrives.
    pub slow_started: tokio::sync::Notify,
    /// `/slow` answers once this is cancelled.
    pub release: CancellationToken,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Upstream {
    /// An upstream with the default behaviour: `/health` answers
    /// `health_status`, `/slow` waits for `release`, anything else answers
    /// `200 <name>`.
    pub async fn start(name: &str) -> Upstream {
        Self::with_handler(
            name,
            Arc::new(|_req, state: Arc<UpstreamState>| Box::pin(async move { text(200, state.name.clone()) })),
        )
        .await
    }

    pub async fn with_handler(name: &str, handler: Handler) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            name: name.to_string(),
            hits: AtomicUsize::new(0),
            checks: AtomicUsize::new(0),
            health_status: AtomicU16::new(200),
            log: Mutex::new(Vec::new()),
            slow_started: tokio::sync::Notify::new(),
            release: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (st, stop2, tasks2) = (state.clone(), stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let (st, stop3, handler) = (st.clone(), stop2.clone(), handler.clone());
                tasks2.spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (st, handler) = (st.clone(), handler.clone());
                        async move { Ok::<_, Infallible>(dispatch(req, st, handler).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = stop3.cancelled() => {}
                    }
                });
            }
        });
        Upstream { addr, state, stop, tasks }
    }

    /// Kill it: stop listening (connects are refused) and drop every
    /// connection, in the middle of whatever it was doing.
    pub async fn kill(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn set_health(&self, status: u16) {
        self.state.health_status.store(status, Ordering::SeqCst);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn dispatch(req: Request<Incoming>, state: Arc<UpstreamState>, handler: Handler) -> Response<TBody> {
    let path = req.uri().path().to_string();
    if path == "/health" {
        state.checks.fetch_add(1, Ordering::SeqCst);
        state.log.lock().unwrap().push("health".into());
        let status = state.health_status.load(Ordering::SeqCst);
        return text(status, "health");
    }
    state.hits.fetch_add(1, Ordering::SeqCst);
    state.log.lock().unwrap().push(path.clone());
    if path == "/slow" {
        state.slow_started.notify_waiters();
        state.release.cancelled().await;
        return text(200, format!("slow from {}", state.name));
    }
    handler(req, state).await
}

/// A raw upstream that answers `/health` and closes the connection on any
/// other request without answering. Counts those requests.
pub struct Closer {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Closer {
    pub async fn start() -> Closer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    let head = String::from_utf8_lossy(&buf);
                    if head.split_whitespace().nth(1) == Some("/health") {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                            .await;
                    } else {
                        h.fetch_add(1, Ordering::SeqCst);
                        // Close without a byte of response.
                    }
                });
            }
        });
        Closer { addr, hits, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy serving on 127.0.0.1:0.
pub struct Running {
    pub proxy: Proxy,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub async fn start(config: ProxyConfig) -> Running {
        let proxy = Proxy::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn({
            let proxy = proxy.clone();
            let shutdown = shutdown.clone();
            async move { proxy.serve(listener, shutdown).await }
        });
        Running { proxy, addr, shutdown, handle }
    }

    /// A proxy with the default config whose default route has `addrs`
    /// (slots 1, 2, ...), taken as healthy, checked lazily.
    pub async fn serving(addrs: &[SocketAddr]) -> Running {
        let running = Running::start(config()).await;
        running.proxy.set_default_route(route());
        for (slot, addr) in (1..).zip(addrs) {
            running.add(slot, *addr, lazy_check(), InitialHealth::AssumeHealthy);
        }
        running
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle).await.expect("proxy stops").unwrap().unwrap();
        self.proxy.close().await;
    }

    pub fn add(&self, slot: u32, addr: SocketAddr, check: HealthCheck, initial: InitialHealth) -> InstanceId {
        let instance = instance(slot);
        self.proxy.add(&route(), Backend { instance: instance.clone(), addr }, check, initial);
        instance
    }
}

pub fn route() -> RouteKey {
    RouteKey("web".into())
}

pub fn instance(slot: u32) -> InstanceId {
    InstanceId::new(ProcessName::new("web").unwrap(), slot, 1)
}

pub fn check(interval_ms: u64, healthy: u32, unhealthy: u32) -> HealthCheck {
    HealthCheck {
        path: "/health".into(),
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_secs(2),
        healthy_threshold: healthy,
        unhealthy_threshold: unhealthy,
        expect_status: StatusRange { min: 200, max: 399 },
        host: None,
        smoke: Vec::new(),
    }
}

/// A check that never takes a backend out by itself (the first check runs
/// at once, the next in an hour).
pub fn lazy_check() -> HealthCheck {
    check(3_600_000, 1, 1_000)
}

/// Config for tests: short waits so failures show quickly.
pub fn config() -> ProxyConfig {
    ProxyConfig {
        no_backend_wait: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
        ..Default::default()
    }
}

/// Wait for `instance` to reach `health` on the event stream.
pub async fn wait_health(
    rx: &mut broadcast::Receiver<HealthEvent>,
    instance: &InstanceId,
    health: BackendHealth,
) -> HealthEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = rx.recv().await.expect("event stream open");
            if &event.instance == instance && event.health == health {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{instance} did not become {}", health.as_str()))
}

/// Poll a condition until it holds (bounded).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A keep-alive HTTP/1.1 client of the proxy; reconnects when needed.
pub struct Client {
    addr: SocketAddr,
    conn: Option<SendRequest<Full<Bytes>>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        let reusable = match self.conn.take() {
            Some(mut c) if !c.is_closed() => c.ready().await.is_ok().then_some(c),
            _ => None,
        };
        let mut conn = match reusable {
            Some(c) => c,
            None => {
                let stream = TcpStream::connect(self.addr).await.map_err(|e| e.to_string())?;
                let (conn, driver) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
                tokio::spawn(driver);
                conn
            }
        };
        let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        self.conn = Some(conn);
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send(request("GET", path, "")).await.unwrap()
    }
}

pub fn request(method: &str, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder().method(method).uri(path).header("host", "app.test").body(Full::new(body.into())).unwrap()
}

/// One request on its own connection.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    Client::new(addr).get(path).await
}

// ------------------------------------------------------------- raw sockets

/// One response read off a raw socket.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Status line and headers, as sent.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Reads one response (head, then a body framed by Content-Length, chunked
/// or the end of the connection) within 10 s. `None` if the connection
/// ended (or broke) before a complete head.
pub async fn read_response(s: &mut TcpStream) -> Option<RawReply> {
    read_response_to(s, false).await
}

/// As [`read_response`], for a response to `HEAD` (never a body).
pub async fn read_head_response(s: &mut TcpStream) -> Option<RawReply> {
    read_response_to(s, true).await
}

async fn read_response_to(s: &mut TcpStream, head_only: bool) -> Option<RawReply> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
        let mut reply = RawReply { status, head, body: buf[head_end..].to_vec() };
        let no_body = head_only || status == 204 || status == 304 || status < 200;
        if no_body {
            return Some(reply);
        }
        if let Some(len) = reply.header("content-length") {
            let len: usize = len.parse().ok()?;
            while reply.body.len() < len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return Some(reply),
                    Ok(n) => reply.body.extend_from_slice(&chunk[..n]),
                }
            }
            reply.body.truncate(len);
        } else if reply.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            while !reply.body.ends_with(b"0\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return Some(reply),
                    Ok(n) => reply.body.extend_from_slice(&chunk[..n]),
                }
            }
        } else {
            loop {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return Some(reply),
                    Ok(n) => reply.body.extend_from_slice(&chunk[..n]),
                }
            }
        }
        Some(reply)
    })
    .await
    .expect("a response (or the end of the connection) within 10 s")
}

/// Whether the peer closed the connection (EOF or reset) within `within`,
/// reading and dropping anything else it sends.
pub async fn closes(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// What a [`scripted_instance`] does for one request: write bytes, or wait
/// until notified.
pub enum Say {
    Bytes(Vec<u8>),
    Wait(Arc<tokio::sync::Notify>),
}

/// An instance written by hand, for answers a real server would not give
/// (custom reason phrases, a body that stops halfway): keep-alive, and for
/// each request head (requests without a body) `answer(head)` says what to
/// do, in order. Stops with the returned task.
pub async fn scripted_instance(
    answer: impl Fn(&str) -> Vec<Say> + Send + Sync + 'static,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        for step in answer(&head) {
                            match step {
                                Say::Bytes(bytes) => {
                                    if s.write_all(&bytes).await.is_err() {
                                        return;
                                    }
                                }
                                Say::Wait(notify) => notify.notified().await,
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Sends `bytes` on a new connection and reads one response. Also returns
/// the client's address (to find its log lines) and the stream.
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> (Option<RawReply>, SocketAddr, TcpStream) {
    let mut s = connect_own_port(addr).await;
    let local = s.local_addr().unwrap();
    s.write_all(bytes).await.unwrap();
    let reply = read_response(&mut s).await;
    (reply, local, s)
}

/// A connection from a local port that no other connection made by this
/// function in this test process ever used, and no other socket of the
/// machine uses meanwhile (bound before connecting): a test that looks up
/// the proxy's log lines by client address must not see those of another
/// connection, which the kernel may give the same ephemeral port (a closed
/// one at once, or a live one going to another destination).
pub async fn connect_own_port(addr: SocketAddr) -> TcpStream {
    static USED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    // Sockets bound to ports used before, held until a fresh one is found
    // so that the kernel does not offer them again.
    let mut skipped = Vec::new();
    let socket = loop {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        let mut used = USED.lock().unwrap();
        if used.contains(&port) {
            skipped.push(socket);
            assert!(skipped.len() < 10_000, "no fresh local port");
            continue;
        }
        used.push(port);
        break socket;
    };
    drop(skipped);
    socket.connect(addr).await.unwrap()
}

/// A guard that counts its drops: put one in a handler's future to see it
/// cancelled.
pub struct DropSignal(pub Arc<tokio::sync::Notify>, pub Arc<AtomicUsize>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.notify_waiters();
    }
}

// ------------------------------------------------------------------- logs

/// The proxy's log lines (INFO and up) in this test binary, captured once.
pub mod logs {
    use std::io::Write;
    use std::sync::{Arc, Mutex, OnceLock};

    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

    #[derive(Clone)]
    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl Write for Writer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Start capturing (idempotent).
    pub fn capture() {
        BUF.get_or_init(|| {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let writer = Writer(Arc::clone(&buf));
            let _ = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || writer.clone())
                .try_init();
            buf
        });
    }

    /// Captured lines that contain `needle`.
    pub fn lines_with(needle: &str) -> Vec<String> {
        let Some(buf) = BUF.get() else {
            return Vec::new();
        };
        let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }

    /// The lines logged about one client connection.
    pub fn for_client(client: std::net::SocketAddr) -> Vec<String> {
        lines_with(&format!("client={client}"))
    }
}

/// A response body fed through a channel: the handler streams, a test
/// decides when (and whether) it ends. `guard` is dropped with the body.
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    _guard: Option<DropSignal>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        self.get_mut().rx.poll_recv(cx).map(|next| next.map(|b| Ok(http_body::Frame::data(b))))
    }
}

pub fn channel_body(guard: Option<DropSignal>) -> (tokio::sync::mpsc::Sender<Bytes>, TBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    (tx, ChannelBody { rx, _guard: guard }.boxed())
}
