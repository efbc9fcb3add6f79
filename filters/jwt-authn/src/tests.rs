//! Unit tests of the token, key-set, configuration and decision logic, with tokens signed by
//! keys generated here with the same crates.

use std::sync::OnceLock;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::authn::{Decision, Denial, Edits, Engine, RequestView};
use crate::config::{Config, Location, Mode, PathMatch};
use crate::jwks::{Alg, B64, Jwks, JwksError};
use crate::jwt::{AuthError, Jwt};

const NOW: u64 = 1_700_000_000;
const ISS: &str = "https://issuer.example.com";

struct TestKeys {
    rsa: rsa::PrivateKey,
    p256: p256::ecdsa::SigningKey,
    p384: p384::ecdsa::SigningKey,
    ed: ed25519_dalek::SigningKey,
    hmac: Vec<u8>,
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).unwrap();
    b
}

/// Keys generated once per test run.
fn keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        use rsa::Generate as _;
        TestKeys {
            rsa: rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).unwrap(),
            p256: p256::ecdsa::SigningKey::try_generate_from_rng(&mut getrandom::SysRng).unwrap(),
            p384: p384::ecdsa::SigningKey::try_generate_from_rng(&mut getrandom::SysRng).unwrap(),
            ed: ed25519_dalek::SigningKey::from_bytes(&random::<32>()),
            hmac: random::<32>().to_vec(),
        }
    })
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The public JWK of each test key, with `kid` = the key's name.
fn jwk(name: &str) -> Value {
    use rsa::traits::PublicKeyParts as _;
    let k = keys();
    match name {
        "rsa" => {
            json!({"kty": "RSA", "kid": "rsa", "n": b64(&k.rsa.n_bytes()), "e": b64(&k.rsa.e_bytes())})
        }
        "ec256" => {
            let point = k.p256.verifying_key().to_sec1_point(false);
            let bytes = point.as_bytes();
            json!({"kty": "EC", "kid": "ec256", "crv": "P-256", "x": b64(&bytes[1..33]), "y": b64(&bytes[33..])})
        }
        "ec384" => {
            let point = k.p384.verifying_key().to_sec1_point(false);
            let bytes = point.as_bytes();
            json!({"kty": "EC", "kid": "ec384", "crv": "P-384", "x": b64(&bytes[1..49]), "y": b64(&bytes[49..])})
        }
        "ed" => {
            json!({"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": b64(k.ed.verifying_key().as_bytes())})
        }
        "hs" => json!({"kty": "oct", "kid": "hs", "k": b64(&k.hmac)}),
        other => panic!("no key {other}"),
    }
}

fn jwks_of(names: &[&str]) -> Value {
    json!({"keys": names.iter().map(|n| jwk(n)).collect::<Vec<_>>()})
}

fn all_keys() -> Value {
    jwks_of(&["rsa", "ec256", "ec384", "ed", "hs"])
}

/// Sign `header.payload` with the key `alg` needs.
fn signature(alg: &str, signed: &[u8]) -> Vec<u8> {
    use ed25519_dalek::Signer as _;
    use hmac::{KeyInit, Mac};
    use sha2::{Sha256, Sha384, Sha512};
    let k = keys();
    match alg {
        "RS256" => k.rsa.pkcs1v15_sign::<Sha256>(signed).unwrap(),
        "RS384" => k.rsa.pkcs1v15_sign::<Sha384>(signed).unwrap(),
        "RS512" => k.rsa.pkcs1v15_sign::<Sha512>(signed).unwrap(),
        "PS256" => k.rsa.pss_sign::<Sha256>(signed).unwrap(),
        "PS384" => k.rsa.pss_sign::<Sha384>(signed).unwrap(),
        "PS512" => k.rsa.pss_sign::<Sha512>(signed).unwrap(),
        "ES256" => {
            let s: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(&k.p256, signed);
            s.to_bytes().to_vec()
        }
        "ES384" => {
            let s: p384::ecdsa::Signature = p384::ecdsa::signature::Signer::sign(&k.p384, signed);
            s.to_bytes().to_vec()
        }
        "EdDSA" => k.ed.sign(signed).to_bytes().to_vec(),
        "HS256" => {
            let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&k.hmac).unwrap();
            m.update(signed);
            m.finalize().into_bytes().to_vec()
        }
        "HS384" => {
            let mut m = <hmac::Hmac<Sha384> as KeyInit>::new_from_slice(&k.hmac).unwrap();
            m.update(signed);
            m.finalize().into_bytes().to_vec()
        }
        "HS512" => {
            let mut m = <hmac::Hmac<Sha512> as KeyInit>::new_from_slice(&k.hmac).unwrap();
            m.update(signed);
            m.finalize().into_bytes().to_vec()
        }
        other => panic!("cannot sign {other}"),
    }
}

/// A token with header `header` and payload `claims`, signed for the header's `alg`.
fn token_with_header(header: Value, claims: Value) -> String {
    let alg = header["alg"].as_str().unwrap().to_string();
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = signature(&alg, signed.as_bytes());
    format!("{signed}.{}", b64(&sig))
}

fn token(alg: &str, claims: Value) -> String {
    token_with_header(json!({"alg": alg, "typ": "JWT"}), claims)
}

/// Claims valid at NOW for ISS and audience `api.example.com`.
fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": "api.example.com", "exp": NOW + 3600, "iat": NOW, "nbf": NOW - 10})
}

fn rs256() -> String {
    token("RS256", claims())
}

fn jwks() -> Jwks {
    Jwks::from_value(&all_keys()).unwrap().0
}

fn verify(token: &str) -> Result<(), AuthError> {
    let jwt = Jwt::parse(token)?;
    jwt.check_time(NOW, 60)?;
    jwt.verify(&jwks())
}

/// Replace the payload of a signed token (the signature no longer fits).
fn with_payload(token: &str, claims: Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    )
}

// ---- Tokens and keys ----

#[test]
fn every_algorithm_verifies_and_a_changed_payload_does_not() {
    for alg in [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "HS256", "HS384",
        "HS512", "EdDSA",
    ] {
        let t = token(alg, claims());
        assert_eq!(verify(&t), Ok(()), "{alg}");
        let mut forged = claims();
        forged["sub"] = json!("mallory");
        assert_eq!(
            verify(&with_payload(&t, forged)),
            Err(AuthError::VerificationFail),
            "{alg}"
        );
        assert_eq!(Jwt::parse(&t).unwrap().alg.name(), alg);
    }
}

#[test]
fn keys_are_chosen_by_kid_and_alg() {
    let t = token_with_header(json!({"alg": "RS256", "kid": "rsa"}), claims());
    assert_eq!(verify(&t), Ok(()));
    let t = token_with_header(json!({"alg": "RS256", "kid": "nope"}), claims());
    assert_eq!(verify(&t), Err(AuthError::KidAlgMismatch));
    // A key without kid matches any kid.
    let mut set = jwks_of(&["ec256"]);
    set["keys"][0].as_object_mut().unwrap().remove("kid");
    let (set, _) = Jwks::from_value(&set).unwrap();
    let t = token_with_header(json!({"alg": "ES256", "kid": "whatever"}), claims());
    assert_eq!(Jwt::parse(&t).unwrap().verify(&set), Ok(()));
    // A key whose alg differs from the token's is not used.
    let mut set = jwks_of(&["rsa"]);
    set["keys"][0]["alg"] = json!("RS384");
    let (set, _) = Jwks::from_value(&set).unwrap();
    let t = token("RS256", claims());
    assert_eq!(
        Jwt::parse(&t).unwrap().verify(&set),
        Err(AuthError::KidAlgMismatch)
    );
    // The right kid but a key of another family: keys matched, none verified.
    let t = token_with_header(json!({"alg": "RS256", "kid": "ec256"}), claims());
    assert_eq!(verify(&t), Err(AuthError::VerificationFail));
}

#[test]
fn malformed_tokens_get_envoys_statuses() {
    let good = rs256();
    let parts: Vec<&str> = good.split('.').collect();
    let header = |h: &str| format!("{}.{}.{}", b64(h.as_bytes()), parts[1], parts[2]);
    let payload = |p: &str| format!("{}.{}.{}", parts[0], b64(p.as_bytes()), parts[2]);
    let cases: Vec<(String, AuthError)> = vec![
        ("abc".into(), AuthError::BadFormat),
        (format!("{}.{}", parts[0], parts[1]), AuthError::BadFormat),
        (format!("{good}.x"), AuthError::BadFormat),
        (format!("{}..{}", parts[0], parts[2]), AuthError::BadFormat),
        (
            format!("!!.{}.{}", parts[1], parts[2]),
            AuthError::HeaderParse,
        ),
        (header("not json"), AuthError::HeaderParse),
        (header("[1]"), AuthError::HeaderParse),
        (header("{}"), AuthError::HeaderBadAlg),
        (header(r#"{"alg":1}"#), AuthError::HeaderBadAlg),
        (
            header(r#"{"alg":"none"}"#),
            AuthError::HeaderNotImplementedAlg,
        ),
        (
            header(r#"{"alg":"ES512"}"#),
            AuthError::HeaderNotImplementedAlg,
        ),
        (
            header(r#"{"alg":"RS256","kid":5}"#),
            AuthError::HeaderBadKid,
        ),
        (
            format!("{}.%%.{}", parts[0], parts[2]),
            AuthError::PayloadParse,
        ),
        (payload("\"a string\""), AuthError::PayloadParse),
        (payload(r#"{"iss":1}"#), AuthError::PayloadBadClaim("iss")),
        (payload(r#"{"sub":[]}"#), AuthError::PayloadBadClaim("sub")),
        (
            payload(r#"{"exp":"soon"}"#),
            AuthError::PayloadBadClaim("exp"),
        ),
        (payload(r#"{"nbf":-5}"#), AuthError::PayloadBadClaim("nbf")),
        (
            payload(r#"{"iat":true}"#),
            AuthError::PayloadBadClaim("iat"),
        ),
        (payload(r#"{"jti":1}"#), AuthError::PayloadBadClaim("jti")),
        (payload(r#"{"aud":[1]}"#), AuthError::PayloadBadClaim("aud")),
        (payload(r#"{"aud":{}}"#), AuthError::PayloadBadClaim("aud")),
        (
            format!("{}.{}.*", parts[0], parts[1]),
            AuthError::SignatureParse,
        ),
    ];
    for (t, want) in cases {
        assert_eq!(Jwt::parse(&t).map(|_| ()), Err(want), "{t}");
    }
    assert_eq!(
        AuthError::PayloadBadClaim("aud").message(),
        "Jwt payload [aud] field is not a string or string list"
    );
    // Padded base64url is accepted, and fractional dates are truncated.
    let padded_header =
        base64::engine::general_purpose::URL_SAFE.encode(br#"{"alg":"HS256","ab":1}"#);
    assert!(padded_header.ends_with('='));
    let padded = format!("{padded_header}.{}.{}", parts[1], parts[2]);
    assert_eq!(Jwt::parse(&padded).unwrap().alg, Alg::Hs256);
    let fractional = payload(r#"{"exp":12.9,"aud":["a","b"]}"#);
    let jwt = Jwt::parse(&fractional).unwrap();
    assert_eq!(jwt.exp, Some(12));
    assert_eq!(jwt.aud, vec!["a", "b"]);
}

#[test]
fn time_constraints_allow_the_clock_skew() {
    let t = |exp: u64, nbf: u64| token("HS256", json!({"exp": exp, "nbf": nbf}));
    assert_eq!(verify(&t(NOW - 60, 0)), Ok(()), "expired within the skew");
    assert_eq!(verify(&t(NOW - 61, 0)), Err(AuthError::Expired));
    assert_eq!(
        verify(&t(NOW + 100, NOW + 60)),
        Ok(()),
        "nbf within the skew"
    );
    assert_eq!(verify(&t(NOW + 100, NOW + 61)), Err(AuthError::NotYetValid));
    assert_eq!(
        verify(&token("HS256", json!({}))),
        Ok(()),
        "no exp: never expires"
    );
}

#[test]
fn key_sets_reject_broken_keys_and_skip_unsupported_ones() {
    assert!(matches!(Jwks::parse(b"nope"), Err(JwksError::NotJson(_))));
    assert_eq!(Jwks::parse(b"{}").err(), Some(JwksError::NoKeysArray));
    assert_eq!(
        Jwks::parse(br#"{"keys":[]}"#).err(),
        Some(JwksError::NoUsableKeys(vec![]))
    );
    let broken = |key: Value| {
        Jwks::from_value(&json!({"keys": [jwk("hs"), key]}))
            .err()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        broken(json!({"kty": "RSA", "e": "AQAB"})),
        "JWKS key 1: [n] is missing for the RSA key"
    );
    assert!(broken(json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})).contains("RSA key rejected"));
    let mut off_curve = jwk("ec256");
    off_curve["y"] = off_curve["x"].clone();
    assert_eq!(
        broken(off_curve),
        "JWKS key 1: [x] and [y] are not a point of P-256"
    );
    assert_eq!(
        broken(json!({"kty": "oct", "k": "!!"})),
        "JWKS key 1: [k] of the oct key is not base64url"
    );
    assert_eq!(broken(json!({"kid": "x"})), "JWKS key 1: [kty] is missing");
    assert_eq!(
        broken(json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"})),
        "JWKS key 1: Ed25519 [x] is not 32 bytes"
    );
    // Unsupported keys are skipped with a reason.
    let (set, skipped) = Jwks::from_value(&json!({"keys": [
        {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"},
        {"kty": "RSA", "use": "enc", "n": "AA", "e": "AQAB"},
        {"kty": "RSA", "alg": "RSA-OAEP", "n": "AA", "e": "AQAB"},
        {"kty": "OKP", "crv": "X25519", "x": "AA"},
        {"kty": "foo"},
        jwk("ed"),
    ]}))
    .unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(skipped.len(), 5, "{skipped:?}");
    assert!(skipped[0].contains("P-521"), "{skipped:?}");
    let only_skipped = Jwks::from_value(&json!({"keys": [{"kty": "foo"}]}))
        .err()
        .unwrap();
    assert_eq!(
        only_skipped.to_string(),
        "JWKS has no usable key (key 0: [kty] \"foo\" is not supported)"
    );
}

// ---- Configuration ----

fn provider(extra: Value) -> Value {
    let mut p = json!({"name": "example", "issuer": ISS, "audiences": ["api.example.com"], "jwks": all_keys().to_string()});
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

fn config_error(c: Value) -> String {
    match Config::parse(c.to_string().as_bytes()) {
        Ok(_) => panic!("accepted: {c}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn configuration_defaults() {
    let c = json!({"providers": [{"name": "p", "jwks": all_keys()}], "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "p"}}]});
    let (config, warnings) = Config::parse(c.to_string().as_bytes()).unwrap();
    assert!(warnings.is_empty());
    assert_eq!(config.jwt_cache_size, 100);
    let p = &config.providers[0];
    assert_eq!(p.clock_skew_seconds, 60);
    assert!(!p.forward);
    assert_eq!(p.issuer, None);
    let locations: Vec<&Location> = config.locations.iter().map(|l| &l.location).collect();
    assert_eq!(
        locations,
        [
            &Location::Header {
                name: "authorization".into(),
                prefix: "Bearer ".into()
            },
            &Location::Param("access_token".into())
        ]
    );
    assert_eq!(config.rules[0].matcher, PathMatch::Prefix("/".into()));
    let r = config.rules[0].requires.as_ref().unwrap();
    assert_eq!((r.providers.clone(), r.mode), (vec![0], Mode::Required));
    // Remote keys: durations as text or seconds, host defaults to the cluster.
    let c = json!({"providers": [{"name": "p", "remote_jwks": {"cluster": "idp", "path": "/jwks", "cache_duration": "10m", "timeout": 2}}]});
    let (config, _) = Config::parse(c.to_string().as_bytes()).unwrap();
    let engine = Engine::new(config);
    let r = engine.remote_jwks(0);
    assert_eq!(r.authority, "idp");
    assert_eq!(r.cache_duration.as_secs(), 600);
    assert_eq!(r.timeout.as_secs(), 2);
}

#[test]
fn configuration_errors_say_what_is_wrong() {
    let rules = |r: Value| json!({"providers": [provider(json!({}))], "rules": [r]});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"providers": []}), "`providers` is empty"),
        (json!({"provider": []}), "unknown field `provider`"),
        (
            json!({"providers": [provider(json!({"issuer_x": 1}))]}),
            "unknown field `issuer_x`",
        ),
        (
            json!({"providers": [provider(json!({})), provider(json!({}))]}),
            "provider `example`: the name is used twice",
        ),
        (
            json!({"providers": [provider(json!({"jwks": "{\"keys\": 3}"}))]}),
            "provider `example`: JWKS has no [keys] array",
        ),
        (
            json!({"providers": [provider(json!({"jwks": "{not json"}))]}),
            "provider `example`: JWKS is not valid JSON",
        ),
        (
            json!({"providers": [provider(json!({"jwks": 5}))]}),
            "`jwks` must be a JSON object or a string",
        ),
        (
            json!({"providers": [provider(json!({"remote_jwks": {"cluster": "c", "path": "/"}}))]}),
            "`jwks` and `remote_jwks` exclude each other",
        ),
        (
            json!({"providers": [{"name": "x"}]}),
            "provider `x`: one of `jwks` and `remote_jwks` is required",
        ),
        (
            json!({"providers": [{"name": "x", "remote_jwks": {"cluster": "c", "path": "/", "cache_duration": "soon"}}]}),
            "`remote_jwks.cache_duration` \"soon\"",
        ),
        (
            json!({"providers": [{"name": "x", "remote_jwks": {"cluster": "c", "path": "jwks"}}]}),
            "`remote_jwks.path` must start with `/`",
        ),
        (
            json!({"providers": [provider(json!({"from_headers": [{"name": "bad header"}]}))]}),
            "\"bad header\" is not a valid header name",
        ),
        (
            json!({"providers": [provider(json!({"claim_to_headers": [{"header_name": "x-a", "claim_name": "a..b"}]}))]}),
            "claim name \"a..b\"",
        ),
        (
            rules(json!({"match": {"prefix": "/", "path": "/x"}})),
            "rules[0]: `match` needs exactly one of `prefix` and `path`",
        ),
        (
            rules(json!({"match": {"prefix": "x"}})),
            "rules[0]: a match path must start with `/`",
        ),
        (
            rules(json!({"match": {"prefix": "/"}, "requires": {"provider_name": "other"}})),
            "rules[0]: unknown provider `other`",
        ),
        (
            rules(json!({"match": {"prefix": "/"}, "requires": {}})),
            "rules[0]: `requires` needs",
        ),
        (
            rules(json!({"match": {"prefix": "/"}, "requires": {"any": []}})),
            "`requires.any` is empty",
        ),
        (
            rules(
                json!({"match": {"prefix": "/"}, "requires": {"provider_name": "example", "allow_missing": true, "allow_missing_or_failed": true}}),
            ),
            "exclude each other",
        ),
    ];
    for (c, want) in cases {
        let e = config_error(c.clone());
        assert!(e.contains(want), "{c}: got {e:?}, want {want:?}");
    }
    let error = |bytes: &[u8]| Config::parse(bytes).err().unwrap().to_string();
    assert!(error(b" ").contains("the configuration is empty"));
    assert!(error(b"{").starts_with("invalid configuration:"));
}

// ---- Decisions ----

fn engine(providers: Vec<Value>, rules: Value) -> Engine {
    let c = json!({"providers": providers, "rules": rules});
    Engine::new(Config::parse(c.to_string().as_bytes()).unwrap().0)
}

/// The usual setup: provider `example` with payload and claim headers; `/public` open,
/// everything else requires `example`.
fn standard() -> Engine {
    engine(
        vec![provider(json!({
            "forward_payload_header": "x-jwt-payload",
            "claim_to_headers": [{"header_name": "x-jwt-sub", "claim_name": "sub"}, {"header_name": "x-jwt-tenant", "claim_name": "org.tenant"}],
        }))],
        json!([{"match": {"prefix": "/public"}}, {"match": {"prefix": "/"}, "requires": {"provider_name": "example"}}]),
    )
}

fn request(path: &str, extra: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    let mut h = vec![
        (":method".to_string(), b"GET".to_vec()),
        (":scheme".to_string(), b"http".to_vec()),
        (":authority".to_string(), b"api.example.com".to_vec()),
        (":path".to_string(), path.as_bytes().to_vec()),
    ];
    for (k, v) in extra {
        h.push((k.to_string(), v.as_bytes().to_vec()));
    }
    h
}

fn check(e: &mut Engine, path: &str, extra: &[(&str, &str)]) -> Decision {
    e.check(&RequestView::new(&request(path, extra)), NOW)
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn denied(d: Decision) -> Denial {
    match d {
        Decision::Deny(d) => d,
        other => panic!("not denied: {other:?}"),
    }
}

fn allowed(d: Decision) -> Edits {
    match d {
        Decision::Allow(e) => e,
        other => panic!("not allowed: {other:?}"),
    }
}

#[test]
fn a_valid_token_passes_with_its_headers_and_without_the_token() {
    let mut e = standard();
    let mut c = claims();
    c["org"] = json!({"tenant": 42});
    let t = token("ES256", c);
    let edits = allowed(check(
        &mut e,
        "/api",
        &[("authorization", &bearer(&t)), ("x-jwt-sub", "forged")],
    ));
    assert_eq!(edits.remove, vec!["x-jwt-sub", "authorization"]);
    assert_eq!(
        edits.add,
        vec![
            (
                "x-jwt-payload".to_string(),
                t.split('.').nth(1).unwrap().to_string()
            ),
            ("x-jwt-sub".to_string(), "alice".to_string()),
            ("x-jwt-tenant".to_string(), "42".to_string()),
        ]
    );
    assert_eq!(edits.path, None);
    // The prefix is found without regard to case; the token ends at the first non-token char.
    let edits = allowed(check(
        &mut e,
        "/api",
        &[("authorization", &format!("bearer  {t} "))],
    ));
    assert!(
        edits
            .add
            .iter()
            .any(|(k, v)| k == "x-jwt-sub" && v == "alice")
    );
}

#[test]
fn rejections_have_envoys_status_body_and_challenge() {
    let mut e = standard();
    let d = denied(check(&mut e, "/api?q=1", &[]));
    assert_eq!((d.status(), d.body()), (401, "Jwt is missing"));
    assert_eq!(
        d.www_authenticate(),
        "Bearer realm=\"http://api.example.com/api?q=1\""
    );
    let d = denied(check(
        &mut e,
        "/api",
        &[("authorization", "Basic dXNlcg==")],
    ));
    assert_eq!(d.error, AuthError::Missing, "another scheme is not a token");

    let invalid = |e: &mut Engine, claims: Value| {
        denied(check(
            e,
            "/api",
            &[("authorization", &bearer(&token("RS256", claims)))],
        ))
    };
    let mut c = claims();
    c["exp"] = json!(NOW - 3600);
    let d = invalid(&mut e, c);
    assert_eq!((d.status(), d.body()), (401, "Jwt is expired"));
    assert_eq!(
        d.www_authenticate(),
        "Bearer realm=\"http://api.example.com/api\", error=\"invalid_token\""
    );
    let mut c = claims();
    c["nbf"] = json!(NOW + 3600);
    assert_eq!(invalid(&mut e, c).error, AuthError::NotYetValid);
    let mut c = claims();
    c["aud"] = json!(["other.example.com"]);
    let d = invalid(&mut e, c);
    assert_eq!(
        (d.status(), d.body()),
        (403, "Audiences in Jwt are not allowed")
    );
    let mut c = claims();
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(invalid(&mut e, c).error, AuthError::AudienceNotAllowed);
    let mut c = claims();
    c["iss"] = json!("https://evil.example.com");
    assert_eq!(invalid(&mut e, c).body(), "Jwt issuer is not configured");
    let mut forged = claims();
    forged["sub"] = json!("root");
    let t = with_payload(&rs256(), forged);
    let d = denied(check(&mut e, "/api", &[("authorization", &bearer(&t))]));
    assert_eq!(d.body(), "Jwt verification fails");
    let d = denied(check(&mut e, "/api", &[("authorization", "Bearer a.b")]));
    assert_eq!(
        d.body(),
        "Jwt is not in the form of Header.Payload.Signature"
    );
    // Audiences compare without scheme and trailing slash, as in Envoy.
    let mut c = claims();
    c["aud"] = json!("https://api.example.com/");
    allowed(check(
        &mut e,
        "/api",
        &[("authorization", &bearer(&token("RS256", c)))],
    ));
}

#[test]
fn rules_first_match_wins_and_unchecked_requests_keep_their_token() {
    let mut e = standard();
    let bad = "Bearer not.a.token";
    // /public has no requirement: even a bad token passes, untouched; forged claim headers go.
    let edits = allowed(check(
        &mut e,
        "/public/x",
        &[("authorization", bad), ("x-jwt-payload", "forged")],
    ));
    assert_eq!(
        edits,
        Edits {
            remove: vec!["x-jwt-payload".into()],
            ..Edits::default()
        }
    );
    // No rule matches: not checked.
    let mut e = engine(
        vec![provider(json!({}))],
        json!([{"match": {"path": "/exact"}, "requires": {"provider_name": "example"}}]),
    );
    allowed(check(&mut e, "/exact/more", &[]));
    allowed(check(&mut e, "/other", &[("authorization", bad)]));
    assert_eq!(
        denied(check(&mut e, "/exact?x=1", &[])).error,
        AuthError::Missing
    );
}

#[test]
fn allow_missing_and_allow_missing_or_failed() {
    let rules = |requires: Value| json!([{"match": {"prefix": "/"}, "requires": requires}]);
    let p = || {
        vec![provider(
            json!({"claim_to_headers": [{"header_name": "x-sub", "claim_name": "sub"}]}),
        )]
    };
    let expired = {
        let mut c = claims();
        c["exp"] = json!(NOW - 3600);
        bearer(&token("HS256", c))
    };
    let good = bearer(&token("HS256", claims()));

    let mut e = engine(
        p(),
        rules(json!({"provider_name": "example", "allow_missing": true})),
    );
    assert_eq!(allowed(check(&mut e, "/", &[])), Edits::default());
    assert_eq!(
        denied(check(&mut e, "/", &[("authorization", &expired)])).error,
        AuthError::Expired
    );
    assert_eq!(
        allowed(check(&mut e, "/", &[("authorization", &good)])).add,
        vec![("x-sub".to_string(), "alice".to_string())]
    );

    // Without a provider name: any provider (Istio's RequestAuthentication).
    let mut e = engine(p(), rules(json!({"allow_missing": true})));
    allowed(check(&mut e, "/", &[]));
    assert_eq!(
        denied(check(&mut e, "/", &[("authorization", &expired)])).error,
        AuthError::Expired
    );

    let mut e = engine(p(), rules(json!({"allow_missing_or_failed": true})));
    allowed(check(&mut e, "/", &[]));
    assert_eq!(
        allowed(check(&mut e, "/", &[("authorization", &expired)])),
        Edits::default(),
        "a failed token is ignored: no headers, token kept"
    );
    let edits = allowed(check(&mut e, "/", &[("authorization", &good)]));
    assert_eq!(edits.remove, vec!["authorization"]);
    assert_eq!(edits.add.len(), 1);
}

#[test]
fn any_of_several_providers_picks_by_issuer() {
    let other_iss = "https://other.example.com";
    let mut e = engine(
        vec![
            provider(json!({"claim_to_headers": [{"header_name": "x-from", "claim_name": "iss"}]})),
            json!({"name": "other", "issuer": other_iss, "jwks": jwks_of(&["ed"]), "claim_to_headers": [{"header_name": "x-from", "claim_name": "iss"}]}),
        ],
        json!([{"match": {"prefix": "/"}, "requires": {"any": ["example", "other"]}}]),
    );
    let from = |edits: Edits| {
        edits
            .add
            .into_iter()
            .find(|(k, _)| k == "x-from")
            .unwrap()
            .1
    };
    let a = bearer(&token("RS256", claims()));
    assert_eq!(
        from(allowed(check(&mut e, "/", &[("authorization", &a)]))),
        ISS
    );
    let mut c = claims();
    c["iss"] = json!(other_iss);
    let b = bearer(&token("EdDSA", c.clone()));
    assert_eq!(
        from(allowed(check(&mut e, "/", &[("authorization", &b)]))),
        other_iss
    );
    // A token of `other`'s issuer signed with a key that only `example` has fails:
    // `other`'s key (no kid, no alg) is tried and does not verify it.
    let wrong = bearer(&token("RS256", c));
    assert_eq!(
        denied(check(&mut e, "/", &[("authorization", &wrong)])).error,
        AuthError::VerificationFail
    );
    let mut c = claims();
    c["iss"] = json!("https://nobody.example.com");
    let t = bearer(&token("RS256", c));
    assert_eq!(
        denied(check(&mut e, "/", &[("authorization", &t)])).error,
        AuthError::UnknownIssuer
    );
}

#[test]
fn tokens_in_params_cookies_and_custom_headers() {
    let mut e = engine(
        vec![provider(json!({
            "from_headers": [{"name": "X-Token"}],
            "from_params": ["jwt"],
            "from_cookies": ["session"],
        }))],
        json!([{"match": {"prefix": "/"}, "requires": {"provider_name": "example"}}]),
    );
    let t = rs256();
    let edits = allowed(check(&mut e, &format!("/a?x=1&jwt={t}&y=2"), &[]));
    assert_eq!(
        edits.path.as_deref(),
        Some("/a?x=1&y=2"),
        "the token leaves the query"
    );
    let edits = allowed(check(&mut e, &format!("/a?jwt={t}"), &[]));
    assert_eq!(edits.path.as_deref(), Some("/a"));
    let edits = allowed(check(
        &mut e,
        "/a",
        &[("cookie", &format!("a=b; session={t}"))],
    ));
    assert_eq!(
        edits,
        Edits::default(),
        "a cookie is left alone, as in Envoy"
    );
    let edits = allowed(check(&mut e, "/a", &[("x-token", &t)]));
    assert_eq!(edits.remove, vec!["x-token"]);
    // The default Authorization location is not read when locations are configured.
    assert_eq!(
        denied(check(&mut e, "/a", &[("authorization", &bearer(&t))])).error,
        AuthError::Missing
    );
    // Every token must verify: a good one in the header and a bad one in the query fail.
    let d = denied(check(&mut e, "/a?jwt=bad.to.ken", &[("x-token", &t)]));
    assert_eq!(d.error, AuthError::HeaderParse);
    // Two values of the header: both are tokens.
    let d = denied(check(
        &mut e,
        "/a",
        &[("x-token", &t), ("x-token", "x.y.z")],
    ));
    assert_eq!(d.error, AuthError::HeaderParse);
    // The default locations include access_token.
    let mut e = standard();
    allowed(check(&mut e, &format!("/a?access_token={t}"), &[]));
}

#[test]
fn forward_keeps_the_token_and_claims_of_other_types_are_skipped() {
    let mut e = engine(
        vec![provider(json!({
            "forward": true,
            "claim_to_headers": [
                {"header_name": "x-admin", "claim_name": "admin"},
                {"header_name": "x-score", "claim_name": "score"},
                {"header_name": "x-roles", "claim_name": "roles"},
                {"header_name": "x-evil", "claim_name": "evil"},
                {"header_name": "x-absent", "claim_name": "absent"},
            ],
        }))],
        json!([{"match": {"prefix": "/"}, "requires": {"provider_name": "example"}}]),
    );
    let mut c = claims();
    c["admin"] = json!(true);
    c["score"] = json!(1.5);
    c["roles"] = json!(["a", "b"]);
    c["evil"] = json!("a\r\nx-injected: 1");
    let t = token("PS256", c);
    let edits = allowed(check(&mut e, "/", &[("authorization", &bearer(&t))]));
    assert!(edits.remove.is_empty(), "forward: the token stays");
    assert_eq!(
        edits.add,
        vec![
            ("x-admin".to_string(), "true".to_string()),
            ("x-score".to_string(), "1.5".to_string())
        ]
    );
}

#[test]
fn a_repeated_token_is_verified_once_until_it_expires() {
    let mut e = standard();
    let mut c = claims();
    c["exp"] = json!(NOW + 100);
    let t = bearer(&token("RS256", c));
    let first = allowed(check(&mut e, "/", &[("authorization", &t)]));
    assert_eq!(e.signature_checks(), 1);
    for _ in 0..5 {
        assert_eq!(allowed(check(&mut e, "/", &[("authorization", &t)])), first);
    }
    assert_eq!(e.signature_checks(), 1, "cache hits check no signature");
    // Past exp + skew the cache entry is dropped and the token rejected.
    let later = request("/", &[("authorization", &t)]);
    let d = denied(e.check(&RequestView::new(&later), NOW + 161));
    assert_eq!(d.error, AuthError::Expired);
    // A different (forged) token is not a cache hit.
    let mut forged = claims();
    forged["sub"] = json!("root");
    let f = bearer(&with_payload(t.trim_start_matches("Bearer "), forged));
    assert_eq!(
        denied(check(&mut e, "/", &[("authorization", &f)])).error,
        AuthError::VerificationFail
    );

    // jwt_cache_size 0: every request checks the signature.
    let c = json!({"providers": [provider(json!({}))], "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "example"}}], "jwt_cache_size": 0});
    let mut e = Engine::new(Config::parse(c.to_string().as_bytes()).unwrap().0);
    let t = bearer(&rs256());
    for _ in 0..3 {
        allowed(check(&mut e, "/", &[("authorization", &t)]));
    }
    assert_eq!(e.signature_checks(), 3);
}

fn remote_engine(rules_requires: Value) -> Engine {
    engine(
        vec![json!({
            "name": "idp", "issuer": ISS,
            "remote_jwks": {"cluster": "idp", "path": "/jwks", "cache_duration": "60s"},
            "claim_to_headers": [{"header_name": "x-sub", "claim_name": "sub"}],
        })],
        json!([{"match": {"prefix": "/"}, "requires": rules_requires}]),
    )
}

#[test]
fn requests_wait_for_remote_keys_then_go_on_or_fail() {
    let mut e = remote_engine(json!({"provider_name": "idp"}));
    let now_ms = NOW * 1000;
    let good = bearer(&token("ES384", claims()));
    // Before any fetch: the request waits, with its headers already in place.
    let (edits, pending) = match check(&mut e, "/a", &[("authorization", &good)]) {
        Decision::Wait(edits, pending) => (edits, pending),
        other => panic!("{other:?}"),
    };
    assert_eq!(edits.remove, vec!["authorization"]);
    assert_eq!(edits.add, vec![("x-sub".to_string(), "alice".to_string())]);
    e.wait(7, pending);
    // A bad signature waits too (the keys decide), a malformed token does not.
    let forged = bearer(&with_payload(
        good.trim_start_matches("Bearer "),
        json!({"iss": ISS, "sub": "root"}),
    ));
    let Decision::Wait(_, pending) = check(&mut e, "/a", &[("authorization", &forged)]) else {
        panic!("the forged token should wait for keys")
    };
    e.wait(8, pending);
    assert_eq!(
        denied(check(&mut e, "/a", &[("authorization", "Bearer x")])).error,
        AuthError::BadFormat
    );
    assert!(e.is_waiting(7) && e.is_waiting(8));
    assert!(e.take_resolved(NOW).is_empty(), "no keys yet");
    // The fetch is due once; not again while it is in flight.
    assert_eq!(e.due_fetches(now_ms), vec![0]);
    assert!(e.due_fetches(now_ms).is_empty());
    let body = jwks_of(&["ec384"]).to_string();
    assert_eq!(e.fetch_done(0, Ok(body.as_bytes()), now_ms), Ok(vec![]));
    let mut resolved = e.take_resolved(NOW);
    resolved.sort_by_key(|(id, _)| *id);
    assert_eq!(resolved[0], (7, Ok(())));
    assert_eq!(resolved[1].0, 8);
    assert_eq!(
        resolved[1].1.as_ref().unwrap_err().error,
        AuthError::VerificationFail
    );
    assert!(!e.is_waiting(7));
    // Now the keys are there: no waiting, and the verified token is cached.
    let checks = e.signature_checks();
    allowed(check(&mut e, "/a", &[("authorization", &good)]));
    assert_eq!(
        e.signature_checks(),
        checks,
        "verified while waiting, then cached"
    );
    // Refreshed after cache_duration; a failed refresh keeps the old keys.
    assert!(e.due_fetches(now_ms + 59_000).is_empty());
    assert_eq!(e.due_fetches(now_ms + 60_000), vec![0]);
    assert!(
        e.fetch_done(
            0,
            Err("the JWKS server answered 503".into()),
            now_ms + 60_000
        )
        .is_err()
    );
    allowed(check(&mut e, "/a", &[("authorization", &good)]));
}

#[test]
fn a_failed_first_fetch_rejects_waiting_and_new_requests_until_a_retry() {
    let mut e = remote_engine(json!({"provider_name": "idp"}));
    let now_ms = NOW * 1000;
    let good = bearer(&token("EdDSA", claims()));
    let Decision::Wait(_, pending) = check(&mut e, "/", &[("authorization", &good)]) else {
        panic!("should wait")
    };
    e.wait(1, pending.clone());
    e.wait(2, pending);
    e.cancel(2);
    assert_eq!(e.due_fetches(now_ms), vec![0]);
    let err = e.fetch_done(0, Ok(b"<html>"), now_ms).unwrap_err();
    assert!(err.contains("not valid JSON"), "{err}");
    let resolved = e.take_resolved(NOW);
    assert_eq!(resolved.len(), 1, "the cancelled stream is forgotten");
    let d = resolved[0].1.clone().unwrap_err();
    assert_eq!(
        (resolved[0].0, d.status(), d.body()),
        (1, 401, "Jwks remote fetch is failed")
    );
    // Until the retry, new requests fail at once.
    assert_eq!(
        denied(check(&mut e, "/", &[("authorization", &good)])).error,
        AuthError::JwksFetchFail
    );
    assert!(e.due_fetches(now_ms + 999).is_empty());
    assert_eq!(e.due_fetches(now_ms + 1000), vec![0], "retried after 1 s");
    // While the retry is in flight, requests wait again.
    assert!(matches!(
        check(&mut e, "/", &[("authorization", &good)]),
        Decision::Wait(..)
    ));
    let body = jwks_of(&["ed"]).to_string();
    e.fetch_done(0, Ok(body.as_bytes()), now_ms + 1000).unwrap();
    allowed(check(&mut e, "/", &[("authorization", &good)]));

    // allow_missing_or_failed never waits: no keys yet counts as failed.
    let mut e = remote_engine(json!({"allow_missing_or_failed": true}));
    assert_eq!(
        allowed(check(&mut e, "/", &[("authorization", &good)])),
        Edits::default()
    );
}
