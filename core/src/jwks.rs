//! A JWK Set's verification keys for the pinned algorithm, chosen by `kid`.
//!
//! Parsing is `jsonwebtoken`'s (its `jwk` types and `DecodingKey::from_jwk`); this module
//! only decides which keys may serve (PROTOCOL.md section 2): a key whose `alg` or type does
//! not match the configured algorithm, or whose `use` is not `sig`, is never used. A set
//! with a single usable key may serve tokens without `kid`. Fetching the set is the
//! caller's: core does no I/O.

use std::collections::HashMap;

use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse},
    DecodingKey,
};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::JwtAlgorithm;

/// Most keys kept from one set; a set with more is refused (a key server answers a few).
pub const MAX_KEYS: usize = 64;

/// Why a JWK Set cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    /// Not a JSON object with a `keys` array.
    #[error("not a JWK Set: {0}")]
    Malformed(String),
    /// More keys than [`MAX_KEYS`].
    #[error("the JWK Set has more than {MAX_KEYS} keys")]
    TooManyKeys,
    /// No key of the set can verify the configured algorithm.
    #[error("the JWK Set has no key for the configured algorithm")]
    NoUsableKey,
}

/// The usable keys of one JWK Set.
#[derive(Clone)]
pub struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    /// The set's only usable key, which also serves tokens without `kid`.
    only: Option<DecodingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<_> = self.by_kid.keys().collect();
        kids.sort();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<Value>,
}

impl KeySet {
    /// The keys of the JWK Set `json` that can verify `algorithm`.
    ///
    /// Keys the library cannot read (another `kty`, an encryption key) are skipped, not
    /// fatal: key servers list keys for other uses beside the signing ones.
    pub fn parse(json: &[u8], algorithm: JwtAlgorithm) -> Result<Self, KeySetError> {
        let raw: RawSet =
            serde_json::from_slice(json).map_err(|e| KeySetError::Malformed(e.to_string()))?;
        if raw.keys.len() > MAX_KEYS {
            return Err(KeySetError::TooManyKeys);
        }
        let usable: Vec<(Option<String>, DecodingKey)> = raw
            .keys
            .into_iter()
            .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
            .filter(|jwk| serves(jwk, algorithm))
            .filter_map(|jwk| {
                let key = DecodingKey::from_jwk(&jwk).ok()?;
                Some((jwk.common.key_id, key))
            })
            .collect();
        let only = match &usable[..] {
            [(_, key)] => Some(key.clone()),
            _ => None,
        };
        if usable.is_empty() {
            return Err(KeySetError::NoUsableKey);
        }
        let by_kid = usable
            .into_iter()
            .filter_map(|(kid, key)| Some((kid?, key)))
            .collect();
        Ok(Self { by_kid, only })
    }

    /// The key for a token whose header names `kid` (or none).
    pub fn key(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.only.as_ref(),
        }
    }

    /// How many keys have a `kid`.
    pub fn len(&self) -> usize {
        self.by_kid.len()
    }

    /// Whether no key has a `kid` (a single key may still serve tokens without one).
    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty()
    }
}

/// Whether `jwk` may verify tokens of `algorithm`: its type and curve fit, its `alg` (if
/// any) is that algorithm, and its `use` (if any) is `sig`.
fn serves(jwk: &Jwk, algorithm: JwtAlgorithm) -> bool {
    let use_ok = matches!(
        jwk.common.public_key_use,
        None | Some(PublicKeyUse::Signature)
    );
    let (alg, type_ok) = match algorithm {
        JwtAlgorithm::Rs256 => (
            KeyAlgorithm::RS256,
            matches!(jwk.algorithm, AlgorithmParameters::RSA(_)),
        ),
        JwtAlgorithm::Es256 => (
            KeyAlgorithm::ES256,
            matches!(&jwk.algorithm, AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256),
        ),
        JwtAlgorithm::EdDsa => (
            KeyAlgorithm::EdDSA,
            matches!(&jwk.algorithm, AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519),
        ),
        // A shared secret is never published in a key set.
        JwtAlgorithm::Hs256 => return false,
    };
    let alg_ok = jwk.common.key_algorithm.is_none_or(|a| a == alg);
    use_ok && type_ok && alg_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SET: &str = include_str!("../../tests/fixtures/jwks.json");

    fn keys() -> Vec<Value> {
        serde_json::from_str::<Value>(SET).unwrap()["keys"]
            .as_array()
            .unwrap()
            .clone()
    }

    fn set_of(keys: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).unwrap()
    }

    #[test]
    fn only_the_keys_of_the_pinned_algorithm_are_kept() {
        for (algorithm, kid) in [
            (JwtAlgorithm::Rs256, "rsa-1"),
            (JwtAlgorithm::Es256, "ec-1"),
            (JwtAlgorithm::EdDsa, "ed-1"),
        ] {
            let set = KeySet::parse(SET.as_bytes(), algorithm).unwrap();
            assert_eq!(set.len(), 1, "{algorithm:?}");
            assert!(set.key(Some(kid)).is_some(), "{algorithm:?}");
            assert!(
                set.key(None).is_some(),
                "a single key serves tokens without kid"
            );
            assert!(set.key(Some("other")).is_none());
        }
        assert_eq!(
            KeySet::parse(SET.as_bytes(), JwtAlgorithm::Hs256).unwrap_err(),
            KeySetError::NoUsableKey
        );
    }

    #[test]
    fn a_key_whose_alg_or_use_differs_is_never_used() {
        let mut ec = keys()[1].clone();
        ec["alg"] = json!("ES384");
        let mut ec_enc = keys()[1].clone();
        ec_enc["use"] = json!("enc");
        ec_enc["kid"] = json!("ec-enc");
        let set = set_of(vec![ec, ec_enc]);
        assert_eq!(
            KeySet::parse(&set, JwtAlgorithm::Es256).unwrap_err(),
            KeySetError::NoUsableKey
        );
    }

    #[test]
    fn several_keys_need_a_kid_and_unreadable_keys_are_skipped() {
        let mut second = keys()[1].clone();
        second["kid"] = json!("ec-2");
        let unknown = json!({"kty": "XYZ", "kid": "odd"});
        let set = KeySet::parse(
            &set_of(vec![keys()[1].clone(), second, unknown]),
            JwtAlgorithm::Es256,
        )
        .unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.key(Some("ec-1")).is_some() && set.key(Some("ec-2")).is_some());
        assert!(set.key(None).is_none(), "two keys: a token must name one");
    }

    #[test]
    fn malformed_and_oversized_sets_are_refused() {
        assert!(matches!(
            KeySet::parse(b"[]", JwtAlgorithm::Es256),
            Err(KeySetError::Malformed(_))
        ));
        let many = set_of(vec![keys()[1].clone(); MAX_KEYS + 1]);
        assert_eq!(
            KeySet::parse(&many, JwtAlgorithm::Es256).unwrap_err(),
            KeySetError::TooManyKeys
        );
    }
}
