//! The little HTTP the demo's own servers need: an accept loop, answers, forms.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::Body;

pub type Answer = Response<Body>;

/// Bodies the demo servers accept.
const MAX_BODY: usize = 64 * 1024;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    crate::body::full(bytes)
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Answer {
    crate::body::json_response(status, value)
}

pub fn html(status: StatusCode, body: &str) -> Answer {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>portcullis demo</title>\
<style>body{{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:40rem;padding:0 1rem}}\
label{{display:block;margin:.5rem 0}}.error{{color:#a11}}td{{padding:.1rem .8rem .1rem 0}}</style></head><body>{body}</body></html>"
    );
    let mut r = Response::new(full(page));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

pub fn redirect(to: &str) -> Answer {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::try_from(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

pub async fn read_body(req: Request<Incoming>) -> Option<Bytes> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    limited.collect().await.ok().map(|c| c.to_bytes())
}

pub fn form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// Serves `listener` until the process ends, each request answered by `handle`.
pub fn serve<H, F>(listener: TcpListener, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handle = handle.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handle(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// POSTs a form to a plain-HTTP URL on this machine; the answer's status.
pub async fn post_form(
    url: &str,
    pairs: &[(&str, &str)],
) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().ok_or("no authority")?.clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
    let req = Request::post(uri.path())
        .header(header::HOST, authority.as_str())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(full(body))?;
    let resp = sender.send_request(req).await?;
    Ok(resp.status())
}
