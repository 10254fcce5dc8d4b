//! `portcullis demo` (SPEC §6), as a newcomer runs it: the real binary on a free
//! port, signed in through the demo identity provider's form with plain HTTP,
//! the API called, one access token waited out, a storm of 20 calls refreshed
//! once, RP-initiated logout reaching the proxy over the back channel, SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::kit::session::Jar;
use crate::kit::*;

/// What the demo printed: the page, the user's password, the identity provider.
struct Banner {
    url: String,
    password: String,
    idp: String,
}

fn field<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in {lines:#?}"))
}

fn form_of(page: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for input in page.split("<input").skip(1) {
        let attr = |name: &str| {
            let start = input.find(&format!("{name}=\""))? + name.len() + 2;
            let end = input[start..].find('"')? + start;
            Some(input[start..end].replace("&amp;", "&").replace("&quot;", "\""))
        };
        if let (Some(n), Some(v)) = (attr("name"), attr("value")) {
            out.push((n, v));
        }
    }
    out
}

#[tokio::test]
async fn the_demo_signs_in_refreshes_once_under_a_storm_logs_out_and_stops_on_sigterm() {
    let port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["demo", "--port", &port.to_string()])
        // 35 s tokens: inside refresh_ahead (30 s) after 5 s.
        .env("PORTCULLIS_DEMO_ACCESS_TTL", "35")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start portcullis demo");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut lines = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(l) = out.next_line().await.expect("read stdout") {
            let done = l.contains("Ctrl-C");
            lines.push(l);
            if done {
                break;
            }
        }
    })
    .await
    .expect("the demo prints its banner");
    let banner = Banner {
        url: field(&lines, "portcullis demo: open ").to_owned(),
        password: field(&lines, "sign in as demo with password ").to_owned(),
        idp: field(&lines, "identity provider")
            .split_whitespace()
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned(),
    };
    assert_eq!(banner.url, format!("http://127.0.0.1:{port}/"));

    // The SPA loads; the API wants a session.
    let page = get(&banner.url).send().await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("app.js"));
    assert_eq!(get(format!("{}api/orders", banner.url)).send().await.status, 401);

    // Code + PKCE: the proxy sends the browser to the demo IdP's form.
    let login = get(format!("{}auth/login", banner.url)).send().await;
    assert_eq!(login.status, 302);
    let mut jar = Jar::default().after(&login);
    let authorize = login.header("location").expect("Location").to_owned();
    assert!(authorize.starts_with(&format!("{}/authorize?", banner.idp)), "{authorize}");
    let form_page = get(&authorize).send().await;
    assert_eq!(form_page.status, 200);
    assert!(form_page.text().contains(&banner.password), "the form names the demo password");
    let mut fields = form_of(&form_page.text());
    fields.retain(|(k, _)| k != "username");
    fields.push(("username".into(), "demo".into()));
    fields.push(("password".into(), banner.password.clone()));
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&fields).finish();
    let wrong = body.replace(&banner.password, "nope");
    let refused = post(format!("{}/authorize", banner.idp), wrong)
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await;
    assert_eq!(refused.status, 200);
    assert!(refused.text().contains("Wrong user or password"));
    let signed = post(format!("{}/authorize", banner.idp), body)
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await;
    assert_eq!(signed.status, 302, "{}", signed.text());
    let callback = signed.header("location").unwrap().to_owned();
    let back = jar.on(get(&callback)).send().await;
    assert_eq!(back.status, 302, "{}", back.text());
    jar.absorb(&back);

    // The API sees who called, from verified claims.
    let r = jar.on(get(format!("{}api/orders", banner.url))).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["headers"]["x-auth-subject"], "demo");
    assert_eq!(echo["headers"]["x-auth-email"], "demo@example.com");
    assert!(echo["headers"]["authorization"].as_str().unwrap().starts_with("Bearer "), "{echo}");
    assert!(!echo.to_string().contains("eyJ"), "the demo page is shown a token: {echo}");
    let exp = echo["access_token_claims"]["exp"].as_i64().unwrap();

    // Wait until the access token is within refresh_ahead (30 s) of its expiry.
    let due = exp - 30 - idp::now();
    if due >= 0 {
        tokio::time::sleep(Duration::from_secs(due as u64 + 1)).await;
    }
    let stats = |s: serde_json::Value, k: &str| s[k].as_u64().unwrap();
    let before = get(format!("{}/stats", banner.idp)).send().await.json();
    assert_eq!(stats(before.clone(), "refresh_grants"), 0);
    let calls = (0..20).map(|i| jar.on(get(format!("{}api/orders?i={i}", banner.url))).send());
    let answers = futures_util::future::join_all(calls).await;
    assert!(
        answers.iter().all(|a| a.status == 200),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    let after = get(format!("{}/stats", banner.idp)).send().await.json();
    assert_eq!(stats(after.clone(), "refresh_grants"), 1, "20 calls, one refresh: {after}");
    assert_eq!(stats(after, "reuse_detected"), 0);
    let refreshed = answers.iter().find(|a| a.headers.contains_key("set-cookie")).expect("new cookies");
    jar.absorb(refreshed);

    // RP-initiated logout: the IdP ends its session and tells the proxy over the back channel.
    let out = jar.on(get(format!("{}auth/logout", banner.url))).send().await;
    assert_eq!(out.status, 302);
    let stale = jar.clone();
    jar.absorb(&out);
    let end = out.header("location").unwrap().to_owned();
    assert!(end.starts_with(&format!("{}/logout?", banner.idp)) && end.contains("id_token_hint="), "{end}");
    let home = get(&end).send().await;
    assert_eq!(home.status, 302);
    assert_eq!(home.header("location"), Some(banner.url.as_str()));
    let s = get(format!("{}/stats", banner.idp)).send().await.json();
    assert_eq!(stats(s, "backchannel_logouts"), 1);
    // Even the cookies from before the logout no longer work.
    let r = stale.on(get(format!("{}api/orders", banner.url))).send().await;
    assert_eq!(r.status, 401, "{}", r.text());

    // SIGTERM: exit 0 and the port is closed.
    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "{status:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the proxy's port is closed");
}
