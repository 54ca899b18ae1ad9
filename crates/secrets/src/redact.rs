//! [`Redactor`]: hide secret values in text that leaves the process's
//! environment: task and build output, error messages, logs.
//!
//! Every occurrence of a value becomes `[secret NAME]`. Occurrences that
//! overlap (two values sharing bytes, or a value overlapping itself) are
//! hidden as one span under the name of the leftmost (then longest)
//! one, so no byte of any of them is shown.
//!
//! **Values shorter than [`MIN_REDACTED_LEN`] bytes are not redacted.**
//! A value of 1 to 3 bytes (`1`, `on`, `dev`, `443`) occurs all over
//! ordinary output: replacing every occurrence would make the output
//! unreadable, and the pattern of replacements would show the value
//! anyway. Such a value is no secret worth the name (it is found in a few
//! thousand guesses); `nonstop secrets set` may warn about it.
//!
//! Limits: text is redacted as given, so a caller that redacts a stream
//! must redact whole lines (or keep the tail of a chunk), or a value cut
//! in two by a chunk boundary is missed; values are matched byte for byte,
//! not in other encodings (URL-encoded, base64). The matcher holds copies
//! of the values that are not wiped when it is dropped.

use crate::value::SecretValue;
use aho_corasick::{AhoCorasick, MatchKind};
use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// The shortest value redacted, in bytes (see the module's documentation).
pub const MIN_REDACTED_LEN: usize = 4;

/// Replaces secret values in text with `[secret NAME]`.
#[derive(Default)]
pub struct Redactor {
    /// The values' matcher (`None` when there are none, or when building
    /// it failed: then [`Redactor::spans`] searches naively).
    matcher: Option<AhoCorasick>,
    /// Pattern by pattern: the value (only for the naive search) and
    /// what replaces it.
    patterns: Vec<Pattern>,
}

struct Pattern {
    name: String,
    value: SecretValue,
    marker: Vec<u8>,
}

impl Redactor {
    /// A redactor of these `(name, value)` pairs. Values shorter than
    /// [`MIN_REDACTED_LEN`] are left out; a value given under two names
    /// is redacted under the first.
    pub fn new<'a, N: AsRef<str>>(secrets: impl IntoIterator<Item = (N, &'a SecretValue)>) -> Self {
        let mut patterns: Vec<Pattern> = Vec::new();
        for (name, value) in secrets {
            if value.len() < MIN_REDACTED_LEN || patterns.iter().any(|p| p.value == *value) {
                continue;
            }
            let name = name.as_ref().to_string();
            let marker = format!("[secret {name}]").into_bytes();
            patterns.push(Pattern { name, value: value.clone(), marker });
        }
        let matcher = if patterns.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(patterns.iter().map(|p| p.value.expose().as_bytes()))
                .ok()
        };
        Self { matcher, patterns }
    }

    /// A redactor that changes nothing (an app without secrets).
    pub fn empty() -> Self {
        Self::default()
    }

    /// How many values it hides.
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// `text` with every secret value replaced by `[secret NAME]`;
    /// borrowed when there was none.
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        match self.redact_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Values are UTF-8 and so are the markers: every span of a
            // value in valid UTF-8 starts and ends on a character boundary.
            Cow::Owned(bytes) => Cow::Owned(
                String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            ),
        }
    }

    /// [`Redactor::redact`] for output that may not be UTF-8.
    pub fn redact_bytes<'t>(&self, bytes: &'t [u8]) -> Cow<'t, [u8]> {
        let spans = self.spans(bytes);
        if spans.is_empty() {
            return Cow::Borrowed(bytes);
        }
        let mut out = Vec::with_capacity(bytes.len() + spans.len() * 16);
        let mut at = 0;
        for (span, pattern) in spans {
            out.extend_from_slice(&bytes[at..span.start]);
            out.extend_from_slice(&self.patterns[pattern].marker);
            at = span.end;
        }
        out.extend_from_slice(&bytes[at..]);
        Cow::Owned(out)
    }

    /// The spans to hide, in order and disjoint, each with the pattern
    /// whose name it shows: every occurrence of every value, overlapping
    /// ones merged.
    fn spans(&self, bytes: &[u8]) -> Vec<(Range<usize>, usize)> {
        let mut found: Vec<(Range<usize>, usize)> = match &self.matcher {
            Some(m) => m.find_overlapping_iter(bytes).map(|m| (m.range(), m.pattern().as_usize())).collect(),
            None => self.naive_occurrences(bytes),
        };
        // Leftmost first, then longest.
        found.sort_by(|a, b| a.0.start.cmp(&b.0.start).then(b.0.end.cmp(&a.0.end)));
        let mut merged: Vec<(Range<usize>, usize)> = Vec::with_capacity(found.len());
        for (range, pattern) in found {
            match merged.last_mut() {
                Some((last, _)) if range.start < last.end => last.end = last.end.max(range.end),
                _ => merged.push((range, pattern)),
            }
        }
        merged
    }

    /// Every occurrence of every value, found without the matcher.
    fn naive_occurrences(&self, bytes: &[u8]) -> Vec<(Range<usize>, usize)> {
        let mut found = Vec::new();
        for (i, p) in self.patterns.iter().enumerate() {
            let value = p.value.expose().as_bytes();
            for start in 0..bytes.len().saturating_sub(value.len() - 1) {
                if bytes[start..].starts_with(value) {
                    found.push((start..start + value.len(), i));
                }
            }
        }
        found
    }
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor").field("names", &self.patterns.iter().map(|p| &p.name).collect::<Vec<_>>()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(s: &str) -> SecretValue {
        SecretValue::new(s.to_string()).unwrap()
    }

    fn redactor(pairs: &[(&str, &str)]) -> Redactor {
        let values: Vec<(String, SecretValue)> = pairs.iter().map(|(n, s)| (n.to_string(), v(s))).collect();
        Redactor::new(values.iter().map(|(n, s)| (n.as_str(), s)))
    }

    /// The same redactor searching without its matcher.
    fn naive(r: &Redactor) -> Redactor {
        Redactor {
            matcher: None,
            patterns: r
                .patterns
                .iter()
                .map(|p| Pattern { name: p.name.clone(), value: p.value.clone(), marker: p.marker.clone() })
                .collect(),
        }
    }

    #[test]
    fn table() {
        let r = redactor(&[("DB_PASSWORD", "hunter2"), ("API_TOKEN", "tok_abcdef"), ("SHORT", "abc")]);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r.redact("connecting with hunter2 and tok_abcdef, hunter2!"),
            "connecting with [secret DB_PASSWORD] and [secret API_TOKEN], [secret DB_PASSWORD]!"
        );
        assert!(matches!(r.redact("nothing here: abc"), Cow::Borrowed("nothing here: abc")));
        assert_eq!(r.redact("hunter2hunter2"), "[secret DB_PASSWORD][secret DB_PASSWORD]");
        assert_eq!(r.redact("é hunter2 ü"), "é [secret DB_PASSWORD] ü");
        assert_eq!(&*r.redact_bytes(b"\xff\xfehunter2\xff"), b"\xff\xfe[secret DB_PASSWORD]\xff");
        // Overlapping values are hidden as one span.
        let r = redactor(&[("A", "abcdef"), ("B", "cdefgh")]);
        assert_eq!(r.redact("xxabcdefghxx"), "xx[secret A]xx");
        let r = redactor(&[("A", "aaaa")]);
        assert_eq!(r.redact("aaaaaa"), "[secret A]");
        // The same value under two names: the first name.
        let r = redactor(&[("A", "same-value"), ("B", "same-value")]);
        assert_eq!(r.len(), 1);
        assert_eq!(r.redact("=same-value="), "=[secret A]=");
        // Nothing to hide.
        assert!(Redactor::empty().is_empty());
        assert_eq!(Redactor::empty().redact("text"), "text");
        assert_eq!(format!("{:?}", redactor(&[("X", "hunter2")])), "Redactor { names: [\"X\"] }");
    }

    /// Values over an alphabet that shares no character with the markers
    /// (`[secret NAME]`), so what is left of the text after redaction is
    /// only text that was not hidden, and no value can straddle a marker.
    fn value() -> impl Strategy<Value = String> {
        "[abdfg0123]{4,10}"
    }

    proptest! {
        #[test]
        fn no_value_survives(
            values in prop::collection::vec(value(), 1..5),
            pieces in prop::collection::vec((0usize..5, "[abdfg0123 ]{0,6}"), 0..12),
        ) {
            let mut text = String::new();
            for (i, filler) in &pieces {
                text.push_str(filler);
                if let Some(value) = values.get(*i) {
                    text.push_str(value);
                }
            }
            let pairs: Vec<(String, SecretValue)> =
                values.iter().enumerate().map(|(i, s)| (format!("S{i}"), v(s))).collect();
            let r = Redactor::new(pairs.iter().map(|(n, s)| (n.as_str(), s)));
            let out = r.redact(&text);
            for value in &values {
                prop_assert!(!out.contains(value.as_str()), "{value:?} survives in {out:?} (from {text:?})");
            }
            prop_assert_eq!(naive(&r).redact(&text), out);
        }

        #[test]
        fn every_occurrence_is_inside_a_hidden_span(
            values in prop::collection::vec("[ab]{1,6}", 1..4),
            text in "[ab]{0,40}",
        ) {
            let pairs: Vec<(String, SecretValue)> =
                values.iter().enumerate().map(|(i, s)| (format!("S{i}"), v(s))).collect();
            let r = Redactor::new(pairs.iter().map(|(n, s)| (n.as_str(), s)));
            let spans = r.spans(text.as_bytes());
            prop_assert!(spans.windows(2).all(|w| w[0].0.end <= w[1].0.start));
            prop_assert_eq!(&naive(&r).spans(text.as_bytes()), &spans);
            for value in values.iter().filter(|v| v.len() >= MIN_REDACTED_LEN) {
                for (start, _) in text.match_indices(value.as_str()) {
                    let end = start + value.len();
                    prop_assert!(spans.iter().any(|(s, _)| s.start <= start && end <= s.end));
                }
                // Overlapping occurrences too (`match_indices` skips them).
                for start in 0..text.len() {
                    if text[start..].starts_with(value.as_str()) {
                        let end = start + value.len();
                        prop_assert!(spans.iter().any(|(s, _)| s.start <= start && end <= s.end));
                    }
                }
            }
        }

        #[test]
        fn short_values_and_absent_values_change_nothing(
            short in "[a-z]{0,3}",
            text in ".{0,60}",
        ) {
            let r = Redactor::new([("SHORT", &v(&short))]);
            prop_assert!(r.is_empty());
            prop_assert!(matches!(r.redact(&text), Cow::Borrowed(_)));
        }
    }
}
