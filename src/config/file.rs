//! Serde mirror of the TOML file. Every table rejects unknown keys so a typo is an
//! error with a line number, never a silently ignored setting. Values stay as the
//! operator wrote them (strings for durations, URLs, paths); `build.rs` checks them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

/// Durations as operators write them: "30s", "15m", "1h 30m", "7d".
const DURATION: &str = r"^ *([0-9]+ *(ns|us|µs|ms|s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days|w|week|weeks) *)+$";
/// Sizes: "10MB", "512KiB", "1048576".
const SIZE: &str = r"^ *[0-9]+ *(B|KB|kB|MB|GB|KiB|MiB|GiB)? *$";
/// IP:PORT.
const ADDRESS: &str = r"^(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]+$";

/// What a rule's claim may equal.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum ClaimValue {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
}

/// The portcullis configuration file (TOML).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Listener addresses.
    pub listen: Option<Listen>,
    /// Connection and request limits.
    pub limits: Option<Limits>,
    /// The certificate for `listen.https` (PEM files), and more by SNI.
    pub tls: Option<Tls>,
    #[serde(default)]
    /// Token issuers: JWT (JWKS URL or file, PEM keys, HMAC secret) or opaque tokens by introspection.
    pub issuers: Vec<Issuer>,
    /// The OAuth 2 authorization server the proxy refreshes tokens with.
    pub auth_server: Option<AuthServer>,
    /// Browser sessions: tokens in encrypted HttpOnly cookies, refreshed by the proxy.
    pub session: Option<Session>,
    /// Shared state for a fleet (Redis); default in-process memory.
    pub state: Option<State>,
    /// Answer authorization subrequests of another proxy (nginx auth_request, Caddy forward_auth, Traefik ForwardAuth, Envoy ext_authz).
    pub forward_auth: Option<ForwardAuth>,
    /// OpenTelemetry traces exported over OTLP/HTTP (protobuf); read at start only.
    pub tracing: Option<Tracing>,
    #[serde(default)]
    /// Token buckets per key, kept in memory per instance.
    pub rate_limits: Vec<RateLimit>,
    #[serde(default)]
    /// Routes by host and longest path prefix.
    pub routes: Vec<Route>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuth {
    /// IP:PORT of the forward-auth listener (keep it private to the front proxy).
    #[schemars(pattern(ADDRESS))]
    pub listen: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The collector's OTLP/HTTP base URL; spans are POSTed to {otlp_endpoint}/v1/traces in batches.
    #[schemars(pattern(r"^https?://"))]
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute (default "portcullis").
    pub service_name: Option<String>,
    /// Share of new traces recorded, 0.0–1.0 (default 1.0); an incoming sampled traceparent is always honoured.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_ratio: Option<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Named in `portcullis_rate_limited_total{limit}`.
    pub name: String,
    /// "sub" | "client_ip" | "claim:NAME" | "header:NAME".
    #[schemars(pattern(r"^(sub|client_ip|claim:.+|header:.+)$"))]
    pub key: String,
    /// Sustained rate: N per s, m or h, e.g. "100/s".
    #[schemars(pattern(r"^ *[0-9]+ */ *(s|m|h) *$"))]
    pub rate: String,
    /// Bucket size (default: one second's worth).
    pub burst: Option<u64>,
    /// Route names, "@login" for login_path and callback_path; default all routes.
    pub routes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Plain HTTP listener, IP:PORT.
    #[schemars(pattern(ADDRESS))]
    pub http: Option<String>,
    /// TLS listener, IP:PORT (needs [tls]).
    #[schemars(pattern(ADDRESS))]
    pub https: Option<String>,
    /// /healthz, /readyz, /metrics and the revocation API, IP:PORT.
    #[schemars(pattern(ADDRESS))]
    pub admin: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Open connections per listener.
    pub max_connections: Option<u64>,
    /// Time to read a request head (also the idle keep-alive bound), e.g. "10s".
    #[schemars(pattern(DURATION))]
    pub header_read_timeout: Option<String>,
    /// Largest request head, in bytes.
    pub max_header_bytes: Option<u64>,
    /// Longest wait for in-flight requests on shutdown.
    #[schemars(pattern(DURATION))]
    pub drain_timeout: Option<String>,
    /// After SIGTERM, keep accepting (with /readyz 503) this long before draining.
    #[schemars(pattern(DURATION))]
    pub drain_delay: Option<String>,
    /// Verified tokens remembered.
    pub token_cache_entries: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    #[serde(default)]
    /// More certificates, chosen by SNI.
    pub certificates: Vec<SniCertificate>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    pub server_names: Vec<String>,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    /// Named by routes (`issuer`, `issuers`).
    pub name: String,
    /// The required `iss` of its tokens.
    pub issuer: String,
    /// JWKS over HTTP(S), refreshed in the background.
    pub jwks_url: Option<String>,
    /// JWKS from a file.
    pub jwks_file: Option<String>,
    /// PEM public keys.
    pub public_key_files: Option<Vec<String>>,
    /// Environment variable holding an HMAC secret (HS256/384/512 only).
    pub hmac_secret_env: Option<String>,
    /// Accepted `alg` values, e.g. ["RS256"].
    pub algorithms: Option<Vec<String>>,
    /// Clock skew allowed on `exp`, `nbf`, `iat` (default 30s).
    #[schemars(pattern(DURATION))]
    pub leeway: Option<String>,
    /// Background JWKS refresh interval (default 5m); `jwks_refresh`/10 (1–5 s) is
    /// the spacing of unknown-`kid` refetches.
    #[schemars(pattern(DURATION))]
    pub jwks_refresh: Option<String>,
    /// RFC 7662 introspection for opaque (non-JWT) access tokens of this issuer.
    pub introspection: Option<Introspection>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Introspection {
    /// The RFC 7662 introspection endpoint.
    pub url: String,
    /// The client the proxy authenticates as.
    pub client_id: String,
    /// Environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    #[schemars(extend("enum" = ["client_secret_basic", "client_secret_post", "none"]))]
    pub client_auth: Option<String>,
    /// How long an active answer is reused (never past the token's `exp`); default 60s.
    #[schemars(pattern(DURATION))]
    pub cache: Option<String>,
    /// Time allowed for the introspection call; default `[auth_server] timeout`, else 5s.
    #[schemars(pattern(DURATION))]
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthServer {
    /// The token endpoint (refresh and code grants).
    pub token_url: Option<String>,
    /// RFC 7009 revocation endpoint, called on logout.
    pub revocation_url: Option<String>,
    /// Enables authorization code + PKCE login at login_path.
    pub authorization_url: Option<String>,
    /// Enables login passthrough (a JSON login API that answers with tokens).
    pub login_url: Option<String>,
    /// When set, the RFC 9207 `iss` callback parameter must equal it; also the back-channel logout issuer.
    pub issuer: Option<String>,
    /// The OAuth client the proxy is.
    pub client_id: String,
    /// Environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// How the proxy authenticates at the token endpoint.
    #[schemars(extend("enum" = ["client_secret_basic", "client_secret_post", "none"]))]
    pub client_auth: Option<String>,
    /// Requested scopes, e.g. "openid offline_access".
    pub scope: Option<String>,
    /// RFC 8707 resource indicator.
    pub resource: Option<String>,
    #[serde(default)]
    /// Extra query parameters for the authorization request.
    pub authorize_params: BTreeMap<String, String>,
    /// Default: scheme + Host of the login request + callback_path.
    pub redirect_uri: Option<String>,
    /// Time allowed for a call to the authorization server (default 5s).
    #[schemars(pattern(DURATION))]
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Session {
    /// Environment variable with base64 32-byte keys, comma-separated; the first encrypts, all decrypt.
    pub cookie_key_env: String,
    /// Name of the access-token cookie (default "__Host-access").
    pub access_cookie: Option<String>,
    /// Name of the refresh-token cookie (default "__Host-refresh").
    pub refresh_cookie: Option<String>,
    #[schemars(extend("enum" = ["lax", "strict", "none"]))]
    pub same_site: Option<String>,
    /// false only for local plain-HTTP development.
    pub secure: Option<bool>,
    /// Refresh an access token this close to its expiry (default 30s).
    #[schemars(pattern(DURATION))]
    pub refresh_ahead: Option<String>,
    /// A rotated refresh token still yields the new pair this long (default 30s).
    #[schemars(pattern(DURATION))]
    pub refresh_grace: Option<String>,
    /// Refresh cookie lifetime, renewed on each refresh (default 7d).
    #[schemars(pattern(DURATION))]
    pub idle_timeout: Option<String>,
    /// Hard cap from login (default 30d).
    #[schemars(pattern(DURATION))]
    pub absolute_timeout: Option<String>,
    /// Default "/auth/login".
    pub login_path: Option<String>,
    /// Default "/auth/callback".
    pub callback_path: Option<String>,
    /// Default "/auth/refresh".
    pub refresh_path: Option<String>,
    /// Default "/auth/logout".
    pub logout_path: Option<String>,
    #[serde(default)]
    /// Origins allowed to send cookie-authenticated unsafe requests and WebSocket upgrades.
    pub allowed_origins: Vec<String>,
    /// OpenID Connect Back-Channel Logout 1.0 receiver.
    pub backchannel_logout_path: Option<String>,
    /// RP-initiated logout on GET logout_path (else from discovery).
    pub end_session_url: Option<String>,
    /// Where the identity provider sends the browser after logout.
    pub post_logout_redirect_uri: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// redis:// or rediss:// (TLS): shared revocations and refresh coordination.
    #[schemars(pattern(r"^rediss?://"))]
    pub redis_url: Option<String>,
    /// Environment variable holding the Redis password.
    pub redis_password_env: Option<String>,
    /// Lets several deployments share one Redis (default "portcullis:").
    pub key_prefix: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique; the `route` label of metrics and logs.
    pub name: String,
    /// Matched without port, case-insensitively; default any host.
    pub host: Option<String>,
    /// Longest matching prefix wins; segment-aware (default "/").
    pub path_prefix: Option<String>,
    /// http:// or https:// URL; a route without upstream is forward-auth only.
    #[schemars(pattern(r"^https?://"))]
    pub upstream: Option<String>,
    /// Several upstreams, round-robin.
    pub upstreams: Option<Vec<String>>,
    #[serde(default)]
    /// Remove path_prefix before forwarding.
    pub strip_prefix: bool,
    /// Trust this CA (PEM) for an https upstream.
    pub ca_file: Option<String>,
    /// Upstream connect timeout (answered with 504).
    #[schemars(pattern(DURATION))]
    pub connect_timeout: Option<String>,
    /// Time to the upstream's response headers.
    #[schemars(pattern(DURATION))]
    pub timeout: Option<String>,
    /// Larger bodies get 413, e.g. "10MB".
    #[schemars(pattern(SIZE))]
    pub max_request_body: Option<String>,
    /// Default "required" when the route names an issuer.
    #[schemars(extend("enum" = ["required", "optional", "none"]))]
    pub auth: Option<String>,
    /// The issuer whose tokens this route accepts.
    pub issuer: Option<String>,
    /// Several issuers: JWT by `iss`, opaque by introspection.
    pub issuers: Option<Vec<String>>,
    #[serde(default)]
    /// The token's `aud` must hold one of these.
    pub audiences: Vec<String>,
    #[serde(default)]
    /// Every one is required.
    pub scopes: Vec<String>,
    /// Send `Authorization: Bearer <access token>` upstream (also when it came from the cookie).
    pub forward_token: Option<bool>,
    /// "pass": a CORS preflight goes upstream without a token.
    #[schemars(extend("enum" = ["pass", "deny"]))]
    pub cors_preflight: Option<String>,
    /// "h2": HTTP/2 to the upstream (gRPC needs it).
    #[schemars(extend("enum" = ["http1", "h2"]))]
    pub upstream_protocol: Option<String>,
    /// WebSocket and other upgraded connections are closed after this long.
    #[schemars(pattern(DURATION))]
    pub max_tunnel_lifetime: Option<String>,
    /// Header name = claim (dotted path) written for the upstream from verified claims.
    pub identity_headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    /// The first matching rule decides; none matching, the route's policy does.
    pub rules: Vec<Rule>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    /// Default any method.
    pub methods: Vec<String>,
    /// Segment-aware, within the route's path_prefix.
    pub path_prefix: Option<String>,
    /// Replace the route's scopes.
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    /// Claim (dotted path) = value it must equal or, for an array, contain.
    #[schemars(with = "BTreeMap<String, ClaimValue>")]
    pub claims: BTreeMap<String, toml::Value>,
    /// "none": no token needed.
    #[schemars(extend("enum" = ["none"]))]
    pub auth: Option<String>,
    #[serde(default)]
    /// Refuse with 403.
    pub deny: bool,
}
