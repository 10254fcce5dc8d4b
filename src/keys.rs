//! Verification keys: parsed from a JWKS document, PEM files or an HMAC secret,
//! once, into aws-lc-rs key objects (the RSA modulus is never re-parsed per
//! token). Each key knows its family, so a token's `alg` is bound to the key type
//! (an HS256 token is never checked against an RSA public key used as a secret).

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::hmac;
use aws_lc_rs::signature::{self, ParsedPublicKey, RsaPublicKeyComponents, VerificationAlgorithm};
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::Algorithm;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::SubjectPublicKeyInfoDer;

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
    /// The algorithms a key of this family verifies.
    pub fn algorithms(self) -> &'static [Algorithm] {
        use Algorithm::*;
        match self {
            KeyFamily::Rsa => &[RS256, RS384, RS512, PS256, PS384, PS512],
            KeyFamily::EcP256 => &[ES256],
            KeyFamily::EcP384 => &[ES384],
            KeyFamily::Ed25519 => &[EdDSA],
            KeyFamily::Hmac => &[HS256, HS384, HS512],
        }
    }

    /// Whether a token signed with `alg` may be verified by a key of this family.
    pub fn accepts(self, alg: Algorithm) -> bool {
        self.algorithms().contains(&alg)
    }
}

fn public_algorithm(alg: Algorithm) -> Option<&'static dyn VerificationAlgorithm> {
    use Algorithm::*;
    Some(match alg {
        RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        PS256 => &signature::RSA_PSS_2048_8192_SHA256,
        PS384 => &signature::RSA_PSS_2048_8192_SHA384,
        PS512 => &signature::RSA_PSS_2048_8192_SHA512,
        ES256 => &signature::ECDSA_P256_SHA256_FIXED,
        ES384 => &signature::ECDSA_P384_SHA384_FIXED,
        EdDSA => &signature::ED25519,
        HS256 | HS384 | HS512 => return None,
    })
}

fn hmac_algorithm(alg: Algorithm) -> Option<hmac::Algorithm> {
    match alg {
        Algorithm::HS256 => Some(hmac::HMAC_SHA256),
        Algorithm::HS384 => Some(hmac::HMAC_SHA384),
        Algorithm::HS512 => Some(hmac::HMAC_SHA512),
        _ => None,
    }
}

/// The parsed key material, one object per algorithm the key may verify.
enum Material {
    Public(Vec<(Algorithm, ParsedPublicKey)>),
    Hmac(Vec<(Algorithm, hmac::Key)>),
}

pub struct VerifyKey {
    pub kid: Option<String>,
    pub family: KeyFamily,
    /// The JWK's own `alg`, when it pins one.
    pub alg: Option<Algorithm>,
    material: Material,
}

impl VerifyKey {
    /// Parses public key bytes (SubjectPublicKeyInfo DER, or the raw form aws-lc-rs
    /// reads for the family) for every algorithm of `family` (or just `pinned`).
    fn public(
        kid: Option<String>,
        family: KeyFamily,
        pinned: Option<Algorithm>,
        bytes: &[u8],
    ) -> Option<Self> {
        let mut parsed = Vec::new();
        for &alg in family.algorithms() {
            if pinned.is_some_and(|p| p != alg) {
                continue;
            }
            let key = ParsedPublicKey::new(public_algorithm(alg)?, bytes).ok()?;
            parsed.push((alg, key));
        }
        if parsed.is_empty() {
            return None;
        }
        Some(Self { kid, family, alg: pinned, material: Material::Public(parsed) })
    }

    /// Whether `signature` over `message` is valid for `alg` under this key.
    pub fn verify(&self, alg: Algorithm, message: &[u8], sig: &[u8]) -> bool {
        match &self.material {
            Material::Public(keys) => {
                keys.iter().find(|(a, _)| *a == alg).is_some_and(|(_, k)| k.verify_sig(message, sig).is_ok())
            }
            Material::Hmac(keys) => keys
                .iter()
                .find(|(a, _)| *a == alg)
                .is_some_and(|(_, k)| hmac::verify(k, message, sig).is_ok()),
        }
    }
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
        named
            .into_iter()
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
    #[error("not a JWKS document")]
    Json(#[from] serde_json::Error),
    #[error("the JWKS holds no usable signing key")]
    Empty,
    #[error("not a PEM public key (RSA of 2048 bits or more, EC P-256/P-384 or Ed25519)")]
    Pem,
}

fn b64(v: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(v).ok()
}

/// Parses a JWKS; keys marked `use: enc`, symmetric keys and unsupported types are skipped.
pub fn parse_jwks(bytes: &[u8]) -> Result<KeySet, KeyError> {
    let set: JwkSet = serde_json::from_slice(bytes)?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let pinned = jwk.common.key_algorithm.and_then(|a| a.to_string().parse::<Algorithm>().ok());
        let kid = jwk.common.key_id.clone();
        let key = match &jwk.algorithm {
            AlgorithmParameters::RSA(p) => (|| {
                let n = b64(&p.n)?;
                let e = b64(&p.e)?;
                let der = RsaPublicKeyComponents { n: n.as_slice(), e: e.as_slice() }.as_der().ok()?;
                VerifyKey::public(kid, KeyFamily::Rsa, pinned, der.as_ref())
            })(),
            AlgorithmParameters::EllipticCurve(p) => (|| {
                let family = match p.curve {
                    EllipticCurve::P256 => KeyFamily::EcP256,
                    EllipticCurve::P384 => KeyFamily::EcP384,
                    _ => return None,
                };
                // The uncompressed point: 0x04 || x || y.
                let mut point = vec![4u8];
                point.extend(b64(&p.x)?);
                point.extend(b64(&p.y)?);
                VerifyKey::public(kid, family, pinned, &point)
            })(),
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                b64(&p.x).and_then(|x| VerifyKey::public(kid, KeyFamily::Ed25519, pinned, &x))
            }
            // Symmetric keys are never taken from a JWKS: a published secret is no secret.
            AlgorithmParameters::OctetKeyPair(_) | AlgorithmParameters::OctetKey(_) => None,
        };
        keys.extend(key);
    }
    if keys.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(KeySet::new(keys))
}

/// Parses one PEM `PUBLIC KEY` (SubjectPublicKeyInfo), whatever its type.
pub fn parse_pem(bytes: &[u8]) -> Result<VerifyKey, KeyError> {
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(bytes).map_err(|_| KeyError::Pem)?;
    [KeyFamily::Rsa, KeyFamily::EcP256, KeyFamily::EcP384, KeyFamily::Ed25519]
        .into_iter()
        .find_map(|family| VerifyKey::public(None, family, None, spki.as_ref()))
        .ok_or(KeyError::Pem)
}

pub fn hmac(secret: &[u8]) -> KeySet {
    let material = KeyFamily::Hmac
        .algorithms()
        .iter()
        .filter_map(|&alg| Some((alg, hmac::Key::new(hmac_algorithm(alg)?, secret))))
        .collect();
    KeySet::new(vec![VerifyKey {
        kid: None,
        family: KeyFamily::Hmac,
        alg: None,
        material: Material::Hmac(material),
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
    fn pem_files_of_every_family() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        for (file, family) in [
            ("rsa1.pub.pem", KeyFamily::Rsa),
            ("ec1.pub.pem", KeyFamily::EcP256),
            ("ed1.pub.pem", KeyFamily::Ed25519),
        ] {
            let pem = std::fs::read(format!("{dir}/{file}")).unwrap();
            assert_eq!(parse_pem(&pem).unwrap().family, family, "{file}");
        }
        assert!(matches!(
            parse_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
            Err(KeyError::Pem)
        ));
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
