//! The request target, read once: the path normalised (RFC 3986 §6.2.2) and the
//! host validated. Routing, the session endpoints and forwarding all use this one
//! reading, so an upstream never resolves a path or host the proxy did not check.
//!
//! Path: percent-encoded unreserved characters are decoded (`%61` → `a`), other
//! escapes keep their meaning (hex upper-cased), dot segments are removed,
//! repeated slashes merged. Refused: climbing above the root, `%2F`, `%5C`, `%00`,
//! a raw `\`, a dot segment with parameters (`..;x`, read as `..` by some servers),
//! a malformed escape. Host: a name or IP literal, an optional numeric port, a
//! trailing dot dropped; anything else (a comma, a second colon, a userinfo) is
//! refused, and an HTTP/1.1 request must carry exactly one `Host`.

use http::header::{self, HeaderValue};
use http::{Request, Uri, Version};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("the path holds an encoded slash, backslash or NUL, or a raw backslash")]
    ForbiddenByte,
    #[error("the path holds a dot segment with parameters")]
    DotParameter,
    #[error("the path holds a malformed percent-encoding")]
    BadEscape,
    #[error("the request target is not an absolute path")]
    NotAbsolute,
    #[error("the Host is malformed")]
    BadHost,
    #[error("an HTTP/1.1 request needs exactly one Host header")]
    HostCount,
}

impl TargetError {
    /// The client-facing description (safe: it names no input).
    pub fn description(self) -> &'static str {
        match self {
            TargetError::AboveRoot => "the path climbs above the root",
            TargetError::ForbiddenByte => "the path holds an encoded slash, backslash or NUL",
            TargetError::DotParameter => "the path holds a dot segment with parameters",
            TargetError::BadEscape => "the path holds a malformed percent-encoding",
            TargetError::NotAbsolute => "the request target must be an absolute path",
            TargetError::BadHost => "the Host header is malformed",
            TargetError::HostCount => "an HTTP/1.1 request needs exactly one Host header",
        }
    }
}

/// What routing and forwarding read of a request.
#[derive(Debug, Clone)]
pub struct Target {
    uri: Uri,
    /// `None` when the request's own path is already normal (the common case: no allocation).
    normalised: Option<String>,
    /// The validated `:authority` (HTTP/2, absolute-form) or `Host`, trailing dot dropped.
    authority: Option<HeaderValue>,
}

impl Target {
    /// Reads `req`'s target; `Err` is a `400 bad_request`.
    pub fn read<B>(req: &Request<B>) -> Result<Self, TargetError> {
        let uri = req.uri();
        let normalised = match normalise_path(uri.path())? {
            std::borrow::Cow::Borrowed(_) => None,
            std::borrow::Cow::Owned(p) => Some(p),
        };
        let hosts = req.headers().get_all(header::HOST);
        let mut iter = hosts.iter();
        let first = iter.next();
        let second = iter.next().is_some();
        let needs_host = req.version() == Version::HTTP_11;
        if second || (needs_host && first.is_none()) {
            return Err(TargetError::HostCount);
        }
        // RFC 9112 §3.2.2: an absolute-form target (and HTTP/2's :authority) wins over Host.
        let authority = match uri.authority() {
            Some(a) => Some(checked_authority_str(a.as_str())?),
            None => match first {
                Some(h) => Some(checked_authority(h)?),
                None => None,
            },
        };
        Ok(Self { uri: uri.clone(), normalised, authority })
    }

    /// The original request a forward-auth subrequest describes: its
    /// origin-form target (`/path?query`) and its `Host`.
    pub fn forwarded(target: &str, host: Option<&HeaderValue>) -> Result<Self, TargetError> {
        if !target.starts_with('/') {
            return Err(TargetError::NotAbsolute);
        }
        let uri: Uri = target.parse().map_err(|_| TargetError::NotAbsolute)?;
        let normalised = match normalise_path(uri.path())? {
            std::borrow::Cow::Borrowed(_) => None,
            std::borrow::Cow::Owned(p) => Some(p),
        };
        let authority = host.map(checked_authority).transpose()?;
        Ok(Self { uri, normalised, authority })
    }

    /// The request target as sent.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The normalised path.
    pub fn path(&self) -> &str {
        self.normalised.as_deref().unwrap_or_else(|| self.uri.path())
    }

    /// Whether the path needed no normalisation (the client's spelling is the normal one).
    pub fn is_normal(&self) -> bool {
        self.normalised.is_none()
    }

    /// The query, exactly as the client sent it.
    pub fn query(&self) -> Option<&str> {
        self.uri.query()
    }

    /// `host[:port]` as validated; `None` only for an HTTP/1.0 request without `Host`.
    pub fn authority(&self) -> Option<&HeaderValue> {
        self.authority.as_ref()
    }

    /// The authority as text (validated: always ASCII).
    pub fn authority_str(&self) -> Option<&str> {
        self.authority.as_ref().and_then(|a| a.to_str().ok())
    }
}

/// Validates a `Host` value, reusing its bytes when nothing needs to change.
fn checked_authority(v: &HeaderValue) -> Result<HeaderValue, TargetError> {
    let s = v.to_str().map_err(|_| TargetError::BadHost)?;
    match check_authority(s)? {
        None => Ok(v.clone()),
        Some(fixed) => HeaderValue::try_from(fixed).map_err(|_| TargetError::BadHost),
    }
}

fn checked_authority_str(s: &str) -> Result<HeaderValue, TargetError> {
    let fixed = check_authority(s)?;
    HeaderValue::try_from(fixed.as_deref().unwrap_or(s)).map_err(|_| TargetError::BadHost)
}

/// `Ok(None)`: `s` is fine as it is; `Ok(Some(t))`: use `t` (trailing dot dropped).
pub fn check_authority(s: &str) -> Result<Option<String>, TargetError> {
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(TargetError::BadHost)?;
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(TargetError::BadHost);
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(TargetError::BadHost)?),
        };
        (None, port)
    } else {
        match s.split_once(':') {
            Some((n, p)) => (Some(n), Some(p)),
            None => (Some(s), None),
        }
    };
    if let Some(p) = port {
        let digits = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits || p.parse::<u32>().map_or(true, |n| n > 65_535) {
            return Err(TargetError::BadHost);
        }
    }
    let Some(name) = name else { return Ok(None) };
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let label_ok =
        |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if !trimmed.split('.').all(label_ok) {
        return Err(TargetError::BadHost);
    }
    if trimmed.len() == name.len() {
        return Ok(None);
    }
    Ok(Some(match port {
        Some(p) => format!("{trimmed}:{p}"),
        None => trimmed.to_owned(),
    }))
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` could change under normalisation; false for the usual clean path.
fn needs_work(path: &[u8]) -> bool {
    path.iter()
        .enumerate()
        .any(|(i, &b)| b == b'%' || b == b'\\' || (b == b'/' && matches!(path.get(i + 1), Some(b'/' | b'.'))))
}

/// Normalises an absolute path; borrows it when it is already normal.
pub fn normalise_path(path: &str) -> Result<std::borrow::Cow<'_, str>, TargetError> {
    if !path.starts_with('/') {
        return Err(TargetError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    if !needs_work(bytes) {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    // 1. Escapes: decode unreserved, refuse the dangerous ones, upper-case the rest.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else { return Err(TargetError::BadEscape) };
                let v = hi << 4 | lo;
                match v {
                    b'/' | b'\\' | 0 => return Err(TargetError::ForbiddenByte),
                    v if unreserved(v) => decoded.push(v),
                    v => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        decoded.extend_from_slice(&[
                            b'%',
                            HEX[usize::from(v >> 4)],
                            HEX[usize::from(v & 15)],
                        ]);
                    }
                }
                i += 3;
            }
            b'\\' => return Err(TargetError::ForbiddenByte),
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII escapes were decoded, so the text stays valid UTF-8.
    let decoded = String::from_utf8(decoded).map_err(|_| TargetError::BadEscape)?;
    // 2. Segments: drop `.` and empty ones, `..` pops, refuse climbing above the root.
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded[1..].split('/') {
        trailing_slash = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                kept.pop().ok_or(TargetError::AboveRoot)?;
            }
            s if matches!(s.split(';').next(), Some("." | "..")) => return Err(TargetError::DotParameter),
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for seg in &kept {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(std::borrow::Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let ok = [
            ("/", "/"),
            ("/api/x", "/api/x"),
            ("/api/x/", "/api/x/"),
            ("/open/../api/x", "/api/x"),
            ("/open/%2e%2e/api/x", "/api/x"),
            ("/open/.%2e/api/x", "/api/x"),
            ("/open/deep/../../api/x", "/api/x"),
            ("/./api/x", "/api/x"),
            ("/%2e/api/x", "/api/x"),
            ("/%61pi/x", "/api/x"),
            ("/x/../api/x", "/api/x"),
            ("//api/x", "/api/x"),
            ("/api//x//", "/api/x/"),
            ("/api/.", "/api/"),
            ("/api/..", "/"),
            ("/a/%7euser", "/a/~user"),
            ("/a/%3f/%c3%a9", "/a/%3F/%C3%A9"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/...", "/a/..."),
            ("/a;b=1/c", "/a;b=1/c"),
        ];
        for (input, want) in ok {
            assert_eq!(normalise_path(input).as_deref(), Ok(want), "{input}");
        }
        let bad = [
            ("/..", TargetError::AboveRoot),
            ("/pub/../../internal", TargetError::AboveRoot),
            ("/%2e%2e/x", TargetError::AboveRoot),
            ("/a%2Fb", TargetError::ForbiddenByte),
            ("/a%2fb", TargetError::ForbiddenByte),
            ("/a%5Cb", TargetError::ForbiddenByte),
            ("/a%00", TargetError::ForbiddenByte),
            ("/a\\b", TargetError::ForbiddenByte),
            ("/open/..;/api", TargetError::DotParameter),
            ("/a/%zz", TargetError::BadEscape),
            ("/a/%4", TargetError::BadEscape),
            ("*", TargetError::NotAbsolute),
            ("", TargetError::NotAbsolute),
        ];
        for (input, want) in bad {
            assert_eq!(normalise_path(input), Err(want), "{input}");
        }
        assert!(matches!(normalise_path("/api/x"), Ok(std::borrow::Cow::Borrowed(_))));
    }

    #[test]
    fn hosts() {
        let ok = [
            ("api.example.com", None),
            ("API.example.com:8443", None),
            ("127.0.0.1:80", None),
            ("[::1]:443", None),
            ("[::1]", None),
            ("localhost", None),
            ("secure.example.test.", Some("secure.example.test")),
            ("secure.example.test.:8443", Some("secure.example.test:8443")),
        ];
        for (input, want) in ok {
            assert_eq!(check_authority(input), Ok(want.map(str::to_owned)), "{input}");
        }
        for bad in [
            "",
            "host:abc",
            "host:443:80",
            "host, other",
            "user@host",
            "host:",
            "host:99999",
            "a..b",
            ".",
            "[::1",
            "[zz]",
            "[::1]x",
            "host/path",
            "ho st",
        ] {
            assert_eq!(check_authority(bad), Err(TargetError::BadHost), "{bad}");
        }
    }

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_counts_and_sources() {
        let one = Target::read(&req(Version::HTTP_11, "/x", &["a.example"])).unwrap();
        assert_eq!(one.authority_str(), Some("a.example"));
        assert_eq!(Target::read(&req(Version::HTTP_11, "/x", &[])).err(), Some(TargetError::HostCount));
        assert_eq!(
            Target::read(&req(Version::HTTP_11, "/x", &["a", "b"])).err(),
            Some(TargetError::HostCount)
        );
        assert!(Target::read(&req(Version::HTTP_10, "/x", &[])).unwrap().authority().is_none());
        let h2 = Target::read(&req(Version::HTTP_2, "https://b.example/x/../y", &[])).unwrap();
        assert_eq!((h2.authority_str(), h2.path()), (Some("b.example"), "/y"));
        let absolute = Target::read(&req(Version::HTTP_11, "http://c.example/z?q=1", &["other"])).unwrap();
        assert_eq!((absolute.authority_str(), absolute.query()), (Some("c.example"), Some("q=1")));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Paths built from the pieces attacks are made of.
    fn path_like() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E".to_owned()),
            Just("%2f".to_owned()),
            Just("%5c".to_owned()),
            Just("%00".to_owned()),
            Just("%61".to_owned()),
            Just("%".to_owned()),
            Just(";".to_owned()),
            Just("\\".to_owned()),
            "[a-z]{1,3}",
            "%[0-9a-fA-F]{2}",
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|v| format!("/{}", v.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn normalising_never_panics(s in ".{0,64}") {
            let _ = normalise_path(&s);
        }

        #[test]
        fn normalising_is_idempotent_and_leaves_no_dot_segment(p in path_like()) {
            if let Ok(once) = normalise_path(&p) {
                let twice = normalise_path(&once);
                prop_assert_eq!(twice.as_deref(), Ok(&*once));
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"), "{}", once);
                for seg in once.split('/') {
                    prop_assert!(seg != "." && seg != "..", "{} from {}", once, p);
                }
                prop_assert!(!once.contains('\\'));
            }
        }

        #[test]
        fn hosts_never_panic_and_fixed_hosts_are_clean(s in "[a-zA-Z0-9.:\\[\\]@,_ -]{0,24}") {
            if let Ok(Some(fixed)) = check_authority(&s) {
                prop_assert_eq!(check_authority(&fixed), Ok(None));
            }
        }
    }
}
