//! Header rewriting: hop-by-hop stripping, `X-Forwarded-*`, `X-Request-Id`.

use bytes::BytesMut;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use std::cell::{Cell, RefCell};

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one hop and never cross a proxy (RFC 9110 §7.6.1,
/// plus the `Proxy-*` family and `Proxy` itself, the httpoxy vector).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn connection_has(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok() && has_token(value.as_bytes(), token.as_bytes())
}

/// Whether a comma-separated header value (`Connection`) lists `token`,
/// ignoring case and blanks.
pub(crate) fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A request asking to switch protocols (`Connection: upgrade` and an
/// `Upgrade` header), e.g. a WebSocket handshake.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| connection_has(v, "upgrade"))
}

/// Remove hop-by-hop headers, including those named in `Connection`. With
/// `keep_upgrade`, `Upgrade` stays and `Connection: upgrade` is restored,
/// so that an upgrade handshake can cross.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names (a comparison of
    // known names is an integer compare) instead of hashing ten names for
    // removal, which was 5 % of the proxy's instructions per request.
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        strip_present(headers, keep_upgrade);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn strip_present(headers: &mut HeaderMap, keep_upgrade: bool) {
    if let Entry::Occupied(entry) = headers.entry(header::CONNECTION) {
        let (_, mut values) = entry.remove_entry_mult();
        let first = values.next();
        // More than one Connection header is rare: no allocation otherwise.
        let rest: Vec<HeaderValue> = values.collect();
        for value in first.iter().chain(rest.iter()) {
            let Ok(list) = value.to_str() else { continue };
            for token in list.split(',') {
                let token = token.trim();
                if token.is_empty()
                    || token.eq_ignore_ascii_case("upgrade")
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                    || token.eq_ignore_ascii_case("host")
                {
                    continue;
                }
                headers.remove(token);
            }
        }
    }
    for name in &HOP_BY_HOP {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
}

/// Rewrite a client's request headers for the instance.
pub(crate) fn prepare_request(
    headers: &mut HeaderMap,
    peer_ip: &HeaderValue,
    request_id: &HeaderValue,
    upgrade: bool,
    tls: bool,
    trusted: bool,
) {
    strip_hop_by_hop(headers, upgrade);
    // X-Forwarded-For: the chain a trusted proxy reports, then the peer.
    // From any other peer, what it claims is dropped: the header then
    // names the peer alone, so an app can take its first address as the
    // client's without being lied to.
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Vacant(entry) => {
            entry.insert(peer_ip.clone());
        }
        Entry::Occupied(mut entry) if !trusted => {
            entry.insert(peer_ip.clone());
        }
        Entry::Occupied(mut entry) => {
            let mut joined = String::with_capacity(64);
            for value in entry.iter() {
                if let Ok(value) = value.to_str() {
                    let value = value.trim();
                    if !value.is_empty() {
                        joined.push_str(value);
                        joined.push_str(", ");
                    }
                }
            }
            joined.push_str(peer_ip.to_str().unwrap_or("unknown"));
            match HeaderValue::from_str(&joined) {
                Ok(value) => {
                    entry.insert(value);
                }
                Err(_) => {
                    entry.insert(peer_ip.clone());
                }
            }
        }
    }
    // The proxy is the edge unless the peer is a trusted proxy, whose
    // word on how the client came is passed on (one valid value only).
    let keep_proto = trusted && {
        let mut values = headers.get_all(X_FORWARDED_PROTO).iter();
        matches!((values.next(), values.next()), (Some(v), None)
            if v.as_bytes().eq_ignore_ascii_case(b"https") || v.as_bytes().eq_ignore_ascii_case(b"http"))
    };
    if !keep_proto {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if tls { "https" } else { "http" }));
    }
    let keep_host = trusted && headers.get_all(X_FORWARDED_HOST).iter().count() == 1;
    if !keep_host {
        match headers.get(header::HOST).cloned() {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST, host);
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
    headers.insert(X_REQUEST_ID, request_id.clone());
}

/// Whether a `Host` header (or an absolute-form target's authority) is
/// `host [":" port]` as RFC 9110 §7.2 and RFC 3986 §3.2 say, as nginx
/// checks it: a name of letters, digits, `-`, `.`, `_` and `~` (no empty
/// label but a trailing dot), an IPv4 address, or an IPv6 literal in
/// brackets; a port of digits up to 65535 (or none after the colon). No
/// user info (`@`), no path, no spaces or control characters. Anything
/// else is answered 400: apps build URLs and e-mails from the host, and a
/// `Host` of `evil.com/x` or `a b` must not reach them.
pub(crate) fn valid_host(raw: &[u8]) -> bool {
    let (host, port) = if raw.first() == Some(&b'[') {
        let Some(end) = raw.iter().position(|&b| b == b']') else { return false };
        let literal = &raw[1..end];
        let ip_literal = literal.len() >= 2
            && literal.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && literal.contains(&b':');
        if !ip_literal {
            return false;
        }
        match &raw[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&raw[..=end], Some(port)),
            _ => return false,
        }
    } else {
        match raw.iter().position(|&b| b == b':') {
            Some(colon) => (&raw[..colon], Some(&raw[colon + 1..])),
            None => (raw, None),
        }
    };
    if let Some(port) = port {
        let digits_ok = port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
        if !digits_ok || (!port.is_empty() && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) > 65535) {
            return false;
        }
    }
    if host.first() == Some(&b'[') {
        return true;
    }
    // A name (or an IPv4 address): no empty label, but a trailing dot.
    let name = host.strip_suffix(b".").unwrap_or(host);
    !name.is_empty()
        && name.split(|&b| b == b'.').all(|label| !label.is_empty())
        && name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// The client's `X-Request-Id` if it is sane (1 to 128 visible ASCII
/// characters), else a fresh one.
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(value) = headers.get(X_REQUEST_ID) {
        let bytes = value.as_bytes();
        if (1..=128).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic) {
            return value.clone();
        }
    }
    generate_request_id()
}

/// 32 hex digits: a random per-thread prefix and a per-thread counter. No
/// shared atomics, no system calls after the first id of a thread, and
/// (see [`shared_value`]) no allocation for most ids.
pub(crate) fn generate_request_id() -> HeaderValue {
    thread_local! {
        static STATE: Cell<(u64, u64)> = Cell::new((random_u64(), 0));
    }
    let (prefix, n) = STATE.with(|s| {
        let (prefix, n) = s.get();
        s.set((prefix, n.wrapping_add(1)));
        (prefix, n)
    });
    let mut buf = [0u8; 32];
    write_hex(prefix, &mut buf[..16]);
    write_hex(n, &mut buf[16..]);
    shared_value(&buf).unwrap_or_else(|| HeaderValue::from_static("invalid"))
}

/// Bytes of a per-thread slab that [`shared_value`] cuts values from.
const SLAB_BYTES: usize = 4096;

/// A header value made of `bytes` (`None` if they are not a valid value),
/// copied into a per-thread slab of shared memory rather than a heap
/// allocation of its own: one allocation per slab (about a hundred request
/// ids), and each later clone of the value (the request's copy, the
/// response's) is a reference count increment, where a value made with
/// `HeaderValue::from_bytes` would allocate again when first cloned.
pub(crate) fn shared_value(bytes: &[u8]) -> Option<HeaderValue> {
    thread_local! {
        static SLAB: RefCell<BytesMut> = RefCell::new(BytesMut::new());
    }
    if bytes.len() > SLAB_BYTES / 8 {
        return HeaderValue::from_bytes(bytes).ok();
    }
    let cut = SLAB.with(|slab| {
        let mut slab = slab.borrow_mut();
        if slab.capacity() < bytes.len() {
            // The old slab is freed when its last value is.
            *slab = BytesMut::with_capacity(SLAB_BYTES);
        }
        slab.extend_from_slice(bytes);
        slab.split().freeze()
    });
    HeaderValue::from_maybe_shared(cut).ok()
}

/// A client's IP address as a header value (for `X-Forwarded-For`), made
/// once per connection. The last one made on this thread is kept and
/// handed out again (a reference count increment) while connections come
/// from the same address, as they mostly do from a load balancer or a
/// client's pool; an IPv4 address is written digit by digit otherwise
/// (`Display` for an `IpAddr`, through `fmt`, was 1,300 instructions, a
/// fortieth of a `Connection: close` request in callgrind).
pub(crate) fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(std::net::IpAddr, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, value)) = last.as_ref() {
            if *seen == ip {
                return value.clone();
            }
        }
        let value = format_ip(ip);
        *last = Some((ip, value.clone()));
        value
    })
}

fn format_ip(ip: std::net::IpAddr) -> HeaderValue {
    let mut buf = [0u8; 64];
    let len = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buf[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buf[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buf[len] = b'0' + octet % 10;
                len += 1;
            }
            len
        }
        std::net::IpAddr::V6(_) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cursor, "{ip}");
            cursor.position() as usize
        }
    };
    shared_value(&buf[..len]).unwrap_or_else(|| HeaderValue::from_static("unknown"))
}

/// `IP:PORT` (`[IPv6]:PORT`) as a header value, e.g. a `Host`.
pub(crate) fn address_value(addr: std::net::SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&addr.to_string()).unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

fn write_hex(mut v: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // std seeds RandomState from the OS once per thread.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn host_syntax() {
        for good in [
            "example.com",
            "Example.COM",
            "example.com.",
            "example.com:8080",
            "example.com:",
            "localhost",
            "my_host-1.internal",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "[2001:db8::1]",
            "[::ffff:192.0.2.1]:443",
            "x:65535",
        ] {
            assert!(valid_host(good.as_bytes()), "{good} is valid");
        }
        for bad in [
            "",
            ".",
            ":80",
            ".example.com",
            "a..b",
            "example.com/",
            "example.com/evil",
            "evil.com\\x",
            "user@example.com",
            "a b",
            "a\tb",
            "example.com:80:80",
            "example.com:8o",
            "example.com:65536",
            "example.com:123456",
            "example.com:-1",
            "exa%6dple.com",
            "example.com?x",
            "example.com#x",
            "[::1",
            "[::1]x",
            "[::1]:x",
            "[]",
            "[zz::1]",
            "::1",
            "a\x00b",
            "caf\u{e9}.fr",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} is invalid");
        }
    }

    #[test]
    fn shared_values_and_addresses() {
        assert_eq!(ip_value("10.1.2.3".parse().unwrap()), "10.1.2.3");
        assert_eq!(ip_value("2001:db8::1".parse().unwrap()), "2001:db8::1");
        assert_eq!(ip_value("2001:db8::1".parse().unwrap()), "2001:db8::1", "the kept one");
        assert_eq!(ip_value("0.0.0.0".parse().unwrap()), "0.0.0.0");
        assert!(shared_value(b"bad\nvalue").is_none());
        let big = vec![b'a'; SLAB_BYTES];
        assert_eq!(shared_value(&big).unwrap().len(), SLAB_BYTES);
    }

    proptest::proptest! {
        /// Written by hand or kept from the previous connection, the value
        /// is what `Display` writes.
        #[test]
        fn ip_values_are_the_displayed_address(a in proptest::prelude::any::<[u8; 4]>(), six: bool, twice: bool) {
            let ip = if six {
                std::net::IpAddr::from(std::net::Ipv6Addr::from(u128::from(u32::from_be_bytes(a)) << 64 | 1))
            } else {
                std::net::IpAddr::from(a)
            };
            let first = ip_value(ip);
            proptest::prop_assert_eq!(first.to_str().unwrap(), ip.to_string());
            if twice {
                proptest::prop_assert_eq!(ip_value(ip), first);
            }
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("proxy", "http://evil"),
            ("upgrade", "h2c"),
            ("x-keep", "3"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);
    }

    /// The scan that skips the removals must notice each hop-by-hop
    /// header on its own, in any case, after other headers.
    #[test]
    fn each_hop_by_hop_header_alone_is_stripped_and_others_are_left_alone() {
        for name in &HOP_BY_HOP {
            let upper = name.as_str().to_ascii_uppercase();
            let mut h = map(&[("host", "a"), ("x-keep", "1"), (upper.as_str(), "v")]);
            strip_hop_by_hop(&mut h, false);
            let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, vec!["host", "x-keep"], "{name} was not stripped");
        }
        let mut plain = map(&[("host", "a"), ("content-length", "3"), ("x-keep", "1")]);
        let before = plain.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain, before);
        strip_hop_by_hop(&mut plain, true);
        assert_eq!(plain.get("connection").unwrap(), "upgrade", "an upgrade always gets Connection: upgrade");
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("keep-alive", "1")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert!(h.get("keep-alive").is_none());
        assert!(!is_upgrade(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn forwarded_headers() {
        let peer = HeaderValue::from_static("10.0.0.9");
        let id = HeaderValue::from_static("abc");
        // An untrusted peer's X-Forwarded-* claims are replaced.
        let mut h = map(&[
            ("host", "app.test"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "https"),
        ]);
        prepare_request(&mut h, &peer, &id, false, false, false);
        assert_eq!(h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), ["10.0.0.9"]);
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "app.test");
        assert_eq!(h.get("x-request-id").unwrap(), "abc");

        let mut h = map(&[("x-forwarded-proto", "http")]);
        prepare_request(&mut h, &peer, &id, false, true, false);
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.9");
        assert!(h.get("x-forwarded-host").is_none());
    }

    #[test]
    fn a_trusted_proxy_says_how_the_client_came() {
        let peer = HeaderValue::from_static("10.0.0.9");
        let id = HeaderValue::from_static("abc");
        // A load balancer that terminated TLS for notes.example.com.
        let from_lb = || {
            map(&[("host", "10.0.0.5:8080"), ("x-forwarded-proto", "https"), ("x-forwarded-host", "notes.example.com")])
        };
        let mut h = from_lb();
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.2, 10.1.2.3"));
        prepare_request(&mut h, &peer, &id, false, false, true);
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "notes.example.com");
        // Its chain is kept, joined into one header, and the peer added.
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["203.0.113.7, 198.51.100.2, 10.1.2.3, 10.0.0.9"]
        );
        // The same from anyone else: replaced.
        let mut h = from_lb();
        prepare_request(&mut h, &peer, &id, false, false, false);
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "10.0.0.5:8080");
        // Ambiguous or invalid even from a trusted peer: set by the proxy.
        for bad in
            [&[("x-forwarded-proto", "https"), ("x-forwarded-proto", "http")][..], &[("x-forwarded-proto", "gopher")]]
        {
            let mut h = map(bad);
            prepare_request(&mut h, &peer, &id, false, false, true);
            assert_eq!(h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), ["http"], "{bad:?}");
        }
        // A trusted peer that sends none: set by the proxy.
        let mut h = map(&[("host", "app.test")]);
        prepare_request(&mut h, &peer, &id, false, true, true);
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "app.test");
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_unique_otherwise() {
        let kept = request_id(&map(&[("x-request-id", "req-42")]));
        assert_eq!(kept, "req-42");
        let bad = request_id(&map(&[("x-request-id", "has space")]));
        assert_ne!(bad, "has space");
        assert_eq!(bad.len(), 32);
        let a = generate_request_id();
        let b = generate_request_id();
        assert_ne!(a, b);
        // Cut from one shared slab: unique, valid, and still intact after
        // the slab is replaced.
        let ids: Vec<HeaderValue> = (0..1000).map(|_| generate_request_id()).collect();
        let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(HeaderValue::as_bytes).collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(ids.iter().all(|id| id.len() == 32 && id.as_bytes().iter().all(u8::is_ascii_hexdigit)));
        let long = "x".repeat(200);
        assert_ne!(request_id(&map(&[("x-request-id", &long)])), long.as_str());
    }
}
