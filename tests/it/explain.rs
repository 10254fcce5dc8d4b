//! `portcullis check --config FILE --explain "METHOD URL"` (SPEC §2), the real binary:
//! one fact per line — the route (or `no route` and its 404), its auth mode and
//! issuers, the deciding rule with its number and line (or the route policy) and what
//! it requires, and the upstream URL after `strip_prefix` — read from the file alone.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::kit::*;

/// A file whose key sources and introspection endpoint are `jwks` and `introspect`
/// (URLs nothing answers on): route "orders" (its `[[routes]]` on [`ROUTE_LINE`])
/// with three rules, and route "public" (on [`PUBLIC_LINE`]).
fn file(jwks: &str, introspect: &str) -> String {
    format!(
        r#"[listen]
http = "127.0.0.1:8080"

[[issuers]]
name = "main"
issuer = "https://id.example.com"
jwks_url = "{jwks}"

[[issuers]]
name = "legacy"
issuer = "https://legacy-id.example.com"
introspection = {{ url = "{introspect}", client_id = "edge", client_auth = "none" }}

[[routes]]
name = "orders"
host = "api.example.com"
path_prefix = "/orders"
upstream = "http://10.0.0.7:9001/base"
strip_prefix = true
issuers = ["main", "legacy"]
audiences = ["orders-api"]
scopes = ["orders:read"]

[[routes.rules]]
methods = ["POST", "DELETE"]
path_prefix = "/orders/admin"
scopes = ["orders:write"]
claims = {{ "realm_access.roles" = "admin" }}

[[routes.rules]]
path_prefix = "/orders/health"
auth = "none"

[[routes.rules]]
path_prefix = "/orders/internal"
deny = true

[[routes]]
name = "public"
path_prefix = "/static"
upstream = "http://10.0.0.8:9002"
auth = "none"
"#
    )
}

const ROUTE_LINE: usize = 14;
const PUBLIC_LINE: usize = 38;
/// The lines of the three `[[routes.rules]]` headers.
const RULE_LINES: [usize; 3] = [24, 30, 34];

/// Runs `check --explain` on [`file`]; returns (exit code, stdout lines, stderr).
fn explain(request: &str) -> (Option<i32>, Vec<String>, String) {
    let dir = TempDir::new();
    let text = file("http://127.0.0.1:9/jwks.json", "http://127.0.0.1:9/introspect");
    for l in [ROUTE_LINE, PUBLIC_LINE] {
        assert_eq!(text.lines().nth(l - 1), Some("[[routes]]"), "ROUTE_LINE and PUBLIC_LINE are right");
    }
    for l in RULE_LINES {
        assert_eq!(text.lines().nth(l - 1), Some("[[routes.rules]]"), "RULE_LINES are right");
    }
    let path = dir.write("portcullis.toml", &text);
    let label = path.display().to_string();
    let out = portcullis(&["check", "--config", &label, "--explain", request]);
    let lines: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    assert_eq!(lines.first().map(String::as_str), Some(format!("{label}: ok").as_str()), "{out:?}");
    (out.code, lines[1..].to_vec(), out.stderr)
}

fn assert_lines(got: &[String], want: &[String]) {
    assert_eq!(got, want, "\ngot:\n{}\nwant:\n{}", got.join("\n"), want.join("\n"));
}

fn route_line() -> String {
    format!("route: orders (line {ROUTE_LINE}), host api.example.com, path_prefix /orders")
}

#[test]
fn explain_names_the_deciding_rule_its_line_and_what_it_requires() {
    let (code, lines, stderr) = explain("POST https://api.example.com/orders/admin/users/7?dry_run=1");
    assert_eq!(code, Some(0), "{stderr}");
    assert_lines(
        &lines,
        &[
            route_line(),
            "auth: required; issuers: main, legacy".to_owned(),
            format!(
                "decided by: rule 1 (line {}): requires a valid token with audience orders-api; scopes orders:write; claim realm_access.roles = \"admin\"",
                RULE_LINES[0]
            ),
            "upstream: http://10.0.0.7:9001/base/admin/users/7?dry_run=1".to_owned(),
        ],
    );
}

#[test]
fn explain_names_a_deny_rule_and_an_auth_none_rule() {
    let (code, lines, _) = explain("GET https://api.example.com/orders/internal/keys");
    assert_eq!(code, Some(0));
    assert_eq!(lines[2], format!("decided by: rule 3 (line {}): deny → 403 forbidden", RULE_LINES[2]));
    let (code, lines, _) = explain("DELETE https://api.example.com/orders/health");
    assert_eq!(code, Some(0));
    assert_eq!(
        lines[2],
        format!(
            "decided by: rule 2 (line {}): auth = \"none\" → no token needed (identity headers still stripped)",
            RULE_LINES[1]
        )
    );
    assert_eq!(lines[3], "upstream: http://10.0.0.7:9001/base/health");
}

#[test]
fn explain_says_route_policy_when_no_rule_matches() {
    // GET is not one of rule 1's methods; `/orders/administrators` is not under `/orders/admin`.
    for request in [
        "GET https://api.example.com/orders/admin/users",
        "POST https://api.example.com/orders/administrators",
    ] {
        let (code, lines, stderr) = explain(request);
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(lines[0], route_line(), "{request}");
        assert_eq!(lines[1], "auth: required; issuers: main, legacy", "{request}");
        assert_eq!(
            lines[2],
            "decided by: route policy: requires a valid token with audience orders-api; scopes orders:read",
            "{request}"
        );
    }
    let (_, lines, _) = explain("GET http://anything.example/static/app.js");
    assert_lines(
        &lines,
        &[
            format!("route: public (line {PUBLIC_LINE}), host any, path_prefix /static"),
            "auth: none; issuers: none".to_owned(),
            "decided by: route policy: no token needed".to_owned(),
            "upstream: http://10.0.0.8:9002/static/app.js".to_owned(),
        ],
    );
}

#[test]
fn explain_says_no_route_and_the_404() {
    for request in [
        "GET https://api.example.com/billing/1",
        "GET https://other.example.com/orders/1",
        "GET https://api.example.com/ordersx",
    ] {
        let (code, lines, stderr) = explain(request);
        assert_eq!(code, Some(0), "{request}: {stderr}");
        assert_lines(&lines, &["route: no route".to_owned(), "answer: 404 no_route".to_owned()]);
    }
}

#[test]
fn explain_decides_on_the_normalised_path_like_the_proxy() {
    let (code, lines, _) = explain("GET https://api.example.com/orders/x/../internal/keys");
    assert_eq!(code, Some(0));
    assert!(
        lines.iter().any(|l| l.contains("/orders/internal/keys")),
        "names the normalised path: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("decided by: rule 3 (line {})", RULE_LINES[2]))),
        "the deny rule decides: {lines:?}"
    );
}

#[test]
fn explain_reads_the_file_only_and_answers_at_once_with_every_endpoint_unreachable() {
    // The JWKS URL is a port nothing listens on; the introspection URL is a listener
    // that never answers: any fetch would fail or hang, and show up as a connection.
    let closed = Refused::reserve();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let silent_url = format!("http://{}/introspect", silent.local_addr().unwrap());
    let jwks_silent = format!("http://{}/jwks.json", silent.local_addr().unwrap());
    let dir = TempDir::new();
    for (jwks, introspect) in
        [(format!("{}/jwks.json", closed.url()), silent_url.clone()), (jwks_silent, silent_url)]
    {
        let path = dir.write("portcullis.toml", &file(&jwks, &introspect));
        let started = Instant::now();
        let out = portcullis(&[
            "check",
            "--config",
            &path.display().to_string(),
            "--explain",
            "GET https://api.example.com/orders/42",
        ]);
        let took = started.elapsed();
        assert_eq!(out.code, Some(0), "{out:?}");
        assert!(out.stdout.contains("decided by: route policy"), "{}", out.stdout);
        // Well under any fetch timeout: nothing was waited for.
        assert!(took < Duration::from_secs(5), "explain took {took:?}");
    }
    // Accepted connections wait in the backlog until accepted: drain it.
    let mut connections = 0;
    loop {
        match silent.accept() {
            Ok(_) => connections += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("accept: {e}"),
        }
    }
    assert_eq!(connections, 0, "explain opened a connection to a key or introspection endpoint");
}

#[test]
fn explain_exits_1_on_an_invalid_file_naming_the_problem() {
    let text = file("http://127.0.0.1:9/jwks.json", "http://127.0.0.1:9/introspect").replace(
        "path_prefix = \"/orders/internal\"",
        "path_prefix = \"/orders/admin\"\nmethods = [\"POST\"]",
    );
    let dir = TempDir::new();
    let path = dir.write("portcullis.toml", &text);
    let label = path.display().to_string();
    let out =
        portcullis(&["check", "--config", &label, "--explain", "GET https://api.example.com/orders/42"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains(&format!("{label}:{}: routes[0].rules[2]", RULE_LINES[2])), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("rule 1 (line {})", RULE_LINES[0])), "{}", out.stderr);
    assert!(!out.stdout.contains("decided by"), "no explanation of an invalid file: {}", out.stdout);
}
