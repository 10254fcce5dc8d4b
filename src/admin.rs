//! The operators' listener: `/healthz`, `/readyz`, `/metrics`, `/revocations`.
//! It must never be exposed publicly: anyone who reaches it can revoke tokens
//! and read metrics. Bind it to loopback or a private network.

use std::sync::atomic::Ordering;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::auth::revocation::Revocation;
use crate::body::{error_body, full, json_response, Body};
use crate::state::Runtime;

const MAX_ADMIN_BODY: usize = 64 * 1024;

pub async fn handle(req: Request<Incoming>, rt: &Runtime) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readyz(rt),
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(full(rt.metrics.render()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, "/revocations") => json_response(
            StatusCode::OK,
            &serde_json::to_value(rt.verifier.revocations.list()).unwrap_or_default(),
        ),
        (&Method::POST, "/revocations") => post_revocation(req, rt).await,
        (_, "/healthz" | "/readyz" | "/metrics" | "/revocations") => {
            error_body(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
        }
        _ => error_body(StatusCode::NOT_FOUND, "not_found", "unknown admin endpoint"),
    }
}

fn readyz(rt: &Runtime) -> Response<Body> {
    if rt.draining.load(Ordering::SeqCst) {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({"status": "draining"}));
    }
    let snap = rt.current.hold();
    let waiting: Vec<&str> =
        snap.issuers.values().filter(|i| !i.keys.is_ready()).map(|i| i.keys.name()).collect();
    if !rt.fleet.ready() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "loading the shared revocation list"}),
        );
    }
    if waiting.is_empty() {
        json_response(StatusCode::OK, &serde_json::json!({"status": "ready"}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "waiting for keys", "issuers": waiting}),
        )
    }
}

async fn post_revocation(req: Request<Incoming>, rt: &Runtime) -> Response<Body> {
    let bytes = match Limited::new(req.into_body(), MAX_ADMIN_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_body(StatusCode::BAD_REQUEST, "bad_request", "body unreadable or over 64 KiB")
        }
    };
    let entry: Revocation = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(_) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "expected {\"jti\": STRING, \"exp\": UNIX_SECONDS} or {\"sub\": STRING, \"issued_before\": UNIX_SECONDS}",
            )
        }
    };
    if let Err(m) = entry.validate() {
        return error_body(StatusCode::BAD_REQUEST, "bad_request", m);
    }
    rt.fleet.revoke(&entry).await;
    tracing::info!(kind = entry.key().0, "revocation added");
    json_response(StatusCode::CREATED, &serde_json::to_value(&entry).unwrap_or_default())
}
