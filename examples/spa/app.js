// An SPA behind portcullis. The page, the API (/api/...) and the session
// endpoints (/auth/...) share one origin: the proxy's. The access and refresh
// tokens live in HttpOnly cookies that this script can neither read nor needs
// to: every call sends `credentials: 'include'` and the proxy does the rest —
// it verifies the access token, refreshes it when it has expired, and forwards
// the request with identity headers (X-Auth-Subject) to the API.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);

  /** One call; answers `{status, body}` with the body parsed as JSON when it is. */
  async function call(method, path, { headers = {}, body } = {}) {
    const res = await fetch(path, {
      method,
      credentials: 'include', // the session cookies go along (same-origin here; also right cross-origin)
      headers: { accept: 'application/json', ...headers },
      body,
    });
    const text = await res.text();
    let parsed = text;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      /* not JSON */
    }
    return { status: res.status, body: parsed };
  }

  function show(label, result) {
    $('out').textContent = `${label}\n→ ${result.status}\n${JSON.stringify(result.body, null, 2)}`;
    if (result.status === 401) setStatus('signed-out', 'Not signed in (the API answered 401). Use “Log in”.');
    showCookies();
    return result;
  }

  function setStatus(state, text) {
    $('status').dataset.state = state;
    $('status').textContent = text;
  }

  /** Calls the API; a 2xx means the session is alive. */
  async function api(path = '/api/orders', options = {}) {
    const result = await call(options.method || 'GET', path, options);
    if (result.status >= 200 && result.status < 300) {
      // The demo API echoes the request it received; a real one would answer with data.
      const subject = result.body && result.body.headers && result.body.headers['x-auth-subject'];
      setStatus('signed-in', subject ? `Signed in as ${subject}` : 'Signed in');
    }
    return show(`${options.method || 'GET'} ${path}`, result);
  }

  /** Starts the code + PKCE login at the proxy; the browser comes back to `returnTo`. */
  function login(returnTo = location.pathname) {
    location.assign(`/auth/login?return_to=${encodeURIComponent(returnTo)}`);
  }

  /** Asks the proxy to refresh now (it also does so by itself when a token has expired). */
  async function refresh() {
    return show('POST /auth/refresh', await call('POST', '/auth/refresh'));
  }

  /** Revokes the refresh token at the authorization server and clears the cookies. */
  async function logout() {
    const result = await call('POST', '/auth/logout');
    if (result.status === 204) setStatus('signed-out', 'Signed out.');
    return show('POST /auth/logout', result);
  }

  /** `n` API calls at once, e.g. an app firing its requests as a page opens. */
  async function parallel(n = 20, path = '/api/orders') {
    const results = await Promise.all(Array.from({ length: n }, (_, i) => call('GET', `${path}?i=${i}`)));
    show(`${n} x GET ${path}`, { status: results.map((r) => r.status).join(' '), body: results.map((r) => r.status) });
    return results;
  }

  $('login').addEventListener('click', () => login());
  $('call').addEventListener('click', () => api());
  $('post').addEventListener('click', () => api('/api/orders', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ item: 'tea', quantity: 2 }),
  }));
  $('refresh').addEventListener('click', () => refresh());
  $('logout').addEventListener('click', () => logout());
  $('storm').addEventListener('click', () => parallel(20).then(showIdp));
  // RP-initiated logout: a navigation, so the identity provider can end its session too.
  $('logout-everywhere').addEventListener('click', () => location.assign('/auth/logout'));

  /** The proof that the tokens are out of reach: the cookies this script can read. */
  function showCookies() {
    const visible = document.cookie;
    $('cookies').textContent = visible
      ? `What JavaScript sees in document.cookie: ${visible}`
      : 'What JavaScript sees in document.cookie: nothing (the session cookies are HttpOnly).';
  }

  /** Under `portcullis demo`: the demo identity provider's counters (one refresh per storm). */
  async function showIdp() {
    try {
      const demo = await (await fetch('/demo.json')).json();
      const s = await (await fetch(`${demo.idp}/stats`)).json();
      $('idp').hidden = false;
      $('idp').textContent = `Identity provider (${demo.idp}): ${s.logins} login(s), ${s.refresh_grants} refresh grant(s), `
        + `${s.reuse_detected} reused refresh token(s), ${s.backchannel_logouts} back-channel logout(s).`;
    } catch {
      /* not the demo */
    }
  }
  showCookies();
  showIdp();

  window.spa = { call, api, login, refresh, logout, parallel };
  window.spa.ready = api('/api/me').catch((e) => setStatus('unknown', `API unreachable: ${e}`));
})();
