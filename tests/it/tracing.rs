//! W3C trace context and OTLP export (SPEC §3 `[tracing]`, §4 "Tracing"),
//! against a real OTLP/HTTP receiver ([`Collector`]) decoding the protobuf.

use crate::kit::collector::{attr, hex, Span};
use crate::kit::idp::{AUDIENCE, CLIENT_SECRET};
use crate::kit::session::{self, Opts};
use crate::kit::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// SpanKind SERVER and CLIENT in OTLP.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn traceparent(flags: &str) -> String {
    format!("00-{TRACE}-{CLIENT_SPAN}-{flags}")
}

fn tracing_table(endpoint: &str, ratio: f64) -> String {
    format!(
        "\n[tracing]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"edge-test\"\nsample_ratio = {ratio}\n"
    )
}

fn open_route(up: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"open\"\npath_prefix = \"/open\"\nupstream = \"{}\"\nauth = \"none\"\n",
        up.url()
    )
}

/// (trace id, parent span id, flags) of a `traceparent` value.
fn split(tp: &str) -> (String, String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp}");
    assert_eq!(tp.len(), 55, "traceparent {tp}");
    (parts[1].to_owned(), parts[2].to_owned(), parts[3].to_owned())
}

fn server_span_of(trace: &str) -> impl Fn(&Span) -> bool + '_ {
    move |s| hex(&s.trace_id) == trace && s.kind == SERVER
}

#[tokio::test]
async fn an_incoming_traceparent_is_continued_and_the_upstream_sees_the_proxy_span() {
    let collector = Collector::start().await;
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let toml = Config::new()
        .table(idp.issuer_table())
        .table(api_route(&up))
        .raw(&tracing_table(&collector.url(), 1.0))
        .toml();
    let proxy = Proxy::start(&toml).await;
    wait_ready(&proxy).await;
    let token = idp.access_token("alice", 300);

    let r = get(proxy.url("/api/orders"))
        .bearer(&token)
        .header("traceparent", traceparent("01"))
        .header("tracestate", "vendor=opaque")
        .send()
        .await;
    let echo = r.echo();
    let sent = echo.header_all("traceparent");
    assert_eq!(sent.len(), 1, "exactly one traceparent upstream: {sent:?}");
    let (trace, parent, flags) = split(sent[0]);
    assert_eq!(trace, TRACE, "the upstream continues the client's trace");
    assert_ne!(parent, CLIENT_SPAN, "the client's span id is replaced by the proxy's");
    assert_eq!(flags, "01");
    assert_eq!(echo.header("tracestate"), Some("vendor=opaque"), "tracestate goes on with its trace");

    let server = collector.wait_for("the server span", server_span_of(TRACE)).await;
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN, "the server span's parent is the client's span");
    assert_eq!(hex(&server.span_id), parent, "the upstream's parent is the exported server span");
    assert_eq!(attr(&server, "portcullis.route").as_deref(), Some("api"));
    assert_eq!(attr(&server, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(attr(&server, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(&server, "enduser.id").as_deref(), Some("alice"));

    let upstream = collector
        .wait_for("the upstream call's span", |s| hex(&s.trace_id) == TRACE && s.name == "upstream")
        .await;
    assert_eq!(upstream.kind, CLIENT);
    assert_eq!(upstream.parent_span_id, server.span_id, "the upstream call is a child of the server span");
    assert_eq!(attr(&upstream, "server.address"), Some(up.addr().to_string()));
    assert!(collector.services().iter().all(|s| s == "edge-test"), "{:?}", collector.services());

    let raw = collector.raw();
    assert!(!contains(&raw, &token), "the token is not exported");
    assert!(!contains(&raw, AUDIENCE) && !contains(&raw, "orders:read"), "no claim but sub is exported");
}

#[tokio::test]
async fn a_request_without_traceparent_starts_a_trace_and_loses_its_tracestate() {
    let up = Upstream::start().await;
    // No [tracing]: the context is kept all the same.
    let proxy = Proxy::start(&open_route(&up)).await;
    for bad in [
        None,
        Some("00-zz-00f067aa0ba902b7-01"),
        Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
    ] {
        let mut req = get(proxy.url("/open/x")).header("tracestate", "vendor=stale");
        if let Some(b) = bad {
            req = req.header("traceparent", b);
        }
        let echo = req.send().await.echo();
        let (trace, parent, flags) = split(echo.header("traceparent").expect("a traceparent upstream"));
        assert_ne!(trace, "0".repeat(32), "{bad:?}");
        assert_ne!(parent, "0".repeat(16));
        assert_eq!(flags, "01", "without [tracing] a new trace is marked sampled for the upstream");
        assert_eq!(echo.header("tracestate"), None, "a new trace carries no stale tracestate ({bad:?})");
    }
}

#[tokio::test]
async fn sample_ratio_applies_to_new_traces_and_an_incoming_decision_is_honoured() {
    let collector = Collector::start().await;
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!("{}{}", open_route(&up), tracing_table(&collector.url(), 0.0))).await;

    // A new trace at ratio 0: not sampled, and the upstream is told so.
    let echo = get(proxy.url("/open/new")).send().await.echo();
    let (new_trace, _, flags) = split(echo.header("traceparent").unwrap());
    assert_eq!(flags, "00");
    // The client decided "not sampled": honoured.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let echo = get(proxy.url("/open/unsampled"))
        .header("traceparent", format!("00-{unsampled}-b7ad6b7169203331-00"))
        .send()
        .await
        .echo();
    assert_eq!(split(echo.header("traceparent").unwrap()).2, "00");
    // The client decided "sampled": recorded whatever the ratio.
    let echo = get(proxy.url("/open/sampled")).header("traceparent", traceparent("01")).send().await.echo();
    assert_eq!(split(echo.header("traceparent").unwrap()).2, "01");

    collector.wait_for("the sampled request's server span", server_span_of(TRACE)).await;
    // Spans are queued in order: what came before the sampled one has been sent.
    let traces: Vec<String> = collector.spans().iter().map(|s| hex(&s.trace_id)).collect();
    assert!(!traces.contains(&new_trace), "a new trace at sample_ratio 0 is not exported");
    assert!(!traces.contains(&unsampled.to_owned()), "an unsampled incoming trace is not exported");
}

#[tokio::test]
async fn a_transparent_refresh_is_a_child_span_and_no_secret_is_exported() {
    let collector = Collector::start().await;
    let o = Opts { routes: tracing_table(&collector.url(), 1.0), ..Opts::default() };
    let (idp, _up, proxy) = session::setup(&o).await;
    idp.set_access_ttl(10); // within refresh_ahead: the next request refreshes
    let (login, jar) = session::login(&proxy, "alice").await;
    idp.set_access_ttl(300);

    let r = jar.on(get(proxy.url("/api/orders"))).header("traceparent", traceparent("01")).send().await;
    let forwarded = session::forwarded_token(&r);
    assert_eq!(session::token_calls(&idp), 1, "the request refreshed");

    let server = collector.wait_for("the server span", server_span_of(TRACE)).await;
    let refresh = collector
        .wait_for("the refresh call's span", |s| hex(&s.trace_id) == TRACE && s.name == "refresh")
        .await;
    assert_eq!(refresh.parent_span_id, server.span_id, "the refresh is a child of the request's span");
    assert_eq!(refresh.kind, CLIENT);
    assert_eq!(attr(&refresh, "portcullis.outcome").as_deref(), Some("ok"));
    assert_eq!(attr(&server, "enduser.id").as_deref(), Some("alice"));
    collector.wait_for("the upstream span", |s| hex(&s.trace_id) == TRACE && s.name == "upstream").await;
    // The login request is exported too (a new trace, ratio 1.0).
    collector
        .wait_for("the login's span", |s| attr(s, "portcullis.route").as_deref() == Some("session"))
        .await;

    let mut secrets = vec![forwarded.clone(), CLIENT_SECRET.to_owned(), session::PASSWORD.to_owned()];
    secrets.extend(jar.values());
    secrets.extend(jar.clone().after(&r).values());
    secrets.extend(jar.clone().after(&login).values());
    let raw = collector.raw();
    assert!(contains(&raw, "alice"), "the scan reads what was exported (sub is there)");
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(!contains(&raw, s), "a secret ({} bytes) was exported", s.len());
    }
    // The test IdP's refresh tokens are `rt-…`; claims other than sub must not appear.
    for needle in ["rt-", AUDIENCE, "orders:read", "jti-", &idp.issuer()] {
        assert!(!contains(&raw, needle), "{needle:?} was exported");
    }
}

#[tokio::test]
async fn a_passthrough_login_and_the_logouts_revocation_are_child_spans() {
    let collector = Collector::start().await;
    let o = Opts { routes: tracing_table(&collector.url(), 1.0), ..Opts::default() };
    let (idp, _up, proxy) = session::setup(&o).await;
    const LOGIN_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const LOGOUT_TRACE: &str = "1bf7651916cd43dd8448eb211c80319d";
    let tp = |trace: &str| format!("00-{trace}-{CLIENT_SPAN}-01");

    let r = post(proxy.url("/auth/login"), session::login_body("alice", session::PASSWORD))
        .header("content-type", "application/json")
        .header("origin", session::own_origin(&proxy))
        .header("traceparent", tp(LOGIN_TRACE))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let jar = session::Jar::default().after(&r);
    let server = collector.wait_for("the login's server span", server_span_of(LOGIN_TRACE)).await;
    let login = collector
        .wait_for("the login call's span", |s| hex(&s.trace_id) == LOGIN_TRACE && s.name == "login")
        .await;
    assert_eq!(login.parent_span_id, server.span_id);
    assert_eq!(login.kind, CLIENT);
    assert_eq!(attr(&login, "portcullis.outcome").as_deref(), Some("ok"));

    let r = jar
        .on(post(proxy.url("/auth/logout"), ""))
        .header("origin", session::own_origin(&proxy))
        .header("traceparent", tp(LOGOUT_TRACE))
        .send()
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(session::revoke_calls(&idp), 1);
    let server = collector.wait_for("the logout's server span", server_span_of(LOGOUT_TRACE)).await;
    let revocation = collector
        .wait_for("the revocation's span", |s| hex(&s.trace_id) == LOGOUT_TRACE && s.name == "revocation")
        .await;
    assert_eq!(revocation.parent_span_id, server.span_id);
    assert_eq!(attr(&revocation, "portcullis.outcome").as_deref(), Some("ok"));
}

#[tokio::test]
async fn an_unknown_kid_refetch_is_a_child_span() {
    let collector = Collector::start().await;
    let idp = TestIdp::start().await;
    // Only the unknown-kid refetch can bring the new key in.
    idp.set_jwks_cache_control(Some("max-age=3600"));
    let up = Upstream::start().await;
    let toml = Config::new()
        .table(idp.issuer_table())
        .table(api_route(&up))
        .raw(&tracing_table(&collector.url(), 1.0))
        .toml();
    let proxy = Proxy::start(&toml).await;
    wait_ready(&proxy).await;
    idp.set_keys(&["rsa1", "rsa2"]);
    let token = sign("rsa2", &idp.claims("dave", 300));
    let r = get(proxy.url("/api/x")).bearer(&token).header("traceparent", traceparent("01")).send().await;
    assert_eq!(r.status, 200, "{}", r.text());

    let server = collector.wait_for("the server span", server_span_of(TRACE)).await;
    let jwks =
        collector.wait_for("the JWKS fetch's span", |s| hex(&s.trace_id) == TRACE && s.name == "jwks").await;
    assert_eq!(jwks.parent_span_id, server.span_id);
    assert_eq!(attr(&jwks, "portcullis.issuer").as_deref(), Some("main"));
    assert_eq!(attr(&jwks, "portcullis.outcome").as_deref(), Some("ok"));
}

#[tokio::test]
async fn an_introspection_call_is_a_child_span_without_the_token() {
    use crate::kit::introspect::{active, opaque_token, CLIENT_SECRET as INTROSPECT_SECRET, SECRET_ENV};
    let collector = Collector::start().await;
    let ins = IntrospectionServer::start().await;
    let up = Upstream::start().await;
    let route = format!(
        "[[routes]]\nname = \"legacy\"\npath_prefix = \"/api\"\nupstream = \"{}\"\nissuer = \"legacy\"\n",
        up.url()
    );
    let toml = Config::new()
        .table(ins.issuer_table("legacy", ""))
        .raw(&route)
        .raw(&tracing_table(&collector.url(), 1.0))
        .toml();
    let env = std::collections::HashMap::from([(SECRET_ENV.to_owned(), INTROSPECT_SECRET.to_owned())]);
    let proxy = Proxy::start_with(&toml, &env, std::path::Path::new(".")).await;
    wait_ready(&proxy).await;
    let token = opaque_token();
    ins.set(&token, active("erin", 300));
    let r = get(proxy.url("/api/x")).bearer(&token).header("traceparent", traceparent("01")).send().await;
    assert_eq!(r.status, 200, "{}", r.text());

    let server = collector.wait_for("the server span", server_span_of(TRACE)).await;
    let call = collector
        .wait_for("the introspection's span", |s| hex(&s.trace_id) == TRACE && s.name == "introspection")
        .await;
    assert_eq!(call.parent_span_id, server.span_id);
    assert_eq!(attr(&call, "portcullis.outcome").as_deref(), Some("active"));
    assert_eq!(attr(&server, "enduser.id").as_deref(), Some("erin"));
    let raw = collector.raw();
    for secret in [token.as_str(), INTROSPECT_SECRET, "erin-name", "legacy-spa"] {
        assert!(!contains(&raw, secret), "{secret:?} was exported");
    }
}

#[tokio::test]
async fn an_unreachable_collector_changes_no_answer_and_counts_export_errors() {
    let down = Refused::reserve();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!("{}{}", open_route(&up), tracing_table(&down.url(), 1.0))).await;
    for i in 0..20 {
        let r = get(proxy.url(&format!("/open/{i}"))).send().await;
        assert_eq!(r.echo().path, format!("/open/{i}"));
    }
    let series = "portcullis_trace_export_errors_total";
    eventually("dropped spans are counted", DEADLINE, || async { metric(&proxy, series).await >= 1.0 }).await;
}

#[tokio::test]
async fn a_collector_that_never_answers_does_not_slow_requests() {
    // Connections to it are never accepted: an export waits for its timeout.
    let hole = Blackhole::start().await;
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!("{}{}", open_route(&up), tracing_table(&hole.url(), 1.0))).await;
    let started = std::time::Instant::now();
    for i in 0..50 {
        assert_eq!(get(proxy.url(&format!("/open/{i}"))).send().await.status, 200);
    }
    // The export timeout is 5 s: requests that waited on it could not all be done sooner.
    assert!(started.elapsed() < std::time::Duration::from_secs(4), "took {:?}", started.elapsed());
    let series = "portcullis_trace_export_errors_total";
    eventually("spans of the stuck export are counted", DEADLINE, || async {
        metric(&proxy, series).await >= 1.0
    })
    .await;
}

#[tokio::test]
async fn the_access_log_carries_the_trace_id() {
    let up = Upstream::start().await;
    let proxy = ProxyProcess::start(&open_route(&up)).await;
    let r = get(proxy.url("/open/continued")).header("traceparent", traceparent("01")).send().await;
    assert_eq!(r.status, 200);
    let echo = get(proxy.url("/open/new")).send().await.echo();
    let (new_trace, _, _) = split(echo.header("traceparent").unwrap());
    let logged = |trace: &str| {
        proxy
            .log()
            .lines()
            .any(|l| l.contains("portcullis::access") && l.contains(&format!("trace_id={trace}")))
    };
    eventually("both access log lines name their trace", DEADLINE, || async {
        logged(TRACE) && logged(&new_trace)
    })
    .await;
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn a_reload_that_changes_tracing_says_it_needs_a_restart() {
    let collector = Collector::start().await;
    let up = Upstream::start().await;
    let proxy =
        ProxyProcess::start(&format!("{}{}", open_route(&up), tracing_table(&collector.url(), 1.0))).await;
    proxy.reload(&format!("{}{}", open_route(&up), tracing_table(&collector.url(), 0.5))).await;
    eventually("the reload names [tracing] as start-only", DEADLINE, || async {
        proxy.log().contains("[tracing] changed; it takes effect only on restart")
    })
    .await;
    // The running exporter stays: a request is still exported.
    let r = get(proxy.url("/open/after")).header("traceparent", traceparent("01")).send().await;
    assert_eq!(r.status, 200);
    collector.wait_for("the server span after the reload", server_span_of(TRACE)).await;
}

#[tokio::test]
async fn spans_of_the_last_requests_are_sent_before_exit() {
    let collector = Collector::start().await;
    let up = Upstream::start().await;
    let mut proxy =
        ProxyProcess::start(&format!("{}{}", open_route(&up), tracing_table(&collector.url(), 1.0))).await;
    let r = get(proxy.url("/open/last")).header("traceparent", traceparent("01")).send().await;
    assert_eq!(r.status, 200);
    // At once: sooner than a batch would go out by itself.
    proxy.signal("TERM");
    assert!(proxy.wait_exit(DEADLINE).await.success());
    assert!(
        collector.spans().iter().any(server_span_of(TRACE)),
        "the span was flushed on shutdown; log:\n{}",
        proxy.log()
    );
}
