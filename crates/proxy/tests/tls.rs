//! TLS termination against real TLS clients (rustls): certificates by
//! SNI with a default, h2 by ALPN, reloads when the files change, clear
//! errors for bad files, and plain HTTP redirected to HTTPS.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nonstop_core::traffic::{InitialHealth, Traffic};
use nonstop_proxy::{Proxy, ProxyConfig, TlsCert, TlsError, TlsSettings};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

// ------------------------------------------------------------- certificates

struct Pair {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn pair(hosts: &[&str]) -> Pair {
    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let c = rcgen::generate_simple_self_signed(names).unwrap();
    Pair { cert_pem: c.cert.pem(), key_pem: c.key_pair.serialize_pem(), der: c.cert.der().to_vec() }
}

/// Writes a pair as `NAME.pem` and `NAME.key` in `dir`.
fn write_pair(dir: &Path, name: &str, p: &Pair) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &p.cert_pem).unwrap();
    std::fs::write(&key, &p.key_pem).unwrap();
    (cert, key)
}

fn settings(certs: Vec<TlsCert>, https_port: u16) -> TlsSettings {
    TlsSettings { certs, redirect_http: true, https_port, reload_interval: Duration::from_millis(50) }
}

// ------------------------------------------------------------------ client

/// Accepts any certificate: the tests look at which one was served.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

struct Tls {
    stream: TlsStream<TcpStream>,
    /// The leaf certificate the server presented.
    cert: Vec<u8>,
    alpn: Option<Vec<u8>>,
}

async fn connect(addr: SocketAddr, sni: Option<&str>, alpn: &[&[u8]]) -> Tls {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_sni = sni.is_some();
    let name = ServerName::try_from(sni.unwrap_or("no-sni.invalid").to_string()).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    let (_, conn) = stream.get_ref();
    let cert = conn.peer_certificates().unwrap()[0].to_vec();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    Tls { stream, cert, alpn }
}

/// One HTTP/1.1 request over a TLS stream.
async fn get_h1(tls: Tls, host: &str, path: &str) -> (StatusCode, String) {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls.stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder().uri(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

// ---------------------------------------------------------------- fixture

/// Answers with the request's version and its forwarded-proto header.
fn echo_handler() -> Handler {
    Arc::new(|req, _state| {
        Box::pin(async move {
            let proto =
                req.headers().get("x-forwarded-proto").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            let host = req.headers().get("host").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            text(200, format!("{:?} proto={proto} host={host} path={}", req.version(), req.uri()))
        })
    })
}

struct Both {
    proxy: Proxy,
    http: SocketAddr,
    https: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    _up: Upstream,
}

impl Both {
    /// A proxy serving plain HTTP and HTTPS, TLS configured by `configure`.
    async fn start(configure: impl FnOnce(&Proxy, u16)) -> Both {
        logs::capture();
        let up = Upstream::with_handler("up", echo_handler()).await;
        let proxy = Proxy::new(config());
        proxy.set_default_route(route());
        proxy.add(
            &route(),
            nonstop_core::traffic::Backend { instance: instance(1), addr: up.addr },
            lazy_check(),
            InitialHealth::AssumeHealthy,
        );
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (http, https) = (http_listener.local_addr().unwrap(), https_listener.local_addr().unwrap());
        configure(&proxy, https.port());
        let shutdown = CancellationToken::new();
        let tasks = vec![
            tokio::spawn({
                let (p, s) = (proxy.clone(), shutdown.clone());
                async move { p.serve(http_listener, s).await }
            }),
            tokio::spawn({
                let (p, s) = (proxy.clone(), shutdown.clone());
                async move { p.serve_tls(https_listener, s).await }
            }),
        ];
        Both { proxy, http, https, shutdown, tasks, _up: up }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(10), t).await.expect("serve returns").unwrap().unwrap();
        }
        self.proxy.close().await;
    }
}

// ------------------------------------------------------------------- tests

#[tokio::test]
async fn certificates_by_sni_with_the_first_as_default() {
    let dir = tempfile::tempdir().unwrap();
    let a = pair(&["example.test", "*.example.test"]);
    let b = pair(&["other.test"]);
    let (a_cert, a_key) = write_pair(dir.path(), "a", &a);
    let (b_cert, b_key) = write_pair(dir.path(), "b", &b);
    let both = Both::start(|proxy, port| {
        proxy
            .configure_tls(&settings(
                vec![
                    TlsCert { hosts: vec!["example.test".into(), "*.Example.test".into()], cert: a_cert, key: a_key },
                    TlsCert { hosts: vec!["other.test".into()], cert: b_cert, key: b_key },
                ],
                port,
            ))
            .unwrap()
    })
    .await;
    for (sni, expected) in [
        (Some("example.test"), &a.der),
        (Some("www.example.test"), &a.der),
        (Some("OTHER.test"), &b.der),
        (Some("unknown.test"), &a.der),
        (Some("deeper.www.example.test"), &a.der),
        (None, &a.der),
    ] {
        let tls = connect(both.https, sni, &[b"http/1.1"]).await;
        assert!(tls.cert == *expected, "SNI {sni:?}: wrong certificate");
        assert_eq!(tls.alpn.as_deref(), Some(&b"http/1.1"[..]));
        let (status, body) = get_h1(tls, sni.unwrap_or("example.test"), "/hello?x=1").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("HTTP/1.1 proto=https"), "{body}");
        assert!(body.ends_with("path=/hello?x=1"), "{body}");
    }
    let status = both.proxy.tls_status().unwrap();
    assert_eq!(status.certificates.len(), 2);
    assert_eq!(status.certificates[0].hosts, ["example.test", "*.example.test"]);
    both.stop().await;
}

#[tokio::test]
async fn h2_over_tls_by_alpn_reaches_http1_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let a = pair(&["example.test"]);
    let (cert, key) = write_pair(dir.path(), "a", &a);
    let both = Both::start(|proxy, port| {
        proxy.configure_tls(&settings(vec![TlsCert { hosts: vec!["example.test".into()], cert, key }], port)).unwrap()
    })
    .await;
    let tls = connect(both.https, Some("example.test"), &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.alpn.as_deref(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls.stream)).await.unwrap();
    tokio::spawn(conn);
    let mut replies = Vec::new();
    for i in 0..8 {
        let mut send = send.clone();
        replies.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri(format!("https://example.test/stream/{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&body).into_owned()
        }));
    }
    for (i, r) in replies.into_iter().enumerate() {
        let body = r.await.unwrap();
        assert_eq!(body, format!("HTTP/1.1 proto=https host=example.test path=/stream/{i}"));
    }
    both.stop().await;
}

#[tokio::test]
async fn certificates_reload_when_their_files_change_and_bad_files_keep_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let first = pair(&["example.test"]);
    let (cert, key) = write_pair(dir.path(), "site", &first);
    let both = Both::start(|proxy, port| {
        proxy
            .configure_tls(&settings(
                vec![TlsCert { hosts: vec!["example.test".into()], cert: cert.clone(), key: key.clone() }],
                port,
            ))
            .unwrap()
    })
    .await;
    let served = || async { connect(both.https, Some("example.test"), &[]).await.cert };
    assert!(served().await == first.der);

    // Renewed: served from the next handshake on, no restart.
    let second = pair(&["example.test"]);
    write_pair(dir.path(), "site", &second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while served().await != second.der {
        assert!(tokio::time::Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reloads = |p: &Proxy| p.tls_status().unwrap().certificates[0].reloads;
    let error = |p: &Proxy| p.tls_status().unwrap().certificates[0].last_error.clone();
    assert!(reloads(&both.proxy) >= 1);
    assert_eq!(error(&both.proxy), None);

    // Broken: logged, the previous certificate stays.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    wait_until("the bad file to be noticed", || error(&both.proxy).is_some()).await;
    let e = error(&both.proxy).unwrap();
    assert!(e.contains(&cert.display().to_string()), "{e}");
    assert!(e.contains("no PEM certificate"), "{e}");
    assert!(served().await == second.der);
    assert!(!logs::lines_with("TLS certificate not reloaded").is_empty());

    // A certificate whose key is another: refused as well.
    let third = pair(&["example.test"]);
    std::fs::write(&cert, &third.cert_pem).unwrap();
    wait_until("the mismatch to be noticed", || {
        error(&both.proxy).is_some_and(|e| e.contains("is not the private key"))
    })
    .await;
    assert!(served().await == second.der);

    // Fixed: served.
    std::fs::write(&key, &third.key_pem).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while served().await != third.der {
        assert!(tokio::time::Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(error(&both.proxy), None);
    both.stop().await;
}

#[tokio::test]
async fn invalid_tls_files_are_clear_errors_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let good = pair(&["example.test"]);
    let other = pair(&["example.test"]);
    let (cert, key) = write_pair(dir.path(), "good", &good);
    let (other_cert, _) = write_pair(dir.path(), "other", &other);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let proxy = Proxy::new(ProxyConfig::default());
    let one = |cert: &Path, key: &Path| {
        settings(
            vec![TlsCert { hosts: vec!["example.test".into()], cert: cert.to_path_buf(), key: key.to_path_buf() }],
            443,
        )
    };
    let cases: Vec<(TlsSettings, &Path, &str)> = vec![
        (one(&missing, &key), &missing, "cannot read"),
        (one(&garbage, &key), &garbage, "no PEM certificate"),
        (one(&cert, &garbage), &garbage, "no PEM private key"),
        (one(&cert, &cert), &cert, "no PEM private key"),
        (one(&other_cert, &key), &key, "is not the private key of the certificate in"),
    ];
    for (settings, file, message) in cases {
        let err = proxy.configure_tls(&settings).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&file.display().to_string()), "{text}");
        assert!(text.contains(message), "{text}");
        assert!(proxy.tls_status().is_none(), "nothing changed");
    }
    let mut two = one(&cert, &key);
    two.certs.push(two.certs[0].clone());
    assert!(matches!(proxy.configure_tls(&two), Err(TlsError::DuplicateHost { .. })));
    let mut bad_host = one(&cert, &key);
    bad_host.certs[0].hosts = vec!["example.test:443".into()];
    assert!(matches!(proxy.configure_tls(&bad_host), Err(TlsError::InvalidHost { .. })));

    // A good configuration, then a bad one: the good one stays.
    proxy.configure_tls(&one(&cert, &key)).unwrap();
    assert!(proxy.configure_tls(&one(&garbage, &key)).is_err());
    assert_eq!(proxy.tls_status().unwrap().certificates[0].cert, cert, "the previous configuration is kept");
    proxy.close().await;
}

#[tokio::test]
async fn plain_http_is_redirected_to_https_where_tls_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let a = pair(&["example.test", "*.example.test"]);
    let (cert, key) = write_pair(dir.path(), "a", &a);
    let tls_settings = |port| {
        settings(
            vec![TlsCert {
                hosts: vec!["example.test".into(), "*.example.test".into()],
                cert: cert.clone(),
                key: key.clone(),
            }],
            port,
        )
    };
    let https_port = std::cell::Cell::new(0);
    let both = Both::start(|proxy, port| {
        https_port.set(port);
        proxy.configure_tls(&tls_settings(port)).unwrap()
    })
    .await;
    let port = https_port.get();
    for (host, path, location) in [
        ("example.test", "/a/b?c=1", format!("https://example.test:{port}/a/b?c=1")),
        ("WWW.example.test:8080", "/", format!("https://WWW.example.test:{port}/")),
    ] {
        let (reply, _, _) = raw_request(
            both.http,
            format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .await;
        let reply = reply.unwrap();
        assert_eq!(reply.status, 308, "{}", reply.head);
        assert_eq!(reply.header("location"), Some(location));
    }
    // Hosts without a certificate, and ACME challenges, are proxied.
    for (host, path) in [("plain.test", "/x"), ("example.test", "/.well-known/acme-challenge/token")] {
        let (reply, _, _) = raw_request(
            both.http,
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200, "{host}{path}: {}", reply.head);
        assert!(String::from_utf8_lossy(&reply.body).contains("proto=http "));
    }
    // Redirects off.
    let mut off = tls_settings(port);
    off.redirect_http = false;
    both.proxy.configure_tls(&off).unwrap();
    let (reply, _, _) =
        raw_request(both.http, b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(reply.unwrap().status, 200);
    both.stop().await;
}

#[tokio::test]
async fn a_silent_tls_client_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let a = pair(&["example.test"]);
    let (cert, key) = write_pair(dir.path(), "a", &a);
    logs::capture();
    let proxy = Proxy::new(ProxyConfig { header_read_timeout: Duration::from_millis(300), ..config() });
    proxy.configure_tls(&settings(vec![TlsCert { hosts: vec!["example.test".into()], cert, key }], 443)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let serve = tokio::spawn({
        let (p, s) = (proxy.clone(), shutdown.clone());
        async move { p.serve_tls(listener, s).await }
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    let client = s.local_addr().unwrap();
    let started = std::time::Instant::now();
    assert!(closes(&mut s, Duration::from_secs(5)).await);
    assert!(started.elapsed() >= Duration::from_millis(250));
    wait_until("the timeout to be logged", || {
        // Counted into the rate-limited line (the first is logged at once).
        logs::for_client(client).iter().any(|l| l.contains("(or TLS handshake) within header_timeout"))
    })
    .await;
    shutdown.cancel();
    serve.await.unwrap().unwrap();
    proxy.close().await;
}
