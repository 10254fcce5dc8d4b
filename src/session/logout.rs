//! Ending sessions: the SPA's logout (`POST logout_path`, `204`), the browser's
//! (`GET logout_path`: the same, then RP-initiated logout at the provider), and
//! the provider's (OpenID Connect Back-Channel Logout 1.0).
//!
//! No session is stored server-side: ending one is an entry in the revocation
//! list (by this proxy's session id, or by the provider's `sid` or `sub` issued
//! before the logout), so the check per request stays an in-memory lookup, a
//! fleet shares it through Redis, and it survives restarts like revocations do.

use base64::Engine as _;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::cookies::RefreshCookie;
use super::endpoints::{gate, redirect, EndpointError};
use super::SessionCtx;
use crate::auth::jwt;
use crate::auth::revocation::Revocation;
use crate::body::Body;
use crate::clock::unix_now;
use crate::conn::Conn;
use crate::target::Target;

const MAX_LOGOUT_BODY: usize = 64 * 1024;

/// A `jti` revocation for an access token from our own (sealed, so trusted) cookie.
fn access_revocation(token: &str) -> Option<Revocation> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let jti = jwt::id_claim(claims.get("jti"))?;
    let exp = claims.get("exp")?.as_f64()? as i64;
    Some(Revocation::Jti { jti, exp })
}

/// Ends the session the request's cookies hold, here and at the provider:
/// the refresh token revoked (RFC 7009), its grace-window pairs ended, the access
/// token's `jti` and the session's id denied fleet-wide, the cookies cleared.
/// Returns the session's refresh cookie, for RP-initiated logout.
async fn end_local(
    req: &Request<Incoming>,
    cx: &SessionCtx<'_>,
    cookies: &mut Vec<HeaderValue>,
) -> Option<RefreshCookie> {
    let s = cx.sessions;
    let jar = s.cookies.read(req.headers());
    let rc = s.cookies.open_refresh(&jar);
    if let Some(rc) = &rc {
        // A rotated pair held for the grace window must not outlive the logout.
        cx.broker.end(&rc.rt);
        if let Err(e) = s.oauth.revoke(&rc.rt).await {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            tracing::warn!(error = %e, cause, "refresh token revocation failed; cookies cleared anyway");
        }
        if !rc.id.is_empty() {
            let until = rc.login.saturating_add(s.settings.absolute_timeout.as_secs() as i64);
            cx.fleet.revoke(&Revocation::Session { session: rc.id.clone(), exp: until }).await;
        }
    }
    // The access token dies with the session, not at its `exp`: deny its `jti`.
    if let Some(entry) = s.cookies.open_access(&jar).and_then(|at| access_revocation(&at)) {
        cx.fleet.revoke(&entry).await;
    }
    cookies.extend(s.cookies.clear_session(&jar));
    rc
}

/// `POST logout_path`: `204`.
pub async fn post(
    req: Request<Incoming>,
    conn: &Conn,
    target: &Target,
    cx: &SessionCtx<'_>,
    cookies: &mut Vec<HeaderValue>,
) -> Result<Response<Body>, EndpointError> {
    gate(&req, conn, target, cx.sessions)?;
    end_local(&req, cx, cookies).await;
    cx.metrics.logout("local");
    let mut resp = Response::new(crate::body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

/// `GET logout_path`, a browser navigation: the local logout, then `302` to the
/// provider's end-session endpoint (RP-initiated logout) with `client_id`,
/// `id_token_hint` and `post_logout_redirect_uri`; without one, to
/// `post_logout_redirect_uri` or `/`.
pub async fn navigate(
    req: Request<Incoming>,
    conn: &Conn,
    target: &Target,
    cx: &SessionCtx<'_>,
    cookies: &mut Vec<HeaderValue>,
) -> Result<Response<Body>, EndpointError> {
    let s = cx.sessions;
    // A navigation has no Origin as a rule; a cross-site one (by Sec-Fetch-Site or Origin) is refused.
    let site = req.headers().get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if matches!(site, Some("cross-site" | "same-site")) || req.headers().contains_key(header::ORIGIN) {
        // The POST rule: `Origin`, else `Referer` (a navigation carries no `Origin`).
        super::endpoints::gate_as(&http::Method::POST, &req, conn, target, s)?;
    }
    let rc = end_local(&req, cx, cookies).await;
    let after = s.settings.post_logout_redirect_uri.as_deref();
    let end_session = match &s.settings.end_session_url {
        Some(u) => Some(u.clone()),
        None => s.oauth.end_session_url().await,
    };
    let Some(end_session) = end_session else {
        cx.metrics.logout("local");
        return redirect(after.unwrap_or("/"));
    };
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("client_id", s.oauth.client_id());
    if let Some(hint) = rc.as_ref().and_then(|rc| rc.id_token.as_deref()) {
        q.append_pair("id_token_hint", hint);
    }
    if let Some(after) = after {
        q.append_pair("post_logout_redirect_uri", after);
    }
    let base = end_session.to_string();
    let sep = if base.contains('?') { '&' } else { '?' };
    cx.metrics.logout("rp_initiated");
    redirect(&format!("{base}{sep}{}", q.finish()))
}

/// `POST backchannel_logout_path` with `logout_token=JWT` from the provider: no
/// CSRF gate and no cookies (the provider calls it, not a browser). Valid: `200`
/// and every matching session established before the token's `iat` is over on
/// every instance. Invalid or replayed: `400 invalid_request`.
pub async fn backchannel(
    req: Request<Incoming>,
    cx: &SessionCtx<'_>,
) -> Result<Response<Body>, EndpointError> {
    // `reason` is the metric's label, `description` the answer's `error_description`.
    let refused = |reason: &'static str, description: &'static str| {
        cx.metrics.logout_token_rejected(reason);
        tracing::info!(reason, "back-channel logout token refused");
        EndpointError::InvalidRequest(description)
    };
    let Some(issuer) = &cx.sessions.logout_issuer else {
        return Err(refused("no_issuer", "no [[issuers]] entry has the issuer of [auth_server]"));
    };
    // The spec's only encoding (Back-Channel Logout 1.0 §2.5); anything else is a sender's mistake.
    let form = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
    });
    if !form {
        return Err(refused("content_type", "the body must be application/x-www-form-urlencoded"));
    }
    let body = Limited::new(req.into_body(), MAX_LOGOUT_BODY)
        .collect()
        .await
        .map_err(|_| refused("unreadable_body", "body unreadable or too large"))?
        .to_bytes();
    let token = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "logout_token")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| refused("missing_logout_token", "no logout_token"))?;
    let client_id = cx.sessions.oauth.client_id();
    let now = unix_now();
    let verify =
        |keys: &crate::auth::keys::KeySet| jwt::verify_logout(&token, &issuer.policy, keys, client_id, now);
    let keys = issuer
        .keys
        .current()
        .ok_or_else(|| refused("keys_unavailable", "the issuer's keys are not loaded"))?;
    let mut result = verify(&keys);
    if matches!(result, Err(jwt::Rejected::UnknownKid)) {
        let kid = jwt::header(&token).ok().and_then(|h| h.kid).unwrap_or_default();
        if issuer.keys.refetch_for(&kid).await {
            if let Some(keys) = issuer.keys.current() {
                result = verify(&keys);
            }
        }
    }
    let logout = match result {
        Ok(l) => l,
        Err(jwt::Rejected::UnknownKid) => {
            return Err(refused("unknown_key", "the token was signed by an unknown key"))
        }
        Err(jwt::Rejected::Invalid(r)) => return Err(refused(r.reason(), r.description())),
    };
    if !cx.fleet.first_use("logout-jti", &logout.jti, logout.stale_at).await {
        return Err(refused("replayed", "the logout token was used before"));
    }
    let exp = Some(logout.iat.saturating_add(cx.sessions.settings.absolute_timeout.as_secs() as i64));
    // Times are whole seconds: a session (or access token) from the logout's own
    // second cannot show it came after the logout, so it ends too.
    let before = logout.iat.saturating_add(1);
    let entry = match (&logout.sid, &logout.sub) {
        (Some(sid), _) => Revocation::Sid { sid: sid.clone(), issued_before: before, exp },
        (None, Some(sub)) => Revocation::Sub { sub: sub.clone(), issued_before: before, exp, logout: true },
        (None, None) => return Err(refused("missing_sub_and_sid", "neither sub nor sid")),
    };
    cx.fleet.revoke(&entry).await;
    cx.metrics.logout("backchannel");
    tracing::info!(kind = entry.key().0, "back-channel logout: sessions ended");
    let mut resp = Response::new(crate::body::empty());
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
