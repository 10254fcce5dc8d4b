//! The demo identity provider: just enough OpenID Connect for `portcullis demo`
//! to show the whole job on one machine. Discovery and JWKS (a fresh RSA key per
//! start), authorization code + PKCE (S256) with a login form for one demo user,
//! 60-second access tokens, rotating refresh tokens with reuse detection (a
//! reused refresh token revokes its family, RFC 9700 §4.14.2), RFC 7009
//! revocation, and RP-initiated logout that sends an OpenID Connect back-channel
//! logout token to the proxy. Loopback only; started by `demo` alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

use super::http::{form, html, json_response, query, read_body, redirect, Answer};
use crate::clock::unix_now;

pub const CLIENT_ID: &str = "portcullis-demo";
pub const AUDIENCE: &str = "demo-api";
pub const USER: &str = "demo";
const SCOPE: &str = "openid offline_access orders:read";
const CODE_TTL: i64 = 60;

/// What the IdP page (and `/stats`) shows: the proof that a storm made one refresh.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub logins: u64,
    pub code_grants: u64,
    pub refresh_grants: u64,
    pub reuse_detected: u64,
    pub revocations: u64,
    pub backchannel_logouts: u64,
}

struct Code {
    redirect_uri: String,
    challenge: String,
    sid: String,
    nonce: Option<String>,
    exp: i64,
}

struct Family {
    sid: String,
    current: String,
    revoked: bool,
}

#[derive(Default)]
struct State {
    codes: HashMap<String, Code>,
    families: HashMap<String, Family>,
    /// Every refresh token ever issued → its family.
    refresh: HashMap<String, String>,
    stats: Stats,
}

pub struct Idp {
    pub issuer: String,
    pub password: String,
    access_ttl: i64,
    key: KeyPair,
    kid: String,
    rng: SystemRandom,
    state: Mutex<State>,
    /// The proxy's back-channel logout URL, known once the proxy is bound.
    pub backchannel: OnceLock<String>,
}

impl Idp {
    pub fn new(issuer: String, access_ttl: i64) -> Result<Arc<Self>, aws_lc_rs::error::Unspecified> {
        let rng = SystemRandom::new();
        let key = KeyPair::generate(KeySize::Rsa2048)?;
        let kid = random(&rng, 8);
        let password = password(&rng);
        Ok(Arc::new(Self {
            issuer,
            password,
            access_ttl,
            key,
            kid,
            rng,
            state: Mutex::new(State::default()),
            backchannel: OnceLock::new(),
        }))
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Answer {
        let path = req.uri().path().to_owned();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/.well-known/openid-configuration") => {
                json_response(StatusCode::OK, &self.discovery())
            }
            (Method::GET, "/jwks") => json_response(StatusCode::OK, &self.jwks()),
            (Method::GET, "/authorize") => self.authorize_form(&query(&req), None),
            (Method::POST, "/authorize") => match read_body(req).await {
                Some(body) => self.authorize_submit(&form(&body)),
                None => bad_request("invalid_request", "unreadable body"),
            },
            (Method::POST, "/token") => match read_body(req).await {
                Some(body) => self.token(&form(&body)),
                None => bad_request("invalid_request", "unreadable body"),
            },
            (Method::POST, "/revoke") => match read_body(req).await {
                Some(body) => self.revoke(&form(&body)),
                None => bad_request("invalid_request", "unreadable body"),
            },
            (Method::GET, "/logout") => self.logout(&query(&req)).await,
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
        let i = &self.issuer;
        json!({
            "issuer": i,
            "authorization_endpoint": format!("{i}/authorize"),
            "token_endpoint": format!("{i}/token"),
            "jwks_uri": format!("{i}/jwks"),
            "revocation_endpoint": format!("{i}/revoke"),
            "end_session_endpoint": format!("{i}/logout"),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "subject_types_supported": ["public"],
            "backchannel_logout_supported": true,
            "backchannel_logout_session_supported": true,
            "authorization_response_iss_parameter_supported": true,
        })
    }

    fn jwks(&self) -> Value {
        let public = self.key.public_key();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let n = b64(public.modulus().big_endian_without_leading_zero());
        let e = b64(public.exponent().big_endian_without_leading_zero());
        json!({"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid, "n": n, "e": e}]})
    }

    fn sign(&self, typ: &str, claims: &Value) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let header = json!({"alg": "RS256", "typ": typ, "kid": self.kid});
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        if self.key.sign(&signature::RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut sig).is_err() {
            return String::new();
        }
        format!("{input}.{}", b64(&sig))
    }

    /// The payload of one of this IdP's own tokens, signature checked.
    fn verify_own(&self, token: &str) -> Option<Value> {
        let (input, sig) = token.rsplit_once('.')?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).ok()?;
        let public =
            signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, self.key.public_key());
        public.verify(input.as_bytes(), &sig).ok()?;
        crate::auth::jwt::unverified_payload(input)
    }

    fn authorize_form(&self, q: &HashMap<String, String>, error: Option<&str>) -> Answer {
        if let Err(why) = check_authorize(q) {
            return html(
                StatusCode::BAD_REQUEST,
                &format!("<h1>Bad authorization request</h1><p>{}</p>", escape(why)),
            );
        }
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
<p>Sign in as <b>{USER}</b> with the password <b>{pw}</b> (printed by <code>portcullis demo</code>).</p>
{error}<form method="post" action="/authorize">{hidden}
<label>User <input name="username" value="{USER}" autocomplete="username"></label>
<label>Password <input name="password" type="password" autocomplete="current-password" autofocus></label>
<button type="submit">Sign in</button></form>"#,
            pw = escape(&self.password)
        );
        html(StatusCode::OK, &body)
    }

    fn authorize_submit(&self, f: &HashMap<String, String>) -> Answer {
        if let Err(why) = check_authorize(f) {
            return html(
                StatusCode::BAD_REQUEST,
                &format!("<h1>Bad authorization request</h1><p>{}</p>", escape(why)),
            );
        }
        let user_ok = f.get("username").map(String::as_str) == Some(USER);
        let pw_ok = f.get("password").is_some_and(|p| constant_eq(p.as_bytes(), self.password.as_bytes()));
        if !(user_ok && pw_ok) {
            return self.authorize_form(f, Some("Wrong user or password."));
        }
        let code = random(&self.rng, 24);
        let sid = random(&self.rng, 12);
        let redirect_uri = f.get("redirect_uri").cloned().unwrap_or_default();
        {
            let mut s = self.lock();
            let now = unix_now();
            s.codes.retain(|_, c| c.exp > now);
            s.codes.insert(
                code.clone(),
                Code {
                    redirect_uri: redirect_uri.clone(),
                    challenge: f.get("code_challenge").cloned().unwrap_or_default(),
                    sid,
                    nonce: f.get("nonce").cloned(),
                    exp: now + CODE_TTL,
                },
            );
            s.stats.logins += 1;
        }
        let mut to = url_with(&redirect_uri, &[("code", &code), ("iss", &self.issuer)]);
        if let Some(state) = f.get("state") {
            to = url_with(&to, &[("state", state)]);
        }
        redirect(&to)
    }

    fn token(&self, f: &HashMap<String, String>) -> Answer {
        if f.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
            return json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_client"}));
        }
        match f.get("grant_type").map(String::as_str) {
            Some("authorization_code") => self.code_grant(f),
            Some("refresh_token") => self.refresh_grant(f),
            _ => bad_request("unsupported_grant_type", "authorization_code or refresh_token"),
        }
    }

    fn code_grant(&self, f: &HashMap<String, String>) -> Answer {
        let mut s = self.lock();
        let Some(code) = f.get("code").and_then(|c| s.codes.remove(c)) else {
            return bad_request("invalid_grant", "unknown or used code");
        };
        let verifier = f.get("code_verifier").map(String::as_str).unwrap_or("");
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
        if code.exp < unix_now()
            || f.get("redirect_uri") != Some(&code.redirect_uri)
            || !constant_eq(challenge.as_bytes(), code.challenge.as_bytes())
        {
            return bad_request("invalid_grant", "code expired, redirect_uri or PKCE verifier mismatch");
        }
        let family = random(&self.rng, 12);
        let rt = random(&self.rng, 32);
        s.families
            .insert(family.clone(), Family { sid: code.sid.clone(), current: rt.clone(), revoked: false });
        s.refresh.insert(rt.clone(), family);
        s.stats.code_grants += 1;
        drop(s);
        let now = unix_now();
        let mut id = json!({
            "iss": self.issuer, "sub": USER, "aud": CLIENT_ID, "iat": now, "exp": now + 300,
            "sid": code.sid, "name": "Demo User", "email": "demo@example.com",
        });
        if let Some(n) = code.nonce {
            id["nonce"] = json!(n);
        }
        json_response(
            StatusCode::OK,
            &json!({
                "access_token": self.access_token(&code.sid),
                "token_type": "Bearer",
                "expires_in": self.access_ttl,
                "refresh_token": rt,
                "id_token": self.sign("JWT", &id),
                "scope": SCOPE,
            }),
        )
    }

    fn refresh_grant(&self, f: &HashMap<String, String>) -> Answer {
        let presented = f.get("refresh_token").cloned().unwrap_or_default();
        let mut s = self.lock();
        let Some(family_id) = s.refresh.get(&presented).cloned() else {
            return bad_request("invalid_grant", "unknown refresh token");
        };
        let new = random(&self.rng, 32);
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
        family.current = new.clone();
        let sid = family.sid.clone();
        s.refresh.insert(new.clone(), family_id);
        s.stats.refresh_grants += 1;
        drop(s);
        json_response(
            StatusCode::OK,
            &json!({
                "access_token": self.access_token(&sid),
                "token_type": "Bearer",
                "expires_in": self.access_ttl,
                "refresh_token": new,
                "scope": SCOPE,
            }),
        )
    }

    fn access_token(&self, sid: &str) -> String {
        let now = unix_now();
        self.sign(
            "at+jwt",
            &json!({
                "iss": self.issuer, "sub": USER, "aud": AUDIENCE, "client_id": CLIENT_ID,
                "iat": now, "exp": now + self.access_ttl, "jti": random(&self.rng, 12),
                "scope": SCOPE, "sid": sid, "name": "Demo User", "email": "demo@example.com",
            }),
        )
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
        let hint = q.get("id_token_hint").and_then(|t| self.verify_own(t));
        let sid = hint.as_ref().and_then(|c| c.get("sid")).and_then(Value::as_str).map(str::to_owned);
        if let Some(sid) = &sid {
            let mut s = self.lock();
            for f in s.families.values_mut().filter(|f| &f.sid == sid) {
                f.revoked = true;
            }
        }
        if let (Some(sid), Some(url)) = (&sid, self.backchannel.get()) {
            let now = unix_now();
            let token = self.sign(
                "logout+jwt",
                &json!({
                    "iss": self.issuer, "aud": CLIENT_ID, "iat": now, "exp": now + 120,
                    "jti": random(&self.rng, 16), "sid": sid, "sub": USER,
                    "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
                }),
            );
            match super::http::post_form(url, &[("logout_token", &token)]).await {
                Ok(status) if status.is_success() => self.lock().stats.backchannel_logouts += 1,
                Ok(status) => tracing::warn!(%status, "the proxy refused the back-channel logout"),
                Err(e) => tracing::warn!(error = %e, "back-channel logout failed"),
            }
        }
        match q.get("post_logout_redirect_uri").filter(|u| is_loopback_url(u)) {
            Some(to) => redirect(to),
            None => html(
                StatusCode::OK,
                "<h1>Signed out</h1><p>You are signed out of the demo identity provider.</p>",
            ),
        }
    }

    fn page(&self) -> Answer {
        let s = self.stats();
        html(
            StatusCode::OK,
            &format!(
                "<h1>Demo identity provider</h1><p>Issuer <code>{}</code>; user <b>{USER}</b>, password <b>{}</b>.</p>\
<table><tr><td>logins</td><td>{}</td></tr><tr><td>code grants</td><td>{}</td></tr>\
<tr><td>refresh grants</td><td>{}</td></tr><tr><td>refresh tokens reused (session revoked)</td><td>{}</td></tr>\
<tr><td>revocations</td><td>{}</td></tr><tr><td>back-channel logouts sent</td><td>{}</td></tr></table>",
                escape(&self.issuer),
                escape(&self.password),
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

fn check_authorize(q: &HashMap<String, String>) -> Result<(), &'static str> {
    if q.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return Err("unknown client_id");
    }
    if q.get("response_type").is_some_and(|t| t != "code") {
        return Err("only response_type=code");
    }
    if !q.get("redirect_uri").is_some_and(|u| is_loopback_url(u)) {
        return Err("redirect_uri must be an http URL on this machine");
    }
    if q.get("code_challenge_method").map(String::as_str) != Some("S256") || !q.contains_key("code_challenge")
    {
        return Err("PKCE with S256 is required");
    }
    Ok(())
}

/// The demo only ever sends the browser back to this machine.
fn is_loopback_url(u: &str) -> bool {
    ["http://127.0.0.1:", "http://localhost:", "http://127.0.0.1/", "http://localhost/"]
        .iter()
        .any(|p| u.starts_with(p))
}

fn url_with(base: &str, params: &[(&str, &str)]) -> String {
    let mut out = base.to_owned();
    for (k, v) in params {
        out.push(if out.contains('?') { '&' } else { '?' });
        out.push_str(&form_urlencoded::Serializer::new(String::new()).append_pair(k, v).finish());
    }
    out
}

fn bad_request(error: &str, description: &str) -> Answer {
    json_response(StatusCode::BAD_REQUEST, &json!({"error": error, "error_description": description}))
}

fn random(rng: &SystemRandom, n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = rng.fill(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
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
