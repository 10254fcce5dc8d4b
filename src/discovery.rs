//! OpenID Connect discovery: `{issuer}/.well-known/openid-configuration`, read
//! when the configuration names an issuer but not its endpoints. The document's
//! `issuer` must equal the configured one (OpenID Connect Discovery §4.3).

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use serde::Deserialize;

const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub jwks_uri: Option<String>,
    pub token_endpoint: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
}

pub fn document_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

pub fn parse_uri(v: Option<&str>) -> Option<Uri> {
    v.and_then(|u| u.parse::<Uri>().ok()).filter(|u| matches!(u.scheme_str(), Some("http" | "https")))
}

/// Fetches and checks the discovery document of `issuer`.
pub async fn fetch(issuer: &str) -> Result<Metadata, String> {
    let client = crate::client::build::<Empty<Bytes>>(TIMEOUT).map_err(|e| format!("TLS setup: {e}"))?;
    let url = document_url(issuer);
    let req = Request::get(&url)
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, "portcullis")
        .body(Empty::new())
        .map_err(|e| format!("bad discovery URL {url}: {e}"))?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| format!("request failed: {e}"))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("answered {}", resp.status()));
        }
        Limited::new(resp.into_body(), MAX_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("reading the answer failed: {e}"))
    };
    let body = tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| "timed out".to_owned())??;
    let meta: Metadata =
        serde_json::from_slice(&body).map_err(|e| format!("not a discovery document: {e}"))?;
    if meta.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(format!("the document names issuer {:?}, not {issuer:?}", meta.issuer));
    }
    Ok(meta)
}
