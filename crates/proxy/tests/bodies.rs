//! Request bodies: read whole before an instance is chosen (in memory, then
//! an unlinked temporary file), a minimum upload rate, streamed paths,
//! chunk sizes over the limit (issue 15, "two slow uploads take down a
//! sync-worker app").

mod common;

use common::*;
use http_body_util::BodyExt;
use nonstop_core::traffic::InitialHealth;
use nonstop_proxy::ProxyConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An instance like gunicorn's sync worker with one worker: one connection
/// at a time (the next waits in the backlog), the whole request read (head,
/// then a `Content-Length` or chunked body), answered, closed. Records the
/// request lines it served.
async fn sync_instance(seen: Arc<Mutex<Vec<String>>>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            if let Ok(Some(line)) = serve_one(&mut s).await {
                seen.lock().unwrap().push(line);
            }
        }
    });
    (addr, task)
}

async fn serve_one(s: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
    let chunked = head.contains("transfer-encoding: chunked");
    let mut body = buf[head_end..].to_vec();
    while if chunked { !body.ends_with(b"0\r\n\r\n") } else { body.len() < length } {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let text = format!("got {} bytes", body.len());
    let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
    s.write_all(answer.as_bytes()).await?;
    Ok(head.lines().next().map(str::to_string))
}

/// Sends `head`, then one byte a second, while reading what comes back:
/// the bytes read until the proxy closed the connection (at most 60 s),
/// and the client's address.
async fn drip(addr: SocketAddr, head: &'static str) -> (Vec<u8>, SocketAddr) {
    let s = connect_own_port(addr).await;
    let client = s.local_addr().unwrap();
    let (mut r, mut w) = s.into_split();
    w.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..60 {
            if w.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writer.abort();
    (got, client)
}

#[tokio::test]
async fn two_slow_uploads_do_not_stop_gets_to_single_worker_instances() {
    logs::capture();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a, ta) = sync_instance(Arc::clone(&seen)).await;
    let (b, tb) = sync_instance(Arc::clone(&seen)).await;
    // Real health checks: an instance whose only worker is held fails them.
    let p = Running::start(ProxyConfig { upload_rate_window: Duration::from_secs(2), ..config() }).await;
    p.proxy.set_default_route(route());
    p.add(1, a, check(200, 1, 2), InitialHealth::AssumeHealthy);
    p.add(2, b, check(200, 1, 2), InitialHealth::AssumeHealthy);

    // Two uploads at 1 byte/s, as many as there are workers.
    let head = "POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100\r\n\r\n";
    let slow: Vec<JoinHandle<(Vec<u8>, SocketAddr)>> = (0..2).map(|_| tokio::spawn(drip(p.addr, head))).collect();

    // Meanwhile, GETs keep being answered by the instances.
    let mut answered = 0;
    while slow.iter().any(|t| !t.is_finished()) || answered < 5 {
        let reply = tokio::time::timeout(Duration::from_secs(5), get(p.addr, "/page"))
            .await
            .expect("a GET answered while the slow uploads run");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), "got 0 bytes");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The slow uploads were ended with 408 (below 1 KiB/s over 2 s), and
    // never reached an instance.
    for t in slow {
        let (got, client) = t.await.unwrap();
        let got = String::from_utf8_lossy(&got).into_owned();
        assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
        assert!(got.to_ascii_lowercase().contains("connection: close"), "{got}");
        wait_until("the 408 to be logged", || !logs::for_client(client).is_empty()).await;
        let lines = logs::for_client(client);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("status=408") && lines[0].contains("slower than min_upload_rate"), "{lines:?}");
    }
    assert!(seen.lock().unwrap().iter().all(|line| !line.contains("/upload")));
    assert!(seen.lock().unwrap().iter().filter(|line| line.starts_with("get /page")).count() >= 5);
    ta.abort();
    tb.abort();
    p.stop().await;
}

/// An instance that reads each request body whole and answers its length,
/// a checksum, and how it was framed.
fn checksum_handler() -> Handler {
    Arc::new(|req, _state| {
        Box::pin(async move {
            let framing = format!(
                "cl={} te={}",
                req.headers().get("content-length").map_or("-", |v| v.to_str().unwrap()),
                req.headers().get("transfer-encoding").map_or("-", |v| v.to_str().unwrap()),
            );
            match req.into_body().collect().await {
                Ok(body) => {
                    let body = body.to_bytes();
                    text(200, format!("{} {:016x} {framing}", body.len(), fnv(&body)))
                }
                Err(_) => text(500, "body error"),
            }
        })
    })
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Files of this process open in `dir` (an unlinked one reads
/// `dir/#123 (deleted)`).
fn open_in(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

#[tokio::test]
async fn a_body_larger_than_memory_goes_to_a_file_and_arrives_intact() {
    use std::os::unix::fs::PermissionsExt;
    let up = Upstream::with_handler("a", checksum_handler()).await;
    let root = tempfile::tempdir().unwrap();
    let dir: PathBuf = root.path().join("bodies");
    let config = ProxyConfig { body_memory_bytes: 64 * 1024, body_buffer_dir: Some(dir.clone()), ..config() };
    let p = Running::start(config).await;
    p.proxy.set_default_route(route());
    p.add(1, up.addr, lazy_check(), InitialHealth::AssumeHealthy);

    let body = pattern(1024 * 1024 + 123);
    let expected = format!("{} {:016x} cl={} te=-", body.len(), fnv(&body), body.len());
    let (first, rest) = body.split_at(512 * 1024);
    for chunked in [false, true] {
        let hits = up.hits();
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let framing =
            if chunked { "Transfer-Encoding: chunked".to_string() } else { format!("Content-Length: {}", body.len()) };
        let head = format!("PUT /file HTTP/1.1\r\nHost: app.test\r\n{framing}\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let frame = |part: &[u8]| {
            let mut out = Vec::new();
            if chunked {
                out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            }
            out.extend_from_slice(part);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            out
        };
        s.write_all(&frame(first)).await.unwrap();
        // Past 64 KiB: the body is in a file now, and only there.
        wait_until("the body to go to a file", || open_in(&dir) == 1).await;
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the file has no name");
        assert_eq!(up.hits(), hits, "nothing reaches the instance before the body is whole");
        s.write_all(&frame(rest)).await.unwrap();
        if chunked {
            s.write_all(b"0\r\n\r\n").await.unwrap();
        }
        let reply = read_response(&mut s).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.head);
        assert_eq!(String::from_utf8_lossy(&reply.body), expected, "chunked: {chunked}");
        // The file is closed with the request (and was never named).
        wait_until("the file to be closed", || open_in(&dir) == 0).await;
    }
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // A small body: in memory, no file.
    let reply = Client::new(p.addr).send(request("POST", "/small", "hello")).await.unwrap();
    assert_eq!(reply.text(), format!("5 {:016x} cl=5 te=-", fnv(b"hello")));
    assert_eq!(open_in(&dir), 0);
    p.stop().await;
}

#[tokio::test]
async fn a_buffered_body_is_retried_when_its_instance_closed_on_it() {
    // The instance that closes without answering gets the first request
    // (round robin starts at it) and a retry goes to the other.
    let closer = Closer::start().await;
    let up = Upstream::with_handler("a", checksum_handler()).await;
    let p = Running::start(ProxyConfig { body_memory_bytes: 16 * 1024, ..config() }).await;
    p.proxy.set_default_route(route());
    p.add(1, closer.addr, lazy_check(), InitialHealth::AssumeHealthy);
    p.add(2, up.addr, lazy_check(), InitialHealth::AssumeHealthy);
    let mut client = Client::new(p.addr);
    for len in [100, 200 * 1024] {
        let body = pattern(len);
        for _ in 0..2 {
            // A PUT, in memory or in a file, is sent again.
            let reply = client.send(request("PUT", "/file", body.clone())).await.unwrap();
            assert_eq!(reply.status, 200, "{len}: {}", reply.text());
            assert_eq!(reply.text(), format!("{len} {:016x} cl={len} te=-", fnv(&body)));
        }
    }
    assert!(closer.hits() >= 2, "the closing instance was tried");
    p.stop().await;
}

#[tokio::test]
async fn a_chunk_size_over_the_limit_is_answered_413_at_once() {
    logs::capture();
    let up = Upstream::start("a").await;
    // Nothing but the size check can answer: no gap timeout, no rate.
    let config = ProxyConfig {
        max_body_bytes: 1000,
        body_timeout: Duration::from_secs(120),
        min_upload_rate: 0,
        unbuffered_paths: vec!["/stream/".into()],
        ..config()
    };
    let p = Running::start(config).await;
    p.proxy.set_default_route(route());
    p.add(1, up.addr, lazy_check(), InitialHealth::AssumeHealthy);
    let cases: [(&str, &str, &str); 4] = [
        ("with the head", "/up", "ffff\r\n"),
        ("after the head", "/up", ""),
        ("after a chunk within the limit", "/up", "100\r\n"),
        ("streamed, with the head", "/stream/up", "ffff\r\n"),
    ];
    for (what, path, first) in cases {
        let mut s = connect_own_port(p.addr).await;
        let client = s.local_addr().unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n{first}");
        s.write_all(head.as_bytes()).await.unwrap();
        match what {
            "after the head" => s.write_all(b"ffff\r\n").await.unwrap(),
            "after a chunk within the limit" => {
                // 256 bytes, then a chunk of 768 declared: 1024 > 1000.
                s.write_all(&[b'x'; 256]).await.unwrap();
                s.write_all(b"\r\n300\r\n").await.unwrap();
            }
            _ => {}
        }
        // The data of the big chunk never comes: answered from its size.
        let reply = read_response(&mut s).await.unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(reply.status, 413, "{what}: {}", reply.head);
        assert_eq!(reply.header("connection").as_deref(), Some("close"), "{what}");
        assert!(closes(&mut s, Duration::from_secs(5)).await, "{what}");
        wait_until("the rejection to be logged", || !logs::for_client(client).is_empty()).await;
        let lines = logs::for_client(client);
        assert!(lines.iter().any(|l| l.contains("status=413") && l.contains("max_body_bytes")), "{what}: {lines:?}");
    }
    assert_eq!(up.hits(), 0, "no request reached the instance");
    p.stop().await;
}

/// An instance that records whether the client had finished sending when
/// the first bytes of its body arrived, and signals them.
struct Watch {
    finished: Arc<AtomicBool>,
    first_bytes: Arc<tokio::sync::Notify>,
    client_had_finished: Arc<Mutex<Vec<bool>>>,
}

fn watching_handler(w: &Watch) -> Handler {
    let (finished, first_bytes, record) =
        (Arc::clone(&w.finished), Arc::clone(&w.first_bytes), Arc::clone(&w.client_had_finished));
    Arc::new(move |req, _state| {
        let (finished, first_bytes, record) = (Arc::clone(&finished), Arc::clone(&first_bytes), Arc::clone(&record));
        Box::pin(async move {
            let mut body = req.into_body();
            let mut n = 0;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return text(500, "body error") };
                if let Some(data) = frame.data_ref() {
                    if n == 0 && !data.is_empty() {
                        record.lock().unwrap().push(finished.load(Ordering::SeqCst));
                        first_bytes.notify_one();
                    }
                    n += data.len();
                }
            }
            text(200, format!("got {n} bytes"))
        })
    })
}

#[tokio::test]
async fn unbuffered_paths_stream_and_others_wait_for_the_whole_body() {
    let w = Watch {
        finished: Arc::new(AtomicBool::new(false)),
        first_bytes: Arc::new(tokio::sync::Notify::new()),
        client_had_finished: Arc::new(Mutex::new(Vec::new())),
    };
    let up = Upstream::with_handler("a", watching_handler(&w)).await;
    let p = Running::start(ProxyConfig { unbuffered_paths: vec!["/upload/".into()], ..config() }).await;
    p.proxy.set_default_route(route());
    p.add(1, up.addr, lazy_check(), InitialHealth::AssumeHealthy);

    // Streamed: the instance sees the first bytes before the client sent
    // the rest (which it sends only then).
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /upload/big HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\n\r\nhello").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.first_bytes.notified())
        .await
        .expect("the instance got the first bytes of a streamed body");
    w.finished.store(true, Ordering::SeqCst);
    s.write_all(b"world").await.unwrap();
    let reply = read_response(&mut s).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&reply.body), "got 10 bytes");

    // Buffered: the instance gets nothing before the whole body is read,
    // however long the client takes between its parts.
    w.finished.store(false, Ordering::SeqCst);
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /uploads HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\n\r\nhello").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.finished.store(true, Ordering::SeqCst);
    s.write_all(b"world").await.unwrap();
    let reply = read_response(&mut s).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&reply.body), "got 10 bytes");
    assert_eq!(*w.client_had_finished.lock().unwrap(), [false, true]);
    p.stop().await;
}

#[tokio::test]
async fn the_minimum_rate_also_ends_a_drip_on_an_unbuffered_path() {
    logs::capture();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a, task) = sync_instance(Arc::clone(&seen)).await;
    let config = ProxyConfig {
        unbuffered_paths: vec!["/upload/".into()],
        upload_rate_window: Duration::from_secs(1),
        ..config()
    };
    let p = Running::start(config).await;
    p.proxy.set_default_route(route());
    p.add(1, a, lazy_check(), InitialHealth::AssumeHealthy);
    let (got, _) = drip(p.addr, "POST /upload/x HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100\r\n\r\n").await;
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
    // The instance's worker is free again: the next request is served.
    let reply = tokio::time::timeout(Duration::from_secs(10), get(p.addr, "/after")).await.unwrap();
    assert_eq!(reply.status, 200);
    task.abort();
    p.stop().await;
}

#[tokio::test]
async fn http2_bodies_are_read_whole_too_and_sent_with_a_length() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = Upstream::with_handler("a", checksum_handler()).await;
    let p = Running::start(ProxyConfig { body_memory_bytes: 16 * 1024, ..config() }).await;
    p.proxy.set_default_route(route());
    p.add(1, up.addr, lazy_check(), InitialHealth::AssumeHealthy);
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    for len in [10, 300 * 1024] {
        let body = pattern(len);
        // A body of unknown length (no content-length), in pieces.
        let (tx, stream) = channel_body(None);
        let req = http::Request::builder().method("POST").uri("http://app.test/h2").body(stream).unwrap();
        let pieces: Vec<bytes::Bytes> = body.chunks(7000).map(bytes::Bytes::copy_from_slice).collect();
        tokio::spawn(async move {
            for piece in pieces {
                tx.send(piece).await.unwrap();
            }
        });
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(String::from_utf8_lossy(&got), format!("{len} {:016x} cl={len} te=-", fnv(&body)));
    }
    p.stop().await;
}

#[tokio::test]
async fn a_temporary_file_that_cannot_be_made_is_a_500_and_a_warning() {
    logs::capture();
    let up = Upstream::with_handler("a", checksum_handler()).await;
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let config = ProxyConfig { body_memory_bytes: 1024, body_buffer_dir: Some(file.join("bodies")), ..config() };
    let p = Running::start(config).await;
    p.proxy.set_default_route(route());
    p.add(1, up.addr, lazy_check(), InitialHealth::AssumeHealthy);
    let body = "x".repeat(4096);
    let head = format!("POST /big HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let (reply, client, _s) = raw_request(p.addr, head.as_bytes()).await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 500, "{}", reply.head);
    assert_eq!(reply.header("connection").as_deref(), Some("close"));
    wait_until("the failure to be logged", || !logs::for_client(client).is_empty()).await;
    let lines = logs::for_client(client);
    assert!(lines.iter().any(|l| l.contains("WARN") && l.contains("temporary file")), "{lines:?}");
    assert_eq!(up.hits(), 0);
    // A body that fits in memory needs no file.
    let reply = Client::new(p.addr).send(request("POST", "/small", "hello")).await.unwrap();
    assert_eq!(reply.status, 200);
    p.stop().await;
}
