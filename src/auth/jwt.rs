//! Token verification: size limit, the header (`alg` allow-list bound to the key
//! type, `typ` an access token's, no `crit` extension), signature, then `iss`,
//! `exp`, `nbf`, `iat` with leeway. `jku`, `x5u` and embedded `jwk` headers are
//! never read. Route policy (audience, scopes) is
//! checked separately because it differs per route while this result is cached.

use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::keys::KeySet;
use super::{Claims, InvalidReason};
use crate::config::IssuerSettings;

/// Tokens above this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[derive(Debug, PartialEq, Eq)]
pub enum Rejected<R = InvalidReason> {
    Invalid(R),
    /// The token names a `kid` the key set does not hold; a refetch may help.
    UnknownKid,
}

/// Per-issuer verification policy, precomputed once per configuration.
pub struct Policy {
    pub issuer: String,
    pub leeway: i64,
    algorithms: Vec<Algorithm>,
}

impl Policy {
    pub fn new(s: &IssuerSettings) -> Self {
        Self { issuer: s.issuer.clone(), leeway: s.leeway.as_secs() as i64, algorithms: s.algorithms.clone() }
    }
}

/// The JOSE header members the proxy reads; every other member is ignored,
/// except that `jku`, `x5u` and `jwk` are never followed.
#[derive(serde::Deserialize)]
pub struct Header {
    pub alg: Algorithm,
    pub kid: Option<String>,
    typ: Option<String>,
    crit: Option<Value>,
}

/// Parses the header and applies the checks that need no key: `typ` must be an
/// access token's (RFC 9068 §4, or plain JWT), and no `crit` extension is
/// understood, so any is refused (RFC 7515 §4.1.11).
pub fn header(token: &str) -> Result<Header, InvalidReason> {
    header_of_type(token, &["jwt", "at+jwt"])
}

/// The header, refusing any `crit` and a `typ` (without its `application/`
/// prefix, case-insensitively) other than `types`.
fn header_of_type(token: &str, types: &[&str]) -> Result<Header, InvalidReason> {
    let head = token.split('.').next().unwrap_or("");
    let parsed: Option<Header> = B64.decode(head).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let Some(h) = parsed else { return Err(header_failure(token)) };
    if h.crit.is_some() {
        return Err(InvalidReason::UnsupportedCritical);
    }
    if let Some(typ) = &h.typ {
        let t = typ.strip_prefix("application/").unwrap_or(typ);
        if !types.iter().any(|k| t.eq_ignore_ascii_case(k)) {
            return Err(InvalidReason::WrongType);
        }
    }
    Ok(h)
}

/// Verifies `token` (JWS compact serialisation) against `keys` and the issuer
/// policy at time `now` (Unix seconds): header, signature, then claims.
pub fn verify(token: &str, policy: &Policy, keys: &KeySet, now: i64) -> Result<Claims, Rejected> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Rejected::Invalid(InvalidReason::TooLarge));
    }
    let header = header(token).map_err(Rejected::Invalid)?;
    let all = verified_payload(token, &header, policy, keys)?;
    check_claims(all, policy, now).map_err(Rejected::Invalid)
}

/// The payload of `token` once its signature is valid under `keys` for an
/// algorithm the policy allows.
fn verified_payload(
    token: &str,
    header: &Header,
    policy: &Policy,
    keys: &KeySet,
) -> Result<Map<String, Value>, Rejected> {
    use Rejected::Invalid;
    let alg = header.alg;
    if !policy.algorithms.contains(&alg) {
        return Err(Invalid(InvalidReason::AlgorithmNotAllowed));
    }
    if let Some(kid) = header.kid.as_deref() {
        if !keys.has_kid(kid) {
            return Err(Rejected::UnknownKid);
        }
    }
    let malformed = || Invalid(InvalidReason::Malformed);
    let (signed, sig) = token.rsplit_once('.').ok_or_else(malformed)?;
    let (_, payload) = signed.split_once('.').ok_or_else(malformed)?;
    if payload.contains('.') {
        return Err(malformed());
    }
    let sig = B64.decode(sig).map_err(|_| malformed())?;
    let mut saw_candidate = false;
    let mut valid = false;
    for key in keys.candidates(header.kid.as_deref(), alg) {
        saw_candidate = true;
        if key.verify(alg, signed.as_bytes(), &sig) {
            valid = true;
            break;
        }
    }
    if !valid {
        return Err(Invalid(if saw_candidate {
            InvalidReason::BadSignature
        } else {
            InvalidReason::AlgorithmNotAllowed
        }));
    }
    let payload = B64.decode(payload).map_err(|_| malformed())?;
    serde_json::from_slice(&payload).map_err(|_| malformed())
}

/// A verified OpenID Connect Back-Channel Logout token: who to log out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutToken {
    pub sub: Option<String>,
    pub sid: Option<String>,
    pub jti: String,
    pub iat: i64,
    /// When a replay of it stops mattering (its `exp`, or `iat` plus a few minutes).
    pub stale_at: i64,
}

pub const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// How long after `iat` a logout token without `exp` is still taken.
pub const LOGOUT_TOKEN_MAX_AGE: i64 = 300;

/// Why a logout token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutRefusal {
    /// A check it shares with access tokens: header, signature, `iss`, `aud`, times.
    Token(InvalidReason),
    NoIat,
    NoJti,
    NoEvent,
    Nonce,
    NoSubject,
}

impl LogoutRefusal {
    /// The `reason` label of `portcullis_logout_tokens_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            LogoutRefusal::Token(r) => match r {
                InvalidReason::Malformed => "malformed",
                InvalidReason::TooLarge => "too_large",
                InvalidReason::AlgorithmNotAllowed => "algorithm_not_allowed",
                InvalidReason::UnknownKey => "unknown_key",
                InvalidReason::BadSignature => "bad_signature",
                InvalidReason::WrongIssuer => "wrong_issuer",
                InvalidReason::Expired => "expired",
                InvalidReason::IssuedInFuture => "issued_in_future",
                InvalidReason::WrongAudience => "wrong_audience",
                InvalidReason::WrongType => "wrong_type",
                InvalidReason::UnsupportedCritical => "unsupported_critical",
                _ => "invalid",
            },
            LogoutRefusal::NoIat => "missing_iat",
            LogoutRefusal::NoJti => "missing_jti",
            LogoutRefusal::NoEvent => "missing_event",
            LogoutRefusal::Nonce => "nonce",
            LogoutRefusal::NoSubject => "missing_sub_and_sid",
        }
    }

    /// The `error_description` of the `400 invalid_request`.
    pub fn description(self) -> &'static str {
        match self {
            LogoutRefusal::Token(InvalidReason::WrongType) => "the token is not a logout token",
            LogoutRefusal::Token(InvalidReason::WrongAudience) => {
                "the logout token is not meant for this client"
            }
            LogoutRefusal::Token(r) => r.description(),
            LogoutRefusal::NoIat => "the logout token has no iat",
            LogoutRefusal::NoJti => "the logout token has no jti",
            LogoutRefusal::NoEvent => "the logout token does not carry the back-channel logout event",
            LogoutRefusal::Nonce => "a logout token must not carry a nonce",
            LogoutRefusal::NoSubject => "the logout token names neither sub nor sid",
        }
    }
}

/// Verifies a logout token per OpenID Connect Back-Channel Logout 1.0 §2.6.
pub fn verify_logout(
    token: &str,
    policy: &Policy,
    keys: &KeySet,
    client_id: &str,
    now: i64,
) -> Result<LogoutToken, Rejected<LogoutRefusal>> {
    let invalid = |r: InvalidReason| Rejected::Invalid(LogoutRefusal::Token(r));
    let refused = |r: LogoutRefusal| Rejected::Invalid(r);
    if token.len() > MAX_TOKEN_BYTES {
        return Err(invalid(InvalidReason::TooLarge));
    }
    let header = header_of_type(token, &["jwt", "logout+jwt"]).map_err(invalid)?;
    let all = verified_payload(token, &header, policy, keys).map_err(|e| match e {
        Rejected::Invalid(r) => invalid(r),
        Rejected::UnknownKid => Rejected::UnknownKid,
    })?;
    if all.get("iss").and_then(Value::as_str) != Some(policy.issuer.as_str()) {
        return Err(invalid(InvalidReason::WrongIssuer));
    }
    let aud_ok = match all.get("aud") {
        Some(Value::String(a)) => a == client_id,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(client_id)),
        _ => false,
    };
    if !aud_ok {
        return Err(invalid(InvalidReason::WrongAudience));
    }
    let iat = time_claim(&all, "iat").map_err(invalid)?.ok_or(refused(LogoutRefusal::NoIat))?;
    if iat > now.saturating_add(policy.leeway) {
        return Err(invalid(InvalidReason::IssuedInFuture));
    }
    let stale_at = match time_claim(&all, "exp").map_err(invalid)? {
        Some(exp) => exp.saturating_add(policy.leeway),
        None => iat.saturating_add(LOGOUT_TOKEN_MAX_AGE),
    };
    if now > stale_at {
        return Err(invalid(InvalidReason::Expired));
    }
    // An empty identifier is no identifier (every empty `jti` would be the same one).
    let present = |v: Option<String>| v.filter(|s| !s.is_empty());
    let jti = present(id_claim(all.get("jti"))).ok_or(refused(LogoutRefusal::NoJti))?;
    let event = all.get("events").and_then(|e| e.get(BACKCHANNEL_EVENT)).is_some_and(Value::is_object);
    if !event {
        return Err(refused(LogoutRefusal::NoEvent));
    }
    // A logout token is never an ID token: a nonce would make it one.
    if all.contains_key("nonce") {
        return Err(refused(LogoutRefusal::Nonce));
    }
    let sub = present(id_claim(all.get("sub")));
    let sid = present(all.get("sid").and_then(Value::as_str).map(str::to_owned));
    if sub.is_none() && sid.is_none() {
        return Err(refused(LogoutRefusal::NoSubject));
    }
    Ok(LogoutToken { sub, sid, jti, iat, stale_at })
}

/// Why a header did not parse: `alg: none` and unknown algorithms are named as such.
fn header_failure(token: &str) -> InvalidReason {
    let head = token.split('.').next().unwrap_or("");
    let alg = B64
        .decode(head)
        .ok()
        .and_then(|b| serde_json::from_slice::<Map<String, Value>>(&b).ok())
        .and_then(|m| m.get("alg").and_then(Value::as_str).map(str::to_owned));
    match alg {
        Some(_) => InvalidReason::AlgorithmNotAllowed,
        None => InvalidReason::Malformed,
    }
}

/// `sub` / `jti` as text, whether the token carries a string or a number, so a
/// revocation of `"123"` also denies `"sub": 123`.
pub fn id_claim(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn time_claim(all: &Map<String, Value>, name: &str) -> Result<Option<i64>, InvalidReason> {
    match all.get(name) {
        None => Ok(None),
        Some(v) => v.as_f64().map(|f| Some(f as i64)).ok_or(InvalidReason::Malformed),
    }
}

fn check_claims(all: Map<String, Value>, policy: &Policy, now: i64) -> Result<Claims, InvalidReason> {
    if all.get("iss").and_then(Value::as_str) != Some(policy.issuer.as_str()) {
        return Err(InvalidReason::WrongIssuer);
    }
    let exp = time_claim(&all, "exp")?.ok_or(InvalidReason::NoExpiry)?;
    if now > exp.saturating_add(policy.leeway) {
        return Err(InvalidReason::Expired);
    }
    if let Some(nbf) = time_claim(&all, "nbf")? {
        if nbf > now.saturating_add(policy.leeway) {
            return Err(InvalidReason::NotYetValid);
        }
    }
    let iat = time_claim(&all, "iat")?;
    if iat.is_some_and(|iat| iat > now.saturating_add(policy.leeway)) {
        return Err(InvalidReason::IssuedInFuture);
    }
    if !matches!(all.get("aud"), None | Some(Value::String(_) | Value::Array(_))) {
        return Err(InvalidReason::Malformed);
    }
    let mut claims = claims_from(all, exp);
    claims.iat = iat;
    Ok(claims)
}

/// The claims the proxy reads, from a verified token's payload (or an active
/// introspection answer): `sub`, `jti`, `aud`, `scope`/`scp`, `iat`, and the rest.
pub fn claims_from(all: Map<String, Value>, exp: i64) -> Claims {
    let aud = match all.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    let iat = all.get("iat").and_then(Value::as_f64).map(|f| f as i64);
    let mut scopes: Vec<String> = Vec::new();
    if let Some(Value::String(s)) = all.get("scope") {
        scopes.extend(s.split_ascii_whitespace().map(str::to_owned));
    }
    if let Some(Value::Array(a)) = all.get("scp") {
        scopes.extend(a.iter().filter_map(|v| v.as_str().map(str::to_owned)));
    } else if let Some(Value::String(s)) = all.get("scp") {
        scopes.extend(s.split_ascii_whitespace().map(str::to_owned));
    }
    let (sub, jti) = (id_claim(all.get("sub")), id_claim(all.get("jti")));
    Claims { sub, jti, exp, iat, aud, scopes, all, sub_header: Default::default() }
}

/// A JWT's payload, read without any check: only for a choice a verification
/// follows, for tokens straight from the token endpoint, or for display.
pub fn unverified_payload<T: serde::de::DeserializeOwned>(token: &str) -> Option<T> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&B64.decode(payload).ok()?).ok()
}

/// The unverified `iss` of a JWT's payload, to choose among a route's issuers.
pub fn peek_issuer(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    unverified_payload::<Iss>(token)?.iss
}

/// Whether `token` has the shape of a JWS (three dot-separated parts); anything
/// else is an opaque token for introspection.
pub fn looks_like_jwt(token: &str) -> bool {
    memchr::memchr_iter(b'.', token.as_bytes()).take(3).count() == 2
}

/// Route policy: one of the route's audiences, all of its scopes.
pub fn check_route(claims: &Claims, audiences: &[String], scopes: &[String]) -> Result<(), super::AuthError> {
    if !audiences.is_empty() && !claims.aud.iter().any(|a| audiences.contains(a)) {
        return Err(super::AuthError::Invalid(InvalidReason::WrongAudience));
    }
    if !scopes.iter().all(|s| claims.scopes.contains(s)) {
        return Err(super::AuthError::InsufficientScope { scope: scopes.join(" ") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn policy() -> Policy {
        Policy::new(&IssuerSettings {
            name: "t".into(),
            issuer: "https://id.test".into(),
            source: crate::config::KeySource::Static(Default::default()),
            introspection: None,
            algorithms: vec![Algorithm::HS256],
            leeway: std::time::Duration::from_secs(30),
            jwks_refresh: std::time::Duration::from_secs(300),
        })
    }

    fn mint(claims: Value) -> String {
        mint_with(json!({"alg": "HS256", "typ": "JWT"}), claims)
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn claim_table() {
        let keys = keys::hmac(SECRET);
        let p = policy();
        let iss = "https://id.test";
        let cases = [
            (json!({"iss": iss, "exp": NOW + 60, "sub": "u"}), Ok(())),
            (json!({"iss": iss, "exp": NOW - 10}), Ok(())),
            (json!({"iss": iss, "exp": NOW - 31}), Err(InvalidReason::Expired)),
            (json!({"iss": iss}), Err(InvalidReason::NoExpiry)),
            (json!({"iss": iss, "exp": "soon"}), Err(InvalidReason::Malformed)),
            (json!({"iss": "https://evil", "exp": NOW + 60}), Err(InvalidReason::WrongIssuer)),
            (json!({"exp": NOW + 60}), Err(InvalidReason::WrongIssuer)),
            (json!({"iss": iss, "exp": NOW + 60, "nbf": NOW + 120}), Err(InvalidReason::NotYetValid)),
            (json!({"iss": iss, "exp": NOW + 60, "nbf": NOW + 20}), Ok(())),
            (json!({"iss": iss, "exp": NOW + 600, "iat": NOW + 300}), Err(InvalidReason::IssuedInFuture)),
        ];
        for (claims, want) in cases {
            let got = verify(&mint(claims.clone()), &p, &keys, NOW).map(|_| ());
            assert_eq!(got, want.map_err(Rejected::Invalid), "{claims}");
        }
    }

    #[test]
    fn audience_and_scopes() {
        let keys = keys::hmac(SECRET);
        let t = mint(
            json!({"iss": "https://id.test", "exp": NOW + 60, "aud": ["a", "b"], "scope": "x y", "scp": ["z"]}),
        );
        let c = verify(&t, &policy(), &keys, NOW).unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(check_route(&c, &s(&["b"]), &s(&["x", "z"])).is_ok());
        assert!(check_route(&c, &[], &[]).is_ok());
        assert!(matches!(
            check_route(&c, &s(&["c"]), &[]),
            Err(crate::auth::AuthError::Invalid(InvalidReason::WrongAudience))
        ));
        assert!(matches!(
            check_route(&c, &[], &s(&["x", "w"])),
            Err(crate::auth::AuthError::InsufficientScope { .. })
        ));
        let single = verify(
            &mint(json!({"iss": "https://id.test", "exp": NOW + 60, "aud": "a"})),
            &policy(),
            &keys,
            NOW,
        )
        .unwrap();
        assert_eq!(single.aud, vec!["a".to_string()]);
    }

    fn mint_with(header: Value, claims: Value) -> String {
        let b = |v: &Value| B64.encode(v.to_string());
        let input = format!("{}.{}", b(&header), b(&claims));
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET);
        let sig = B64.encode(aws_lc_rs::hmac::sign(&key, input.as_bytes()));
        format!("{input}.{sig}")
    }

    #[test]
    fn header_typ_and_crit() {
        let keys = keys::hmac(SECRET);
        let p = policy();
        let claims = json!({"iss": "https://id.test", "exp": NOW + 60, "sub": 123, "jti": 7});
        for typ in [None, Some("JWT"), Some("jwt"), Some("at+jwt"), Some("application/at+jwt")] {
            let mut h = json!({"alg": "HS256"});
            if let Some(t) = typ {
                h["typ"] = json!(t);
            }
            let c = verify(&mint_with(h, claims.clone()), &p, &keys, NOW).unwrap();
            assert_eq!(
                (c.sub.as_deref(), c.jti.as_deref()),
                (Some("123"), Some("7")),
                "numbers read as text"
            );
        }
        for typ in ["logout+jwt", "secevent+jwt", "id_token+jwt", "JOSE"] {
            let t = mint_with(json!({"alg": "HS256", "typ": typ}), claims.clone());
            assert_eq!(
                verify(&t, &p, &keys, NOW).err(),
                Some(Rejected::Invalid(InvalidReason::WrongType)),
                "{typ}"
            );
        }
        for crit in [json!(["exp-ext"]), json!([]), json!("b64")] {
            let t = mint_with(json!({"alg": "HS256", "crit": crit, "exp-ext": 1}), claims.clone());
            assert_eq!(
                verify(&t, &p, &keys, NOW).err(),
                Some(Rejected::Invalid(InvalidReason::UnsupportedCritical))
            );
        }
    }

    #[test]
    fn unsigned_and_garbage_tokens() {
        let keys = keys::hmac(SECRET);
        let p = policy();
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(br#"{"iss":"https://id.test","exp":9999999999}"#)
        );
        assert_eq!(
            verify(&none, &p, &keys, NOW).err(),
            Some(Rejected::Invalid(InvalidReason::AlgorithmNotAllowed))
        );
        assert_eq!(
            verify("garbage", &p, &keys, NOW).err(),
            Some(Rejected::Invalid(InvalidReason::Malformed))
        );
        assert_eq!(verify("a.b.c", &p, &keys, NOW).err(), Some(Rejected::Invalid(InvalidReason::Malformed)));
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(verify(&big, &p, &keys, NOW).err(), Some(Rejected::Invalid(InvalidReason::TooLarge)));
        let good = mint(json!({"iss": "https://id.test", "exp": NOW + 60}));
        let (head, rest) = good.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let other = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"iss":"https://id.test","exp":9999999999,"sub":"admin"}"#);
        let tampered = format!("{head}.{other}.{sig}");
        assert_eq!(
            verify(&tampered, &p, &keys, NOW).err(),
            Some(Rejected::Invalid(InvalidReason::BadSignature))
        );
        let stripped = format!("{head}.{other}.");
        assert!(verify(&stripped, &p, &keys, NOW).is_err());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::auth::keys;
    use proptest::prelude::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn any_token_text_is_refused_without_panic(t in ".{0,200}") {
            let keys = keys::hmac(b"0123456789abcdef0123456789abcdef");
            prop_assert!(verify(&t, &tests_policy(), &keys, 1_800_000_000).is_err());
        }

        /// Headers and claims that are valid base64 JSON but arbitrary: the front of
        /// the check (before any signature) refuses them with a reason, never panics.
        #[test]
        fn any_json_header_and_claims_are_refused_without_panic(
            h in "\\{(\"(alg|kid|typ|crit|jku)\":(\"[A-Za-z0-9+/]{0,8}\"|[0-9]{1,3}|null|\\[\\]|\\{\\}),?){0,4}\\}",
            c in "\\{(\"(iss|exp|sub|jti|aud|nbf)\":(\"[a-z]{0,4}\"|-?[0-9]{1,12}|\\[\\]|true),?){0,5}\\}",
        ) {
            let keys = keys::hmac(b"0123456789abcdef0123456789abcdef");
            let t = format!("{}.{}.c2ln", b64(&h), b64(&c));
            let _ = header(&t);
            prop_assert!(verify(&t, &tests_policy(), &keys, 1_800_000_000).is_err());
        }
    }

    fn tests_policy() -> Policy {
        Policy::new(&IssuerSettings {
            name: "t".into(),
            issuer: "https://id.test".into(),
            source: crate::config::KeySource::Static(Default::default()),
            introspection: None,
            algorithms: vec![Algorithm::HS256],
            leeway: std::time::Duration::from_secs(30),
            jwks_refresh: std::time::Duration::from_secs(300),
        })
    }
}
