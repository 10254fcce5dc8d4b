//! Configuration problems as an operator meets them: `portcullis check` (and `run`)
//! name the file, line and key of every problem and exit 1; a usage error exits 2;
//! secrets are never echoed.

use std::collections::HashMap;
use std::path::Path;

use crate::kit::*;

fn check(text: &str) -> (Finished, String) {
    let dir = TempDir::new();
    let file = dir.write("portcullis.toml", text);
    let label = file.display().to_string();
    (portcullis(&["check", "--config", &label]), label)
}

/// `from_toml` with the given environment; the problems as printed.
fn problems(text: &str, env: &[(&str, &str)]) -> String {
    let env: HashMap<String, String> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    match portcullis::config::from_toml(text, "test.toml", Path::new("/nonexistent-base"), &env) {
        Ok(_) => panic!("expected configuration problems for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

const HEAD: &str = "[listen]\nhttp = \"127.0.0.1:8080\"\n";

#[test]
fn check_names_the_line_and_key_of_a_typo_and_suggests_the_fix() {
    let text = format!(
        "{HEAD}
[[routes]]
name = \"a\"
upstream = \"http://127.0.0.1:9001\"

[[routes]]
name = \"b\"
path_prefix = \"/b\"
upstream = \"http://127.0.0.1:9002\"

[[routes]]
name = \"c\"
path_prefix = \"/c\"
upstrem = \"http://127.0.0.1:9003\"
"
    );
    let (out, label) = check(&text);
    assert_eq!(out.code, Some(1), "{out:?}");
    let want = format!("{label}:16: routes[2].upstrem: unknown key (did you mean `upstream`?)");
    assert!(out.stderr.lines().any(|l| l == want), "want {want:?} in stderr:\n{}", out.stderr);
}

#[test]
fn check_reports_every_problem_at_once_in_line_order() {
    let text = format!(
        "{HEAD}admin = \"localhost\"

[limits]
header_read_timeout = \"10\"

[[routes]]
name = \"a\"
upstream = \"ftp://127.0.0.1:9001\"
issuer = \"mian\"
timeout = \"soon\"

[[routes]]
name = \"a\"
path_prefix = \"orders\"
upstream = \"http://127.0.0.1:9002\"
max_request_body = \"10mb\"
"
    );
    let (out, label) = check(&text);
    assert_eq!(out.code, Some(1), "{out:?}");
    let want = [
        (3, "listen.admin"),
        (6, "limits.header_read_timeout"),
        (10, "routes[0].upstream"),
        (11, "routes[0].issuer"),
        (12, "routes[0].timeout"),
        (15, "routes[1].name"),
        (16, "routes[1].path_prefix"),
        (18, "routes[1].max_request_body"),
    ];
    let lines: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with(&label)).collect();
    assert_eq!(lines.len(), want.len(), "stderr:\n{}", out.stderr);
    for (line, (n, key)) in lines.iter().zip(want) {
        let prefix = format!("{label}:{n}: {key}: ");
        assert!(line.starts_with(&prefix), "want {prefix:?}, got {line:?}");
        assert!(line.len() > prefix.len() + 10, "the message says how to fix it: {line:?}");
    }
    assert!(out.stderr.contains("unknown issuer \"mian\""), "{}", out.stderr);
}

#[test]
fn unknown_table_is_an_error_with_a_suggestion() {
    let text = format!("{HEAD}\n[limts]\nmax_connections = 10\n");
    let (out, label) = check(&text);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains(&format!("{label}:4: limts: unknown key (did you mean `limits`?)")),
        "{}",
        out.stderr
    );
}

#[test]
fn check_accepts_the_example_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let out = portcullis(&["check", "--config", example]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("ok"), "{out:?}");
}

#[test]
fn unknown_subcommand_or_flag_is_a_usage_error() {
    for args in [&["frobnicate"][..], &["check", "--confg", "x.toml"][..], &[][..]] {
        let out = portcullis(args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: usage is explained");
    }
}

#[test]
fn missing_config_file_is_exit_1_naming_the_file() {
    let dir = TempDir::new();
    let path = dir.path().join("absent.toml").display().to_string();
    for cmd in ["check", "run"] {
        let out = portcullis(&[cmd, "--config", &path]);
        assert_eq!(out.code, Some(1), "{cmd}: {out:?}");
        assert!(out.stderr.contains(&path), "{cmd}: {}", out.stderr);
    }
}

#[test]
fn run_refuses_a_bad_config_with_exit_1() {
    let dir = TempDir::new();
    let file = dir.write(
        "bad.toml",
        &format!("{HEAD}\n[[routes]]\nname = \"a\"\nupstream = \"http://x\"\ntimeot = \"1s\"\n"),
    );
    let out = portcullis(&["run", "--config", &file.display().to_string()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(":7: routes[0].timeot: unknown key (did you mean `timeout`?)"),
        "{}",
        out.stderr
    );
}

#[test]
fn run_exits_1_naming_the_listener_when_its_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = TempDir::new();
    let text = format!(
        "[listen]\nhttp = \"{addr}\"\n\n[[routes]]\nname = \"a\"\nupstream = \"http://127.0.0.1:9\"\n"
    );
    let file = dir.write("busy.toml", &text);
    let out = portcullis(&["run", "--config", &file.display().to_string()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("listen.http"), "{}", out.stderr);
    drop(taken);
}

#[test]
fn missing_environment_secret_names_the_variable() {
    let text = format!(
        "{HEAD}
[[issuers]]
name = \"main\"
issuer = \"https://id.example.com\"
hmac_secret_env = \"PORTCULLIS_TEST_HS\"
"
    );
    let p = problems(&text, &[]);
    assert!(p.contains("test.toml:7: issuers[0].hmac_secret_env: "), "{p}");
    assert!(p.contains("PORTCULLIS_TEST_HS"), "{p}");
}

#[test]
fn weak_secret_is_reported_without_echoing_it() {
    let text = format!(
        "{HEAD}
[[issuers]]
name = \"main\"
issuer = \"https://id.example.com\"
hmac_secret_env = \"PORTCULLIS_TEST_HS\"
"
    );
    let secret = "hunter2-but-short";
    let p = problems(&text, &[("PORTCULLIS_TEST_HS", secret)]);
    assert!(p.contains("issuers[0].hmac_secret_env"), "{p}");
    assert!(!p.contains(secret), "the secret leaked into the error: {p}");
}

#[test]
fn https_listener_without_tls_and_missing_certificate_files_are_reported() {
    let p = problems("[listen]\nhttps = \"127.0.0.1:8443\"\n", &[]);
    assert!(p.contains("test.toml:2: listen.https: "), "{p}");
    let text =
        "[listen]\nhttps = \"127.0.0.1:8443\"\n\n[tls]\ncert = \"missing.pem\"\nkey = \"missing.key\"\n";
    let p = problems(text, &[]);
    assert!(p.contains("test.toml:5: tls.cert: "), "{p}");
    assert!(p.contains("missing.pem"), "{p}");
}

#[test]
fn a_config_without_listeners_is_refused() {
    let p = problems("[[routes]]\nname = \"a\"\nupstream = \"http://127.0.0.1:9\"\n", &[]);
    assert!(p.contains("listen"), "{p}");
}

#[test]
fn a_route_that_checks_tokens_without_audiences_is_a_warning_not_an_error() {
    let key = fixture("rsa1.pub.pem");
    let text = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\n\n[[issuers]]\nname = \"main\"\nissuer = \"https://id.test\"\npublic_key_files = [\"{key}\"]\n\n[[routes]]\nname = \"api\"\nupstream = \"http://127.0.0.1:9\"\nissuer = \"main\"\n"
    );
    let (out, label) = check(&text);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("warning: {label}:12: routes[0].issuer: no `audiences`")),
        "{}",
        out.stderr
    );
    let with_audience = text.replace("issuer = \"main\"\n", "issuer = \"main\"\naudiences = [\"api\"]\n");
    let (out, _) = check(&with_audience);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
}

#[test]
fn tracing_problems_name_their_keys() {
    let route = "[[routes]]\nname = \"a\"\nupstream = \"http://127.0.0.1:9001\"\n";
    let text = format!(
        "{HEAD}\n[tracing]\notlp_endpoint = \"127.0.0.1:4318\"\nsample_ratio = 1.5\nservice_name = \"\"\n\n{route}"
    );
    let out = problems(&text, &[]);
    assert!(out.contains("test.toml:5: tracing.otlp_endpoint:"), "{out}");
    assert!(out.contains("test.toml:6: tracing.sample_ratio: 1.5 is not a share of traces"), "{out}");
    assert!(out.contains("test.toml:7: tracing.service_name: must not be empty"), "{out}");
    let typo =
        format!("{HEAD}\n[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\nsample_rate = 0.5\n\n{route}");
    let out = problems(&typo, &[]);
    assert!(out.contains("tracing.sample_rate: unknown key (did you mean `sample_ratio`?)"), "{out}");
}

#[test]
fn check_says_tracing_is_read_at_start() {
    let text = format!(
        "{HEAD}\n[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n\n[[routes]]\nname = \"a\"\nupstream = \"http://127.0.0.1:9001\"\n"
    );
    let (out, _) = check(&text);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("tracing: spans to http://127.0.0.1:4318/v1/traces, sample_ratio 1"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("a reload keeps the running one"), "{}", out.stdout);
}
