//! `check --explain "METHOD URL"`: what the configuration would do with one
//! request, read from the file alone (no network, no keys). One fact per line:
//! the route, its auth and issuers, the deciding rule or the route policy and
//! what it requires, and the upstream URL after `strip_prefix`.

use std::fmt::Write as _;

use http::{Method, Uri};

use crate::config::{AuthMode, ClaimMatch, Config, RouteSettings, RuleAction};
use crate::route::{strip_path, RouteTable};

/// The explanation, or why the request line cannot be read.
pub fn explain(config: &Config, request: &str) -> Result<String, String> {
    let mut parts = request.split_whitespace();
    let (Some(method), Some(url), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("write the request as \"METHOD URL\", e.g. \"GET https://api.example.com/orders/42\" (got {request:?})"));
    };
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{method:?} is not a method"))?;
    let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    let mut out = String::new();
    let path = match crate::target::normalise_path(uri.path()) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            let _ = writeln!(out, "answer: 400 bad_request ({})", e.description());
            return Ok(out);
        }
    };
    if path != uri.path() {
        let _ = writeln!(out, "path: {} (normalised from {})", path, uri.path());
    }
    let table = RouteTable::new(config.routes.iter().map(|r| (r.host.clone(), r.path_prefix.clone(), r)));
    let Some(route) = table.find(uri.authority().map(|a| a.as_str()), &path).copied() else {
        let _ = writeln!(out, "route: no route");
        let _ = writeln!(out, "answer: 404 no_route");
        return Ok(out);
    };
    let _ = writeln!(
        out,
        "route: {}{}, host {}, path_prefix {}",
        route.name,
        line(route.line),
        route.host.as_deref().unwrap_or("any"),
        route.path_prefix
    );
    let mode = match route.auth {
        AuthMode::Required => "required",
        AuthMode::Optional => "optional",
        AuthMode::None => "none",
    };
    let issuers = if route.issuers.is_empty() { "none".to_owned() } else { route.issuers.join(", ") };
    let _ = writeln!(out, "auth: {mode}; issuers: {issuers}");
    let _ = writeln!(out, "decided by: {}", decision(route, &method, &path));
    if route.upstreams.is_empty() {
        let _ = writeln!(out, "upstream: none (forward auth only; on the proxy listeners: 404 no_route)");
    } else {
        let _ = writeln!(out, "upstream: {}", upstream_urls(route, &path, uri.query()));
    }
    Ok(out)
}

fn line(l: Option<usize>) -> String {
    l.map(|l| format!(" (line {l})")).unwrap_or_default()
}

fn requirements(route: &RouteSettings, scopes: &[String], claims: &[ClaimMatch]) -> String {
    let mut req = Vec::new();
    if !route.audiences.is_empty() {
        req.push(format!("audience {}", route.audiences.join(" or ")));
    }
    if !scopes.is_empty() {
        req.push(format!("scopes {}", scopes.join(" ")));
    }
    for c in claims {
        req.push(format!("claim {} = {}", c.path.join("."), c.value));
    }
    if req.is_empty() {
        "a valid token".to_owned()
    } else {
        format!("a valid token with {}", req.join("; "))
    }
}

fn decision(route: &RouteSettings, method: &Method, path: &str) -> String {
    if let Some(rule) = crate::auth::rules::decide(&route.rules, method, path) {
        let head = format!("rule {}{}", rule.number, line(rule.line));
        return match &rule.action {
            RuleAction::Deny => format!("{head}: deny → 403 forbidden"),
            RuleAction::Public => {
                format!("{head}: auth = \"none\" → no token needed (identity headers still stripped)")
            }
            RuleAction::Require { scopes, claims } => {
                let scopes = scopes.as_deref().unwrap_or(&route.scopes);
                format!("{head}: requires {}", requirements(route, scopes, claims))
            }
        };
    }
    if *method == Method::OPTIONS && route.cors_preflight {
        return "route policy (a CORS preflight, with Origin and Access-Control-Request-Method, passes without a token)".to_owned()
            + &match route.auth {
                AuthMode::None => String::new(),
                _ => format!("; other OPTIONS requests need {}", requirements(route, &route.scopes, &[])),
            };
    }
    match route.auth {
        AuthMode::None => "route policy: no token needed".to_owned(),
        AuthMode::Optional => format!(
            "route policy: a token is optional; when sent it must be {}",
            requirements(route, &route.scopes, &[])
        ),
        AuthMode::Required => format!("route policy: requires {}", requirements(route, &route.scopes, &[])),
    }
}

fn upstream_urls(route: &RouteSettings, path: &str, query: Option<&str>) -> String {
    let path = if route.strip_prefix { strip_path(&route.path_prefix, path) } else { path };
    let urls: Vec<String> = route
        .upstreams
        .iter()
        .map(|u| {
            let base = u.path().trim_end_matches('/');
            let q = query.map(|q| format!("?{q}")).unwrap_or_default();
            format!(
                "{}://{}{base}{}{q}",
                u.scheme_str().unwrap_or("http"),
                u.authority().map_or("", |a| a.as_str()),
                if path.is_empty() { "/" } else { path }
            )
        })
        .collect();
    match urls.as_slice() {
        [one] => one.clone(),
        many => format!("{} (round-robin)", many.join(", ")),
    }
}
