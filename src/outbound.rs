//! The one outbound client shape (http or https with public roots, HTTP/1.1,
//! pooled) and one bounded exchange, for every call the proxy makes itself:
//! the authorization server, discovery, JWKS, introspection and trace export.
//! A leaf, so callers share it without depending on each other.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::BoxError;

pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// The outbound client for calls the proxy makes itself.
pub fn outbound_client<B>(connect_timeout: Duration) -> Result<HttpsClient<B>, rustls::Error>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let tls = crate::tls::client_config(&[])?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_timer(TokioTimer::new())
        .build(connector))
}

/// Why an exchange gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("reading the answer failed")]
    Body(#[source] BoxError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Sends `req` and reads the whole answer (at most `max` bytes) within `timeout`.
pub async fn exchange(
    client: &HttpsClient<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    max: usize,
) -> Result<(StatusCode, http::HeaderMap, Bytes), CallError> {
    let exchange = async {
        let resp = client.request(req).await.map_err(CallError::Request)?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, max).collect().await.map_err(CallError::Body)?.to_bytes();
        Ok((parts.status, parts.headers, body))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| CallError::Timeout(timeout))?
}
