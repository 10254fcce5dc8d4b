//! The upstream side of a request: the upstream request is written (hop-by-hop
//! removal, `X-Forwarded-*`, `Forwarded`, the proxy's cookies scrubbed, identity
//! headers from verified claims, `strip_prefix`), sent with timeouts, bodies
//! streamed both ways, `Upgrade` tunnelled, and failures classified into
//! 502 / 504 / 413.

pub mod headers;
pub mod identity;
pub mod tunnel;
pub mod upstream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::auth::Admitted;
use crate::body::{Body, BoxError};
use crate::config::RouteSettings;
use crate::conn::Conn;
use crate::route::strip_path;
use crate::target::Target;
use identity::IdentityHeaders;
use upstream::{Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("route {route}: upstream {authority} refused or failed the connection")]
    Connect {
        route: String,
        authority: String,
        #[source]
        source: BoxError,
    },
    #[error("route {route}: upstream {authority} did not connect in time")]
    ConnectTimeout { route: String, authority: String },
    #[error("route {route}: upstream {authority} did not answer within {timeout:?}")]
    Timeout { route: String, authority: String, timeout: Duration },
    #[error("route {route}: upstream {authority} failed the exchange")]
    Upstream {
        route: String,
        authority: String,
        #[source]
        source: BoxError,
    },
    #[error("route {route}: request body over {limit} bytes")]
    BodyTooLarge { route: String, limit: u64 },
}

/// What an opened tunnel watches: the revocations that may end it, and the metrics.
pub struct Tunnels<'a> {
    pub revocations: &'a std::sync::Arc<crate::auth::revocation::Revocations>,
    pub metrics: &'a std::sync::Arc<crate::metrics::Metrics>,
}

/// How one route forwards; built once per configuration.
pub struct Forwarder {
    name: String,
    max_tunnel_lifetime: Option<Duration>,
    path_prefix: String,
    strip_prefix: bool,
    timeout: Duration,
    max_request_body: Option<u64>,
    identity: IdentityHeaders,
    upstream: Upstream,
    h2: bool,
}

/// What happened upstream, for the access log and metrics.
pub struct Sent {
    pub response: Response<Body>,
    pub upstream_time: Duration,
}

impl Forwarder {
    pub fn new(route: &RouteSettings) -> Result<Self, rustls::Error> {
        Ok(Self {
            name: route.name.clone(),
            max_tunnel_lifetime: route.max_tunnel_lifetime,
            path_prefix: route.path_prefix.clone(),
            strip_prefix: route.strip_prefix,
            timeout: route.timeout,
            max_request_body: route.max_request_body,
            identity: IdentityHeaders::new(route),
            upstream: Upstream::new(&route.upstreams, &route.ca, route.connect_timeout, route.upstream_h2)?,
            h2: route.upstream_h2,
        })
    }

    /// Forwards `req` on behalf of an admitted caller. `own_cookies` are the
    /// proxy's cookie names, scrubbed from the `Cookie` header.
    pub async fn send(
        &self,
        req: Request<Incoming>,
        target: &Target,
        conn: &Conn,
        admitted: &Admitted,
        own_cookies: &[String],
        tunnels: &Tunnels<'_>,
    ) -> Result<Sent, ForwardError> {
        let route = || self.name.clone();
        let Some(backend) = self.upstream.pick() else {
            return Err(ForwardError::Connect {
                route: route(),
                authority: String::new(),
                source: "no upstream".into(),
            });
        };
        let authority = || backend.authority.to_string();

        if let Some(limit) = self.max_request_body {
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit) {
                return Err(ForwardError::BodyTooLarge { route: route(), limit });
            }
        }

        // An HTTP/2 upstream takes no HTTP/1.1 upgrade.
        let upgrade = if self.h2 { None } else { headers::upgrade_protocol(req.headers()) };
        let te_trailers = self.h2 && headers::asks_trailers(req.headers());

        let (mut parts, body) = req.into_parts();
        // The client's own origin-form target goes out unchanged when nothing
        // rewrites it (no allocation); otherwise the normalised, rebased one.
        parts.uri = match parts.uri.path_and_query() {
            Some(pq) if target.is_normal() && !self.strip_prefix && !backend.has_base() => pq.clone().into(),
            _ => {
                let path = target.path();
                let path = if self.strip_prefix { strip_path(&self.path_prefix, path) } else { path };
                backend.path_and_query(path, target.query()).into()
            }
        };
        parts.version = Version::HTTP_11;
        let h = &mut parts.headers;
        headers::remove_hop_by_hop(h);
        h.insert(header::HOST, backend.host().clone());
        if te_trailers {
            // The one TE value HTTP/2 allows; gRPC servers insist on it.
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(proto) = &upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, proto.clone());
        }
        // HeaderValue clones share their bytes: no allocation.
        headers::set_forwarded(h, conn, target.authority().cloned());
        headers::scrub_cookies(h, own_cookies);
        headers::join_cookies(h);
        self.identity.write(h, admitted);

        // Over HTTP/2 the body's error only resets the stream and the exchange
        // fails without it as a cause: the overrun is noted here instead.
        let overrun = self.max_request_body.map(|_| Arc::new(AtomicBool::new(false)));
        let body: Body = match (self.max_request_body, &overrun) {
            (Some(limit), Some(overrun)) => {
                let overrun = overrun.clone();
                Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
                    .map_err(move |e| {
                        if e.is::<LengthLimitError>() {
                            overrun.store(true, Ordering::Release);
                        }
                        e
                    })
                    .boxed()
            }
            _ => body.map_err(BoxError::from).boxed(),
        };
        let span = crate::trace::Child::start("upstream");
        let started = Instant::now();
        // Pinned here: the timeout holds a pointer, not a copy of the exchange's state.
        let exchange = std::pin::pin!(backend.send(Request::from_parts(parts, body)));
        let result = tokio::time::timeout(self.timeout, exchange).await;
        let upstream_time = started.elapsed();
        if let Some(span) = span {
            let mut attrs = vec![crate::trace::Attr::Authority("server.address", backend.authority.clone())];
            if let Ok(Ok(r)) = &result {
                attrs.push(crate::trace::Attr::Int(
                    "http.response.status_code",
                    i64::from(r.status().as_u16()),
                ));
            }
            let error = !matches!(&result, Ok(Ok(r)) if !r.status().is_server_error());
            span.end(error, attrs);
        }
        let mut resp = match result {
            Err(_) => {
                return Err(ForwardError::Timeout {
                    route: route(),
                    authority: authority(),
                    timeout: self.timeout,
                })
            }
            Ok(Err(e)) => {
                return Err(match (e, self.max_request_body) {
                    (e, Some(limit))
                        if e.body_too_large()
                            || overrun.as_ref().is_some_and(|o| o.load(Ordering::Acquire)) =>
                    {
                        ForwardError::BodyTooLarge { route: route(), limit }
                    }
                    (UpstreamError::ConnectTimeout, _) => {
                        ForwardError::ConnectTimeout { route: route(), authority: authority() }
                    }
                    (UpstreamError::Connect(io), _) if io.kind() == std::io::ErrorKind::TimedOut => {
                        ForwardError::ConnectTimeout { route: route(), authority: authority() }
                    }
                    (
                        e @ (UpstreamError::Connect(_) | UpstreamError::Tls(_) | UpstreamError::Handshake(_)),
                        _,
                    ) => {
                        ForwardError::Connect { route: route(), authority: authority(), source: Box::new(e) }
                    }
                    (e @ UpstreamError::Exchange(_), _) => {
                        ForwardError::Upstream { route: route(), authority: authority(), source: Box::new(e) }
                    }
                })
            }
            Ok(Ok(resp)) => resp,
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The client's connection completes the upgrade once the 101 is written.
            if upgrade.is_some() {
                let t = tunnel::Tunnel::new(
                    hyper::upgrade::on(&mut resp),
                    admitted,
                    self.max_tunnel_lifetime,
                    tunnels.revocations.clone(),
                    tunnels.metrics.clone(),
                );
                conn.offer_upgrade(Box::new(move |client| tunnel::splice(client, t)));
            }
        } else {
            headers::remove_hop_by_hop(resp.headers_mut());
        }
        let response = resp.map(|b| b.map_err(BoxError::from).boxed());
        Ok(Sent { response, upstream_time })
    }
}
