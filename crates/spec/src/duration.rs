//! Durations as written in `nonstop.toml`: an integer number of seconds
//! (`10`) or a string of numbers with units, largest unit first (`"250ms"`,
//! `"2s"`, `"1m"`, `"1h"`, `"1m30s"`).

use std::time::Duration;

/// The accepted forms, for error messages.
pub const DURATION_FORMS: &str =
    "a whole number of seconds (10) or a string with units: \"250ms\", \"2s\", \"1m\", \"1h\", \"1m30s\"";

const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// Why a duration string was refused (the caller adds location and forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurationError {
    Empty,
    /// Not `<digits><unit>...`; carries a more precise reason.
    Malformed(&'static str),
    TooLarge,
}

impl DurationError {
    pub fn reason(&self) -> &'static str {
        match self {
            DurationError::Empty => "it is empty",
            DurationError::Malformed(why) => why,
            DurationError::TooLarge => "it is too large",
        }
    }
}

/// Parses `"1m30s"` and friends. Units: `h`, `m`, `s`, `ms`, each at most
/// once, largest first, no spaces, whole numbers only.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut rest = text;
    let mut total_ms: u64 = 0;
    // Index into UNITS of the smallest unit seen so far.
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(if rest.starts_with('-') {
                DurationError::Malformed("it is negative")
            } else if rest.starts_with(|c: char| c.is_ascii_whitespace()) {
                DurationError::Malformed("it contains a space")
            } else if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
                DurationError::Malformed("a number must come before each unit")
            } else {
                DurationError::Malformed("it is not a number followed by a unit")
            });
        }
        let number: u64 = rest[..digits].parse().map_err(|_| DurationError::TooLarge)?;
        rest = &rest[digits..];
        if rest.starts_with('.') {
            return Err(DurationError::Malformed("fractions are not accepted, use a smaller unit (1500ms, not 1.5s)"));
        }
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        if unit_len == 0 {
            return Err(if rest.is_empty() {
                DurationError::Malformed("the unit is missing")
            } else if rest.starts_with(|c: char| c.is_ascii_whitespace()) {
                DurationError::Malformed("it contains a space")
            } else {
                DurationError::Malformed("it is not a number followed by a unit")
            });
        }
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let Some(index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(DurationError::Malformed("the unit is not one of ms, s, m, h"));
        };
        if last_unit.is_some_and(|last| index <= last) {
            return Err(DurationError::Malformed("units must appear once each, largest first (1m30s)"));
        }
        last_unit = Some(index);
        let ms = number.checked_mul(UNITS[index].1).ok_or(DurationError::TooLarge)?;
        total_ms = total_ms.checked_add(ms).ok_or(DurationError::TooLarge)?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Renders a duration in the same syntax, shortest form: `1m30s`, `250ms`,
/// `0s`. `parse_duration(&format_duration(d))` is `d` for whole
/// milliseconds.
pub fn format_duration(d: Duration) -> String {
    let mut ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (name, size) in UNITS {
        if ms >= size {
            out.push_str(&format!("{}{name}", ms / size));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_form_parses() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h2m3s4ms"), Ok(Duration::from_millis(3_723_004)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(" 10s "), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn malformed_durations_say_why() {
        let reason = |s: &str| parse_duration(s).unwrap_err().reason();
        assert_eq!(reason(""), "it is empty");
        assert_eq!(reason("10"), "the unit is missing");
        assert_eq!(reason("s"), "a number must come before each unit");
        assert_eq!(reason("-5s"), "it is negative");
        assert_eq!(reason("1.5s"), "fractions are not accepted, use a smaller unit (1500ms, not 1.5s)");
        assert_eq!(reason("10 s"), "it contains a space");
        assert_eq!(reason("1m 30s"), "it contains a space");
        assert_eq!(reason("10sec"), "the unit is not one of ms, s, m, h");
        assert_eq!(reason("2d"), "the unit is not one of ms, s, m, h");
        assert_eq!(reason("30s1m"), "units must appear once each, largest first (1m30s)");
        assert_eq!(reason("1s1s"), "units must appear once each, largest first (1m30s)");
        assert_eq!(reason("10s!"), "it is not a number followed by a unit");
        assert_eq!(reason("99999999999999999999s"), "it is too large");
        assert_eq!(reason("9999999999999999h"), "it is too large");
    }

    #[test]
    fn formatting_round_trips() {
        for (d, s) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_millis(3_723_004), "1h2m3s4ms"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(s), Ok(d));
        }
    }
}
