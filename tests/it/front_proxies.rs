//! Forward auth beside real front proxies (SPEC §4 "Forward auth"): nginx
//! (`auth_request`) and Caddy (`forward_auth` written out), each started from
//! its file in `examples/forward-auth/` with only the addresses replaced, in
//! front of the echo upstream, with portcullis' `[forward_auth]` listener as
//! its authorization service and its proxy listener for `/auth/*`.
//!
//! The binaries come from Debian's packages (`.ci/run` installs them); a
//! missing one fails the test with a message saying so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::kit::session::*;
use crate::kit::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Nginx,
    Caddy,
}

/// A front proxy running from its example file; killed on drop.
struct Front {
    kind: Kind,
    _child: tokio::process::Child,
    port: u16,
    admin: String,
    _dir: TempDir,
}

impl Instance for Front {
    fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// portcullis' admin listener (metrics, readiness).
    fn admin_url(&self) -> String {
        self.admin.clone()
    }
}

/// The example file with its placeholder addresses replaced; each must still be
/// there, so the test never runs a configuration the example no longer shows.
fn render(file: &str, replace: &[(&str, String)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/forward-auth").join(file);
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (placeholder, actual) in replace {
        assert!(text.contains(placeholder), "{file} no longer contains {placeholder:?}");
        text = text.replace(placeholder, actual);
    }
    text
}

/// The binary on PATH or in the sbin directories (nginx lives in /usr/sbin).
fn binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs =
        std::env::split_paths(&path).chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "{name} is not installed: the front-proxy tests run the real {name} \
         (apt-get install -y {name}, or run .ci/run, which installs it)"
    );
}

impl Front {
    async fn start(kind: Kind, proxy: &Proxy, up: &Upstream) -> Front {
        // A port found free can be taken before the front proxy binds it: then
        // it exits with "address in use" and another port is tried.
        for _ in 0..5 {
            if let Some(front) = Self::try_start(kind, proxy, up).await {
                return front;
            }
        }
        panic!("{kind:?} could not bind a free port in 5 attempts");
    }

    async fn try_start(kind: Kind, proxy: &Proxy, up: &Upstream) -> Option<Front> {
        let dir = TempDir::new();
        let port = free_port();
        let addrs = [
            ("127.0.0.1:8080", proxy.http_addr().to_string()),
            ("127.0.0.1:9902", proxy.forward_auth_addr().to_string()),
            ("127.0.0.1:9001", up.addr().to_string()),
        ];
        let log = dir.path().join("front.log");
        let mut cmd = match kind {
            Kind::Nginx => {
                let mut replace = vec![("listen 80;", format!("listen 127.0.0.1:{port};"))];
                replace.extend(addrs);
                dir.write("site.conf", &render("nginx.conf", &replace));
                let d = dir.path().display();
                // The main context a distribution's nginx.conf would give, inside the temp dir.
                let main = format!(
                    "pid {d}/nginx.pid;\nevents {{ worker_connections 256; }}\nhttp {{\n\
                     access_log {d}/access.log;\nclient_body_temp_path {d}/body;\n\
                     proxy_temp_path {d}/proxy;\nfastcgi_temp_path {d}/fastcgi;\n\
                     uwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\ninclude {d}/site.conf;\n}}\n"
                );
                let conf = dir.write("nginx.conf", &main);
                let mut cmd = tokio::process::Command::new(binary("nginx"));
                // One process: nothing is left behind when it is killed, and no
                // worker user to switch to when the tests run as root.
                cmd.arg("-p").arg(dir.path()).arg("-e").arg(&log).arg("-c").arg(conf);
                cmd.arg("-g")
                    .arg(format!("daemon off; master_process off; error_log {} info;", log.display()));
                cmd
            }
            Kind::Caddy => {
                let mut replace = vec![(":80 {", format!(":{port} {{"))];
                replace.extend(addrs);
                // No admin endpoint (a fixed port shared by every test) and loopback only.
                let global = "{\n\tadmin off\n\tdefault_bind 127.0.0.1\n}\n\n";
                let text = format!("{global}{}", render("Caddyfile", &replace));
                let file = dir.write("Caddyfile", &text);
                let mut cmd = tokio::process::Command::new(binary("caddy"));
                cmd.arg("run").arg("--config").arg(file).arg("--adapter").arg("caddyfile");
                for var in ["HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"] {
                    cmd.env(var, dir.path());
                }
                cmd
            }
        };
        let stderr = dir.path().join("stderr.log");
        let out = std::fs::File::create(&stderr).expect("create the front proxy's stderr file");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(out).kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn the front proxy");
        // Through the front proxy to this test's own upstream: another process
        // that took the port (a front proxy of another test) cannot pass this.
        let url = format!("http://127.0.0.1:{port}{PROBE}");
        let read_log = || {
            let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
            format!("{}{}", read(&log), read(&stderr))
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let text = read_log();
                if text.contains("Address already in use") || text.contains("address already in use") {
                    return None;
                }
                panic!("{kind:?} exited with {status}; its log:\n{text}");
            }
            if try_send(get(&url)).await.is_ok_and(|r| r.status == 200)
                && up.seen().iter().any(|(_, path)| path == PROBE)
            {
                let admin = proxy.admin_url();
                return Some(Front { kind, _child: child, port, admin, _dir: dir });
            }
            assert!(start.elapsed() < DEADLINE, "{kind:?} did not answer on {url}; its log:\n{}", read_log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The session suites' configuration with a forward-auth listener: "api" on
/// `/api` needs a token (forward_token on, the default X-Auth-Subject), "open"
/// on `/open` needs none.
async fn setup(kind: Kind) -> (TestIdp, Upstream, Proxy, Front) {
    let opts = Opts { routes: "[forward_auth]\nlisten = \"127.0.0.1:0\"\n".to_owned(), ..Opts::default() };
    let (idp, up, proxy) = session::setup(&opts).await;
    let front = Front::start(kind, &proxy, &up).await;
    (idp, up, proxy, front)
}

/// The start-up probe's path, on the public route.
const PROBE: &str = "/open/front-proxy-probe";

/// Requests the upstream received, not counting the start-up probes.
fn reached(up: &Upstream) -> Vec<(String, String)> {
    up.seen().into_iter().filter(|(_, p)| p != PROBE).collect()
}

/// A refusal for `code` at the client, counted once by portcullis. Caddy passes
/// portcullis' JSON body on; nginx answers with its own error page (status and
/// headers are portcullis').
async fn assert_refusal(front: &Front, r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{:?}: {}", front.kind, r.text());
    if front.kind == Kind::Caddy {
        r.assert_error(status, code);
    }
    let series = format!("portcullis_auth_rejections_total{{reason=\"{code}\"}}");
    assert_eq!(metric(front, &series).await, 1.0, "{:?}: {series}", front.kind);
}

// === a valid bearer ===

async fn a_valid_bearer_reaches_the_upstream_with_portcullis_identity_only(kind: Kind) {
    let (idp, _up, _proxy, front) = setup(kind).await;
    let token = idp.access_token("alice", 300);
    let r = get(front.url("/api/orders?x=1"))
        .bearer(&token)
        .header("x-auth-subject", "mallory")
        .header("x_auth_subject", "mallory")
        .header("x-auth-role", "admin")
        .header("x_auth_role", "admin")
        .send()
        .await;
    let echo = r.echo();
    assert_eq!(echo.path, "/api/orders?x=1");
    assert_eq!(echo.header_all("x-auth-subject"), ["alice"], "{kind:?}: {echo:?}");
    // nginx cannot strip by prefix (its example says so); Caddy strips X-Auth-*.
    if kind == Kind::Caddy {
        assert!(echo.names_starting_with("x-auth-role").is_empty(), "{kind:?}: {echo:?}");
    }
    assert!(
        !echo.headers.iter().any(|(n, _)| n.contains('_')),
        "{kind:?}: an underscore spelling reached the upstream: {echo:?}"
    );
    // forward_token: the token the upstream gets is the one portcullis verified.
    assert_eq!(echo.header_all("authorization"), [format!("Bearer {token}")], "{kind:?}: {echo:?}");
}

#[tokio::test]
async fn nginx_a_valid_bearer_reaches_the_upstream_with_portcullis_identity_only() {
    a_valid_bearer_reaches_the_upstream_with_portcullis_identity_only(Kind::Nginx).await;
}

#[tokio::test]
async fn caddy_a_valid_bearer_reaches_the_upstream_with_portcullis_identity_only() {
    a_valid_bearer_reaches_the_upstream_with_portcullis_identity_only(Kind::Caddy).await;
}

// === no token, a public route ===

async fn no_token_is_401_at_the_client_and_a_public_route_passes_anonymous(kind: Kind) {
    let (_idp, up, _proxy, front) = setup(kind).await;
    let r = get(front.url("/api/orders")).header("x-auth-subject", "mallory").send().await;
    assert_refusal(&front, &r, 401, "missing_token").await;
    let www = r.header("www-authenticate").unwrap_or_default();
    assert!(www.starts_with("Bearer realm=\"portcullis\""), "{kind:?}: WWW-Authenticate {www:?}");
    assert!(reached(&up).is_empty(), "{kind:?}: {:?}", up.seen());

    // `auth = "none"`: no identity and no token, not even a placeholder.
    let r = get(front.url("/open/x")).header("x-auth-subject", "mallory").send().await;
    let echo = r.echo();
    assert!(echo.names_starting_with("x-auth").is_empty(), "{kind:?}: {echo:?}");
    assert!(!echo.has_header("authorization"), "{kind:?}: {echo:?}");
}

#[tokio::test]
async fn nginx_no_token_is_401_at_the_client_and_a_public_route_passes_anonymous() {
    no_token_is_401_at_the_client_and_a_public_route_passes_anonymous(Kind::Nginx).await;
}

#[tokio::test]
async fn caddy_no_token_is_401_at_the_client_and_a_public_route_passes_anonymous() {
    no_token_is_401_at_the_client_and_a_public_route_passes_anonymous(Kind::Caddy).await;
}

// === a client's own forwarded headers ===

async fn a_client_supplied_original_uri_does_not_choose_the_route(kind: Kind) {
    let (_idp, up, _proxy, front) = setup(kind).await;
    // `/open` is public: naming it in the headers a front proxy writes must not
    // open `/api` for a caller without a token.
    let r = get(front.url("/api/orders"))
        .header("x-forwarded-uri", "/open/x")
        .header("x-original-uri", "/open/x")
        .header("x-forwarded-method", "OPTIONS")
        .header("x-original-method", "OPTIONS")
        .header("x-forwarded-host", "elsewhere.example")
        .send()
        .await;
    assert_eq!(r.status, 401, "{kind:?}: {}", r.text());
    assert!(reached(&up).is_empty(), "{kind:?}: {:?}", up.seen());
}

#[tokio::test]
async fn nginx_a_client_supplied_original_uri_does_not_choose_the_route() {
    a_client_supplied_original_uri_does_not_choose_the_route(Kind::Nginx).await;
}

#[tokio::test]
async fn caddy_a_client_supplied_original_uri_does_not_choose_the_route() {
    a_client_supplied_original_uri_does_not_choose_the_route(Kind::Caddy).await;
}

// === refresh through the front proxy ===

async fn an_expired_access_cookie_is_refreshed_once_and_every_new_cookie_reaches_the_client(kind: Kind) {
    let (idp, up, _proxy, front) = setup(kind).await;
    idp.set_access_ttl(-120); // expired well beyond the 30 s leeway
    let (_, jar) = login(&front, "alice").await;
    idp.set_access_ttl(300);
    let calls = token_calls(&idp);

    let r = jar.on(get(front.url("/api/orders"))).send().await;
    let token = forwarded_token(&r);
    assert_eq!(token_calls(&idp), calls + 1, "{kind:?}: one refresh");
    assert!(
        claims(&token)["exp"].as_i64().unwrap() > idp::now() + 200,
        "{kind:?}: the fresh token went upstream"
    );
    let access = assert_set(&r, ACCESS);
    let refresh = assert_set(&r, REFRESH);
    assert!(
        !r.headers.keys().any(|k| k.as_str().starts_with("x-portcullis-")),
        "{kind:?}: the numbered copies are for the front proxy only: {:?}",
        r.headers
    );

    // The new cookies work on the next request: no second refresh.
    let jar = jar.after(&r);
    assert_eq!((jar.get(ACCESS), jar.get(REFRESH)), (Some(&*access.value), Some(&*refresh.value)));
    let r = jar.on(get(front.url("/api/orders"))).send().await;
    assert_eq!(forwarded_token(&r), token, "{kind:?}");
    assert!(set_cookies(&r).is_empty(), "{kind:?}: {:?}", set_cookies(&r));
    assert_eq!(token_calls(&idp), calls + 1, "{kind:?}");

    // The rotated refresh token arrived: the next refresh is no reuse.
    let r = refresh_now(&front, &jar).await;
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    assert_eq!(token_calls(&idp), calls + 2, "{kind:?}");
    assert!(!idp.family_revoked(&last_refresh_token(&idp)), "{kind:?}: the session survived");
    assert_eq!(reached(&up).len(), 2, "{kind:?}: {:?}", up.seen());
}

#[tokio::test]
async fn nginx_an_expired_access_cookie_is_refreshed_once_and_every_new_cookie_reaches_the_client() {
    an_expired_access_cookie_is_refreshed_once_and_every_new_cookie_reaches_the_client(Kind::Nginx).await;
}

#[tokio::test]
async fn caddy_an_expired_access_cookie_is_refreshed_once_and_every_new_cookie_reaches_the_client() {
    an_expired_access_cookie_is_refreshed_once_and_every_new_cookie_reaches_the_client(Kind::Caddy).await;
}

async fn an_ended_session_is_401_with_its_cookies_cleared_at_the_client(kind: Kind) {
    let (idp, up, _proxy, front) = setup(kind).await;
    idp.set_access_ttl(10);
    let (_, jar) = login(&front, "alice").await;
    idp.revoke_all_sessions();
    let r = jar.on(get(front.url("/api/orders"))).send().await;
    assert_refusal(&front, &r, 401, "session_expired").await;
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert!(reached(&up).is_empty(), "{kind:?}: {:?}", up.seen());
}

#[tokio::test]
async fn nginx_an_ended_session_is_401_with_its_cookies_cleared_at_the_client() {
    an_ended_session_is_401_with_its_cookies_cleared_at_the_client(Kind::Nginx).await;
}

#[tokio::test]
async fn caddy_an_ended_session_is_401_with_its_cookies_cleared_at_the_client() {
    an_ended_session_is_401_with_its_cookies_cleared_at_the_client(Kind::Caddy).await;
}

// === CSRF ===

async fn a_cross_origin_cookie_post_is_403_and_a_same_origin_one_passes(kind: Kind) {
    let (_idp, up, _proxy, front) = setup(kind).await;
    let (_, jar) = login(&front, "alice").await;
    let r =
        jar.on(post(front.url("/api/orders"), "{}")).header("origin", "https://evil.example").send().await;
    assert_refusal(&front, &r, 403, "csrf").await;
    assert!(reached(&up).is_empty(), "{kind:?}: {:?}", up.seen());

    // The origin check reads the original scheme and host through the front proxy.
    let r = jar.on(post(front.url("/api/orders"), "{}")).header("origin", front.http_url()).send().await;
    let echo = r.echo();
    assert_eq!((echo.method.as_str(), echo.body_len), ("POST", 2), "{kind:?}");
    assert_eq!(echo.header("x-auth-subject"), Some("alice"), "{kind:?}");
    assert_eq!(echo.header("cookie"), None, "{kind:?}: the session cookies reached the upstream");

    // The client's other cookies pass; the proxy's own never reach the upstream.
    let mut with_theme = jar.clone();
    with_theme.set("theme", "dark");
    let echo = with_theme.on(get(front.url("/api/orders"))).send().await.echo();
    assert_eq!(echo.header("x-auth-subject"), Some("alice"), "{kind:?}");
    assert_eq!(echo.header("cookie"), Some("theme=dark"), "{kind:?}: {echo:?}");
}

#[tokio::test]
async fn nginx_a_cross_origin_cookie_post_is_403_and_a_same_origin_one_passes() {
    a_cross_origin_cookie_post_is_403_and_a_same_origin_one_passes(Kind::Nginx).await;
}

#[tokio::test]
async fn caddy_a_cross_origin_cookie_post_is_403_and_a_same_origin_one_passes() {
    a_cross_origin_cookie_post_is_403_and_a_same_origin_one_passes(Kind::Caddy).await;
}
