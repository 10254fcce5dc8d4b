//! Browser sessions: the proxy's cookies. Values are sealed with AES-256-GCM
//! (ring), the cookie's name as associated data so one cookie cannot stand in
//! for another; the first configured key seals, every key opens, so keys rotate
//! without logging anyone out. A value too large for one cookie is split into
//! `NAME.0`, `NAME.1`, … and joined on read. A cookie that fails to open is
//! treated as absent.

pub mod csrf;
pub mod endpoints;
pub mod refresh;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderValue};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::config::{SameSite, SessionSettings};
use crate::oauth::OAuthClient;

/// Longest cookie value written in one piece; browsers allow about 4096 bytes
/// for name, value and attributes together.
pub const CHUNK: usize = 3800;
/// At most this many chunks are read, bounding the work a hostile Cookie header causes.
const MAX_CHUNKS: usize = 8;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Seals and opens cookie values with the key list.
pub struct Sealer {
    keys: Vec<LessSafeKey>,
    rng: SystemRandom,
}

impl Sealer {
    pub fn new(keys: &[[u8; 32]]) -> Self {
        let keys =
            keys.iter().filter_map(|k| UnboundKey::new(&AES_256_GCM, k).ok().map(LessSafeKey::new)).collect();
        Self { keys, rng: SystemRandom::new() }
    }

    /// `base64url(nonce || ciphertext || tag)`, bound to `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Option<String> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut buf = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context.as_bytes()),
            &mut buf,
        )
        .ok()?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Some(B64.encode(out))
    }

    pub fn open(&self, context: &str, sealed: &str) -> Option<Vec<u8>> {
        let raw = B64.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        for key in &self.keys {
            let mut buf = ct.to_vec();
            let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
            if let Ok(plain) = key.open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf) {
                let n = plain.len();
                buf.truncate(n);
                return Some(buf);
            }
        }
        None
    }

    pub fn random_token(&self) -> Option<String> {
        let mut b = [0u8; 32];
        self.rng.fill(&mut b).ok()?;
        Some(B64.encode(b))
    }
}

/// What the refresh cookie holds.
#[derive(Serialize, Deserialize, Clone)]
pub struct RefreshCookie {
    pub rt: String,
    /// Unix time of the login, for `absolute_timeout`.
    pub login: i64,
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

/// One configuration's session machinery.
pub struct Sessions {
    pub settings: SessionSettings,
    pub sealer: Sealer,
    pub oauth: OAuthClient,
    pub login_cookie: String,
    pub auth_server: crate::config::AuthServerSettings,
}

impl Sessions {
    pub fn new(
        settings: SessionSettings,
        auth_server: crate::config::AuthServerSettings,
    ) -> Result<Self, rustls::Error> {
        let sealer = Sealer::new(settings.cookie_keys.expose());
        let oauth = OAuthClient::new(&auth_server)?;
        let login_cookie =
            if settings.secure { "__Host-portcullis-login" } else { "portcullis-login" }.to_owned();
        Ok(Self { settings, sealer, oauth, login_cookie, auth_server })
    }

    pub fn cookies(&self, headers: &HeaderMap) -> RequestCookies {
        RequestCookies::parse(
            headers,
            &[&self.settings.access_cookie, &self.settings.refresh_cookie, &self.login_cookie],
        )
    }

    pub fn open_access(&self, c: &RequestCookies) -> Option<String> {
        let name = &self.settings.access_cookie;
        String::from_utf8(self.sealer.open(name, &c.get(name)?)?).ok()
    }

    pub fn open_refresh(&self, c: &RequestCookies) -> Option<RefreshCookie> {
        let name = &self.settings.refresh_cookie;
        serde_json::from_slice(&self.sealer.open(name, &c.get(name)?)?).ok()
    }

    pub fn open_login_state(&self, c: &RequestCookies) -> Option<LoginState> {
        let name = &self.login_cookie;
        serde_json::from_slice(&self.sealer.open(name, &c.get(name)?)?).ok()
    }

    /// Set-Cookie headers for a fresh pair; both live until the session's next deadline.
    pub fn set_session(
        &self,
        access: &str,
        refresh: &RefreshCookie,
        now: i64,
        req: &RequestCookies,
    ) -> Vec<HeaderValue> {
        let s = &self.settings;
        let deadline = refresh.login.saturating_add(s.absolute_timeout.as_secs() as i64);
        let max_age = (s.idle_timeout.as_secs() as i64).min(deadline - now).max(0);
        let mut out = Vec::new();
        if let Some(v) = self.sealer.seal(&s.access_cookie, access.as_bytes()) {
            out.extend(self.write(&s.access_cookie, &v, max_age, req));
        }
        if let Ok(json) = serde_json::to_vec(refresh) {
            if let Some(v) = self.sealer.seal(&s.refresh_cookie, &json) {
                out.extend(self.write(&s.refresh_cookie, &v, max_age, req));
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
        match self.sealer.seal(&self.login_cookie, &json) {
            Some(v) => self.write(&self.login_cookie, &v, ttl.as_secs() as i64, req),
            None => Vec::new(),
        }
    }

    /// Set-Cookie headers deleting every part of the session cookies the request carried (and the base names).
    pub fn clear_session(&self, req: &RequestCookies) -> Vec<HeaderValue> {
        let mut out = Vec::new();
        for name in [&self.settings.access_cookie, &self.settings.refresh_cookie] {
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
        let s = &self.settings;
        let same_site = match s.same_site {
            // The login-state cookie must come back on the IdP's cross-site redirect
            // to the callback, which `Strict` would prevent.
            SameSite::Strict if name == self.login_cookie => cookie::SameSite::Lax,
            SameSite::Lax => cookie::SameSite::Lax,
            SameSite::Strict => cookie::SameSite::Strict,
            SameSite::None => cookie::SameSite::None,
        };
        let c = cookie::Cookie::build((name, value))
            .http_only(true)
            .secure(s.secure)
            .same_site(same_site)
            .path("/")
            .max_age(cookie::time::Duration::seconds(max_age));
        HeaderValue::try_from(c.build().to_string()).ok()
    }

    /// Removes the proxy's own cookies from the `Cookie` header sent upstream; other cookies pass.
    pub fn scrub_upstream_cookies(&self, headers: &mut HeaderMap) {
        let ours = [&self.settings.access_cookie, &self.settings.refresh_cookie, &self.login_cookie];
        // Most requests carry none of our cookies: leave their header untouched, allocation-free.
        let mentions_ours = headers.get_all(header::COOKIE).iter().any(|v| {
            let b = v.as_bytes();
            ours.iter().any(|o| b.windows(o.len()).any(|w| w == o.as_bytes()))
        });
        if !mentions_ours {
            return;
        }
        let is_ours = |name: &str| {
            ours.iter().any(|o| {
                name == o.as_str()
                    || name
                        .strip_prefix(o.as_str())
                        .and_then(|r| r.strip_prefix('.'))
                        .is_some_and(|n| n.parse::<usize>().is_ok())
            })
        };
        let mut kept: Vec<String> = Vec::new();
        for h in headers.get_all(header::COOKIE) {
            let Ok(s) = h.to_str() else { continue };
            for part in s.split(';') {
                let part = part.trim();
                let name = part.split('=').next().unwrap_or("").trim();
                if !part.is_empty() && !is_ours(name) {
                    kept.push(part.to_owned());
                }
            }
        }
        headers.remove(header::COOKIE);
        if !kept.is_empty() {
            if let Ok(v) = HeaderValue::try_from(kept.join("; ")) {
                headers.insert(header::COOKIE, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn sessions(keys: Vec<[u8; 32]>) -> Sessions {
        let settings = SessionSettings {
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
        };
        let auth = crate::config::AuthServerSettings {
            token_url: Some("http://127.0.0.1:1/token".parse().unwrap()),
            revocation_url: None,
            authorization_url: None,
            login_url: None,
            issuer: None,
            client_id: "c".into(),
            client_secret: None,
            client_auth: crate::config::ClientAuth::None,
            scope: None,
            resource: None,
            authorize_params: vec![],
            redirect_uri: None,
            timeout: Duration::from_secs(1),
        };
        Sessions::new(settings, auth).unwrap()
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
    fn seal_open_and_key_rotation() {
        let old = Sealer::new(&[[1; 32]]);
        let sealed = old.seal("a", b"secret").unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(old.open("a", &sealed).unwrap(), b"secret");
        assert!(old.open("b", &sealed).is_none(), "bound to its cookie name");
        let rotated = Sealer::new(&[[2; 32], [1; 32]]);
        assert_eq!(rotated.open("a", &sealed).unwrap(), b"secret");
        assert!(Sealer::new(&[[2; 32]]).open("a", &sealed).is_none());
        assert!(old.open("a", "garbage!").is_none());
        let mut tampered = sealed.into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(old.open("a", std::str::from_utf8(&tampered).unwrap()).is_none());
    }

    #[test]
    fn large_values_are_chunked_and_joined() {
        let s = sessions(vec![[7; 32]]);
        let access = "x".repeat(9000);
        let rc = RefreshCookie { rt: "rt-1".into(), login: 1000 };
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
        let req = s.cookies(&request_with(&set));
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
        let s = sessions(vec![[7; 32]]);
        let rc = RefreshCookie { rt: "r".into(), login: 0 };
        let set = s.set_session("a", &rc, 7000, &RequestCookies::default());
        assert!(set[0].to_str().unwrap().contains("Max-Age=200"));
    }

    #[test]
    fn proxy_cookies_never_go_upstream() {
        let s = sessions(vec![[7; 32]]);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; __Host-access=x; __Host-refresh.0=y; __Host-refresh.1=z; __Host-portcullis-login=s; b=2; __Host-accessory=keep"));
        s.scrub_upstream_cookies(&mut h);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2; __Host-accessory=keep");
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, HeaderValue::from_static("__Host-refresh=y"));
        s.scrub_upstream_cookies(&mut only);
        assert!(only.get(header::COOKIE).is_none());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn opening_anything_but_a_sealed_value_fails_without_panic(v in "[A-Za-z0-9_=.-]{0,300}") {
            let sealer = Sealer::new(&[[9; 32]]);
            prop_assert!(sealer.open("ctx", &v).is_none());
        }

        #[test]
        fn tampering_with_one_byte_is_detected(plain in proptest::collection::vec(any::<u8>(), 0..64), at in any::<usize>(), bit in 0u8..8) {
            let sealer = Sealer::new(&[[9; 32]]);
            let sealed = sealer.seal("ctx", &plain).unwrap();
            prop_assert_eq!(sealer.open("ctx", &sealed), Some(plain));
            let mut raw = B64.decode(&sealed).unwrap();
            let i = at % raw.len();
            raw[i] ^= 1 << bit;
            prop_assert!(sealer.open("ctx", &B64.encode(raw)).is_none());
        }

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
