//! Verification keys: parsed from a JWKS document, PEM files or an HMAC secret.
//! Each key knows its family, so a token's `alg` can be bound to the key type
//! (an HS256 token is never checked against an RSA public key used as a secret).

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// The kind of key, which decides the algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
    Hmac,
}

impl KeyFamily {
    /// Whether a token signed with `alg` may be verified by a key of this family.
    pub fn accepts(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyFamily::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyFamily::EcP256, ES256)
                | (KeyFamily::EcP384, ES384)
                | (KeyFamily::Ed25519, EdDSA)
                | (KeyFamily::Hmac, HS256 | HS384 | HS512)
        )
    }
}

pub struct VerifyKey {
    pub kid: Option<String>,
    pub family: KeyFamily,
    /// The JWK's own `alg`, when it pins one.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

/// The keys of one issuer at one moment; replaced whole on rotation.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
    by_kid: HashMap<String, usize>,
}

impl KeySet {
    pub fn new(keys: Vec<VerifyKey>) -> Self {
        let mut by_kid = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            if let Some(kid) = &k.kid {
                by_kid.entry(kid.clone()).or_insert(i);
            }
        }
        Self { keys: keys.into_iter().map(Arc::new).collect(), by_kid }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Candidate keys for a token: the one with its `kid`; for a token without `kid`
    /// every key; for an unknown `kid`, the keys that have no `kid` of their own
    /// (PEM files, HMAC secrets). Only keys whose family accepts `alg` are returned.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        let named = kid.and_then(|k| self.by_kid.get(k)).map(|&i| &*self.keys[i]);
        let all = if named.is_none() {
            let unnamed_only = kid.is_some();
            Some(self.keys.iter().map(|k| &**k).filter(move |k| !unnamed_only || k.kid.is_none()))
        } else {
            None
        };
        let by_kid = Some(named);
        by_kid
            .into_iter()
            .flatten()
            .chain(all.into_iter().flatten())
            .filter(move |k| k.family.accepts(alg) && k.alg.is_none_or(|a| a == alg))
    }

    /// Whether a token naming `kid` has any key to be checked against.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid) || self.keys.iter().any(|k| k.kid.is_none())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a JWKS document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the JWKS holds no usable signing key")]
    Empty,
    #[error("not a PEM RSA, EC (P-256/P-384) or Ed25519 public key")]
    Pem,
}

/// Parses a JWKS; keys marked `use: enc` and unsupported types are skipped.
pub fn parse_jwks(bytes: &[u8]) -> Result<KeySet, KeyError> {
    let set: JwkSet = serde_json::from_slice(bytes)?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyFamily::EcP256,
                EllipticCurve::P384 => KeyFamily::EcP384,
                _ => continue,
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => KeyFamily::Ed25519,
                _ => continue,
            },
            // Symmetric keys are never taken from a JWKS: a published secret is no secret.
            AlgorithmParameters::OctetKey(_) => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        let alg = jwk.common.key_algorithm.and_then(|a| a.to_string().parse::<Algorithm>().ok());
        keys.push(VerifyKey { kid: jwk.common.key_id.clone(), family, alg, key });
    }
    if keys.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(KeySet::new(keys))
}

/// Parses one PEM public key, whatever its type.
pub fn parse_pem(bytes: &[u8]) -> Result<VerifyKey, KeyError> {
    let make = |family, key| VerifyKey { kid: None, family, alg: None, key };
    if let Ok(k) = DecodingKey::from_rsa_pem(bytes) {
        return Ok(make(KeyFamily::Rsa, k));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(bytes) {
        return Ok(make(KeyFamily::Ed25519, k));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(bytes) {
        let family = ec_curve_of_pem(bytes).ok_or(KeyError::Pem)?;
        return Ok(make(family, k));
    }
    Err(KeyError::Pem)
}

/// P-256 vs P-384 from the SubjectPublicKeyInfo length (uncompressed points: 65 or 97 bytes).
fn ec_curve_of_pem(bytes: &[u8]) -> Option<KeyFamily> {
    use base64::Engine as _;
    let text = std::str::from_utf8(bytes).ok()?;
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    match der.len() {
        91 => Some(KeyFamily::EcP256),
        120 => Some(KeyFamily::EcP384),
        _ => None,
    }
}

pub fn hmac(secret: &[u8]) -> KeySet {
    KeySet::new(vec![VerifyKey {
        kid: None,
        family: KeyFamily::Hmac,
        alg: None,
        key: DecodingKey::from_secret(secret),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use Algorithm::*;

    #[test]
    fn families_bind_algorithms() {
        assert!(KeyFamily::Rsa.accepts(RS256));
        assert!(KeyFamily::Rsa.accepts(PS512));
        assert!(!KeyFamily::Rsa.accepts(HS256));
        assert!(!KeyFamily::Hmac.accepts(RS256));
        assert!(!KeyFamily::EcP256.accepts(ES384));
        assert!(KeyFamily::Ed25519.accepts(EdDSA));
        assert!(!KeyFamily::Ed25519.accepts(ES256));
    }

    #[test]
    fn keys_without_kid_serve_tokens_that_name_one() {
        let pem = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa1.pub.pem")).unwrap();
        let set = KeySet::new(vec![parse_pem(&pem).unwrap()]);
        assert!(set.has_kid("any-kid"));
        assert_eq!(set.candidates(Some("any-kid"), RS256).count(), 1);
        assert_eq!(set.candidates(Some("any-kid"), ES256).count(), 0);
        let jwks = br#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"a"}]}"#;
        let named = parse_jwks(jwks).unwrap();
        assert!(!named.has_kid("b"), "a key with its own kid never stands in for another");
        assert_eq!(named.candidates(Some("b"), EdDSA).count(), 0);
        assert_eq!(named.candidates(None, EdDSA).count(), 1);
    }

    #[test]
    fn symmetric_jwks_keys_are_ignored() {
        let doc = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(matches!(parse_jwks(doc), Err(KeyError::Empty)));
    }
}
