//! Serde mirror of the TOML file. Every table rejects unknown keys so a typo is an
//! error with a line number, never a silently ignored setting. Values stay as the
//! operator wrote them (strings for durations, URLs, paths); `build.rs` checks them.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<Listen>,
    pub limits: Option<Limits>,
    pub tls: Option<Tls>,
    #[serde(default)]
    pub issuers: Vec<Issuer>,
    pub auth_server: Option<AuthServer>,
    pub session: Option<Session>,
    pub state: Option<State>,
    pub forward_auth: Option<ForwardAuth>,
    #[serde(default)]
    pub rate_limits: Vec<RateLimit>,
    #[serde(default)]
    pub routes: Vec<Route>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuth {
    pub listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub name: String,
    pub key: String,
    pub rate: String,
    pub burst: Option<u64>,
    pub routes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub http: Option<String>,
    pub https: Option<String>,
    pub admin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_connections: Option<u64>,
    pub header_read_timeout: Option<String>,
    pub max_header_bytes: Option<u64>,
    pub drain_timeout: Option<String>,
    pub drain_delay: Option<String>,
    pub token_cache_entries: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub certificates: Vec<SniCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    pub server_names: Vec<String>,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    pub name: String,
    pub issuer: String,
    pub jwks_url: Option<String>,
    pub jwks_file: Option<String>,
    pub public_key_files: Option<Vec<String>>,
    pub hmac_secret_env: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub leeway: Option<String>,
    /// Background JWKS refresh interval (default 5m); `jwks_refresh`/10 (1–5 s) is
    /// the spacing of unknown-`kid` refetches.
    pub jwks_refresh: Option<String>,
    /// RFC 7662 introspection for opaque (non-JWT) access tokens of this issuer.
    pub introspection: Option<Introspection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Introspection {
    pub url: String,
    pub client_id: String,
    pub client_secret_env: Option<String>,
    pub client_auth: Option<String>,
    /// How long an active answer is reused (never past the token's `exp`); default 60s.
    pub cache: Option<String>,
    /// Time allowed for the introspection call; default `[auth_server] timeout`, else 5s.
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthServer {
    pub token_url: Option<String>,
    pub revocation_url: Option<String>,
    pub authorization_url: Option<String>,
    pub login_url: Option<String>,
    pub issuer: Option<String>,
    pub client_id: String,
    pub client_secret_env: Option<String>,
    pub client_auth: Option<String>,
    pub scope: Option<String>,
    pub resource: Option<String>,
    #[serde(default)]
    pub authorize_params: BTreeMap<String, String>,
    pub redirect_uri: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Session {
    pub cookie_key_env: String,
    pub access_cookie: Option<String>,
    pub refresh_cookie: Option<String>,
    pub same_site: Option<String>,
    pub secure: Option<bool>,
    pub refresh_ahead: Option<String>,
    pub refresh_grace: Option<String>,
    pub idle_timeout: Option<String>,
    pub absolute_timeout: Option<String>,
    pub login_path: Option<String>,
    pub callback_path: Option<String>,
    pub refresh_path: Option<String>,
    pub logout_path: Option<String>,
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    pub backchannel_logout_path: Option<String>,
    pub end_session_url: Option<String>,
    pub post_logout_redirect_uri: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub redis_url: Option<String>,
    pub redis_password_env: Option<String>,
    pub key_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub upstream: Option<String>,
    pub upstreams: Option<Vec<String>>,
    #[serde(default)]
    pub strip_prefix: bool,
    pub ca_file: Option<String>,
    pub connect_timeout: Option<String>,
    pub timeout: Option<String>,
    pub max_request_body: Option<String>,
    pub auth: Option<String>,
    pub issuer: Option<String>,
    pub issuers: Option<Vec<String>>,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub forward_token: Option<bool>,
    pub cors_preflight: Option<String>,
    pub upstream_protocol: Option<String>,
    pub max_tunnel_lifetime: Option<String>,
    pub identity_headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub methods: Vec<String>,
    pub path_prefix: Option<String>,
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub claims: BTreeMap<String, toml::Value>,
    pub auth: Option<String>,
    #[serde(default)]
    pub deny: bool,
}
