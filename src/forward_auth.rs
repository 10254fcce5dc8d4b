//! Forward auth: the original request another proxy asks about, read from its
//! subrequest — Traefik and Caddy send `X-Forwarded-Method/-Proto/-Host/-Uri`,
//! nginx `X-Original-Method` and `X-Original-URI` with `Host`, and Envoy's
//! `ext_authz` the original method, path and `Host` as the subrequest's own —
//! and the extra headers of the answer.
//!
//! The listener is the front proxy's alone (bind it to loopback or a private
//! network): these headers are trusted as the front proxy wrote them. Where
//! both conventions name the method, URI or (for nginx) host, they must agree.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request};

use crate::conn::Conn;
use crate::target::Target;

static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
static X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");

/// The client's `Cookie` without the proxy's own cookies (empty when none is
/// left), on answers to subrequests that carried one: the front proxy sends it
/// upstream in place of the client's, as a proxied request would be sent.
pub static UPSTREAM_COOKIE: HeaderName = HeaderName::from_static("x-portcullis-cookie");

/// The prefix of the numbered copies of each `Set-Cookie` of an answer
/// (`X-Portcullis-Set-Cookie-1`, `-2`, …): nginx's `$upstream_http_set_cookie`
/// holds only the first `Set-Cookie`, but it can copy numbered headers one by one.
pub const NUMBERED_SET_COOKIE: &str = "x-portcullis-set-cookie-";

/// What the front proxy asks about.
pub struct Original {
    pub method: Method,
    pub target: Target,
    /// The original request came over https (`X-Forwarded-Proto`), for the CSRF origin check.
    pub tls: bool,
}

/// Reads the original request; `Err` is a `400 bad_request`.
///
/// A front proxy writes one convention and may pass a client's copy of the
/// other (nginx forwards every client header to the auth subrequest), so the
/// two must agree: a client must not choose the route or method asked about.
pub fn read<B>(req: &Request<B>, conn: &Conn) -> Result<Original, &'static str> {
    let h = req.headers();
    let method = agree(one(h, &X_FORWARDED_METHOD)?, one(h, &X_ORIGINAL_METHOD)?)?;
    let method = match method {
        Some(v) => Method::from_bytes(v.as_bytes()).map_err(|_| "the original method is not a method")?,
        None => req.method().clone(),
    };
    let forwarded_uri = one(h, &X_FORWARDED_URI)?;
    let nginx = forwarded_uri.is_none() && h.contains_key(&X_ORIGINAL_URI);
    let uri = agree(forwarded_uri, one(h, &X_ORIGINAL_URI)?)?;
    let host = match (one(h, &X_FORWARDED_HOST)?, nginx) {
        // nginx names the original host in `Host`.
        (forwarded, true) => agree(one(h, &header::HOST)?, forwarded)?,
        (Some(v), false) => Some(v),
        (None, false) => one(h, &header::HOST)?,
    };
    let target = match uri {
        Some(v) => {
            let s = v.to_str().map_err(|_| "the original URI is not ASCII")?;
            Target::forwarded(s, host)
        }
        None => {
            let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            Target::forwarded(pq, host)
        }
    }
    .map_err(|e| e.description())?;
    let tls = match one(h, &X_FORWARDED_PROTO)? {
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"https") => true,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"http") => false,
        Some(_) => return Err("X-Forwarded-Proto must be http or https"),
        None => conn.tls,
    };
    Ok(Original { method, target, tls })
}

/// The header's single value; a list (several fields, or commas from a chain of
/// proxies) is refused rather than guessed at.
fn one<'a>(h: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a HeaderValue>, &'static str> {
    let mut all = h.get_all(name).iter();
    match (all.next(), all.next()) {
        (None, _) => Ok(None),
        (Some(v), None)
            if !v.as_bytes().contains(&b',') || *name == X_FORWARDED_URI || *name == X_ORIGINAL_URI =>
        {
            Ok(Some(v))
        }
        _ => Err("a forwarded request header holds more than one value"),
    }
}

/// The value both conventions name, refusing two different ones.
fn agree<'a>(
    a: Option<&'a HeaderValue>,
    b: Option<&'a HeaderValue>,
) -> Result<Option<&'a HeaderValue>, &'static str> {
    match (a, b) {
        (Some(a), Some(b)) if a != b => Err("the forwarded and original request headers disagree"),
        (a, b) => Ok(a.or(b)),
    }
}

/// Adds the numbered copies of `set_cookies` to an answer.
pub fn number_cookies(headers: &mut HeaderMap, set_cookies: &[HeaderValue]) {
    for (i, c) in set_cookies.iter().enumerate() {
        if let Ok(name) = HeaderName::try_from(format!("{NUMBERED_SET_COOKIE}{}", i + 1)) {
            headers.insert(name, c.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/auth-check");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn conn() -> Conn {
        Conn::for_forward_auth("127.0.0.1:1".parse().unwrap())
    }

    #[test]
    fn traefik_and_caddy_headers() {
        let r = req(&[
            ("host", "auth.internal"),
            ("x-forwarded-method", "POST"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "api.example.com"),
            ("x-forwarded-uri", "/orders/./7?x=1,2"),
        ]);
        let o = read(&r, &conn()).unwrap();
        assert_eq!(o.method, Method::POST);
        assert!(o.tls);
        assert_eq!(o.target.path(), "/orders/7");
        assert_eq!(o.target.query(), Some("x=1,2"));
        assert_eq!(o.target.authority_str(), Some("api.example.com"));
    }

    #[test]
    fn nginx_headers_use_host() {
        let r =
            req(&[("host", "api.example.com"), ("x-original-method", "DELETE"), ("x-original-uri", "/a/b")]);
        let o = read(&r, &conn()).unwrap();
        assert_eq!(o.method, Method::DELETE);
        assert!(!o.tls);
        assert_eq!(o.target.path(), "/a/b");
        assert_eq!(o.target.authority_str(), Some("api.example.com"));
    }

    #[test]
    fn conventions_that_agree_are_read_as_one() {
        let r = req(&[
            ("host", "api.example.com"),
            ("x-original-method", "POST"),
            ("x-forwarded-method", "POST"),
            ("x-original-uri", "/a/b"),
            ("x-forwarded-host", "api.example.com"),
        ]);
        let o = read(&r, &conn()).unwrap();
        assert_eq!((o.method, o.target.path()), (Method::POST, "/a/b"));
        assert_eq!(o.target.authority_str(), Some("api.example.com"));
    }

    #[test]
    fn envoy_sends_the_original_as_the_subrequest() {
        let r = req(&[("host", "api.example.com")]);
        let o = read(&r, &conn()).unwrap();
        assert_eq!(o.method, Method::GET);
        assert_eq!(o.target.path(), "/auth-check");
    }

    #[test]
    fn ambiguous_or_malformed_originals_are_refused() {
        for bad in [
            vec![("x-forwarded-host", "a.example, b.example")],
            vec![("x-forwarded-uri", "http://other/x")],
            vec![("x-forwarded-uri", "/a/../../etc")],
            vec![("x-forwarded-proto", "gopher")],
            vec![("x-forwarded-method", "GE T")],
        ] {
            assert!(read(&req(&bad), &conn()).is_err(), "{bad:?}");
        }
        // A client's copy of the other convention, passed on by the front proxy.
        for bad in [
            vec![("x-original-uri", "/api/x"), ("x-forwarded-uri", "/open/x")],
            vec![("x-original-method", "POST"), ("x-forwarded-method", "GET")],
            vec![("host", "api.example.com"), ("x-original-uri", "/a"), ("x-forwarded-host", "open.example")],
        ] {
            assert!(read(&req(&bad), &conn()).is_err(), "{bad:?}");
        }
        let mut r = req(&[("x-forwarded-uri", "/a")]);
        r.headers_mut().append("x-forwarded-uri", HeaderValue::from_static("/b"));
        assert!(read(&r, &conn()).is_err());
    }

    #[test]
    fn cookies_are_numbered_from_one() {
        let mut h = HeaderMap::new();
        number_cookies(&mut h, &[HeaderValue::from_static("a=1"), HeaderValue::from_static("b=2")]);
        assert_eq!(h.get("x-portcullis-set-cookie-1").unwrap(), "a=1");
        assert_eq!(h.get("x-portcullis-set-cookie-2").unwrap(), "b=2");
        assert!(h.get("x-portcullis-set-cookie-3").is_none());
    }
}
