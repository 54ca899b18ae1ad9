//! The store on disk, so history survives a daemon restart.
//!
//! **Format.** A compact binary file, `metrics.bin` in a directory the
//! caller gives (`$NONSTOP_HOME/metrics/`):
//!
//! ```text
//! header (24 bytes): "NSMETRIC" | version u16 LE | 0u16 | body length u64 LE | CRC-32 of the body u32 LE
//! body: dropped, evicted, series count                          (LEB128 varints)
//!       per series: app, environment (length-prefixed names), flags (process? release? slot?),
//!                   [process], [release], [slot], metric code, last sample (ms)
//!                   counter:   total, then each ring (fine, coarse): n, n × (step delta, increment)
//!                   gauge:     last (f64 LE), each ring: n, n × (step delta, sum f64, max f64, count)
//!                   histogram: total (sparse buckets + sum µs), each ring: n, n × (step delta, sparse buckets, sum µs)
//! ```
//!
//! Why a hand-written binary format rather than JSON + zstd: the data is
//! almost all small integers (steps one apart, counts, bucket indices),
//! which LEB128 varints and step deltas store in one or two bytes each
//! and sparse histograms skip entirely where empty, so the file is
//! already small without a compressor (no C library to build); the
//! decoder checks every length, index and name against the format's and
//! the store's bounds before it allocates, so a damaged file costs at
//! most its (bounded) size in memory and never panics; and a version
//! number plus a CRC-32 tell a newer or a damaged file from a good one
//! before anything is believed.
//!
//! **Writing** ([`save`]) is atomic: a temporary file beside it (0600,
//! not following a symbolic link), written, fsynced, renamed over
//! `metrics.bin`, then the directory fsynced. A crash leaves the old file
//! or the new one, never half of one.
//!
//! **Reading** ([`load`]) never fails the caller: a missing file is an
//! empty store; a damaged file, or one of a newer format, is moved aside
//! (`metrics.bin.damaged-MS`, `metrics.bin.newer-vN-MS`; the newest three
//! moved files are kept) and reported, and the store starts empty.

use crate::histogram::{HistPoint, Histogram, BUCKETS};
use crate::key::{Kind, Metric, SeriesKey};
use crate::ring::Ring;
use crate::store::{Data, GaugePoint, Limits, Series, Store};
use crate::time::{Resolution, Timestamp};
use nonstop_core::ids::NameError;
use nonstop_core::{AppName, EnvironmentId, ProcessName, ReleaseId};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The file's name in the directory given.
pub const FILE_NAME: &str = "metrics.bin";
/// The format version this code writes and the newest it reads.
pub const FORMAT_VERSION: u16 = 1;
const MAGIC: &[u8; 8] = b"NSMETRIC";
const HEADER_LEN: usize = 24;
/// How many moved-aside files are kept.
const KEEP_SET_ASIDE: usize = 3;

/// Why a file's bytes are not a store.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("it is not a nonstop metrics file (no NSMETRIC signature)")]
    NotMetrics,
    #[error("it was written in format version {found}, newer than this nonstop reads (up to {supported})")]
    NewerVersion { found: u16, supported: u16 },
    #[error("its format version {found} is not one nonstop ever wrote")]
    UnknownVersion { found: u16 },
    #[error("it is {size} bytes, more than a metrics file under these limits can be ({limit})")]
    TooLarge { size: u64, limit: u64 },
    #[error("it is truncated (it ends at byte {at})")]
    Truncated { at: usize },
    #[error("its checksum does not match (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("it holds an invalid {what} at byte {at}")]
    Invalid { what: &'static str, at: usize },
    #[error("it holds an invalid name at byte {at}")]
    Name {
        at: usize,
        #[source]
        source: NameError,
    },
}

/// What [`save`] was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveStep {
    CreateDir,
    Write,
    Sync,
    Rename,
    SyncDir,
}

impl fmt::Display for SaveStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SaveStep::CreateDir => "create the directory",
            SaveStep::Write => "write",
            SaveStep::Sync => "sync",
            SaveStep::Rename => "rename into place",
            SaveStep::SyncDir => "sync the directory",
        })
    }
}

/// [`save`] failed; the previous file, if any, is untouched.
#[derive(Debug, thiserror::Error)]
#[error("cannot save metrics: {step} {path}: {source}")]
pub struct SaveError {
    pub step: SaveStep,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// What went wrong reading the file; the store starts empty in each case.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is there but cannot be read (permissions, a symbolic
    /// link): it is left as it is.
    #[error("cannot read the metrics file {path}: {source}; metrics start empty (check the file's owner and mode)")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Damaged, or of a newer format: moved aside.
    #[error("the metrics file {path} was not loaded: {source}; it was moved to {moved_to} and metrics start empty")]
    SetAside {
        path: PathBuf,
        moved_to: PathBuf,
        #[source]
        source: DecodeError,
    },
    /// Damaged, or of a newer format, and it could not be moved aside.
    #[error(
        "the metrics file {path} was not loaded: {source}; it could not be moved aside ({rename}), \
         metrics start empty and the next save replaces it"
    )]
    NotSetAside {
        path: PathBuf,
        #[source]
        source: DecodeError,
        rename: io::Error,
    },
}

/// [`load`]'s answer: always a store, and what went wrong, if anything.
#[derive(Debug)]
pub struct Loaded {
    pub store: Store,
    pub problem: Option<LoadError>,
}

// --- encoding ----------------------------------------------------------

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, b: u8) {
        self.0.push(b);
    }
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn buckets(&mut self, counts: impl Iterator<Item = u64> + Clone) {
        let nonzero = counts.clone().filter(|&c| c > 0).count();
        self.varint(nonzero as u64);
        let mut previous = 0usize;
        for (i, c) in counts.enumerate().filter(|&(_, c)| c > 0) {
            self.varint((i - previous) as u64);
            self.varint(c);
            previous = i;
        }
    }
    fn ring<P>(&mut self, ring: &Ring<P>, mut point: impl FnMut(&mut Writer, &P)) {
        self.varint(ring.len() as u64);
        let mut previous = 0u64;
        for (slot, p) in ring.iter() {
            self.varint(slot - previous);
            previous = *slot;
            point(self, p);
        }
    }
}

/// The store as the file's bytes (header included).
pub fn encode(store: &Store) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(4096));
    w.varint(store.dropped);
    w.varint(store.evicted);
    w.varint(store.series.len() as u64);
    for (key, series) in &store.series {
        w.str(key.app().as_str());
        w.str(key.environment_id().as_str());
        let flags = u8::from(key.process_name().is_some())
            | u8::from(key.release().is_some()) << 1
            | u8::from(key.slot().is_some()) << 2;
        w.u8(flags);
        if let Some(p) = key.process_name() {
            w.str(p.as_str());
        }
        if let Some(r) = key.release() {
            w.varint(r.0);
        }
        if let Some(s) = key.slot() {
            w.varint(u64::from(s));
        }
        w.u8(key.metric().code());
        w.varint(series.last.as_millis());
        match &series.data {
            Data::Counter { total, fine, coarse } => {
                w.varint(*total);
                for ring in [fine, coarse] {
                    w.ring(ring, |w, n| w.varint(*n));
                }
            }
            Data::Gauge { last, fine, coarse } => {
                w.f64(*last);
                for ring in [fine, coarse] {
                    w.ring(ring, |w, p| {
                        w.f64(p.sum);
                        w.f64(p.max);
                        w.varint(u64::from(p.count));
                    });
                }
            }
            Data::Histogram { total, fine, coarse } => {
                w.buckets(total.counts().iter().copied());
                w.varint(total.sum_us());
                for ring in [fine, coarse] {
                    w.ring(ring, |w, p| {
                        w.buckets(p.counts.iter().map(|&c| u64::from(c)));
                        w.varint(p.sum_us);
                    });
                }
            }
        }
    }
    let body = w.0;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The largest file a store under `limits` encodes to: every series full,
/// every varint at its widest for what it can hold. Bigger files are
/// refused unread.
pub fn max_file_bytes(limits: &Limits) -> u64 {
    const VARINT: u64 = 10; // a u64
    const VARINT32: u64 = 5; // a u32
    const SLOT_DELTA: u64 = VARINT; // the first step is absolute
    let points = (Resolution::FiveSeconds.capacity() + Resolution::OneMinute.capacity()) as u64;
    let key = 3 * (1 + 63) + 1 + VARINT + VARINT32 + 1 + VARINT; // names, flags, release, slot, metric, last
    let rings = 2 * VARINT;
    let buckets = VARINT + BUCKETS as u64 * (1 + VARINT);
    let counter = key + VARINT + rings + points * (SLOT_DELTA + VARINT);
    let gauge = key + 8 + rings + points * (SLOT_DELTA + 8 + 8 + VARINT32);
    let histogram =
        key + buckets + VARINT + rings + points * (SLOT_DELTA + VARINT + BUCKETS as u64 * (1 + VARINT32) + VARINT);
    let histograms = limits.max_histogram_series.min(limits.max_series) as u64;
    let scalars = limits.max_series as u64 - histograms;
    (HEADER_LEN as u64 + 3 * VARINT)
        .saturating_add(scalars.saturating_mul(counter.max(gauge)))
        .saturating_add(histograms.saturating_mul(histogram))
}

// --- decoding ----------------------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn at(&self) -> usize {
        HEADER_LEN + self.pos
    }
    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated { at: HEADER_LEN + self.buf.len() }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or_else(|| self.truncated())?;
        self.pos += 1;
        Ok(b)
    }
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let start = self.at();
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Invalid { what: "number", at: start });
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid { what: "number", at: start })
    }
    fn bounded(&mut self, max: u64, what: &'static str) -> Result<u64, DecodeError> {
        let at = self.at();
        let v = self.varint()?;
        if v > max {
            return Err(DecodeError::Invalid { what, at });
        }
        Ok(v)
    }
    fn f64(&mut self) -> Result<f64, DecodeError> {
        let end = self.pos.checked_add(8).filter(|&e| e <= self.buf.len()).ok_or_else(|| self.truncated())?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf[self.pos..end]);
        self.pos = end;
        Ok(f64::from_le_bytes(b))
    }
    fn finite(&mut self, what: &'static str) -> Result<f64, DecodeError> {
        let at = self.at();
        let v = self.f64()?;
        if !v.is_finite() {
            return Err(DecodeError::Invalid { what, at });
        }
        Ok(v)
    }
    fn name<T>(&mut self, make: impl FnOnce(String) -> Result<T, NameError>) -> Result<T, DecodeError> {
        let at = self.at();
        let len = self.bounded(63, "name length")? as usize;
        let end = self.pos + len;
        let bytes = self.buf.get(self.pos..end).ok_or_else(|| self.truncated())?;
        self.pos = end;
        let s = String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid { what: "name", at })?;
        make(s).map_err(|source| DecodeError::Name { at, source })
    }
    fn buckets(&mut self, max_count: u64) -> Result<Vec<u64>, DecodeError> {
        let nonzero = self.bounded(BUCKETS as u64, "bucket count")?;
        let mut counts = vec![0u64; BUCKETS];
        let mut index = 0usize;
        for n in 0..nonzero {
            let at = self.at();
            let delta = self.bounded(BUCKETS as u64, "bucket index")? as usize;
            if (n > 0 && delta == 0) || index + delta >= BUCKETS {
                return Err(DecodeError::Invalid { what: "bucket index", at });
            }
            index += delta;
            counts[index] = self.bounded(max_count, "bucket count")?;
        }
        Ok(counts)
    }
    fn ring<P>(
        &mut self,
        resolution: Resolution,
        mut point: impl FnMut(&mut Self) -> Result<P, DecodeError>,
    ) -> Result<Ring<P>, DecodeError> {
        let at = self.at();
        let capacity = resolution.capacity();
        let n = self.bounded(capacity as u64, "ring length")? as usize;
        let mut entries = Vec::with_capacity(n);
        let mut slot = 0u64;
        for i in 0..n {
            let delta_at = self.at();
            let delta = self.varint()?;
            if i > 0 && delta == 0 {
                return Err(DecodeError::Invalid { what: "step", at: delta_at });
            }
            slot = slot.checked_add(delta).ok_or(DecodeError::Invalid { what: "step", at: delta_at })?;
            entries.push((slot, point(self)?));
        }
        Ring::from_entries(capacity, entries).ok_or(DecodeError::Invalid { what: "ring", at })
    }
}

/// The store in `bytes` (header included), under `limits`: series beyond
/// the caps are left out, the least recently sampled first.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Store, DecodeError> {
    let limit = max_file_bytes(limits);
    if bytes.len() as u64 > limit {
        return Err(DecodeError::TooLarge { size: bytes.len() as u64, limit });
    }
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(DecodeError::NotMetrics);
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated { at: bytes.len() });
    }
    let le16 = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let version = le16(8);
    if version > FORMAT_VERSION {
        return Err(DecodeError::NewerVersion { found: version, supported: FORMAT_VERSION });
    }
    if version == 0 {
        return Err(DecodeError::UnknownVersion { found: version });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let body_len = u64::from_le_bytes(len);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[20..24]);
    let stored = u32::from_le_bytes(crc);
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != body_len {
        return Err(if (body.len() as u64) < body_len {
            DecodeError::Truncated { at: bytes.len() }
        } else {
            DecodeError::Invalid { what: "length (bytes after the end)", at: 12 }
        });
    }
    let computed = crc32fast::hash(body);
    if computed != stored {
        return Err(DecodeError::Checksum { stored, computed });
    }

    let mut r = Reader { buf: body, pos: 0 };
    let dropped = r.varint()?;
    let evicted = r.varint()?;
    // Each series takes more than 8 bytes: a count beyond that is a lie.
    let count = r.bounded(body.len() as u64 / 8, "series count")? as usize;
    let mut series = Vec::with_capacity(count);
    for _ in 0..count {
        let app = r.name(AppName::new)?;
        let environment = r.name(EnvironmentId::new)?;
        let flags_at = r.at();
        let flags = r.u8()?;
        if flags & !0b111 != 0 {
            return Err(DecodeError::Invalid { what: "flags", at: flags_at });
        }
        let process = if flags & 1 != 0 { Some(r.name(ProcessName::new)?) } else { None };
        let release = if flags & 2 != 0 { Some(ReleaseId(r.varint()?)) } else { None };
        let slot = if flags & 4 != 0 { Some(r.bounded(u64::from(u32::MAX), "slot")? as u32) } else { None };
        let metric_at = r.at();
        let metric = Metric::from_code(r.u8()?).ok_or(DecodeError::Invalid { what: "metric", at: metric_at })?;
        let key = SeriesKey::from_parts(app, environment, process, release, slot, metric)
            .ok_or(DecodeError::Invalid { what: "series key (a slot without a process)", at: flags_at })?;
        let last = Timestamp::from_millis(r.varint()?);
        let data = match metric.kind() {
            Kind::Counter => {
                let total = r.varint()?;
                let fine = r.ring(Resolution::FiveSeconds, |r| r.varint())?;
                let coarse = r.ring(Resolution::OneMinute, |r| r.varint())?;
                Data::Counter { total, fine, coarse }
            }
            Kind::Gauge => {
                let last = r.finite("gauge reading")?;
                let mut point = |r: &mut Reader<'_>| {
                    let sum = r.finite("gauge sum")?;
                    let max = r.finite("gauge maximum")?;
                    let count = r.bounded(u64::from(u32::MAX), "gauge count")? as u32;
                    if count == 0 {
                        return Err(DecodeError::Invalid { what: "gauge count", at: r.at() });
                    }
                    Ok(GaugePoint { sum, max, count })
                };
                let fine = r.ring(Resolution::FiveSeconds, &mut point)?;
                let coarse = r.ring(Resolution::OneMinute, &mut point)?;
                Data::Gauge { last, fine, coarse }
            }
            Kind::Histogram => {
                let counts = r.buckets(u64::MAX)?;
                let sum_us = r.varint()?;
                let total = Histogram::from_parts(counts, sum_us)
                    .ok_or(DecodeError::Invalid { what: "histogram", at: r.at() })?;
                let point = |r: &mut Reader<'_>| {
                    let counts = r.buckets(u64::from(u32::MAX))?;
                    let sum_us = r.varint()?;
                    Ok(HistPoint { counts: counts.into_iter().map(|c| c as u32).collect(), sum_us })
                };
                let fine = r.ring(Resolution::FiveSeconds, point)?;
                let coarse = r.ring(Resolution::OneMinute, point)?;
                Data::Histogram { total: Box::new(total), fine, coarse }
            }
        };
        series.push((key, Series { last, data }));
    }
    if r.pos != body.len() {
        return Err(DecodeError::Invalid { what: "end (bytes after the last series)", at: r.at() });
    }
    Ok(Store::from_parts(*limits, series, dropped, evicted))
}

// --- files -------------------------------------------------------------

/// Write `store` to `dir/metrics.bin` atomically (see the module
/// documentation), creating `dir` (0700) if needed. Returns the bytes
/// written.
pub fn save(store: &Store, dir: &Path) -> Result<u64, SaveError> {
    let bytes = encode(store);
    write_atomic(dir, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Write `bytes` (from [`encode`]) to `dir/metrics.bin` atomically. For a
/// caller that encodes under its lock and writes outside it.
pub fn write_atomic(dir: &Path, bytes: &[u8]) -> Result<(), SaveError> {
    let err = |step, path: &Path| {
        let path = path.to_path_buf();
        move |source| SaveError { step, path, source }
    };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err(SaveStep::CreateDir, dir))?;
    let path = dir.join(FILE_NAME);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(err(SaveStep::Write, &tmp))?;
    file.write_all(bytes).map_err(err(SaveStep::Write, &tmp))?;
    file.sync_all().map_err(err(SaveStep::Sync, &tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(err(SaveStep::Rename, &path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err(SaveStep::SyncDir, dir))?;
    Ok(())
}

/// Read `dir/metrics.bin` into a store under `limits` (see the module
/// documentation). `now` names a file moved aside.
pub fn load(dir: &Path, limits: Limits, now: Timestamp) -> Loaded {
    let path = dir.join(FILE_NAME);
    let empty = || Store::new(limits);
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded { store: empty(), problem: None },
        Err(source) => return Loaded { store: empty(), problem: Some(LoadError::Read { path, source }) },
    };
    let limit = max_file_bytes(&limits);
    let mut bytes = Vec::new();
    // One byte past the limit is enough to know it is too large.
    if let Err(source) = file.take(limit.saturating_add(1)).read_to_end(&mut bytes) {
        return Loaded { store: empty(), problem: Some(LoadError::Read { path, source }) };
    }
    let source = match decode(&bytes, &limits) {
        Ok(store) => return Loaded { store, problem: None },
        Err(DecodeError::TooLarge { limit, .. }) => {
            let size = fs::metadata(&path).map_or(bytes.len() as u64, |m| m.len());
            DecodeError::TooLarge { size, limit }
        }
        Err(e) => e,
    };
    let moved_to = dir.join(match &source {
        DecodeError::NewerVersion { found, .. } => format!("{FILE_NAME}.newer-v{found}-{}", now.as_millis()),
        _ => format!("{FILE_NAME}.damaged-{}", now.as_millis()),
    });
    let problem = match fs::rename(&path, &moved_to) {
        Ok(()) => {
            prune_set_aside(dir);
            LoadError::SetAside { path, moved_to, source }
        }
        Err(rename) => LoadError::NotSetAside { path, source, rename },
    };
    Loaded { store: empty(), problem: Some(problem) }
}

/// Keep the newest [`KEEP_SET_ASIDE`] files moved aside (by the time in
/// their names); best effort.
fn prune_set_aside(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut moved: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(FILE_NAME)?.strip_prefix('.')?;
            if !(rest.starts_with("damaged-") || rest.starts_with("newer-v")) {
                return None;
            }
            let ms = rest.rsplit('-').next()?.parse().ok()?;
            Some((ms, e.path()))
        })
        .collect();
    moved.sort();
    let excess = moved.len().saturating_sub(KEEP_SET_ASIDE);
    for (_, path) in moved.into_iter().take(excess) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests;
