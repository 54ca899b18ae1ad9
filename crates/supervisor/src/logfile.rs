//! The log file format and its writer.
//!
//! One line per output line:
//! `2026-11-22T01:02:03.456789Z out <text>` (`out`, `err`, or `sys` for
//! the monitor's own notes such as "process exited with code 3").
//! Timestamps are UTC with microseconds and fixed width, so they sort as
//! text. Lines longer than [`MAX_LINE`] bytes are split.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

/// Longest text of one log line; longer output lines are split.
pub const MAX_LINE: usize = 16 * 1024;

pub use nonstop_core::logline::{format_ts, parse_line, Stream, TS_LEN};

/// Now, formatted as in the log files.
pub fn timestamp_now() -> String {
    format_ts(OffsetDateTime::now_utc())
}

/// Turns a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Feed bytes; `emit` gets each complete line (without the newline).
    pub fn push(&mut self, data: &[u8], mut emit: impl FnMut(&[u8])) {
        self.buf.extend_from_slice(data);
        let mut start = 0;
        loop {
            let pending = &self.buf[start..];
            if let Some(nl) = pending.iter().position(|&c| c == b'\n') {
                if nl <= MAX_LINE {
                    emit(strip_cr(&pending[..nl]));
                    start += nl + 1;
                    continue;
                }
            }
            if pending.len() > MAX_LINE {
                let cut = char_boundary(pending, MAX_LINE);
                emit(&pending[..cut]);
                start += cut;
                continue;
            }
            break;
        }
        self.buf.drain(..start);
    }

    /// End of stream: emit what is left as a last line.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.push(&rest, &mut emit);
            if !self.buf.is_empty() {
                emit(strip_cr(&self.buf));
                self.buf.clear();
            }
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The largest cut `<= max` that does not split a UTF-8 sequence (when the
/// input is UTF-8 at all).
fn char_boundary(bytes: &[u8], max: usize) -> usize {
    let mut cut = max.min(bytes.len());
    for _ in 0..3 {
        if cut > 0 && cut < bytes.len() && (bytes[cut] & 0b1100_0000) == 0b1000_0000 {
            cut -= 1;
        } else {
            break;
        }
    }
    if cut == 0 {
        max.min(bytes.len())
    } else {
        cut
    }
}

/// Appends formatted lines to a log file and rotates it by size:
/// `x.log` → `x.log.1` → ... → `x.log.<keep>` (the oldest is deleted).
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl LogWriter {
    /// Open (append to) `path`, creating its directory.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<LogWriter> {
        if let Some(dir) = path.parent() {
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700).create(dir)?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(64 * 1024, file),
            size,
            max_bytes: max_bytes.max(1),
            keep,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write one line (text without newline) stamped with the current time.
    pub fn write_line(&mut self, stream: Stream, text: &[u8]) -> io::Result<()> {
        let mut line = String::with_capacity(TS_LEN + 6 + text.len());
        line.push_str(&timestamp_now());
        line.push(' ');
        line.push_str(stream.as_str());
        line.push(' ');
        line.push_str(&String::from_utf8_lossy(text));
        line.push('\n');
        let len = line.len() as u64;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        self.out.write_all(line.as_bytes())?;
        self.size += len;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        let numbered = |i: u32| {
            let mut name = self.path.as_os_str().to_owned();
            name.push(format!(".{i}"));
            PathBuf::from(name)
        };
        if self.keep == 0 {
            remove_if_exists(&self.path)?;
        } else {
            remove_if_exists(&numbered(self.keep))?;
            for i in (1..self.keep).rev() {
                match std::fs::rename(numbered(i), numbered(i + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.out = BufWriter::with_capacity(64 * 1024, open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// Created 0600; never through a symbolic link (ELOOP), so a link planted
/// in the state directory cannot make the monitor append to another file.
fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(nix::libc::O_NOFOLLOW).open(path)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(l.to_vec()));
        }
        s.finish(|l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn splits_lines_across_chunks() {
        let out = split(&[b"hel", b"lo\nwor", b"ld\r\n\nlast"]);
        assert_eq!(out, vec![b"hello".to_vec(), b"world".to_vec(), b"".to_vec(), b"last".to_vec()]);
    }

    #[test]
    fn splits_long_lines_on_char_boundaries() {
        let long = "é".repeat(MAX_LINE); // 2 bytes each
        let input = format!("{long}\n");
        let out = split(&[input.as_bytes()]);
        assert!(out.len() >= 2);
        assert!(out.iter().all(|l| l.len() <= MAX_LINE));
        let joined: Vec<u8> = out.concat();
        assert_eq!(joined, long.as_bytes());
        assert!(out.iter().all(|l| std::str::from_utf8(l).is_ok()));
    }

    #[test]
    fn formats_and_parses_lines() {
        let ts = timestamp_now();
        assert_eq!(ts.len(), TS_LEN, "{ts}");
        let line = format!("{ts} err hello world");
        assert_eq!(parse_line(&line), Some((ts.as_str(), Stream::Err, "hello world")));
        assert_eq!(parse_line(&format!("{ts} out ")), Some((ts.as_str(), Stream::Out, "")));
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/web.1.1.log");
        let mut w = LogWriter::open(&path, 200, 2).unwrap();
        for i in 0..40 {
            w.write_line(Stream::Out, format!("line {i}").as_bytes()).unwrap();
        }
        w.flush().unwrap();
        for p in [path.clone(), dir.path().join("a/web.1.1.log.1"), dir.path().join("a/web.1.1.log.2")] {
            let len = std::fs::metadata(&p).unwrap().len();
            assert!(len > 0 && len <= 200, "{} is {len} bytes", p.display());
        }
        assert!(!dir.path().join("a/web.1.1.log.3").exists());
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.trim_end().ends_with("out line 39"), "{last}");
    }
}
