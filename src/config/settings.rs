//! Runtime settings: what a validated configuration holds. Built only by
//! `build.rs`; read by `state.rs` when it assembles a `Snapshot`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;
use jsonwebtoken::Algorithm;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

use super::secret::Secret;
use crate::keys::KeySet;

/// A validated configuration: what `check` accepts and `run` serves.
pub struct Config {
    pub listen: Listen,
    pub limits: Limits,
    pub tls: Option<TlsSettings>,
    pub issuers: Vec<IssuerSettings>,
    pub auth_server: Option<AuthServerSettings>,
    pub session: Option<SessionSettings>,
    pub state: StateSettings,
    pub rate_limits: Vec<RateLimitSettings>,
    pub routes: Vec<RouteSettings>,
    /// `[tracing]`: spans exported over OTLP/HTTP; trace context is kept without it.
    pub tracing: Option<TracingSettings>,
    /// Legal but probably unintended settings, as `file:line: key: message` lines.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// `[forward_auth] listen`: answers another proxy's auth subrequests.
    pub forward_auth: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
    /// After SIGTERM, how long to keep accepting (with `/readyz` 503) before draining.
    pub drain_delay: Duration,
    pub token_cache_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 65_536,
            drain_timeout: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            token_cache_entries: 100_000,
        }
    }
}

pub struct TlsSettings {
    pub default: Arc<CertifiedKey>,
    pub sni: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

pub enum KeySource {
    JwksUrl(Uri),
    /// `jwks_uri` from the issuer's discovery document.
    Discover(String),
    Static(Arc<KeySet>),
}

/// An issuer's opaque tokens are checked by RFC 7662 introspection.
pub struct IntrospectionSettings {
    pub url: Uri,
    pub client_id: String,
    pub client_secret: Option<Secret<String>>,
    pub client_auth: ClientAuth,
    pub cache: Duration,
    pub timeout: Duration,
}

pub struct IssuerSettings {
    pub name: String,
    pub issuer: String,
    /// Where JWT keys come from; an issuer with only `introspection` has none to use.
    pub source: KeySource,
    pub introspection: Option<IntrospectionSettings>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    pub jwks_refresh: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    SecretBasic,
    SecretPost,
    None,
}

#[derive(Clone)]
pub struct AuthServerSettings {
    /// `None`: discovered from `issuer` with the other unset endpoints.
    pub token_url: Option<Uri>,
    pub revocation_url: Option<Uri>,
    pub authorization_url: Option<Uri>,
    pub login_url: Option<Uri>,
    pub issuer: Option<String>,
    pub client_id: String,
    pub client_secret: Option<Secret<String>>,
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub resource: Option<String>,
    pub authorize_params: Vec<(String, String)>,
    pub redirect_uri: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

pub struct SessionSettings {
    pub cookie_keys: Secret<Vec<[u8; 32]>>,
    pub access_cookie: String,
    pub refresh_cookie: String,
    pub same_site: SameSite,
    pub secure: bool,
    pub refresh_ahead: Duration,
    pub refresh_grace: Duration,
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    pub login_path: String,
    pub callback_path: String,
    pub refresh_path: String,
    pub logout_path: String,
    /// Normalised `scheme://host[:port]`, lower-case.
    pub allowed_origins: Vec<String>,
    /// OpenID Connect Back-Channel Logout 1.0 receiver.
    pub backchannel_logout_path: Option<String>,
    /// RP-initiated logout: where `GET logout_path` sends the browser (else discovery's).
    pub end_session_url: Option<Uri>,
    pub post_logout_redirect_uri: Option<String>,
}

/// `[tracing]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    pub otlp_endpoint: Uri,
    pub service_name: String,
    /// Of new traces, 0.0–1.0.
    pub sample_ratio: f64,
}

#[derive(Default)]
pub struct StateSettings {
    pub redis: Option<RedisSettings>,
}

pub struct RedisSettings {
    pub url: String,
    pub password: Option<Secret<String>>,
    pub key_prefix: String,
}

/// What a rate limit's buckets are keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    Sub,
    ClientIp,
    Claim(String),
    Header(HeaderName),
}

#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    pub name: String,
    pub key: LimitKey,
    /// One token back every `period`.
    pub period: Duration,
    pub burst: std::num::NonZeroU32,
    /// Route names (and `@login`); `None`: every route.
    pub routes: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Required,
    Optional,
    None,
}

pub struct RouteSettings {
    pub name: String,
    pub host: Option<String>,
    pub path_prefix: String,
    pub upstreams: Vec<Uri>,
    pub strip_prefix: bool,
    pub ca: Vec<CertificateDer<'static>>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_request_body: Option<u64>,
    pub auth: AuthMode,
    /// The issuers whose tokens the route accepts (`issuer` or `issuers`).
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub scopes: Vec<String>,
    pub forward_token: bool,
    /// A CORS preflight passes upstream without a token.
    pub cors_preflight: bool,
    /// Upgrade tunnels are closed after this long.
    pub max_tunnel_lifetime: Option<Duration>,
    /// `upstream_protocol = "h2"`: HTTP/2 to the upstream (ALPN over https, prior knowledge over http).
    pub upstream_h2: bool,
    pub identity_headers: Vec<(HeaderName, String)>,
    pub rules: Vec<RuleSettings>,
    /// The `[[routes]]` table's line, for `check --explain`.
    pub line: Option<usize>,
}

/// What a matching rule decides.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleAction {
    /// `deny = true`: 403 forbidden, token or not.
    Deny,
    /// `auth = "none"`: no token needed.
    Public,
    /// A valid token for the route, with these scopes (replacing the route's, when
    /// given) and claims.
    Require { scopes: Option<Vec<String>>, claims: Vec<ClaimMatch> },
}

/// `claim = value`: the claim (a dotted path into nested objects) equals the
/// value or, when it is an array, contains it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimMatch {
    pub path: Vec<String>,
    pub value: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct RuleSettings {
    /// Empty: any method.
    pub methods: Vec<http::Method>,
    /// Normalised, without a trailing `/`; `None`: the whole route.
    pub path_prefix: Option<String>,
    pub action: RuleAction,
    /// Numbered from 1 in the route, as `--explain` prints it.
    pub number: usize,
    pub line: Option<usize>,
}

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
