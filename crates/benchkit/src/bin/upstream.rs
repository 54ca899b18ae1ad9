//! `nonstop-bench-upstream`: the upstream of `bench/proxy`, as fast as hyper
//! allows so that the proxies in front of it are what is measured.
//!
//! HTTP/1.1 with keep-alive on `127.0.0.1:PORT` (`--port`, else `$PORT`):
//! - `/64k` answers 200 with a body of 65,536 bytes;
//! - any other path answers 200 with a small body (`ok\n`).
//!
//! Bodies are built once and shared (`Bytes`): no allocation per response
//! for the body, no logging, TCP_NODELAY on every connection. One thread by
//! default (`--threads`): several instances run side by side on a small
//! machine, next to the proxy and the load generator.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const SMALL: &[u8] = b"ok\n";
const LARGE_LEN: usize = 64 * 1024;

#[derive(Parser, Debug)]
#[command(
    name = "nonstop-bench-upstream",
    about = "Fast HTTP/1.1 upstream for bench/proxy: / (small body) and /64k (64 KiB)"
)]
struct Args {
    /// Port on 127.0.0.1 (default: $PORT).
    #[arg(long, env = "PORT")]
    port: u16,
    /// Runtime worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()?
    };
    runtime.block_on(serve(SocketAddr::from(([127, 0, 0, 1], args.port))))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let small = Bytes::from_static(SMALL);
    let large = Bytes::from(vec![b'x'; LARGE_LEN]);
    let text = HeaderValue::from_static("text/plain");
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("accept failed: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (small, large, text) = (small.clone(), large.clone(), text.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let body = if req.uri().path() == "/64k" { large.clone() } else { small.clone() };
                let mut resp = Response::new(Full::new(body));
                resp.headers_mut().insert(header::CONTENT_TYPE, text.clone());
                std::future::ready(Ok::<_, Infallible>(resp))
            });
            let _ = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// SIGTERM (nonstop's stop signal) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
