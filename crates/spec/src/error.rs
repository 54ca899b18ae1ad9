//! Errors of a `nonstop.toml`: where (file, line, column), what is wrong,
//! and how to fix it. All of a file's errors are collected, not just the
//! first one.

use serde::Serialize;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a spec file.
///
/// `line` and `column` are 1-based; the column counts characters, not
/// bytes. Both are 0 when the problem is not at a place in the file (a
/// missing file, a bad value in an environment variable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// What is wrong, in one sentence.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        if self.line == 0 {
            write!(f, "{file}: error: {}", self.message)?;
        } else {
            write!(f, "{file}:{}:{}: error: {}", self.line, self.column, self.message)?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {}", hint.replace('\n', "\n        "))?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// Every problem found in a spec file, in file order. Never empty.
///
/// `Display` prints one block per error, separated by blank lines, ready
/// to be shown to a user as is:
///
/// ```text
/// nonstop.toml:12:1: error: unknown key `comand` in [processes.web]
///   hint: did you mean `command`? valid keys: command, kind, count, ...
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecErrors {
    pub errors: Vec<SpecError>,
}

impl SpecErrors {
    pub fn len(&self) -> usize {
        self.errors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
    pub fn iter(&self) -> std::slice::Iter<'_, SpecError> {
        self.errors.iter()
    }
}

impl From<SpecError> for SpecErrors {
    fn from(error: SpecError) -> Self {
        Self { errors: vec![error] }
    }
}

impl<'a> IntoIterator for &'a SpecErrors {
    type Item = &'a SpecError;
    type IntoIter = std::slice::Iter<'a, SpecError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

impl IntoIterator for SpecErrors {
    type Item = SpecError;
    type IntoIter = std::vec::IntoIter<SpecError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// A problem found while walking or validating, located by byte span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Diag {
    /// `None`: not at a place in the file.
    pub span: Option<Range<usize>>,
    pub message: String,
    pub hint: Option<String>,
}

/// Collects problems; turned into [`SpecErrors`] once the whole file has
/// been looked at.
#[derive(Debug, Default, Clone)]
pub(crate) struct Diags {
    items: Vec<Diag>,
}

impl Diags {
    pub fn error(&mut self, span: Range<usize>, message: impl Into<String>, hint: impl IntoHint) {
        self.items.push(Diag { span: Some(span), message: message.into(), hint: hint.into_hint() });
    }
    pub fn error_unlocated(&mut self, message: impl Into<String>, hint: impl IntoHint) {
        self.items.push(Diag { span: None, message: message.into(), hint: hint.into_hint() });
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    /// Adds every problem of `other`.
    pub fn extend(&mut self, other: Diags) {
        self.items.extend(other.items);
    }
    /// Adds the problems of `other` found at a place where none was found
    /// yet: a value checked again for an environment (merged with its
    /// overrides) is reported once, where the file's own check found it,
    /// while a problem only the environment has (its own values, or a rule
    /// across a value of the file and one of the environment) is kept.
    pub fn extend_new(&mut self, other: Diags) {
        for item in other.items {
            let known = self.items.iter().any(|d| match (&d.span, &item.span) {
                (Some(a), Some(b)) => a == b,
                (None, None) => d.message == item.message,
                _ => false,
            });
            if !known {
                self.items.push(item);
            }
        }
    }
    /// Was a problem found at or after byte `offset` already?
    pub fn any_after(&self, offset: usize) -> bool {
        self.items.iter().any(|d| d.span.as_ref().is_some_and(|s| s.start >= offset))
    }
    pub fn into_errors(self, source: &str, file: &Path) -> SpecErrors {
        let index = LineIndex::new(source);
        let mut errors: Vec<SpecError> = self
            .items
            .into_iter()
            .map(|d| {
                let (line, column) = match d.span {
                    Some(span) => index.position(span.start),
                    None => (0, 0),
                };
                SpecError { file: file.to_path_buf(), line, column, message: d.message, hint: d.hint }
            })
            .collect();
        // File order; unlocated errors first. Stable, so errors at the same
        // place keep the order in which they were found.
        errors.sort_by_key(|e| (e.line, e.column));
        errors.dedup();
        SpecErrors { errors }
    }
}

/// Lets `Diags::error` take a `&str`, a `String` or an `Option<String>`.
pub(crate) trait IntoHint {
    fn into_hint(self) -> Option<String>;
}
impl IntoHint for &str {
    fn into_hint(self) -> Option<String> {
        Some(self.to_string())
    }
}
impl IntoHint for String {
    fn into_hint(self) -> Option<String> {
        Some(self)
    }
}
impl IntoHint for Option<String> {
    fn into_hint(self) -> Option<String> {
        self
    }
}

/// Byte offset → (line, column), both 1-based, column in characters.
pub(crate) struct LineIndex<'a> {
    source: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub fn new(source: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(source.match_indices('\n').map(|(i, _)| i + 1));
        Self { source, line_starts }
    }

    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.source.len());
        let line = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let start = self.line_starts[line];
        // Spans always fall on char boundaries, but be safe about it.
        let prefix = self.source.get(start..offset).unwrap_or("");
        // A byte-order mark is not a column.
        let prefix = if line == 0 { prefix.trim_start_matches('\u{feff}') } else { prefix };
        (line + 1, prefix.chars().count() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_in_characters() {
        let src = "ab\ncé = 1\n\nx";
        let index = LineIndex::new(src);
        assert_eq!(index.position(0), (1, 1));
        assert_eq!(index.position(1), (1, 2));
        assert_eq!(index.position(2), (1, 3)); // the newline itself
        assert_eq!(index.position(3), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(index.position(6), (2, 3));
        assert_eq!(index.position(src.len() - 1), (4, 1));
        assert_eq!(index.position(src.len() + 10), (4, 2));
        assert_eq!(LineIndex::new("\u{feff}a = 1").position(3), (1, 1));
    }

    #[test]
    fn errors_are_sorted_and_rendered_in_blocks() {
        let mut diags = Diags::default();
        diags.error(8..9, "second", "fix it");
        diags.error(0..1, "first", None);
        diags.error_unlocated("from the environment", "unset it");
        let errors = diags.into_errors("a = 1\nb = 2\n", Path::new("nonstop.toml"));
        assert_eq!(
            errors.to_string(),
            "nonstop.toml: error: from the environment\n  hint: unset it\n\n\
             nonstop.toml:1:1: error: first\n\n\
             nonstop.toml:2:3: error: second\n  hint: fix it"
        );
    }

    #[test]
    fn multi_line_hints_are_indented() {
        let e = SpecError { file: "n.toml".into(), line: 1, column: 2, message: "m".into(), hint: Some("a\nb".into()) };
        assert_eq!(e.to_string(), "n.toml:1:2: error: m\n  hint: a\n        b");
    }

    #[test]
    fn errors_serialize_for_json_output() {
        let e = SpecError { file: "nonstop.toml".into(), line: 3, column: 9, message: "bad".into(), hint: None };
        let json = serde_json::to_value(SpecErrors::from(e)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"errors": [{"file": "nonstop.toml", "line": 3, "column": 9, "message": "bad", "hint": null}]})
        );
    }
}
