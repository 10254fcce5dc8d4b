//! Operating the proxy: certificates swapped by a reload reach new connections,
//! `/metrics` is valid Prometheus text that counts requests, `/readyz` follows keys.

use std::collections::HashMap;
use std::path::Path;

use crate::kit::*;

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
    portcullis::reload::reload(proxy.runtime(), &path).expect("the new certificate is valid");
    let s2 = tls_connect(proxy.https_addr(), "api.test", client.clone()).await.unwrap();
    assert_eq!(presented_leaf(&s2), second.der, "new connections get the new certificate");
    let reply = send_over(s2, get("https://api.test/x").into_request()).await;
    assert_eq!(reply.echo().path, "/x");

    // A broken key file on reload is refused and the running certificate stays.
    dir.write("server.key", "not a key");
    assert!(portcullis::reload::reload(proxy.runtime(), &path).is_err());
    let s3 = tls_connect(proxy.https_addr(), "api.test", client).await.unwrap();
    assert_eq!(presented_leaf(&s3), second.der);
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_requests() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"{}\"\n",
        up.url()
    ))
    .await;
    let before = metrics(&proxy).await;
    let ok = "portcullis_requests_total{route=\"api\",status=\"200\"}";
    assert_eq!(before.get(ok), None);
    assert_eq!(get(proxy.url("/api/x")).send().await.status, 200);
    get(proxy.url("/nowhere")).send().await.assert_error(404, "no_route");
    let reply = get(format!("{}/metrics", proxy.admin_url())).send().await;
    assert!(reply.header("content-type").unwrap().starts_with("text/plain"));
    let after = Metrics::parse(&reply.text());
    assert_eq!(after.get(ok), Some(1.0));
    assert_eq!(after.get("portcullis_requests_total{route=\"\",status=\"404\"}"), Some(1.0));
    assert_eq!(after.get("portcullis_upstream_duration_seconds_count{route=\"api\"}"), Some(1.0));
    assert!(after.has("portcullis_open_connections"));
    assert!(after.has("portcullis_auth_rejections_total{reason=\"invalid_token\"}"));
    assert!(after.has("portcullis_refreshes_total{outcome=\"rotated\"}"));
    assert!(after.has("portcullis_config_reloads_total{outcome=\"ok\"}"));
}
