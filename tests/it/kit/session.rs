//! Sessions as a browser lives them: the session suites' configuration, a
//! Set-Cookie parser, a cookie jar, and the flows (login, API call, refresh,
//! logout) against any running instance.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use super::idp::{TestIdp, CLIENT_SECRET};
use super::{get, metrics, post, session_table, wait_ready, Config, Instance, Proxy, Reply, Req, Upstream};

pub const KEY_A: [u8; 32] = [0xA1; 32];
pub const KEY_B: [u8; 32] = [0xB2; 32];
pub const ACCESS: &str = "portcullis-access";
pub const REFRESH: &str = "portcullis-refresh";
pub const LOGIN: &str = "portcullis-login";
pub const APP_ORIGIN: &str = "http://app.test";
pub const PASSWORD: &str = "correct horse";

pub fn b64_key(k: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// `CLIENT_SECRET` and `COOKIE_KEY` (`keys` sealed with the first, all open).
pub fn env_with_keys(keys: &[[u8; 32]]) -> HashMap<String, String> {
    let list: Vec<String> = keys.iter().map(b64_key).collect();
    HashMap::from([
        ("CLIENT_SECRET".to_owned(), CLIENT_SECRET.to_owned()),
        ("COOKIE_KEY".to_owned(), list.join(",")),
    ])
}

/// A knob set for [`config`]; `Default` is the brief's example configuration.
#[derive(Clone)]
pub struct Opts {
    /// Extra lines for `[auth_server]`; `client_auth` is not among the defaults.
    pub auth: String,
    pub client_auth: &'static str,
    /// Extra lines for `[session]` (cookie_key_env, secure = false and
    /// allowed_origins are always there).
    pub session: String,
    pub secure: bool,
    pub keys: Vec<[u8; 32]>,
    /// Extra `[[routes]]` tables (after "api" on /api and "open" on /open, auth = "none").
    pub routes: String,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            auth: String::new(),
            client_auth: "client_secret_basic",
            session: String::new(),
            secure: false,
            keys: vec![KEY_A],
            routes: String::new(),
        }
    }
}

/// The session suites' configuration: the test IdP as issuer "main" and as
/// authorization server (code + PKCE and passthrough login), sessions on the sealed
/// cookies, and the routes "api" (`/api`, token required) and "open" (`/open`).
pub fn config(idp: &TestIdp, up: &Upstream, o: &Opts) -> String {
    let mut auth = idp
        .auth_server_table()
        .set("authorization_url", idp.authorize_url())
        .set("issuer", idp.issuer())
        .set("client_auth", o.client_auth)
        .set("scope", "openid offline_access")
        .set("timeout", "2s")
        .lines(&o.auth);
    if o.client_auth == "none" {
        auth = auth.unset("client_secret_env");
    }
    let session =
        session_table().set("secure", o.secure).set("allowed_origins", vec![APP_ORIGIN]).lines(&o.session);
    Config::new()
        .table(idp.issuer_table())
        .table(auth)
        .table(session)
        .raw(&format!(
            r#"
[[routes]]
name = "api"
path_prefix = "/api"
upstream = "{up}"
auth = "required"
issuer = "main"
audiences = ["orders-api"]

[[routes]]
name = "open"
path_prefix = "/open"
upstream = "{up}"
auth = "none"
"#,
            up = up.url()
        ))
        .raw(&o.routes)
        .toml()
}

/// Starts the proxy and waits until the issuer's keys are loaded.
pub async fn start(idp: &TestIdp, up: &Upstream, o: &Opts) -> Proxy {
    let proxy = Proxy::start_with(&config(idp, up, o), &env_with_keys(&o.keys), Path::new(".")).await;
    wait_ready(&proxy).await;
    proxy
}

/// A fresh IdP and upstream, and the proxy in front of them, ready.
pub async fn setup(o: &Opts) -> (TestIdp, Upstream, Proxy) {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = start(&idp, &up, o).await;
    (idp, up, proxy)
}

/// `http://127.0.0.1:PORT`: the proxy's own origin for CSRF purposes.
pub fn own_origin(proxy: &impl Instance) -> String {
    proxy.http_url()
}

// === Set-Cookie parsing and a tiny cookie jar ===

#[derive(Debug, Clone)]
pub struct SetCookie {
    pub raw: String,
    pub name: String,
    pub value: String,
    /// Attribute names and values as sent (e.g. `("Max-Age", "604800")`, `("HttpOnly", "")`).
    pub attrs: Vec<(String, String)>,
}

impl SetCookie {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn has(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }
    pub fn max_age(&self) -> Option<i64> {
        self.attr("Max-Age").map(|v| v.parse().unwrap_or_else(|_| panic!("Max-Age {v:?}")))
    }
    /// `Max-Age=0` (or an empty value): the cookie is deleted.
    pub fn is_deletion(&self) -> bool {
        self.max_age() == Some(0) || self.value.is_empty()
    }
}

pub fn set_cookies(reply: &Reply) -> Vec<SetCookie> {
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| {
            let raw = v.to_str().expect("Set-Cookie is ASCII").to_owned();
            let mut parts = raw.split(';').map(str::trim);
            let (name, value) = parts.next().unwrap_or("").split_once('=').expect("name=value");
            let attrs = parts
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((n, v)) => (n.trim().to_owned(), v.trim().to_owned()),
                    None => (p.to_owned(), String::new()),
                })
                .collect();
            SetCookie {
                raw: raw.clone(),
                name: name.trim().to_owned(),
                value: value.trim().to_owned(),
                attrs,
            }
        })
        .collect()
}

/// The Set-Cookie for `name`, if the answer has exactly one.
pub fn set_cookie(reply: &Reply, name: &str) -> Option<SetCookie> {
    let all: Vec<SetCookie> = set_cookies(reply).into_iter().filter(|c| c.name == name).collect();
    assert!(all.len() <= 1, "several Set-Cookie for {name}: {all:?}");
    all.into_iter().next()
}

/// Asserts the answer deletes `name` (Max-Age=0).
pub fn assert_cleared(reply: &Reply, name: &str) {
    let c = set_cookie(reply, name)
        .unwrap_or_else(|| panic!("no Set-Cookie deleting {name}; got {:?}", set_cookies(reply)));
    assert!(c.is_deletion(), "{name} is not deleted: {}", c.raw);
}

/// Asserts the answer sets (not deletes) `name`.
pub fn assert_set(reply: &Reply, name: &str) -> SetCookie {
    let c = set_cookie(reply, name)
        .unwrap_or_else(|| panic!("no Set-Cookie for {name}; got {:?}", set_cookies(reply)));
    assert!(!c.is_deletion(), "{name} is deleted, expected a value: {}", c.raw);
    c
}

/// Cookies a browser would hold for the proxy's origin.
#[derive(Debug, Clone, Default)]
pub struct Jar(pub BTreeMap<String, String>);

impl Jar {
    /// Applies every Set-Cookie of `reply` (Max-Age=0 deletes).
    pub fn absorb(&mut self, reply: &Reply) {
        for c in set_cookies(reply) {
            if c.is_deletion() {
                self.0.remove(&c.name);
            } else {
                self.0.insert(c.name, c.value);
            }
        }
    }
    pub fn after(mut self, reply: &Reply) -> Self {
        self.absorb(reply);
        self
    }
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
    /// Every cookie value held.
    pub fn values(&self) -> Vec<String> {
        self.0.values().cloned().collect()
    }
    /// Whether the jar holds logical cookie `name`, whole or as chunks `name.0`, `name.1`, ….
    pub fn holds(&self, name: &str) -> bool {
        self.0.contains_key(name) || self.0.contains_key(&format!("{name}.0"))
    }
    pub fn set(&mut self, name: &str, value: &str) {
        self.0.insert(name.to_owned(), value.to_owned());
    }
    pub fn without(mut self, name: &str) -> Self {
        self.0.remove(name);
        self
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn header(&self) -> String {
        self.0.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("; ")
    }
    /// Adds the `Cookie` header to `req` (none when the jar is empty).
    pub fn on(&self, req: Req) -> Req {
        if self.0.is_empty() {
            req
        } else {
            req.header("cookie", self.header())
        }
    }
}

// === flows ===

pub fn login_body(user: &str, password: &str) -> String {
    serde_json::json!({"username": user, "password": password}).to_string()
}

/// Passthrough login from the proxy's own origin; the answer must be 200.
pub async fn login(proxy: &impl Instance, user: &str) -> (Reply, Jar) {
    let reply = post(proxy.url("/auth/login"), login_body(user, PASSWORD))
        .header("content-type", "application/json")
        .header("origin", own_origin(proxy))
        .send()
        .await;
    assert_eq!(reply.status, 200, "login failed: {}", reply.text());
    let jar = Jar::default().after(&reply);
    assert!(jar.holds(ACCESS) && jar.holds(REFRESH), "login set {:?}", jar.0.keys().collect::<Vec<_>>());
    (reply, jar)
}

/// The authorization code flow as a browser follows it: `GET login_path`, the
/// IdP's authorization endpoint, then the callback; returns the jar after it.
pub async fn code_login(proxy: &impl Instance) -> Jar {
    let r = get(proxy.url("/auth/login?return_to=/app")).send().await;
    assert_eq!(r.status, 302, "login redirect: {}", r.text());
    let jar = Jar::default().after(&r);
    let authorize = r.header("location").expect("Location of the authorization request").to_owned();
    let at_idp = get(&authorize).send().await;
    assert_eq!(at_idp.status, 302, "the IdP's authorization answer: {}", at_idp.text());
    let callback = at_idp.header("location").expect("Location of the callback").to_owned();
    let r = jar.on(get(&callback)).send().await;
    assert_eq!(r.status, 302, "callback: {}", r.text());
    let jar = jar.after(&r);
    assert!(jar.holds(ACCESS) && jar.holds(REFRESH), "code login set {:?}", jar.0.keys().collect::<Vec<_>>());
    jar
}

pub async fn api(proxy: &impl Instance, jar: &Jar) -> Reply {
    jar.on(get(proxy.url("/api/orders"))).send().await
}

pub async fn refresh_now(proxy: &impl Instance, jar: &Jar) -> Reply {
    jar.on(post(proxy.url("/auth/refresh"), "")).header("origin", own_origin(proxy)).send().await
}

pub async fn logout(proxy: &impl Instance, jar: &Jar) -> Reply {
    jar.on(post(proxy.url("/auth/logout"), "")).header("origin", own_origin(proxy)).send().await
}

/// `backchannel_logout_path` as the logout suite configures it.
pub const BACKCHANNEL_LOGOUT: &str = "/auth/backchannel-logout";

/// `POST backchannel_logout_path` as an OpenID provider sends it (Back-Channel
/// Logout 1.0 §2.5): `logout_token=…` form-encoded, no cookies, no `Origin`.
pub async fn backchannel_logout(proxy: &impl Instance, logout_token: &str) -> Reply {
    let body =
        form_urlencoded::Serializer::new(String::new()).append_pair("logout_token", logout_token).finish();
    post(proxy.url(BACKCHANNEL_LOGOUT), body)
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
}

/// The bearer token the upstream received.
pub fn forwarded_token(reply: &Reply) -> String {
    let echo = reply.echo();
    let auth = echo.header("authorization").unwrap_or_else(|| panic!("no Authorization upstream: {echo:?}"));
    auth.strip_prefix("Bearer ").unwrap_or_else(|| panic!("not a bearer: {auth}")).to_owned()
}

/// The (unverified) payload of a JWT.
pub fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON payload")
}

/// The refresh token the proxy sent in the last token request.
pub fn last_refresh_token(idp: &TestIdp) -> String {
    idp.last_token_form().get("refresh_token").cloned().expect("last token request had a refresh_token")
}

pub fn token_calls(idp: &TestIdp) -> usize {
    idp.token_calls.load(std::sync::atomic::Ordering::SeqCst)
}

/// RFC 7009 revocation calls the IdP received.
pub fn revoke_calls(idp: &TestIdp) -> usize {
    idp.revocations.load(std::sync::atomic::Ordering::SeqCst)
}

/// The value of `portcullis_refreshes_total{outcome="…"}`, which must be exposed.
pub async fn refreshes(proxy: &impl Instance, outcome: &str) -> u64 {
    let series = format!("portcullis_refreshes_total{{outcome=\"{outcome}\"}}");
    let all = metrics(proxy).await;
    let value = all.get(&series).unwrap_or_else(|| panic!("no {series} in metrics: {all:?}"));
    assert!(value >= 0.0 && value.fract() == 0.0, "{series} is not a count: {value}");
    value as u64
}

/// Sends `make()` until `done` holds for the reply, returning that reply; fails after `within`.
pub async fn poll_until<M, F>(what: &str, within: Duration, make: M, done: F) -> Reply
where
    M: Fn() -> Req,
    F: Fn(&Reply) -> bool,
{
    let start = Instant::now();
    loop {
        let r = make().send().await;
        if done(&r) {
            return r;
        }
        assert!(start.elapsed() < within, "not within {within:?}: {what}; last: {} {}", r.status, r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
