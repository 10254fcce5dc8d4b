//! Browser sessions: the access token held in the proxy's sealed cookies, made
//! fresh when it has expired, is about to, or is missing (`refresh`), and the
//! session endpoints (login, callback, refresh, logout). The stage's output is a
//! verified credential for `auth::authenticate`, plus the `Set-Cookie` headers
//! the answer must carry.

pub mod cookies;
pub mod csrf;
pub mod endpoints;
pub mod logout;
pub mod refresh;
pub mod seal;

use std::sync::Arc;

use http::header::{HeaderMap, HeaderValue};
use http::Method;

use crate::auth::{AuthError, Credential, Issuer, RoutePolicy, Verifier};
use crate::clock::unix_now;
use crate::config::{AuthServerSettings, SessionSettings};
use crate::fleet::Fleet;
use crate::oauth::OAuthClient;
use cookies::{Cookies, RefreshCookie};
use refresh::RefreshBroker;

/// Longest `sub` or `sid` recorded in the refresh cookie (for back-channel logout).
const MAX_ID: usize = 255;

/// One configuration's session machinery.
pub struct Sessions {
    pub settings: SessionSettings,
    pub cookies: Cookies,
    pub oauth: OAuthClient,
    pub auth_server: AuthServerSettings,
    /// The `[[issuers]]` entry whose `issuer` is `[auth_server] issuer`: it signs
    /// back-channel logout tokens.
    pub logout_issuer: Option<Arc<Issuer>>,
}

impl Sessions {
    pub fn new(
        settings: SessionSettings,
        auth_server: AuthServerSettings,
        logout_issuer: Option<Arc<Issuer>>,
    ) -> Result<Self, rustls::Error> {
        let oauth = OAuthClient::new(&auth_server)?;
        Ok(Self { cookies: Cookies::new(&settings), settings, oauth, auth_server, logout_issuer })
    }

    /// A new session's refresh cookie: a fresh id, and who logged in (`sub` and
    /// `sid` from the ID token, which came straight from the token endpoint, else
    /// `sub` from the access token).
    pub fn new_session(
        &self,
        rt: String,
        access_token: &str,
        expires_in: Option<u64>,
        id_token: Option<String>,
        now: i64,
    ) -> RefreshCookie {
        let claims = crate::auth::jwt::unverified_payload::<serde_json::Map<String, serde_json::Value>>;
        let from_id = id_token.as_deref().and_then(claims);
        let from_access = claims(access_token);
        let sub = from_id
            .as_ref()
            .and_then(|c| crate::auth::jwt::id_claim(c.get("sub")))
            .or_else(|| from_access.as_ref().and_then(|c| crate::auth::jwt::id_claim(c.get("sub"))));
        let sid = from_id.as_ref().and_then(|c| c.get("sid")).and_then(|v| v.as_str()).map(str::to_owned);
        // Identifiers are short in practice; an absurd one is not worth a bigger cookie.
        let sub = sub.filter(|s| s.len() <= MAX_ID);
        let sid = sid.filter(|s| s.len() <= MAX_ID);
        RefreshCookie {
            rt,
            login: now,
            id: self.cookies.sealer.random_token().unwrap_or_default(),
            sub,
            sid,
            id_token,
            access_exp: None,
        }
        .with_access(access_token, expires_in, now)
    }
}

/// Whether a revocation (a logout by id, `sid` or `sub`) has ended this session.
pub fn ended(revocations: &crate::auth::revocation::Revocations, rc: &RefreshCookie) -> bool {
    revocations.denies(&crate::auth::revocation::Subject {
        jti: None,
        sub: rc.sub.as_deref(),
        sid: rc.sid.as_deref(),
        since: Some(rc.login),
        session: (!rc.id.is_empty()).then_some(rc.id.as_str()),
    })
}

/// What the session stage uses: this configuration's sessions and the runtime
/// parts that outlive it.
pub struct SessionCtx<'a> {
    pub sessions: &'a Arc<Sessions>,
    pub verifier: &'a Verifier,
    pub broker: &'a Arc<RefreshBroker>,
    pub fleet: &'a Fleet,
    pub metrics: &'a crate::metrics::Metrics,
}

impl SessionCtx<'_> {
    /// The access token from the session cookies, checked against the route's issuers, and
    /// refreshed when it has expired, expires within `refresh_ahead`, or is
    /// missing while a refresh cookie is present. `Credential::None` when the
    /// request carries no session at all. Cookie-authenticated requests pass the
    /// CSRF gate first.
    pub async fn credential(
        &self,
        method: &Method,
        headers: &HeaderMap,
        own: csrf::Own<'_>,
        policy: &RoutePolicy,
        set_cookies: &mut Vec<HeaderValue>,
    ) -> Result<Credential<'static>, AuthError> {
        let s = &**self.sessions;
        let jar = s.cookies.read(headers);
        let access = s.cookies.open_access(&jar);
        let refresh = s.cookies.open_refresh(&jar);
        if access.is_none() && refresh.is_none() {
            return Ok(Credential::None);
        }
        csrf::check(method, headers, own, &s.settings.allowed_origins).map_err(|_| AuthError::Csrf)?;
        // Logged out (here, on another instance, or at the provider): over, without a call.
        if let Some(rc) = &refresh {
            if ended(&self.verifier.revocations, rc) {
                set_cookies.extend(s.cookies.clear_session(&jar));
                return Err(AuthError::SessionOver);
            }
        }
        let absolute = s.settings.absolute_timeout.as_secs() as i64;
        let now = unix_now();
        // Past absolute_timeout the session is over even while its access token
        // lives: a client may ignore the cookies' Max-Age.
        if let Some(rc) = &refresh {
            if now > rc.login.saturating_add(absolute) {
                set_cookies.extend(s.cookies.clear_session(&jar));
                return Err(AuthError::SessionOver);
            }
        }
        let session = match &refresh {
            Some(rc) => crate::auth::SessionBinding {
                id: rc.id.clone(),
                sub: rc.sub.clone(),
                sid: rc.sid.clone(),
                login: rc.login,
                ends_at: rc.login.saturating_add(absolute),
            },
            None => crate::auth::SessionBinding::default(),
        };
        let ahead = s.settings.refresh_ahead.as_secs() as i64;
        let mut current = None;
        let mut needs_refresh = access.is_none();
        if let Some(at) = access {
            match policy.check(&at, self.verifier).await {
                Ok(c) => {
                    // An introspection answer without `exp` leaves the token response's `expires_in`.
                    let exp = match &refresh {
                        Some(rc) if !c.all.contains_key("exp") => rc.access_exp.unwrap_or(c.exp),
                        _ => c.exp,
                    };
                    needs_refresh = refresh.is_some() && exp - now <= ahead;
                    current = Some((c, at));
                }
                // Our own cookie cannot be forged, so an invalid (or inactive) token in it is stale: refresh.
                Err(AuthError::Invalid(_)) if refresh.is_some() => needs_refresh = true,
                Err(e) => return Err(e),
            }
        }
        if needs_refresh {
            let Some(rc) = refresh else { return Err(AuthError::Missing) };
            // Boxed: only a refresh pays for the token call's state, not every request's future.
            match Box::pin(refresh::renew(&rc, &jar, self.sessions, self, set_cookies)).await {
                Ok(fresh) => {
                    let claims = policy.check(&fresh.access_token, self.verifier).await?;
                    current = Some((claims, fresh.access_token.clone()));
                }
                // An outage must not end the session: a still-valid token carries on.
                Err(AuthError::AuthServerDown) if current.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        match current {
            Some((claims, token)) => Ok(Credential::Session { token, claims, session }),
            None => Err(AuthError::Missing),
        }
    }
}
