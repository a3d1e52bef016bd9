//! JWT verification: the token's header read once to refuse `alg: none` and algorithms the
//! route does not allow, the key chosen by `kid` (or by algorithm family), the key's type held
//! against the algorithm (no HS256 signed with an RSA public key), then `jsonwebtoken` for the
//! signature and the `exp`, `nbf`, `iss` and `aud` claims. Verification only reads the keys it
//! has: fetching never happens on the handshake path.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::{KeySet, UrlKeys};
use crate::config;

/// Why a token was refused, as the log line names it (the token itself is never logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    Malformed,
    AlgNone,
    AlgNotAllowed,
    /// The key's type or declared algorithm does not match the token's algorithm.
    KeyMismatch,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    MissingExp,
    WrongIssuer,
    WrongAudience,
}

impl Invalid {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Invalid::Malformed => "malformed token",
            Invalid::AlgNone => "alg none",
            Invalid::AlgNotAllowed => "algorithm not allowed",
            Invalid::KeyMismatch => "algorithm does not match the key",
            Invalid::UnknownKey => "unknown key",
            Invalid::BadSignature => "bad signature",
            Invalid::Expired => "expired",
            Invalid::NotYetValid => "not yet valid",
            Invalid::MissingExp => "no exp claim",
            Invalid::WrongIssuer => "wrong issuer",
            Invalid::WrongAudience => "wrong audience",
        }
    }
}

/// Why a token could not be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Invalid(Invalid),
    /// The keys from `jwks_url` have not been fetched yet.
    KeysUnavailable,
}

/// Where a verifier's public keys are.
pub(crate) enum Keys {
    /// Loaded from `jwks_file` with the configuration.
    File(Arc<KeySet>),
    /// Kept fresh by a background fetch of `jwks_url`.
    Url(Arc<UrlKeys>),
    /// Only a `secret_file`.
    None,
}

/// A JWT authenticator's verifying half.
pub(crate) struct Verifier {
    keys: Keys,
    secret: Option<DecodingKey>,
    /// One validation per allowed algorithm, built once.
    validations: Vec<(Algorithm, Validation)>,
}

impl Verifier {
    pub(crate) fn new(cfg: &config::Jwt, keys: Keys, secret: Option<DecodingKey>) -> Verifier {
        // The algorithm is set per token, once the header said which it uses.
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let required: &[&str] = if cfg.require_exp { &["exp"] } else { &[] };
        validation.set_required_spec_claims(required);
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
        }
        if cfg.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&cfg.audience);
        }
        let validations = cfg
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = validation.clone();
                v.algorithms = vec![alg];
                (alg, v)
            })
            .collect();
        Verifier {
            keys,
            secret,
            validations,
        }
    }

    /// Verifies `token`; its claims when valid.
    pub(crate) fn verify(&self, token: &str) -> Result<Map<String, Value>, Failure> {
        let invalid = |i| Err(Failure::Invalid(i));
        let (alg, kid) = match read_header(token) {
            Ok(h) => h,
            Err(i) => return invalid(i),
        };
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == alg) else {
            return invalid(Invalid::AlgNotAllowed);
        };
        let key = if alg.family() == jsonwebtoken::AlgorithmFamily::Hmac {
            match &self.secret {
                Some(k) => k.clone(),
                None => return invalid(Invalid::KeyMismatch),
            }
        } else {
            let set = match &self.keys {
                Keys::File(set) => set.clone(),
                Keys::Url(url) => match url.current() {
                    Some(set) => set,
                    None => return Err(Failure::KeysUnavailable),
                },
                Keys::None => return invalid(Invalid::UnknownKey),
            };
            let found = match &kid {
                Some(kid) => set.by_kid(kid),
                None => set.for_algorithm(alg),
            };
            let Some(k) = found else {
                if let (Keys::Url(url), Some(_)) = (&self.keys, &kid) {
                    // A key rotation: fetch early (at most every 30 s), so the new key is
                    // known soon without waiting for jwks_refresh.
                    url.unknown_kid();
                }
                return invalid(Invalid::UnknownKey);
            };
            if k.key.family() != alg.family() || k.alg.is_some_and(|a| a != alg) {
                return invalid(Invalid::KeyMismatch);
            }
            k.key.clone()
        };
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key, validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                invalid(match e.kind() {
                    K::InvalidSignature => Invalid::BadSignature,
                    K::ExpiredSignature => Invalid::Expired,
                    K::ImmatureSignature => Invalid::NotYetValid,
                    K::InvalidIssuer => Invalid::WrongIssuer,
                    K::InvalidAudience => Invalid::WrongAudience,
                    K::MissingRequiredClaim(c) if c == "exp" => Invalid::MissingExp,
                    K::InvalidAlgorithm => Invalid::KeyMismatch,
                    _ => Invalid::Malformed,
                })
            }
        }
    }
}

/// The `alg` and `kid` of a token's header, read without trusting anything else in it.
fn read_header(token: &str) -> Result<(Algorithm, Option<String>), Invalid> {
    let mut parts = token.split('.');
    let (Some(head), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Invalid::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .map_err(|_| Invalid::Malformed)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| Invalid::Malformed)?;
    let alg = v
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(Invalid::Malformed)?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(Invalid::AlgNone);
    }
    let alg: Algorithm = alg.parse().map_err(|_| Invalid::AlgNotAllowed)?;
    let kid = v.get("kid").and_then(Value::as_str).map(str::to_string);
    Ok((alg, kid))
}

/// A claim's value as a header value: strings as they are, numbers in decimal, booleans as
/// words, arrays comma-joined; objects and nulls are not forwarded.
pub(crate) fn claim_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().filter_map(claim_text).collect();
            Some(parts.join(","))
        }
        Value::Null | Value::Object(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn the_header_is_read_without_trusting_it() {
        let t = |h: &str| format!("{}.{}.sig", b64(h), b64("{}"));
        assert_eq!(read_header(&t(r#"{"alg":"none"}"#)), Err(Invalid::AlgNone));
        assert_eq!(read_header(&t(r#"{"alg":"NONE"}"#)), Err(Invalid::AlgNone));
        assert_eq!(
            read_header(&t(r#"{"alg":"XS1"}"#)),
            Err(Invalid::AlgNotAllowed)
        );
        assert_eq!(
            read_header(&t(r#"{"alg":"ES256","kid":"k1"}"#)),
            Ok((Algorithm::ES256, Some("k1".into())))
        );
        assert_eq!(read_header("only.two"), Err(Invalid::Malformed));
        assert_eq!(read_header("a.b.c.d"), Err(Invalid::Malformed));
    }

    #[test]
    fn claims_become_header_text() {
        let v: Value = serde_json::json!({"s": "alice", "n": 42, "f": 1.5, "a": ["x", 2], "o": {}});
        assert_eq!(claim_text(&v["s"]).as_deref(), Some("alice"));
        assert_eq!(claim_text(&v["n"]).as_deref(), Some("42"));
        assert_eq!(claim_text(&v["f"]).as_deref(), Some("1.5"));
        assert_eq!(claim_text(&v["a"]).as_deref(), Some("x,2"));
        assert_eq!(claim_text(&v["o"]), None);
    }
}
