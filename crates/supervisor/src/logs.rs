//! Reading the log files: tail across instances, follow, and pruning.

use crate::driver::SupervisorError;
use crate::logfile::{parse_line, Stream};
use nonstop_core::ids::{AppName, EnvironmentId, ProcessName};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often `follow` looks for new output.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(150);
/// Most bytes read from one file per follow tick.
const FOLLOW_READ_LIMIT: u64 = 4 * 1024 * 1024;

/// Which logs to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    pub app: AppName,
    pub environment: EnvironmentId,
    /// Only this process type; all when `None`.
    pub process: Option<ProcessName>,
    /// How many of the last lines (over all matching instances).
    pub tail: usize,
}

/// One line of an instance's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    /// `2026-11-22T01:02:03.456789Z` (UTC, fixed width: sorts as text).
    pub ts: String,
    /// `web.1`.
    pub instance: String,
    pub generation: u64,
    pub stream: Stream,
    pub text: String,
}

/// `<state_dir>/logs/<app>/<environment>`.
pub fn logs_dir(state_dir: &Path, app: &AppName, environment: &EnvironmentId) -> PathBuf {
    state_dir.join("logs").join(app.as_str()).join(environment.as_str())
}

/// The files of one instance's log.
#[derive(Debug, Clone)]
struct InstanceLog {
    /// `web.1`
    instance: String,
    process: String,
    generation: u64,
    /// `<dir>/web.1.7.log` (may not exist right now, during a rotation).
    active: PathBuf,
    /// `.1`, `.2`, ... in that order (newest first).
    rotated: Vec<PathBuf>,
}

impl InstanceLog {
    fn newest_mtime(&self) -> Option<SystemTime> {
        std::iter::once(&self.active)
            .chain(self.rotated.iter())
            .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .max()
    }
    fn files(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.active).chain(self.rotated.iter())
    }
}

/// `web.1.7` → (`web`, 1, 7).
fn parse_base(base: &str) -> Option<(String, u32, u64)> {
    let mut parts = base.rsplitn(3, '.');
    let generation = parts.next()?.parse().ok()?;
    let slot = parts.next()?.parse().ok()?;
    let process = parts.next()?;
    ProcessName::new(process).ok()?;
    Some((process.to_string(), slot, generation))
}

/// `x.log` → (`x`, None), `x.log.3` → (`x`, Some(3)).
fn split_log_name(name: &str) -> Option<(&str, Option<u32>)> {
    if let Some(base) = name.strip_suffix(".log") {
        return Some((base, None));
    }
    let (base, n) = name.rsplit_once(".log.")?;
    Some((base, Some(n.parse().ok()?)))
}

fn list_instance_logs(dir: &Path, process: Option<&ProcessName>) -> io::Result<Vec<InstanceLog>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut by_base: BTreeMap<String, (InstanceLog, Vec<(u32, PathBuf)>)> = BTreeMap::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((base, n)) = split_log_name(name) else {
            continue;
        };
        let Some((proc_name, slot, generation)) = parse_base(base) else {
            continue;
        };
        if process.is_some_and(|p| p.as_str() != proc_name) {
            continue;
        }
        let item = by_base.entry(base.to_string()).or_insert_with(|| {
            (
                InstanceLog {
                    instance: format!("{proc_name}.{slot}"),
                    process: proc_name.clone(),
                    generation,
                    active: dir.join(format!("{base}.log")),
                    rotated: Vec::new(),
                },
                Vec::new(),
            )
        });
        if let Some(n) = n {
            item.1.push((n, entry.path()));
        }
    }
    Ok(by_base
        .into_values()
        .map(|(mut log, mut rotated)| {
            rotated.sort_by_key(|(n, _)| *n);
            log.rotated = rotated.into_iter().map(|(_, p)| p).collect();
            log
        })
        .collect())
}

/// The last `n` complete lines (no trailing partial line) of `file` before
/// byte `end` for which `keep` holds, oldest first.
fn last_lines(file: &mut File, end: u64, n: usize, keep: &dyn Fn(&str) -> bool) -> io::Result<Vec<String>> {
    if n == 0 || end == 0 {
        return Ok(Vec::new());
    }
    let mut start = end;
    let mut chunk = 64 * 1024u64;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let len = chunk.min(start);
        start -= len;
        let mut piece = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut piece)?;
        piece.extend_from_slice(&buf);
        buf = piece;
        let lines = complete_lines(&buf, start > 0, keep);
        if lines.len() >= n || start == 0 {
            let skip = lines.len().saturating_sub(n);
            return Ok(lines.into_iter().skip(skip).collect());
        }
        chunk = chunk.saturating_mul(2);
    }
}

/// Lines of `buf` that end with a newline; the first is dropped when it
/// may be the end of a line that started before `buf`.
fn complete_lines(buf: &[u8], first_partial: bool, keep: &dyn Fn(&str) -> bool) -> Vec<String> {
    let Some(last_nl) = buf.iter().rposition(|&c| c == b'\n') else {
        return Vec::new();
    };
    let mut lines = buf[..last_nl].split(|&c| c == b'\n');
    if first_partial {
        lines.next();
    }
    lines.map(|l| String::from_utf8_lossy(l).into_owned()).filter(|l| keep(l)).collect()
}

fn to_log_line(log: &InstanceLog, line: &str) -> Option<LogLine> {
    let (ts, stream, text) = parse_line(line)?;
    Some(LogLine {
        ts: ts.to_string(),
        instance: log.instance.clone(),
        generation: log.generation,
        stream,
        text: text.to_string(),
    })
}

/// The last `n` lines of one instance, across its rotated files. `active`
/// is an already open active file and the length to read up to.
fn instance_tail(log: &InstanceLog, n: usize, active: Option<(&mut File, u64)>) -> io::Result<Vec<LogLine>> {
    let parses = |l: &str| parse_line(l).is_some();
    let mut lines: Vec<String> = match active {
        Some((file, end)) => last_lines(file, end, n, &parses)?,
        None => match File::open(&log.active) {
            Ok(mut f) => {
                let end = f.metadata()?.len();
                last_lines(&mut f, end, n, &parses)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        },
    };
    for path in &log.rotated {
        if lines.len() >= n {
            break;
        }
        let Ok(mut f) = File::open(path) else {
            continue;
        };
        let end = f.metadata()?.len();
        let mut older = last_lines(&mut f, end, n - lines.len(), &parses)?;
        older.append(&mut lines);
        lines = older;
    }
    Ok(lines.iter().filter_map(|l| to_log_line(log, l)).collect())
}

fn merge_tail(mut lines: Vec<LogLine>, n: usize) -> Vec<LogLine> {
    // Stable: lines of one instance with equal timestamps keep their order.
    lines.sort_by(|a, b| a.ts.cmp(&b.ts));
    let skip = lines.len().saturating_sub(n);
    lines.drain(..skip);
    lines
}

/// The last `query.tail` lines over all matching instances (rotated files
/// included), sorted by timestamp.
pub fn tail(state_dir: &Path, query: &LogQuery) -> Result<Vec<LogLine>, SupervisorError> {
    let dir = logs_dir(state_dir, &query.app, &query.environment);
    let err = |source| SupervisorError::Logs { path: dir.clone(), source };
    let mut all = Vec::new();
    if query.tail == 0 {
        return Ok(all);
    }
    for log in list_instance_logs(&dir, query.process.as_ref()).map_err(err)? {
        all.extend(instance_tail(&log, query.tail, None).map_err(err)?);
    }
    Ok(merge_tail(all, query.tail))
}

/// The texts of the last `n` lines of the given streams of one log file
/// (rotated files included), oldest first.
pub fn last_texts(active: &Path, n: usize, streams: &[Stream]) -> io::Result<Vec<String>> {
    let keep = |l: &str| parse_line(l).is_some_and(|(_, s, _)| streams.contains(&s));
    let mut lines = Vec::new();
    let mut files = vec![active.to_path_buf()];
    for i in 1.. {
        let mut name = active.as_os_str().to_owned();
        name.push(format!(".{i}"));
        let p = PathBuf::from(name);
        if !p.exists() {
            break;
        }
        files.push(p);
    }
    for path in files {
        if lines.len() >= n {
            break;
        }
        let Ok(mut f) = File::open(&path) else {
            continue;
        };
        let end = f.metadata()?.len();
        let mut older = last_lines(&mut f, end, n - lines.len(), &keep)?;
        older.append(&mut lines);
        lines = older;
    }
    Ok(lines.iter().filter_map(|l| parse_line(l).map(|(_, _, t)| t.to_string())).collect())
}

/// An active log file being followed.
struct Tracked {
    log: InstanceLog,
    file: File,
    id: (u64, u64),
    pos: u64,
    partial: Vec<u8>,
    missing_ticks: u32,
}

impl Tracked {
    fn open(log: InstanceLog, at_end: bool) -> Option<Tracked> {
        let file = File::open(&log.active).ok()?;
        let meta = file.metadata().ok()?;
        Some(Tracked {
            log,
            file,
            id: (meta.dev(), meta.ino()),
            pos: if at_end { meta.len() } else { 0 },
            partial: Vec::new(),
            missing_ticks: 0,
        })
    }

    /// Complete lines written since the last read.
    fn read_new(&mut self, out: &mut Vec<LogLine>) {
        let Ok(len) = self.file.metadata().map(|m| m.len()) else {
            return;
        };
        if len < self.pos {
            // Truncated in place: start over.
            self.pos = 0;
            self.partial.clear();
        }
        if len == self.pos || self.file.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        let Ok(n) = (&mut self.file).take(FOLLOW_READ_LIMIT).read_to_end(&mut buf) else {
            return;
        };
        self.pos += n as u64;
        self.partial.extend_from_slice(&buf);
        if let Some(last_nl) = self.partial.iter().rposition(|&c| c == b'\n') {
            for line in self.partial[..last_nl].split(|&c| c == b'\n') {
                if let Some(l) = to_log_line(&self.log, &String::from_utf8_lossy(line)) {
                    out.push(l);
                }
            }
            self.partial.drain(..=last_nl);
        }
    }
}

struct Follower {
    dir: PathBuf,
    process: Option<ProcessName>,
    tracked: BTreeMap<PathBuf, Tracked>,
    /// Instances that existed when following started (their rotated files
    /// were covered by the initial tail).
    known: HashSet<PathBuf>,
}

impl Follower {
    /// Open the active files and return the last `tail` lines up to where
    /// following starts, so nothing is lost or repeated in between.
    fn start(&mut self, tail: usize) -> Vec<LogLine> {
        let mut lines = Vec::new();
        for log in list_instance_logs(&self.dir, self.process.as_ref()).unwrap_or_default() {
            self.known.insert(log.active.clone());
            match Tracked::open(log.clone(), true) {
                Some(mut t) => {
                    if tail > 0 {
                        let end = t.pos;
                        lines.extend(instance_tail(&log, tail, Some((&mut t.file, end))).unwrap_or_default());
                    }
                    self.tracked.insert(log.active.clone(), t);
                }
                None if tail > 0 => lines.extend(instance_tail(&log, tail, None).unwrap_or_default()),
                None => {}
            }
        }
        merge_tail(lines, tail)
    }

    fn poll(&mut self) -> Vec<LogLine> {
        let mut out = Vec::new();
        for log in list_instance_logs(&self.dir, self.process.as_ref()).unwrap_or_default() {
            if !self.tracked.contains_key(&log.active) {
                // An instance that appeared after we started: read it all,
                // from the oldest rotated file on.
                if self.known.insert(log.active.clone()) {
                    for path in log.rotated.iter().rev() {
                        if let Ok(f) = File::open(path) {
                            let mut t = Tracked {
                                log: log.clone(),
                                file: f,
                                id: (0, 0),
                                pos: 0,
                                partial: Vec::new(),
                                missing_ticks: 0,
                            };
                            t.read_new(&mut out);
                        }
                    }
                }
                if let Some(t) = Tracked::open(log.clone(), false) {
                    self.tracked.insert(log.active.clone(), t);
                }
            }
        }
        let mut gone = Vec::new();
        for (path, t) in self.tracked.iter_mut() {
            t.read_new(&mut out);
            match std::fs::metadata(path) {
                Ok(m) if (m.dev(), m.ino()) != t.id => {
                    // Rotated: finish the old file, then follow the new one.
                    t.read_new(&mut out);
                    if let Some(new) = Tracked::open(t.log.clone(), false) {
                        *t = new;
                        t.read_new(&mut out);
                    }
                }
                Ok(_) => t.missing_ticks = 0,
                Err(_) => {
                    // Mid-rotation, or deleted (pruned).
                    t.missing_ticks += 1;
                    if t.missing_ticks > 3 {
                        gone.push(path.clone());
                    }
                }
            }
        }
        for path in gone {
            self.tracked.remove(&path);
        }
        out.sort_by(|a, b| a.ts.cmp(&b.ts));
        out
    }
}

/// The last `query.tail` lines, then every new line written to a matching
/// instance's log (new instances and rotations included), polled every
/// 150 ms, until `cancel` fires or the receiver is dropped. Must be called
/// within a tokio runtime.
pub fn follow(state_dir: &Path, query: LogQuery, cancel: CancellationToken) -> mpsc::Receiver<LogLine> {
    let (tx, rx) = mpsc::channel(1024);
    let mut follower = Follower {
        dir: logs_dir(state_dir, &query.app, &query.environment),
        process: query.process.clone(),
        tracked: BTreeMap::new(),
        known: HashSet::new(),
    };
    tokio::spawn(async move {
        let mut batch = follower.start(query.tail);
        loop {
            for line in batch {
                tokio::select! {
                    sent = tx.send(line) => if sent.is_err() { return },
                    _ = cancel.cancelled() => return,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
            }
            batch = follower.poll();
        }
    });
    rx
}

/// Delete the log files of instances beyond the newest `keep` per process
/// type, and of tasks beyond the newest `keep` per task name, except
/// files in `live` (the active log files of running instances).
pub fn prune(
    state_dir: &Path,
    app: &AppName,
    environment: &EnvironmentId,
    keep: usize,
    live: &HashSet<PathBuf>,
) -> Result<usize, SupervisorError> {
    let dir = logs_dir(state_dir, app, environment);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SupervisorError::Logs { path, source }
    };
    let mut removed = 0;
    let remove = |path: &Path, removed: &mut usize| -> Result<(), SupervisorError> {
        match std::fs::remove_file(path) {
            Ok(()) => {
                *removed += 1;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(path)(e)),
        }
    };

    let mut by_process: BTreeMap<String, Vec<(Option<SystemTime>, InstanceLog)>> = BTreeMap::new();
    for log in list_instance_logs(&dir, None).map_err(err(&dir))? {
        by_process.entry(log.process.clone()).or_default().push((log.newest_mtime(), log));
    }
    for (_, mut logs) in by_process {
        logs.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.generation.cmp(&a.1.generation)));
        for (_, log) in logs.into_iter().skip(keep) {
            if live.contains(&log.active) {
                continue;
            }
            for path in log.files() {
                remove(path, &mut removed)?;
            }
        }
    }

    // tasks/<name>.<unix-ts>.log[.N]
    let tasks = dir.join("tasks");
    let entries = match std::fs::read_dir(&tasks) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(err(&tasks)(e)),
    };
    let mut by_name: BTreeMap<String, BTreeMap<u64, Vec<PathBuf>>> = BTreeMap::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((base, _)) = split_log_name(name) else {
            continue;
        };
        let Some((task, ts)) = base.rsplit_once('.') else {
            continue;
        };
        let Ok(ts) = ts.parse::<u64>() else { continue };
        by_name.entry(task.to_string()).or_default().entry(ts).or_default().push(entry.path());
    }
    for (_, runs) in by_name {
        for (_, files) in runs.into_iter().rev().skip(keep) {
            if files.iter().any(|f| live.contains(f)) {
                continue;
            }
            for f in files {
                remove(&f, &mut removed)?;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_names() {
        assert_eq!(split_log_name("web.1.7.log"), Some(("web.1.7", None)));
        assert_eq!(split_log_name("web.1.7.log.2"), Some(("web.1.7", Some(2))));
        assert_eq!(split_log_name("web.1.7.log.tmp"), None);
        assert_eq!(parse_base("celery_beat.1.12"), Some(("celery_beat".to_string(), 1, 12)));
        assert_eq!(parse_base("x.y"), None);
    }

    #[test]
    fn reads_last_lines_backwards_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        for i in 0..20_000 {
            writeln!(f, "line {i}").unwrap();
        }
        write!(f, "partial").unwrap();
        drop(f);
        let mut f = File::open(&path).unwrap();
        let end = f.metadata().unwrap().len();
        let all = |_: &str| true;
        let got = last_lines(&mut f, end, 3, &all).unwrap();
        assert_eq!(got, vec!["line 19997", "line 19998", "line 19999"]);
        let got = last_lines(&mut f, end, 30_000, &all).unwrap();
        assert_eq!(got.len(), 20_000);
        assert_eq!(got[0], "line 0");
        let even = |l: &str| l.ends_with('0');
        let got = last_lines(&mut f, end, 2, &even).unwrap();
        assert_eq!(got, vec!["line 19980", "line 19990"]);
    }
}
