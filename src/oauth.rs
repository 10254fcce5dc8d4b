//! Client for the authorization server (RFC 6749): refresh and code grants,
//! RFC 7009 revocation, client authentication modes, and a hard timeout.
//! Outcomes are classified by origin: `invalid_grant` ends a session; anything
//! else that goes wrong (unreachable, slow, 5xx, misconfigured client) is the
//! server's problem and must not log anyone out. The outbound client
//! itself is `crate::outbound`.

pub mod discovery;

use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Full;
use serde::Deserialize;

use crate::config::{AuthServerSettings, ClientAuth};

pub use crate::outbound::{outbound_client, HttpsClient};

const MAX_TOKEN_RESPONSE: usize = 256 * 1024;

/// Tokens from a successful grant.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub access_token: String,
    /// Present when the server issued (or rotated) a refresh token.
    pub refresh_token: Option<String>,
    pub expires_in: Option<u64>,
    /// OpenID Connect: who logged in (`sub`, `sid`), and the hint for RP-initiated logout.
    pub id_token: Option<String>,
}

/// Why a call to the authorization server did not give tokens. Only
/// `InvalidGrant` ends a session; every other variant is the server's problem.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The grant is dead (RFC 6749 §5.2 `invalid_grant`): the session is over.
    #[error("the authorization server answered invalid_grant")]
    InvalidGrant,
    #[error("the endpoint is not known yet (discovery pending)")]
    NotDiscovered,
    #[error("cannot build the request")]
    Build(#[source] http::Error),
    #[error(transparent)]
    Call(#[from] crate::outbound::CallError),
    #[error("the server answered {status} {}", .error.as_deref().unwrap_or(""))]
    Status { status: StatusCode, error: Option<String> },
    #[error("the token response holds no access_token")]
    NoAccessToken,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<u64>,
    id_token: Option<String>,
    error: Option<String>,
}

pub struct OAuthClient {
    client: HttpsClient<Full<Bytes>>,
    issuer: Option<String>,
    settings: AuthSettings,
}

/// Where the authorization server answers; explicit keys, completed by discovery.
#[derive(Default, Clone)]
pub struct Endpoints {
    pub token: Option<Uri>,
    pub authorization: Option<Uri>,
    pub revocation: Option<Uri>,
    pub end_session: Option<Uri>,
    /// A discovery document has been read: `end_session` is all there is.
    pub discovered: bool,
}

/// The parts of `[auth_server]` a grant needs.
struct AuthSettings {
    endpoints: Arc<ArcSwap<Endpoints>>,
    credentials: ClientCredentials,
    resource: Option<String>,
    timeout: Duration,
}

/// How the proxy authenticates as a client (RFC 6749 §2.3.1), for grants and
/// RFC 7662 introspection alike.
pub struct ClientCredentials {
    pub client_id: String,
    pub secret: Option<String>,
    pub auth: ClientAuth,
}

impl ClientCredentials {
    /// A form POST to `url` carrying `pairs` and the client's credentials.
    pub fn form_post(&self, url: Uri, pairs: &[(&str, &str)]) -> Result<Request<Full<Bytes>>, GrantError> {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "portcullis");
        if let (ClientAuth::SecretBasic, Some(secret)) = (self.auth, &self.secret) {
            // Both parts form-urlencoded before base64.
            let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
            let raw = format!("{}:{}", enc(&self.client_id), enc(secret));
            let value = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw));
            builder = builder.header(header::AUTHORIZATION, value);
        }
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.extend_pairs(pairs);
        match (self.auth, &self.secret) {
            (ClientAuth::SecretBasic, Some(_)) => {}
            (ClientAuth::SecretPost, Some(secret)) => {
                form.append_pair("client_id", &self.client_id).append_pair("client_secret", secret);
            }
            _ => {
                form.append_pair("client_id", &self.client_id);
            }
        }
        builder.body(Full::new(Bytes::from(form.finish()))).map_err(GrantError::Build)
    }
}

/// [`crate::outbound::exchange`], its failures as grant errors.
pub async fn exchange(
    client: &HttpsClient<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    max: usize,
) -> Result<(StatusCode, http::HeaderMap, Bytes), GrantError> {
    Ok(crate::outbound::exchange(client, req, timeout, max).await?)
}

impl OAuthClient {
    pub fn new(s: &AuthServerSettings) -> Result<Self, rustls::Error> {
        let endpoints = Arc::new(ArcSwap::from_pointee(Endpoints {
            token: s.token_url.clone(),
            authorization: s.authorization_url.clone(),
            revocation: s.revocation_url.clone(),
            end_session: None,
            discovered: false,
        }));
        if s.token_url.is_none() {
            if let Some(issuer) = s.issuer.clone() {
                tokio::spawn(discover(issuer, Arc::downgrade(&endpoints)));
            }
        }
        Ok(Self {
            client: outbound_client(s.timeout)?,
            issuer: s.issuer.clone(),
            settings: AuthSettings {
                endpoints,
                credentials: ClientCredentials {
                    client_id: s.client_id.clone(),
                    secret: s.client_secret.as_ref().map(|x| x.expose().clone()),
                    auth: s.client_auth,
                },
                resource: s.resource.clone(),
                timeout: s.timeout,
            },
        })
    }

    /// The provider's end-session endpoint (RP-initiated logout), from discovery:
    /// read when first needed and kept, also when the document names none (a
    /// logout must not cost a discovery fetch each time).
    pub async fn end_session_url(&self) -> Option<Uri> {
        let e = self.settings.endpoints.load();
        if e.end_session.is_some() || e.discovered {
            return e.end_session.clone();
        }
        let issuer = self.issuer.as_ref()?;
        let meta = discovery::fetch(issuer).await.ok()?;
        let found = discovery::parse_uri(meta.end_session_endpoint.as_deref());
        // rcu: the start-up discovery may complete the other endpoints meanwhile.
        self.settings.endpoints.rcu(|cur| Endpoints {
            end_session: cur.end_session.clone().or_else(|| found.clone()),
            discovered: true,
            ..(**cur).clone()
        });
        self.settings.endpoints.load().end_session.clone()
    }

    pub fn client_id(&self) -> &str {
        &self.settings.credentials.client_id
    }

    /// The authorization endpoint, when code + PKCE login is available.
    pub fn authorization_url(&self) -> Option<Uri> {
        self.settings.endpoints.load().authorization.clone()
    }

    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens, GrantError> {
        let mut form = vec![("grant_type", "refresh_token"), ("refresh_token", refresh_token)];
        if let Some(r) = &self.settings.resource {
            form.push(("resource", r));
        }
        self.token_request(&form).await
    }

    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<Tokens, GrantError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier),
        ];
        if let Some(r) = &self.settings.resource {
            form.push(("resource", r));
        }
        self.token_request(&form).await
    }

    /// RFC 7009; best effort (the cookies are cleared whatever it answers).
    pub async fn revoke(&self, refresh_token: &str) -> Result<(), GrantError> {
        let Some(url) = self.settings.endpoints.load().revocation.clone() else { return Ok(()) };
        let form = [("token", refresh_token), ("token_type_hint", "refresh_token")];
        let span = crate::trace::Child::start("revocation");
        let result = match self.post(url, &form).await {
            Ok((status, _)) if status.is_success() => Ok(()),
            Ok((status, _)) => Err(GrantError::Status { status, error: None }),
            Err(e) => Err(e),
        };
        if let Some(span) = span {
            let outcome = if result.is_ok() { "ok" } else { "auth_server_error" };
            span.end(result.is_err(), vec![crate::trace::Attr::Str("portcullis.outcome", outcome)]);
        }
        result
    }

    /// Login passthrough: POSTs the client's body to `url` and returns the answer whole.
    pub async fn passthrough(
        &self,
        url: Uri,
        content_type: Option<HeaderValue>,
        body: Bytes,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), GrantError> {
        let mut req =
            Request::builder().method(Method::POST).uri(url).header(header::USER_AGENT, "portcullis");
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req.body(Full::new(body)).map_err(GrantError::Build)?;
        let span = crate::trace::Child::start("login");
        let result = self.exchange(req).await;
        if let Some(span) = span {
            // The server's refusal of bad credentials is an answer, not a failure.
            let outcome = match &result {
                Ok((status, ..)) if status.is_success() => "ok",
                Ok((status, ..)) if status.is_client_error() => "refused",
                _ => "auth_server_error",
            };
            span.end(
                outcome == "auth_server_error",
                vec![crate::trace::Attr::Str("portcullis.outcome", outcome)],
            );
        }
        result
    }

    async fn token_request(&self, form: &[(&str, &str)]) -> Result<Tokens, GrantError> {
        let refresh = form.first().is_some_and(|(_, v)| *v == "refresh_token");
        let span = crate::trace::Child::start(if refresh { "refresh" } else { "code exchange" });
        let result = self.token_request_inner(form).await;
        if let Some(span) = span {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(GrantError::InvalidGrant) => "invalid_grant",
                Err(_) => "auth_server_error",
            };
            let attrs = vec![crate::trace::Attr::Str("portcullis.outcome", outcome)];
            span.end(outcome == "auth_server_error", attrs);
        }
        result
    }

    async fn token_request_inner(&self, form: &[(&str, &str)]) -> Result<Tokens, GrantError> {
        let token_url = self.settings.endpoints.load().token.clone();
        let Some(token_url) = token_url else { return Err(GrantError::NotDiscovered) };
        let (status, body) = self.post(token_url, form).await?;
        let parsed: Option<TokenResponse> = serde_json::from_slice(&body).ok();
        if status.is_success() {
            return match parsed {
                Some(TokenResponse {
                    access_token: Some(a), refresh_token, expires_in, id_token, ..
                }) => Ok(Tokens { access_token: a, refresh_token, expires_in, id_token }),
                _ => Err(GrantError::NoAccessToken),
            };
        }
        let error = parsed.and_then(|p| p.error);
        if matches!(status, StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED)
            && error.as_deref() == Some("invalid_grant")
        {
            return Err(GrantError::InvalidGrant);
        }
        Err(GrantError::Status { status, error })
    }

    async fn post(&self, url: Uri, pairs: &[(&str, &str)]) -> Result<(StatusCode, Bytes), GrantError> {
        let req = self.settings.credentials.form_post(url, pairs)?;
        let (status, _, body) = self.exchange(req).await?;
        Ok((status, body))
    }

    /// Sends `req` and reads the whole (bounded) answer within the timeout.
    async fn exchange(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), GrantError> {
        exchange(&self.client, req, self.settings.timeout, MAX_TOKEN_RESPONSE).await
    }
}

/// Completes the endpoints from the issuer's discovery document, retrying with
/// backoff until it succeeds; explicit configuration keys win.
async fn discover(issuer: String, endpoints: Weak<ArcSwap<Endpoints>>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match discovery::fetch(&issuer).await {
            Ok(meta) => {
                let Some(e) = endpoints.upgrade() else { return };
                let pick = |explicit: &Option<Uri>, found: Option<&str>| {
                    explicit.clone().or_else(|| discovery::parse_uri(found))
                };
                e.rcu(|cur| Endpoints {
                    token: pick(&cur.token, meta.token_endpoint.as_deref()),
                    authorization: pick(&cur.authorization, meta.authorization_endpoint.as_deref()),
                    revocation: pick(&cur.revocation, meta.revocation_endpoint.as_deref()),
                    end_session: pick(&cur.end_session, meta.end_session_endpoint.as_deref()),
                    discovered: true,
                });
                tracing::info!(issuer = %issuer, "authorization server endpoints discovered");
                return;
            }
            Err(e) => {
                if endpoints.strong_count() == 0 {
                    return;
                }
                tracing::warn!(issuer = %issuer, error = %e, retry_in = ?backoff, "discovery failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}
