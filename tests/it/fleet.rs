//! Several instances sharing one Redis (SPEC §3 `[state]`, §4 "Several instances"):
//! revocations posted to one instance deny the token on every instance within a
//! second, a refresh storm spread over the fleet makes one call to `token_url`,
//! the old refresh token yields the new pair on every instance during
//! `refresh_grace`, a dead lock holder does not hang the others, losing Redis
//! neither opens access nor logs anyone out (and nothing posted meanwhile is
//! lost), Redis holds no token in clear, and `/readyz` waits for the shared list.
//!
//! Every test starts its own `redis-server` (see `kit/redis.rs`); without
//! Debian's `redis-server` installed they fail, they do not skip.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::kit::idp::{sign, CLIENT_SECRET};
use crate::kit::session::{
    api, b64_key, claims, env_with_keys, forwarded_token, last_refresh_token, login, refresh_now, refreshes,
    set_cookies, token_calls, Jar, ACCESS, REFRESH,
};
use crate::kit::*;

const COOKIE_KEY: [u8; 32] = [0x5C; 32];
const PREFIX: &str = "test:";
/// `[auth_server] timeout` in [`config`].
const AUTH_TIMEOUT: Duration = Duration::from_secs(3);
/// SPEC §4: "denies the token on every instance within a second".
const PROPAGATION: Duration = Duration::from_secs(1);

// === the fleet ===

/// The configuration every instance runs: same Redis, same cookie key, same IdP.
fn config(idp: &TestIdp, up: &Upstream, redis_url: &str) -> String {
    Config::new()
        .table(idp.issuer_table())
        .table(idp.auth_server_table().set("timeout", format!("{}s", AUTH_TIMEOUT.as_secs())))
        .table(session_table().set("refresh_ahead", "30s").set("refresh_grace", "30s"))
        .table(Table::new("[state]").set("redis_url", redis_url).set("key_prefix", PREFIX))
        .table(api_route(up))
        .toml()
}

/// One instance in this process.
async fn instance(idp: &TestIdp, up: &Upstream, redis_url: &str) -> Proxy {
    Proxy::start_with(&config(idp, up, redis_url), &env_with_keys(&[COOKIE_KEY]), Path::new(".")).await
}

/// One instance as a real process (it can be SIGKILLed; its log can be read).
async fn instance_process(idp: &TestIdp, up: &Upstream, redis_url: &str) -> ProxyProcess {
    let key = b64_key(&COOKIE_KEY);
    let env = [("CLIENT_SECRET", CLIENT_SECRET), ("COOKIE_KEY", key.as_str()), ("PORTCULLIS_LOG", "info")];
    ProxyProcess::start_with_env(&config(idp, up, redis_url), &env).await
}

/// Two in-process instances, A and B, on one Redis; both ready.
struct Fleet {
    idp: TestIdp,
    up: Upstream,
    redis: RedisServer,
    /// Kept alive for the test; reached through `a` and `b`.
    _proxies: [Proxy; 2],
    a: Node,
    b: Node,
}

async fn fleet() -> Fleet {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let redis = RedisServer::start().await;
    let proxy_a = instance(&idp, &up, &redis.url()).await;
    let proxy_b = instance(&idp, &up, &redis.url()).await;
    let a = Node::of("A", &proxy_a);
    let b = Node::of("B", &proxy_b);
    wait_ready(&a).await;
    wait_ready(&b).await;
    Fleet { idp, up, redis, _proxies: [proxy_a, proxy_b], a, b }
}

/// Where to reach one instance, in process or not; cheap to clone into tasks.
#[derive(Clone, Debug)]
struct Node {
    name: &'static str,
    http: String,
    admin: String,
}

impl Instance for Node {
    fn http_url(&self) -> String {
        self.http.clone()
    }

    fn admin_url(&self) -> String {
        self.admin.clone()
    }
}

impl Node {
    fn of(name: &'static str, p: &impl Instance) -> Self {
        Self { name, http: p.http_url(), admin: p.admin_url() }
    }

    async fn bearer(&self, token: &str) -> Reply {
        get(self.url("/api/orders")).bearer(token).send().await
    }

    fn api_req(&self, jar: &Jar, path: &str) -> Req {
        jar.on(get(self.url(path)))
    }

    /// Passthrough login from this instance's own origin.
    async fn login(&self, user: &str) -> Jar {
        login(self, user).await.1
    }
}

// === sessions and tokens ===

/// A logged-in browser on `node` whose access token needs a refresh on every
/// request (ttl 5 s <= refresh_ahead 30 s); tokens minted afterwards live 300 s.
async fn session_needing_refresh(idp: &TestIdp, node: &Node, user: &str) -> Jar {
    idp.set_access_ttl(5);
    let jar = node.login(user).await;
    idp.set_access_ttl(300);
    jar
}

fn sha256_hex(s: &str) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Asserts the answer sets (not deletes) logical cookie `name` (whole or chunked).
fn assert_set(reply: &Reply, name: &str) {
    let chunk = format!("{name}.");
    let all: Vec<_> =
        set_cookies(reply).into_iter().filter(|c| c.name == name || c.name.starts_with(&chunk)).collect();
    assert!(!all.is_empty(), "no Set-Cookie for {name}; got {:?}", set_cookies(reply));
    assert!(all.iter().all(|c| !c.is_deletion()), "{name} is deleted, expected a value: {all:?}");
}

/// Sends `n` cookie requests at once, request `i` to `nodes[i % nodes.len()]`;
/// each answer comes with the name of the node that gave it.
async fn storm(nodes: &[Node], jar: &Jar, n: usize) -> Vec<(String, Reply)> {
    let node = |i: usize| &nodes[i % nodes.len()];
    let reqs = (0..n).map(|i| node(i).api_req(jar, &format!("/api/orders/{i}"))).collect();
    send_together(reqs).await.into_iter().enumerate().map(|(i, r)| (node(i).name.to_owned(), r)).collect()
}

/// `{"A 200": 250, "B 401 session_expired": 3, …}`
fn tally(replies: &[(String, Reply)]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (node, r) in replies {
        let code = if r.status == 200 { String::new() } else { format!(" {}", r.json()["error"]) };
        *out.entry(format!("{node} {}{code}", r.status.as_u16())).or_default() += 1;
    }
    out
}

/// Every request of the storm got 200, both new cookies and the one new token.
fn assert_storm_shared_one_refresh(replies: &[(String, Reply)]) -> String {
    let mut tokens = HashSet::new();
    for (node, r) in replies {
        assert_eq!(
            r.status,
            200,
            "a storm request to {node} failed: {}; all: {:?}",
            r.text(),
            tally(replies)
        );
        assert_set(r, ACCESS);
        assert_set(r, REFRESH);
        tokens.insert(forwarded_token(r));
    }
    assert_eq!(tokens.len(), 1, "every request of the storm forwarded the one new access token");
    tokens.into_iter().next().expect("one token")
}

// === 1. revocations ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_posted_to_one_instance_denies_the_token_on_the_others_within_a_second() {
    let f = fleet().await;
    let (a, b) = (&f.a, &f.b);

    // --- by jti, posted to A, enforced on B ---
    let token = f.idp.access_token("alice", 300);
    let sibling = f.idp.access_token("alice", 300);
    let c = claims(&token);
    for n in [a, b] {
        assert_eq!(n.bearer(&token).await.status, 200, "{} accepts the token before", n.name);
    }
    let entry = json!({"jti": c["jti"], "exp": c["exp"]});
    let r = revoke(a, &entry).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let posted = Instant::now();
    eventually("B denies the jti revoked on A", PROPAGATION, || async {
        b.bearer(&token).await.status == 401
    })
    .await;
    let jti_took = posted.elapsed();
    assert_invalid_token(&b.bearer(&token).await, "B, revoked jti");
    assert_invalid_token(&a.bearer(&token).await, "A, revoked jti");
    assert_eq!(b.bearer(&sibling).await.status, 200, "only that jti is denied");
    assert!(revocations(b).await.contains(&entry), "B lists the entry: {:?}", revocations(b).await);

    // Stored under a hash of the jti, forgotten when the token would have expired anyway.
    let key = format!("{PREFIX}rev:jti:{}", sha256_hex(c["jti"].as_str().expect("jti")));
    let mut conn = f.redis.conn().await;
    let expire_at: i64 =
        redis::cmd("PEXPIRETIME").arg(&key).query_async(&mut conn).await.expect("PEXPIRETIME");
    assert_eq!(expire_at, c["exp"].as_i64().expect("exp") * 1000, "{key} expires with the token (PXAT exp)");

    // --- by sub, posted to B, enforced on A ---
    let bob = f.idp.access_token("bob", 300);
    let carol = f.idp.access_token("carol", 300);
    assert_eq!(a.bearer(&bob).await.status, 200);
    let cut = idp::now() + 1;
    let r = revoke(b, &json!({"sub": "bob", "issued_before": cut})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let posted = Instant::now();
    eventually("A denies bob's token after the sub revocation on B", PROPAGATION, || async {
        a.bearer(&bob).await.status == 401
    })
    .await;
    let sub_took = posted.elapsed();
    assert_invalid_token(&a.bearer(&bob).await, "A, revoked sub");
    assert_eq!(a.bearer(&carol).await.status, 200, "other subjects pass");
    let listed = revocations(a).await;
    assert!(
        listed.iter().any(|e| e["sub"] == "bob" && e["issued_before"] == cut),
        "A lists the sub entry: {listed:?}"
    );
    eprintln!("revocation propagation: jti A→B {jti_took:?}, sub B→A {sub_took:?}");

    // --- an instance that starts later loads the full list before it is ready ---
    let proxy_c = instance(&f.idp, &f.up, &f.redis.url()).await;
    let cn = Node::of("C", &proxy_c);
    wait_ready(&cn).await;
    assert_invalid_token(&cn.bearer(&token).await, "C (started later), revoked jti");
    assert_invalid_token(&cn.bearer(&bob).await, "C (started later), revoked sub");
    assert_eq!(cn.bearer(&carol).await.status, 200);
    assert!(revocations(&cn).await.contains(&entry));
}

// === 2. refresh storm over the fleet ===

async fn storm_over_the_fleet(slow: Option<Duration>) {
    let f = fleet().await;
    let jar = session_needing_refresh(&f.idp, &f.a, "alice").await;
    if let Some(d) = slow {
        f.idp.set_outage(Outage::Slow(d));
    }
    let before = token_calls(&f.idp);
    let replies = storm(&[f.a.clone(), f.b.clone()], &jar, 500).await;
    eprintln!(
        "storm over A and B: {:?}; token_url calls {}; family revoked {}",
        tally(&replies),
        token_calls(&f.idp) - before,
        f.idp.family_revoked(&last_refresh_token(&f.idp))
    );
    let token = assert_storm_shared_one_refresh(&replies);
    assert_eq!(token_calls(&f.idp) - before, 1, "exactly one call to token_url for the whole fleet");
    assert!(!f.idp.family_revoked(&last_refresh_token(&f.idp)), "the refresh-token family is not revoked");
    assert!(claims(&token)["exp"].as_i64().expect("exp") >= idp::now() + 200, "the NEW token went upstream");
    let rotated = refreshes(&f.a, "rotated").await + refreshes(&f.b, "rotated").await;
    assert_eq!(rotated, 1, "one instance made the call");
    // Both instances got requests, so both took part.
    for name in ["A", "B"] {
        assert!(replies.iter().any(|(n, _)| n == name));
    }

    // The cookies of any answer carry on on either instance without a call.
    f.idp.set_outage(Outage::None);
    let next = jar.clone().after(&replies[replies.len() / 2].1);
    for n in [&f.a, &f.b] {
        let r = api(n, &next).await;
        assert_eq!(r.status, 200, "{}: {}", n.name, r.text());
    }
    assert_eq!(token_calls(&f.idp) - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_spread_over_two_instances_makes_one_call_to_token_url() {
    storm_over_the_fleet(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_spread_over_two_instances_makes_one_call_while_the_server_is_slow() {
    storm_over_the_fleet(Some(Duration::from_millis(400))).await;
}

/// The race behind the intermittent storm failure, made certain: B's link to Redis
/// is slow (250 ms each way), so between B reading "no outcome yet" and B's
/// `SET lock NX` reaching Redis, A has all the time it needs to take the lock,
/// call token_url, store the outcome and release the lock. B must then use A's
/// outcome, not call token_url again with the rotated refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_released_between_check_and_take_does_not_cause_a_second_call() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let redis = RedisServer::start().await;
    let slow = SlowLink::start(redis.port(), Duration::from_millis(250)).await;
    let proxy_a = instance(&idp, &up, &redis.url()).await;
    let proxy_b = instance(&idp, &up, &slow.url()).await;
    let (a, b) = (Node::of("A", &proxy_a), Node::of("B", &proxy_b));
    wait_ready(&a).await;
    wait_ready(&b).await;

    let jar = session_needing_refresh(&idp, &a, "alice").await;
    let before = token_calls(&idp);
    let outcome_reads = format!("{PREFIX}refresh:");
    let seen = slow.received(&outcome_reads);
    let to_b = tokio::spawn(b.api_req(&jar, "/api/orders").send());
    eventually("Redis received B's read of the refresh outcome", DEADLINE, || async {
        slow.received(&outcome_reads) > seen
    })
    .await;
    // B's `SET lock NX` is now at least 250 ms away from Redis: A refreshes meanwhile.
    let on_a = api(&a, &jar).await;
    assert_eq!(on_a.status, 200, "{}", on_a.text());
    assert_eq!(token_calls(&idp) - before, 1, "A refreshed");
    let on_b = to_b.await.expect("request task");
    let calls = token_calls(&idp) - before;
    let revoked = idp.family_revoked(&last_refresh_token(&idp));
    assert_eq!(on_b.status, 200, "B: {} (token_url calls {calls}, family revoked {revoked})", on_b.text());
    assert_eq!(forwarded_token(&on_b), forwarded_token(&on_a), "B used A's outcome");
    assert_eq!(calls, 1, "one call for the fleet");
    assert!(!revoked);
}

// === 3. grace across instances ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_refresh_cookie_yields_the_new_pair_on_another_instance_during_grace() {
    let f = fleet().await;
    let jar = session_needing_refresh(&f.idp, &f.a, "alice").await;
    let before = token_calls(&f.idp);

    let on_a = api(&f.a, &jar).await;
    assert_eq!(on_a.status, 200, "{}", on_a.text());
    assert_set(&on_a, ACCESS);
    assert_set(&on_a, REFRESH);
    let new_token = forwarded_token(&on_a);
    assert_eq!(token_calls(&f.idp) - before, 1, "A refreshed");

    // The same (now rotated) cookies on B: the new pair, no second call.
    let on_b = api(&f.b, &jar).await;
    assert_eq!(on_b.status, 200, "{}", on_b.text());
    assert_set(&on_b, ACCESS);
    assert_set(&on_b, REFRESH);
    assert_eq!(forwarded_token(&on_b), new_token, "B forwarded the token A obtained");
    assert_eq!(token_calls(&f.idp) - before, 1, "no second call (the server would see a reuse)");
    assert_eq!(refreshes(&f.b, "grace").await, 1);
    assert_eq!(refreshes(&f.b, "rotated").await, 0);

    // The refresh endpoint on B with the old cookies too.
    let r = refresh_now(&f.b, &jar).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_set(&r, REFRESH);
    assert_eq!(token_calls(&f.idp) - before, 1);

    // Either answer's cookies work everywhere (the new token lives 300 s: no call).
    for cookies in [jar.clone().after(&on_a), jar.clone().after(&on_b)] {
        for n in [&f.a, &f.b] {
            let r = api(n, &cookies).await;
            assert_eq!(r.status, 200, "{}: {}", n.name, r.text());
            assert_eq!(forwarded_token(&r), new_token);
        }
    }
    assert_eq!(token_calls(&f.idp) - before, 1);
    assert!(!f.idp.family_revoked(&last_refresh_token(&f.idp)));
}

// === 4. the lock holder dies ===

/// A (a real process) takes the fleet lock and calls a slow IdP (2 s); it is
/// SIGKILLed mid-call. B, asked with the same cookies, must answer — the new pair
/// or a 503 that keeps the cookies — within `within`, not hang.
async fn lock_holder_killed(within: Duration) {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let redis = RedisServer::start().await;
    let mut proc_a = instance_process(&idp, &up, &redis.url()).await;
    let proxy_b = instance(&idp, &up, &redis.url()).await;
    let a = Node::of("A", &proc_a);
    let b = Node::of("B", &proxy_b);
    wait_ready(&a).await;
    wait_ready(&b).await;

    let jar = session_needing_refresh(&idp, &b, "alice").await;
    idp.set_rotation(false); // a second call with the same token is legitimate
    idp.set_outage(Outage::Slow(Duration::from_secs(2)));
    let before = token_calls(&idp);

    let to_a = tokio::spawn(try_send(a.api_req(&jar, "/api/orders")));
    let lock_pattern = format!("{PREFIX}lock:*");
    eventually("A holds the fleet lock and is calling token_url", DEADLINE, || async {
        token_calls(&idp) == before + 1 && redis.keys(&lock_pattern).await.len() == 1
    })
    .await;
    proc_a.signal("KILL");
    proc_a.wait_exit(DEADLINE).await;
    let a_result = to_a.await.expect("request task");
    assert!(a_result.is_err(), "A died mid-request: {a_result:?}");

    let started = Instant::now();
    let r = api(&b, &jar).await;
    let took = started.elapsed();
    eprintln!(
        "B answered {} after the lock holder died, in {took:?} (token_url calls: {})",
        r.status,
        token_calls(&idp) - before
    );
    match r.status.as_u16() {
        // The new pair, or (refresh_ahead) the current, still valid token.
        200 => assert_eq!(r.echo().header("x-auth-subject"), Some("alice")),
        503 => r.assert_error(503, "auth_server_unavailable"),
        s => panic!("B answered {s}: {}", r.text()),
    }
    assert!(set_cookies(&r).iter().all(|c| !c.is_deletion()), "cookies kept: {:?}", set_cookies(&r));
    assert!(took <= within, "B took {took:?} (more than {within:?}) after the lock holder died");

    // The session carries on: asking again yields the new pair.
    idp.set_outage(Outage::None);
    eventually("B hands out the new pair", DEADLINE, || async {
        let r = api(&b, &jar).await;
        r.status == 200 && set_cookies(&r).iter().any(|c| c.name == ACCESS && !c.is_deletion())
    })
    .await;
    assert!(!idp.family_revoked(&last_refresh_token(&idp)));
}

/// Whatever the bound, B is not stuck: it waits out the dead holder's lock
/// (timeout + 1 s) and makes the call itself (≤ timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lock_holder_does_not_hang_the_other_instances() {
    lock_holder_killed(AUTH_TIMEOUT * 2 + Duration::from_secs(2)).await;
}

/// The acceptance bound: `timeout + 2 s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lock_holder_delays_the_others_by_at_most_timeout_plus_2s() {
    lock_holder_killed(AUTH_TIMEOUT + Duration::from_secs(2)).await;
}

// === 5. Redis goes away ===

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

const LOST: &str = "Redis unreachable";
const BACK: &str = "Redis reachable";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_redis_opens_nothing_logs_nobody_out_and_loses_no_revocation() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    let proc_a = instance_process(&idp, &up, &redis.url()).await;
    let proc_b = instance_process(&idp, &up, &redis.url()).await;
    let a = Node::of("A", &proc_a);
    let b = Node::of("B", &proc_b);
    wait_ready(&a).await;
    wait_ready(&b).await;

    // Known before the outage: a revoked token, and one session per instance.
    let valid = idp.access_token("bob", 300);
    let known = idp.access_token("carol", 300);
    let later = idp.access_token("dave", 300);
    let kc = claims(&known);
    assert_eq!(revoke(&a, &json!({"jti": kc["jti"], "exp": kc["exp"]})).await.status, 201);
    eventually("B learns the revocation", DEADLINE, || async { b.bearer(&known).await.status == 401 }).await;
    let jar_a = session_needing_refresh(&idp, &a, "alice").await;
    let jar_b = session_needing_refresh(&idp, &b, "erin").await;

    // A valid bearer token is accepted on both instances all along, never a 5xx.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, sent, nodes, valid) = (stop.clone(), sent.clone(), [a.clone(), b.clone()], valid.clone());
        tokio::spawn(async move {
            let mut bad = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let n = &nodes[i % 2];
                let r = n.bearer(&valid).await;
                if r.status != 200 {
                    bad.push(format!("{} {} {}", n.name, r.status, r.text()));
                }
                sent.fetch_add(1, Ordering::SeqCst);
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            bad
        })
    };

    redis.stop();
    // Right away, before the instances may have noticed: cookie refresh still works.
    let before = token_calls(&idp);
    let r = api(&a, &jar_a).await;
    assert_eq!(r.status, 200, "refresh on A just after Redis died: {}", r.text());
    assert_eq!(token_calls(&idp) - before, 1);
    let jar_a = jar_a.after(&r);
    for n in [&a, &b] {
        let what = format!("{} logs the loss of Redis", n.name);
        let p = if n.name == "A" { &proc_a } else { &proc_b };
        eventually(&what, DEADLINE, || async { p.log().contains(LOST) }).await;
    }

    // --- the outage ---
    for n in [&a, &b] {
        assert_eq!(n.bearer(&valid).await.status, 200, "{} accepts a valid token", n.name);
        assert_invalid_token(
            &n.bearer(&known).await,
            &format!("{}: a revocation known before stays", n.name),
        );
        let r = readyz(n).await;
        assert_eq!(r.status, 200, "{} stays ready (it carries on alone): {}", n.name, r.text());
    }
    // Each instance refreshes on its own: one call per instance, everyone gets 200.
    idp.set_access_ttl(5);
    let jar_a2 = a.login("alice2").await;
    let jar_b2 = b.login("erin2").await;
    idp.set_access_ttl(300);
    for (n, jar) in [(&a, &jar_a2), (&b, &jar_b2)] {
        let before = token_calls(&idp);
        let replies = storm(std::slice::from_ref(n), jar, 40).await;
        assert_storm_shared_one_refresh(&replies);
        assert_eq!(token_calls(&idp) - before, 1, "{}: one call for its own storm", n.name);
        assert!(!idp.family_revoked(&last_refresh_token(&idp)));
    }
    let before = token_calls(&idp);
    let r = api(&b, &jar_b).await;
    assert_eq!(r.status, 200, "refresh on B during the outage: {}", r.text());
    assert_eq!(token_calls(&idp) - before, 1);
    let r = api(&a, &jar_a).await; // refreshed above: no call
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(token_calls(&idp) - before, 1);

    // One session spread over both: each instance refreshes once on its own (with a
    // rotating server the second call would be a reuse — inherent to carrying on
    // alone — so rotation is off here).
    idp.set_rotation(false);
    idp.set_access_ttl(5);
    let shared_jar = a.login("frank").await;
    idp.set_access_ttl(300);
    let before = token_calls(&idp);
    let replies = storm(&[a.clone(), b.clone()], &shared_jar, 40).await;
    for (n, r) in &replies {
        assert_eq!(r.status, 200, "{n}: {}; all: {:?}", r.text(), tally(&replies));
    }
    let calls = token_calls(&idp) - before;
    assert!((1..=2).contains(&calls), "at most one call per instance, got {calls}");
    idp.set_rotation(true);

    // A revocation posted to A meanwhile: A enforces it at once; B cannot know yet.
    let lc = claims(&later);
    let later_entry = json!({"jti": lc["jti"], "exp": lc["exp"]});
    let r = revoke(&a, &later_entry).await;
    assert_eq!(r.status, 201, "revocations are accepted during the outage: {}", r.text());
    assert_invalid_token(&a.bearer(&later).await, "A, revoked during the outage");
    assert_eq!(b.bearer(&later).await.status, 200, "B cannot know it while Redis is away");
    for n in [&a, &b] {
        assert!(metric(n, "portcullis_state_errors_total").await > 0.0, "{} counts the failures", n.name);
    }

    // --- Redis returns (empty, same port) ---
    let restarted = Instant::now();
    let redis = RedisServer::start_on(port).await;
    eventually("B learns the revocation posted to A during the outage", DEADLINE, || async {
        b.bearer(&later).await.status == 401
    })
    .await;
    eprintln!("revocation queued during the outage reached B {:?} after Redis returned", restarted.elapsed());
    assert!(revocations(&b).await.contains(&later_entry));
    let key = format!("{PREFIX}rev:jti:{}", sha256_hex(lc["jti"].as_str().expect("jti")));
    assert_eq!(redis.keys(&key).await, vec![key.clone()], "written to Redis when it returned");
    for n in [&a, &b] {
        assert_invalid_token(&n.bearer(&known).await, &format!("{}: still denied after the outage", n.name));
    }

    stop.store(true, Ordering::SeqCst);
    let bad = watcher.await.expect("watcher task");
    assert!(bad.is_empty(), "a valid token was refused during the outage: {bad:?}");
    assert!(sent.load(Ordering::SeqCst) > 20, "the watcher ran");

    // Logged once each way, not once per request or per retry.
    for (n, p) in [(&a, &proc_a), (&b, &proc_b)] {
        let what = format!("{} logs the return of Redis", n.name);
        eventually(&what, DEADLINE, || async { count(&p.log(), BACK) >= 2 }).await;
        let log = p.log();
        assert_eq!(count(&log, LOST), 1, "{} logs the loss once:\n{log}", n.name);
        assert_eq!(count(&log, BACK), 2, "{} logs reachability at start and on return only:\n{log}", n.name);
        assert!(!log.contains(&valid) && !log.contains("rt-"), "no token in {}'s log", n.name);
    }
}

/// Redis comes back empty (no persistence, or a fresh replacement): the
/// revocations the instances hold must reach the shared list again, or an
/// instance that starts afterwards accepts a revoked token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_survive_a_redis_that_returns_empty() {
    let mut f = fleet().await;
    let port = f.redis.port();
    let revoked = f.idp.access_token("carol", 300);
    let c = claims(&revoked);
    assert_eq!(revoke(&f.a, &json!({"jti": c["jti"], "exp": c["exp"]})).await.status, 201);
    eventually("B learns the revocation", DEADLINE, || async { f.b.bearer(&revoked).await.status == 401 })
        .await;

    f.redis.stop();
    f.redis = RedisServer::start_on(port).await;
    // Both instances are back on Redis once a new revocation travels A → B again.
    let probe = f.idp.access_token("probe", 300);
    let pc = claims(&probe);
    eventually("A and B use Redis again", DEADLINE, || async {
        revoke(&f.a, &json!({"jti": pc["jti"], "exp": pc["exp"]})).await;
        f.b.bearer(&probe).await.status == 401
    })
    .await;
    for n in [&f.a, &f.b] {
        assert_invalid_token(&n.bearer(&revoked).await, &format!("{} keeps its revocation", n.name));
    }

    let proxy_c = instance(&f.idp, &f.up, &f.redis.url()).await;
    let cn = Node::of("C", &proxy_c);
    wait_ready(&cn).await;
    assert_invalid_token(&cn.bearer(&probe).await, "C, revoked after the restart");
    assert_invalid_token(&cn.bearer(&revoked).await, "C, revoked before Redis restarted empty");
}

// === 6. nothing secret in Redis ===

/// Every key and value in Redis: keys are `{prefix}KIND:HEX64`; no value holds
/// anything shaped like a JWT, nor any refresh token the IdP issued, nor any of
/// `secrets`.
async fn assert_no_secret_in_redis(redis: &RedisServer, idp: &TestIdp, secrets: &[String]) -> Vec<String> {
    let all = redis.dump_all().await;
    let mut secrets = secrets.to_vec();
    secrets.extend(idp.issued_refresh_tokens());
    let mut keys = Vec::new();
    for (key, value) in &all {
        let rest = key.strip_prefix(PREFIX).unwrap_or_else(|| panic!("key outside the prefix: {key}"));
        let hash = ["refresh:", "lock:", "rev:jti:", "rev:sub:"]
            .iter()
            .find_map(|k| rest.strip_prefix(k))
            .unwrap_or_else(|| panic!("unexpected key {key}"));
        assert!(
            hash.len() == 64 && hash.bytes().all(|c| c.is_ascii_hexdigit()),
            "key is not a SHA-256 hash: {key}"
        );
        let text = String::from_utf8_lossy(value);
        assert!(!has_jwt_shape(&text), "a JWT in Redis: {key} = {text}");
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a token or cookie value in Redis at {key}");
        }
        keys.push(key.clone());
    }
    keys
}

/// `eyJ…​.eyJ`: a JWT's JSON header, a dot, its JSON payload. Sealed values are
/// base64url, which has no dot, so random ciphertext cannot match by chance.
fn has_jwt_shape(text: &str) -> bool {
    text.match_indices("eyJ").any(|(i, _)| {
        let rest = &text[i + 3..];
        let run = rest.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_').count();
        rest[run..].starts_with(".eyJ")
    })
}

#[test]
fn jwt_shape_is_told_from_base64url() {
    let jwt = sign("rsa1", &json!({"sub": "alice"}));
    assert!(has_jwt_shape(&jwt) && has_jwt_shape(&format!("{{\"at\":\"{jwt}\"}}")));
    assert!(!has_jwt_shape("xeyJhbGciOiJSUzI1NiJ9rt-eyJzdWIiOiJhIn0eyJ"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_holds_no_token_in_clear() {
    let f = fleet().await;
    let jar = session_needing_refresh(&f.idp, &f.a, "alice").await;
    let mut secrets = jar.values();
    secrets.push(f.idp.access_token("alice", 300));

    // Look while the lock is held, then after the storm.
    f.idp.set_outage(Outage::Slow(Duration::from_millis(500)));
    let storm = {
        let (nodes, jar) = ([f.a.clone(), f.b.clone()], jar.clone());
        tokio::spawn(async move { storm(&nodes, &jar, 100).await })
    };
    let lock_pattern = format!("{PREFIX}lock:*");
    eventually("the fleet lock is taken", DEADLINE, || async {
        !f.redis.keys(&lock_pattern).await.is_empty()
    })
    .await;
    assert_no_secret_in_redis(&f.redis, &f.idp, &secrets).await;
    let replies = storm.await.expect("storm task");
    let token = assert_storm_shared_one_refresh(&replies);
    f.idp.set_outage(Outage::None);
    secrets.push(token.clone());
    secrets.push(last_refresh_token(&f.idp));
    for (_, r) in &replies {
        secrets.extend(set_cookies(r).into_iter().map(|c| c.value));
    }
    let c = claims(&token);
    assert_eq!(revoke(&f.b, &json!({"jti": c["jti"], "exp": c["exp"]})).await.status, 201);
    assert_eq!(revoke(&f.a, &json!({"sub": "alice", "issued_before": idp::now()})).await.status, 201);

    let keys = assert_no_secret_in_redis(&f.redis, &f.idp, &secrets).await;
    let outcome: Vec<&String> = keys.iter().filter(|k| k.starts_with(&format!("{PREFIX}refresh:"))).collect();
    assert_eq!(outcome.len(), 1, "one stored refresh outcome: {keys:?}");
    assert!(
        keys.iter().any(|k| k.contains("rev:jti:")) && keys.iter().any(|k| k.contains("rev:sub:")),
        "{keys:?}"
    );
    // The outcome is kept for refresh_grace (30 s), no longer.
    let mut conn = f.redis.conn().await;
    let pttl: i64 = redis::cmd("PTTL").arg(outcome[0]).query_async(&mut conn).await.expect("PTTL");
    assert!((1..=30_000).contains(&pttl), "outcome TTL {pttl} ms");
}

// === 7. readiness waits for the shared list ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_until_the_shared_revocation_list_is_loaded() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let port = free_port();
    let proxy = instance(&idp, &up, &format!("redis://127.0.0.1:{port}/0")).await;
    let n = Node::of("A", &proxy);

    // Keys are loaded and valid tokens pass (no Redis on the request path)...
    let token = idp.access_token("alice", 300);
    eventually("A serves with the IdP's keys", DEADLINE, || async { n.bearer(&token).await.status == 200 })
        .await;
    // ...but it is not ready: the shared revocation list is not loaded.
    let r = readyz(&n).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("revocation"), "says why: {}", r.text());

    let _redis = RedisServer::start_on(port).await;
    eventually("A is ready once Redis is up", DEADLINE, || async { readyz(&n).await.status == 200 }).await;
}
