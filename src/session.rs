//! Browser sessions: the access token held in the proxy's sealed cookies, made
//! fresh when it has expired, is about to, or is missing (`refresh`), and the
//! session endpoints (login, callback, refresh, logout). The stage's output is a
//! verified credential for `auth::authenticate`, plus the `Set-Cookie` headers
//! the answer must carry.

pub mod cookies;
pub mod csrf;
pub mod endpoints;
pub mod refresh;
pub mod seal;

use std::sync::Arc;

use http::header::{HeaderMap, HeaderValue};
use http::Method;

use crate::auth::{AuthError, Credential, RoutePolicy, Verifier};
use crate::clock::unix_now;
use crate::config::{AuthServerSettings, SessionSettings};
use crate::fleet::Fleet;
use crate::oauth::OAuthClient;
use cookies::Cookies;
use refresh::RefreshBroker;

/// One configuration's session machinery.
pub struct Sessions {
    pub settings: SessionSettings,
    pub cookies: Cookies,
    pub oauth: OAuthClient,
    pub auth_server: AuthServerSettings,
}

impl Sessions {
    pub fn new(settings: SessionSettings, auth_server: AuthServerSettings) -> Result<Self, rustls::Error> {
        let oauth = OAuthClient::new(&auth_server)?;
        Ok(Self { cookies: Cookies::new(&settings), settings, oauth, auth_server })
    }
}

/// What the session stage uses: this configuration's sessions and the runtime
/// parts that outlive it.
pub struct SessionCtx<'a> {
    pub sessions: &'a Arc<Sessions>,
    pub verifier: &'a Verifier,
    pub broker: &'a Arc<RefreshBroker>,
    pub fleet: &'a Fleet,
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
        let now = unix_now();
        let ahead = s.settings.refresh_ahead.as_secs() as i64;
        let mut current = None;
        let mut needs_refresh = access.is_none();
        if let Some(at) = access {
            match policy.check(&at, self.verifier).await {
                Ok(c) => {
                    needs_refresh = refresh.is_some() && c.exp - now <= ahead;
                    current = Some((c, at));
                }
                // Our own cookie cannot be forged, so an invalid (or inactive) token in it is stale: refresh.
                Err(AuthError::Invalid(_)) if refresh.is_some() => needs_refresh = true,
                Err(e) => return Err(e),
            }
        }
        if needs_refresh {
            let Some(rc) = refresh else { return Err(AuthError::Missing) };
            match refresh::renew(&rc, &jar, self.sessions, self.broker, set_cookies).await {
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
            Some((claims, token)) => Ok(Credential::Session { token, claims }),
            None => Err(AuthError::Missing),
        }
    }
}
