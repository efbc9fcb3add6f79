//! JSON Web Tokens (RFC 7519, compact JWS): parsing, time checks and signature checks, with
//! Envoy's error statuses and messages.

use std::fmt;

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::jwks::{Alg, B64, Jwks, SignatureError};

/// Why a request is not authenticated. [`AuthError::message`] is Envoy's text for it, sent
/// as the body of the 401 (403 for [`AuthError::AudienceNotAllowed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No token where the requirement looked.
    Missing,
    /// Not three base64url sections separated by two dots.
    BadFormat,
    /// The header is not base64url JSON.
    HeaderParse,
    /// The header has no string `alg`.
    HeaderBadAlg,
    /// The header's `alg` is not one this filter verifies (`none`, ES512...).
    HeaderNotImplementedAlg,
    /// The header's `kid` is not a string.
    HeaderBadKid,
    /// The payload is not base64url JSON (an object).
    PayloadParse,
    /// A registered claim has the wrong type (`iss`, `sub`, `jti` not strings; `exp`, `nbf`,
    /// `iat` not non-negative numbers; `aud` not a string or list of strings).
    PayloadBadClaim(&'static str),
    /// The signature is not base64url.
    SignatureParse,
    /// No provider of the requirement accepts the token's `iss`.
    UnknownIssuer,
    /// None of the token's audiences is allowed by the provider.
    AudienceNotAllowed,
    /// `nbf` is in the future (beyond the clock skew).
    NotYetValid,
    /// `exp` is in the past (beyond the clock skew).
    Expired,
    /// Keys matched the token's `kid`/`alg`; none verified the signature.
    VerificationFail,
    /// No key matched the token's `kid`/`alg`.
    KidAlgMismatch,
    /// The remote JWKS could not be fetched (or parsed).
    JwksFetchFail,
}

impl AuthError {
    /// Envoy's message for this status (jwt_verify_lib `getStatusString`).
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "Jwt is missing",
            AuthError::BadFormat => "Jwt is not in the form of Header.Payload.Signature",
            AuthError::HeaderParse => "Jwt header is an invalid Base64url input or an invalid JSON",
            AuthError::HeaderBadAlg => "Jwt header [alg] field is not a string",
            AuthError::HeaderNotImplementedAlg => "Jwt header [alg] field value is invalid",
            AuthError::HeaderBadKid => "Jwt header [kid] field is not a string",
            AuthError::PayloadParse => "Jwt payload is an invalid Base64 or an invalid JSON",
            AuthError::PayloadBadClaim("iss") => "Jwt payload [iss] field is not a string",
            AuthError::PayloadBadClaim("sub") => "Jwt payload [sub] field is not a string",
            AuthError::PayloadBadClaim("jti") => "Jwt payload [jti] field is not a string",
            AuthError::PayloadBadClaim("iat") => "Jwt payload [iat] field is not an integer",
            AuthError::PayloadBadClaim("nbf") => "Jwt payload [nbf] field is not an integer",
            AuthError::PayloadBadClaim("exp") => "Jwt payload [exp] field is not an integer",
            AuthError::PayloadBadClaim(_) => {
                "Jwt payload [aud] field is not a string or string list"
            }
            AuthError::SignatureParse => "Jwt signature is an invalid Base64",
            AuthError::UnknownIssuer => "Jwt issuer is not configured",
            AuthError::AudienceNotAllowed => "Audiences in Jwt are not allowed",
            AuthError::NotYetValid => "Jwt not yet valid",
            AuthError::Expired => "Jwt is expired",
            AuthError::VerificationFail => "Jwt verification fails",
            AuthError::KidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            AuthError::JwksFetchFail => "Jwks remote fetch is failed",
        }
    }

    /// The HTTP status Envoy answers: 403 for a disallowed audience, else 401.
    pub fn status(self) -> u32 {
        match self {
            AuthError::AudienceNotAllowed => 403,
            _ => 401,
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for AuthError {}

/// A token split and decoded; nothing verified yet.
#[derive(Debug)]
pub struct Jwt<'a> {
    /// The signing algorithm.
    pub alg: Alg,
    /// The key id, if the header has one.
    pub kid: Option<String>,
    /// The payload (claims).
    pub payload: Map<String, Value>,
    /// `iss`, if present.
    pub iss: Option<String>,
    /// `aud` as a list (a single string becomes one entry).
    pub aud: Vec<String>,
    /// `exp` in Unix seconds, if present.
    pub exp: Option<u64>,
    /// `nbf` in Unix seconds, if present.
    pub nbf: Option<u64>,
    /// `header.payload`, the signed bytes.
    signed: &'a str,
    signature: Vec<u8>,
}

/// The base64url payload section of a token (what `forward_payload_header` carries).
pub fn payload_section(token: &str) -> &str {
    token.split('.').nth(1).unwrap_or("")
}

impl<'a> Jwt<'a> {
    /// Split and decode `token`. Checks the format, the header, the payload and the types of
    /// the registered claims, in Envoy's order.
    pub fn parse(token: &'a str) -> Result<Jwt<'a>, AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::BadFormat);
        };
        if header.is_empty() || payload.is_empty() || signature.is_empty() {
            return Err(AuthError::BadFormat);
        }
        let signed_len = header.len() + 1 + payload.len();
        let header = decode_object(header).ok_or(AuthError::HeaderParse)?;
        let alg = match header.get("alg") {
            Some(Value::String(a)) => Alg::parse(a).ok_or(AuthError::HeaderNotImplementedAlg)?,
            _ => return Err(AuthError::HeaderBadAlg),
        };
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(AuthError::HeaderBadKid),
        };
        let claims = decode_object(payload).ok_or(AuthError::PayloadParse)?;
        let iss = string_claim(&claims, "iss")?;
        string_claim(&claims, "sub")?;
        time_claim(&claims, "iat")?;
        let nbf = time_claim(&claims, "nbf")?;
        let exp = time_claim(&claims, "exp")?;
        string_claim(&claims, "jti")?;
        let aud = match claims.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(AuthError::PayloadBadClaim("aud"))?,
            Some(_) => return Err(AuthError::PayloadBadClaim("aud")),
        };
        let signature = B64
            .decode(signature)
            .map_err(|_| AuthError::SignatureParse)?;
        Ok(Jwt {
            alg,
            kid,
            payload: claims,
            iss,
            aud,
            exp,
            nbf,
            signed: &token[..signed_len],
            signature,
        })
    }

    /// Check `nbf` and `exp` against `now` (Unix seconds), allowing `skew` seconds each way.
    pub fn check_time(&self, now: u64, skew: u64) -> Result<(), AuthError> {
        check_time(self.exp, self.nbf, now, skew)
    }

    /// Check the signature with the keys of `jwks`.
    pub fn verify(&self, jwks: &Jwks) -> Result<(), AuthError> {
        jwks.verify(
            self.alg,
            self.kid.as_deref(),
            self.signed.as_bytes(),
            &self.signature,
        )
        .map_err(|e| match e {
            SignatureError::NoMatchingKey => AuthError::KidAlgMismatch,
            SignatureError::Invalid => AuthError::VerificationFail,
        })
    }
}

/// Envoy's time constraint: `now + skew < nbf` is not yet valid, `now > exp + skew` expired.
pub fn check_time(
    exp: Option<u64>,
    nbf: Option<u64>,
    now: u64,
    skew: u64,
) -> Result<(), AuthError> {
    if nbf.is_some_and(|nbf| now.saturating_add(skew) < nbf) {
        return Err(AuthError::NotYetValid);
    }
    if exp.is_some_and(|exp| now > exp.saturating_add(skew)) {
        return Err(AuthError::Expired);
    }
    Ok(())
}

fn decode_object(section: &str) -> Option<Map<String, Value>> {
    let bytes = B64.decode(section).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

fn string_claim(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(AuthError::PayloadBadClaim(name)),
    }
}

/// A NumericDate: a non-negative JSON number; a fraction is truncated.
fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else {
                match n.as_f64() {
                    // The cast saturates: a date past u64 seconds is "never".
                    Some(f) if f >= 0.0 && f.is_finite() => Ok(Some(f as u64)),
                    _ => Err(AuthError::PayloadBadClaim(name)),
                }
            }
        }
        Some(_) => Err(AuthError::PayloadBadClaim(name)),
    }
}
