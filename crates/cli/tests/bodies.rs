//! Request bodies end to end: the real daemon's proxy reads a body whole
//! before it picks an instance (into `$NONSTOP_HOME/bodies` past
//! `body_memory_bytes`) and sends it with a `Content-Length`, so an app
//! that only reads `Content-Length` bodies (the example's
//! `BaseHTTPRequestHandler`, like a WSGI server without chunked support)
//! gets a chunked upload whole.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

/// Sends `head` and `body` on one connection and reads the answer to its end.
fn exchange(addr: SocketAddr, head: &str, body: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn uploads_reach_the_app_whole_with_a_length_through_a_private_body_directory() {
    let app = TestApp::hello();
    app.up().ok();
    let len = 300 * 1024;
    // Content-Length: past 64 KiB, through a temporary file.
    let head = format!("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
    let got = exchange(app.proxy(), &head, &vec![b'a'; len]);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains(&format!("got {len} bytes on web.")), "{got}");
    // Chunked: the app reads Content-Length only, and gets it all.
    let mut chunked = Vec::new();
    for piece in vec![b'b'; len].chunks(10_000) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let got = exchange(app.proxy(), head, &chunked);
    assert!(got.contains(&format!("got {len} bytes on web.")), "{got}");
    // The daemon's body directory: private, and nothing left in it.
    let dir = app.home.path().join("bodies");
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}
