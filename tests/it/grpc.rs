//! HTTP/2 upstreams and gRPC (SPEC §4 "HTTP/2 upstreams and gRPC", "WebSocket and
//! long-lived streams"): a tonic client reaches the proxy over TLS with ALPN `h2`
//! and a tonic server behind a route with `upstream_protocol = "h2"` (prior
//! knowledge over http, ALPN over https). Calls arrive with the proxy's identity
//! headers and `TE: trailers`, replies stream as they are sent, trailers pass both
//! ways, the proxy's own refusals are gRPC statuses, and many client connections
//! share a few upstream ones. Also server-sent events from an HTTP/1.1 upstream,
//! passed on event by event.

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tonic::{Code, Request, Status};

use crate::kit::grpc::{CountRequest, GrpcClient, GrpcUpstream, Seen, WhoRequest, PROBE};
use crate::kit::*;

/// The name the proxy's certificate is for.
const SNI: &str = "grpc.example.com";

struct Site {
    proxy: Proxy,
    idp: TestIdp,
    up: GrpcUpstream,
    /// Over TLS, its certificate from the same CA (the route's `ca_file`).
    secure: GrpcUpstream,
    ca: TestCa,
    echo: Upstream,
    _down: Refused,
    _dir: TempDir,
}

/// Routes, all needing a token of issuer "main": `portcullis.test.Probe` (scope
/// `orders:read`, `X-User-Id` from `sub`), `portcullis.test.Admin` (scope
/// `probe:admin`, which the IdP's tokens lack), `portcullis.test.Down` (an upstream
/// that refuses connections), `portcullis.test.Secure` (an https upstream), `portcullis.test.Small` (`max_request_body = "1KB"`),
/// all over HTTP/2; `/feed` to an HTTP/1.1 echo.
/// `[listen]` on http, https and admin, with a certificate for [`SNI`] from `ca`.
fn tls_listen(ca: &TestCa, dir: &TempDir) -> String {
    let (cert, key) = ca.issue(&[SNI]).write_to(dir, "proxy");
    format!(
        r#"
[listen]
http = "127.0.0.1:0"
https = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tls]
cert = "{cert}"
key = "{key}"
"#
    )
}

async fn site() -> Site {
    let idp = TestIdp::start().await;
    let up = GrpcUpstream::start().await;
    let echo = Upstream::start().await;
    let down = Refused::reserve();
    let ca = TestCa::new();
    let dir = TempDir::new();
    let listen = tls_listen(&ca, &dir);
    let secure = GrpcUpstream::start_tls(&ca.issue(&["127.0.0.1"])).await;
    let routes = format!(
        r#"
[[routes]]
name = "probe"
path_prefix = "/{PROBE}"
upstream = "{up}"
upstream_protocol = "h2"
issuer = "main"
scopes = ["orders:read"]
[routes.identity_headers]
"X-User-Id" = "sub"

[[routes]]
name = "admin"
path_prefix = "/portcullis.test.Admin"
upstream = "{up}"
upstream_protocol = "h2"
issuer = "main"
scopes = ["probe:admin"]

[[routes]]
name = "down"
path_prefix = "/portcullis.test.Down"
upstream = "{down}"
upstream_protocol = "h2"
issuer = "main"

[[routes]]
name = "secure"
path_prefix = "/portcullis.test.Secure"
upstream = "{secure}"
ca_file = "{ca_file}"
upstream_protocol = "h2"
issuer = "main"
[routes.identity_headers]
"X-User-Id" = "sub"

[[routes]]
name = "small"
path_prefix = "/portcullis.test.Small"
upstream = "{up}"
upstream_protocol = "h2"
issuer = "main"
max_request_body = "1KB"

[[routes]]
name = "feed"
path_prefix = "/feed"
upstream = "{echo}"
issuer = "main"

[[routes]]
name = "limited"
path_prefix = "/portcullis.test.Limited"
upstream = "{up}"
upstream_protocol = "h2"
issuer = "main"

[[rate_limits]]
name = "one-a-minute"
key = "sub"
rate = "1/m"
burst = 1
routes = ["limited"]
"#,
        up = up.url(),
        down = down.url(),
        echo = echo.url(),
        secure = secure.url(),
        ca_file = ca.write_to(&dir, "ca.pem"),
    );
    let issuer = idp.issuer_table().set("jwks_refresh", "1h");
    let toml = Config::new().raw(&listen).table(issuer).raw(&routes).toml();
    let proxy = Proxy::start(&toml).await;
    wait_ready(&proxy).await;
    Site { proxy, idp, up, secure, ca, echo, _down: down, _dir: dir }
}

impl Site {
    async fn client(&self) -> GrpcClient {
        GrpcClient::connect(self.proxy.https_addr(), SNI, &self.ca).await
    }

    fn token(&self, sub: &str) -> String {
        self.idp.access_token(sub, 300)
    }
}

fn with_bearer<T>(mut req: Request<T>, token: &str) -> Request<T> {
    let value = format!("Bearer {token}").parse().expect("metadata value");
    req.metadata_mut().insert("authorization", value);
    req
}

/// What every call through the proxy must have brought to the upstream.
fn assert_forwarded_as_alice(seen: &Seen, site: &Site) {
    assert_eq!(seen.version, "HTTP/2.0", "{seen:?}");
    assert_eq!(seen.header_all("x-user-id"), ["alice"], "{seen:?}");
    assert_eq!(seen.header("te"), Some("trailers"), "gRPC servers insist on TE: trailers: {seen:?}");
    assert!(seen.header("content-type").is_some_and(|c| c.starts_with("application/grpc")), "{seen:?}");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{seen:?}");
    assert_eq!(format!("http://{}", seen.authority), site.up.url(), "{seen:?}");
}

#[tokio::test]
async fn unary_call_reaches_the_h2_upstream_with_identity_and_its_trailers_reach_the_client() {
    let s = site().await;
    let mut c = s.client().await;
    let mut req = with_bearer(Request::new(WhoRequest { note: "hello".into() }), &s.token("alice"));
    // A client's own identity claim is never passed on.
    req.metadata_mut().insert("x-user-id", "mallory".parse().expect("metadata value"));
    let resp = c.who(PROBE, req).await.expect("the call succeeds");
    // tonic merges the trailers into the unary response's metadata.
    let md = resp.metadata().clone();
    assert_eq!(md.get("x-probe-trailer").and_then(|v| v.to_str().ok()), Some("who"), "{md:?}");
    let seen = resp.into_inner();
    assert_eq!(seen.note, "hello");
    assert_forwarded_as_alice(&seen, &s);
    assert!(seen.header("authorization").is_some_and(|a| a.starts_with("Bearer ")), "{seen:?}");
    assert_eq!(s.up.connections(), 1);
}

#[tokio::test]
async fn server_streaming_replies_arrive_as_sent_and_end_with_the_upstream_trailers() {
    let s = site().await;
    let mut c = s.client().await;
    let token = s.token("alice");

    let req = with_bearer(Request::new(CountRequest { n: 3, code: 0, gated: true }), &token);
    let mut stream = c.count(PROBE, req).await.expect("the call starts").into_inner();
    let mut got = Vec::new();
    for i in 0..3 {
        // The upstream sends reply i + 1 only once reply i has reached the client:
        // a proxy that buffered the stream would never deliver it.
        let reply = stream.message().await.expect("a reply").expect("not the end yet");
        assert_eq!(reply.i, i);
        got.push(reply);
        s.up.next();
    }
    assert_eq!(stream.message().await.expect("a clean end"), None);
    let trailers = stream.trailers().await.expect("trailers").expect("trailers were sent");
    assert_eq!(trailers.get("grpc-status").and_then(|v| v.to_str().ok()), Some("0"), "{trailers:?}");
    assert_eq!(trailers.get("x-probe-trailer").and_then(|v| v.to_str().ok()), Some("count"));
    assert_forwarded_as_alice(got[0].seen.as_ref().expect("the first reply reports the request"), &s);

    // A stream the upstream ends with an error status: replies, then the status and
    // its metadata, all from the trailers.
    let req =
        with_bearer(Request::new(CountRequest { n: 2, code: Code::Aborted as i32, gated: false }), &token);
    let mut stream = c.count(PROBE, req).await.expect("the call starts").into_inner();
    assert_eq!(stream.message().await.expect("reply 0").map(|r| r.i), Some(0));
    assert_eq!(stream.message().await.expect("reply 1").map(|r| r.i), Some(1));
    let end = stream.message().await.expect_err("the stream ends with the upstream's status");
    assert_eq!((end.code(), end.message()), (Code::Aborted, "count ended"), "{end:?}");
    let md = end.metadata();
    assert_eq!(md.get("x-probe-final").and_then(|v| v.to_str().ok()), Some("done"), "{md:?}");
    assert_eq!(md.get("x-probe-trailer").and_then(|v| v.to_str().ok()), Some("count"), "{md:?}");
}

#[tokio::test]
async fn an_https_upstream_is_spoken_to_in_h2_chosen_by_alpn() {
    let s = site().await;
    let mut c = s.client().await;
    let req = with_bearer(Request::new(WhoRequest { note: "tls".into() }), &s.token("alice"));
    let resp = c.who("portcullis.test.Secure", req).await.expect("the call succeeds");
    assert_eq!(resp.metadata().get("x-probe-trailer").and_then(|v| v.to_str().ok()), Some("who"));
    let seen = resp.into_inner();
    assert_eq!((seen.version.as_str(), seen.note.as_str()), ("HTTP/2.0", "tls"), "{seen:?}");
    assert_eq!(seen.header_all("x-user-id"), ["alice"], "{seen:?}");
    assert_eq!(seen.header("te"), Some("trailers"), "{seen:?}");
    assert_eq!(format!("https://{}", seen.authority), s.secure.url(), "{seen:?}");
    assert_eq!(s.secure.alpn(), ["h2"]);
}

#[tokio::test]
async fn request_trailers_reach_the_h2_upstream() {
    let s = site().await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static("abc123"));
    let frames = vec![Ok(Frame::data(Bytes::from_static(b"payload"))), Ok(Frame::trailers(trailers))];
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let req = request("POST", format!("https://{SNI}/{PROBE}/Trailers"))
        .bearer(&s.token("alice"))
        .header("te", "trailers")
        .stream(body)
        .into_request();
    let tls = tls_connect(s.proxy.https_addr(), SNI, s.ca.client_config(&["h2"])).await.expect("TLS");
    let reply = send_over(tls, req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-got-x-checksum"), Some("abc123"), "{:?}", reply.headers);
}

/// The proxy's own answer to a gRPC call: the status, and its reason in `grpc-message`.
/// (tonic alone would map a bare HTTP 401 to UNAUTHENTICATED too; the proxy's error
/// code in the message shows the answer was a gRPC one.)
fn assert_refused(result: Result<tonic::Response<Seen>, Status>, code: Code, reason: &str) {
    let status = result.expect_err("the proxy refuses the call");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().starts_with(&format!("{reason}: ")), "grpc-message: {status:?}");
}

#[tokio::test]
async fn calls_the_proxy_refuses_get_grpc_statuses_with_the_reason() {
    let s = site().await;
    let mut c = s.client().await;
    let who = || Request::new(WhoRequest::default());

    assert_refused(c.who(PROBE, who()).await, Code::Unauthenticated, "missing_token");
    assert_refused(
        c.who(PROBE, with_bearer(who(), "not.a.jwt")).await,
        Code::Unauthenticated,
        "invalid_token",
    );
    let token = s.token("alice");
    let wrong_scope = c.who("portcullis.test.Admin", with_bearer(who(), &token)).await;
    assert_refused(wrong_scope, Code::PermissionDenied, "insufficient_scope");
    assert_refused(
        c.who("portcullis.test.Down", with_bearer(who(), &token)).await,
        Code::Unavailable,
        "bad_gateway",
    );
    assert_refused(
        c.who("portcullis.test.Nowhere", with_bearer(who(), &token)).await,
        Code::Unimplemented,
        "no_route",
    );

    // A burst towards the dead upstream: every call is refused, also those that
    // waited on another call's connection attempt.
    let burst = (0..8).map(|_| {
        let mut c = c.clone();
        let req = with_bearer(who(), &token);
        async move { c.who("portcullis.test.Down", req).await }
    });
    for result in futures_util::future::join_all(burst).await {
        assert_refused(result, Code::Unavailable, "bad_gateway");
    }

    assert_eq!(s.up.connections(), 0, "no refused call reached the upstream");
    // gRPC clients declare no length: the limit is found while the body streams
    // (so this one has begun to reach the upstream).
    let big = with_bearer(Request::new(WhoRequest { note: "x".repeat(4000) }), &token);
    assert_refused(c.who("portcullis.test.Small", big).await, Code::ResourceExhausted, "body_too_large");
    // The same connection still carries calls that are let through.
    c.who(PROBE, with_bearer(who(), &token)).await.expect("an admitted call on the same connection");

    // Over a rate limit: UNAVAILABLE (retry later), with the reason.
    let limited = "portcullis.test.Limited";
    c.who(limited, with_bearer(who(), &token)).await.expect("the first call fits the bucket");
    assert_refused(c.who(limited, with_bearer(who(), &token)).await, Code::Unavailable, "rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_client_connections_share_at_most_four_upstream_connections() {
    let s = site().await;
    let token = s.token("alice");
    let mut clients = Vec::with_capacity(64);
    for _ in 0..64 {
        clients.push(s.client().await);
    }
    // Every call is held at the upstream until all 64 are in: 64 streams in flight
    // at once, from 64 client connections.
    let calls: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let req = with_bearer(Request::new(WhoRequest::default()), &token);
            tokio::spawn(async move { c.hold(PROBE, req).await })
        })
        .collect();
    s.up.wait_held(64).await;
    let open = metric(&s.proxy, "portcullis_open_connections").await;
    assert!(open >= 64.0, "the proxy has {open} client connections open");
    let upstream = s.up.connections();
    assert!((1..=4).contains(&upstream), "64 concurrent calls opened {upstream} upstream connections");
    s.up.release();
    for call in calls {
        call.await.expect("call task").expect("every held call succeeds");
    }
    assert_eq!(s.up.connections(), upstream, "no connection was opened after the burst");
}

/// Reads `body` until its text so far ends with `until`; fails after [`DEADLINE`].
async fn read_until<B>(body: &mut B, until: &str) -> String
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut text = String::new();
    let read = async {
        while !text.ends_with(until) {
            let frame = body.frame().await.expect("the stream goes on").expect("no body error");
            if let Some(data) = frame.data_ref() {
                text.push_str(std::str::from_utf8(data).expect("UTF-8 events"));
            }
        }
    };
    if tokio::time::timeout(DEADLINE, read).await.is_err() {
        panic!("{until:?} did not arrive; so far: {text:?}");
    }
    text
}

#[tokio::test]
async fn server_sent_events_from_an_http1_upstream_pass_through_event_by_event() {
    let s = site().await;
    let token = s.token("alice");
    for client in ["HTTP/2", "HTTP/1.1"] {
        // One stream at a time: both would wait on the same gate.
        let resp = if client == "HTTP/2" {
            let tls = tls_connect(s.proxy.https_addr(), SNI, s.ca.client_config(&["h2"])).await.expect("TLS");
            assert_eq!(alpn(&tls).as_deref(), Some("h2"));
            open_over(tls, get(format!("https://{SNI}/feed/events")).bearer(&token).into_request()).await
        } else {
            get(s.proxy.url("/feed/events")).bearer(&token).send_streaming().await
        };
        assert_eq!(resp.status(), 200, "{client}");
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok());
        assert_eq!(ct, Some("text/event-stream"), "{client}");
        let mut body = resp.into_body();
        // The upstream sends event 2 only after event 1 has reached the client.
        assert_eq!(read_until(&mut body, "\n\n").await, "id: 1\ndata: one\n\n", "{client}");
        s.echo.open_gate();
        assert_eq!(read_until(&mut body, "\n\n").await, "id: 2\ndata: two\n\n", "{client}");
        let rest = Reply::read(http::Response::new(body)).await.expect("the stream ends cleanly");
        assert!(rest.body.is_empty(), "{client}: nothing after the last event: {:?}", rest.body);
    }
}

#[tokio::test]
async fn a_call_before_the_issuers_keys_load_is_unavailable_with_keys_unavailable() {
    let idp = TestIdp::start().await;
    let up = GrpcUpstream::start().await;
    let dark = Refused::reserve();
    let ca = TestCa::new();
    let dir = TempDir::new();
    let toml = format!(
        r#"{listen}
[[issuers]]
name = "main"
issuer = "{issuer}"
jwks_url = "{dark}/jwks.json"

[[routes]]
name = "probe"
path_prefix = "/{PROBE}"
upstream = "{up}"
upstream_protocol = "h2"
issuer = "main"
"#,
        listen = tls_listen(&ca, &dir),
        issuer = idp.issuer(),
        dark = dark.url(),
        up = up.url(),
    );
    let proxy = Proxy::start(&toml).await;
    let mut c = GrpcClient::connect(proxy.https_addr(), SNI, &ca).await;
    let token = idp.access_token("alice", 300);
    let result = c.who(PROBE, with_bearer(Request::new(WhoRequest::default()), &token)).await;
    // The client should retry: UNAVAILABLE, not UNAUTHENTICATED (the token may be fine).
    assert_refused(result, Code::Unavailable, "keys_unavailable");
    assert_eq!(up.connections(), 0);
}
