// `portcullis demo` as a newcomer meets it, in headless Chromium: open the URL
// it prints, sign in through the demo identity provider's form as the user it
// prints, and see what the page promises (SPEC §6): the identity headers the
// API received, no token in `document.cookie`, a 20-call storm after expiry
// that costs the identity provider one refresh, logout (local and at the
// provider), and a clean stop on SIGTERM.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

import { launchChromium } from '../lib/browser.js';
import { listening, startDemo } from '../lib/demo.js';
import { freePort } from '../lib/proxy.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.resolve(HERE, '../artifacts');
const ACCESS_TTL = 5; // seconds (the demo's default is 60)
// The generated configuration's cookie names (src/demo.rs).
const ACCESS = 'demo-access';
const REFRESH = 'demo-refresh';

// Hard bound on the whole file, whatever hangs: exiting kills the demo (its
// exit hook) and Chromium (playwright's).
setTimeout(() => {
  console.error('e2e watchdog: demo test still running after 120 s, giving up');
  process.exit(1);
}, 120_000).unref();

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// Anything shaped like a compact JWT (header.payload.signature).
const JWT = /eyJ[\w-]+\.[\w-]+\.[\w-]+/;

describe('portcullis demo in Chromium', { timeout: 110_000 }, () => {
  let tmp, demo, banner, context, page;

  /** Runs a step; a failure carries the end of the demo's log. */
  const step = (name, fn) =>
    it(name, async () => {
      try {
        await fn();
      } catch (e) {
        const tail = demo ? demo.log().trim().split('\n').slice(-25).join('\n') : '(demo not started)';
        e.message += `\n--- portcullis demo log (last lines) ---\n${tail}`;
        throw e;
      }
    });

  const cookies = async () => Object.fromEntries((await context.cookies(banner.url)).map((c) => [c.name, c]));
  const text = (sel) => page.textContent(sel);

  /** Waits until `sel`'s text matches `re`; on timeout, fails showing the text it has. */
  const waitText = async (sel, re, what = `${sel} matching ${re}`) => {
    try {
      await page.waitForFunction(
        ([s, src, flags]) => new RegExp(src, flags).test(document.querySelector(s)?.textContent ?? ''),
        [sel, re.source, re.flags],
      );
    } catch (e) {
      const now = await text(sel).catch(() => '(no element)');
      throw new Error(`waiting for ${what}: ${e.message.split('\n')[0]}\n${sel} shows: ${now}`);
    }
  };

  /**
   * Clicks a button whose answer the page writes to #out, waits for that
   * answer, and parses it: `{label, status, body}`.
   */
  const clickForAnswer = async (button, label) => {
    const prev = await text('#out');
    await page.click(button);
    await page
      .waitForFunction(
        ([p, l]) => {
          const t = document.querySelector('#out').textContent;
          return t !== p && t.startsWith(`${l}\n`);
        },
        [prev, label],
      )
      .catch(async (e) => {
        throw new Error(`no "${label}" answer after clicking ${button}: ${e.message.split('\n')[0]}\n#out: ${await text('#out')}`);
      });
    return parseOut(await text('#out'));
  };
  const parseOut = (out) => {
    const [label, arrow, ...rest] = out.split('\n');
    return { label, status: arrow.replace(/^→ /, ''), body: JSON.parse(rest.join('\n')) };
  };
  // The demo API shows the access token's claims, never the token itself.
  const claimsOf = (answer) => answer.body.access_token_claims;

  /** Log in → the demo IdP's form → back on the page, signed in. */
  const signIn = async () => {
    await Promise.all([page.waitForURL((u) => u.href.startsWith(`${banner.idp}/authorize`)), page.click('#login')]);
    await page.fill('input[name=username]', banner.user);
    await page.fill('input[name=password]', banner.password);
    await Promise.all([page.waitForURL(banner.url), page.click('button[type=submit]')]);
    await page.evaluate(() => window.spa.ready);
    await waitText('#status', new RegExp(`^Signed in as ${banner.user}$`));
  };

  before(async () => {
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'portcullis-e2e-demo-'));
    demo = await startDemo({
      port: await freePort(),
      env: { PORTCULLIS_DEMO_ACCESS_TTL: String(ACCESS_TTL) },
      logFile: path.join(ARTIFACTS, 'demo.log'),
    });
    banner = demo.banner;
    ({ context, page } = await launchChromium(path.join(tmp, 'chromium-profile')));
  });

  after(async () => {
    if (page) await page.screenshot({ path: path.join(ARTIFACTS, 'demo.png'), fullPage: true }).catch(() => {});
    await context?.close().catch(() => {});
    await demo?.stop();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  step('the banner names the page, the demo user and password, and the identity provider', async () => {
    assert.match(banner.url, /^http:\/\/127\.0\.0\.1:\d+\/$/);
    assert.match(banner.idp, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.equal(banner.user, 'demo');
    assert.ok(banner.password.length >= 8, `password ${banner.password}`);
    assert.equal(banner.ttl, ACCESS_TTL);
    const stats = await demo.stats();
    assert.equal(stats.logins, 0);
    assert.equal(stats.refresh_grants, 0);
  });

  step('the page opens signed out and offers sign-in', async () => {
    await page.goto(banner.url);
    await page.evaluate(() => window.spa.ready);
    assert.equal(await page.getAttribute('#status', 'data-state'), 'signed-out');
    assert.match(await text('#status'), /Log in/);
    assert.ok(await page.isVisible('#login'));
    assert.equal(parseOut(await text('#out')).status, '401');
  });

  step("signs in through the demo identity provider's form", async () => {
    await Promise.all([page.waitForURL((u) => u.href.startsWith(`${banner.idp}/authorize`)), page.click('#login')]);
    assert.match(await text('body'), new RegExp(`Sign in as ${banner.user} with the password ${banner.password}`));
    assert.equal(await page.inputValue('input[name=username]'), banner.user, 'the user is filled in');

    // A mistyped password: the form again, with a message.
    await page.fill('input[name=password]', 'not-the-password');
    await page.click('button[type=submit]');
    await page.locator('p.error', { hasText: 'Wrong user or password.' }).waitFor();
    assert.ok(page.url().startsWith(banner.idp), `still at the identity provider: ${page.url()}`);

    await page.fill('input[name=username]', banner.user);
    await page.fill('input[name=password]', banner.password);
    await Promise.all([page.waitForURL(banner.url), page.click('button[type=submit]')]);
    await page.evaluate(() => window.spa.ready);
    await waitText('#status', new RegExp(`^Signed in as ${banner.user}$`));
    const stats = await demo.stats();
    assert.equal(stats.logins, 1);
    assert.equal(stats.code_grants, 1);
  });

  step('the page shows the identity headers the API received', async () => {
    const me = parseOut(await text('#out'));
    assert.equal(me.label, 'GET /api/me');
    assert.equal(me.status, '200');
    assert.equal(me.body.headers['x-auth-subject'], banner.user);
    assert.equal(me.body.headers['x-auth-email'], 'demo@example.com');
    assert.equal(me.body.headers['x-auth-name'], 'Demo User');
    const { exp, iat } = claimsOf(me);
    assert.equal(exp - iat, ACCESS_TTL);

    const orders = await clickForAnswer('#call', 'GET /api/orders');
    assert.equal(orders.status, '200');
    assert.equal(orders.body.path, '/api/orders');
    assert.equal(orders.body.headers['x-auth-subject'], banner.user);
    assert.equal(claimsOf(orders).sub, banner.user);

    // Before the token is due the proxy asks the IdP nothing (the clock is
    // read after the counters: every call so far came before expiry).
    const stats = await demo.stats();
    if (Date.now() < exp * 1000) {
      assert.equal(stats.refresh_grants, 0, 'no refresh while the access token is fresh');
      assert.equal(claimsOf(orders).jti, claimsOf(me).jti, 'the same access token');
    } else {
      console.log('slow run: the first access token expired before its calls were checked');
    }
  });

  step('document.cookie holds no token; the session cookies are HttpOnly', async () => {
    const seen = await page.evaluate(() => ({
      cookie: document.cookie,
      storage: JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }),
      html: document.documentElement.outerHTML,
    }));
    assert.equal(seen.cookie, '', `document.cookie: ${seen.cookie}`);
    assert.doesNotMatch(seen.storage, JWT, 'no token in web storage');
    assert.doesNotMatch(seen.html, JWT, 'no token on the page');
    assert.equal(await text('#cookies'), 'What JavaScript sees in document.cookie: nothing (the session cookies are HttpOnly).');

    const jar = await cookies();
    for (const name of [ACCESS, REFRESH]) {
      assert.ok(jar[name], `${name} set: ${Object.keys(jar)}`);
      assert.equal(jar[name].httpOnly, true, `${name} HttpOnly`);
      assert.equal(jar[name].sameSite, 'Lax', `${name} SameSite`);
    }
    assert.doesNotMatch(jar[ACCESS].value, JWT, 'the access cookie is sealed');
  });

  step("after the access token expires, the storm button's 20 calls all succeed with one refresh", async () => {
    const last = parseOut(await text('#out'));
    const { exp } = claimsOf(last);
    const wait = exp * 1000 + 500 - Date.now();
    assert.ok(wait <= (ACCESS_TTL + 2) * 1000, `the token lives ${wait} ms more, longer than its TTL`);
    if (wait > 0) await sleep(wait);

    const before = await demo.stats();
    const idpBefore = await text('#idp');
    const jarBefore = await cookies();
    const storm = await clickForAnswer('#storm', '20 x GET /api/orders');
    assert.deepEqual(storm.body, Array(20).fill(200), `statuses: ${storm.status}`);

    // The page then shows the IdP's counters: one refresh grant more.
    await page.waitForFunction((prev) => {
      const idp = document.querySelector('#idp');
      return !idp.hidden && idp.textContent !== prev;
    }, idpBefore);
    const shown = await text('#idp');
    const grants = Number(/(\d+) refresh grant\(s\)/.exec(shown)?.[1]);
    assert.equal(grants, before.refresh_grants + 1, `the page shows: ${shown}`);
    assert.match(shown, /\b0 reused refresh token\(s\)/);
    const stats = await demo.stats();
    assert.equal(stats.refresh_grants, before.refresh_grants + 1, `one refresh for 20 calls: ${JSON.stringify(stats)}`);
    assert.equal(stats.reuse_detected, 0, 'no rotated refresh token came back (that would revoke the session)');

    const jar = await cookies();
    assert.notEqual(jar[ACCESS].value, jarBefore[ACCESS].value, 'a new access cookie');
    assert.notEqual(jar[REFRESH].value, jarBefore[REFRESH].value, 'a new (rotated) refresh cookie');
    assert.equal(jar[REFRESH].httpOnly, true);

    // The session lives on with the new token.
    const again = await clickForAnswer('#call', 'GET /api/orders');
    assert.equal(again.status, '200');
    assert.equal(again.body.headers['x-auth-subject'], banner.user);
    assert.ok(claimsOf(again).exp > exp, 'a newer access token');
    const later = await demo.stats();
    if (Date.now() < claimsOf(again).exp * 1000) {
      assert.equal(later.refresh_grants, stats.refresh_grants, 'the fresh token needs no refresh');
    } else {
      console.log('slow run: the refreshed access token expired before it was checked');
    }
  });

  step('Log out: the cookies go, the API answers 401, the page offers sign-in', async () => {
    const before = await demo.stats();
    await page.click('#logout');
    await waitText('#status', /^Signed out\.$/);
    const jar = await cookies();
    assert.equal(jar[ACCESS], undefined, 'access cookie cleared');
    assert.equal(jar[REFRESH], undefined, 'refresh cookie cleared');
    assert.equal((await demo.stats()).revocations, before.revocations + 1, 'the refresh token was revoked at the IdP');

    const r = await clickForAnswer('#call', 'GET /api/orders');
    assert.equal(r.status, '401');
    assert.equal(await page.getAttribute('#status', 'data-state'), 'signed-out');
    assert.match(await text('#status'), /Log in/);
  });

  step('signed in again, "Log out at the identity provider" ends the session over the back channel', async () => {
    await signIn();
    const before = await demo.stats();
    const atIdp = page.waitForRequest((r) => r.url().startsWith(`${banner.idp}/logout`));
    const loaded = page.waitForEvent('load');
    await page.click('#logout-everywhere');
    await atIdp;
    await loaded;
    assert.equal(page.url(), banner.url, 'back on the page');
    await page.evaluate(() => window.spa.ready);
    assert.equal(await page.getAttribute('#status', 'data-state'), 'signed-out');
    assert.equal(parseOut(await text('#out')).status, '401');
    const stats = await demo.stats();
    assert.equal(stats.backchannel_logouts, before.backchannel_logouts + 1, JSON.stringify(stats));
    const jar = await cookies();
    assert.equal(jar[ACCESS], undefined);
    assert.equal(jar[REFRESH], undefined);
  });

  step('SIGTERM stops the demo: exit 0, its ports closed', async () => {
    await page.screenshot({ path: path.join(ARTIFACTS, 'demo.png'), fullPage: true });
    await context.close();
    context = page = undefined;
    assert.deepEqual(await demo.stop(), { code: 0, signal: null });
    for (const url of [banner.url, banner.idp, banner.api, banner.admin]) {
      assert.equal(await listening(url), false, `${url} still accepts connections`);
    }
  });
});
