//! HTTP/2 clients on the plain listener (h2c, prior knowledge), proxied to
//! HTTP/1.1 instances; limits and timeouts apply to them too.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nonstop_core::traffic::InitialHealth;
use nonstop_proxy::ProxyConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Answers with the version, Host and body length it got.
fn echo_handler() -> Handler {
    Arc::new(|req, _state| {
        Box::pin(async move {
            let version = req.version();
            let host = req.headers().get("host").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            let path = req.uri().to_string();
            match req.into_body().collect().await {
                Ok(b) => text(200, format!("{version:?} host={host} path={path} body={}", b.to_bytes().len())),
                Err(_) => text(500, "body error"),
            }
        })
    })
}

async fn h2c(addr: SocketAddr) -> (SendRequest<Full<Bytes>>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

fn req(method: &str, uri: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder().method(method).uri(uri).body(Full::new(body.into())).unwrap()
}

async fn send(
    send: &mut SendRequest<Full<Bytes>>,
    r: Request<Full<Bytes>>,
) -> Result<(StatusCode, String), hyper::Error> {
    let resp = send.send_request(r).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn proxy_with(config: ProxyConfig) -> (Running, Upstream) {
    logs::capture();
    let up = Upstream::with_handler("up", echo_handler()).await;
    let p = Running::start(config).await;
    p.proxy.set_default_route(route());
    p.add(1, up.addr, lazy_check(), InitialHealth::AssumeHealthy);
    (p, up)
}

#[tokio::test]
async fn h2c_with_prior_knowledge_reaches_http1_instances() {
    let (p, up) = proxy_with(config()).await;
    let (sender, driver) = h2c(p.addr).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let body = "x".repeat(i * 1000);
            send(&mut sender, req("POST", &format!("http://app.test/h2/{i}?q=1"), body)).await.unwrap()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("HTTP/1.1 host=app.test path=/h2/{i}?q=1 body={}", i * 1000));
    }
    assert_eq!(up.hits(), 16);
    // HTTP/1.1 still works on the same listener.
    assert_eq!(get(p.addr, "/h1").await.status, StatusCode::OK);
    drop(sender);
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    p.stop().await;
}

#[tokio::test]
async fn h2_requests_get_the_same_limits() {
    let (p, up) =
        proxy_with(ProxyConfig { max_headers: 20, max_body_bytes: 1000, max_request_line: 1024, ..config() }).await;
    let (mut sender, _driver) = h2c(p.addr).await;

    let mut many = req("GET", "http://app.test/", "");
    for i in 0..30 {
        many.headers_mut().insert(format!("x-h{i}").parse::<http::HeaderName>().unwrap(), "v".parse().unwrap());
    }
    assert_eq!(send(&mut sender, many).await.unwrap().0, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let long = format!("http://app.test/{}", "p".repeat(2000));
    assert_eq!(send(&mut sender, req("GET", &long, "")).await.unwrap().0, StatusCode::URI_TOO_LONG);
    // A body announced too large (HTTP/2 carries content-length).
    assert_eq!(
        send(&mut sender, req("POST", "http://app.test/up", "b".repeat(5000))).await.unwrap().0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(up.hits(), 0);

    // A streamed body (no length) that grows past the limit.
    let (tx, body) = channel_body(None);
    let streamed = Request::builder().method("POST").uri("http://app.test/stream").body(body).unwrap();
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut s2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let feeder = tokio::spawn(async move {
        for _ in 0..10 {
            if tx.send(Bytes::from(vec![b'c'; 300])).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Keep the stream open: the limit, not the end, must stop it.
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let outcome = tokio::time::timeout(Duration::from_secs(5), s2.send_request(streamed))
        .await
        .expect("an answer or a reset in time");
    match outcome {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE),
        Err(err) => assert!(err.is_canceled() || err.to_string().contains("stream"), "{err}"),
    }
    feeder.abort();

    // The connection itself still serves.
    let (status, body) = send(&mut sender, req("GET", "http://app.test/fine", "")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("HTTP/1.1 host=app.test"), "{body}");
    p.stop().await;
}

#[tokio::test]
async fn idle_h2_connections_close_after_idle_timeout() {
    let (p, _up) = proxy_with(ProxyConfig {
        idle_timeout: Duration::from_millis(600),
        header_read_timeout: Duration::from_millis(200),
        ..config()
    })
    .await;
    let (mut sender, driver) = h2c(p.addr).await;
    // Requests spaced wider than header_read_timeout: h2 frames between
    // requests are not a slow request head.
    for _ in 0..3 {
        let (status, _) = send(&mut sender, req("GET", "http://app.test/", "")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), driver).await.expect("the idle connection was closed").unwrap();
    assert!(idle_from.elapsed() >= Duration::from_millis(250));
    p.stop().await;
}

/// Write `chunks` one by one, a little apart, as a slow client would.
async fn trickle(stream: &mut TcpStream, chunks: &[&[u8]]) {
    use tokio::io::AsyncWriteExt;
    for chunk in chunks {
        stream.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test]
async fn the_protocol_is_told_apart_however_the_first_bytes_arrive() {
    use tokio::io::AsyncReadExt;
    let (p, _up) = proxy_with(config()).await;

    // The h2c preface in pieces, then an empty SETTINGS frame: the proxy
    // answers with its own SETTINGS frame (type 4), so it speaks HTTP/2.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let settings: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    trickle(&mut s, &[b"PRI * HTTP/2.0\r\n", b"\r\nSM", b"\r\n\r\n", settings]).await;
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut frame)).await.unwrap().unwrap();
    assert_eq!(frame[3], 4, "the first frame from the proxy is SETTINGS: {frame:?}");
    // (A client that does not answer the proxy's PING would hold up its
    // graceful shutdown until `shutdown_grace`.)
    drop(s);

    // HTTP/1 requests that begin like the preface, or arrive a byte at a
    // time, are HTTP/1.
    let post = b"POST /p HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n\r\nhi";
    let get = b"GET /g HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";
    let bytewise: Vec<&[u8]> = get.chunks(1).collect();
    for chunks in [vec![&post[..1], &post[1..3], &post[3..]], bytewise] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        trickle(&mut s, &chunks).await;
        let reply = read_response(&mut s).await.expect("an HTTP/1 answer");
        assert_eq!(reply.status, 200, "{:?}", String::from_utf8_lossy(&reply.body));
        assert!(String::from_utf8_lossy(&reply.body).starts_with("HTTP/1.1 "), "{:?}", reply.body);
    }

    // A client that leaves during the first bytes costs nothing more.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    trickle(&mut s, &[b"PRI * HT"]).await;
    drop(s);
    p.stop().await;
}
