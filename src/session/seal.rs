//! Sealed values: AES-256-GCM with a key list. The first key seals, every key
//! opens, so keys rotate without logging anyone out; the context (a cookie's
//! name) is the associated data, so one sealed value cannot stand in for another.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;

pub(crate) const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A fresh random cookie key: 32 bytes, base64.
pub fn keygen() -> Option<String> {
    let mut key = [0u8; 32];
    SystemRandom::new().fill(&mut key).ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(key))
}

/// Seals and opens cookie values with the key list.
pub struct Sealer {
    keys: Vec<LessSafeKey>,
    rng: SystemRandom,
}

impl Sealer {
    pub fn new(keys: &[[u8; 32]]) -> Self {
        let keys =
            keys.iter().filter_map(|k| UnboundKey::new(&AES_256_GCM, k).ok().map(LessSafeKey::new)).collect();
        Self { keys, rng: SystemRandom::new() }
    }

    /// `base64url(nonce || ciphertext || tag)`, bound to `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Option<String> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut buf = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context.as_bytes()),
            &mut buf,
        )
        .ok()?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Some(B64.encode(out))
    }

    pub fn open(&self, context: &str, sealed: &str) -> Option<Vec<u8>> {
        let raw = B64.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        for key in &self.keys {
            let mut buf = ct.to_vec();
            let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
            if let Ok(plain) = key.open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf) {
                let n = plain.len();
                buf.truncate(n);
                return Some(buf);
            }
        }
        None
    }

    pub fn random_token(&self) -> Option<String> {
        let mut b = [0u8; 32];
        self.rng.fill(&mut b).ok()?;
        Some(B64.encode(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_key_rotation() {
        let old = Sealer::new(&[[1; 32]]);
        let sealed = old.seal("a", b"secret").unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(old.open("a", &sealed).unwrap(), b"secret");
        assert!(old.open("b", &sealed).is_none(), "bound to its cookie name");
        let rotated = Sealer::new(&[[2; 32], [1; 32]]);
        assert_eq!(rotated.open("a", &sealed).unwrap(), b"secret");
        assert!(Sealer::new(&[[2; 32]]).open("a", &sealed).is_none());
        assert!(old.open("a", "garbage!").is_none());
        let mut tampered = sealed.into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(old.open("a", std::str::from_utf8(&tampered).unwrap()).is_none());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn opening_anything_but_a_sealed_value_fails_without_panic(v in "[A-Za-z0-9_=.-]{0,300}") {
            let sealer = Sealer::new(&[[9; 32]]);
            prop_assert!(sealer.open("ctx", &v).is_none());
        }

        #[test]
        fn tampering_with_one_byte_is_detected(plain in proptest::collection::vec(any::<u8>(), 0..64), at in any::<usize>(), bit in 0u8..8) {
            let sealer = Sealer::new(&[[9; 32]]);
            let sealed = sealer.seal("ctx", &plain).unwrap();
            prop_assert_eq!(sealer.open("ctx", &sealed), Some(plain));
            let mut raw = B64.decode(&sealed).unwrap();
            let i = at % raw.len();
            raw[i] ^= 1 << bit;
            prop_assert!(sealer.open("ctx", &B64.encode(raw)).is_none());
        }
    }
}
