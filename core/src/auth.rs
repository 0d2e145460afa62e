//! Authentication: JWT verification and the identity a verified token gives a session.
//!
//! The JWT algorithm is pinned by configuration.

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    jwks::KeySet,
    pattern::{any_matches, Pattern},
};

/// The JWT algorithm an operator pins (CONFIG.md `[auth] algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret.
    Hs256,
    /// RSA PKCS#1 v1.5 SHA-256 with a PEM public key.
    Rs256,
    /// ECDSA P-256 SHA-256 with a PEM public key.
    Es256,
    /// Ed25519 (EdDSA) with a PEM public key.
    EdDsa,
}

/// Everything needed to verify tokens.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The only accepted algorithm.
    pub algorithm: JwtAlgorithm,
    /// HS256: the secret; RS256/ES256: the PEM public key.
    pub key: Vec<u8>,
    /// When set, `iss` is required and must be exactly this string.
    pub issuer: Option<String>,
    /// When set, `aud` is required and must name this string.
    ///
    /// `aud` must be this string, or an array of strings that contains it (RFC 7519 section
    /// 4.1.3).
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// When set, the longest lifetime a token may claim.
    ///
    /// `exp` may be at most this many seconds after `iat`, or after now (plus the leeway)
    /// for a token without `iat` or with an `iat` in the future.
    pub max_lifetime_secs: Option<u64>,
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
    ///
    /// For `aud` and `iss`, a claim that is not a string or an array of strings counts as
    /// missing too: the JWT library treats such a claim as absent.
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
    /// The header has a `crit` parameter.
    ///
    /// No extension is understood, so none may be critical (RFC 7515 section 4.1.11).
    #[error("token has critical header parameters")]
    CriticalHeader,
    /// `exp` is further from `iat` (or now) than the configured maximum lifetime.
    #[error("token lifetime too long")]
    LifetimeTooLong,
    /// The key in the configuration cannot be used.
    #[error("verification key unusable: {0}")]
    BadKey(#[source] jsonwebtoken::errors::Error),
    /// The token's `kid` names no key of the verifier's JWK Set (or it has none, and the
    /// set has several keys).
    ///
    /// The caller may refetch the set (rate-limited) and verify once more.
    #[error("token key unknown")]
    UnknownKey,
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

    /// Whether this identity may join (and list) `room`.
    ///
    /// The endpoint's patterns always apply (they keep applications on one gateway apart);
    /// a `rooms` claim narrows them.
    pub fn may_join(&self, endpoint_rooms: &[Pattern], room: &str) -> bool {
        any_matches(endpoint_rooms, room)
            && self.rooms.as_deref().is_none_or(|r| any_matches(r, room))
    }

    /// Whether this identity may publish to `room`.
    ///
    /// It may within the endpoint's patterns and the `publish` claim (or, without it, the
    /// `rooms` claim).
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
    // Read as any JSON value, then checked exactly: a number or an object must not pass
    // for a missing or matching claim.
    iat: Option<Value>,
    iss: Option<Value>,
    aud: Option<Value>,
    rooms: Option<Vec<String>>,
    publish: Option<Vec<String>>,
}

/// Where a verifier's keys come from.
enum Keys {
    /// One key (the secret or the PEM public key of the configuration).
    One(DecodingKey),
    /// A JWK Set, chosen by `kid`; replaced whole when the set is refetched.
    Set(RwLock<Arc<KeySet>>),
}

/// Called when a token names a key the verifier's JWK Set lacks.
pub type UnknownKeyHook = Box<dyn Fn() + Send + Sync>;

/// Verifies JWTs against one pinned algorithm and its key (or JWK Set).
pub struct JwtVerifier {
    keys: Keys,
    /// Told of every unknown `kid`, so that its owner may refetch the set.
    on_unknown_key: std::sync::OnceLock<UnknownKeyHook>,
    validation: Validation,
    leeway: u64,
    issuer: Option<String>,
    audience: Option<String>,
    max_lifetime: Option<u64>,
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
        let key = match config.algorithm {
            JwtAlgorithm::Hs256 => DecodingKey::from_secret(&config.key),
            JwtAlgorithm::Rs256 => DecodingKey::from_rsa_pem(&config.key).map_err(bad_key)?,
            JwtAlgorithm::Es256 => DecodingKey::from_ec_pem(&config.key).map_err(bad_key)?,
            JwtAlgorithm::EdDsa => DecodingKey::from_ed_pem(&config.key).map_err(bad_key)?,
        };
        Ok(Self::with_keys(config, Keys::One(key)))
    }

    /// Builds a verifier whose keys are the JWK Set `set` (`config.key` is not read).
    pub fn with_key_set(config: &JwtConfig, set: KeySet) -> Self {
        Self::with_keys(config, Keys::Set(RwLock::new(Arc::new(set))))
    }

    /// Sets what is called on every token whose `kid` the set lacks (once; later calls are
    /// ignored).
    pub fn on_unknown_key(&self, hook: UnknownKeyHook) {
        let _ = self.on_unknown_key.set(hook);
    }

    /// Replaces the JWK Set (a refetch); a verifier with one key keeps it.
    pub fn replace_key_set(&self, set: KeySet) {
        if let Keys::Set(current) = &self.keys {
            *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        }
    }

    fn with_keys(config: &JwtConfig, keys: Keys) -> Self {
        let algorithm = match config.algorithm {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
            JwtAlgorithm::EdDsa => Algorithm::EdDSA,
        };
        let mut validation = Validation::new(algorithm);
        // Time claims are checked below against the caller's clock, with the configured leeway.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        // A configured `aud` or `iss` is required, not only checked when present. The
        // library's check is the first gate; `verify` checks both claims exactly again
        // (the library also takes an array of issuers, and membership rules may change).
        let mut required = HashSet::from(["sub".to_owned(), "exp".to_owned()]);
        validation.validate_aud = config.audience.is_some();
        if let Some(aud) = &config.audience {
            validation.set_audience(&[aud]);
            required.insert("aud".to_owned());
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
            required.insert("iss".to_owned());
        }
        validation.required_spec_claims = required;
        Self {
            keys,
            on_unknown_key: std::sync::OnceLock::new(),
            validation,
            leeway: config.leeway_secs,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            max_lifetime: config.max_lifetime_secs,
        }
    }

    /// Verifies `token` at `unix_now` (seconds) and returns its identity.
    pub fn verify(&self, token: &str, unix_now: u64) -> Result<Identity, AuthError> {
        let kid = self.check_header(token)?;
        let claims = match &self.keys {
            Keys::One(key) => jsonwebtoken::decode::<Claims>(token, key, &self.validation),
            Keys::Set(set) => {
                let set = set.read().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(key) = set.key(kid.as_deref()) else {
                    if let Some(hook) = self.on_unknown_key.get() {
                        hook();
                    }
                    return Err(AuthError::UnknownKey);
                };
                jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            }
        }
        .map_err(decode_error)?
        .claims;
        let exp = claims.exp.ok_or(AuthError::MissingClaim("exp"))?;
        let sub = claims.sub.as_deref().filter(|s| !s.is_empty());
        let sub = sub.ok_or(AuthError::MissingClaim("sub"))?;
        if sub.len() > MAX_USER_ID_BYTES {
            return Err(AuthError::Malformed);
        }
        self.check_times(&claims, exp, unix_now)?;
        self.check_issuer_and_audience(&claims)?;
        self.check_lifetime(&claims, exp, unix_now)?;
        let patterns = |v: Vec<String>| v.iter().map(|p| Pattern::new(p)).collect();
        Ok(Identity {
            user: sub.into(),
            rooms: claims.rooms.map(patterns),
            publish: claims.publish.map(patterns),
            expires_at: Some(exp.saturating_add(self.leeway)),
        })
    }

    /// Refuses a header whose `alg` is not the pinned one, or that names a `crit` extension.
    ///
    /// Returns the header's `kid`, if it is a string.
    fn check_header(&self, token: &str) -> Result<Option<String>, AuthError> {
        let Some(header) = raw_header(token) else {
            return Ok(None); // the decoder reports a malformed header
        };
        let pinned = format!("{:?}", self.validation.algorithms[0]);
        if header
            .get("alg")
            .and_then(Value::as_str)
            .is_some_and(|alg| alg != pinned)
        {
            return Err(AuthError::WrongAlgorithm);
        }
        // No header extension is understood, so a `crit` naming any is refused (and an
        // empty or ill-typed `crit` is invalid anyway).
        if header.contains_key("crit") {
            return Err(AuthError::CriticalHeader);
        }
        Ok(header.get("kid").and_then(Value::as_str).map(str::to_owned))
    }

    /// `exp` and `nbf`, with leeway.
    fn check_times(&self, claims: &Claims, exp: u64, unix_now: u64) -> Result<(), AuthError> {
        if exp.saturating_add(self.leeway) <= unix_now {
            return Err(AuthError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > unix_now.saturating_add(self.leeway))
        {
            return Err(AuthError::NotYetValid);
        }
        Ok(())
    }

    /// `iss` and `aud`, when configured: present and exactly the expected values.
    fn check_issuer_and_audience(&self, claims: &Claims) -> Result<(), AuthError> {
        if let Some(expected) = &self.issuer {
            match &claims.iss {
                None => return Err(AuthError::MissingClaim("iss")),
                Some(Value::String(iss)) if iss == expected => {}
                Some(_) => return Err(AuthError::WrongIssuer),
            }
        }
        if let Some(expected) = &self.audience {
            let aud = claims.aud.as_ref().ok_or(AuthError::MissingClaim("aud"))?;
            if !audience_matches(aud, expected) {
                return Err(AuthError::WrongAudience);
            }
        }
        Ok(())
    }

    /// The longest lifetime allowed (`max_token_lifetime_secs`), from `iat`.
    fn check_lifetime(&self, claims: &Claims, exp: u64, unix_now: u64) -> Result<(), AuthError> {
        if let Some(max) = self.max_lifetime {
            // From `iat`, but never from later than now: a future `iat` must not stretch
            // the lifetime. Saturating throughout: `exp` may be anything up to u64::MAX.
            let latest_start = unix_now.saturating_add(self.leeway);
            let start = match &claims.iat {
                None => latest_start,
                Some(iat) => iat.as_u64().ok_or(AuthError::Malformed)?.min(latest_start),
            };
            if exp.saturating_sub(start) > max {
                return Err(AuthError::LifetimeTooLong);
            }
        }
        Ok(())
    }
}

/// The [`AuthError`] for what the JWT decoder refused.
fn decode_error(e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(match c.as_str() {
            "sub" => "sub",
            "aud" => "aud",
            "iss" => "iss",
            _ => "exp",
        }),
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        _ => AuthError::Malformed,
    }
}

/// Whether an `aud` claim names `expected`.
///
/// It does as the string itself, or as an array of strings that contains it. Anything else
/// (a number, an object, an array with a non-string) does not.
fn audience_matches(aud: &Value, expected: &str) -> bool {
    match aud {
        Value::String(aud) => aud == expected,
        Value::Array(items) => {
            items.iter().all(Value::is_string) && items.iter().any(|a| a == expected)
        }
        _ => false,
    }
}

/// A token's header as a JSON object, read without trusting it.
///
/// Reading it ourselves reports `none` and other algorithms the JWT library cannot even
/// name as such, and sees header parameters the library ignores (`crit`). `None`: not a
/// JSON object (the library then reports the token malformed).
fn raw_header(token: &str) -> Option<serde_json::Map<String, Value>> {
    use base64::Engine;
    let first = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(first.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&json).ok()
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
            max_lifetime_secs: None,
        })
        .unwrap()
    }

    /// A verifier with the given maximum lifetime.
    ///
    /// It has `issuer = "iss"`, `audience = "gateway"` and leeway 30 s.
    fn strict(max_lifetime_secs: Option<u64>) -> JwtVerifier {
        JwtVerifier::new(&JwtConfig {
            algorithm: JwtAlgorithm::Hs256,
            key: b"secret".to_vec(),
            issuer: Some("iss".into()),
            audience: Some("gateway".into()),
            leeway_secs: 30,
            max_lifetime_secs,
        })
        .unwrap()
    }

    /// A good token for [`strict`], with `changes` applied (a null removes the claim).
    fn strict_token(changes: serde_json::Value) -> String {
        let mut claims = json!({"sub":"a","exp":NOW+60,"iat":NOW,"iss":"iss","aud":"gateway"});
        for (k, v) in changes.as_object().unwrap() {
            match v {
                serde_json::Value::Null => claims.as_object_mut().unwrap().remove(k),
                v => claims.as_object_mut().unwrap().insert(k.clone(), v.clone()),
            };
        }
        token(claims, b"secret")
    }

    /// An HS256 token with a header of our own (the library's `Header` has no `crit`).
    fn token_with_header(header: serde_json::Value, claims: serde_json::Value) -> String {
        use base64::Engine;
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let signing_input = format!("{}.{}", b64(&header), b64(&claims));
        let signature = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(b"secret"),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{signing_input}.{signature}")
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

    #[test]
    fn a_configured_audience_is_required() {
        let v = strict(None);
        let missing = strict_token(json!({"aud": null}));
        assert_eq!(
            v.verify(&missing, NOW).unwrap_err(),
            AuthError::MissingClaim("aud")
        );
    }

    #[test]
    fn an_audience_that_is_not_a_string_is_refused() {
        let v = strict(None);
        for aud in [
            json!(5),
            json!({"x":1}),
            json!(true),
            json!(["gateway", 5]),
            json!([]),
        ] {
            let t = strict_token(json!({ "aud": aud }));
            let e = v.verify(&t, NOW).unwrap_err();
            assert!(
                matches!(e, AuthError::MissingClaim("aud") | AuthError::WrongAudience),
                "aud {aud}: {e:?}"
            );
        }
        let t = strict_token(json!({"aud": 5}));
        assert_eq!(
            v.verify(&t, NOW).unwrap_err(),
            AuthError::MissingClaim("aud")
        );
        let t = strict_token(json!({"aud": {"x":1}}));
        assert_eq!(
            v.verify(&t, NOW).unwrap_err(),
            AuthError::MissingClaim("aud")
        );
    }

    #[test]
    fn an_audience_array_containing_the_audience_is_accepted_and_others_are_not() {
        let v = strict(None);
        let t = strict_token(json!({"aud": ["other", "gateway"]}));
        assert_eq!(&*v.verify(&t, NOW).unwrap().user, "a");
        let t = strict_token(json!({"aud": ["other", "gateway2"]}));
        assert_eq!(v.verify(&t, NOW).unwrap_err(), AuthError::WrongAudience);
        let t = strict_token(json!({"aud": "Gateway"}));
        assert_eq!(v.verify(&t, NOW).unwrap_err(), AuthError::WrongAudience);
        assert!(v.verify(&strict_token(json!({})), NOW).is_ok());
    }

    #[test]
    fn a_configured_issuer_is_required_and_a_string() {
        let v = strict(None);
        let cases = [
            (json!({"iss": null}), AuthError::MissingClaim("iss")),
            (json!({"iss": 7}), AuthError::MissingClaim("iss")),
            (json!({"iss": {"x":1}}), AuthError::MissingClaim("iss")),
            // The library takes an array of issuers; `iss` is one string (RFC 7519 4.1.1).
            (json!({"iss": ["iss"]}), AuthError::WrongIssuer),
            (json!({"iss": "is"}), AuthError::WrongIssuer),
        ];
        for (changes, expected) in cases {
            let t = strict_token(changes.clone());
            assert_eq!(v.verify(&t, NOW).unwrap_err(), expected, "{changes}");
        }
    }

    #[test]
    fn without_audience_or_issuer_configured_the_claims_are_not_needed() {
        let v = JwtVerifier::new(&JwtConfig {
            algorithm: JwtAlgorithm::Hs256,
            key: b"secret".to_vec(),
            issuer: None,
            audience: None,
            leeway_secs: 0,
            max_lifetime_secs: None,
        })
        .unwrap();
        assert!(v
            .verify(&token(json!({"sub":"a","exp":NOW+60}), b"secret"), NOW)
            .is_ok());
    }

    #[test]
    fn a_crit_header_is_refused() {
        let v = strict(None);
        let claims = json!({"sub":"a","exp":NOW+60,"iss":"iss","aud":"gateway"});
        let plain = token_with_header(json!({"alg":"HS256","typ":"JWT"}), claims.clone());
        assert!(
            v.verify(&plain, NOW).is_ok(),
            "the hand-made token is valid"
        );
        for crit in [json!(["exp-ext"]), json!(["b64"]), json!([]), json!("x")] {
            let t = token_with_header(
                json!({"alg":"HS256","typ":"JWT","crit":crit,"exp-ext":1,"b64":true}),
                claims.clone(),
            );
            assert_eq!(
                v.verify(&t, NOW).unwrap_err(),
                AuthError::CriticalHeader,
                "crit {crit}"
            );
        }
    }

    #[test]
    fn a_lifetime_beyond_the_maximum_is_refused() {
        let v = strict(Some(3600));
        let cases = [
            // exp far beyond iat.
            json!({"exp": NOW + 3601}),
            // Without iat, counted from now (plus the 30 s leeway).
            json!({"iat": null, "exp": NOW + 30 + 3601}),
            // An iat in the future does not stretch the lifetime.
            json!({"iat": NOW + 100_000, "exp": NOW + 100_000 + 60}),
            // Issued long ago, still valid now, but issued for too long.
            json!({"iat": NOW - 7200, "exp": NOW + 60}),
            json!({"exp": 1u64 << 62}),
            json!({"exp": u64::MAX}),
        ];
        for changes in cases {
            let t = strict_token(changes.clone());
            assert_eq!(
                v.verify(&t, NOW).unwrap_err(),
                AuthError::LifetimeTooLong,
                "{changes}"
            );
        }
        // An iat that is not a number cannot be measured from.
        let t = strict_token(json!({"iat": "yesterday"}));
        assert_eq!(v.verify(&t, NOW).unwrap_err(), AuthError::Malformed);
    }

    #[test]
    fn a_lifetime_within_the_maximum_is_accepted() {
        let v = strict(Some(3600));
        for changes in [
            json!({"exp": NOW + 3600}),
            json!({"iat": NOW - 600, "exp": NOW + 3000}),
            json!({"iat": null, "exp": NOW + 30 + 3600}),
            // A little clock skew on iat is fine.
            json!({"iat": NOW + 20, "exp": NOW + 20 + 3600}),
        ] {
            let t = strict_token(changes.clone());
            assert!(v.verify(&t, NOW).is_ok(), "{changes}");
        }
    }

    #[test]
    fn a_huge_exp_without_a_maximum_does_not_overflow() {
        let v = strict(None);
        for exp in [1u64 << 62, u64::MAX] {
            let id = v.verify(&strict_token(json!({ "exp": exp })), NOW).unwrap();
            assert_eq!(id.expires_at, Some(exp.saturating_add(30)));
        }
    }

    /// An ES256 verifier over the test JWK Set (`tests/fixtures/jwks.json`) with its `ec-1`
    /// key renamed to each of `kids`.
    fn es256_set(kids: &[&str]) -> KeySet {
        let set: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/jwks.json")).expect("fixture");
        let ec = &set["keys"][1];
        let keys: Vec<Value> = kids
            .iter()
            .map(|kid| {
                let mut key = ec.clone();
                key["kid"] = json!(kid);
                key
            })
            .collect();
        let json = serde_json::to_vec(&json!({ "keys": keys })).unwrap();
        KeySet::parse(&json, JwtAlgorithm::Es256).unwrap()
    }

    fn es256_token(kid: Option<&str>, alg: Algorithm, pem: &[u8]) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem).unwrap(),
            _ => EncodingKey::from_ec_pem(pem).unwrap(),
        };
        encode(&header, &json!({"sub":"a","exp":NOW+60}), &key).unwrap()
    }

    const EC_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/jwt-es256-private.pem");
    const RSA_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/jwt-rs256-private.pem");

    #[test]
    fn a_key_set_chooses_the_key_by_kid_and_takes_a_rotated_set() {
        let config = JwtConfig {
            algorithm: JwtAlgorithm::Es256,
            key: Vec::new(),
            issuer: None,
            audience: None,
            leeway_secs: 0,
            max_lifetime_secs: None,
        };
        let v = JwtVerifier::with_key_set(&config, es256_set(&["k1", "k2"]));
        let signed = |kid| es256_token(kid, Algorithm::ES256, EC_PRIVATE);
        assert_eq!(&*v.verify(&signed(Some("k2")), NOW).unwrap().user, "a");
        assert_eq!(
            v.verify(&signed(Some("k3")), NOW).unwrap_err(),
            AuthError::UnknownKey
        );
        assert_eq!(
            v.verify(&signed(None), NOW).unwrap_err(),
            AuthError::UnknownKey,
            "two keys: a token without kid names none"
        );
        let rsa = es256_token(Some("k1"), Algorithm::RS256, RSA_PRIVATE);
        assert_eq!(v.verify(&rsa, NOW).unwrap_err(), AuthError::WrongAlgorithm);
        // The key server rotated to k3 only.
        v.replace_key_set(es256_set(&["k3"]));
        assert_eq!(&*v.verify(&signed(Some("k3")), NOW).unwrap().user, "a");
        assert_eq!(
            v.verify(&signed(Some("k1")), NOW).unwrap_err(),
            AuthError::UnknownKey
        );
        assert!(
            v.verify(&signed(None), NOW).is_ok(),
            "its single key serves no kid"
        );
    }
}
