//! Authentication: JWT verification with the algorithm pinned by configuration, and the
//! identity a verified token gives a session.

use std::{collections::HashSet, sync::Arc};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::pattern::{any_matches, Pattern};

/// The JWT algorithm an operator pins (CONFIG.md `[auth] algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret.
    Hs256,
    /// RSA PKCS#1 v1.5 SHA-256 with a PEM public key.
    Rs256,
    /// ECDSA P-256 SHA-256 with a PEM public key.
    Es256,
}

/// Everything needed to verify tokens.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The only accepted algorithm.
    pub algorithm: JwtAlgorithm,
    /// HS256: the secret; RS256/ES256: the PEM public key.
    pub key: Vec<u8>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

/// Why a credential was refused. The messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a well-formed JWT, or a claim of the wrong type.
    #[error("malformed token")]
    Malformed,
    /// Signed with another algorithm than the configured one (including `none`).
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    /// The signature does not verify.
    #[error("invalid token signature")]
    BadSignature,
    /// A required claim is missing.
    #[error("token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` does not match.
    #[error("token issuer not accepted")]
    WrongIssuer,
    /// `aud` does not match.
    #[error("token audience not accepted")]
    WrongAudience,
    /// The key in the configuration cannot be used.
    #[error("verification key unusable: {0}")]
    BadKey(#[source] jsonwebtoken::errors::Error),
}

/// Longest user id (`sub`) accepted, in bytes: it travels in every message envelope.
pub const MAX_USER_ID_BYTES: usize = 256;

/// Who a session is and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    /// User id (`sub`).
    pub user: Arc<str>,
    /// Rooms the user may join; `None`: the endpoint's patterns.
    pub rooms: Option<Vec<Pattern>>,
    /// Rooms the user may publish to; `None`: same as `rooms`.
    pub publish: Option<Vec<Pattern>>,
    /// `exp` in Unix seconds; `None` for anonymous sessions.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// An anonymous identity (`auth = "none"` endpoints).
    pub fn anonymous(user: String) -> Self {
        Self {
            user: user.into(),
            rooms: None,
            publish: None,
            expires_at: None,
        }
    }

    /// Whether this identity may join (and list) `room`. The endpoint's patterns always
    /// apply (they keep applications on one gateway apart); a `rooms` claim narrows them.
    pub fn may_join(&self, endpoint_rooms: &[Pattern], room: &str) -> bool {
        any_matches(endpoint_rooms, room)
            && self.rooms.as_deref().is_none_or(|r| any_matches(r, room))
    }

    /// Whether this identity may publish to `room`: within the endpoint's patterns, and the
    /// `publish` claim (or, without it, the `rooms` claim).
    pub fn may_publish(&self, endpoint_rooms: &[Pattern], room: &str) -> bool {
        match &self.publish {
            Some(p) => any_matches(endpoint_rooms, room) && any_matches(p, room),
            None => self.may_join(endpoint_rooms, room),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    rooms: Option<Vec<String>>,
    publish: Option<Vec<String>>,
}

/// Verifies JWTs against one pinned algorithm and key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    leeway: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Builds a verifier; fails when the key cannot be parsed for the algorithm.
    pub fn new(config: &JwtConfig) -> Result<Self, AuthError> {
        let bad_key = AuthError::BadKey;
        let (algorithm, key) = match config.algorithm {
            JwtAlgorithm::Hs256 => (Algorithm::HS256, DecodingKey::from_secret(&config.key)),
            JwtAlgorithm::Rs256 => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(&config.key).map_err(bad_key)?,
            ),
            JwtAlgorithm::Es256 => (
                Algorithm::ES256,
                DecodingKey::from_ec_pem(&config.key).map_err(bad_key)?,
            ),
        };
        let mut validation = Validation::new(algorithm);
        // Time claims are checked below against the caller's clock, with the configured leeway.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims = HashSet::from(["sub".to_owned(), "exp".to_owned()]);
        validation.validate_aud = config.audience.is_some();
        if let Some(aud) = &config.audience {
            validation.set_audience(&[aud]);
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Self {
            key,
            validation,
            leeway: config.leeway_secs,
        })
    }

    /// Verifies `token` at `unix_now` (seconds) and returns its identity.
    pub fn verify(&self, token: &str, unix_now: u64) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let pinned = format!("{:?}", self.validation.algorithms[0]);
        if header_alg(token).is_some_and(|alg| alg != pinned) {
            return Err(AuthError::WrongAlgorithm);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm
                }
                ErrorKind::MissingRequiredClaim(c) if c == "sub" => AuthError::MissingClaim("sub"),
                ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim("exp"),
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                _ => AuthError::Malformed,
            },
        )?;
        let claims = data.claims;
        let exp = claims.exp.ok_or(AuthError::MissingClaim("exp"))?;
        let sub = claims.sub.filter(|s| !s.is_empty());
        let sub = sub.ok_or(AuthError::MissingClaim("sub"))?;
        if sub.len() > MAX_USER_ID_BYTES {
            return Err(AuthError::Malformed);
        }
        if exp.saturating_add(self.leeway) <= unix_now {
            return Err(AuthError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > unix_now.saturating_add(self.leeway))
        {
            return Err(AuthError::NotYetValid);
        }
        let patterns = |v: Vec<String>| v.iter().map(|p| Pattern::new(p)).collect();
        Ok(Identity {
            user: sub.into(),
            rooms: claims.rooms.map(patterns),
            publish: claims.publish.map(patterns),
            expires_at: Some(exp.saturating_add(self.leeway)),
        })
    }
}

/// The `alg` of a token's header, read without trusting it, so that `none` and other
/// algorithms the JWT library cannot even name are reported as such.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let first = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(first.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Header>(&json).ok().map(|h| h.alg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(&JwtConfig {
            algorithm: JwtAlgorithm::Hs256,
            key: b"secret".to_vec(),
            issuer: Some("iss".into()),
            audience: None,
            leeway_secs: 0,
        })
        .unwrap()
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn valid_token_gives_identity_with_patterns() {
        let t = token(
            json!({"sub":"alice","exp":NOW+60,"iss":"iss","rooms":["chat:*"],"publish":["chat:news"]}),
            b"secret",
        );
        let id = verifier().verify(&t, NOW).unwrap();
        assert_eq!(&*id.user, "alice");
        let any = [Pattern::new("*")];
        assert!(id.may_join(&any, "chat:x"));
        assert!(!id.may_join(&any, "other"));
        assert!(id.may_publish(&any, "chat:news"));
        assert!(!id.may_publish(&any, "chat:x"));
        // The endpoint's patterns bound the claims.
        let app = [Pattern::new("app:*")];
        assert!(!id.may_join(&app, "chat:x"));
        assert!(!id.may_publish(&app, "chat:news"));
        assert_eq!(id.expires_at, Some(NOW + 60));
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let v = verifier();
        let cases = [
            (
                token(json!({"sub":"a","exp":NOW+60,"iss":"iss"}), b"other"),
                AuthError::BadSignature,
            ),
            (
                token(json!({"sub":"a","exp":NOW-1,"iss":"iss"}), b"secret"),
                AuthError::Expired,
            ),
            (
                token(json!({"sub":"a","iss":"iss"}), b"secret"),
                AuthError::MissingClaim("exp"),
            ),
            (
                token(json!({"exp":NOW+60,"iss":"iss"}), b"secret"),
                AuthError::MissingClaim("sub"),
            ),
            (
                token(json!({"sub":"a","exp":NOW+60,"iss":"x"}), b"secret"),
                AuthError::WrongIssuer,
            ),
            (
                token(
                    json!({"sub":"a","exp":NOW+60,"nbf":NOW+30,"iss":"iss"}),
                    b"secret",
                ),
                AuthError::NotYetValid,
            ),
            ("garbage".to_owned(), AuthError::Malformed),
            (
                token(
                    json!({"sub":"u".repeat(257),"exp":NOW+60,"iss":"iss"}),
                    b"secret",
                ),
                AuthError::Malformed,
            ),
            // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
            (
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ."
                    .to_owned(),
                AuthError::WrongAlgorithm,
            ),
        ];
        for (t, expected) in cases {
            assert_eq!(v.verify(&t, NOW).unwrap_err(), expected);
        }
    }
}
