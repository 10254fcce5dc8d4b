// A real OpenID Connect provider (panva/oidc-provider) for the browser test:
// code flow with PKCE, refresh-token rotation with reuse detection, JWT access
// tokens for the `orders-api` audience (RFC 8707 resource indicators),
// revocation and introspection, and the development login/consent pages
// (any login name and password is accepted).
//
// It runs inside the test process so the test can see what it did: every call
// to the token, revocation and introspection endpoints is recorded in `calls`.

import crypto from 'node:crypto';
import http from 'node:http';
import Provider from 'oidc-provider';

export const RESOURCE = 'urn:example:orders-api';
export const AUDIENCE = 'orders-api';
export const API_SCOPE = 'orders:read';

/**
 * @param {object} o
 * @param {string} o.redirectUri   the proxy's callback URL
 * @param {number} o.accessTokenTTL seconds
 */
export async function startIdp({ redirectUri, accessTokenTTL }) {
  const server = http.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  const issuer = `http://localhost:${port}`;

  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'e2e-rs256', alg: 'RS256', use: 'sig' };

  const client = {
    client_id: 'portcullis-spa',
    client_secret: crypto.randomBytes(24).toString('base64url'),
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  };

  const provider = new Provider(issuer, {
    clients: [client],
    jwks: { keys: [signingKey] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'offline_access', API_SCOPE],
    pkce: { methods: ['S256'], required: () => true },
    rotateRefreshToken: true,
    findAccount: async (ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
    features: {
      devInteractions: { enabled: true },
      revocation: { enabled: true },
      // Only the client itself may introspect its tokens (the test does, after logout).
      introspection: { enabled: true, allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => RESOURCE,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resourceIndicator) => {
          if (resourceIndicator !== RESOURCE) throw new Provider.errors.InvalidTarget();
          return {
            audience: AUDIENCE,
            scope: API_SCOPE,
            accessTokenFormat: 'jwt',
            accessTokenTTL,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    ttl: {
      AccessToken: accessTokenTTL,
      AuthorizationCode: 60,
      IdToken: 600,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
      RefreshToken: 3600,
    },
  });

  /** @type {{path: string, status: number, grant_type?: string, error?: string, body?: any, at: number}[]} */
  const calls = [];
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.method !== 'POST' || !['/token', '/token/revocation', '/token/introspection'].includes(ctx.path)) {
      return;
    }
    const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : undefined;
    calls.push({
      path: ctx.path,
      status: ctx.status,
      grant_type: ctx.oidc?.params?.grant_type,
      has_code_verifier: Boolean(ctx.oidc?.params?.code_verifier),
      client_auth: String(ctx.get('authorization')).split(' ')[0] || undefined,
      user_agent: ctx.get('user-agent'),
      error: body?.error,
      body,
      at: Date.now(),
    });
  });

  server.on('request', provider.callback());

  const discovery = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();

  /** Token-endpoint calls of one grant type made by the proxy (it sends `User-Agent: portcullis`). */
  const grants = (type) =>
    calls.filter((c) => c.path === '/token' && c.grant_type === type && c.user_agent === 'portcullis');

  const basic = `Basic ${Buffer.from(`${encodeURIComponent(client.client_id)}:${encodeURIComponent(client.client_secret)}`).toString('base64')}`;
  const form = async (url, params) => {
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams(params),
    });
    return { status: res.status, body: await res.json().catch(() => null) };
  };

  return {
    issuer,
    discovery,
    client,
    calls,
    grants,
    /** RFC 7662 introspection, as the client. */
    introspect: (token) => form(discovery.introspection_endpoint, { token, token_type_hint: 'refresh_token' }),
    /** A refresh_token grant made directly, as the client (not through the proxy). */
    refreshDirectly: (token) =>
      form(discovery.token_endpoint, { grant_type: 'refresh_token', refresh_token: token, resource: RESOURCE }),
    close: () =>
      new Promise((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
