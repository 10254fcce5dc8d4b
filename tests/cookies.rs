//! The proxy's cookies (SPEC §4 "Cookies", "Identity headers"): attributes,
//! sealing (a cookie that fails to open is absent), key rotation, chunking of
//! large values, lifetimes, and removal of the proxy's cookies from the
//! `Cookie` header sent upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod idp;
mod support;

use idp::TestIdp;
use kit::*;
use support::{get, Proxy, Reply, Upstream};

async fn setup(o: &Opts) -> (TestIdp, Upstream, Proxy) {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = start(&idp, &up, o).await;
    (idp, up, proxy)
}

fn assert_attributes(c: &SetCookie, secure: bool, same_site: &str) {
    assert!(c.has("HttpOnly"), "{}", c.raw);
    assert_eq!(c.has("Secure"), secure, "{}", c.raw);
    assert_eq!(c.attr("SameSite"), Some(same_site), "{}", c.raw);
    assert_eq!(c.attr("Path"), Some("/"), "{}", c.raw);
    assert!(!c.has("Domain"), "{}", c.raw);
}

#[tokio::test]
async fn secure_cookies_use_host_prefixed_names() {
    let o = Opts { secure: true, session: "same_site = \"strict\"".into(), ..Opts::default() };
    let (_idp, _up, proxy) = setup(&o).await;
    let r = support::post(proxy.url("/auth/login"), login_body("alice", PASSWORD))
        .header("content-type", "application/json")
        .header("origin", own_origin(&proxy))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for name in ["__Host-access", "__Host-refresh"] {
        assert_attributes(&assert_set(&r, name), true, "Strict");
    }
    let jar = Jar::default().after(&r);
    let echo = jar.on(get(proxy.url("/api/x"))).header("cookie", "theme=dark").send().await.echo();
    assert_eq!(echo.header("x-auth-subject"), Some("alice"));
    assert_eq!(echo.header_all("cookie").join("; "), "theme=dark");
    // The login-state cookie of the code flow is host-prefixed too, and Lax so it
    // survives the authorization server's cross-site redirect back.
    let r = get(proxy.url("/auth/login")).send().await;
    assert_attributes(&assert_set(&r, "__Host-portcullis-login"), true, "Lax");
}

#[tokio::test]
async fn insecure_development_cookies_have_no_secure_attribute() {
    let (_idp, _up, proxy) = setup(&Opts::default()).await;
    let (r, _) = login(&proxy, "alice").await;
    assert_attributes(&assert_set(&r, ACCESS), false, "Lax");
    assert_attributes(&assert_set(&r, REFRESH), false, "Lax");
    let r = get(proxy.url("/auth/login")).send().await;
    assert_attributes(&assert_set(&r, LOGIN), false, "Lax");
}

#[tokio::test]
async fn access_cookie_lives_as_long_as_the_refresh_cookie() {
    let o = Opts { session: "idle_timeout = \"1h\"".into(), ..Opts::default() };
    let (idp, _up, proxy) = setup(&o).await;
    idp.set_access_ttl(10);
    let (r, jar) = login(&proxy, "alice").await;
    let lifetimes = |r: &Reply| (assert_set(r, ACCESS).max_age(), assert_set(r, REFRESH).max_age());
    assert_eq!(lifetimes(&r), (Some(3600), Some(3600)), "not the 10 s of the token");
    let r = api(&proxy, &jar).await; // transparent refresh
    assert_eq!(r.status, 200);
    assert_eq!(lifetimes(&r), (Some(3600), Some(3600)), "renewed on refresh");
    let r = refresh_now(&proxy, &jar.after(&r)).await;
    assert_eq!(r.status, 200);
    assert_eq!(lifetimes(&r), (Some(3600), Some(3600)));
}

#[tokio::test]
async fn proxy_cookies_are_removed_from_the_upstream_cookie_header() {
    let (_idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, jar) = login(&proxy, "alice").await;
    let login_state = Jar::default().after(&get(proxy.url("/auth/login")).send().await);
    let cookie = format!(
        "theme=dark; {ACCESS}={}; {REFRESH}={}; {LOGIN}={}; portcullis-accessory=keep; {ACCESS}.7=x; lang=en",
        jar.get(ACCESS).unwrap(),
        jar.get(REFRESH).unwrap(),
        login_state.get(LOGIN).unwrap(),
    );
    let others = "theme=dark; portcullis-accessory=keep; lang=en";
    for path in ["/api/orders", "/open/page"] {
        let echo = get(proxy.url(path)).header("cookie", &cookie).send().await.echo();
        assert_eq!(echo.header_all("cookie").join("; "), others, "{path}");
        let sent = echo.header_all("cookie").join("; ");
        for v in [jar.get(ACCESS).unwrap(), jar.get(REFRESH).unwrap()] {
            assert!(!sent.contains(v), "{path}: a sealed session cookie reached the upstream");
        }
    }
    // Also when the token came from the Authorization header.
    let idp_token = forwarded_token(&api(&proxy, &jar).await);
    let echo = get(proxy.url("/api/orders"))
        .header("authorization", format!("Bearer {idp_token}"))
        .header("cookie", &cookie)
        .send()
        .await
        .echo();
    assert_eq!(echo.header_all("cookie").join("; "), others);
    // Nothing but the proxy's cookies: no Cookie header at all.
    let echo = jar.on(get(proxy.url("/api/orders"))).send().await.echo();
    assert!(!echo.has_header("cookie"), "{:?}", echo.headers);
    assert_eq!(echo.header("x-auth-subject"), Some("alice"));
}

#[tokio::test]
async fn cookie_token_is_not_forwarded_when_forward_token_is_off() {
    let up = Upstream::start().await;
    let routes = format!(
        "[[routes]]\nname = \"quiet\"\npath_prefix = \"/quiet\"\nupstream = \"{}\"\nauth = \"required\"\n\
         issuer = \"main\"\naudiences = [\"orders-api\"]\nforward_token = false",
        up.url()
    );
    let idp = TestIdp::start().await;
    let proxy = start(&idp, &up, &Opts { routes, ..Opts::default() }).await;
    let (_, jar) = login(&proxy, "alice").await;
    let echo = jar.on(get(proxy.url("/quiet/x"))).send().await.echo();
    assert_eq!(echo.header("x-auth-subject"), Some("alice"));
    assert!(!echo.has_header("authorization") && !echo.has_header("cookie"), "{:?}", echo.headers);
}

/// Flips one character in the middle of a sealed value.
fn tamper(v: &str) -> String {
    let mut b = v.as_bytes().to_vec();
    let i = b.len() / 2;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn cookies_that_fail_to_open_are_treated_as_absent() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, jar) = login(&proxy, "alice").await;
    let (access, refresh) = (jar.get(ACCESS).unwrap().to_owned(), jar.get(REFRESH).unwrap().to_owned());
    let variants: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("tampered access, no refresh", vec![(ACCESS, tamper(&access))]),
        ("both tampered", vec![(ACCESS, tamper(&access)), (REFRESH, tamper(&refresh))]),
        ("values swapped between names", vec![(ACCESS, refresh.clone()), (REFRESH, access.clone())]),
        ("not base64", vec![(ACCESS, "%%%!!!".into()), (REFRESH, "..".into())]),
        ("truncated", vec![(ACCESS, access[..access.len() / 2].to_owned()), (REFRESH, "AAAA".into())]),
        ("a bare JWT", vec![(ACCESS, idp.access_token("mallory", 300))]),
    ];
    for (what, cookies) in variants {
        let mut j = Jar::default();
        for (n, v) in &cookies {
            j.set(n, v);
        }
        let r = api(&proxy, &j).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        r.assert_error(401, "missing_token");
        let r = refresh_now(&proxy, &j).await;
        r.assert_error(401, "missing_token");
    }
    assert_eq!(token_calls(&idp), 0);

    // A broken access cookie next to a good refresh cookie: refreshed like a missing one.
    let mut j = jar.clone();
    j.set(ACCESS, &tamper(&access));
    let r = api(&proxy, &j).await;
    assert_eq!(claims(&forwarded_token(&r))["sub"], "alice");
    assert_set(&r, ACCESS);
    assert_eq!(token_calls(&idp), 1);
}

#[tokio::test]
async fn cookies_sealed_with_a_retired_key_open_after_key_rotation() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let old = start(&idp, &up, &Opts { keys: vec![KEY_A], ..Opts::default() }).await;
    let rotated = start(&idp, &up, &Opts { keys: vec![KEY_B, KEY_A], ..Opts::default() }).await;
    let only_new = start(&idp, &up, &Opts { keys: vec![KEY_B], ..Opts::default() }).await;

    let (_, jar_a) = login(&old, "alice").await;
    // The rotated proxy opens cookies sealed with the retired key ...
    let r = api(&rotated, &jar_a).await;
    assert_eq!(r.echo().header("x-auth-subject"), Some("alice"));
    assert!(set_cookies(&r).is_empty(), "no refresh needed");
    // ... and seals new ones with the first key.
    let r = refresh_now(&rotated, &jar_a).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let jar_b = jar_a.clone().after(&r);
    assert_eq!(api(&only_new, &jar_b).await.echo().header("x-auth-subject"), Some("alice"));
    api(&old, &jar_b).await.assert_error(401, "missing_token");
    // A key that is gone from the list no longer opens anything.
    api(&only_new, &jar_a).await.assert_error(401, "missing_token");
}

#[tokio::test]
async fn large_access_tokens_are_chunked_and_joined() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    // The test IdP puts the login name into `sub`: a long one makes a large token.
    let long_name = "a".repeat(6000);
    let (r, jar) = login(&proxy, &long_name).await;
    let chunks: Vec<SetCookie> =
        set_cookies(&r).into_iter().filter(|c| c.name.starts_with(&format!("{ACCESS}."))).collect();
    assert!(chunks.len() >= 2, "{:?}", set_cookies(&r).iter().map(|c| &c.name).collect::<Vec<_>>());
    assert!(set_cookie(&r, ACCESS).is_none(), "one logical cookie is either whole or chunked");
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.name, format!("{ACCESS}.{i}"));
        assert!(c.raw.len() < 4096, "each Set-Cookie fits a browser's limit: {} bytes", c.raw.len());
        assert_attributes(c, false, "Lax");
        assert_eq!(c.max_age(), assert_set(&r, REFRESH).max_age());
    }

    let r = api(&proxy, &jar).await;
    let token = forwarded_token(&r);
    assert_eq!(claims(&token)["sub"], long_name.as_str(), "joined from the chunks");
    assert!(!r.echo().has_header("cookie"), "no chunk reaches the upstream");
    assert_eq!(token_calls(&idp), 0);

    // A refresh writes the large token in chunks again.
    let r = refresh_now(&proxy, &jar).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let jar = jar.after(&r);
    let fresh = forwarded_token(&api(&proxy, &jar).await);
    assert_ne!(fresh, token);
    assert_eq!(claims(&fresh)["sub"], long_name.as_str());

    // A small token later replaces the chunks and deletes every stale part.
    let r = jar
        .on(support::post(proxy.url("/auth/login"), login_body("bob", PASSWORD)))
        .header("content-type", "application/json")
        .header("origin", own_origin(&proxy))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_set(&r, ACCESS);
    for i in 0..chunks.len() {
        assert_cleared(&r, &format!("{ACCESS}.{i}"));
    }
    let jar = jar.after(&r);
    assert_eq!(jar.0.keys().filter(|k| k.starts_with(&format!("{ACCESS}."))).count(), 0, "{jar:?}");
    assert_eq!(api(&proxy, &jar).await.echo().header("x-auth-subject"), Some("bob"));
}
// ---------------------------------------------------------------------------
// Session test kit (the same in every session test file: refresh.rs,
// refresh_storm.rs, cookies.rs, csrf.rs, login.rs).
// ---------------------------------------------------------------------------
#[allow(dead_code)]
mod kit {
    use std::collections::{BTreeMap, HashMap};
    use std::path::Path;
    use std::time::{Duration, Instant};

    use base64::Engine as _;
    use serde_json::Value;

    use super::idp::{TestIdp, CLIENT_SECRET};
    use super::support::{get, post, Proxy, Reply, Req, Upstream, DEADLINE};

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

    pub fn config(idp: &TestIdp, up: &Upstream, o: &Opts) -> String {
        let client_secret = if o.client_auth == "none" {
            String::new()
        } else {
            "client_secret_env = \"CLIENT_SECRET\"".into()
        };
        format!(
            r#"
[[issuers]]
name = "main"
issuer = "{iss}"
jwks_url = "{jwks}"

[auth_server]
token_url = "{token}"
revocation_url = "{revoke}"
authorization_url = "{authorize}"
login_url = "{login}"
issuer = "{iss}"
client_id = "edge"
{client_secret}
client_auth = "{client_auth}"
scope = "openid offline_access"
timeout = "2s"
{auth}

[session]
cookie_key_env = "COOKIE_KEY"
secure = {secure}
allowed_origins = ["{app}"]
{session}

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

{routes}
"#,
            iss = idp.issuer(),
            jwks = idp.jwks_url(),
            token = idp.token_url(),
            revoke = idp.revoke_url(),
            authorize = idp.authorize_url(),
            login = idp.login_url(),
            client_auth = o.client_auth,
            auth = o.auth,
            secure = o.secure,
            app = APP_ORIGIN,
            session = o.session,
            up = up.url(),
            routes = o.routes,
        )
    }

    /// Starts the proxy and waits until the issuer's keys are loaded.
    pub async fn start(idp: &TestIdp, up: &Upstream, o: &Opts) -> Proxy {
        let proxy = Proxy::start_with(&config(idp, up, o), &env_with_keys(&o.keys), Path::new(".")).await;
        let ready = format!("{}/readyz", proxy.admin_url());
        super::support::eventually("the proxy loads the IdP's keys", DEADLINE, || {
            let ready = ready.clone();
            async move { get(ready).send().await.status == 200 }
        })
        .await;
        proxy
    }

    /// `http://127.0.0.1:PORT`: the proxy's own origin for CSRF purposes.
    pub fn own_origin(proxy: &Proxy) -> String {
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
    pub async fn login(proxy: &Proxy, user: &str) -> (Reply, Jar) {
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

    pub async fn api(proxy: &Proxy, jar: &Jar) -> Reply {
        jar.on(get(proxy.url("/api/orders"))).send().await
    }

    pub async fn refresh_now(proxy: &Proxy, jar: &Jar) -> Reply {
        jar.on(post(proxy.url("/auth/refresh"), "")).header("origin", own_origin(proxy)).send().await
    }

    pub async fn logout(proxy: &Proxy, jar: &Jar) -> Reply {
        jar.on(post(proxy.url("/auth/logout"), "")).header("origin", own_origin(proxy)).send().await
    }

    /// The bearer token the upstream received.
    pub fn forwarded_token(reply: &Reply) -> String {
        let echo = reply.echo();
        let auth =
            echo.header("authorization").unwrap_or_else(|| panic!("no Authorization upstream: {echo:?}"));
        auth.strip_prefix("Bearer ").unwrap_or_else(|| panic!("not a bearer: {auth}")).to_owned()
    }

    /// The (unverified) payload of a JWT.
    pub fn claims(token: &str) -> Value {
        let payload = token.split('.').nth(1).expect("a JWT has a payload");
        let bytes =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url payload");
        serde_json::from_slice(&bytes).expect("JSON payload")
    }

    /// The refresh token the proxy sent in the last token request.
    pub fn last_refresh_token(idp: &TestIdp) -> String {
        idp.last_token_form().get("refresh_token").cloned().expect("last token request had a refresh_token")
    }

    pub fn token_calls(idp: &TestIdp) -> usize {
        idp.token_calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn revocations(idp: &TestIdp) -> usize {
        idp.revocations.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The value of `portcullis_refreshes_total{outcome="…"}`.
    pub async fn refreshes(proxy: &Proxy, outcome: &str) -> u64 {
        let text = get(format!("{}/metrics", proxy.admin_url())).send().await.text();
        let prefix = format!("portcullis_refreshes_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse().expect("counter value"))
            .unwrap_or_else(|| panic!("no {prefix} in metrics:\n{text}"))
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
            assert!(
                start.elapsed() < within,
                "not within {within:?}: {what}; last: {} {}",
                r.status,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn now() -> i64 {
        super::idp::now()
    }
}
