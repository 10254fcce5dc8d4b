//! The identity provider `portcullis demo` runs, and the one the test suite's
//! authorization server is built on: just enough OpenID Connect to show the
//! proxy's whole job on one machine. Discovery and JWKS, authorization code +
//! PKCE (S256) with a login form (or, for tests, an automatic login), rotating
//! refresh tokens with reuse detection (a reused refresh token revokes its
//! family, RFC 9700 §4.14.2), RFC 7009 revocation, and RP-initiated logout that
//! ends the provider's session and sends an OpenID Connect back-channel logout
//! token to the proxy. Keys come from a [`Signer`]: the demo's is a fresh RSA
//! key per start ([`RsaKey`]). Started by `demo` alone, on loopback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::http::{form, html, json_response, read_body, redirect, Answer};
use crate::clock::unix_now;

/// The demo's client, audience, user and scope.
pub const CLIENT_ID: &str = "portcullis-demo";
pub const AUDIENCE: &str = "demo-api";
pub const USER: &str = "demo";
pub const SCOPE: &str = "openid offline_access orders:read";
/// The event a back-channel logout token carries (Back-Channel Logout 1.0 §2.4).
pub const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
const CODE_TTL: i64 = 60;
const ID_TOKEN_TTL: i64 = 300;

/// Which token a [`Signer`] is asked for: each has its own `typ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Access,
    Id,
    Logout,
}

/// The provider's keys: signs its tokens, checks its own, publishes the JWKS.
pub trait Signer: Send + Sync {
    fn sign(&self, kind: Kind, claims: &Value) -> String;
    /// The payload of one of this provider's tokens, signature checked, expiry not.
    fn verify(&self, token: &str) -> Option<Value>;
    fn jwks(&self) -> Value;
}

/// A fresh RSA-2048 key, RS256.
pub struct RsaKey {
    key: KeyPair,
    kid: String,
    rng: SystemRandom,
}

impl RsaKey {
    pub fn generate() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let rng = SystemRandom::new();
        let key = KeyPair::generate(KeySize::Rsa2048)?;
        Ok(Self { kid: random(&rng, 8), key, rng })
    }
}

impl Signer for RsaKey {
    fn sign(&self, kind: Kind, claims: &Value) -> String {
        let typ = match kind {
            Kind::Access => "at+jwt",
            Kind::Id => "JWT",
            Kind::Logout => "logout+jwt",
        };
        let header = json!({"alg": "RS256", "typ": typ, "kid": self.kid});
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        if self.key.sign(&signature::RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut sig).is_err() {
            return String::new();
        }
        format!("{input}.{}", b64(&sig))
    }

    fn verify(&self, token: &str) -> Option<Value> {
        let (input, sig) = token.rsplit_once('.')?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).ok()?;
        let public =
            signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, self.key.public_key());
        public.verify(input.as_bytes(), &sig).ok()?;
        crate::auth::jwt::unverified_payload(input)
    }

    fn jwks(&self) -> Value {
        let public = self.key.public_key();
        let n = b64(public.modulus().big_endian_without_leading_zero());
        let e = b64(public.exponent().big_endian_without_leading_zero());
        json!({"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid, "n": n, "e": e}]})
    }
}

/// How a user gets through `/authorize`.
pub enum Login {
    /// A form asking for this one user's password.
    Form { user: String, password: String },
    /// Signed in as this user at once (the test suite's provider).
    Auto(String),
}

pub struct Options {
    pub issuer: String,
    pub client_id: String,
    /// A secret presented (HTTP Basic or the form) must be this one; a client
    /// may always call as a public client.
    pub client_secret: Option<String>,
    pub audience: String,
    pub scope: String,
    pub login: Login,
    /// Prefixes a `redirect_uri` or `post_logout_redirect_uri` must start with.
    pub redirects: Vec<String>,
    /// Claims every access and ID token carries besides the protocol's.
    pub profile: Map<String, Value>,
    pub access_ttl: i64,
}

impl Options {
    /// The demo's: one user with a fresh password, loopback redirects only.
    pub fn demo(issuer: String, access_ttl: i64) -> Self {
        let mut profile = Map::new();
        profile.insert("client_id".into(), json!(CLIENT_ID));
        profile.insert("name".into(), json!("Demo User"));
        profile.insert("email".into(), json!("demo@example.com"));
        Self {
            issuer,
            client_id: CLIENT_ID.into(),
            client_secret: None,
            audience: AUDIENCE.into(),
            scope: SCOPE.into(),
            login: Login::Form { user: USER.into(), password: password(&SystemRandom::new()) },
            redirects: loopback_prefixes(),
            profile,
            access_ttl,
        }
    }
}

/// `http://` on this machine, any port.
pub fn loopback_prefixes() -> Vec<String> {
    ["http://127.0.0.1:", "http://localhost:", "http://127.0.0.1/", "http://localhost/"]
        .map(String::from)
        .to_vec()
}

/// `u` starts with one of `prefixes` and names no userinfo:
/// `http://127.0.0.1:80@evil.example/` starts like a local URL.
fn allowed_redirect(prefixes: &[String], u: &str) -> bool {
    let authority = u.split(['/', '?', '#']).nth(2).unwrap_or("");
    !authority.contains('@') && prefixes.iter().any(|p| u.starts_with(p.as_str()))
}

/// What the provider's page (and `/stats`) shows: the proof that a storm made one refresh.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub logins: u64,
    pub code_grants: u64,
    pub refresh_grants: u64,
    pub reuse_detected: u64,
    pub revocations: u64,
    pub backchannel_logouts: u64,
}

/// What a login hands the client.
pub struct Tokens {
    pub access: String,
    pub refresh: String,
    pub id_token: Option<String>,
    pub expires_in: i64,
}

struct Code {
    sub: String,
    redirect_uri: String,
    challenge: String,
    sid: String,
    nonce: Option<String>,
    exp: i64,
}

struct Family {
    sub: String,
    sid: String,
    current: String,
    revoked: bool,
}

struct State {
    codes: HashMap<String, Code>,
    families: HashMap<String, Family>,
    /// Every refresh token ever issued → its family.
    refresh: HashMap<String, String>,
    stats: Stats,
    access_ttl: i64,
    /// Refresh tokens rotate on use (off: the same one keeps working).
    rotate: bool,
    /// Logins answer with an ID token, and access tokens carry the session's `sid`.
    id_tokens: bool,
    /// Discovery names `end_session_endpoint`.
    end_session: bool,
}

pub struct Idp {
    opts: Options,
    signer: Arc<dyn Signer>,
    rng: SystemRandom,
    state: Mutex<State>,
    /// The proxy's back-channel logout URL, known once the proxy is bound.
    pub backchannel: OnceLock<String>,
}

impl Idp {
    pub fn new(opts: Options, signer: Arc<dyn Signer>) -> Arc<Self> {
        let state = State {
            codes: HashMap::new(),
            families: HashMap::new(),
            refresh: HashMap::new(),
            stats: Stats::default(),
            access_ttl: opts.access_ttl,
            rotate: true,
            id_tokens: true,
            end_session: true,
        };
        Arc::new(Self {
            opts,
            signer,
            rng: SystemRandom::new(),
            state: Mutex::new(state),
            backchannel: OnceLock::new(),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.opts.issuer
    }

    /// The form login's password (the demo prints it).
    pub fn password(&self) -> &str {
        match &self.opts.login {
            Login::Form { password, .. } => password,
            Login::Auto(_) => "",
        }
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }
    pub fn set_access_ttl(&self, secs: i64) {
        self.lock().access_ttl = secs;
    }
    pub fn set_rotation(&self, rotate: bool) {
        self.lock().rotate = rotate;
    }
    pub fn set_id_tokens(&self, on: bool) {
        self.lock().id_tokens = on;
    }
    pub fn set_end_session(&self, published: bool) {
        self.lock().end_session = published;
    }

    /// Ends every session, as an administrator (or another device's logout) would.
    pub fn revoke_all(&self) {
        for f in self.lock().families.values_mut() {
            f.revoked = true;
        }
    }

    /// Whether the family of this refresh token was revoked.
    pub fn family_revoked(&self, refresh: &str) -> bool {
        let s = self.lock();
        s.refresh.get(refresh).and_then(|f| s.families.get(f)).is_some_and(|f| f.revoked)
    }

    /// Every refresh token issued so far, spent or not.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.lock().refresh.keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Answer {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let authorization =
            req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let Some(body) = read_body(req).await else {
            return bad_request("invalid_request", "unreadable body");
        };
        self.answer(&method, &path, &query, authorization.as_deref(), &body).await
    }

    /// One request, its body already read.
    pub async fn answer(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Answer {
        let q = || form(query.as_bytes());
        match (method.clone(), path) {
            (Method::GET, "/.well-known/openid-configuration") => {
                json_response(StatusCode::OK, &self.discovery())
            }
            (Method::GET, "/jwks.json") => json_response(StatusCode::OK, &self.signer.jwks()),
            (Method::GET, "/authorize") => self.authorize(&q()),
            (Method::POST, "/authorize") => self.authorize_submit(&form(body)),
            (Method::POST, "/token") => self.token(authorization, &form(body)),
            (Method::POST, "/revoke") => self.revoke(&form(body)),
            (Method::GET, "/logout") => self.logout(&q()).await,
            (Method::GET, "/stats") => {
                let mut r = json_response(StatusCode::OK, &json!(self.stats()));
                // The demo page on the proxy's origin reads it.
                r.headers_mut()
                    .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, header::HeaderValue::from_static("*"));
                r
            }
            (Method::GET, "/") => self.page(),
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        }
    }

    fn discovery(&self) -> Value {
        let i = &self.opts.issuer;
        let auth_methods: &[&str] = match self.opts.client_secret {
            Some(_) => &["client_secret_basic", "client_secret_post", "none"],
            None => &["none"],
        };
        let mut doc = json!({
            "issuer": i,
            "authorization_endpoint": format!("{i}/authorize"),
            "token_endpoint": format!("{i}/token"),
            "jwks_uri": format!("{i}/jwks.json"),
            "revocation_endpoint": format!("{i}/revoke"),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": auth_methods,
            "id_token_signing_alg_values_supported": ["RS256"],
            "subject_types_supported": ["public"],
            "authorization_response_iss_parameter_supported": true,
        });
        if self.lock().end_session {
            doc["end_session_endpoint"] = json!(format!("{i}/logout"));
            doc["backchannel_logout_supported"] = json!(true);
            doc["backchannel_logout_session_supported"] = json!(true);
        }
        doc
    }

    fn authorize(&self, q: &HashMap<String, String>) -> Answer {
        if let Err(why) = self.check_authorize(q) {
            return bad_authorize(why);
        }
        match &self.opts.login {
            Login::Form { .. } => self.authorize_form(q, None),
            Login::Auto(user) => self.grant_code(q, user),
        }
    }

    fn authorize_form(&self, q: &HashMap<String, String>, error: Option<&str>) -> Answer {
        let Login::Form { user, password } = &self.opts.login else {
            return bad_authorize("no login form here");
        };
        let mut hidden = String::new();
        for k in [
            "client_id",
            "redirect_uri",
            "state",
            "code_challenge",
            "code_challenge_method",
            "scope",
            "nonce",
        ] {
            if let Some(v) = q.get(k) {
                hidden.push_str(&format!(r#"<input type="hidden" name="{k}" value="{}">"#, escape(v)));
            }
        }
        let error = error.map(|e| format!(r#"<p class="error">{}</p>"#, escape(e))).unwrap_or_default();
        let body = format!(
            r#"<h1>Demo identity provider</h1>
<p>Sign in as <b>{u}</b> with the password <b>{pw}</b> (printed by <code>portcullis demo</code>).</p>
{error}<form method="post" action="/authorize">{hidden}
<label>User <input name="username" value="{u}" autocomplete="username"></label>
<label>Password <input name="password" type="password" autocomplete="current-password" autofocus></label>
<button type="submit">Sign in</button></form>"#,
            u = escape(user),
            pw = escape(password)
        );
        html(StatusCode::OK, &body)
    }

    fn authorize_submit(&self, f: &HashMap<String, String>) -> Answer {
        if let Err(why) = self.check_authorize(f) {
            return bad_authorize(why);
        }
        let Login::Form { user, password } = &self.opts.login else {
            return bad_authorize("no login form here");
        };
        let user_ok = f.get("username") == Some(user);
        let pw_ok = f.get("password").is_some_and(|p| constant_eq(p.as_bytes(), password.as_bytes()));
        if !(user_ok && pw_ok) {
            return self.authorize_form(f, Some("Wrong user or password."));
        }
        self.grant_code(f, user)
    }

    /// The user is signed in: a code for the client, back to its redirect_uri.
    fn grant_code(&self, f: &HashMap<String, String>, user: &str) -> Answer {
        let code = format!("code-{}", random(&self.rng, 24));
        let sid = format!("sid-{}", random(&self.rng, 12));
        let redirect_uri = f.get("redirect_uri").cloned().unwrap_or_default();
        {
            let mut s = self.lock();
            let now = unix_now();
            s.codes.retain(|_, c| c.exp > now);
            s.codes.insert(
                code.clone(),
                Code {
                    sub: user.to_owned(),
                    redirect_uri: redirect_uri.clone(),
                    challenge: f.get("code_challenge").cloned().unwrap_or_default(),
                    sid,
                    nonce: f.get("nonce").cloned(),
                    exp: now + CODE_TTL,
                },
            );
            s.stats.logins += 1;
        }
        let mut to = url_with(&redirect_uri, &[("code", &code), ("iss", &self.opts.issuer)]);
        if let Some(state) = f.get("state") {
            to = url_with(&to, &[("state", state)]);
        }
        redirect(&to)
    }

    fn check_authorize(&self, q: &HashMap<String, String>) -> Result<(), &'static str> {
        if q.get("client_id") != Some(&self.opts.client_id) {
            return Err("unknown client_id");
        }
        if q.get("response_type").is_some_and(|t| t != "code") {
            return Err("only response_type=code");
        }
        if !q.get("redirect_uri").is_some_and(|u| self.allowed_redirect(u)) {
            return Err("redirect_uri is not registered");
        }
        if q.get("code_challenge_method").map(String::as_str) != Some("S256")
            || !q.contains_key("code_challenge")
        {
            return Err("PKCE with S256 is required");
        }
        Ok(())
    }

    fn allowed_redirect(&self, u: &str) -> bool {
        allowed_redirect(&self.opts.redirects, u)
    }

    /// RFC 6749 §2.3.1: HTTP Basic (form-encoded id and secret) or the form's fields.
    fn client_ok(&self, authorization: Option<&str>, f: &HashMap<String, String>) -> bool {
        let basic = authorization.and_then(|a| a.strip_prefix("Basic ")).and_then(|b| {
            let raw = base64::engine::general_purpose::STANDARD.decode(b.trim()).ok()?;
            let raw = String::from_utf8(raw).ok()?;
            let (id, secret) = raw.split_once(':')?;
            Some((form_decode(id), Some(form_decode(secret))))
        });
        let (id, secret) = match basic {
            Some(pair) => pair,
            None => (f.get("client_id").cloned().unwrap_or_default(), f.get("client_secret").cloned()),
        };
        let secret_ok = match (secret, &self.opts.client_secret) {
            (None, _) => true,
            (Some(got), Some(want)) => constant_eq(got.as_bytes(), want.as_bytes()),
            (Some(_), None) => false,
        };
        id == self.opts.client_id && secret_ok
    }

    fn token(&self, authorization: Option<&str>, f: &HashMap<String, String>) -> Answer {
        if !self.client_ok(authorization, f) {
            return json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_client"}));
        }
        match f.get("grant_type").map(String::as_str) {
            Some("authorization_code") => self.code_grant(f),
            Some("refresh_token") => self.refresh_grant(f),
            _ => bad_request("unsupported_grant_type", "authorization_code or refresh_token"),
        }
    }

    fn code_grant(&self, f: &HashMap<String, String>) -> Answer {
        let Some(code) = f.get("code").and_then(|c| self.lock().codes.remove(c)) else {
            return bad_request("invalid_grant", "unknown or used code");
        };
        let verifier = f.get("code_verifier").map(String::as_str).unwrap_or("");
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
        if code.exp < unix_now()
            || f.get("redirect_uri") != Some(&code.redirect_uri)
            || !constant_eq(b64(digest.as_ref()).as_bytes(), code.challenge.as_bytes())
        {
            return bad_request("invalid_grant", "code expired, redirect_uri or PKCE verifier mismatch");
        }
        self.lock().stats.code_grants += 1;
        let tokens = self.session(&code.sub, code.sid, code.nonce.as_deref());
        json_response(StatusCode::OK, &self.token_answer(tokens))
    }

    /// A login outside the code flow (e.g. a password API): a new session's tokens.
    pub fn start_session(&self, sub: &str) -> Tokens {
        self.session(sub, format!("sid-{}", random(&self.rng, 12)), None)
    }

    fn session(&self, sub: &str, sid: String, nonce: Option<&str>) -> Tokens {
        let family = random(&self.rng, 12);
        let refresh = format!("rt-{}", random(&self.rng, 32));
        let (ttl, id_tokens) = {
            let mut s = self.lock();
            s.families.insert(
                family.clone(),
                Family { sub: sub.to_owned(), sid: sid.clone(), current: refresh.clone(), revoked: false },
            );
            s.refresh.insert(refresh.clone(), family);
            (s.access_ttl, s.id_tokens)
        };
        let access =
            self.signer.sign(Kind::Access, &self.access_claims(sub, id_tokens.then_some(&*sid), ttl));
        let id_token = id_tokens.then(|| self.id_token(sub, &sid, nonce));
        Tokens { access, refresh, id_token, expires_in: ttl }
    }

    fn token_answer(&self, t: Tokens) -> Value {
        let mut v = json!({
            "access_token": t.access,
            "token_type": "Bearer",
            "expires_in": t.expires_in,
            "refresh_token": t.refresh,
            "scope": self.opts.scope,
        });
        if let Some(id) = t.id_token {
            v["id_token"] = json!(id);
        }
        v
    }

    fn refresh_grant(&self, f: &HashMap<String, String>) -> Answer {
        let presented = f.get("refresh_token").cloned().unwrap_or_default();
        let new = format!("rt-{}", random(&self.rng, 32));
        let mut s = self.lock();
        let Some(family_id) = s.refresh.get(&presented).cloned() else {
            return bad_request("invalid_grant", "unknown refresh token");
        };
        let (rotate, ttl, id_tokens) = (s.rotate, s.access_ttl, s.id_tokens);
        let Some(family) = s.families.get_mut(&family_id) else {
            return bad_request("invalid_grant", "unknown refresh token");
        };
        if family.revoked {
            return bad_request("invalid_grant", "the session was revoked");
        }
        if family.current != presented {
            // A rotated-away token came back: stolen or replayed. End the whole session.
            family.revoked = true;
            s.stats.reuse_detected += 1;
            return bad_request("invalid_grant", "refresh token reused; session revoked");
        }
        if rotate {
            family.current = new.clone();
        }
        let (sub, sid) = (family.sub.clone(), family.sid.clone());
        if rotate {
            s.refresh.insert(new.clone(), family_id);
        }
        s.stats.refresh_grants += 1;
        drop(s);
        let claims = self.access_claims(&sub, id_tokens.then_some(&*sid), ttl);
        let mut answer = json!({
            "access_token": self.signer.sign(Kind::Access, &claims),
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": self.opts.scope,
        });
        if rotate {
            answer["refresh_token"] = json!(new);
        }
        json_response(StatusCode::OK, &answer)
    }

    /// The claims of an access token for `sub`, valid `ttl` seconds from now.
    pub fn access_claims(&self, sub: &str, sid: Option<&str>, ttl: i64) -> Value {
        let now = unix_now();
        let mut c = json!({
            "iss": self.opts.issuer, "sub": sub, "aud": self.opts.audience,
            "iat": now, "exp": now + ttl, "jti": format!("jti-{}", random(&self.rng, 12)),
            "scope": self.opts.scope,
        });
        if let Some(sid) = sid {
            c["sid"] = json!(sid);
        }
        self.with_profile(c)
    }

    fn id_token(&self, sub: &str, sid: &str, nonce: Option<&str>) -> String {
        let now = unix_now();
        let mut c = json!({
            "iss": self.opts.issuer, "sub": sub, "aud": self.opts.client_id,
            "iat": now, "exp": now + ID_TOKEN_TTL, "sid": sid,
        });
        if let Some(n) = nonce {
            c["nonce"] = json!(n);
        }
        self.signer.sign(Kind::Id, &self.with_profile(c))
    }

    fn with_profile(&self, mut claims: Value) -> Value {
        if let Some(map) = claims.as_object_mut() {
            for (k, v) in &self.opts.profile {
                map.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        claims
    }

    /// The claims of a back-channel logout token for `sub` and/or `sid`, issued
    /// now (Back-Channel Logout 1.0 §2.4): `aud` the client, two minutes, a fresh `jti`.
    pub fn logout_claims(&self, sub: Option<&str>, sid: Option<&str>) -> Value {
        let now = unix_now();
        let mut c = json!({
            "iss": self.opts.issuer, "aud": self.opts.client_id, "iat": now, "exp": now + 120,
            "jti": format!("logout-{}", random(&self.rng, 12)),
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

    fn revoke(&self, f: &HashMap<String, String>) -> Answer {
        let mut s = self.lock();
        if let Some(family) = f.get("token").and_then(|t| s.refresh.get(t)).cloned() {
            if let Some(fam) = s.families.get_mut(&family) {
                fam.revoked = true;
            }
            s.stats.revocations += 1;
        }
        // RFC 7009 §2.2: 200 whether or not the token was known.
        Response::new(super::http::full(Bytes::new()))
    }

    /// RP-initiated logout: end the sessions of the hinted `sid`, tell the proxy
    /// over the back channel, and send the browser back.
    async fn logout(&self, q: &HashMap<String, String>) -> Answer {
        let hint = q.get("id_token_hint").and_then(|t| self.signer.verify(t));
        let claim =
            |name: &str| hint.as_ref().and_then(|c| c.get(name)).and_then(Value::as_str).map(str::to_owned);
        let (sid, sub) = (claim("sid"), claim("sub"));
        if let Some(sid) = &sid {
            let mut s = self.lock();
            for f in s.families.values_mut().filter(|f| &f.sid == sid) {
                f.revoked = true;
            }
        }
        if let (Some(sid), Some(url)) = (&sid, self.backchannel.get()) {
            let token = self.signer.sign(Kind::Logout, &self.logout_claims(sub.as_deref(), Some(sid)));
            match super::http::post_form(url, &[("logout_token", &token)]).await {
                Ok(status) if status.is_success() => self.lock().stats.backchannel_logouts += 1,
                Ok(status) => tracing::warn!(%status, "the proxy refused the back-channel logout"),
                Err(e) => tracing::warn!(error = %e, "back-channel logout failed"),
            }
        }
        match q.get("post_logout_redirect_uri").filter(|u| self.allowed_redirect(u)) {
            Some(to) => redirect(to),
            None => html(
                StatusCode::OK,
                "<h1>Signed out</h1><p>You are signed out of the demo identity provider.</p>",
            ),
        }
    }

    fn page(&self) -> Answer {
        let s = self.stats();
        let user = match &self.opts.login {
            Login::Form { user, .. } | Login::Auto(user) => user,
        };
        html(
            StatusCode::OK,
            &format!(
                "<h1>Demo identity provider</h1><p>Issuer <code>{}</code>; user <b>{}</b>, password <b>{}</b>.</p>\
<table><tr><td>logins</td><td>{}</td></tr><tr><td>code grants</td><td>{}</td></tr>\
<tr><td>refresh grants</td><td>{}</td></tr><tr><td>refresh tokens reused (session revoked)</td><td>{}</td></tr>\
<tr><td>revocations</td><td>{}</td></tr><tr><td>back-channel logouts sent</td><td>{}</td></tr></table>",
                escape(&self.opts.issuer),
                escape(user),
                escape(self.password()),
                s.logins,
                s.code_grants,
                s.refresh_grants,
                s.reuse_detected,
                s.revocations,
                s.backchannel_logouts
            ),
        )
    }
}

fn bad_authorize(why: &str) -> Answer {
    html(StatusCode::BAD_REQUEST, &format!("<h1>Bad authorization request</h1><p>{}</p>", escape(why)))
}

fn url_with(base: &str, params: &[(&str, &str)]) -> String {
    let mut out = base.to_owned();
    for (k, v) in params {
        out.push(if out.contains('?') { '&' } else { '?' });
        out.push_str(&form_urlencoded::Serializer::new(String::new()).append_pair(k, v).finish());
    }
    out
}

/// One form-encoded value (RFC 6749 §2.3.1 encodes Basic credentials so).
fn form_decode(s: &str) -> String {
    form_urlencoded::parse(format!("v={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn bad_request(error: &str, description: &str) -> Answer {
    json_response(StatusCode::BAD_REQUEST, &json!({"error": error, "error_description": description}))
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn random(rng: &SystemRandom, n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = rng.fill(&mut b);
    b64(&b)
}

/// Easy to type: no look-alike characters.
fn password(rng: &SystemRandom) -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut b = [0u8; 12];
    let _ = rng.fill(&mut b);
    b.iter().map(|x| ALPHABET[usize::from(*x) % ALPHABET.len()] as char).collect()
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_must_be_local_without_userinfo() {
        let local = loopback_prefixes();
        assert!(allowed_redirect(&local, "http://127.0.0.1:8080/auth/callback?x=1"));
        assert!(allowed_redirect(&local, "http://localhost/done"));
        assert!(allowed_redirect(&local, "http://127.0.0.1:8080/cb?next=a@b"), "@ after the authority");
        assert!(!allowed_redirect(&local, "http://127.0.0.1:80@evil.example/"));
        assert!(!allowed_redirect(&local, "http://127.0.0.1:80\\@evil.example/"));
        assert!(!allowed_redirect(&local, "https://evil.example/"));
    }
}
