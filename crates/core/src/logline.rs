//! The line format of every log nonstop writes (instance logs, task logs,
//! build logs): `2026-11-22T01:02:03.456789Z out <text>`, where the stream
//! is `out`, `err`, or `sys` for nonstop's own notes. Timestamps are UTC
//! with microseconds and fixed width, so lines sort as text. Formatting and
//! parsing only: no clock is read here.

use serde::{Deserialize, Serialize};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

/// Width of the timestamp at the start of each line.
pub const TS_LEN: usize = 27;

const TS_FORMAT: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Out,
    Err,
    /// Written by nonstop itself (start, exit, leftovers killed, build steps).
    Sys,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Out => "out",
            Stream::Err => "err",
            Stream::Sys => "sys",
        }
    }
    pub fn parse(s: &str) -> Option<Stream> {
        match s {
            "out" => Some(Stream::Out),
            "err" => Some(Stream::Err),
            "sys" => Some(Stream::Sys),
            _ => None,
        }
    }
}

/// `t` as a log line timestamp.
pub fn format_ts(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC).format(TS_FORMAT).unwrap_or_else(|_| "1970-01-01T00:00:00.000000Z".to_string())
}

/// Split one log line into (timestamp, stream, text).
pub fn parse_line(line: &str) -> Option<(&str, Stream, &str)> {
    let ts = line.get(..TS_LEN)?;
    let b = line.as_bytes();
    if !ts.ends_with('Z') || b.get(TS_LEN) != Some(&b' ') || b.get(TS_LEN + 4) != Some(&b' ') {
        return None;
    }
    let stream = Stream::parse(line.get(TS_LEN + 1..TS_LEN + 4)?)?;
    Some((ts, stream, line.get(TS_LEN + 5..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let ts = format_ts(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(ts, "1970-01-01T00:00:00.000000Z");
        assert_eq!(ts.len(), TS_LEN);
        let line = format!("{ts} err boom");
        assert_eq!(parse_line(&line), Some((ts.as_str(), Stream::Err, "boom")));
        assert_eq!(parse_line("not a log line at all, no"), None);
    }
}
