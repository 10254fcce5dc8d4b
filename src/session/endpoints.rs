//! The session endpoints: login (passthrough or code + PKCE), callback, refresh,
//! logout. Each returns a response or an error; cookies to set travel in
//! `cookies`, which `proxy.rs` adds to whatever answer goes out.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::cookies::LoginState;
use super::{csrf, refresh, SessionCtx, Sessions};
use crate::auth::AuthError;
use crate::body::{full, json_response, Body};
use crate::clock::unix_now;
use crate::conn::Conn;
use crate::target::Target;

const MAX_LOGIN_BODY: usize = 64 * 1024;
const LOGIN_STATE_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A refused back-channel logout token (`400 invalid_request`).
    #[error("invalid logout request: {0}")]
    InvalidRequest(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Login,
    Callback,
    Refresh,
    Logout,
    BackchannelLogout,
}

pub fn which(s: &Sessions, path: &str) -> Option<Endpoint> {
    let c = &s.settings;
    if path == c.login_path {
        Some(Endpoint::Login)
    } else if path == c.callback_path {
        Some(Endpoint::Callback)
    } else if path == c.refresh_path {
        Some(Endpoint::Refresh)
    } else if path == c.logout_path {
        Some(Endpoint::Logout)
    } else if c.backchannel_logout_path.as_deref() == Some(path) {
        Some(Endpoint::BackchannelLogout)
    } else {
        None
    }
}

pub async fn serve(
    ep: Endpoint,
    req: Request<Incoming>,
    conn: &Conn,
    target: &Target,
    cx: &SessionCtx<'_>,
    cookies: &mut Vec<HeaderValue>,
) -> Result<Response<Body>, EndpointError> {
    let post = req.method() == Method::POST;
    let get = req.method() == Method::GET;
    let sessions = cx.sessions;
    match ep {
        Endpoint::Refresh if post => refresh(req, conn, target, cx, cookies).await,
        Endpoint::Logout if post => super::logout::post(req, conn, target, cx, cookies).await,
        Endpoint::Logout if get => super::logout::navigate(req, conn, target, cx, cookies).await,
        Endpoint::BackchannelLogout if post => super::logout::backchannel(req, cx).await,
        Endpoint::Login if post && sessions.auth_server.login_url.is_some() => {
            login_passthrough(req, conn, target, sessions, cookies).await
        }
        Endpoint::Login if get && sessions.oauth.authorization_url().is_some() => {
            login_redirect(req, conn, target, sessions, cookies)
        }
        Endpoint::Callback if get && sessions.oauth.authorization_url().is_some() => {
            callback(req, sessions, cookies).await
        }
        // SPEC §4 allows only its own error codes: a wrong method is a bad request.
        _ => Err(EndpointError::BadRequest("this session endpoint does not accept that method")),
    }
}

pub(super) fn gate(
    req: &Request<Incoming>,
    conn: &Conn,
    target: &Target,
    s: &Sessions,
) -> Result<(), AuthError> {
    gate_as(req.method(), req, conn, target, s)
}

/// The CSRF gate as for a request with `method` (a GET logout is held to the POST rule).
pub(super) fn gate_as(
    method: &http::Method,
    req: &Request<Incoming>,
    conn: &Conn,
    target: &Target,
    s: &Sessions,
) -> Result<(), AuthError> {
    let own = csrf::Own { tls: conn.tls, authority: target.authority_str() };
    csrf::check(method, req.headers(), own, &s.settings.allowed_origins).map_err(|_| AuthError::Csrf)
}

async fn refresh(
    req: Request<Incoming>,
    conn: &Conn,
    target: &Target,
    cx: &SessionCtx<'_>,
    cookies: &mut Vec<HeaderValue>,
) -> Result<Response<Body>, EndpointError> {
    let s = cx.sessions;
    gate(&req, conn, target, s)?;
    let jar = s.cookies.read(req.headers());
    let rc = s.cookies.open_refresh(&jar).ok_or(AuthError::Missing)?;
    let fresh = refresh::renew(&rc, &jar, s, cx, cookies).await?;
    let expires_in = fresh.expires_in.unwrap_or(0);
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "expires_in": expires_in })))
}

async fn login_passthrough(
    req: Request<Incoming>,
    conn: &Conn,
    target: &Target,
    s: &Arc<Sessions>,
    cookies: &mut Vec<HeaderValue>,
) -> Result<Response<Body>, EndpointError> {
    gate(&req, conn, target, s)?;
    let Some(url) = s.auth_server.login_url.clone() else {
        return Err(EndpointError::BadRequest("login passthrough is not configured"));
    };
    let jar = s.cookies.read(req.headers());
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let body = Limited::new(req.into_body(), MAX_LOGIN_BODY)
        .collect()
        .await
        .map_err(|_| EndpointError::BadRequest("login body unreadable or over 64 KiB"))?
        .to_bytes();
    let (status, headers, body) = s.oauth.passthrough(url, content_type, body).await.map_err(|e| {
        let cause = std::error::Error::source(&e).map(ToString::to_string);
        tracing::warn!(error = %e, cause, "login passthrough failed");
        AuthError::AuthServerDown
    })?;
    let parsed: Option<serde_json::Map<String, serde_json::Value>> =
        if status.is_success() { serde_json::from_slice(&body).ok() } else { None };
    let Some(mut obj) = parsed.filter(|o| o.get("refresh_token").and_then(|v| v.as_str()).is_some()) else {
        // A failed (or token-less) login passes through as it is.
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        if let Some(ct) = headers.get(header::CONTENT_TYPE) {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
        }
        return Ok(resp);
    };
    let rt = obj.remove("refresh_token").and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let at = obj.remove("access_token").and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let id_token = obj.get("id_token").and_then(|v| v.as_str()).map(str::to_owned);
    let now = unix_now();
    let expires_in = obj.get("expires_in").and_then(serde_json::Value::as_u64);
    let session = s.new_session(rt, &at, expires_in, id_token, now);
    cookies.extend(s.cookies.set_session(&at, &session, now, &jar));
    Ok(json_response(status, &serde_json::Value::Object(obj)))
}

/// `return_to` if it is a same-origin path, else `/`.
pub fn safe_return_to(v: Option<&str>) -> String {
    match v {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.contains('\\')
                && !p.bytes().any(|b| b.is_ascii_control()) =>
        {
            p.to_owned()
        }
        _ => "/".to_owned(),
    }
}

fn redirect_uri(target: &Target, conn: &Conn, s: &Sessions) -> String {
    if let Some(r) = &s.auth_server.redirect_uri {
        return r.clone();
    }
    let host = target.authority_str().unwrap_or("localhost");
    format!("{}://{}{}", if conn.tls { "https" } else { "http" }, host, s.settings.callback_path)
}

pub(super) fn redirect(location: &str) -> Result<Response<Body>, EndpointError> {
    let loc = HeaderValue::try_from(location).map_err(|_| EndpointError::BadRequest("unusable redirect"))?;
    let mut resp = Response::new(crate::body::empty());
    *resp.status_mut() = StatusCode::FOUND;
    resp.headers_mut().insert(header::LOCATION, loc);
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

fn login_redirect(
    req: Request<Incoming>,
    conn: &Conn,
    target: &Target,
    s: &Arc<Sessions>,
    cookies: &mut Vec<HeaderValue>,
) -> Result<Response<Body>, EndpointError> {
    let Some(authz) = s.oauth.authorization_url() else {
        return Err(EndpointError::BadRequest("code login is not configured"));
    };
    let fail = || EndpointError::Auth(AuthError::AuthServerDown);
    let state = s.cookies.sealer.random_token().ok_or_else(fail)?;
    let verifier = s.cookies.sealer.random_token().ok_or_else(fail)?;
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()));
    let redirect_uri = redirect_uri(target, conn, s);
    let return_to = safe_return_to(query_param(&req, "return_to").as_deref());
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("response_type", "code")
        .append_pair("client_id", &s.auth_server.client_id)
        .append_pair("redirect_uri", &redirect_uri)
        .append_pair("state", &state)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    if let Some(scope) = &s.auth_server.scope {
        q.append_pair("scope", scope);
    }
    if let Some(r) = &s.auth_server.resource {
        q.append_pair("resource", r);
    }
    for (k, v) in &s.auth_server.authorize_params {
        q.append_pair(k, v);
    }
    let base = authz.to_string();
    let sep = if base.contains('?') { '&' } else { '?' };
    let location = format!("{base}{sep}{}", q.finish());
    let jar = s.cookies.read(req.headers());
    let login = LoginState {
        state,
        verifier,
        return_to,
        exp: unix_now() + LOGIN_STATE_TTL.as_secs() as i64,
        redirect_uri,
    };
    cookies.extend(s.cookies.set_login_state(&login, LOGIN_STATE_TTL, &jar));
    redirect(&location)
}

async fn callback(
    req: Request<Incoming>,
    s: &Arc<Sessions>,
    cookies: &mut Vec<HeaderValue>,
) -> Result<Response<Body>, EndpointError> {
    let jar = s.cookies.read(req.headers());
    let login = s
        .cookies
        .open_login_state(&jar)
        .ok_or(EndpointError::BadRequest("no login in progress (state cookie missing)"))?;
    let state = query_param(&req, "state");
    let state_ok = state.as_deref() == Some(login.state.as_str());
    if !state_ok || login.exp < unix_now() {
        return Err(EndpointError::BadRequest("state does not match the login in progress"));
    }
    if let (Some(expected), Some(got)) = (&s.auth_server.issuer, query_param(&req, "iss")) {
        if *expected != got {
            return Err(EndpointError::BadRequest("the authorization response came from another issuer"));
        }
    }
    if query_param(&req, "error").is_some() {
        cookies.extend(s.cookies.clear(&s.cookies.login, &jar));
        return Err(EndpointError::BadRequest("the authorization server refused the login"));
    }
    let code = query_param(&req, "code").ok_or(EndpointError::BadRequest("code missing"))?;
    let tokens = match s.oauth.exchange_code(&code, &login.redirect_uri, &login.verifier).await {
        Ok(t) => t,
        Err(crate::oauth::GrantError::InvalidGrant) => {
            return Err(EndpointError::BadRequest("the authorization code was refused"))
        }
        Err(e) => {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            tracing::warn!(error = %e, cause, "code exchange failed");
            return Err(AuthError::AuthServerDown.into());
        }
    };
    let Some(rt) = tokens.refresh_token else {
        return Err(EndpointError::BadRequest(
            "the authorization server issued no refresh token (request offline_access?)",
        ));
    };
    let now = unix_now();
    cookies.extend(s.cookies.clear(&s.cookies.login, &jar));
    let session = s.new_session(rt, &tokens.access_token, tokens.expires_in, tokens.id_token, now);
    cookies.extend(s.cookies.set_session(&tokens.access_token, &session, now, &jar));
    redirect(&login.return_to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_is_same_origin_only() {
        let cases = [
            (Some("/orders?x=1"), "/orders?x=1"),
            (Some("/"), "/"),
            (Some("//evil.example/x"), "/"),
            (Some("https://evil.example"), "/"),
            (Some("/\\evil.example"), "/"),
            (Some("orders"), "/"),
            (Some("/a\nb"), "/"),
            (None, "/"),
        ];
        for (input, want) in cases {
            assert_eq!(safe_return_to(input), want, "{input:?}");
        }
    }
}
