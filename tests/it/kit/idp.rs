//! The tests' authorization server: the demo's identity provider
//! (`portcullis::demo::idp`, the same code `portcullis demo` runs: authorization
//! code + PKCE, rotating refresh tokens with reuse detection, RFC 7009
//! revocation, OpenID sessions with `sid`, ID tokens, RP-initiated logout)
//! signed with the fixture keys, signing in as `alice` without a form, plus what
//! only tests need: JWKS keys that rotate and fail on demand ([`JwksAnswer`]),
//! token-endpoint outages ([`Outage`]), a password login endpoint for
//! passthrough, opaque access tokens ([`TestIdp::set_opaque_access`]), counters,
//! and a record of what the proxy sent.
//!
//! It is also the tests' only JWKS server: one that fails on demand, one that is
//! stopped ([`TestIdp::stop`]) or that only starts later ([`TestIdp::start_on`]),
//! and the attacker's server that must never be contacted ([`TestIdp::connections`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use portcullis::body::{full, json_response, Body};
use portcullis::demo::idp::{self as core, Idp, Kind, Login, Signer};
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

struct Inner {
    keys: Vec<String>,
    signing_kid: String,
    outage: Outage,
    last_token_form: HashMap<String, String>,
    last_token_auth: Option<String>,
    jwks_cache_control: Option<String>,
    jwks_answer: JwksAnswer,
    /// Every ID token issued, in order.
    issued_id_tokens: Vec<String>,
    /// The query of every request to the end-session endpoint, in order.
    end_session_requests: Vec<HashMap<String, String>>,
    /// Access tokens are opaque strings, each handed with its claims to this hook.
    opaque: Option<OpaqueHook>,
}

/// Told every opaque access token issued, with the claims it stands for.
type OpaqueHook = Arc<dyn Fn(&str, &Value) + Send + Sync>;

/// The provider's keys: the fixture key chosen for signing, the published set
/// for the JWKS, opaque access tokens when asked for.
struct FixtureKeys(Arc<Mutex<Inner>>);

impl Signer for FixtureKeys {
    fn sign(&self, kind: Kind, claims: &Value) -> String {
        let (kid, opaque) = {
            let g = self.0.lock().unwrap();
            (g.signing_kid.clone(), g.opaque.clone())
        };
        match (kind, opaque) {
            (Kind::Access, Some(hook)) => {
                let token = super::introspect::opaque_token();
                hook(&token, claims);
                token
            }
            (Kind::Access, None) => sign(&kid, claims),
            (Kind::Id, _) => {
                let token = sign(&kid, claims);
                self.0.lock().unwrap().issued_id_tokens.push(token.clone());
                token
            }
            (Kind::Logout, _) => {
                let mut h = Header::new(alg_of(&kid));
                h.kid = Some(kid.clone());
                h.typ = Some("logout+jwt".into());
                sign_with_header(&kid, h, claims)
            }
        }
    }

    fn verify(&self, token: &str) -> Option<Value> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk(&header.kid?)).ok()?;
        let key = DecodingKey::from_jwk(&jwk).ok()?;
        let mut v = Validation::new(header.alg);
        v.validate_exp = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        jsonwebtoken::decode::<Value>(token, &key, &v).ok().map(|d| d.claims)
    }

    fn jwks(&self) -> Value {
        jwks(&self.0.lock().unwrap().keys)
    }
}

pub struct TestIdp {
    pub addr: SocketAddr,
    core: Arc<Idp>,
    inner: Arc<Mutex<Inner>>,
    /// Requests for the JWKS, whatever the answer.
    pub jwks_fetches: Arc<AtomicUsize>,
    pub token_calls: Arc<AtomicUsize>,
    pub revocations: Arc<AtomicUsize>,
    /// Calls of the passthrough login endpoint.
    pub login_calls: Arc<AtomicUsize>,
    /// Connections accepted, on any path.
    pub connections: Arc<AtomicUsize>,
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
pub use core::BACKCHANNEL_EVENT;

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
            outage: Outage::None,
            last_token_form: HashMap::new(),
            last_token_auth: None,
            jwks_cache_control: None,
            jwks_answer: JwksAnswer::Keys,
            issued_id_tokens: Vec::new(),
            end_session_requests: Vec::new(),
            opaque: None,
        }));
        let mut redirects = core::loopback_prefixes();
        redirects.push("http://app.test/".into());
        let core = Idp::new(
            core::Options {
                issuer: format!("http://{addr}"),
                client_id: CLIENT_ID.into(),
                client_secret: Some(CLIENT_SECRET.into()),
                audience: AUDIENCE.into(),
                scope: "orders:read orders:write".into(),
                login: Login::Auto("alice".into()),
                redirects,
                profile: Default::default(),
                access_ttl: 300,
            },
            Arc::new(FixtureKeys(inner.clone())),
        );
        core.set_id_tokens(false);
        let server = Server {
            core: core.clone(),
            inner: inner.clone(),
            jwks_fetches: Arc::new(AtomicUsize::new(0)),
            token_calls: Arc::new(AtomicUsize::new(0)),
            revocations: Arc::new(AtomicUsize::new(0)),
            login_calls: Arc::new(AtomicUsize::new(0)),
            connections: Arc::new(AtomicUsize::new(0)),
        };
        TestIdp {
            addr,
            core,
            inner,
            jwks_fetches: server.jwks_fetches.clone(),
            token_calls: server.token_calls.clone(),
            revocations: server.revocations.clone(),
            login_calls: server.login_calls.clone(),
            connections: server.connections.clone(),
            task: server.serve(listener),
        }
    }

    /// Closes the listener and every open connection (the proxy's pooled ones too):
    /// from now on the IdP refuses connections.
    pub fn stop(&self) {
        self.task.abort();
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
        self.core.set_access_ttl(secs);
    }
    pub fn set_rotation(&self, rotate: bool) {
        self.core.set_rotation(rotate);
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
        self.core.set_id_tokens(on);
    }
    /// Whether discovery names an `end_session_endpoint` (it does by default).
    pub fn set_end_session(&self, published: bool) {
        self.core.set_end_session(published);
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
        self.core.logout_claims(sub, sid)
    }

    /// `claims` signed as a logout token: the current signing key, `typ: logout+jwt`.
    pub fn logout_token(&self, claims: &Value) -> String {
        FixtureKeys(self.inner.clone()).sign(Kind::Logout, claims)
    }

    /// Ends every session at the server, as an administrator (or another device's logout) would.
    pub fn revoke_all_sessions(&self) {
        self.core.revoke_all();
    }

    /// Whether the refresh-token family containing `refresh` was revoked.
    pub fn family_revoked(&self, refresh: &str) -> bool {
        self.core.family_revoked(refresh)
    }

    /// Every refresh token this server has issued, spent or not.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.core.issued_refresh_tokens()
    }

    /// Claims of a normal access token for `sub`, valid for `ttl` seconds.
    pub fn claims(&self, sub: &str, ttl: i64) -> Value {
        self.core.access_claims(sub, None, ttl)
    }

    /// A signed access token for `sub` with the current signing key.
    pub fn access_token(&self, sub: &str, ttl: i64) -> String {
        let kid = self.inner.lock().unwrap().signing_kid.clone();
        sign(&kid, &self.claims(sub, ttl))
    }

    /// Starts a session as a login would: (access token, refresh token).
    #[allow(dead_code, reason = "no suite starts a session behind the proxy's back yet")]
    pub fn session(&self, sub: &str) -> (String, String) {
        let t = self.core.start_session(sub);
        (t.access, t.refresh)
    }
}

#[derive(Clone)]
struct Server {
    core: Arc<Idp>,
    inner: Arc<Mutex<Inner>>,
    jwks_fetches: Arc<AtomicUsize>,
    token_calls: Arc<AtomicUsize>,
    revocations: Arc<AtomicUsize>,
    login_calls: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

pub fn parse_form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

impl Server {
    fn serve(self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let connections = self.connections.clone();
        super::serve::accept_loop(listener, move |stream| {
            connections.fetch_add(1, Ordering::SeqCst);
            let server = self.clone();
            super::serve::auto_conn(stream, move |req| {
                let server = server.clone();
                async move { server.handle(req).await }
            })
        })
    }

    /// What only tests need, around the provider's own answers.
    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        match path.as_str() {
            "/jwks.json" => return self.jwks(),
            "/login" => return self.password_login(&body),
            "/token" => {
                self.token_calls.fetch_add(1, Ordering::SeqCst);
                let outage = {
                    let mut g = self.inner.lock().unwrap();
                    g.last_token_form = parse_form(&body);
                    g.last_token_auth = auth.clone();
                    g.outage
                };
                match outage {
                    Outage::ServerError => {
                        return json_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &json!({"error": "temporarily_unavailable"}),
                        )
                    }
                    Outage::Slow(d) => tokio::time::sleep(d).await,
                    Outage::None => {}
                }
            }
            "/revoke" => {
                self.revocations.fetch_add(1, Ordering::SeqCst);
            }
            "/logout" => {
                self.inner.lock().unwrap().end_session_requests.push(parse_form(query.as_bytes()));
            }
            _ => {}
        }
        self.core.answer(&method, &path, &query, auth.as_deref(), &body).await
    }

    fn jwks(&self) -> Response<Body> {
        self.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        let (keys, cc, answer) = {
            let g = self.inner.lock().unwrap();
            (g.keys.clone(), g.jwks_cache_control.clone(), g.jwks_answer)
        };
        let (status, body) = match answer {
            JwksAnswer::Keys => (StatusCode::OK, jwks(&keys).to_string()),
            JwksAnswer::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"down\"}".into()),
            JwksAnswer::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "<html>oops</html>".into()),
            JwksAnswer::Garbage => (StatusCode::OK, "this is not a JWKS {".into()),
            JwksAnswer::NoKeys => (StatusCode::OK, "{\"keys\":[]}".into()),
        };
        let mut r = Response::new(full(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert("content-type", "application/json".parse().unwrap());
        if let Some(cc) = cc {
            r.headers_mut().insert("cache-control", cc.parse().unwrap());
        }
        r
    }

    /// The login endpoint `passthrough` calls: JSON credentials in, tokens out.
    fn password_login(&self, body: &[u8]) -> Response<Body> {
        self.login_calls.fetch_add(1, Ordering::SeqCst);
        let creds: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if creds["password"] != "correct horse" {
            return json_response(StatusCode::UNAUTHORIZED, &json!({"error": "bad credentials"}));
        }
        let user = creds["username"].as_str().unwrap_or("alice").to_owned();
        let t = self.core.start_session(&user);
        let mut answer = json!({
            "access_token": t.access, "refresh_token": t.refresh, "expires_in": t.expires_in,
            "user": {"name": user},
        });
        if let Some(id) = t.id_token {
            answer["id_token"] = json!(id);
        }
        json_response(StatusCode::OK, &answer)
    }
}
