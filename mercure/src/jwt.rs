//! JWTs as the reference hub reads them: HS256 only, the `mercure` claim with its `publish` and
//! `subscribe` selector lists (or the same claim under `https://mercure.rocks/`), `exp` and `nbf`
//! checked with no leeway, no claim required but the ones the caller needs.
//!
//! Every refusal here becomes `401 Unauthorized` at the hub, as in the reference: `alg: none`,
//! another algorithm, a wrong key, an expired token, a malformed token, more than
//! [`MAX_CLAIM_SELECTORS`] selectors. A token without the claim a role needs (`mercure.publish`
//! to publish) is valid as a token and refused by the handler, also with 401.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// More selectors than this in `mercure.publish` or `mercure.subscribe` is refused (as the
/// reference hub does), so that one token cannot force unbounded matching work.
pub const MAX_CLAIM_SELECTORS: usize = 1000;

/// An HS256 secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtKey(Vec<u8>);

impl JwtKey {
    /// The key as the reference hub takes it: the bytes of the string, as is.
    pub fn new(secret: impl Into<Vec<u8>>) -> JwtKey {
        JwtKey(secret.into())
    }

    /// 32 random bytes, written as 64 hex digits (for development: no setting needed).
    pub fn random() -> JwtKey {
        let bytes: [u8; 32] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        JwtKey(hex.into_bytes())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtKey(<{} bytes>)", self.0.len())
    }
}

/// The `mercure` claim.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MercureClaim {
    /// Topic selectors the holder may publish to; absent: may not publish at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Topic selectors of the private updates the holder may receive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
    /// Free data about the subscriber (the reference hub shows it in subscription events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

/// The claims this crate reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the epoch. A subscription ends at this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// The token's id: what [`crate::Hub::revoke`] names to refuse it before its expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mercure: Option<MercureClaim>,
    /// The same claim under its namespaced name; wins over `mercure` when present.
    #[serde(
        rename = "https://mercure.rocks/",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mercure_namespaced: Option<MercureClaim>,
}

impl Claims {
    /// Claims allowing to publish to `selectors`, expiring after `ttl` (none: never).
    pub fn publisher(selectors: Vec<String>, ttl: Option<Duration>) -> Claims {
        Claims {
            exp: ttl.map(expiry),
            mercure: Some(MercureClaim {
                publish: Some(selectors),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Claims allowing to receive private updates matching `selectors`.
    pub fn subscriber(selectors: Vec<String>, ttl: Option<Duration>) -> Claims {
        Claims {
            exp: ttl.map(expiry),
            mercure: Some(MercureClaim {
                subscribe: Some(selectors),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The effective `mercure` claim.
    pub fn mercure(&self) -> Option<&MercureClaim> {
        self.mercure_namespaced.as_ref().or(self.mercure.as_ref())
    }

    pub fn publish_selectors(&self) -> Option<&[String]> {
        self.mercure().and_then(|m| m.publish.as_deref())
    }

    pub fn subscribe_selectors(&self) -> Option<&[String]> {
        self.mercure().and_then(|m| m.subscribe.as_deref())
    }

    /// When the token expires, as a system time.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.exp.map(|s| UNIX_EPOCH + Duration::from_secs(s))
    }
}

fn expiry(ttl: Duration) -> u64 {
    (SystemTime::now() + ttl)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a token was refused.
#[derive(Debug, Error)]
pub enum JwtError {
    /// Bad signature, wrong key, unsupported algorithm (`none` included), expired, not yet
    /// valid, malformed.
    #[error("invalid JWT: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("too many selectors in the mercure claim (more than {MAX_CLAIM_SELECTORS})")]
    TooManySelectors,
}

/// Signs `claims` with `key` (HS256).
pub fn sign(claims: &Claims, key: &JwtKey) -> String {
    // HMAC signing of serializable plain data cannot fail.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .expect("HS256 signing of plain claims")
}

/// Verifies `token` against `key` and returns its claims.
pub fn verify(token: &str, key: &JwtKey) -> Result<Claims, JwtError> {
    let mut validation = Validation::new(Algorithm::HS256);
    // As the reference hub: no claim is required, `exp` and `nbf` are checked when present,
    // with no leeway, and `aud` is not checked.
    validation.required_spec_claims.clear();
    validation.leeway = 0;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(key.as_bytes()),
        &validation,
    )?;
    let claims = data.claims;
    if let Some(m) = claims.mercure() {
        let count = |v: &Option<Vec<String>>| v.as_ref().map_or(0, Vec::len);
        if count(&m.publish) > MAX_CLAIM_SELECTORS || count(&m.subscribe) > MAX_CLAIM_SELECTORS {
            return Err(JwtError::TooManySelectors);
        }
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(json: &str) -> String {
        use std::fmt::Write;
        // URL-safe base64 without padding, enough for a test token.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = json.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                let _ = write!(
                    out,
                    "{}",
                    ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char
                );
            }
        }
        out
    }

    #[test]
    fn signed_tokens_verify_and_keep_their_claims() {
        let key = JwtKey::new("!ChangeThisMercureHubJWTSecretKey!");
        let claims = Claims::publisher(vec!["*".into()], Some(Duration::from_secs(60)));
        let back = verify(&sign(&claims, &key), &key).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.publish_selectors(), Some(&["*".to_owned()][..]));
        assert_eq!(back.subscribe_selectors(), None);
    }

    #[test]
    fn the_reference_conformance_token_verifies() {
        // The token of the reference conformance suite, signed with the reference default key.
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdLCJzdWJzY3JpYmUiOlsiKiJdfX0.bVXdlWXwfw9ySx7-iV5OpUSHo34RkjUdVzDLBcc6l_g";
        let claims = verify(token, &JwtKey::new("!ChangeThisMercureHubJWTSecretKey!")).unwrap();
        assert_eq!(claims.publish_selectors(), Some(&["*".to_owned()][..]));
        assert_eq!(claims.subscribe_selectors(), Some(&["*".to_owned()][..]));
    }

    #[test]
    fn refuses_wrong_key_none_alg_expired_and_garbage() {
        let key = JwtKey::new("right");
        let claims = Claims::subscriber(vec!["*".into()], None);
        assert!(matches!(
            verify(&sign(&claims, &JwtKey::new("wrong")), &key),
            Err(JwtError::Invalid(_))
        ));
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"mercure":{"publish":["*"]}}"#)
        );
        assert!(verify(&none, &key).is_err(), "alg none accepted");
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(b"right"),
        )
        .unwrap();
        assert!(verify(&hs512, &key).is_err(), "other algorithm accepted");
        let expired = Claims {
            exp: Some(1),
            ..claims.clone()
        };
        assert!(verify(&sign(&expired, &key), &key).is_err());
        assert!(verify("not.a.jwt", &key).is_err());
    }

    #[test]
    fn the_namespaced_claim_wins_and_selector_lists_are_bounded() {
        let key = JwtKey::new("k");
        let claims = Claims {
            mercure_namespaced: Some(MercureClaim {
                subscribe: Some(vec!["a".into()]),
                ..Default::default()
            }),
            ..Claims::subscriber(vec!["b".into()], None)
        };
        let back = verify(&sign(&claims, &key), &key).unwrap();
        assert_eq!(back.subscribe_selectors(), Some(&["a".to_owned()][..]));
        let many = Claims::subscriber(vec!["x".into(); MAX_CLAIM_SELECTORS + 1], None);
        assert!(matches!(
            verify(&sign(&many, &key), &key),
            Err(JwtError::TooManySelectors)
        ));
    }

    #[test]
    fn keys_do_not_show_in_debug() {
        let key = JwtKey::random();
        assert_eq!(key.as_bytes().len(), 64);
        assert!(!format!("{key:?}").contains(std::str::from_utf8(key.as_bytes()).unwrap()));
        assert_ne!(JwtKey::random(), key);
    }
}
