//! The demo's upstreams: an echo API that answers with the request it received
//! (so the page shows the identity headers the proxy wrote), and the example SPA.

use http::{header, HeaderValue, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::http::{full, json_response, Answer};

const INDEX: &str = include_str!("../../examples/spa/index.html");
const APP: &str = include_str!("../../examples/spa/app.js");

/// `{method, path, query, headers, access_token_claims}` of the request, headers
/// by lower-case name; the access token itself is withheld from the page.
pub fn echo<B>(req: &Request<B>) -> Answer {
    let mut headers = Map::new();
    let mut claims = None;
    for (name, value) in req.headers() {
        let text = String::from_utf8_lossy(value.as_bytes());
        // The API receives the access token; the page must not show one, or it
        // would contradict what the demo is there to prove.
        let text = if name == header::AUTHORIZATION {
            // Claims only, without the signature that would make the token usable.
            claims = text.strip_prefix("Bearer ").and_then(crate::auth::jwt::unverified_payload::<Value>);
            "Bearer (the access token, not shown; its claims are below)".to_owned()
        } else {
            text.into_owned()
        };
        headers.insert(name.as_str().to_owned(), Value::from(text));
    }
    json_response(
        StatusCode::OK,
        &json!({
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "query": req.uri().query(),
            "headers": headers,
            "access_token_claims": claims,
        }),
    )
}

/// The SPA's files, and `/demo.json` telling the page where the demo IdP is.
pub fn spa<B>(req: &Request<B>, idp: &str) -> Answer {
    let (body, kind): (String, &str) = match req.uri().path() {
        "/" | "/index.html" => (INDEX.to_owned(), "text/html; charset=utf-8"),
        "/app.js" => (APP.to_owned(), "text/javascript; charset=utf-8"),
        "/demo.json" => (json!({"idp": idp}).to_string(), "application/json"),
        _ => return json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
    };
    let mut r = Response::new(full(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
