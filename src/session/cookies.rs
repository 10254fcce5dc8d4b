//! The proxy's cookies: what they hold, how a request's cookies are read
//! (chunks joined), and the `Set-Cookie` headers that write, renew and clear
//! them. `HttpOnly`, `Secure` unless configured off, `SameSite` per
//! configuration, `Path=/`. A value too large for one cookie is split into
//! `NAME.0`, `NAME.1`, … and joined on read; a cookie that fails to open is
//! treated as absent.

use std::collections::HashMap;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use super::seal::Sealer;
use crate::config::{SameSite, SessionSettings};

/// Longest cookie value written in one piece; browsers allow about 4096 bytes
/// for name, value and attributes together.
pub const CHUNK: usize = 3800;
/// At most this many chunks are read, bounding the work a hostile Cookie header causes.
const MAX_CHUNKS: usize = 8;

/// What the refresh cookie holds: the refresh token and who the session is.
#[derive(Serialize, Deserialize, Clone, Default)]
pub struct RefreshCookie {
    pub rt: String,
    /// Unix time of the login, for `absolute_timeout` and logouts "issued before".
    pub login: i64,
    /// This session's own id (random, kept across refreshes): a logout ends it everywhere.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The subject and the provider's session id (`sid`) from the login, for
    /// back-channel logout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// The ID token from the login, sent as `id_token_hint` on RP-initiated logout.
    #[serde(default, rename = "idt", skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
    /// When the access cookie's token expires by the token response's
    /// `expires_in`: an opaque token's only expiry when introspection names none.
    #[serde(default, rename = "ate", skip_serializing_if = "Option::is_none")]
    pub access_exp: Option<i64>,
}

impl RefreshCookie {
    /// The same session holding a rotated refresh token.
    pub fn rotated(&self, rt: String) -> Self {
        Self { rt, ..self.clone() }
    }

    /// The same session holding a new access token that `expires_in` seconds from `now`.
    pub fn with_access(mut self, access_token: &str, expires_in: Option<u64>, now: i64) -> Self {
        self.access_exp = access_expiry(access_token, expires_in, now);
        self
    }
}

/// Recorded for opaque tokens only: a JWT carries its own `exp`, and the cookie
/// stays smaller without it.
fn access_expiry(access_token: &str, expires_in: Option<u64>, now: i64) -> Option<i64> {
    let jwt = access_token.bytes().filter(|b| *b == b'.').count() == 2;
    let secs = i64::try_from(expires_in?).ok()?;
    (!jwt).then(|| now.saturating_add(secs))
}

/// What the short-lived login-state cookie holds during code + PKCE.
#[derive(Serialize, Deserialize)]
pub struct LoginState {
    pub state: String,
    pub verifier: String,
    pub return_to: String,
    pub exp: i64,
    pub redirect_uri: String,
}

/// The proxy's cookies in one request, raw (still sealed).
#[derive(Default, Debug)]
pub struct RequestCookies {
    values: HashMap<String, String>,
}

impl RequestCookies {
    /// Reads only cookies whose names start with one of `prefixes`.
    pub fn parse(headers: &HeaderMap, prefixes: &[&str]) -> Self {
        let mut values = HashMap::new();
        for h in headers.get_all(header::COOKIE) {
            let Ok(s) = h.to_str() else { continue };
            for c in cookie::Cookie::split_parse(s).flatten() {
                if prefixes.iter().any(|p| c.name().starts_with(p)) {
                    values.insert(c.name().to_owned(), c.value().to_owned());
                }
            }
        }
        Self { values }
    }

    /// A logical cookie's value, joined from chunks when it was split.
    pub fn get(&self, name: &str) -> Option<String> {
        if let Some(v) = self.values.get(name) {
            return Some(v.clone());
        }
        let mut out = String::new();
        for i in 0..MAX_CHUNKS {
            match self.values.get(&format!("{name}.{i}")) {
                Some(v) => out.push_str(v),
                None if i == 0 => return None,
                None => break,
            }
        }
        Some(out)
    }

    /// Names present in the request that belong to logical cookie `name`.
    fn parts_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.values.keys().filter(move |k| {
            k.as_str() == name
                || k.strip_prefix(name)
                    .and_then(|r| r.strip_prefix('.'))
                    .is_some_and(|n| n.parse::<usize>().is_ok())
        })
    }
}

/// The cookie names, attributes and lifetimes of one configuration, and the sealer.
pub struct Cookies {
    pub access: String,
    pub refresh: String,
    pub login: String,
    same_site: SameSite,
    secure: bool,
    idle_timeout: Duration,
    absolute_timeout: Duration,
    pub sealer: Sealer,
}

impl Cookies {
    pub fn new(s: &SessionSettings) -> Self {
        Self {
            access: s.access_cookie.clone(),
            refresh: s.refresh_cookie.clone(),
            login: if s.secure { "__Host-portcullis-login" } else { "portcullis-login" }.to_owned(),
            same_site: s.same_site,
            secure: s.secure,
            idle_timeout: s.idle_timeout,
            absolute_timeout: s.absolute_timeout,
            sealer: Sealer::new(s.cookie_keys.expose()),
        }
    }

    /// The three names, for scrubbing the upstream's `Cookie` header.
    pub fn names(&self) -> Vec<String> {
        vec![self.access.clone(), self.refresh.clone(), self.login.clone()]
    }

    pub fn read(&self, headers: &HeaderMap) -> RequestCookies {
        RequestCookies::parse(headers, &[&self.access, &self.refresh, &self.login])
    }

    pub fn open_access(&self, c: &RequestCookies) -> Option<String> {
        String::from_utf8(self.sealer.open(&self.access, &c.get(&self.access)?)?).ok()
    }

    pub fn open_refresh(&self, c: &RequestCookies) -> Option<RefreshCookie> {
        serde_json::from_slice(&self.sealer.open(&self.refresh, &c.get(&self.refresh)?)?).ok()
    }

    pub fn open_login_state(&self, c: &RequestCookies) -> Option<LoginState> {
        serde_json::from_slice(&self.sealer.open(&self.login, &c.get(&self.login)?)?).ok()
    }

    /// Set-Cookie headers for a fresh pair; both live until the session's next deadline.
    pub fn set_session(
        &self,
        access: &str,
        refresh: &RefreshCookie,
        now: i64,
        req: &RequestCookies,
    ) -> Vec<HeaderValue> {
        let deadline = refresh.login.saturating_add(self.absolute_timeout.as_secs() as i64);
        let max_age = (self.idle_timeout.as_secs() as i64).min(deadline - now).max(0);
        let mut out = Vec::new();
        if let Some(v) = self.sealer.seal(&self.access, access.as_bytes()) {
            out.extend(self.write(&self.access, &v, max_age, req));
        }
        if let Ok(json) = serde_json::to_vec(refresh) {
            if let Some(v) = self.sealer.seal(&self.refresh, &json) {
                out.extend(self.write(&self.refresh, &v, max_age, req));
            }
        }
        out
    }

    pub fn set_login_state(
        &self,
        state: &LoginState,
        ttl: Duration,
        req: &RequestCookies,
    ) -> Vec<HeaderValue> {
        let Ok(json) = serde_json::to_vec(state) else { return Vec::new() };
        match self.sealer.seal(&self.login, &json) {
            Some(v) => self.write(&self.login, &v, ttl.as_secs() as i64, req),
            None => Vec::new(),
        }
    }

    /// Set-Cookie headers deleting every part of the session cookies the request carried (and the base names).
    pub fn clear_session(&self, req: &RequestCookies) -> Vec<HeaderValue> {
        let mut out = Vec::new();
        for name in [&self.access, &self.refresh] {
            out.extend(self.clear(name, req));
        }
        out
    }

    pub fn clear(&self, name: &str, req: &RequestCookies) -> Vec<HeaderValue> {
        let mut names: Vec<String> = req.parts_of(name).cloned().collect();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
        names.iter().filter_map(|n| self.header(n, "", 0)).collect()
    }

    /// Writes `value` under `name`, chunked if needed, deleting leftover parts.
    fn write(&self, name: &str, value: &str, max_age: i64, req: &RequestCookies) -> Vec<HeaderValue> {
        let mut out = Vec::new();
        let written: Vec<String> = if value.len() <= CHUNK {
            out.extend(self.header(name, value, max_age));
            vec![name.to_owned()]
        } else {
            let mut names = Vec::new();
            for (i, part) in value.as_bytes().chunks(CHUNK).enumerate() {
                let n = format!("{name}.{i}");
                out.extend(self.header(&n, std::str::from_utf8(part).unwrap_or(""), max_age));
                names.push(n);
            }
            names
        };
        for stale in req.parts_of(name).filter(|n| !written.contains(n)) {
            out.extend(self.header(stale, "", 0));
        }
        out
    }

    fn header(&self, name: &str, value: &str, max_age: i64) -> Option<HeaderValue> {
        let same_site = match self.same_site {
            // The login-state cookie must come back on the IdP's cross-site redirect
            // to the callback, which `Strict` would prevent.
            SameSite::Strict if name == self.login => cookie::SameSite::Lax,
            SameSite::Lax => cookie::SameSite::Lax,
            SameSite::Strict => cookie::SameSite::Strict,
            SameSite::None => cookie::SameSite::None,
        };
        let c = cookie::Cookie::build((name, value))
            .http_only(true)
            .secure(self.secure)
            .same_site(same_site)
            .path("/")
            .max_age(cookie::time::Duration::seconds(max_age));
        HeaderValue::try_from(c.build().to_string()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn cookies(keys: Vec<[u8; 32]>) -> Cookies {
        Cookies::new(&SessionSettings {
            cookie_keys: Secret::new(keys),
            access_cookie: "__Host-access".into(),
            refresh_cookie: "__Host-refresh".into(),
            same_site: SameSite::Lax,
            secure: true,
            refresh_ahead: Duration::from_secs(30),
            refresh_grace: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            absolute_timeout: Duration::from_secs(7200),
            login_path: "/auth/login".into(),
            callback_path: "/auth/callback".into(),
            refresh_path: "/auth/refresh".into(),
            logout_path: "/auth/logout".into(),
            allowed_origins: vec![],
            backchannel_logout_path: None,
            end_session_url: None,
            post_logout_redirect_uri: None,
        })
    }

    fn request_with(set_cookies: &[HeaderValue]) -> HeaderMap {
        let pairs: Vec<String> = set_cookies
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
            .filter(|p| !p.ends_with('='))
            .collect();
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::try_from(pairs.join("; ")).unwrap());
        h
    }

    #[test]
    fn large_values_are_chunked_and_joined() {
        let s = cookies(vec![[7; 32]]);
        let access = "x".repeat(9000);
        let rc = RefreshCookie { rt: "rt-1".into(), login: 1000, ..Default::default() };
        let set = s.set_session(&access, &rc, 1000, &RequestCookies::default());
        assert!(set.iter().any(|v| v.to_str().unwrap().starts_with("__Host-access.2=")));
        for v in &set {
            let v = v.to_str().unwrap();
            assert!(v.len() < 4096, "{}", v.len());
            assert!(
                v.contains("HttpOnly")
                    && v.contains("Secure")
                    && v.contains("SameSite=Lax")
                    && v.contains("Path=/")
            );
        }
        let req = s.read(&request_with(&set));
        assert_eq!(s.open_access(&req).unwrap(), access);
        assert_eq!(s.open_refresh(&req).unwrap().rt, "rt-1");
        // A smaller value later deletes the stale chunks.
        let again = s.set_session("small", &rc, 1000, &req);
        let text: Vec<_> = again.iter().map(|v| v.to_str().unwrap().to_owned()).collect();
        assert!(text.iter().any(|t| t.starts_with("__Host-access.0=;") && t.contains("Max-Age=0")));
        assert!(text.iter().any(|t| t.starts_with("__Host-access=") && !t.contains("Max-Age=0")));
    }

    #[test]
    fn max_age_never_passes_absolute_timeout() {
        let s = cookies(vec![[7; 32]]);
        let rc = RefreshCookie { rt: "r".into(), login: 0, ..Default::default() };
        let set = s.set_session("a", &rc, 7000, &RequestCookies::default());
        assert!(set[0].to_str().unwrap().contains("Max-Age=200"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Any Cookie header: parsing and joining chunks never panic, and a joined
        /// value never exceeds what its chunks held.
        #[test]
        fn chunk_joining_never_panics(header in "((__Host-access|__Host-access\\.[0-9]{1,2}|x|__Host-refresh\\.[0-9])=[A-Za-z0-9]{0,20}; ?){0,12}") {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::try_from(header.as_str()) {
                h.insert(header::COOKIE, v);
            }
            let jar = RequestCookies::parse(&h, &["__Host-access", "__Host-refresh"]);
            if let Some(joined) = jar.get("__Host-access") {
                prop_assert!(joined.len() <= header.len());
            }
            let _ = jar.get("__Host-refresh");
        }
    }
}
