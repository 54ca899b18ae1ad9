//! Request bodies read whole before an instance is chosen (as nginx does):
//! a client that sends its body slowly then holds only a proxy connection,
//! never one of the app's workers (a gunicorn sync worker serves one
//! connection at a time).
//!
//! Up to `ProxyConfig::body_memory_bytes` a body stays in memory: one
//! buffer, or none when it came in one piece (hyper's own buffer is kept).
//! Past that it goes to a temporary file in `ProxyConfig::body_buffer_dir`
//! (made 0700 if missing), unlinked from the start (`tempfile`: O_TMPFILE),
//! so nothing is left behind whatever happens to the proxy; it is closed
//! when the request and its replay are dropped.
//!
//! The file is read and written with plain system calls from the
//! connection's task, as nginx does without its thread pools: the file was
//! just written, so its pages are in the page cache, and a task switch to
//! a blocking pool per piece would cost more than the copy.

use crate::body::{BodyError, ClientBody};
use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A request body read whole.
#[derive(Debug, Clone)]
pub(crate) enum Buffered {
    /// In memory (maybe empty).
    Memory(Bytes),
    /// In an unlinked temporary file.
    File(Arc<Spill>),
}

/// A body spilled to an unlinked temporary file.
#[derive(Debug)]
pub(crate) struct Spill {
    file: File,
    len: u64,
}

impl Spill {
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Reads the file from `offset` into `buf` (all of it, or up to the end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(done)
    }
}

/// Where bodies are spilled when the configuration names no directory.
pub(crate) fn default_dir() -> PathBuf {
    std::env::temp_dir()
}

/// An unlinked temporary file in `dir`, which is made (0700) if missing.
fn create(dir: &Path) -> io::Result<File> {
    match tempfile::tempfile_in(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            tempfile::tempfile_in(dir)
        }
        other => other,
    }
}

/// Reads `body` to its end: in memory up to `memory` bytes, else into a
/// temporary file in `dir()` (asked only then). The body's own limits
/// (size, gap timeout, minimum rate) apply while it is read.
pub(crate) async fn read_whole<D: AsRef<Path>>(
    body: &mut ClientBody,
    memory: usize,
    dir: impl FnOnce() -> D,
) -> Result<Buffered, BodyError> {
    let mut dir = Some(dir);
    // The first piece as hyper gave it: a body that comes in one piece
    // costs no buffer of ours.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut spill: Option<(File, u64)> = None;
    while let Some(frame) = body.frame().await {
        // Trailers (of a chunked body) are dropped.
        let Ok(data) = frame?.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        if let Some((file, len)) = spill.as_mut() {
            file.write_all(&data).map_err(BodyError::Spill)?;
            *len += data.len() as u64;
            continue;
        }
        let held = first.as_ref().map_or(0, Bytes::len) + buf.len();
        if held + data.len() > memory {
            let dir = dir.take().map(|dir| dir()).ok_or_else(|| BodyError::Spill(io::Error::other("spilled twice")))?;
            let mut file = create(dir.as_ref()).map_err(BodyError::Spill)?;
            for piece in [first.take().unwrap_or_default().as_ref(), &buf[..], &data[..]] {
                file.write_all(piece).map_err(BodyError::Spill)?;
            }
            buf = BytesMut::new();
            spill = Some((file, (held + data.len()) as u64));
            continue;
        }
        if first.is_none() && buf.is_empty() {
            first = Some(data);
            continue;
        }
        if let Some(piece) = first.take() {
            // One buffer for the whole body when its length is known.
            let rest = body.size_hint().exact().unwrap_or(0).min(memory as u64) as usize;
            buf.reserve((held + data.len() + rest).min(memory));
            buf.extend_from_slice(&piece);
        }
        buf.extend_from_slice(&data);
    }
    Ok(match spill {
        Some((file, len)) => Buffered::File(Arc::new(Spill { file, len })),
        None => Buffered::Memory(first.unwrap_or_else(|| buf.freeze())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a").join("bodies");
        let mut file = create(&dir).unwrap();
        file.write_all(b"hello").unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the file is unlinked");
        let spill = Spill { file, len: 5 };
        let mut buf = [0u8; 8];
        assert_eq!(spill.read_at(&mut buf, 1).unwrap(), 4);
        assert_eq!(&buf[..4], b"ello");
    }
}
