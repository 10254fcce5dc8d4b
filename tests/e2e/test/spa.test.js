// The browser flow end to end: headless Chromium runs the example SPA
// (examples/spa) served through portcullis, logs in at a real OpenID Connect
// provider with the authorization code flow + PKCE, calls the API with
// `credentials: 'include'`, lives through access-token expiry (transparent
// refresh, a 20-request storm sharing one refresh), and logs out (refresh token
// revoked at the provider).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

import { launchChromium } from '../lib/browser.js';
import { startIdp } from '../lib/idp.js';
import { check, configToml, freePort, keygen, REPO, startProxy } from '../lib/proxy.js';
import { startEcho, startStatic } from '../lib/servers.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.resolve(HERE, '../artifacts');
const ACCESS_TOKEN_TTL = 10; // seconds; the proxy's refresh_ahead is 2 s
const ACCESS = '__Host-access';
const REFRESH = '__Host-refresh';
const LOGIN_STATE = '__Host-portcullis-login';

// Hard bound on the whole file, whatever hangs: exiting kills the children
// (the proxy through its exit hook, Chromium through playwright's).
setTimeout(() => {
  console.error('e2e watchdog: still running after 170 s, giving up');
  process.exit(1);
}, 170_000).unref();

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const jwtPayload = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString('utf8'));

describe('portcullis in front of an SPA and an API (Chromium, oidc-provider)', { timeout: 160_000 }, () => {
  let tmp, echo, site, idp, proxy, context, page, origin;

  /** Runs a step; a failure carries the end of the proxy's log. */
  const step = (name, fn) =>
    it(name, async () => {
      try {
        await fn();
      } catch (e) {
        const tail = proxy ? proxy.log().trim().split('\n').slice(-25).join('\n') : '(proxy not started)';
        e.message += `\n--- portcullis log (last lines) ---\n${tail}`;
        throw e;
      }
    });

  const cookies = async () => Object.fromEntries((await context.cookies(origin)).map((c) => [c.name, c]));
  const inPage = (fn, arg) => page.evaluate(fn, arg);
  const issuedRefreshTokens = () =>
    idp.calls.filter((c) => c.path === '/token' && c.status === 200 && c.body?.refresh_token).map((c) => c.body.refresh_token);
  const okRefreshGrants = () => idp.grants('refresh_token').filter((c) => c.status === 200).length;
  const lastUpstreamToken = () => {
    const withAuth = echo.seen.filter((r) => r.headers.authorization);
    return withAuth.at(-1).headers.authorization.replace(/^Bearer /, '');
  };
  /** Waits until the access token the upstream last saw has expired (bounded by its TTL). */
  const waitPastExpiry = async (jwt = lastUpstreamToken()) => {
    const { exp } = jwtPayload(jwt);
    const ms = exp * 1000 + 600 - Date.now();
    assert.ok(ms <= (ACCESS_TOKEN_TTL + 2) * 1000, `token lives ${ms} ms more, longer than its TTL`);
    if (ms > 0) await sleep(ms);
  };
  const metric = async (series) => (await proxy.metrics()).get(series) ?? 0;

  before(async () => {
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'portcullis-e2e-'));

    const httpPort = await freePort();
    const adminPort = await freePort();
    origin = `http://localhost:${httpPort}`;

    echo = await startEcho();
    site = await startStatic(path.join(REPO, 'examples/spa'));
    idp = await startIdp({ redirectUri: `${origin}/auth/callback`, accessTokenTTL: ACCESS_TOKEN_TTL });

    proxy = await startProxy({
      dir: tmp,
      toml: configToml({ httpPort, adminPort, idp, echoPort: echo.port, staticPort: site.port, origin }),
      env: { E2E_CLIENT_SECRET: idp.client.client_secret, E2E_COOKIE_KEY: keygen() },
      adminPort,
      logFile: path.join(ARTIFACTS, 'portcullis.log'),
    });

    ({ context, page } = await launchChromium(path.join(tmp, 'chromium-profile')));
  });

  after(async () => {
    if (page) await page.screenshot({ path: path.join(ARTIFACTS, 'spa.png'), fullPage: true }).catch(() => {});
    await context?.close().catch(() => {});
    await proxy?.stop();
    await Promise.all([idp?.close(), echo?.close(), site?.close()]);
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  step('examples/spa/portcullis.toml passes `portcullis check`', async () => {
    const out = check(path.join(REPO, 'examples/spa/portcullis.toml'), {
      PORTCULLIS_CLIENT_SECRET: 'example',
      PORTCULLIS_COOKIE_KEY: keygen(),
    });
    assert.match(out, /: ok$/m);
  });

  step('the SPA loads through the proxy, signed out', async () => {
    await page.goto(`${origin}/`);
    await inPage(() => window.spa.ready);
    assert.equal(await page.getAttribute('#status', 'data-state'), 'signed-out');
    assert.match(await page.textContent('#out'), /→ 401[\s\S]*missing_token/);
    assert.equal(echo.seen.length, 0, 'no unauthenticated call reached the API');
  });

  step('logs in with the authorization code flow and PKCE', async () => {
    await Promise.all([page.waitForURL(/\/interaction\//), page.click('#login')]);
    assert.ok(page.url().startsWith(idp.issuer), `at the provider: ${page.url()}`);
    await page.fill('input[name=login]', 'alice');
    await page.fill('input[name=password]', 'any password');
    await Promise.all([page.waitForURL(/\/interaction\//), page.click('button[type=submit]')]);
    assert.match(await page.textContent('body'), /offline access/, 'the consent page asks for offline access');
    await Promise.all([page.waitForURL(`${origin}/`), page.click('button[type=submit]')]);
    await inPage(() => window.spa.ready);
    assert.equal(await page.textContent('#status'), 'Signed in as alice');

    const [code] = idp.grants('authorization_code');
    assert.equal(code?.status, 200, `code exchange: ${JSON.stringify(code)}`);
    assert.ok(code.has_code_verifier, 'PKCE code_verifier sent');
    assert.equal(code.client_auth, 'Basic', 'client_secret_basic');
    assert.ok(code.body.refresh_token, 'offline_access granted a refresh token');

    const jar = await cookies();
    for (const name of [ACCESS, REFRESH]) {
      assert.ok(jar[name], `${name} set (a Secure __Host- cookie on http://localhost)`);
      assert.equal(jar[name].httpOnly, true, `${name} HttpOnly`);
      assert.equal(jar[name].secure, true, `${name} Secure`);
      assert.equal(jar[name].sameSite, 'Lax', `${name} SameSite`);
      assert.equal(jar[name].path, '/');
    }
    assert.equal(jar[LOGIN_STATE], undefined, 'the login-state cookie is gone after the callback');
    assert.ok(!jar[REFRESH].value.includes(code.body.refresh_token), 'the refresh cookie is sealed');
    await page.screenshot({ path: path.join(ARTIFACTS, 'signed-in.png') });
  });

  step("calls the API with credentials: 'include'; the upstream sees the verified subject", async () => {
    const r = await inPage(() => window.spa.api('/api/orders?limit=5'));
    assert.equal(r.status, 200);
    assert.equal(r.body.url, '/api/orders?limit=5');
    assert.equal(r.body.headers['x-auth-subject'], 'alice');
    const claims = jwtPayload(r.body.headers.authorization.replace(/^Bearer /, ''));
    assert.equal(claims.iss, idp.issuer);
    assert.equal(claims.sub, 'alice');
    assert.deepEqual([claims.aud].flat(), ['orders-api']);
    assert.ok(claims.scope.split(' ').includes('orders:read'), `scope ${claims.scope}`);
    assert.ok(claims.exp - claims.iat <= ACCESS_TOKEN_TTL, 'short-lived access token');
    const upstreamCookies = r.body.headers.cookie ?? '';
    for (const name of [ACCESS, REFRESH, LOGIN_STATE]) {
      assert.ok(!upstreamCookies.includes(`${name}=`), `${name} not forwarded upstream: ${upstreamCookies}`);
    }

    const spoof = await inPage(() =>
      window.spa.call('GET', '/api/orders', { headers: { 'X-Auth-Subject': 'mallory', 'X-Auth-Role': 'admin' } }),
    );
    assert.equal(spoof.status, 200);
    assert.equal(spoof.body.headers['x-auth-subject'], 'alice', 'a client-sent identity header is replaced');
    assert.equal(spoof.body.headers['x-auth-role'], undefined, 'X-Auth-* from the client is stripped');
  });

  step('JavaScript never sees a token; the refresh cookie is HttpOnly', async () => {
    const seen = await inPage(() => ({
      cookie: document.cookie,
      storage: JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }),
      html: document.documentElement.outerHTML,
    }));
    assert.ok(!seen.cookie.includes(REFRESH) && !seen.cookie.includes(ACCESS), `document.cookie: ${seen.cookie}`);
    for (const rt of issuedRefreshTokens()) {
      for (const [where, text] of Object.entries(seen)) {
        assert.ok(!text.includes(rt), `the refresh token is visible in ${where}`);
      }
    }
    const jar = await cookies();
    assert.equal(jar[REFRESH].httpOnly, true);
  });

  step('a cookie-authenticated POST needs the SPA origin (CSRF)', async () => {
    const ok = await inPage(() => window.spa.api('/api/orders', { method: 'POST', body: '{"item":"tea"}' }));
    assert.equal(ok.status, 200);
    assert.equal(ok.body.method, 'POST');
    assert.equal(ok.body.body, '{"item":"tea"}');

    // Another origin on the same site (localhost, another port): SameSite=Lax
    // cookies go along, so only the Origin check stands in the way.
    const posts = echo.seen.filter((r) => r.method === 'POST').length;
    const csrfBefore = await metric('portcullis_auth_rejections_total{reason="csrf"}');
    const foreign = await context.newPage();
    try {
      await foreign.goto(`http://localhost:${site.port}/not-the-spa`);
      await foreign.evaluate(
        (url) => fetch(url, { method: 'POST', mode: 'no-cors', credentials: 'include', body: 'forged' }),
        `${origin}/api/orders`,
      );
    } finally {
      await foreign.close();
    }
    assert.equal(echo.seen.filter((r) => r.method === 'POST').length, posts, 'the forged POST never reached the API');
    assert.equal(await metric('portcullis_auth_rejections_total{reason="csrf"}'), csrfBefore + 1, 'rejected as csrf');
  });

  step('after the access token expires, the next call refreshes transparently (rotated)', async () => {
    const before = await cookies();
    const oldToken = lastUpstreamToken();
    const grants = okRefreshGrants();
    const rotated = await metric('portcullis_refreshes_total{outcome="rotated"}');
    await waitPastExpiry(oldToken);

    const r = await inPage(() => window.spa.api('/api/orders'));
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.headers['x-auth-subject'], 'alice');
    const newToken = r.body.headers.authorization.replace(/^Bearer /, '');
    assert.notEqual(newToken, oldToken);
    assert.ok(jwtPayload(newToken).exp > jwtPayload(oldToken).exp);

    assert.equal(okRefreshGrants(), grants + 1, 'one refresh_token grant at the provider');
    const tokens = issuedRefreshTokens();
    assert.notEqual(tokens.at(-1), tokens.at(-2), 'the provider rotated the refresh token');
    assert.equal(await metric('portcullis_refreshes_total{outcome="rotated"}'), rotated + 1);

    const afterJar = await cookies();
    assert.notEqual(afterJar[REFRESH].value, before[REFRESH].value, 'the refresh cookie was replaced');
    assert.notEqual(afterJar[ACCESS].value, before[ACCESS].value, 'the access cookie was replaced');
    assert.equal(afterJar[REFRESH].httpOnly, true);
  });

  step('20 parallel calls after expiry all succeed with one refresh at the provider', async () => {
    const grants = okRefreshGrants();
    const failures = () => idp.grants('refresh_token').filter((c) => c.status !== 200).length;
    const failed = failures();
    const rotated = await metric('portcullis_refreshes_total{outcome="rotated"}');
    const shared = await metric('portcullis_refreshes_total{outcome="grace"}');
    const seen = echo.seen.length;
    await waitPastExpiry();

    const results = await inPage(() => window.spa.parallel(20));
    assert.deepEqual(results.map((r) => r.status), Array(20).fill(200), JSON.stringify(results.find((r) => r.status !== 200)));
    assert.ok(results.every((r) => r.body.headers['x-auth-subject'] === 'alice'));
    assert.equal(echo.seen.length, seen + 20);

    assert.equal(okRefreshGrants(), grants + 1, 'exactly one refresh_token grant for the whole storm');
    assert.equal(failures(), failed, 'no refresh grant was refused (no reuse of a rotated token)');
    assert.equal(await metric('portcullis_refreshes_total{outcome="rotated"}'), rotated + 1);
    // Chromium sends several of them at once with the expired cookie (6 connections
    // per host): those share the one refresh, in flight or from refresh_grace.
    const sharedNow = await metric('portcullis_refreshes_total{outcome="grace"}');
    assert.ok(sharedNow > shared, 'concurrent holders of the old refresh token shared its refresh');
    console.log(`storm: 1 refresh call, ${sharedNow - shared} requests shared it`);

    // The session survived: a rotated-token reuse would have revoked it at the provider.
    const again = await inPage(() => window.spa.api('/api/orders'));
    assert.equal(again.status, 200);
    assert.equal(okRefreshGrants(), grants + 1);
  });

  step('the Refresh button refreshes on demand', async () => {
    const grants = okRefreshGrants();
    const before = await cookies();
    await page.click('#refresh');
    await page.waitForFunction(() => document.querySelector('#out').textContent.startsWith('POST /auth/refresh'));
    const out = await page.textContent('#out');
    assert.match(out, /→ 200/);
    const { expires_in } = JSON.parse(out.slice(out.indexOf('{')));
    assert.ok(expires_in > 0 && expires_in <= ACCESS_TOKEN_TTL, `expires_in ${expires_in}`);
    assert.equal(okRefreshGrants(), grants + 1);
    assert.notEqual((await cookies())[REFRESH].value, before[REFRESH].value);
  });

  step('logout revokes the refresh token; the API answers 401 afterwards', async () => {
    const saved = await context.cookies(origin);
    const lastRt = issuedRefreshTokens().at(-1);
    assert.equal((await idp.introspect(lastRt)).body.active, true, 'the refresh token is live before logout');
    const revocations = idp.calls.filter((c) => c.path === '/token/revocation').length;

    await page.click('#logout');
    await page.waitForFunction(() => document.querySelector('#status').textContent === 'Signed out.');
    const jar = await cookies();
    assert.equal(jar[ACCESS], undefined, 'access cookie cleared');
    assert.equal(jar[REFRESH], undefined, 'refresh cookie cleared');

    const revocation = idp.calls.filter((c) => c.path === '/token/revocation').slice(revocations);
    assert.equal(revocation.length, 1, 'one revocation request');
    assert.equal(revocation[0].status, 200);
    assert.equal(revocation[0].client_auth, 'Basic');

    const r = await inPage(() => window.spa.api('/api/orders'));
    assert.equal(r.status, 401);
    assert.equal(r.body.error, 'missing_token');
    assert.equal(await page.getAttribute('#status', 'data-state'), 'signed-out');

    assert.equal((await idp.introspect(lastRt)).body.active, false, 'the provider reports the refresh token inactive');
    const direct = await idp.refreshDirectly(lastRt);
    assert.equal(direct.status, 400);
    assert.equal(direct.body.error, 'invalid_grant');

    // Cookies copied before the logout (say, by malware) die too: once their
    // access token has expired, the proxy knows the session ended at logout and
    // answers without asking the provider again.
    const stolen = saved
      .filter((c) => c.name === ACCESS || c.name === REFRESH)
      .map((c) => `${c.name}=${c.value}`)
      .join('; ');
    const lastGrant = idp.grants('refresh_token').filter((c) => c.status === 200).at(-1);
    const wait = lastGrant.at + lastGrant.body.expires_in * 1000 + 1200 - Date.now();
    if (wait > 0) await sleep(wait);
    const refused = idp.grants('refresh_token').filter((c) => c.status !== 200).length;
    const replay = await fetch(`${origin}/api/orders`, { headers: { cookie: stolen } });
    assert.equal(replay.status, 401);
    assert.equal((await replay.json()).error, 'session_expired');
    const cleared = replay.headers.getSetCookie().map((c) => c.split(';')[0]);
    assert.ok(cleared.includes(`${ACCESS}=`) && cleared.includes(`${REFRESH}=`), `cookies cleared: ${cleared}`);
    const last = idp.grants('refresh_token').filter((c) => c.status !== 200);
    assert.equal(last.length, refused, 'the proxy did not present the logged-out refresh token again');
  });

  step("the proxy's log names no token or secret", async () => {
    const log = proxy.log();
    const tokens = idp.calls
      .filter((c) => c.path === '/token' && c.status === 200)
      .flatMap((c) => [c.body.access_token, c.body.refresh_token, c.body.id_token])
      .filter(Boolean);
    assert.ok(tokens.length >= 8, `tokens issued: ${tokens.length}`);
    for (const t of [...tokens, idp.client.client_secret]) {
      assert.ok(!log.includes(t), 'a token or the client secret appears in the log');
    }
    assert.match(log, /subject="?alice/, 'the access log names the subject');
  });

  step('the proxy exits 0 on SIGTERM', async () => {
    await page.screenshot({ path: path.join(ARTIFACTS, 'spa.png'), fullPage: true });
    await context.close();
    context = page = undefined;
    assert.deepEqual(await proxy.stop(), { code: 0, signal: null });
  });
});
