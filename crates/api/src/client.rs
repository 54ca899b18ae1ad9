//! The API client the CLI uses: HTTP/1.1 over the daemon's unix socket.

use crate::wire::*;
use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nonstop_engine::{OpReport, Progress};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the nonstop daemon is not running (no answer on {socket}); start it with `nonstop up` in the app directory"
    )]
    NotRunning { socket: PathBuf },
    #[error("{}", .0.message)]
    Api(ApiError),
    #[error("unexpected answer from the daemon: {0}; are the CLI and the daemon the same version? (`nonstop down`, then `nonstop up`)")]
    Protocol(String),
    /// The connection broke before the answer was complete: the daemon
    /// stopped or died (not a version mismatch).
    #[error(
        "the daemon stopped answering ({0}): it stopped or crashed (see daemon.log in NONSTOP_HOME); `nonstop daemon` \
         starts a new one within seconds and it re-adopts the app: check with `nonstop status`"
    )]
    Disconnected(String),
    /// Connected, but no answer in time (a daemon being started again).
    #[error(
        "the daemon did not answer on {socket} within {secs}s: it may be starting again after a crash (see daemon.log \
         in NONSTOP_HOME); try again in a moment"
    )]
    NoAnswer { socket: PathBuf, secs: u64 },
}

impl ClientError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::NotRunning { .. } => 3,
            ClientError::Api(e) => e.exit_code,
            ClientError::Protocol(_) | ClientError::Disconnected(_) => 1,
            ClientError::NoAnswer { .. } => 3,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    /// `?app=…&env=…` added to every request: the app and environment it
    /// is about (either may be left to the daemon).
    scope: String,
}

/// A streamed response body, read line by line.
pub struct Lines {
    body: hyper::body::Incoming,
    buf: BytesMut,
}

impl Lines {
    /// The next complete line, or `None` at the end.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                return Ok(Some(line.freeze().slice(..pos)));
            }
            match self.body.frame().await {
                None => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let rest = std::mem::take(&mut self.buf);
                    return Ok(Some(rest.freeze()));
                }
                Some(Err(e)) => return Err(ClientError::Disconnected(format!("stream broken: {e}"))),
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buf.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }

    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ClientError> {
        match self.next_line().await? {
            None => Ok(None),
            Some(line) => serde_json::from_slice(&line)
                .map(Some)
                .map_err(|e| ClientError::Protocol(format!("bad line {:?}: {e}", String::from_utf8_lossy(&line)))),
        }
    }
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), scope: String::new() }
    }

    /// Requests about `app` in `env` (`None`: the daemon's choice: the
    /// environment's one app, its default environment).
    pub fn scoped(mut self, app: Option<&str>, env: Option<&str>) -> Self {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(app) = app {
            q.append_pair("app", app);
        }
        if let Some(env) = env {
            q.append_pair("env", env);
        }
        self.scope = q.finish();
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let not_running = || ClientError::NotRunning { socket: self.socket.clone() };
        let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::UnixStream::connect(&self.socket))
            .await
            .map_err(|_| not_running())?
            .map_err(|_| not_running())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Disconnected(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let has_body = body.is_some();
        let path = match (self.scope.is_empty(), path.contains('?')) {
            (true, _) => path.to_string(),
            (false, false) => format!("{path}?{}", self.scope),
            (false, true) => format!("{path}&{}", self.scope),
        };
        let mut req = Request::builder().method(method).uri(path).header("host", "nonstop");
        if has_body {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        sender.send_request(req).await.map_err(|e| ClientError::Disconnected(e.to_string()))
    }

    async fn error_of(resp: http::Response<hyper::body::Incoming>) -> ClientError {
        let status = resp.status();
        match resp.into_body().collect().await {
            Ok(b) => match serde_json::from_slice::<ApiError>(&b.to_bytes()) {
                Ok(e) => ClientError::Api(e),
                Err(_) => ClientError::Protocol(format!("HTTP {status}")),
            },
            Err(e) => ClientError::Disconnected(e.to_string()),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.send(Method::GET, path, None).await?;
        if resp.status() != StatusCode::OK {
            return Err(Self::error_of(resp).await);
        }
        let body = resp.into_body().collect().await.map_err(|e| ClientError::Disconnected(e.to_string()))?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = self.send(Method::POST, path, Some(body)).await?;
        if !resp.status().is_success() {
            return Err(Self::error_of(resp).await);
        }
        let body = resp.into_body().collect().await.map_err(|e| ClientError::Disconnected(e.to_string()))?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// A streamed GET (logs).
    pub async fn stream(&self, path: &str) -> Result<Lines, ClientError> {
        let resp = self.send(Method::GET, path, None).await?;
        if resp.status() != StatusCode::OK {
            return Err(Self::error_of(resp).await);
        }
        Ok(Lines { body: resp.into_body(), buf: BytesMut::new() })
    }

    /// Run an operation; `on_progress` sees each progress line.
    pub async fn op<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<OpReport, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = self.send(Method::POST, path, Some(body)).await?;
        if resp.status() != StatusCode::OK {
            return Err(Self::error_of(resp).await);
        }
        let mut lines = Lines { body: resp.into_body(), buf: BytesMut::new() };
        while let Some(line) = lines.next::<OpLine>().await? {
            match line {
                OpLine::Progress(p) => on_progress(&p),
                OpLine::Result(r) => return Ok(r),
                OpLine::Error(e) => return Err(ClientError::Api(e)),
            }
        }
        Err(ClientError::Disconnected(
            "it closed the stream before the operation ended; the operation's outcome is in `nonstop history`".into(),
        ))
    }

    /// Whether a daemon answers; bounded, since the socket can accept
    /// while no daemon serves it yet (its keeper holds it during a restart).
    pub async fn ping(&self) -> Result<Ping, ClientError> {
        const PING_TIMEOUT: Duration = Duration::from_secs(10);
        match tokio::time::timeout(PING_TIMEOUT, self.get("/v1/ping")).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::NoAnswer { socket: self.socket.clone(), secs: PING_TIMEOUT.as_secs() }),
        }
    }
}
