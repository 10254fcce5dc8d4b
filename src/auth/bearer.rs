//! The `Authorization` header: a bearer token, nothing, or something malformed.

use http::header::{self, HeaderMap};

/// What the `Authorization` header holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Bearer<'a> {
    /// No header, or another scheme (e.g. `Basic`): counts as no token.
    Absent,
    /// `Bearer` with nothing usable after it, or two `Authorization` headers.
    Empty,
    Token(&'a str),
}

pub fn read(headers: &HeaderMap) -> Bearer<'_> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = all.next() else { return Bearer::Absent };
    // Two credentials: which one would the upstream read? Refuse to guess.
    if all.next().is_some() {
        return Bearer::Empty;
    }
    let bytes = value.as_bytes();
    if bytes.len() < 6 || !bytes[..6].eq_ignore_ascii_case(b"bearer") {
        return Bearer::Absent;
    }
    if bytes.len() > 6 && bytes[6] != b' ' {
        return Bearer::Absent;
    }
    // A HeaderValue holds no control byte but HTAB, so it is `to_str`'s visible
    // ASCII exactly when it is ASCII; `is_ascii` checks a word at a time.
    if !bytes.is_ascii() {
        return Bearer::Empty;
    }
    match std::str::from_utf8(&bytes[6..]).map(str::trim) {
        Ok("") | Err(_) => Bearer::Empty,
        Ok(t) => Bearer::Token(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(read(&h), Bearer::Absent);
        let cases = [
            ("Bearer abc.def.ghi", Bearer::Token("abc.def.ghi")),
            ("bearer   abc ", Bearer::Token("abc")),
            ("Bearer", Bearer::Empty),
            ("Bearer    ", Bearer::Empty),
            ("Basic dXNlcjpwYXNz", Bearer::Absent),
            ("Bearerish x", Bearer::Absent),
            ("Bearer\tabc", Bearer::Absent),
        ];
        for (v, want) in cases {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
            assert_eq!(read(&h), want, "{v}");
        }
        // Bytes `to_str` refuses (obs-text) are no token.
        h.insert(header::AUTHORIZATION, HeaderValue::from_bytes(b"Bearer abc\xe9").unwrap());
        assert_eq!(read(&h), Bearer::Empty);
        h.insert(header::AUTHORIZATION, HeaderValue::from_bytes("Bearer \u{e9}t\u{e9}".as_bytes()).unwrap());
        assert_eq!(read(&h), Bearer::Empty);
    }
}
