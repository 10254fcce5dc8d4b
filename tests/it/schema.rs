//! `portcullis schema` and `portcullis.schema.json`: what an editor validates
//! against is what the binary prints, every shipped configuration passes it, and
//! the mistakes `check` refuses (unknown key, wrong type) are refused by it too.

use std::path::Path;

use serde_json::Value;

use crate::kit::*;

fn published() -> Value {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("portcullis.schema.json"))
        .expect("portcullis.schema.json at the repository root");
    serde_json::from_str(&text).expect("portcullis.schema.json is JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft7::new(&published()).expect("portcullis.schema.json is a valid Draft-07 schema")
}

/// The schema's complaints about a TOML text, one line each.
fn complaints(toml_text: &str) -> Vec<String> {
    let doc: toml::Value = toml::from_str(toml_text).expect("the test's TOML parses");
    let json = serde_json::to_value(doc).expect("TOML maps to JSON");
    validator().iter_errors(&json).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).expect(rel)
}

#[test]
fn the_binary_prints_the_published_schema() {
    let out = portcullis(&["schema"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let printed: Value = serde_json::from_str(&out.stdout).expect("schema prints JSON");
    assert_eq!(
        printed,
        published(),
        "portcullis.schema.json is stale: regenerate it with `portcullis schema > portcullis.schema.json`"
    );
    assert_eq!(printed["$schema"], "http://json-schema.org/draft-07/schema#");
}

#[test]
fn every_shipped_configuration_passes_the_schema() {
    for rel in ["config.example.toml", "examples/spa/portcullis.toml"] {
        let found = complaints(&repo_file(rel));
        assert!(found.is_empty(), "{rel} fails the schema:\n{}", found.join("\n"));
    }
    let demo = portcullis::demo::config_text(8080, "http://127.0.0.1:4000", 4001, 4002);
    let found = complaints(&demo);
    assert!(found.is_empty(), "the demo configuration fails the schema:\n{}", found.join("\n"));
}

#[tokio::test]
async fn a_test_suite_configuration_passes_the_schema() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let toml_text = Config::new()
        .raw("[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n")
        .table(idp.issuer_table())
        .table(idp.auth_server_table())
        .table(session_table())
        .table(api_route(&up).set("scopes", toml::Value::Array(vec!["read".into()])))
        .raw("[[routes.rules]]\nmethods = [\"DELETE\"]\npath_prefix = \"/api/admin\"\nclaims = { \"realm.roles\" = \"admin\", tier = 3 }\n")
        .toml();
    let found = complaints(&toml_text);
    assert!(found.is_empty(), "fails the schema:\n{}\n{toml_text}", found.join("\n"));
}

#[test]
fn an_unknown_key_and_a_wrong_type_fail_both_the_schema_and_check() {
    let bad = [
        ("[listen]\nhttp = \"127.0.0.1:8080\"\nhtp = \"x\"\n", "htp"),
        ("[listen]\nhttp = \"127.0.0.1:8080\"\n[limits]\nmax_body_size = true\n", "max_body_size"),
        (
            "[listen]\nhttp = \"127.0.0.1:8080\"\n[limits]\nheader_read_timeout = \"10 parsecs\"\n",
            "header_read_timeout",
        ),
        (
            "[listen]\nhttp = \"127.0.0.1:8080\"\n[[routes]]\nname = \"a\"\nupstream_protocol = \"h3\"\n",
            "upstream_protocol",
        ),
    ];
    let dir = TempDir::new();
    for (text, key) in bad {
        let found = complaints(text);
        assert!(!found.is_empty(), "the schema accepts {key:?} in:\n{text}");
        let file = dir.write("bad.toml", text);
        let out = portcullis(&["check", "--config", &file.display().to_string()]);
        assert_eq!(out.code, Some(1), "check accepts {key:?}: {out:?}");
        assert!(out.stderr.contains(key), "check does not name {key:?}:\n{}", out.stderr);
    }
}
