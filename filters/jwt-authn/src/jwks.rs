//! JSON Web Key Sets (RFC 7517): parsing the keys and checking a signature with them.
//!
//! Supported keys: `RSA` (RS256/384/512, PS256/384/512), `EC` on P-256 (ES256) and P-384
//! (ES384), `oct` (HS256/384/512) and `OKP` Ed25519 (EdDSA). A key of another type or curve,
//! or one marked `"use": "enc"`, is skipped (real key sets mix them in); a key of a supported
//! type with broken material (a missing `n`, a point not on the curve...) makes the whole set
//! invalid, as in Envoy.

use std::fmt;

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::{Map, Value};
use sha2::{Sha256, Sha384, Sha512};

/// Base64url without padding, accepting padded input too (as Envoy does).
pub(crate) const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// A JWS algorithm this filter verifies (the `alg` of a token header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256 (salt length 32).
    Ps256,
    /// RSASSA-PSS with SHA-384 (salt length 48).
    Ps384,
    /// RSASSA-PSS with SHA-512 (salt length 64).
    Ps512,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// HMAC with SHA-256.
    Hs256,
    /// HMAC with SHA-384.
    Hs384,
    /// HMAC with SHA-512.
    Hs512,
    /// Ed25519.
    EdDsa,
}

impl Alg {
    /// The algorithm named `name`, if supported (`none` and ES512 are not).
    pub fn parse(name: &str) -> Option<Alg> {
        Some(match name {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "HS256" => Alg::Hs256,
            "HS384" => Alg::Hs384,
            "HS512" => Alg::Hs512,
            "EdDSA" => Alg::EdDsa,
            _ => return None,
        })
    }

    /// The JWS name (`RS256`...).
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::Hs256 => "HS256",
            Alg::Hs384 => "HS384",
            Alg::Hs512 => "HS512",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// The key material of one JWK.
enum Material {
    Rsa(rsa::PublicKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
    Oct(Vec<u8>),
}

/// One usable key of a set.
struct Jwk {
    kid: Option<String>,
    alg: Option<String>,
    material: Material,
}

/// A parsed key set: the keys that can verify signatures.
pub struct Jwks {
    keys: Vec<Jwk>,
}

/// Why a key set was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksError {
    /// The text is not JSON.
    NotJson(String),
    /// The document has no `keys` array.
    NoKeysArray,
    /// Key number `index` (from 0) has a supported type but broken material.
    BadKey {
        /// Position in `keys`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// No key of the set can be used; one reason per key.
    NoUsableKeys(Vec<String>),
}

impl fmt::Display for JwksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksError::NotJson(e) => write!(f, "JWKS is not valid JSON: {e}"),
            JwksError::NoKeysArray => write!(f, "JWKS has no [keys] array"),
            JwksError::BadKey { index, reason } => write!(f, "JWKS key {index}: {reason}"),
            JwksError::NoUsableKeys(reasons) if reasons.is_empty() => {
                write!(f, "JWKS has no keys")
            }
            JwksError::NoUsableKeys(reasons) => {
                write!(f, "JWKS has no usable key ({})", reasons.join("; "))
            }
        }
    }
}

impl std::error::Error for JwksError {}

/// Why a signature did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No key matched the token's `kid` and `alg`.
    NoMatchingKey,
    /// Keys matched, none verified the signature.
    Invalid,
}

/// A key that cannot be used, and whether that is an error (broken material) or only a skip.
enum KeyProblem {
    Skip(String),
    Broken(String),
}

impl Jwks {
    /// Parse a JWKS document given as JSON text. Returns the set and the reasons keys were
    /// skipped (unsupported types, encryption keys), for logging.
    pub fn parse(text: &[u8]) -> Result<(Jwks, Vec<String>), JwksError> {
        let value: Value =
            serde_json::from_slice(text).map_err(|e| JwksError::NotJson(e.to_string()))?;
        Jwks::from_value(&value)
    }

    /// Parse a JWKS document already read as JSON; see [`Jwks::parse`].
    pub fn from_value(value: &Value) -> Result<(Jwks, Vec<String>), JwksError> {
        let Some(list) = value.get("keys").and_then(Value::as_array) else {
            return Err(JwksError::NoKeysArray);
        };
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (index, key) in list.iter().enumerate() {
            match parse_key(key) {
                Ok(jwk) => keys.push(jwk),
                Err(KeyProblem::Skip(reason)) => skipped.push(format!("key {index}: {reason}")),
                Err(KeyProblem::Broken(reason)) => {
                    return Err(JwksError::BadKey { index, reason });
                }
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys(skipped));
        }
        Ok((Jwks { keys }, skipped))
    }

    /// The number of usable keys.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Check `signature` over `signed` with the keys that match `kid` (a key without `kid`
    /// matches any) and `alg` (a key without `alg` matches any), as Envoy does.
    pub fn verify(
        &self,
        alg: Alg,
        kid: Option<&str>,
        signed: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        let mut matched = false;
        for key in &self.keys {
            if let (Some(want), Some(have)) = (kid, key.kid.as_deref())
                && want != have
            {
                continue;
            }
            if key.alg.as_deref().is_some_and(|a| a != alg.name()) {
                continue;
            }
            matched = true;
            if key.material.verifies(alg, signed, signature) {
                return Ok(());
            }
        }
        Err(if matched {
            SignatureError::Invalid
        } else {
            SignatureError::NoMatchingKey
        })
    }
}

impl Material {
    /// True when `signature` is a valid `alg` signature of `signed` by this key. A key of
    /// another family than `alg` never verifies.
    fn verifies(&self, alg: Alg, signed: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier as _;
        match (self, alg) {
            (Material::Rsa(k), Alg::Rs256) => {
                k.pkcs1v15_verify::<Sha256>(signed, signature).is_ok()
            }
            (Material::Rsa(k), Alg::Rs384) => {
                k.pkcs1v15_verify::<Sha384>(signed, signature).is_ok()
            }
            (Material::Rsa(k), Alg::Rs512) => {
                k.pkcs1v15_verify::<Sha512>(signed, signature).is_ok()
            }
            (Material::Rsa(k), Alg::Ps256) => k.pss_verify::<Sha256>(signed, signature).is_ok(),
            (Material::Rsa(k), Alg::Ps384) => k.pss_verify::<Sha384>(signed, signature).is_ok(),
            (Material::Rsa(k), Alg::Ps512) => k.pss_verify::<Sha512>(signed, signature).is_ok(),
            (Material::P256(k), Alg::Es256) => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|s| k.verify(signed, &s).is_ok()),
            (Material::P384(k), Alg::Es384) => p384::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|s| k.verify(signed, &s).is_ok()),
            (Material::Ed25519(k), Alg::EdDsa) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|s| k.verify(signed, &s).is_ok()),
            (Material::Oct(k), Alg::Hs256) => hmac_verifies::<Sha256>(k, signed, signature),
            (Material::Oct(k), Alg::Hs384) => hmac_verifies::<Sha384>(k, signed, signature),
            (Material::Oct(k), Alg::Hs512) => hmac_verifies::<Sha512>(k, signed, signature),
            _ => false,
        }
    }
}

/// Constant-time HMAC check.
fn hmac_verifies<D>(key: &[u8], signed: &[u8], signature: &[u8]) -> bool
where
    D: hmac::EagerHash,
    hmac::Hmac<D>: KeyInit + Mac,
{
    match <hmac::Hmac<D> as KeyInit>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(signed);
            mac.verify_slice(signature).is_ok()
        }
        Err(_) => false,
    }
}

fn parse_key(key: &Value) -> Result<Jwk, KeyProblem> {
    let Some(obj) = key.as_object() else {
        return Err(KeyProblem::Broken("not a JSON object".into()));
    };
    let kty = match obj.get("kty") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(KeyProblem::Broken("[kty] is not a string".into())),
        None => return Err(KeyProblem::Broken("[kty] is missing".into())),
    };
    let kid = optional_string(obj, "kid")?;
    let alg = optional_string(obj, "alg")?;
    if let Some(usage) = optional_string(obj, "use")?
        && usage != "sig"
    {
        return Err(KeyProblem::Skip(format!("[use] is {usage:?}, not \"sig\"")));
    }
    let material = match kty {
        "RSA" => {
            check_alg_prefix(alg.as_deref(), &["RS", "PS"], "RSA")?;
            let n = b64_field(obj, "n", "RSA")?;
            let e = b64_field(obj, "e", "RSA")?;
            let key = rsa::PublicKey::new(
                rsa::BoxedUint::from_be_slice_vartime(&n),
                rsa::BoxedUint::from_be_slice_vartime(&e),
            )
            .map_err(|e| KeyProblem::Broken(format!("RSA key rejected: {e}")))?;
            Material::Rsa(key)
        }
        "EC" => {
            check_alg_prefix(alg.as_deref(), &["ES"], "EC")?;
            let crv = match optional_string(obj, "crv")? {
                Some(c) => c,
                None => match alg.as_deref() {
                    Some("ES384") => "P-384".to_string(),
                    _ => "P-256".to_string(),
                },
            };
            let expected_alg = match crv.as_str() {
                "P-256" => "ES256",
                "P-384" => "ES384",
                other => {
                    return Err(KeyProblem::Skip(format!(
                        "EC curve {other:?} is not supported"
                    )));
                }
            };
            if alg.as_deref().is_some_and(|a| a != expected_alg) {
                return Err(KeyProblem::Skip(format!(
                    "[alg] {:?} does not fit curve {crv}",
                    alg.unwrap_or_default()
                )));
            }
            let x = b64_field(obj, "x", "EC")?;
            let y = b64_field(obj, "y", "EC")?;
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let bad = |_| KeyProblem::Broken(format!("[x] and [y] are not a point of {crv}"));
            if crv == "P-256" {
                Material::P256(p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).map_err(bad)?)
            } else {
                Material::P384(p384::ecdsa::VerifyingKey::from_sec1_bytes(&point).map_err(bad)?)
            }
        }
        "oct" => {
            check_alg_prefix(alg.as_deref(), &["HS"], "oct")?;
            let k = b64_field(obj, "k", "oct")?;
            if k.is_empty() {
                return Err(KeyProblem::Broken("[k] is empty".into()));
            }
            Material::Oct(k)
        }
        "OKP" => {
            let crv = optional_string(obj, "crv")?.unwrap_or_default();
            if crv != "Ed25519" {
                return Err(KeyProblem::Skip(format!(
                    "OKP curve {crv:?} is not supported"
                )));
            }
            check_alg_prefix(alg.as_deref(), &["EdDSA"], "OKP")?;
            let x = b64_field(obj, "x", "OKP")?;
            let bytes: [u8; 32] = x
                .as_slice()
                .try_into()
                .map_err(|_| KeyProblem::Broken("Ed25519 [x] is not 32 bytes".into()))?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|_| KeyProblem::Broken("Ed25519 [x] is not a valid key".into()))?;
            Material::Ed25519(key)
        }
        other => {
            return Err(KeyProblem::Skip(format!(
                "[kty] {other:?} is not supported"
            )));
        }
    };
    Ok(Jwk { kid, alg, material })
}

fn optional_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, KeyProblem> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(KeyProblem::Broken(format!("[{field}] is not a string"))),
    }
}

fn b64_field(obj: &Map<String, Value>, field: &str, kty: &str) -> Result<Vec<u8>, KeyProblem> {
    match obj.get(field) {
        Some(Value::String(s)) => B64.decode(s).map_err(|_| {
            KeyProblem::Broken(format!("[{field}] of the {kty} key is not base64url"))
        }),
        Some(_) => Err(KeyProblem::Broken(format!(
            "[{field}] of the {kty} key is not a string"
        ))),
        None => Err(KeyProblem::Broken(format!(
            "[{field}] is missing for the {kty} key"
        ))),
    }
}

/// A key whose `alg` is of another family is not usable for signatures (e.g. `RSA-OAEP`).
fn check_alg_prefix(alg: Option<&str>, prefixes: &[&str], kty: &str) -> Result<(), KeyProblem> {
    match alg {
        Some(a) if !prefixes.iter().any(|p| a.starts_with(p)) || Alg::parse(a).is_none() => {
            Err(KeyProblem::Skip(format!(
                "[alg] {a:?} is not a supported signature algorithm for a {kty} key"
            )))
        }
        _ => Ok(()),
    }
}
