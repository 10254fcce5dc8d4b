//! The operators' listener: `/healthz`, `/readyz`. It must never be exposed
//! publicly; bind it to loopback or a private network.

use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{error_body, json_response, Body};
use crate::state::Shared;

pub async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            if shared.draining.load(Ordering::SeqCst) {
                json_response(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({"status": "draining"}))
            } else {
                json_response(StatusCode::OK, &serde_json::json!({"status": "ready"}))
            }
        }
        _ => error_body(StatusCode::NOT_FOUND, "not_found", "unknown admin endpoint"),
    }
}
