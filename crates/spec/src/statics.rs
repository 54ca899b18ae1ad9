//! `[static]` / `[[static]]` → [`StaticMount`]s: URL prefixes the proxy
//! answers itself from a directory inside each release.

use crate::defaults::{DEFAULT_STATIC_DIR, DEFAULT_STATIC_URL};
use crate::error::Diags;
use crate::raw::{RawStatic, RawStatics};
use nonstop_core::process::StaticMount;
use serde_spanned::Spanned;
use std::path::{Component, Path, PathBuf};

const EXAMPLE: &str = "[static]\nurl = \"/static/\"\ndir = \"staticfiles\"";

pub(crate) fn validate_statics(raw: &Spanned<RawStatics>, diags: &mut Diags) -> Vec<StaticMount> {
    let mut out: Vec<StaticMount> = Vec::new();
    for entry in &raw.get_ref().0 {
        let RawStatic { url, dir } = entry.get_ref();
        let url_ok = match url {
            Some(u) => check_url(u, diags),
            None => Some(DEFAULT_STATIC_URL.to_string()),
        };
        let dir_ok = match dir {
            Some(d) => check_dir(d, diags),
            None => Some(PathBuf::from(DEFAULT_STATIC_DIR)),
        };
        let (Some(url_text), Some(dir)) = (url_ok, dir_ok) else { continue };
        if let Some(first) = out.iter().position(|m| m.url == url_text) {
            let span = url.as_ref().map(|u| u.span()).unwrap_or_else(|| entry.span());
            diags.error(
                span,
                format!(
                    "static url {url_text:?} is mounted twice (mount number {} and number {})",
                    first + 1,
                    out.len() + 1
                ),
                "give each [[static]] mount its own url, or remove one",
            );
            continue;
        }
        out.push(StaticMount { url: url_text, dir });
    }
    out
}

fn check_url(value: &Spanned<String>, diags: &mut Diags) -> Option<String> {
    let url = value.get_ref();
    let problem = if !url.starts_with('/') || !url.ends_with('/') {
        Some("must start and end with '/'".to_string())
    } else if url == "/" {
        Some("cannot be \"/\": every request of the app would be answered from the static files".to_string())
    } else if let Some(c) = url.chars().find(|c| !is_url_char(*c)) {
        Some(format!("contains {c:?}; use letters, digits and - . _ ~ between the slashes"))
    } else if url[1..url.len() - 1].split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        Some("has an empty, '.' or '..' segment".to_string())
    } else {
        None
    };
    match problem {
        Some(p) => {
            diags.error(
                value.span(),
                format!("`url` in [static] {url:?} {p}"),
                format!("write the URL prefix the pages use for their assets (Django's STATIC_URL), for example:\n{EXAMPLE}"),
            );
            None
        }
        None => Some(url.clone()),
    }
}

fn is_url_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '.' | '_' | '~')
}

fn check_dir(value: &Spanned<String>, diags: &mut Diags) -> Option<PathBuf> {
    let text = value.get_ref();
    let path = Path::new(text);
    let problem = if text.trim().is_empty() {
        Some("is empty")
    } else if text.contains('\0') {
        Some("contains a NUL character")
    } else if path.is_absolute() {
        Some("is absolute; it is a directory inside the release")
    } else if path.components().any(|c| matches!(c, Component::ParentDir)) {
        Some("contains '..'; it must stay inside the release")
    } else if path.components().all(|c| matches!(c, Component::CurDir)) {
        Some("is the release itself, which would serve the app's source code and settings")
    } else {
        None
    };
    match problem {
        Some(p) => {
            diags.error(
                value.span(),
                format!("`dir` in [static] {text:?} {p}"),
                format!(
                    "give the directory, relative to the release, that the build fills (Django's STATIC_ROOT, filled by collectstatic), for example:\n{EXAMPLE}"
                ),
            );
            None
        }
        None => Some(path.components().filter(|c| !matches!(c, Component::CurDir)).collect()),
    }
}
