//! A small authorization server for the tests, behaving like the RFCs where the
//! proxy can tell: a JWKS endpoint whose keys can rotate, RS256/ES256/EdDSA
//! token minting, a token endpoint with rotating refresh tokens and reuse
//! detection (reusing a rotated refresh token revokes the whole family, RFC 9700
//! §4.14.2), authorization code + PKCE, RFC 7009 revocation, a login endpoint
//! for passthrough, and outages on demand — of the token endpoint and of the JWKS.
//! As an OpenID provider ([`TestIdp::set_id_tokens`]) it gives every session a
//! `sid`, issues ID tokens, publishes an `end_session_endpoint` (RP-initiated
//! logout) and mints back-channel logout tokens ([`TestIdp::logout_claims`]).
//!
//! It is also the tests' only JWKS server: a JWKS endpoint that fails on demand
//! ([`JwksAnswer`]), one that is stopped ([`TestIdp::stop`]) or that only starts
//! later ([`TestIdp::start_on`]), and the attacker's server that must never be
//! contacted ([`TestIdp::connections`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::config::Table;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

pub fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The public JWK of a fixture key (`rsa1`, `rsa2`, `ec1`, `ed1`).
pub fn jwk(kid: &str) -> Value {
    let all: Value = serde_json::from_str(&std::fs::read_to_string(fixture("jwks.json")).unwrap()).unwrap();
    all[kid].clone()
}

pub fn alg_of(kid: &str) -> Algorithm {
    match &kid[..2] {
        "rs" => Algorithm::RS256,
        "ec" => Algorithm::ES256,
        "ed" => Algorithm::EdDSA,
        _ => panic!("unknown fixture key {kid}"),
    }
}

pub fn encoding_key(kid: &str) -> EncodingKey {
    let pem = std::fs::read(fixture(&format!("{kid}.pem"))).unwrap();
    match alg_of(kid) {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_ed_pem(&pem).unwrap(),
    }
}

/// Signs `claims` with fixture key `kid`, putting `kid` in the header.
pub fn sign(kid: &str, claims: &Value) -> String {
    let mut h = Header::new(alg_of(kid));
    h.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&h, claims, &encoding_key(kid)).unwrap()
}

/// Signs with a fully custom header (attacks: `jku`, `x5u`, `jwk`, wrong `kid`).
pub fn sign_with_header(kid: &str, header: Header, claims: &Value) -> String {
    jsonwebtoken::encode(&header, claims, &encoding_key(kid)).unwrap()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The JWKS document of these fixture keys.
pub fn jwks(kids: &[String]) -> Value {
    json!({"keys": kids.iter().map(|k| jwk(k)).collect::<Vec<_>>()})
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    None,
    /// Token endpoint answers 503.
    ServerError,
    /// Token endpoint waits this long before answering.
    Slow(Duration),
}

/// What the JWKS endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwksAnswer {
    /// `200` with the published keys ([`TestIdp::set_keys`]).
    Keys,
    /// `503 Service Unavailable`.
    Unavailable,
    /// `500` with an HTML body.
    ServerError,
    /// `200` with a body that is not JSON.
    Garbage,
    /// `200 {"keys": []}`: valid JSON, no usable key.
    NoKeys,
}

#[derive(Debug, Clone)]
struct Family {
    sub: String,
    /// The provider's session id (`sid` of its ID tokens): one per login.
    sid: String,
    revoked: bool,
}

#[derive(Debug, Clone)]
struct RefreshState {
    family: usize,
    used: bool,
}

struct Inner {
    keys: Vec<String>,
    signing_kid: String,
    access_ttl: i64,
    rotate: bool,
    outage: Outage,
    refresh: HashMap<String, RefreshState>,
    families: Vec<Family>,
    codes: HashMap<String, (String, String)>, // code -> (sub, code_challenge)
    last_token_form: HashMap<String, String>,
    last_token_auth: Option<String>,
    jwks_cache_control: Option<String>,
    jwks_answer: JwksAnswer,
    /// Logins answer with an ID token, and access tokens carry the session's `sid`.
    id_tokens: bool,
    /// Every ID token issued, in order.
    issued_id_tokens: Vec<String>,
    /// Discovery names `{issuer}/logout` as `end_session_endpoint`.
    end_session: bool,
    /// The query of every request to the end-session endpoint, in order.
    end_session_requests: Vec<HashMap<String, String>>,
    /// Access tokens are opaque strings, each handed with its claims to this hook.
    opaque: Option<OpaqueHook>,
}

/// Told every opaque access token issued, with the claims it stands for.
type OpaqueHook = Arc<dyn Fn(&str, &Value) + Send + Sync>;

pub struct TestIdp {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    /// Requests for the JWKS, whatever the answer.
    pub jwks_fetches: Arc<AtomicUsize>,
    pub token_calls: Arc<AtomicUsize>,
    pub revocations: Arc<AtomicUsize>,
    /// Calls of the passthrough login endpoint.
    pub login_calls: Arc<AtomicUsize>,
    /// Connections accepted, on any path.
    pub connections: Arc<AtomicUsize>,
    counter: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const AUDIENCE: &str = "orders-api";
pub const CLIENT_ID: &str = "edge";
pub const CLIENT_SECRET: &str = "s3cret-client";
/// The event a back-channel logout token carries (OpenID Connect Back-Channel Logout 1.0 §2.4).
pub const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

impl TestIdp {
    pub async fn start() -> TestIdp {
        Self::start_on(([127, 0, 0, 1], 0).into()).await
    }

    /// Listens on `addr`, e.g. a port a proxy was already told about.
    pub async fn start_on(addr: SocketAddr) -> TestIdp {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind the test IdP");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner {
            keys: vec!["rsa1".into(), "ec1".into(), "ed1".into()],
            signing_kid: "rsa1".into(),
            access_ttl: 300,
            rotate: true,
            outage: Outage::None,
            refresh: HashMap::new(),
            families: Vec::new(),
            codes: HashMap::new(),
            last_token_form: HashMap::new(),
            last_token_auth: None,
            jwks_cache_control: None,
            jwks_answer: JwksAnswer::Keys,
            id_tokens: false,
            issued_id_tokens: Vec::new(),
            end_session: true,
            end_session_requests: Vec::new(),
            opaque: None,
        }));
        let server = Handles {
            issuer: format!("http://{addr}"),
            inner,
            jwks_fetches: Arc::new(AtomicUsize::new(0)),
            token_calls: Arc::new(AtomicUsize::new(0)),
            revocations: Arc::new(AtomicUsize::new(0)),
            login_calls: Arc::new(AtomicUsize::new(0)),
            connections: Arc::new(AtomicUsize::new(0)),
            counter: Arc::new(AtomicUsize::new(0)),
        };
        let handles = server.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting this task drops them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        server.connections.fetch_add(1, Ordering::SeqCst);
                        let server = server.clone();
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let server = server.clone();
                                async move { Ok::<_, Infallible>(server.handle(req).await) }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        TestIdp {
            addr,
            inner: handles.inner,
            jwks_fetches: handles.jwks_fetches,
            token_calls: handles.token_calls,
            revocations: handles.revocations,
            login_calls: handles.login_calls,
            connections: handles.connections,
            counter: handles.counter,
            task,
        }
    }

    /// Closes the listener and every open connection (the proxy's pooled ones too):
    /// from now on the IdP refuses connections.
    pub fn stop(&self) {
        self.task.abort();
    }

    fn clone_handles(&self) -> Handles {
        Handles {
            issuer: self.issuer(),
            inner: self.inner.clone(),
            jwks_fetches: self.jwks_fetches.clone(),
            token_calls: self.token_calls.clone(),
            revocations: self.revocations.clone(),
            login_calls: self.login_calls.clone(),
            connections: self.connections.clone(),
            counter: self.counter.clone(),
        }
    }

    pub fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.issuer())
    }
    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer())
    }
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.issuer())
    }
    pub fn revoke_url(&self) -> String {
        format!("{}/revoke", self.issuer())
    }
    pub fn login_url(&self) -> String {
        format!("{}/login", self.issuer())
    }
    /// The end-session endpoint (RP-initiated logout) discovery names.
    pub fn end_session_url(&self) -> String {
        format!("{}/logout", self.issuer())
    }

    /// `[[issuers]]` "main": this IdP's `issuer` and `jwks_url`.
    pub fn issuer_table(&self) -> Table {
        Table::new("[[issuers]]")
            .set("name", "main")
            .set("issuer", self.issuer())
            .set("jwks_url", self.jwks_url())
    }

    /// `[auth_server]`: this IdP's token, revocation and login endpoints, for client
    /// [`CLIENT_ID`] whose secret is in the `CLIENT_SECRET` variable.
    pub fn auth_server_table(&self) -> Table {
        Table::new("[auth_server]")
            .set("token_url", self.token_url())
            .set("revocation_url", self.revoke_url())
            .set("login_url", self.login_url())
            .set("client_id", CLIENT_ID)
            .set("client_secret_env", "CLIENT_SECRET")
    }

    /// Publishes exactly these fixture keys in the JWKS from now on.
    pub fn set_keys(&self, kids: &[&str]) {
        self.inner.lock().unwrap().keys = kids.iter().map(|k| k.to_string()).collect();
    }
    /// Signs new tokens with fixture key `kid` from now on.
    #[allow(dead_code, reason = "no suite rotates the signing key yet")]
    pub fn set_signing_key(&self, kid: &str) {
        self.inner.lock().unwrap().signing_kid = kid.to_owned();
    }
    /// From now on access tokens are opaque (for RFC 7662 introspection); `hook`
    /// learns each one with its claims, e.g. to teach an introspection endpoint.
    pub fn set_opaque_access(&self, hook: impl Fn(&str, &Value) + Send + Sync + 'static) {
        self.inner.lock().unwrap().opaque = Some(Arc::new(hook));
    }
    pub fn set_access_ttl(&self, secs: i64) {
        self.inner.lock().unwrap().access_ttl = secs;
    }
    pub fn set_rotation(&self, rotate: bool) {
        self.inner.lock().unwrap().rotate = rotate;
    }
    pub fn set_outage(&self, o: Outage) {
        self.inner.lock().unwrap().outage = o;
    }
    /// What the JWKS endpoint answers from now on.
    pub fn set_jwks_answer(&self, a: JwksAnswer) {
        self.inner.lock().unwrap().jwks_answer = a;
    }
    pub fn set_jwks_cache_control(&self, v: Option<&str>) {
        self.inner.lock().unwrap().jwks_cache_control = v.map(str::to_owned);
    }
    pub fn last_token_form(&self) -> HashMap<String, String> {
        self.inner.lock().unwrap().last_token_form.clone()
    }
    pub fn last_token_auth(&self) -> Option<String> {
        self.inner.lock().unwrap().last_token_auth.clone()
    }
    /// As an OpenID provider: logins (code exchange and passthrough) answer with an
    /// ID token naming the session's `sid`, and access tokens carry that `sid` too.
    pub fn set_id_tokens(&self, on: bool) {
        self.inner.lock().unwrap().id_tokens = on;
    }
    /// Whether discovery names an `end_session_endpoint` (it does by default).
    pub fn set_end_session(&self, published: bool) {
        self.inner.lock().unwrap().end_session = published;
    }
    /// Every ID token issued so far, in order.
    pub fn id_tokens(&self) -> Vec<String> {
        self.inner.lock().unwrap().issued_id_tokens.clone()
    }
    /// The query of every request the end-session endpoint received, in order.
    pub fn end_session_requests(&self) -> Vec<HashMap<String, String>> {
        self.inner.lock().unwrap().end_session_requests.clone()
    }

    /// The claims of a valid back-channel logout token for `sub` and/or `sid`,
    /// issued now (OpenID Connect Back-Channel Logout 1.0 §2.4): `iss`, `aud` =
    /// [`CLIENT_ID`], `iat`, `exp` two minutes on, a fresh `jti`, the event.
    pub fn logout_claims(&self, sub: Option<&str>, sid: Option<&str>) -> Value {
        let n = now();
        let mut c = json!({
            "iss": self.issuer(), "aud": CLIENT_ID, "iat": n, "exp": n + 120,
            "jti": format!("logout-{}", self.counter.fetch_add(1, Ordering::SeqCst)),
            "events": { BACKCHANNEL_EVENT: {} },
        });
        if let Some(sub) = sub {
            c["sub"] = json!(sub);
        }
        if let Some(sid) = sid {
            c["sid"] = json!(sid);
        }
        c
    }

    /// `claims` signed as a logout token: the current signing key, `typ: logout+jwt`.
    pub fn logout_token(&self, claims: &Value) -> String {
        let kid = self.inner.lock().unwrap().signing_kid.clone();
        let mut h = Header::new(alg_of(&kid));
        h.kid = Some(kid.clone());
        h.typ = Some("logout+jwt".into());
        sign_with_header(&kid, h, claims)
    }

    /// Ends every session at the server, as an administrator (or another device's logout) would.
    pub fn revoke_all_sessions(&self) {
        for f in self.inner.lock().unwrap().families.iter_mut() {
            f.revoked = true;
        }
    }

    /// Whether the refresh-token family containing `refresh` was revoked.
    pub fn family_revoked(&self, refresh: &str) -> bool {
        let g = self.inner.lock().unwrap();
        g.refresh.get(refresh).map(|r| g.families[r.family].revoked).unwrap_or(false)
    }

    /// Claims of a normal access token for `sub`, valid for `ttl` seconds.
    pub fn claims(&self, sub: &str, ttl: i64) -> Value {
        self.clone_handles().claims(sub, ttl)
    }

    /// A signed access token for `sub` with the current signing key.
    pub fn access_token(&self, sub: &str, ttl: i64) -> String {
        let kid = self.inner.lock().unwrap().signing_kid.clone();
        sign(&kid, &self.claims(sub, ttl))
    }

    /// Starts a session as a login would: (access token, refresh token).
    #[allow(dead_code, reason = "no suite starts a session behind the proxy's back yet")]
    pub fn session(&self, sub: &str) -> (String, String) {
        let (at, rt, _) = self.clone_handles().new_session(sub);
        (at, rt)
    }
}

#[derive(Clone)]
struct Handles {
    issuer: String,
    inner: Arc<Mutex<Inner>>,
    jwks_fetches: Arc<AtomicUsize>,
    token_calls: Arc<AtomicUsize>,
    revocations: Arc<AtomicUsize>,
    login_calls: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    counter: Arc<AtomicUsize>,
}

fn json_resp(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r
}

fn oauth_error(code: &str) -> Response<Full<Bytes>> {
    json_resp(StatusCode::BAD_REQUEST, &json!({"error": code}))
}

pub fn parse_form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded(std::str::from_utf8(body).unwrap_or(""))
}

fn form_urlencoded(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Handles {
    fn claims(&self, sub: &str, ttl: i64) -> Value {
        let n = now();
        json!({
            "iss": self.issuer, "sub": sub, "aud": AUDIENCE, "exp": n + ttl, "iat": n,
            "scope": "orders:read orders:write", "jti": format!("jti-{}", self.counter.fetch_add(1, Ordering::SeqCst)),
        })
    }

    /// An access token of the session `family`: with its `sid` when ID tokens are on.
    fn mint_access(&self, family: usize) -> (String, i64) {
        let (kid, ttl, sub, sid, opaque) = {
            let g = self.inner.lock().unwrap();
            let f = &g.families[family];
            (
                g.signing_kid.clone(),
                g.access_ttl,
                f.sub.clone(),
                g.id_tokens.then(|| f.sid.clone()),
                g.opaque.clone(),
            )
        };
        let mut claims = self.claims(&sub, ttl);
        if let Some(sid) = sid {
            claims["sid"] = json!(sid);
        }
        if let Some(hook) = opaque {
            let token = super::introspect::opaque_token();
            hook(&token, &claims);
            return (token, ttl);
        }
        (sign(&kid, &claims), ttl)
    }

    /// The session's ID token (OpenID Connect Core §2), when ID tokens are on.
    fn mint_id_token(&self, family: usize) -> Option<String> {
        let (kid, sub, sid) = {
            let g = self.inner.lock().unwrap();
            if !g.id_tokens {
                return None;
            }
            let f = &g.families[family];
            (g.signing_kid.clone(), f.sub.clone(), f.sid.clone())
        };
        let n = now();
        let token = sign(
            &kid,
            &json!({"iss": self.issuer, "sub": sub, "aud": CLIENT_ID, "exp": n + 300, "iat": n, "sid": sid}),
        );
        self.inner.lock().unwrap().issued_id_tokens.push(token.clone());
        Some(token)
    }

    fn new_refresh(&self, family: usize) -> String {
        let rt = format!("rt-{}-{}", family, self.counter.fetch_add(1, Ordering::SeqCst));
        self.inner.lock().unwrap().refresh.insert(rt.clone(), RefreshState { family, used: false });
        rt
    }

    /// A login: (access token, refresh token, ID token when they are on).
    fn new_session(&self, sub: &str) -> (String, String, Option<String>) {
        let family = {
            let mut g = self.inner.lock().unwrap();
            let sid = format!("sid-{}", self.counter.fetch_add(1, Ordering::SeqCst));
            g.families.push(Family { sub: sub.to_owned(), sid, revoked: false });
            g.families.len() - 1
        };
        let (at, _) = self.mint_access(family);
        (at, self.new_refresh(family), self.mint_id_token(family))
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        match path.as_str() {
            "/jwks.json" => {
                self.jwks_fetches.fetch_add(1, Ordering::SeqCst);
                let (keys, cc, answer) = {
                    let g = self.inner.lock().unwrap();
                    (g.keys.clone(), g.jwks_cache_control.clone(), g.jwks_answer)
                };
                let (status, body) = match answer {
                    JwksAnswer::Keys => (StatusCode::OK, jwks(&keys).to_string()),
                    JwksAnswer::Unavailable => {
                        (StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"down\"}".into())
                    }
                    JwksAnswer::ServerError => {
                        (StatusCode::INTERNAL_SERVER_ERROR, "<html>oops</html>".into())
                    }
                    JwksAnswer::Garbage => (StatusCode::OK, "this is not a JWKS {".into()),
                    JwksAnswer::NoKeys => (StatusCode::OK, "{\"keys\":[]}".into()),
                };
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = status;
                r.headers_mut().insert("content-type", "application/json".parse().unwrap());
                if let Some(cc) = cc {
                    r.headers_mut().insert("cache-control", cc.parse().unwrap());
                }
                r
            }
            "/.well-known/openid-configuration" => {
                let mut doc = json!({
                    "issuer": self.issuer,
                    "jwks_uri": format!("{}/jwks.json", self.issuer),
                    "token_endpoint": format!("{}/token", self.issuer),
                    "authorization_endpoint": format!("{}/authorize", self.issuer),
                    "revocation_endpoint": format!("{}/revoke", self.issuer),
                });
                if self.inner.lock().unwrap().end_session {
                    doc["end_session_endpoint"] = json!(format!("{}/logout", self.issuer));
                    doc["backchannel_logout_supported"] = json!(true);
                    doc["backchannel_logout_session_supported"] = json!(true);
                }
                json_resp(StatusCode::OK, &doc)
            }
            "/logout" => {
                // RP-initiated logout 1.0 §2-§3: back to post_logout_redirect_uri when given.
                let q = form_urlencoded(&query);
                let back = q.get("post_logout_redirect_uri").cloned();
                self.inner.lock().unwrap().end_session_requests.push(q);
                match back {
                    Some(uri) => {
                        let mut r = Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = StatusCode::FOUND;
                        r.headers_mut().insert("location", uri.parse().unwrap());
                        r
                    }
                    None => json_resp(StatusCode::OK, &json!({"logged_out": true})),
                }
            }
            "/token" => self.token(parse_form(&body), auth).await,
            "/revoke" => {
                let form = parse_form(&body);
                let mut g = self.inner.lock().unwrap();
                if let Some(t) = form.get("token") {
                    if let Some(fam) = g.refresh.get(t).map(|r| r.family) {
                        g.families[fam].revoked = true;
                    }
                }
                self.revocations.fetch_add(1, Ordering::SeqCst);
                json_resp(StatusCode::OK, &json!({}))
            }
            "/authorize" => {
                let q = form_urlencoded(&query);
                let code = format!("code-{}", self.counter.fetch_add(1, Ordering::SeqCst));
                let challenge = q.get("code_challenge").cloned().unwrap_or_default();
                self.inner.lock().unwrap().codes.insert(code.clone(), ("alice".into(), challenge));
                let redirect = q.get("redirect_uri").cloned().unwrap_or_default();
                let state = q.get("state").cloned().unwrap_or_default();
                let loc = format!("{redirect}?code={code}&state={state}&iss={}", self.issuer);
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::FOUND;
                r.headers_mut().insert("location", loc.parse().unwrap());
                r
            }
            "/login" => {
                self.login_calls.fetch_add(1, Ordering::SeqCst);
                let creds: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if creds["password"] != "correct horse" {
                    return json_resp(StatusCode::UNAUTHORIZED, &json!({"error": "bad credentials"}));
                }
                let user = creds["username"].as_str().unwrap_or("alice").to_owned();
                let (at, rt, id_token) = self.new_session(&user);
                let ttl = self.inner.lock().unwrap().access_ttl;
                let mut answer = json!({"access_token": at, "refresh_token": rt, "expires_in": ttl, "user": {"name": user}});
                if let Some(id) = id_token {
                    answer["id_token"] = json!(id);
                }
                json_resp(StatusCode::OK, &answer)
            }
            _ => json_resp(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        }
    }

    async fn token(&self, form: HashMap<String, String>, auth: Option<String>) -> Response<Full<Bytes>> {
        self.token_calls.fetch_add(1, Ordering::SeqCst);
        let outage = {
            let mut g = self.inner.lock().unwrap();
            g.last_token_form = form.clone();
            g.last_token_auth = auth.clone();
            g.outage
        };
        match outage {
            Outage::ServerError => {
                return json_resp(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": "temporarily_unavailable"}),
                )
            }
            Outage::Slow(d) => tokio::time::sleep(d).await,
            Outage::None => {}
        }
        match form.get("grant_type").map(String::as_str) {
            Some("refresh_token") => {
                let Some(rt) = form.get("refresh_token") else { return oauth_error("invalid_request") };
                let (family, rotate) = {
                    let mut g = self.inner.lock().unwrap();
                    let Some(state) = g.refresh.get(rt).cloned() else { return oauth_error("invalid_grant") };
                    if g.families[state.family].revoked {
                        return oauth_error("invalid_grant");
                    }
                    let rotate = g.rotate;
                    if state.used {
                        // Reuse of a rotated token: treat as theft, end the whole session.
                        g.families[state.family].revoked = true;
                        return oauth_error("invalid_grant");
                    }
                    if rotate {
                        g.refresh.get_mut(rt).unwrap().used = true;
                    }
                    (state.family, rotate)
                };
                let (at, ttl) = self.mint_access(family);
                let mut body = json!({"access_token": at, "token_type": "Bearer", "expires_in": ttl});
                if rotate {
                    body["refresh_token"] = json!(self.new_refresh(family));
                }
                json_resp(StatusCode::OK, &body)
            }
            Some("authorization_code") => {
                let code = form.get("code").cloned().unwrap_or_default();
                let Some((sub, challenge)) = self.inner.lock().unwrap().codes.remove(&code) else {
                    return oauth_error("invalid_grant");
                };
                let verifier = form.get("code_verifier").cloned().unwrap_or_default();
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
                if b64(digest.as_ref()) != challenge {
                    return oauth_error("invalid_grant");
                }
                let (at, rt, id_token) = self.new_session(&sub);
                let ttl = self.inner.lock().unwrap().access_ttl;
                let mut answer = json!({"access_token": at, "refresh_token": rt, "token_type": "Bearer", "expires_in": ttl});
                if let Some(id) = id_token {
                    answer["id_token"] = json!(id);
                }
                json_resp(StatusCode::OK, &answer)
            }
            _ => oauth_error("unsupported_grant_type"),
        }
    }
}
