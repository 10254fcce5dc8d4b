//! Validates the parsed file into runtime settings, collecting every problem
//! (with its key path) instead of stopping at the first.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::header::HeaderName;
use http::Uri;
use jsonwebtoken::Algorithm;

use super::file;
use super::locate::KeyPath;
use super::secret::{Env, Secret};
use super::settings::*;
use super::units::{parse_duration, parse_size};
use super::{resolve, Problems};
use crate::keys::{self, KeyFamily, KeySet};

/// An error and its causes as one message line: `what (because) (because)`.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(" ({c})"));
        cause = c.source();
    }
    out
}

/// Small helper so each check reads as one line.
struct Ctx<'p, 'a> {
    p: &'p mut Problems<'a>,
    base: &'p Path,
    env: &'p dyn Env,
}

impl Ctx<'_, '_> {
    fn duration(&mut self, path: &KeyPath, v: &Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => parse_duration(s).unwrap_or_else(|m| {
                self.p.add(path, m);
                default
            }),
        }
    }

    fn url(&mut self, path: &KeyPath, v: &str) -> Option<Uri> {
        match v.parse::<Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => Some(u),
            Ok(_) => {
                self.p.add(path, format!("\"{v}\" must be an absolute http:// or https:// URL"));
                None
            }
            Err(e) => {
                self.p.add(path, format!("\"{v}\" is not a URL ({e})"));
                None
            }
        }
    }

    fn opt_url(&mut self, path: &KeyPath, v: &Option<String>) -> Option<Uri> {
        v.as_ref().and_then(|s| self.url(path, s))
    }

    fn env(&mut self, path: &KeyPath, var: &str) -> Option<String> {
        match self.env.var(var) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.p.add(path, format!("environment variable {var} is not set"));
                None
            }
        }
    }

    fn file(&self, p: &str) -> PathBuf {
        resolve(self.base, p)
    }
}

pub(super) fn build(
    f: file::File,
    problems: &mut Problems<'_>,
    base: &Path,
    env: &dyn Env,
) -> Option<Config> {
    let mut cx = Ctx { p: problems, base, env };
    let root = KeyPath::root();

    let listen =
        build_listen(&mut cx, f.listen.unwrap_or_default(), f.tls.is_some(), f.forward_auth.as_ref());
    let limits = build_limits(&mut cx, f.limits.unwrap_or_default());
    let tls = f.tls.and_then(|t| build_tls(&mut cx, t));
    let auth_server = f.auth_server.and_then(|a| build_auth_server(&mut cx, a));
    // An introspection call is an authorization-server call: `[auth_server] timeout` applies.
    let as_timeout = auth_server.as_ref().map_or(Duration::from_secs(5), |a| a.timeout);
    let issuers: Vec<_> = f
        .issuers
        .iter()
        .enumerate()
        .filter_map(|(i, is)| build_issuer(&mut cx, &root.key("issuers").index(i), is, as_timeout))
        .collect();
    let mut seen = HashSet::new();
    for (i, is) in f.issuers.iter().enumerate() {
        if !seen.insert(is.name.as_str()) {
            let msg = format!("issuer name \"{}\" is used twice; names must be unique", is.name);
            cx.p.add(&root.key("issuers").index(i).key("name"), msg);
        }
    }
    let session = match f.session {
        Some(s) => {
            if auth_server.is_none() {
                cx.p.add(
                    &root.key("session"),
                    "[session] needs an [auth_server] table to refresh tokens with",
                );
            }
            build_session(&mut cx, s)
        }
        None => None,
    };
    let state = build_state(&mut cx, f.state.unwrap_or_default());
    let tracing = f.tracing.and_then(|t| build_tracing(&mut cx, t));
    let issuer_names: Vec<IssuerInfo<'_>> = f
        .issuers
        .iter()
        .map(|i| IssuerInfo { name: i.name.as_str(), introspects: i.introspection.is_some() })
        .collect();
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut places = HashMap::new();
    for (i, r) in f.routes.iter().enumerate() {
        let path = root.key("routes").index(i);
        if !names.insert(r.name.as_str()) {
            cx.p.add(
                &path.key("name"),
                format!("route name \"{}\" is used twice; names must be unique", r.name),
            );
        }
        if let Some(route) = build_route(&mut cx, &path, r, &issuer_names, listen.forward_auth.is_some()) {
            let place = (route.host.clone(), route.path_prefix.clone());
            if let Some(other) = places.insert(place, r.name.clone()) {
                cx.p.add(
                    &path.key("path_prefix"),
                    format!("route \"{}\" has the same host and path_prefix as route \"{other}\"", r.name),
                );
            }
            routes.push(route);
        }
    }
    if let Some(s) = &session {
        for r in &routes {
            let own = [&s.login_path, &s.callback_path, &s.refresh_path, &s.logout_path];
            if own.iter().any(|p| **p == r.path_prefix)
                || s.backchannel_logout_path.as_ref() == Some(&r.path_prefix)
            {
                let msg =
                    format!("route \"{}\" uses a [session] endpoint path; the endpoint would win", r.name);
                cx.p.add(&root.key("routes"), msg);
            }
        }
    }
    let route_names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    let rate_limits = build_rate_limits(&mut cx, &f.rate_limits, &route_names, session.is_some());
    if !cx.p.is_empty() {
        return None;
    }
    Some(Config {
        listen,
        limits,
        tls,
        issuers,
        auth_server,
        session,
        state,
        rate_limits,
        routes,
        tracing,
        warnings: Vec::new(),
    })
}

fn build_tracing(cx: &mut Ctx<'_, '_>, t: file::Tracing) -> Option<TracingSettings> {
    let path = KeyPath::root().key("tracing");
    let otlp_endpoint = cx.url(&path.key("otlp_endpoint"), &t.otlp_endpoint);
    let sample_ratio = t.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        let msg = format!("{sample_ratio} is not a share of traces; use a number from 0.0 to 1.0");
        cx.p.add(&path.key("sample_ratio"), msg);
    }
    let service_name = t.service_name.unwrap_or_else(|| "portcullis".to_owned());
    if service_name.is_empty() {
        cx.p.add(&path.key("service_name"), "must not be empty (leave it out for \"portcullis\")");
    }
    Some(TracingSettings { otlp_endpoint: otlp_endpoint?, service_name, sample_ratio })
}

fn build_listen(
    cx: &mut Ctx<'_, '_>,
    l: file::Listen,
    has_tls: bool,
    forward_auth: Option<&file::ForwardAuth>,
) -> Listen {
    let path = KeyPath::root().key("listen");
    let mut addr = |at: &KeyPath, v: Option<&String>| {
        v.and_then(|s| match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let msg = format!("\"{s}\" is not an address; write IP:PORT, e.g. \"127.0.0.1:8080\"");
                cx.p.add(at, msg);
                None
            }
        })
    };
    let out = Listen {
        http: addr(&path.key("http"), l.http.as_ref()),
        https: addr(&path.key("https"), l.https.as_ref()),
        admin: addr(&path.key("admin"), l.admin.as_ref()),
        forward_auth: addr(
            &KeyPath::root().key("forward_auth").key("listen"),
            forward_auth.map(|f| &f.listen),
        ),
    };
    if l.http.is_none() && l.https.is_none() && forward_auth.is_none() {
        cx.p.add(&path, "set listen.http or listen.https (at least one listener is needed)");
    }
    if l.https.is_some() && !has_tls {
        cx.p.add(&path.key("https"), "listen.https needs a [tls] table with cert and key");
    }
    out
}

fn build_limits(cx: &mut Ctx<'_, '_>, l: file::Limits) -> Limits {
    let path = KeyPath::root().key("limits");
    let d = Limits::default();
    let mut positive = |key: &str, v: Option<u64>, default: usize| match v {
        Some(0) if key != "token_cache_entries" => {
            cx.p.add(&path.key(key), "must be greater than 0");
            default
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => default,
    };
    let max_connections = positive("max_connections", l.max_connections, d.max_connections);
    let max_header_bytes = positive("max_header_bytes", l.max_header_bytes, d.max_header_bytes);
    let token_cache_entries = positive("token_cache_entries", l.token_cache_entries, d.token_cache_entries);
    if max_header_bytes < 8192 {
        cx.p.add(
            &path.key("max_header_bytes"),
            "must be at least 8192 (the smallest read buffer the HTTP/1 parser accepts)",
        );
    }
    Limits {
        max_connections,
        max_header_bytes,
        token_cache_entries,
        header_read_timeout: cx.duration(
            &path.key("header_read_timeout"),
            &l.header_read_timeout,
            d.header_read_timeout,
        ),
        drain_timeout: cx.duration(&path.key("drain_timeout"), &l.drain_timeout, d.drain_timeout),
        drain_delay: cx.duration(&path.key("drain_delay"), &l.drain_delay, d.drain_delay),
    }
}

fn build_tls(cx: &mut Ctx<'_, '_>, t: file::Tls) -> Option<TlsSettings> {
    let path = KeyPath::root().key("tls");
    let default = crate::tls::load_certified_key(&cx.file(&t.cert), &cx.file(&t.key))
        .map_err(|e| cx.p.add(&path.key("cert"), with_causes(&e)))
        .ok();
    let mut sni = Vec::new();
    for (i, c) in t.certificates.iter().enumerate() {
        let p = path.key("certificates").index(i);
        if c.server_names.is_empty() {
            cx.p.add(&p.key("server_names"), "list at least one server name");
        }
        match crate::tls::load_certified_key(&cx.file(&c.cert), &cx.file(&c.key)) {
            Ok(ck) => sni.push((c.server_names.clone(), ck)),
            Err(e) => cx.p.add(&p.key("cert"), with_causes(&e)),
        }
    }
    Some(TlsSettings { default: default?, sni })
}

fn build_issuer(
    cx: &mut Ctx<'_, '_>,
    path: &KeyPath,
    is: &file::Issuer,
    as_timeout: Duration,
) -> Option<IssuerSettings> {
    let sources = [
        is.jwks_url.is_some(),
        is.jwks_file.is_some(),
        is.public_key_files.is_some(),
        is.hmac_secret_env.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() > 1 {
        let msg = "set at most one of jwks_url, jwks_file, public_key_files, hmac_secret_env (none: discover jwks_uri from the issuer)";
        cx.p.add(path, msg);
        return None;
    }
    let hmac = is.hmac_secret_env.is_some();
    let algorithms = match &is.algorithms {
        None if hmac => vec![Algorithm::HS256],
        None => vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
        Some(list) => {
            let mut out = Vec::new();
            for (i, a) in list.iter().enumerate() {
                let p = path.key("algorithms").index(i);
                if a.eq_ignore_ascii_case("none") {
                    cx.p.add(&p, "\"none\" is never accepted: unsigned tokens prove nothing");
                    continue;
                }
                match a.parse::<Algorithm>() {
                    Ok(alg) if hmac != matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => {
                        let why = if hmac { "an HMAC secret verifies only HS256/HS384/HS512" } else { "HS* algorithms need hmac_secret_env, never a public key" };
                        cx.p.add(&p, format!("\"{a}\" does not fit this issuer's keys: {why}"));
                    }
                    Ok(alg) => out.push(alg),
                    Err(_) => cx.p.add(&p, format!("unknown algorithm \"{a}\" (known: RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA HS256 HS384 HS512)")),
                }
            }
            if list.is_empty() {
                cx.p.add(&path.key("algorithms"), "list at least one algorithm");
            }
            out
        }
    };
    let leeway = cx.duration(&path.key("leeway"), &is.leeway, Duration::from_secs(30));
    let jwks_refresh = cx.duration(&path.key("jwks_refresh"), &is.jwks_refresh, DEFAULT_JWKS_REFRESH);
    if is.issuer.is_empty() {
        cx.p.add(&path.key("issuer"), "must not be empty: it is the required value of `iss`");
    }
    let introspection = is
        .introspection
        .as_ref()
        .and_then(|i| build_introspection(cx, &path.key("introspection"), i, as_timeout));
    let source = if sources.iter().all(|s| !*s) && is.introspection.is_some() {
        // Opaque tokens only: no JWT keys to find.
        KeySource::Static(Arc::new(KeySet::default()))
    } else if sources.iter().all(|s| !*s) {
        let p = path.key("issuer");
        match is.issuer.parse::<Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {
                KeySource::Discover(is.issuer.clone())
            }
            _ => {
                let msg = "with no key source, `issuer` must be an http(s) URL to discover jwks_uri from (or set jwks_url, jwks_file, public_key_files or hmac_secret_env)";
                cx.p.add(&p, msg);
                return None;
            }
        }
    } else if let Some(u) = &is.jwks_url {
        KeySource::JwksUrl(cx.url(&path.key("jwks_url"), u)?)
    } else if let Some(f) = &is.jwks_file {
        let p = path.key("jwks_file");
        let bytes =
            std::fs::read(cx.file(f)).map_err(|e| cx.p.add(&p, format!("cannot read \"{f}\": {e}"))).ok()?;
        KeySource::Static(Arc::new(
            keys::parse_jwks(&bytes).map_err(|e| cx.p.add(&p, format!("\"{f}\": {e}"))).ok()?,
        ))
    } else if let Some(files) = &is.public_key_files {
        let mut list = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let p = path.key("public_key_files").index(i);
            match std::fs::read(cx.file(f)) {
                Ok(b) => match keys::parse_pem(&b) {
                    Ok(k) => list.push(k),
                    Err(e) => cx.p.add(&p, format!("\"{f}\": {e}")),
                },
                Err(e) => cx.p.add(&p, format!("cannot read \"{f}\": {e}")),
            }
        }
        if files.is_empty() {
            cx.p.add(&path.key("public_key_files"), "list at least one PEM file");
        }
        for k in &list {
            if !algorithms.iter().any(|a| k.family.accepts(*a)) {
                cx.p.add(
                    &path.key("algorithms"),
                    format!("no listed algorithm fits the {:?} key in public_key_files", k.family),
                );
            }
        }
        KeySource::Static(Arc::new(KeySet::new(list)))
    } else {
        let var = is.hmac_secret_env.as_deref().unwrap_or_default();
        let secret = cx.env(&path.key("hmac_secret_env"), var)?;
        if secret.len() < 32 {
            cx.p.add(&path.key("hmac_secret_env"), format!("the secret in {var} is shorter than 32 bytes"));
        }
        KeySource::Static(Arc::new(keys::hmac(secret.as_bytes())))
    };
    debug_assert!(!algorithms.iter().any(|a| hmac != KeyFamily::Hmac.accepts(*a)));
    if is.introspection.is_some() && introspection.is_none() {
        return None;
    }
    Some(IssuerSettings {
        name: is.name.clone(),
        issuer: is.issuer.clone(),
        source,
        introspection,
        algorithms,
        leeway,
        jwks_refresh,
    })
}

/// `client_auth` and its secret, as for `[auth_server]` and introspection.
fn client_auth(
    cx: &mut Ctx<'_, '_>,
    path: &KeyPath,
    mode: Option<&str>,
    secret_env: Option<&String>,
) -> (ClientAuth, Option<Secret<String>>) {
    let secret = secret_env.and_then(|v| cx.env(&path.key("client_secret_env"), v)).map(Secret::new);
    let auth = match mode {
        None if secret_env.is_some() => ClientAuth::SecretBasic,
        None => ClientAuth::None,
        Some("client_secret_basic") => ClientAuth::SecretBasic,
        Some("client_secret_post") => ClientAuth::SecretPost,
        Some("none") => ClientAuth::None,
        Some(other) => {
            let msg = format!(
                "\"{other}\" is not one of \"client_secret_basic\", \"client_secret_post\", \"none\""
            );
            cx.p.add(&path.key("client_auth"), msg);
            ClientAuth::None
        }
    };
    if auth != ClientAuth::None && secret_env.is_none() {
        cx.p.add(
            &path.key("client_auth"),
            "client_secret_basic and client_secret_post need client_secret_env",
        );
    }
    (auth, secret)
}

fn build_introspection(
    cx: &mut Ctx<'_, '_>,
    path: &KeyPath,
    i: &file::Introspection,
    default_timeout: Duration,
) -> Option<IntrospectionSettings> {
    let url = cx.url(&path.key("url"), &i.url);
    let (client_auth, client_secret) =
        client_auth(cx, path, i.client_auth.as_deref(), i.client_secret_env.as_ref());
    if i.client_id.is_empty() {
        cx.p.add(&path.key("client_id"), "must not be empty");
    }
    let cache = cx.duration(&path.key("cache"), &i.cache, Duration::from_secs(60));
    let timeout = cx.duration(&path.key("timeout"), &i.timeout, default_timeout);
    Some(IntrospectionSettings {
        url: url?,
        client_id: i.client_id.clone(),
        client_secret,
        client_auth,
        cache,
        timeout,
    })
}

fn build_auth_server(cx: &mut Ctx<'_, '_>, a: file::AuthServer) -> Option<AuthServerSettings> {
    let path = KeyPath::root().key("auth_server");
    let token_url = cx.opt_url(&path.key("token_url"), &a.token_url);
    if a.token_url.is_none() {
        match &a.issuer {
            Some(i) => {
                cx.url(&path.key("issuer"), i);
            }
            None => {
                cx.p.add(&path.key("token_url"), "set token_url, or issuer to discover the endpoints from")
            }
        }
    }
    let revocation_url = cx.opt_url(&path.key("revocation_url"), &a.revocation_url);
    let authorization_url = cx.opt_url(&path.key("authorization_url"), &a.authorization_url);
    let login_url = cx.opt_url(&path.key("login_url"), &a.login_url);
    if let Some(r) = &a.redirect_uri {
        cx.url(&path.key("redirect_uri"), r);
    }
    let (client_auth, client_secret) =
        client_auth(cx, &path, a.client_auth.as_deref(), a.client_secret_env.as_ref());
    if a.client_id.is_empty() {
        cx.p.add(&path.key("client_id"), "must not be empty");
    }
    let timeout = cx.duration(&path.key("timeout"), &a.timeout, Duration::from_secs(5));
    Some(AuthServerSettings {
        token_url,
        revocation_url,
        authorization_url,
        login_url,
        issuer: a.issuer,
        client_id: a.client_id,
        client_secret,
        client_auth,
        scope: a.scope,
        resource: a.resource,
        authorize_params: a.authorize_params.into_iter().collect(),
        redirect_uri: a.redirect_uri,
        timeout,
    })
}

fn build_session(cx: &mut Ctx<'_, '_>, s: file::Session) -> Option<SessionSettings> {
    let path = KeyPath::root().key("session");
    let mut keys = Vec::new();
    if let Some(raw) = cx.env(&path.key("cookie_key_env"), &s.cookie_key_env) {
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD.decode(part).ok();
            match decoded.and_then(|d| <[u8; 32]>::try_from(d.as_slice()).ok()) {
                Some(k) => keys.push(k),
                None => {
                    let msg = format!("{} must hold base64 32-byte keys, comma-separated (make one with `portcullis keygen`)", s.cookie_key_env);
                    cx.p.add(&path.key("cookie_key_env"), msg);
                }
            }
        }
    }
    let secure = s.secure.unwrap_or(true);
    let default_name =
        |kind: &str| if secure { format!("__Host-{kind}") } else { format!("portcullis-{kind}") };
    let access_cookie = s.access_cookie.unwrap_or_else(|| default_name("access"));
    let refresh_cookie = s.refresh_cookie.unwrap_or_else(|| default_name("refresh"));
    for (key, name) in [("access_cookie", &access_cookie), ("refresh_cookie", &refresh_cookie)] {
        if !secure && name.starts_with("__Host-") {
            cx.p.add(&path.key(key), format!("\"{name}\": browsers refuse __Host- cookies without Secure; rename it or set secure = true"));
        }
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            cx.p.add(
                &path.key(key),
                format!("\"{name}\" is not a valid cookie name (letters, digits, - _ .)"),
            );
        }
    }
    if access_cookie == refresh_cookie {
        cx.p.add(&path.key("refresh_cookie"), "must differ from access_cookie");
    }
    let same_site = match s.same_site.as_deref().unwrap_or("lax") {
        "lax" => SameSite::Lax,
        "strict" => SameSite::Strict,
        "none" => SameSite::None,
        other => {
            cx.p.add(
                &path.key("same_site"),
                format!("\"{other}\" is not one of \"lax\", \"strict\", \"none\""),
            );
            SameSite::Lax
        }
    };
    if same_site == SameSite::None && !secure {
        cx.p.add(&path.key("same_site"), "browsers refuse SameSite=None without Secure; set secure = true");
    }
    let mut p = |key: &str, v: Option<String>, default: &str| {
        let v = v.unwrap_or_else(|| default.to_owned());
        if !v.starts_with('/') {
            cx.p.add(&path.key(key), format!("\"{v}\" must start with /"));
        } else if crate::target::normalise_path(&v).ok().as_deref() != Some(v.as_str()) {
            cx.p.add(&path.key(key), format!("\"{v}\" is not a normalised path"));
        }
        v
    };
    let login_path = p("login_path", s.login_path, "/auth/login");
    let callback_path = p("callback_path", s.callback_path, "/auth/callback");
    let refresh_path = p("refresh_path", s.refresh_path, "/auth/refresh");
    let logout_path = p("logout_path", s.logout_path, "/auth/logout");
    let backchannel_logout_path =
        s.backchannel_logout_path.map(|v| p("backchannel_logout_path", Some(v), ""));
    let mut allowed_origins = Vec::new();
    for (i, o) in s.allowed_origins.iter().enumerate() {
        match o.parse::<Uri>() {
            Ok(u)
                if u.scheme().is_some()
                    && u.authority().is_some()
                    && u.path_and_query().is_none_or(|pq| pq.as_str() == "/" || pq.as_str().is_empty()) =>
            {
                allowed_origins.push(
                    format!(
                        "{}://{}",
                        u.scheme_str().unwrap_or_default(),
                        u.authority().map(|a| a.as_str()).unwrap_or_default()
                    )
                    .to_ascii_lowercase(),
                );
            }
            _ => cx.p.add(
                &path.key("allowed_origins").index(i),
                format!("\"{o}\" is not an origin; write scheme://host[:port]"),
            ),
        }
    }
    let refresh_ahead = cx.duration(&path.key("refresh_ahead"), &s.refresh_ahead, Duration::from_secs(30));
    let refresh_grace = cx.duration(&path.key("refresh_grace"), &s.refresh_grace, Duration::from_secs(30));
    let idle_timeout =
        cx.duration(&path.key("idle_timeout"), &s.idle_timeout, Duration::from_secs(7 * 86_400));
    let absolute_timeout =
        cx.duration(&path.key("absolute_timeout"), &s.absolute_timeout, Duration::from_secs(30 * 86_400));
    if idle_timeout > absolute_timeout {
        cx.p.add(&path.key("idle_timeout"), "must not exceed absolute_timeout");
    }
    let end_session_url = cx.opt_url(&path.key("end_session_url"), &s.end_session_url);
    if let Some(r) = &s.post_logout_redirect_uri {
        if !r.starts_with('/') {
            cx.url(&path.key("post_logout_redirect_uri"), r);
        }
    }
    if keys.is_empty() {
        return None;
    }
    Some(SessionSettings {
        cookie_keys: Secret::new(keys),
        access_cookie,
        refresh_cookie,
        same_site,
        secure,
        refresh_ahead,
        refresh_grace,
        idle_timeout,
        absolute_timeout,
        login_path,
        callback_path,
        refresh_path,
        logout_path,
        allowed_origins,
        backchannel_logout_path,
        end_session_url,
        post_logout_redirect_uri: s.post_logout_redirect_uri,
    })
}

fn build_state(cx: &mut Ctx<'_, '_>, s: file::State) -> StateSettings {
    let path = KeyPath::root().key("state");
    let Some(url) = s.redis_url else {
        if s.redis_password_env.is_some() || s.key_prefix.is_some() {
            cx.p.add(&path, "redis_password_env and key_prefix need redis_url");
        }
        return StateSettings::default();
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        cx.p.add(&path.key("redis_url"), format!("\"{url}\" must start with redis:// or rediss://"));
    } else if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
        cx.p.add(&path.key("redis_url"), format!("not a usable Redis URL ({e})"));
    }
    let password = s
        .redis_password_env
        .as_ref()
        .and_then(|v| cx.env(&path.key("redis_password_env"), v))
        .map(Secret::new);
    let key_prefix = s.key_prefix.unwrap_or_else(|| "portcullis:".to_owned());
    StateSettings { redis: Some(RedisSettings { url, password, key_prefix }) }
}

const RESERVED_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "cookie",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

fn build_route(
    cx: &mut Ctx<'_, '_>,
    path: &KeyPath,
    r: &file::Route,
    issuers: &[IssuerInfo<'_>],
    forward_auth: bool,
) -> Option<RouteSettings> {
    let start = cx.p.list.len();
    let host = r.host.as_ref().map(|h| h.to_ascii_lowercase());
    if let Some(h) = &host {
        if h.is_empty() || h.contains(['/', ':', ' ']) {
            cx.p.add(
                &path.key("host"),
                format!("\"{h}\" must be a bare host name (no scheme, port or path)"),
            );
        }
    }
    let mut prefix = r.path_prefix.clone().unwrap_or_else(|| "/".to_owned());
    if !prefix.starts_with('/') {
        cx.p.add(&path.key("path_prefix"), format!("\"{prefix}\" must start with /"));
    }
    while prefix.len() > 1 && prefix.ends_with('/') {
        prefix.pop();
    }
    // Requests are routed on their normalised path, so a prefix must be normal too.
    if prefix.starts_with('/')
        && crate::target::normalise_path(&prefix).ok().as_deref() != Some(prefix.as_str())
    {
        cx.p.add(
            &path.key("path_prefix"),
            format!("\"{prefix}\" is not a normalised path (no dot segments, repeated slashes or escapes of letters)"),
        );
    }
    let raw: Vec<(KeyPath, &String)> = match (&r.upstream, &r.upstreams) {
        (Some(u), None) => vec![(path.key("upstream"), u)],
        (None, Some(list)) if !list.is_empty() => {
            list.iter().enumerate().map(|(i, u)| (path.key("upstreams").index(i), u)).collect()
        }
        (Some(_), Some(_)) => {
            cx.p.add(&path.key("upstreams"), "set either upstream or upstreams, not both");
            vec![]
        }
        // Forward-auth only: the front proxy forwards, this route only authorizes.
        (None, None) if forward_auth => vec![],
        _ => {
            cx.p.add(path, "set upstream = \"http://host:port\" (or upstreams = [...]); only with [forward_auth] may a route have none");
            vec![]
        }
    };
    let upstreams: Vec<Uri> = raw.iter().filter_map(|(p, u)| cx.url(p, u)).collect();
    let ca = match &r.ca_file {
        Some(f) => crate::tls::load_certs(&cx.file(f))
            .map_err(|e| cx.p.add(&path.key("ca_file"), with_causes(&e)))
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let named: Vec<(KeyPath, &String)> = match (&r.issuer, &r.issuers) {
        (Some(i), None) => vec![(path.key("issuer"), i)],
        (None, Some(list)) => {
            list.iter().enumerate().map(|(n, i)| (path.key("issuers").index(n), i)).collect()
        }
        (Some(_), Some(_)) => {
            cx.p.add(&path.key("issuers"), "set either issuer or issuers, not both");
            vec![]
        }
        (None, None) => vec![],
    };
    let auth = match r.auth.as_deref() {
        None if !named.is_empty() => AuthMode::Required,
        None => AuthMode::None,
        Some("required") => AuthMode::Required,
        Some("optional") => AuthMode::Optional,
        Some("none") => AuthMode::None,
        Some(other) => {
            cx.p.add(
                &path.key("auth"),
                format!("\"{other}\" is not one of \"required\", \"optional\", \"none\""),
            );
            AuthMode::Required
        }
    };
    for (p, name) in &named {
        if !issuers.iter().any(|i| i.name == name.as_str()) {
            let known: Vec<&str> = issuers.iter().map(|i| i.name).collect();
            let known = if known.is_empty() { "none defined".to_owned() } else { known.join(", ") };
            cx.p.add(p, format!("unknown issuer \"{name}\" (known: {known})"));
        }
    }
    if named.is_empty() && auth != AuthMode::None {
        cx.p.add(&path.key("auth"), "a route that checks tokens needs `issuer` naming one of [[issuers]]");
    }
    let introspecting: Vec<&str> = named
        .iter()
        .filter(|(_, n)| issuers.iter().any(|i| i.name == n.as_str() && i.introspects))
        .map(|(_, n)| n.as_str())
        .collect();
    if introspecting.len() > 1 {
        cx.p.add(
            &path.key("issuers"),
            format!(
                "at most one issuer per route may introspect opaque tokens ({})",
                introspecting.join(", ")
            ),
        );
    }
    let cors_preflight = match r.cors_preflight.as_deref() {
        None | Some("pass") => true,
        Some("deny") => false,
        Some(other) => {
            cx.p.add(&path.key("cors_preflight"), format!("\"{other}\" is not one of \"pass\", \"deny\""));
            true
        }
    };
    let rules = build_rules(cx, path, r, &prefix, auth);
    let max_tunnel_lifetime = r
        .max_tunnel_lifetime
        .as_ref()
        .map(|v| cx.duration(&path.key("max_tunnel_lifetime"), &Some(v.clone()), Duration::ZERO));
    let upstream_h2 = match r.upstream_protocol.as_deref() {
        None | Some("http1") => false,
        Some("h2") => true,
        Some(p) => {
            cx.p.add(&path.key("upstream_protocol"), format!("\"{p}\" is not one of \"http1\", \"h2\""));
            false
        }
    };
    let max_request_body = r
        .max_request_body
        .as_ref()
        .and_then(|s| parse_size(s).map_err(|m| cx.p.add(&path.key("max_request_body"), m)).ok());
    let mut identity_headers = Vec::new();
    match &r.identity_headers {
        None => identity_headers.push((HeaderName::from_static("x-auth-subject"), "sub".to_owned())),
        Some(map) => {
            for (name, claim) in map {
                let p = path.key("identity_headers").key(name);
                match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(h) if RESERVED_HEADERS.contains(&h.as_str()) => {
                        cx.p.add(&p, format!("\"{name}\" is managed by the proxy and cannot carry a claim"));
                    }
                    Ok(h) => identity_headers.push((h, claim.clone())),
                    Err(_) => cx.p.add(&p, format!("\"{name}\" is not a valid header name")),
                }
            }
        }
    }
    if auth != AuthMode::None && r.audiences.is_empty() {
        // Any token of the issuer passes, whoever it was minted for (confused deputy).
        cx.p.warn(
            &path.key("issuer"),
            "no `audiences`: tokens the issuer minted for any other API are accepted here; list this API's audience",
        );
    }
    let connect_timeout =
        cx.duration(&path.key("connect_timeout"), &r.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    let timeout = cx.duration(&path.key("timeout"), &r.timeout, DEFAULT_UPSTREAM_TIMEOUT);
    if cx.p.list.len() != start {
        return None;
    }
    Some(RouteSettings {
        name: r.name.clone(),
        host,
        path_prefix: prefix,
        upstreams,
        strip_prefix: r.strip_prefix,
        ca,
        connect_timeout,
        timeout,
        max_request_body,
        auth,
        issuers: named.iter().map(|(_, n)| (*n).clone()).collect(),
        audiences: r.audiences.clone(),
        scopes: r.scopes.clone(),
        forward_token: r.forward_token.unwrap_or(true),
        cors_preflight,
        max_tunnel_lifetime,
        upstream_h2,
        identity_headers,
        rules,
        line: cx.p.line(path),
    })
}

fn build_rate_limits(
    cx: &mut Ctx<'_, '_>,
    limits: &[file::RateLimit],
    routes: &[&str],
    has_session: bool,
) -> Vec<RateLimitSettings> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, l) in limits.iter().enumerate() {
        let p = KeyPath::root().key("rate_limits").index(i);
        if !names.insert(l.name.as_str()) {
            cx.p.add(&p.key("name"), format!("rate limit name \"{}\" is used twice", l.name));
        }
        let key = match l.key.as_str() {
            "sub" => Some(LimitKey::Sub),
            "client_ip" => Some(LimitKey::ClientIp),
            k => match (k.strip_prefix("claim:"), k.strip_prefix("header:")) {
                (Some(c), _) if !c.is_empty() => Some(LimitKey::Claim(c.to_owned())),
                (_, Some(h)) => HeaderName::from_bytes(h.as_bytes()).ok().map(LimitKey::Header),
                _ => None,
            },
        };
        let Some(key) = key else {
            cx.p.add(
                &p.key("key"),
                format!(
                    "\"{}\" is not one of \"sub\", \"client_ip\", \"claim:NAME\", \"header:NAME\"",
                    l.key
                ),
            );
            continue;
        };
        let rate = l.rate.split_once('/').and_then(|(n, unit)| {
            let n: u32 = n.trim().parse().ok().filter(|n| *n > 0)?;
            let per = match unit.trim() {
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                "h" => Duration::from_secs(3600),
                _ => return None,
            };
            Some((n, per))
        });
        let Some((n, per)) = rate else {
            cx.p.add(
                &p.key("rate"),
                format!("\"{}\" is not a rate; write N/s, N/m or N/h, e.g. \"100/s\"", l.rate),
            );
            continue;
        };
        let per_second = f64::from(n) / per.as_secs_f64();
        let burst = match l.burst {
            Some(0) => {
                cx.p.add(&p.key("burst"), "must be at least 1");
                1
            }
            Some(b) => u32::try_from(b).unwrap_or(u32::MAX),
            None => per_second.ceil().max(1.0) as u32,
        };
        if let Some(list) = &l.routes {
            for (j, r) in list.iter().enumerate() {
                if r == "@login" {
                    if !has_session {
                        cx.p.add(
                            &p.key("routes").index(j),
                            "\"@login\" needs a [session] table (its login and callback paths)",
                        );
                    }
                } else if !routes.contains(&r.as_str()) {
                    cx.p.add(
                        &p.key("routes").index(j),
                        format!("unknown route \"{r}\" (known: {}, @login)", routes.join(", ")),
                    );
                }
            }
            if matches!(key, LimitKey::Sub | LimitKey::Claim(_)) && list.iter().all(|r| r == "@login") {
                cx.p.add(
                    &p.key("key"),
                    "the login endpoints carry no token: key @login limits by client_ip or header:NAME",
                );
            }
        }
        out.push(RateLimitSettings {
            name: l.name.clone(),
            key,
            period: per / n,
            burst: std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN),
            routes: l.routes.clone(),
        });
    }
    out
}

/// What a route needs to know of an issuer.
pub(super) struct IssuerInfo<'a> {
    pub name: &'a str,
    pub introspects: bool,
}

const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"];

/// Compiles `[[routes.rules]]`, refusing rules that can never match or never decide.
fn build_rules(
    cx: &mut Ctx<'_, '_>,
    path: &KeyPath,
    r: &file::Route,
    route_prefix: &str,
    route_auth: AuthMode,
) -> Vec<RuleSettings> {
    let mut out: Vec<RuleSettings> = Vec::new();
    // Rules with their own errors shadow nothing: their broken parts were dropped.
    let mut sound: Vec<bool> = Vec::new();
    for (i, rule) in r.rules.iter().enumerate() {
        let p = path.key("rules").index(i);
        let start = cx.p.list.len();
        let mut methods = Vec::new();
        for (m, name) in rule.methods.iter().enumerate() {
            let upper = name.to_ascii_uppercase();
            match METHODS
                .iter()
                .find(|k| **k == upper)
                .and_then(|k| http::Method::from_bytes(k.as_bytes()).ok())
            {
                Some(method) => methods.push(method),
                None => cx.p.add(
                    &p.key("methods").index(m),
                    format!(
                        "unknown method \"{name}\": the rule can never match (known: {})",
                        METHODS.join(" ")
                    ),
                ),
            }
        }
        let prefix = rule.path_prefix.as_ref().map(|raw| {
            let mut v = raw.clone();
            while v.len() > 1 && v.ends_with('/') {
                v.pop();
            }
            if !v.starts_with('/') || crate::target::normalise_path(&v).ok().as_deref() != Some(v.as_str()) {
                cx.p.add(&p.key("path_prefix"), format!("\"{raw}\" must be a normalised path starting with /"));
            } else if !crate::route::prefix_matches(route_prefix, &v) {
                cx.p.add(
                    &p.key("path_prefix"),
                    format!("\"{raw}\" is outside the route's path_prefix \"{route_prefix}\": the rule can never match"),
                );
            }
            v
        });
        let mut claims = Vec::new();
        for (name, value) in &rule.claims {
            let json = match value {
                toml::Value::String(s) => serde_json::Value::from(s.clone()),
                toml::Value::Integer(n) => serde_json::Value::from(*n),
                toml::Value::Boolean(b) => serde_json::Value::from(*b),
                toml::Value::Float(f) => serde_json::Value::from(*f),
                _ => {
                    cx.p.add(
                        &p.key("claims").key(name),
                        "write a string, number or boolean the claim must equal (or contain)",
                    );
                    continue;
                }
            };
            claims.push(ClaimMatch { path: name.split('.').map(str::to_owned).collect(), value: json });
        }
        let requires = rule.scopes.is_some() || !rule.claims.is_empty();
        let action = match (rule.deny, rule.auth.as_deref()) {
            (true, None) if !requires => RuleAction::Deny,
            (true, _) => {
                cx.p.add(
                    &p.key("deny"),
                    "a deny rule refuses every request it matches: it takes no auth, scopes or claims",
                );
                RuleAction::Deny
            }
            (false, Some("none")) if !requires => RuleAction::Public,
            (false, Some("none")) => {
                cx.p.add(
                    &p.key("auth"),
                    "a rule with auth = \"none\" checks no token: it takes no scopes or claims",
                );
                RuleAction::Public
            }
            (false, Some(other)) => {
                cx.p.add(&p.key("auth"), format!("\"{other}\": a rule's auth can only be \"none\""));
                RuleAction::Public
            }
            (false, None) => {
                if route_auth == AuthMode::None {
                    cx.p.add(
                        &p,
                        "this rule requires a token, but the route checks none: give the route an issuer",
                    );
                }
                RuleAction::Require { scopes: rule.scopes.clone(), claims }
            }
        };
        let setting =
            RuleSettings { methods, path_prefix: prefix, action, number: i + 1, line: cx.p.line(&p) };
        if cx.p.list.len() == start {
            // Shadowed: an earlier rule matches every request this one would.
            let covered = out.iter().zip(&sound).filter(|(_, ok)| **ok).map(|(e, _)| e).find(|e| {
                let methods = e.methods.is_empty()
                    || (!setting.methods.is_empty() && setting.methods.iter().all(|m| e.methods.contains(m)));
                let within = match (&e.path_prefix, &setting.path_prefix) {
                    (None, _) => true,
                    (Some(ep), Some(sp)) => crate::route::prefix_matches(ep, sp),
                    (Some(ep), None) => crate::route::prefix_matches(ep, route_prefix),
                };
                methods && within
            });
            if let Some(e) = covered {
                let at = e.line.map(|l| format!(" (line {l})")).unwrap_or_default();
                cx.p.add(&p, format!("rule {} is shadowed by rule {}{at}, which matches every request it would: it can never decide", i + 1, e.number));
            }
        }
        sound.push(cx.p.list.len() == start);
        out.push(setting);
    }
    out
}
