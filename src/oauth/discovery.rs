//! OpenID Connect discovery: `{issuer}/.well-known/openid-configuration`, read
//! when the configuration names an issuer but not its endpoints (or keys). The
//! document's `issuer` must equal the configured one (OpenID Connect Discovery §4.3).

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use serde::Deserialize;

use crate::body::BoxError;

const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub jwks_uri: Option<String>,
    pub token_endpoint: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub end_session_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot set up the client")]
    Client(#[source] rustls::Error),
    #[error("bad discovery URL {url}")]
    Url {
        url: String,
        #[source]
        source: http::Error,
    },
    #[error("request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("reading {url} failed")]
    Body {
        url: String,
        #[source]
        source: BoxError,
    },
    #[error("{url} did not answer within {TIMEOUT:?}")]
    Timeout { url: String },
    #[error("{url} is not a discovery document")]
    Document {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the document names issuer {found:?}, not {expected:?}")]
    IssuerMismatch { found: String, expected: String },
    #[error("the discovery document has no usable jwks_uri")]
    NoJwksUri,
}

pub fn document_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

pub fn parse_uri(v: Option<&str>) -> Option<Uri> {
    v.and_then(|u| u.parse::<Uri>().ok()).filter(|u| matches!(u.scheme_str(), Some("http" | "https")))
}

/// Fetches and checks the discovery document of `issuer`.
pub async fn fetch(issuer: &str) -> Result<Metadata, DiscoveryError> {
    let client = super::outbound_client::<Empty<Bytes>>(TIMEOUT).map_err(DiscoveryError::Client)?;
    let url = document_url(issuer);
    let req = Request::get(&url)
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, "portcullis")
        .body(Empty::new())
        .map_err(|source| DiscoveryError::Url { url: url.clone(), source })?;
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|source| DiscoveryError::Request { url: url.clone(), source })?;
        if resp.status() != StatusCode::OK {
            return Err(DiscoveryError::Status { url: url.clone(), status: resp.status() });
        }
        Limited::new(resp.into_body(), MAX_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|source| DiscoveryError::Body { url: url.clone(), source })
    };
    let body = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| DiscoveryError::Timeout { url: url.clone() })??;
    let meta: Metadata = serde_json::from_slice(&body)
        .map_err(|source| DiscoveryError::Document { url: url.clone(), source })?;
    if meta.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(DiscoveryError::IssuerMismatch { found: meta.issuer, expected: issuer.to_owned() });
    }
    Ok(meta)
}
