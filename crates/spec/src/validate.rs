//! Raw schema types → `nonstop_core::process::AppSpec`.
//!
//! Pure: no I/O, the environment comes in through [`EnvLookup`]. Every
//! rule records its problem and validation goes on (with the default in
//! place of the bad value), so that one run reports everything.

use crate::defaults::*;
use crate::duration::{format_duration, parse_duration, DurationError, DURATION_FORMS};
use crate::env::EnvLookup;
use crate::error::Diags;
use crate::raw::*;
use crate::sanitize_app_name;
use crate::size::{format_size, parse_size, SizeError, SIZE_FORMS};
use crate::suggest::did_you_mean;
use crate::walk::display_key;
use nonstop_core::ids::{AppName, ProcessName};
use nonstop_core::process::{
    AppSpec, HealthCheck, ProcessKind, ProcessSpec, ProxySpec, Quantity, ReleaseSpec, RestartPolicy, Rollout, Signal,
    SmokeCheck, StatusRange, TlsSpec,
};
use serde_spanned::Spanned;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const KINDS: [&str; 3] = ["web", "worker", "singleton"];

/// Validates a walked file, but for its environments: the spec of no
/// environment in particular (no hosts, not the catch-all, unprotected).
/// `None` if anything was wrong (then `diags` holds why). A `[database]`
/// url read from a variable that is unset or wrong is no problem of the
/// file: that goes to `deferred`, and the spec has no database.
pub(crate) fn validate(
    raw: &RawSpec,
    env: &dyn EnvLookup,
    base: &Path,
    diags: &mut Diags,
    deferred: &mut Diags,
) -> Option<AppSpec> {
    let before = diags.len();

    let app = validate_app(raw.app.as_ref(), diags);
    let app_env = raw.env.as_ref().map(|e| validate_env(e, "env", diags)).unwrap_or_default();
    let proxy = validate_proxy(raw.proxy.as_ref(), env, base, diags);
    let build = raw.build.as_ref().map(|b| commands(b, Field::new("", "build"), diags)).unwrap_or_default();
    let processes = validate_processes(raw.processes.as_ref(), diags);
    let declared: Vec<&str> =
        raw.processes.iter().flat_map(|p| p.get_ref().iter()).map(|(name, _)| name.get_ref().as_str()).collect();
    let release = validate_release(raw.release.as_ref(), &declared, &processes, diags);
    let statics = raw.statics.as_ref().map(|s| crate::statics::validate_statics(s, diags)).unwrap_or_default();
    let tables = crate::database::DatabaseTables::of_file(raw);
    let database =
        raw.database.as_ref().and_then(|d| crate::database::validate_database(d, &tables, env, diags, deferred));
    let metrics = raw.metrics.as_ref().and_then(|m| crate::autoscale::validate_metrics(m, &proxy, diags));

    if diags.len() > before {
        return None;
    }
    Some(AppSpec {
        app: app?,
        env: app_env,
        processes,
        proxy,
        build,
        release,
        statics,
        database,
        hosts: Vec::new(),
        default_host: false,
        protected: false,
        base: None,
        metrics,
    })
}

/// A key of a table, for messages: "`count` in [processes.web]".
#[derive(Clone, Copy)]
pub(crate) struct Field<'a> {
    /// Dotted table path, `""` at the top level.
    pub(crate) table: &'a str,
    pub(crate) key: &'a str,
}

impl<'a> Field<'a> {
    pub(crate) fn new(table: &'a str, key: &'a str) -> Self {
        Self { table, key }
    }
    pub(crate) fn what(&self) -> String {
        if self.table.is_empty() {
            format!("`{}`", self.key)
        } else {
            format!("`{}` in [{}]", self.key, self.table)
        }
    }
    pub(crate) fn example(&self, value: &str) -> String {
        format!("for example: {} = {value}", self.key)
    }
}

fn validate_app(app: Option<&Spanned<String>>, diags: &mut Diags) -> Option<AppName> {
    // A missing `app` was reported by the walk, which knows whether the
    // key is absent or only of the wrong type.
    let app = app?;
    let value = app.get_ref();
    let name = AppName::new(value.as_str()).ok().filter(|_| !value.contains('_'));
    if name.is_none() {
        let suggestion = sanitize_app_name(value);
        diags.error(
            app.span(),
            format!("invalid app name {value:?}: use 1 to 63 characters: lowercase letters, digits and '-', starting with a letter"),
            format!("for example: app = \"{suggestion}\""),
        );
    }
    name
}

fn validate_proxy(proxy: Option<&Spanned<RawProxy>>, env: &dyn EnvLookup, base: &Path, diags: &mut Diags) -> ProxySpec {
    let mut listen: SocketAddr = DEFAULT_PROXY_LISTEN.parse().expect("the default listen address is valid");
    let default = RawProxy::default();
    let raw = proxy.map(|p| p.get_ref()).unwrap_or(&default);
    if let Some(value) = &raw.listen {
        if let Some(addr) = listen_address(value, "listen", diags) {
            listen = addr;
        }
    }
    if let Some(addr) = check_proxy_env(env, diags) {
        listen = addr;
    }
    let mut spec = ProxySpec::new(listen);
    let f = |key| Field::new("proxy", key);
    spec.https_listen = raw.https_listen.as_ref().and_then(|v| listen_address(v, "https_listen", diags));
    if let (Some(https), Some(value)) = (spec.https_listen, &raw.https_listen) {
        if https == listen {
            diags.error(
                value.span(),
                format!("`https_listen` in [proxy] is the same address as `listen` ({listen})"),
                format!("give HTTPS its own port, such as https_listen = \"{}:443\"", ip_text(https)),
            );
        }
    }
    spec.redirect_http = raw.redirect_http.as_ref().map(|b| *b.get_ref());
    spec.max_header_bytes = size(
        raw.max_header_bytes.as_ref(),
        f("max_header_bytes"),
        MIN_PROXY_MAX_HEADER_BYTES,
        MAX_PROXY_MAX_HEADER_BYTES,
        DEFAULT_PROXY_MAX_HEADER_BYTES,
        diags,
    );
    spec.max_request_line = size(
        raw.max_request_line.as_ref(),
        f("max_request_line"),
        MIN_PROXY_MAX_REQUEST_LINE,
        MAX_PROXY_MAX_HEADER_BYTES,
        DEFAULT_PROXY_MAX_REQUEST_LINE,
        diags,
    );
    if let (Some(line), Some(value)) = (spec.max_request_line, &raw.max_request_line) {
        let head = spec.max_header_bytes.unwrap_or(DEFAULT_PROXY_MAX_HEADER_BYTES);
        if line > head {
            diags.error(
                value.span(),
                format!(
                    "`max_request_line` in [proxy] ({}) is larger than `max_header_bytes` ({}), which includes the request line",
                    format_size(line),
                    format_size(head)
                ),
                format!("raise max_header_bytes to at least \"{}\", or lower max_request_line", format_size(line)),
            );
        }
    }
    spec.max_body_bytes =
        size(raw.max_body_bytes.as_ref(), f("max_body_bytes"), 0, u64::MAX, DEFAULT_PROXY_MAX_BODY_BYTES, diags);
    spec.max_headers = raw.max_headers.as_ref().map(|v| {
        let n = count(Some(v), f("max_headers"), 1, DEFAULT_PROXY_MAX_HEADERS, diags);
        if n > MAX_PROXY_MAX_HEADERS {
            diags.error(
                v.span(),
                format!("`max_headers` in [proxy] is too large (at most {MAX_PROXY_MAX_HEADERS})"),
                f("max_headers").example(&DEFAULT_PROXY_MAX_HEADERS.to_string()),
            );
        }
        n
    });
    let timeout = |value: Option<&Spanned<RawDuration>>, key, default, diags: &mut Diags| {
        value.map(|v| duration(Some(v), f(key), Min::Positive, default, diags))
    };
    spec.header_timeout = timeout(raw.header_timeout.as_ref(), "header_timeout", DEFAULT_PROXY_HEADER_TIMEOUT, diags);
    spec.idle_timeout = timeout(raw.idle_timeout.as_ref(), "idle_timeout", DEFAULT_PROXY_IDLE_TIMEOUT, diags);
    spec.upstream_timeout =
        timeout(raw.upstream_timeout.as_ref(), "upstream_timeout", DEFAULT_PROXY_UPSTREAM_TIMEOUT, diags);
    spec.body_timeout = timeout(raw.body_timeout.as_ref(), "body_timeout", DEFAULT_PROXY_BODY_TIMEOUT, diags);
    spec.trusted_proxies = raw
        .trusted_proxies
        .iter()
        .flat_map(|list| list.get_ref())
        .filter_map(|item| {
            let v = item.get_ref().trim();
            let parsed = v
                .parse::<ipnet::IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| v.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => Some(net),
                Err(_) => {
                    diags.error(
                        item.span(),
                        format!("{v:?} in `trusted_proxies` of [proxy] is not an IP address or a CIDR range"),
                        "for example: trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"] (the load balancer in front)",
                    );
                    None
                }
            }
        })
        .collect();
    spec.workers = raw.workers.as_ref().and_then(|v| {
        let n = *v.get_ref();
        let workers = u32::try_from(n).ok().filter(|n| (MIN_PROXY_WORKERS..=MAX_PROXY_WORKERS).contains(n));
        if workers.is_none() {
            diags.error(
                v.span(),
                format!("{} must be between {MIN_PROXY_WORKERS} and {MAX_PROXY_WORKERS}, not {n}", f("workers").what()),
                "leave it out for one thread per core (the default), or set a count, for example: workers = 2",
            );
        }
        workers
    });
    validate_proxy_bodies(raw, &mut spec, diags);
    // Connection limits.
    spec.max_connections = raw.max_connections.as_ref().and_then(|v| {
        let n = *v.get_ref();
        let limit = u64::try_from(n).ok().filter(|n| (1..=MAX_PROXY_MAX_CONNECTIONS).contains(n));
        if limit.is_none() {
            diags.error(
                v.span(),
                format!("{} must be between 1 and {MAX_PROXY_MAX_CONNECTIONS}, not {n}", f("max_connections").what()),
                "leave it out to derive it from the daemon's file descriptor limit (the default), or set a count, for example: max_connections = 10000",
            );
        }
        limit
    });
    spec.max_connections_per_client = raw.max_connections_per_client.as_ref().and_then(|v| {
        let n = *v.get_ref();
        let limit = u32::try_from(n).ok().filter(|n| u64::from(*n) <= MAX_PROXY_MAX_CONNECTIONS);
        if limit.is_none() {
            diags.error(
                v.span(),
                format!(
                    "{} must be between 0 (no limit) and {MAX_PROXY_MAX_CONNECTIONS}, not {n}",
                    f("max_connections_per_client").what()
                ),
                format!(
                    "for example: max_connections_per_client = {DEFAULT_PROXY_MAX_CONNECTIONS_PER_CLIENT} (the default), or 0 for no limit"
                ),
            );
        }
        limit
    });
    if let Some(tls) = &raw.tls {
        spec.tls = validate_tls(tls, base, diags);
    }
    match (&raw.tls, &raw.https_listen) {
        (Some(tls), None) => diags.error(
            tls.span(),
            "[[proxy.tls]] certificates need an HTTPS address: `https_listen` in [proxy] is missing",
            "add it to [proxy], for example: https_listen = \"0.0.0.0:443\" (or \"127.0.0.1:8443\" to try it on this machine)",
        ),
        (None, Some(value)) => diags.error(
            value.span(),
            "`https_listen` in [proxy] needs certificates: there is no [[proxy.tls]]",
            format!("add one:\n{TLS_EXAMPLE}"),
        ),
        _ => {}
    }
    if let (Some(value), None) = (&raw.redirect_http, &raw.tls) {
        if *value.get_ref() {
            diags.error(
                value.span(),
                "`redirect_http` in [proxy] redirects to HTTPS, which needs [[proxy.tls]] certificates",
                format!("add a certificate, or remove redirect_http:\n{TLS_EXAMPLE}"),
            );
        }
    }
    spec
}

/// `[proxy]` request-body keys: buffering, minimum rate, streamed paths.
fn validate_proxy_bodies(raw: &RawProxy, spec: &mut ProxySpec, diags: &mut Diags) {
    let f = |key| Field::new("proxy", key);
    spec.body_memory_bytes = size(
        raw.body_memory_bytes.as_ref(),
        f("body_memory_bytes"),
        0,
        MAX_PROXY_BODY_MEMORY_BYTES,
        DEFAULT_PROXY_BODY_MEMORY_BYTES,
        diags,
    );
    spec.min_upload_rate = raw.min_upload_rate.as_ref().and_then(|value| upload_rate(value, diags));
    spec.upload_rate_window = raw.upload_rate_window.as_ref().and_then(|value| {
        let window =
            duration(Some(value), f("upload_rate_window"), Min::Positive, DEFAULT_PROXY_UPLOAD_RATE_WINDOW, diags);
        if window < MIN_PROXY_UPLOAD_RATE_WINDOW {
            if !window.is_zero() {
                diags.error(
                    value.span(),
                    format!(
                        "`upload_rate_window` in [proxy] must be at least {}, not {}: a shorter window judges a pause, not a rate",
                        format_duration(MIN_PROXY_UPLOAD_RATE_WINDOW),
                        format_duration(window)
                    ),
                    f("upload_rate_window").example(&format!("\"{}\"", format_duration(DEFAULT_PROXY_UPLOAD_RATE_WINDOW))),
                );
            }
            return None;
        }
        Some(window)
    });
    let mut seen = std::collections::HashSet::new();
    for item in raw.unbuffered_paths.iter().flat_map(|list| list.get_ref()) {
        let path = item.get_ref();
        let problem = if !path.starts_with('/') {
            Some("does not start with '/'")
        } else if path.contains(['?', '#']) {
            Some("contains a query or fragment ('?' or '#'): only the path is matched")
        } else if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("contains spaces or control characters")
        } else {
            None
        };
        if let Some(problem) = problem {
            diags.error(
                item.span(),
                format!("{path:?} in `unbuffered_paths` of [proxy] {problem}"),
                "write path prefixes, for example: unbuffered_paths = [\"/upload/\", \"/api/files\"]",
            );
        } else if !seen.insert(path.as_str()) {
            diags.error(
                item.span(),
                format!("{path:?} is twice in `unbuffered_paths` of [proxy]"),
                "remove one of them",
            );
        } else {
            spec.unbuffered_paths.push(path.clone());
        }
    }
}

/// `min_upload_rate`: bytes per second, or a size per second (`"1KiB/s"`).
fn upload_rate(value: &Spanned<RawIntOrString>, diags: &mut Diags) -> Option<u64> {
    let example = "for example: min_upload_rate = \"1KiB/s\" (or 0 for no minimum)";
    match value.get_ref() {
        RawIntOrString::Int(i) if *i < 0 => {
            diags.error(value.span(), "`min_upload_rate` in [proxy] must not be negative", example);
            None
        }
        RawIntOrString::Int(i) => Some(i.unsigned_abs()),
        RawIntOrString::Text(text) => {
            let trimmed = text.trim();
            let Some(per_second) = trimmed.strip_suffix("/s").or_else(|| trimmed.strip_suffix("/S")) else {
                diags.error(
                    value.span(),
                    format!("`min_upload_rate` in [proxy] is not a rate ({text:?}): it does not end with \"/s\""),
                    format!("write a size per second, such as \"{}/s\"; {example}", trimmed),
                );
                return None;
            };
            match parse_size(per_second) {
                Ok(n) => Some(n),
                Err(err) => {
                    diags.error(
                        value.span(),
                        format!("`min_upload_rate` in [proxy] is not a valid rate ({text:?}): {}", err.reason()),
                        format!("a rate is a size per second, the size {SIZE_FORMS}; {example}"),
                    );
                    None
                }
            }
        }
    }
}

const TLS_EXAMPLE: &str = "[[proxy.tls]]\nhosts = [\"example.com\", \"*.example.com\"]\ncert = \"certs/example.com.pem\"\nkey = \"certs/example.com.key\"";

fn ip_text(addr: SocketAddr) -> String {
    if addr.is_ipv4() {
        addr.ip().to_string()
    } else {
        format!("[{}]", addr.ip())
    }
}

fn listen_address(value: &Spanned<String>, key: &str, diags: &mut Diags) -> Option<SocketAddr> {
    match parse_listen(value.get_ref()) {
        Ok(addr) => Some(addr),
        Err((reason, hint)) => {
            diags.error(
                value.span(),
                format!("`{key}` in [proxy] is not a valid address ({:?}): {reason}", value.get_ref()),
                hint,
            );
            None
        }
    }
}

/// A size field: bytes or a string with a unit, within `min..=max`.
fn size(
    value: Option<&Spanned<RawIntOrString>>,
    field: Field<'_>,
    min: u64,
    max: u64,
    default: u64,
    diags: &mut Diags,
) -> Option<u64> {
    let value = value?;
    let example = field.example(&format!("\"{}\"", format_size(default)));
    let n = match value.get_ref() {
        RawIntOrString::Int(i) if *i < 0 => {
            diags.error(value.span(), format!("{} must not be negative", field.what()), example);
            return None;
        }
        RawIntOrString::Int(i) => i.unsigned_abs(),
        RawIntOrString::Text(text) => match parse_size(text) {
            Ok(n) => n,
            Err(err) => {
                let hint = if err == SizeError::Malformed("the unit is missing") {
                    format!("add a unit (\"{}KiB\") or drop the quotes to mean bytes ({})", text.trim(), text.trim())
                } else {
                    format!("sizes are {SIZE_FORMS}")
                };
                diags.error(
                    value.span(),
                    format!("{} is not a valid size ({text:?}): {}", field.what(), err.reason()),
                    hint,
                );
                return None;
            }
        },
    };
    if n < min {
        diags.error(
            value.span(),
            format!("{} must be at least {}, not {}", field.what(), format_size(min), format_size(n)),
            example,
        );
        return None;
    }
    if n > max {
        diags.error(
            value.span(),
            format!("{} must be at most {}, not {}", field.what(), format_size(max), format_size(n)),
            example,
        );
        return None;
    }
    Some(n)
}

/// `[[proxy.tls]]`: host names (each served by one certificate), and the
/// files, made absolute against `base`.
fn validate_tls(tls: &Spanned<Vec<Spanned<RawTls>>>, base: &Path, diags: &mut Diags) -> Vec<TlsSpec> {
    let mut out = Vec::new();
    let mut seen: Vec<(String, usize)> = Vec::new();
    for (index, entry) in tls.get_ref().iter().enumerate() {
        let raw = entry.get_ref();
        let mut hosts = Vec::new();
        if let Some(list) = &raw.hosts {
            if list.get_ref().is_empty() {
                diags.error(
                    list.span(),
                    "`hosts` in [[proxy.tls]] is empty",
                    "name the hosts this certificate is for: hosts = [\"example.com\", \"www.example.com\"]",
                );
            }
            for host in list.get_ref() {
                match tls_host(host.get_ref()) {
                    Ok(name) => {
                        if let Some((_, other)) = seen.iter().find(|(h, _)| *h == name) {
                            diags.error(
                                host.span(),
                                format!(
                                    "host {name:?} has two certificates in [[proxy.tls]] (number {} and number {})",
                                    other + 1,
                                    index + 1
                                ),
                                "a host is served one certificate: remove it from one of the two",
                            );
                        } else {
                            seen.push((name.clone(), index));
                        }
                        hosts.push(name);
                    }
                    Err(hint) => {
                        diags.error(host.span(), format!("invalid host {:?} in [[proxy.tls]]", host.get_ref()), hint)
                    }
                }
            }
        }
        let cert = raw.cert.as_ref().and_then(|c| tls_path(c, "cert", base, diags));
        let key = raw.key.as_ref().and_then(|k| tls_path(k, "key", base, diags));
        if let (Some(cert), Some(key), Some(c), Some(k)) = (&cert, &key, &raw.cert, &raw.key) {
            if cert == key {
                diags.error(
                    k.span(),
                    "`key` in [[proxy.tls]] is the same file as `cert`",
                    format!("point key at the private key file (cert is {:?})", c.get_ref()),
                );
            }
        }
        if let (Some(cert), Some(key)) = (cert, key) {
            out.push(TlsSpec { hosts, cert, key });
        }
    }
    out
}

/// A host name for a certificate: lowercase, `*.` allowed in front.
fn tls_host(raw: &str) -> Result<String, String> {
    let host = raw.trim().to_ascii_lowercase();
    if host.contains("://") || host.contains('/') {
        let bare = host.split("://").last().unwrap_or(&host).split('/').next().unwrap_or("");
        return Err(format!("write the host name alone: {bare:?}"));
    }
    if let Some((name, port)) = host.rsplit_once(':') {
        if port.parse::<u16>().is_ok() {
            return Err(format!("leave out the port: {name:?}"));
        }
    }
    let name = host.strip_prefix("*.").unwrap_or(&host);
    if name.contains('*') {
        return Err("a wildcard is `*.` before the rest of the name, as in \"*.example.com\" (one label)".into());
    }
    if nonstop_core::ids::is_host_name(name) {
        Ok(host)
    } else {
        Err("host names are letters, digits, '-' and '.', such as \"example.com\" or \"*.example.com\"".into())
    }
}

fn tls_path(value: &Spanned<String>, key: &str, base: &Path, diags: &mut Diags) -> Option<PathBuf> {
    let text = value.get_ref();
    if text.trim().is_empty() {
        diags.error(
            value.span(),
            format!("`{key}` in [[proxy.tls]] is empty"),
            format!(
                "give the path of the PEM file, relative to nonstop.toml or absolute: {key} = \"certs/example.com.{}\"",
                if key == "cert" { "pem" } else { "key" }
            ),
        );
        return None;
    }
    if text.contains('\0') {
        diags.error(
            value.span(),
            format!("`{key}` in [[proxy.tls]] contains a NUL character"),
            "remove the \\u0000 from the path",
        );
        return None;
    }
    let path = Path::new(text);
    Some(if path.is_absolute() { path.to_path_buf() } else { base.join(path) })
}

/// The `NONSTOP_PROXY_LISTEN` override, if set; an error naming the
/// variable if its value is not an address.
pub(crate) fn check_proxy_env(env: &dyn EnvLookup, diags: &mut Diags) -> Option<SocketAddr> {
    let value = env.get(PROXY_LISTEN_ENV)?;
    match parse_listen(&value) {
        Ok(addr) => Some(addr),
        Err((reason, hint)) => {
            diags.error_unlocated(
                format!("environment variable {PROXY_LISTEN_ENV} is not a valid listen address ({value:?}): {reason}"),
                format!("{hint}; or unset {PROXY_LISTEN_ENV} to use [proxy] listen from this file"),
            );
            None
        }
    }
}

/// `"127.0.0.1:8080"` → address, or (what is wrong, how to fix it).
pub(crate) fn parse_listen(text: &str) -> Result<SocketAddr, (String, String)> {
    let text = text.trim();
    let generic = "use IP:PORT, such as 127.0.0.1:8080 (this machine only), 0.0.0.0:80 (every interface) or [::1]:8080";
    if text.is_empty() {
        return Err(("it is empty".into(), generic.into()));
    }
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 => Err((
            "port 0 would pick a random port".into(),
            format!(
                "choose a port, such as {}:8080",
                if addr.is_ipv4() { addr.ip().to_string() } else { format!("[{}]", addr.ip()) }
            ),
        )),
        Ok(addr) => Ok(addr),
        Err(_) => {
            let port_only = text.strip_prefix(':').unwrap_or(text);
            if port_only.parse::<u16>().is_ok() {
                return Err((
                    "the IP address is missing".into(),
                    format!("write 127.0.0.1:{port_only} (this machine only) or 0.0.0.0:{port_only} (every interface)"),
                ));
            }
            if let Some((host, port)) = text.rsplit_once(':') {
                if port.parse::<u16>().is_ok() && !host.is_empty() && host.parse::<std::net::IpAddr>().is_err() {
                    let ip = if host == "localhost" { "127.0.0.1" } else { "0.0.0.0" };
                    return Err((
                        "a host name is not an address to listen on".into(),
                        format!("use an IP address: {ip}:{port}"),
                    ));
                }
            }
            Err(("it is not IP:PORT".into(), generic.into()))
        }
    }
}

/// `[env]` or `[processes.NAME.env]`.
pub(crate) fn validate_env(
    env: &Spanned<RawMap<Spanned<RawScalar>>>,
    table: &str,
    diags: &mut Diags,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in env.get_ref().iter() {
        let n = name.get_ref().as_str();
        if !is_env_name(n) {
            diags.error(
                name.span(),
                format!("invalid environment variable name {} in [{table}]", display_key(n)),
                format!("names are letters, digits and '_', and do not start with a digit: {}", fix_env_name(n)),
            );
        } else if n == "PORT" {
            diags.error(
                name.span(),
                format!("`PORT` in [{table}] is reserved: nonstop gives each web instance its own port in $PORT"),
                "remove it and bind your server to $PORT (gunicorn --bind 127.0.0.1:$PORT); the port users connect to is [proxy] listen",
            );
        } else if n.starts_with("NONSTOP_") {
            diags.error(
                name.span(),
                format!("`{n}` in [{table}] is reserved: names starting with NONSTOP_ are set by nonstop"),
                "rename it; settings such as NONSTOP_PROXY_LISTEN are read from the environment of the nonstop daemon, not from [env]",
            );
        }
        let text = value.get_ref().to_env_string();
        if text.contains('\0') {
            diags.error(
                value.span(),
                format!("`{n}` in [{table}] contains a NUL character, which no environment variable can hold"),
                "remove the \\u0000 from the value",
            );
        }
        out.insert(n.to_string(), text);
    }
    out
}

pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(crate) fn fix_env_name(name: &str) -> String {
    let mut fixed: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if fixed.is_empty() || fixed.starts_with(|c: char| c.is_ascii_digit()) {
        fixed.insert(0, '_');
    }
    fixed
}

/// A list of shell commands (`build`, `tasks`, `post_tasks`).
fn commands(list: &Spanned<Vec<Spanned<String>>>, field: Field<'_>, diags: &mut Diags) -> Vec<String> {
    list.get_ref().iter().filter_map(|c| command(c, field, diags)).collect()
}

fn command(c: &Spanned<String>, field: Field<'_>, diags: &mut Diags) -> Option<String> {
    let text = c.get_ref();
    if text.trim().is_empty() {
        diags.error(
            c.span(),
            format!("{} has an empty command", field.what()),
            "write the shell command to run, or remove the empty string",
        );
        None
    } else if text.contains('\0') {
        diags.error(
            c.span(),
            format!("{} has a command with a NUL character, which no shell can run", field.what()),
            "remove the \\u0000 from the command",
        );
        None
    } else {
        Some(text.clone())
    }
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Min {
    /// 0 is allowed (`ready_after = 0`: ready at once).
    Zero,
    /// Must be longer than 0.
    Positive,
}

pub(crate) fn duration(
    value: Option<&Spanned<RawDuration>>,
    field: Field<'_>,
    min: Min,
    default: Duration,
    diags: &mut Diags,
) -> Duration {
    let Some(value) = value else { return default };
    let example = field.example(&format!("\"{}\"", format_duration(default)));
    let parsed = match value.get_ref() {
        RawDuration::Seconds(s) if *s < 0 => {
            diags.error(value.span(), format!("{} must not be negative", field.what()), example);
            return default;
        }
        RawDuration::Seconds(s) => Duration::from_secs(s.unsigned_abs()),
        RawDuration::Text(text) => match parse_duration(text) {
            Ok(d) => d,
            Err(err) => {
                let hint = if matches!(err, DurationError::Malformed("the unit is missing")) {
                    format!("add a unit (\"{}s\") or drop the quotes to mean seconds ({})", text.trim(), text.trim())
                } else {
                    format!("durations are {DURATION_FORMS}")
                };
                diags.error(
                    value.span(),
                    format!("{} is not a valid duration ({text:?}): {}", field.what(), err.reason()),
                    hint,
                );
                return default;
            }
        },
    };
    if min == Min::Positive && parsed.is_zero() {
        diags.error(value.span(), format!("{} must be longer than 0s", field.what()), example);
        return default;
    }
    parsed
}

/// An integer field that must be at least `min` and fit a `u32`.
fn count(value: Option<&Spanned<i64>>, field: Field<'_>, min: u32, default: u32, diags: &mut Diags) -> u32 {
    let Some(value) = value else { return default };
    let n = *value.get_ref();
    if n < i64::from(min) {
        diags.error(
            value.span(),
            format!("{} must be at least {min}, not {n}", field.what()),
            field.example(&default.max(min).to_string()),
        );
        return default;
    }
    match u32::try_from(n) {
        Ok(n) => n,
        Err(_) => {
            diags.error(value.span(), format!("{} is too large (at most {})", field.what(), u32::MAX), None);
            default
        }
    }
}

fn quantity(
    value: Option<&Spanned<RawIntOrString>>,
    field: Field<'_>,
    default: Quantity,
    diags: &mut Diags,
) -> Quantity {
    let Some(value) = value else { return default };
    let hint = "use a count (1) or a percentage of `count` (\"25%\")";
    match value.get_ref() {
        RawIntOrString::Int(n) if *n < 0 => {
            diags.error(value.span(), format!("{} must not be negative", field.what()), hint);
            default
        }
        RawIntOrString::Int(n) => match u32::try_from(*n) {
            Ok(n) => Quantity::Count(n),
            Err(_) => {
                diags.error(value.span(), format!("{} is too large", field.what()), hint);
                default
            }
        },
        RawIntOrString::Text(text) => {
            let t = text.trim();
            if let Some(p) = t.strip_suffix('%') {
                match p.trim().parse::<u32>() {
                    Ok(p) if p <= 100 => return Quantity::Percent(p),
                    Ok(_) => {
                        diags.error(value.span(), format!("{} must be at most 100%, not {t}", field.what()), hint);
                        return default;
                    }
                    Err(_) => {}
                }
            }
            let hint = if t.parse::<u32>().is_ok() {
                format!("remove the quotes for a count ({t}) or add % for a percentage (\"{t}%\")")
            } else {
                hint.to_string()
            };
            diags.error(value.span(), format!("{} is not a count or a percentage ({text:?})", field.what()), hint);
            default
        }
    }
}

fn status_range(value: Option<&Spanned<RawIntOrString>>, field: Field<'_>, diags: &mut Diags) -> StatusRange {
    match value {
        None => DEFAULT_EXPECT_STATUS,
        Some(v) => status_range_at(v.get_ref(), v.span(), field, diags),
    }
}

/// At most this many smoke checks: each one delays every new instance.
const MAX_SMOKE_CHECKS: usize = 20;

/// `smoke` in `[processes.NAME.health]`.
fn smoke_checks(raw: Option<&Spanned<Vec<Spanned<RawSmoke>>>>, table: &str, diags: &mut Diags) -> Vec<SmokeCheck> {
    let Some(raw) = raw else { return Vec::new() };
    if raw.get_ref().len() > MAX_SMOKE_CHECKS {
        diags.error(
            raw.span(),
            format!("`smoke` in [{table}] lists {} paths; at most {MAX_SMOKE_CHECKS} are allowed", raw.get_ref().len()),
            "keep the pages that prove the release works (a page that reads the database, one that renders templates and assets)",
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for entry in raw.get_ref() {
        let (path, expect) = match entry.get_ref() {
            RawSmoke::Path(p) => (p, None),
            RawSmoke::Check(c) => (&c.path, c.expect_status.as_ref()),
        };
        let field = Field::new(table, "smoke");
        let Some(path) = smoke_path(path, entry.span(), table, diags) else { continue };
        let expect_status = match expect {
            None => DEFAULT_EXPECT_STATUS,
            Some(v) => status_range_at(v, entry.span(), field, diags),
        };
        out.push(SmokeCheck { path, expect_status });
    }
    out
}

/// A smoke path: a URL path and query the instance is asked for, as a
/// browser would ask for it.
fn smoke_path(v: &str, span: std::ops::Range<usize>, table: &str, diags: &mut Diags) -> Option<String> {
    let problem = if v.contains("://") || v.starts_with("//") {
        Some("is a URL; give the path only (the instance is asked directly, on its own port)")
    } else if !v.starts_with('/') {
        Some("must start with '/'")
    } else if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain spaces or control characters (percent-encode them: %20)")
    } else if v.contains('#') {
        Some("must not contain a fragment ('#…' never reaches a server)")
    } else {
        None
    };
    let Some(problem) = problem else { return Some(v.to_string()) };
    let authority = v.find("://").map(|i| i + 3).or(v.starts_with("//").then_some(2));
    let fixed = match authority {
        Some(i) => v[i..].find('/').map_or("/".to_string(), |j| v[i + j..].to_string()),
        None => {
            let t: String = v.chars().filter(|c| !c.is_whitespace() && !c.is_control()).collect();
            let t = t.split('#').next().unwrap_or("").trim_start_matches('/').to_string();
            format!("/{t}")
        }
    };
    diags.error(
        span,
        format!("a path in `smoke` of [{table}] {problem} ({v:?})"),
        format!("for example: smoke = [\"{fixed}\"]"),
    );
    None
}

fn status_range_at(
    value: &RawIntOrString,
    span: std::ops::Range<usize>,
    field: Field<'_>,
    diags: &mut Diags,
) -> StatusRange {
    let default = DEFAULT_EXPECT_STATUS;
    let hint = "use one status (200) or an inclusive range of statuses (\"200-399\"), between 100 and 599";
    let valid = |n: i64| (100..=599).contains(&n);
    let range = match value {
        RawIntOrString::Int(n) => Some((*n, *n)),
        RawIntOrString::Text(text) => {
            let t = text.trim();
            match t.split_once('-') {
                Some((a, b)) => a.trim().parse::<i64>().ok().zip(b.trim().parse::<i64>().ok()),
                None => t.parse::<i64>().ok().map(|n| (n, n)),
            }
        }
    };
    match range {
        Some((min, max)) if valid(min) && valid(max) && min <= max => StatusRange { min: min as u16, max: max as u16 },
        Some((min, max)) if valid(min) && valid(max) => {
            diags.error(
                span.clone(),
                format!("{} is an empty range: {min} is greater than {max}", field.what()),
                format!("write the smaller status first: \"{max}-{min}\""),
            );
            default
        }
        Some(_) => {
            diags.error(span.clone(), format!("{} must be HTTP statuses between 100 and 599", field.what()), hint);
            default
        }
        None => {
            diags.error(span.clone(), format!("{} is not a status or a range of statuses", field.what()), hint);
            default
        }
    }
}

fn validate_processes(processes: Option<&Spanned<RawMap<Spanned<RawProcess>>>>, diags: &mut Diags) -> Vec<ProcessSpec> {
    // No processes at all was reported by the walk.
    let Some(processes) = processes else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut web: Option<String> = None;
    for (name, process) in processes.get_ref().iter() {
        let n = name.get_ref();
        let process_name = ProcessName::new(n.as_str());
        if let Err(err) = &process_name {
            let fixed = sanitize_app_name(n);
            diags.error(
                name.span(),
                format!("invalid process name {}: {}", display_key(n), err.rule),
                format!("for example: [processes.{fixed}]"),
            );
        }
        let path = format!("processes.{}", display_key(n));
        let spec = validate_process(n, process_name.ok(), &path, process, diags);
        if let Some(spec) = spec {
            if spec.kind == ProcessKind::Web {
                if let Some(first) = &web {
                    diags.error(
                        name.span(),
                        format!("only one process can be of kind web, and [processes.{first}] already is"),
                        format!(
                            "the proxy sends all HTTP traffic to one web process: set kind = \"worker\" in [{path}], or deploy it as a separate app"
                        ),
                    );
                } else {
                    web = Some(display_key(n));
                }
            }
            out.push(spec);
        }
    }
    out
}

/// One process. Everything is checked even when its name (already
/// reported) or its kind is invalid; `None` then.
pub(crate) fn validate_process(
    name: &str,
    process_name: Option<ProcessName>,
    path: &str,
    process: &Spanned<RawProcess>,
    diags: &mut Diags,
) -> Option<ProcessSpec> {
    let raw = process.get_ref();
    let f = |key| Field::new(path, key);

    let kind = match &raw.kind {
        None if name == "web" => Some(ProcessKind::Web),
        None => Some(ProcessKind::Worker),
        Some(kind) => match kind.get_ref().as_str() {
            "web" => Some(ProcessKind::Web),
            "worker" => Some(ProcessKind::Worker),
            "singleton" => Some(ProcessKind::Singleton),
            other => {
                let mean = did_you_mean(other, &KINDS).map(|k| format!("did you mean `{k}`? ")).unwrap_or_default();
                diags.error(
                    kind.span(),
                    format!("unknown kind {other:?} in [{path}]"),
                    format!(
                        "{mean}kinds are: web (gets $PORT, is health-checked and receives HTTP), worker (no port), singleton (a worker that never runs twice, such as celery beat)"
                    ),
                );
                None
            }
        },
    };

    // A missing command was reported by the walk.
    let command_value = raw.command.as_ref().and_then(|c| command(c, f("command"), diags));

    let mut count_value = count(raw.count.as_ref(), f("count"), 0, DEFAULT_COUNT, diags);
    if kind == Some(ProcessKind::Singleton) && count_value > 1 {
        if let Some(c) = &raw.count {
            diags.error(
                c.span(),
                format!("`count` in [{path}] is {count_value}, but a singleton runs 0 or 1 instances"),
                "set count = 1 (or 0 to stop it); if several instances are fine, set kind = \"worker\"",
            );
        }
        count_value = 1;
    }

    let stop_signal = match &raw.stop_signal {
        None => DEFAULT_STOP_SIGNAL,
        Some(s) => Signal::parse(s.get_ref()).unwrap_or_else(|| {
            let names: Vec<&str> = Signal::ALL.iter().map(|s| s.name()).collect();
            diags.error(
                s.span(),
                format!("unknown `stop_signal` {:?} in [{path}]", s.get_ref()),
                format!("use one of {} (the SIG prefix is optional)", names.join(", ")),
            );
            DEFAULT_STOP_SIGNAL
        }),
    };

    let stop_timeout =
        duration(raw.stop_timeout.as_ref(), f("stop_timeout"), Min::Positive, DEFAULT_STOP_TIMEOUT, diags);
    let drain_timeout =
        duration(raw.drain_timeout.as_ref(), f("drain_timeout"), Min::Zero, DEFAULT_DRAIN_TIMEOUT, diags);
    let ready_after = duration(raw.ready_after.as_ref(), f("ready_after"), Min::Zero, DEFAULT_READY_AFTER, diags);
    let is_web = kind == Some(ProcessKind::Web);
    let not_web = matches!(kind, Some(ProcessKind::Worker | ProcessKind::Singleton));
    if let (true, Some(d)) = (not_web, &raw.drain_timeout) {
        diags.error(
            d.span(),
            format!("`drain_timeout` in [{path}] applies only to web processes"),
            "remove it (a worker gets stop_signal, then stop_timeout to finish), or set kind = \"web\"",
        );
    }
    if let (true, Some(r)) = (is_web, &raw.ready_after) {
        diags.error(
            r.span(),
            format!("`ready_after` in [{path}] applies only to workers and singletons"),
            format!("a web instance is ready when its health check passes: configure [{path}.health] instead"),
        );
    }

    let env = raw.env.as_ref().map(|e| validate_env(e, &format!("{path}.env"), diags)).unwrap_or_default();

    let health_path = format!("{path}.health");
    let health = match (&raw.health, kind) {
        (Some(h), Some(ProcessKind::Worker | ProcessKind::Singleton)) => {
            diags.error(
                h.span(),
                format!("[{health_path}] applies only to web processes"),
                format!(
                    "a worker has no port to check: remove the table, or set ready_after in [{path}] to say how long it must stay up to count as ready"
                ),
            );
            None
        }
        (h, Some(ProcessKind::Web)) => Some(validate_health(h.as_ref().map(|h| h.get_ref()), &health_path, diags)),
        _ => None,
    };

    let queue = raw.queue.as_ref().and_then(|q| crate::autoscale::validate_queue(q, path, kind, diags));
    let autoscale = raw
        .autoscale
        .as_ref()
        .and_then(|a| crate::autoscale::validate_autoscale(a, path, kind, raw.queue.is_some(), diags));
    if let Some(a) = &autoscale {
        // `count` is where autoscaling starts: within the bounds, or min.
        match &raw.count {
            None => count_value = a.min,
            Some(c) if !a.allows(count_value) => diags.error(
                c.span(),
                format!(
                    "`count` in [{path}] is {count_value}, outside the autoscaling bounds of [{path}.autoscale] (min {}, max {})",
                    a.min, a.max
                ),
                format!(
                    "count is the number of instances autoscaling starts from: set it from {} to {}, or leave it out to start at min",
                    a.min, a.max
                ),
            ),
            Some(_) => {}
        }
    }

    let rollout_path = format!("{path}.rollout");
    let raw_rollout = raw.rollout.as_ref().map(|r| r.get_ref());
    let rollout = validate_rollout(raw_rollout, &rollout_path, kind, count_value, diags);

    // Cross-field rules: a new instance must be able to pass in time.
    let health_timeout_span = raw_rollout.and_then(|r| r.health_timeout.as_ref()).map(|h| h.span());
    if let Some(h) = &health {
        let needed = h.interval.saturating_mul(h.healthy_threshold);
        if needed > rollout.health_timeout || h.timeout > rollout.health_timeout {
            let span = health_timeout_span
                .clone()
                .or_else(|| raw.health.as_ref().map(|h| h.span()))
                .unwrap_or_else(|| process.span());
            let (what, at_least) = if needed > rollout.health_timeout {
                (
                    format!(
                        "{} health checks {} apart ({})",
                        h.healthy_threshold,
                        format_duration(h.interval),
                        format_duration(needed)
                    ),
                    needed,
                )
            } else {
                (format!("one health check timing out ({})", format_duration(h.timeout)), h.timeout)
            };
            diags.error(
                span,
                format!(
                    "`health_timeout` in [{rollout_path}] ({}) is shorter than {what}: a new instance could never become healthy in time",
                    format_duration(rollout.health_timeout)
                ),
                format!(
                    "raise health_timeout to at least \"{}\", or lower interval, timeout or healthy_threshold in [{health_path}]",
                    format_duration(at_least)
                ),
            );
        }
    }
    if not_web && ready_after >= rollout.health_timeout {
        let span = health_timeout_span
            .or_else(|| raw.ready_after.as_ref().map(|r| r.span()))
            .unwrap_or_else(|| process.span());
        diags.error(
            span,
            format!(
                "`health_timeout` in [{rollout_path}] ({}) is not longer than `ready_after` ({}): a new instance could never become ready in time",
                format_duration(rollout.health_timeout),
                format_duration(ready_after)
            ),
            "make health_timeout longer than ready_after",
        );
    }

    let restart = validate_restart(raw.restart.as_ref().map(|r| r.get_ref()), &format!("{path}.restart"), diags);

    Some(ProcessSpec {
        name: process_name?,
        kind: kind?,
        command: command_value?,
        count: count_value,
        stop_signal,
        stop_timeout,
        drain_timeout,
        ready_after,
        health,
        restart,
        rollout,
        env,
        autoscale,
        queue,
    })
}

fn validate_health(raw: Option<&RawHealth>, path: &str, diags: &mut Diags) -> HealthCheck {
    let f = |key| Field::new(path, key);
    let default = RawHealth::default();
    let raw = raw.unwrap_or(&default);
    let health_path = match &raw.path {
        None => DEFAULT_HEALTH_PATH.to_string(),
        Some(p) => {
            let v = p.get_ref();
            if !v.starts_with('/') || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                let fixed: String = v.chars().filter(|c| !c.is_whitespace() && !c.is_control()).collect();
                let fixed = if fixed.starts_with('/') { fixed } else { format!("/{fixed}") };
                diags.error(
                    p.span(),
                    format!("`path` in [{path}] must be a URL path starting with '/', without spaces ({v:?})"),
                    format!("for example: path = \"{fixed}\""),
                );
                DEFAULT_HEALTH_PATH.to_string()
            } else {
                v.clone()
            }
        }
    };
    HealthCheck {
        path: health_path,
        interval: duration(raw.interval.as_ref(), f("interval"), Min::Positive, DEFAULT_HEALTH_INTERVAL, diags),
        timeout: duration(raw.timeout.as_ref(), f("timeout"), Min::Positive, DEFAULT_HEALTH_TIMEOUT, diags),
        healthy_threshold: count(
            raw.healthy_threshold.as_ref(),
            f("healthy_threshold"),
            1,
            DEFAULT_HEALTHY_THRESHOLD,
            diags,
        ),
        unhealthy_threshold: count(
            raw.unhealthy_threshold.as_ref(),
            f("unhealthy_threshold"),
            1,
            DEFAULT_UNHEALTHY_THRESHOLD,
            diags,
        ),
        expect_status: status_range(raw.expect_status.as_ref(), f("expect_status"), diags),
        smoke: smoke_checks(raw.smoke.as_ref(), path, diags),
        host: raw.host.as_ref().and_then(|h| {
            let v = h.get_ref();
            if valid_host_header(v) {
                Some(v.clone())
            } else {
                diags.error(
                    h.span(),
                    format!(
                        "`host` in [{path}] must be a host name or address, optionally with a port, as a Host header \
                         carries it ({v:?})"
                    ),
                    "for example: host = \"notes.example.com\" (a name your app accepts, e.g. in Django's ALLOWED_HOSTS)",
                );
                None
            }
        }),
    }
}

/// `notes.example.com`, `127.0.0.1:8000`, `[::1]:8000`: what a `Host`
/// header may carry (RFC 9110 §7.2: uri-host [":" port]), restricted to
/// names, IPv4 and bracketed IPv6 addresses.
fn valid_host_header(v: &str) -> bool {
    let (host, port) = match v.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((addr, tail)) if addr.parse::<std::net::Ipv6Addr>().is_ok() => match tail {
                "" => return true,
                t => ("ipv6", t.strip_prefix(':')),
            },
            _ => return false,
        },
        None => match v.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (v, None),
        },
    };
    let port_ok = match port {
        None => true,
        Some(p) => !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok(),
    };
    let host_ok = host == "ipv6"
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    port_ok && host_ok
}

fn validate_rollout(
    raw: Option<&RawRollout>,
    path: &str,
    kind: Option<ProcessKind>,
    count_value: u32,
    diags: &mut Diags,
) -> Rollout {
    let f = |key| Field::new(path, key);
    let default = RawRollout::default();
    let raw = raw.unwrap_or(&default);
    let singleton = kind == Some(ProcessKind::Singleton);
    let (surge_default, unavailable_default) = if singleton {
        (DEFAULT_SINGLETON_MAX_SURGE, DEFAULT_SINGLETON_MAX_UNAVAILABLE)
    } else {
        (DEFAULT_MAX_SURGE, DEFAULT_MAX_UNAVAILABLE)
    };
    let mut max_surge = quantity(raw.max_surge.as_ref(), f("max_surge"), surge_default, diags);
    let max_unavailable = quantity(raw.max_unavailable.as_ref(), f("max_unavailable"), unavailable_default, diags);
    let health_timeout = duration(
        raw.health_timeout.as_ref(),
        f("health_timeout"),
        Min::Positive,
        DEFAULT_ROLLOUT_HEALTH_TIMEOUT,
        diags,
    );

    // Resolved against the configured count (at least 1), as the rollout
    // will be; a later `scale` is the planner's business.
    let of = count_value.max(1);
    if singleton && max_surge.resolve(of, true) > 0 {
        if let Some(s) = &raw.max_surge {
            diags.error(
                s.span(),
                format!(
                    "`max_surge` in [{path}] must be 0: a singleton never runs two instances, even during a rollout"
                ),
                "remove max_surge; a singleton is replaced by stopping the old instance before starting the new one",
            );
        }
        max_surge = DEFAULT_SINGLETON_MAX_SURGE;
    }
    if max_surge.resolve(of, true) == 0 && max_unavailable.resolve(of, false) == 0 {
        let span = raw.max_unavailable.as_ref().or(raw.max_surge.as_ref()).map(|s| s.span());
        let hint = if singleton {
            "a singleton is stopped before it is replaced: set max_unavailable = 1 (or remove it)".to_string()
        } else {
            "allow one extra instance (max_surge = 1) or one missing instance (max_unavailable = 1)".to_string()
        };
        let message = format!(
            "`max_surge` and `max_unavailable` in [{path}] both resolve to 0 with count = {of}: a rollout could never replace an instance"
        );
        match span {
            Some(span) => diags.error(span, message, hint),
            None => diags.error_unlocated(message, hint),
        }
    }
    let canary = crate::canary::validate_canary(raw, path, kind, diags);
    Rollout { max_surge, max_unavailable, health_timeout, canary }
}

fn validate_restart(raw: Option<&RawRestart>, path: &str, diags: &mut Diags) -> RestartPolicy {
    let f = |key| Field::new(path, key);
    let default = RawRestart::default();
    let raw = raw.unwrap_or(&default);
    let backoff_initial =
        duration(raw.backoff_initial.as_ref(), f("backoff_initial"), Min::Positive, DEFAULT_BACKOFF_INITIAL, diags);
    let backoff_max = duration(raw.backoff_max.as_ref(), f("backoff_max"), Min::Positive, DEFAULT_BACKOFF_MAX, diags);
    if backoff_max < backoff_initial {
        let span = raw.backoff_max.as_ref().or(raw.backoff_initial.as_ref()).map(|s| s.span());
        let message = format!(
            "`backoff_max` in [{path}] ({}) is shorter than `backoff_initial` ({})",
            format_duration(backoff_max),
            format_duration(backoff_initial)
        );
        let hint = "backoff grows from backoff_initial up to backoff_max: make backoff_max at least backoff_initial";
        match span {
            Some(span) => diags.error(span, message, hint),
            None => diags.error_unlocated(message, hint),
        }
    }
    RestartPolicy {
        backoff_initial,
        backoff_max,
        reset_after: duration(raw.reset_after.as_ref(), f("reset_after"), Min::Positive, DEFAULT_RESET_AFTER, diags),
        crash_loop_after: count(
            raw.crash_loop_after.as_ref(),
            f("crash_loop_after"),
            1,
            DEFAULT_CRASH_LOOP_AFTER,
            diags,
        ),
    }
}

/// `declared`: every process name in the file, valid or not.
fn validate_release(
    raw: Option<&Spanned<RawRelease>>,
    declared: &[&str],
    processes: &[ProcessSpec],
    diags: &mut Diags,
) -> ReleaseSpec {
    let default = RawRelease::default();
    let raw = raw.map(|r| r.get_ref()).unwrap_or(&default);
    let f = |key| Field::new("release", key);
    let mut order = Vec::new();
    if let Some(list) = &raw.order {
        let mut seen: Vec<&str> = Vec::new();
        for item in list.get_ref() {
            let n = item.get_ref().as_str();
            if seen.contains(&n) {
                diags.error(item.span(), format!("`order` in [release] names `{n}` twice"), "remove the second one");
                continue;
            }
            seen.push(n);
            if declared.contains(&n) {
                // A process that did not validate was reported already.
                if let Some(p) = processes.iter().find(|p| p.name.as_str() == n) {
                    order.push(p.name.clone());
                }
            } else {
                let mean = did_you_mean(n, declared).map(|d| format!("did you mean `{d}`? ")).unwrap_or_default();
                diags.error(
                    item.span(),
                    format!("`order` in [release] names {n:?}, which is not a process"),
                    format!("{mean}processes: {}", declared.join(", ")),
                );
            }
        }
    }
    ReleaseSpec {
        tasks: raw.tasks.as_ref().map(|t| commands(t, f("tasks"), diags)).unwrap_or_default(),
        post_tasks: raw.post_tasks.as_ref().map(|t| commands(t, f("post_tasks"), diags)).unwrap_or_default(),
        task_timeout: duration(
            raw.task_timeout.as_ref(),
            f("task_timeout"),
            Min::Positive,
            DEFAULT_TASK_TIMEOUT,
            diags,
        ),
        retain_releases: count(
            raw.retain_releases.as_ref(),
            f("retain_releases"),
            MIN_RETAIN_RELEASES,
            DEFAULT_RETAIN_RELEASES,
            diags,
        ),
        order,
    }
}
