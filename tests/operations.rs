//! Operating the proxy: certificates swapped by a reload reach new connections,
//! `/metrics` is valid Prometheus text that counts requests, `/readyz` follows keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::path::Path;

use support::*;

fn tls_config(up: &Upstream, cert: &str, key: &str) -> String {
    format!(
        r#"
[listen]
https = "127.0.0.1:0"
admin = "127.0.0.1:0"
[tls]
cert = "{cert}"
key = "{key}"
[[routes]]
name = "api"
upstream = "{up}"
"#,
        up = up.url()
    )
}

#[tokio::test]
async fn a_certificate_swapped_by_reload_is_served_to_new_connections() {
    let ca = TestCa::new();
    let dir = TempDir::new();
    let up = Upstream::start().await;
    let first = ca.issue(&["api.test"]);
    let (cert, key) = first.write_to(&dir, "server");
    let text = tls_config(&up, &cert, &key);
    let path = dir.write("portcullis.toml", &text);
    let proxy = Proxy::start_with(&text, &HashMap::new(), Path::new(".")).await;
    let client = ca.client_config(&["http/1.1"]);
    let s = tls_connect(proxy.https_addr(), "api.test", client.clone()).await.unwrap();
    assert_eq!(presented_leaf(&s), first.der);

    let second = ca.issue(&["api.test"]);
    second.write_to(&dir, "server");
    portcullis::reload::reload(proxy.shared(), &path).expect("the new certificate is valid");
    let s2 = tls_connect(proxy.https_addr(), "api.test", client.clone()).await.unwrap();
    assert_eq!(presented_leaf(&s2), second.der, "new connections get the new certificate");
    let reply = send_over(s2, get("https://api.test/x").into_request()).await;
    assert_eq!(reply.echo().path, "/x");

    // A broken key file on reload is refused and the running certificate stays.
    dir.write("server.key", "not a key");
    assert!(portcullis::reload::reload(proxy.shared(), &path).is_err());
    let s3 = tls_connect(proxy.https_addr(), "api.test", client).await.unwrap();
    assert_eq!(presented_leaf(&s3), second.der);
}

/// Checks the exposition format line by line: comments, or `name{labels} value`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name_end < series.len() {
            let labels = series[name_end..].strip_prefix('{').and_then(|l| l.strip_suffix('}'));
            let labels = labels.unwrap_or_else(|| panic!("bad label set: {line}"));
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label: {line}"));
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad label name: {line}");
                assert!(!v.contains('\n'));
            }
        }
        out.insert(series.to_owned(), value);
    }
    out
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_requests() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"{}\"\n",
        up.url()
    ))
    .await;
    let before = parse_prometheus(&get(format!("{}/metrics", proxy.admin_url())).send().await.text());
    let ok = "portcullis_requests_total{route=\"api\",status=\"200\"}";
    assert_eq!(before.get(ok), None);
    assert_eq!(get(proxy.url("/api/x")).send().await.status, 200);
    get(proxy.url("/nowhere")).send().await.assert_error(404, "no_route");
    let reply = get(format!("{}/metrics", proxy.admin_url())).send().await;
    assert!(reply.header("content-type").unwrap().starts_with("text/plain"));
    let after = parse_prometheus(&reply.text());
    assert_eq!(after.get(ok), Some(&1.0));
    assert_eq!(after.get("portcullis_requests_total{route=\"\",status=\"404\"}"), Some(&1.0));
    assert_eq!(after.get("portcullis_upstream_duration_seconds_count{route=\"api\"}"), Some(&1.0));
    assert!(after.contains_key("portcullis_open_connections"));
    assert!(after.contains_key("portcullis_auth_rejections_total{reason=\"invalid_token\"}"));
    assert!(after.contains_key("portcullis_refreshes_total{outcome=\"rotated\"}"));
    assert!(after.contains_key("portcullis_config_reloads_total{outcome=\"ok\"}"));
}
