//! The built-in `jwt-authn` filter through the gateway: tokens signed here with an Ed25519 key
//! (rcgen generates it, rustls signs), keys inline or served by a real upstream cluster.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::support::*;

const ISS: &str = "https://issuer.example.com";

/// Base64url without padding (the JWT encoding).
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An Ed25519 key that signs tokens (EdDSA).
struct Issuer {
    key: Arc<dyn rustls::sign::SigningKey>,
    public: Vec<u8>,
    kid: &'static str,
}

impl Issuer {
    fn new(kid: &'static str) -> Issuer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(pair.serialize_der().into());
        let key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(der)
            .unwrap();
        Issuer {
            key,
            public: pair.public_key_raw().to_vec(),
            kid,
        }
    }

    fn jwks(&self) -> Value {
        json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "x": b64url(&self.public)}]})
    }

    fn token(&self, claims: Value) -> String {
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let signed = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let signer = self
            .key
            .choose_scheme(&[rustls::SignatureScheme::ED25519])
            .unwrap();
        let signature = signer.sign(signed.as_bytes()).unwrap();
        format!("{signed}.{}", b64url(&signature))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims valid now for ISS and `api.example.com`.
fn claims() -> Value {
    let now = now();
    json!({"iss": ISS, "sub": "alice", "aud": ["api.example.com"], "exp": now + 3600, "iat": now})
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A gateway whose route `r` runs the plugin `jwt` (config `jwt`) in front of `up`;
/// `clusters` adds cluster lines.
fn config(up: SocketAddr, jwt: &Value, clusters: &str) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:0 }}\nplugins:\n  - {{ name: jwt, module: \"builtin:jwt-authn\", config: {jwt} }}\nroutes:\n  - {{ name: r, filters: [jwt], backends: [ {{ cluster: up }} ] }}\nclusters:\n  - {{ name: up, endpoints: [ {{ address: \"{up}\" }} ] }}\n{clusters}"
    )
}

/// Provider `example` (keys `jwks`, or `remote`), `/public` open, the rest requires it.
fn jwt_config(keys: Value) -> Value {
    let mut provider = json!({
        "name": "example",
        "issuer": ISS,
        "audiences": ["api.example.com"],
        "forward_payload_header": "x-jwt-payload",
        "claim_to_headers": [{"header_name": "x-jwt-sub", "claim_name": "sub"}],
    });
    for (k, v) in keys.as_object().unwrap() {
        provider[k] = v.clone();
    }
    json!({
        "providers": [provider],
        "rules": [
            {"match": {"prefix": "/public"}},
            {"match": {"prefix": "/"}, "requires": {"provider_name": "example"}},
        ],
    })
}

/// GET `/api` with `authorization: Bearer TOKEN`.
async fn api(addr: SocketAddr, token: &str) -> Reply {
    get(
        addr,
        "svc.example",
        "/api",
        &[("authorization", &bearer(token))],
    )
    .await
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut b = Request::post(format!("http://{addr}{path}")).header("host", "svc.example");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(
        &client(),
        b.body(Full::new(Bytes::from(body.to_string()))).unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_verified_before_the_upstream() {
    let up = upstream("up", Behavior::default()).await;
    let issuer = Issuer::new("k1");
    let jwt = jwt_config(json!({"jwks": issuer.jwks().to_string()}));
    let gw = gateway(&config(up.addr, &jwt, "")).await;
    let addr = gw.addr("main").await;

    // A valid token: the upstream gets the claim and payload headers, not the token; a
    // forged claim header from the client is replaced.
    let token = issuer.token(claims());
    let auth = bearer(&token);
    let r = get(
        addr,
        "svc.example",
        "/api",
        &[("authorization", &auth), ("x-jwt-sub", "forged")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.seen_header("x-jwt-sub").as_deref(), Some("alice"));
    assert_eq!(
        r.seen_header("x-jwt-payload").as_deref(),
        token.split('.').nth(1)
    );
    assert_eq!(r.seen_header("authorization"), None);
    // Again (from the verified-token cache), and with a body.
    let r = post(addr, "/api", &[("authorization", &auth)], "hello").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["body"], "hello");
    assert_eq!(r.seen_header("x-jwt-sub").as_deref(), Some("alice"));
    assert_eq!(up.hits(), 2);

    // No token.
    let r = get(addr, "svc.example", "/api?x=1", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (401, "Jwt is missing"));
    assert_eq!(
        r.headers["www-authenticate"],
        "Bearer realm=\"http://svc.example/api?x=1\""
    );
    // Expired.
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    let r = api(addr, &issuer.token(expired)).await;
    assert_eq!((r.status, r.body.as_str()), (401, "Jwt is expired"));
    assert_eq!(
        r.headers["www-authenticate"],
        "Bearer realm=\"http://svc.example/api\", error=\"invalid_token\""
    );
    // Another audience: 403, as Envoy answers JwtAudienceNotAllowed.
    let mut other_aud = claims();
    other_aud["aud"] = json!("other.example.com");
    let r = api(addr, &issuer.token(other_aud)).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (403, "Audiences in Jwt are not allowed")
    );
    assert!(
        r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .ends_with("error=\"invalid_token\"")
    );
    // Signed by a key the gateway does not know.
    let stranger = Issuer::new("k1");
    let r = api(addr, &stranger.token(claims())).await;
    assert_eq!((r.status, r.body.as_str()), (401, "Jwt verification fails"));
    // Another issuer.
    let mut other_iss = claims();
    other_iss["iss"] = json!("https://evil.example.com");
    let r = api(addr, &issuer.token(other_iss)).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (401, "Jwt issuer is not configured")
    );
    // Not a token.
    let r = api(addr, "abc.def").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body, "Jwt is not in the form of Header.Payload.Signature");
    assert_eq!(up.hits(), 2, "no rejected request reached the upstream");

    // The public path needs no token, and a token there is not checked or removed.
    let r = get(addr, "svc.example", "/public/page", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get(
        addr,
        "svc.example",
        "/public/page",
        &[("authorization", "Bearer not-checked")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.seen_header("authorization").as_deref(),
        Some("Bearer not-checked")
    );
}

/// A JWKS server: answers every request with `status` and `body` once `gate` is open.
/// Returns its address and how many requests it received.
async fn jwks_server(
    status: u16,
    body: String,
    gate: watch::Receiver<bool>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (body, counter, gate) = (body.clone(), counter.clone(), gate.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (body, counter, mut gate) = (body.clone(), counter.clone(), gate.clone());
                    async move {
                        assert_eq!(req.uri().path(), "/.well-known/jwks.json");
                        assert_eq!(req.headers()["host"], "idp.example.com");
                        counter.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// Keys of `example` from cluster `idp` at `addr`: (provider fields, cluster line). The
/// fetch timeout is long so that a loaded machine does not turn a slow answer into a failure.
fn remote(idp: SocketAddr) -> (Value, String) {
    (
        json!({"remote_jwks": {"cluster": "idp", "path": "/.well-known/jwks.json", "host": "idp.example.com", "cache_duration": "10m", "timeout": "60s"}}),
        format!("  - {{ name: idp, endpoints: [ {{ address: \"{idp}\" }} ] }}\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_keys_come_from_a_cluster_and_early_requests_wait_for_them() {
    let up = upstream("up", Behavior::default()).await;
    let issuer = Issuer::new("remote-key");
    // The key server holds its answer until the requests below are in.
    let (open, gate) = watch::channel(false);
    let (idp, fetches) = jwks_server(200, issuer.jwks().to_string(), gate).await;
    let (keys, clusters) = remote(idp);
    let gw = gateway(&config(up.addr, &jwt_config(keys), &clusters)).await;
    let addr = gw.addr("main").await;
    let auth = bearer(&issuer.token(claims()));
    let waiting = {
        let auth = auth.clone();
        tokio::spawn(async move {
            let headers = [("authorization", auth.as_str())];
            tokio::join!(
                get(addr, "svc.example", "/api", &headers),
                post(addr, "/upload", &headers, "a body held while waiting"),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        up.hits(),
        0,
        "no request goes upstream before the keys are there"
    );
    open.send(true).unwrap();
    let (a, b) = waiting.await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.seen_header("x-jwt-sub").as_deref(), Some("alice"));
    assert_eq!(a.seen_header("authorization"), None);
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(b.json()["body"], "a body held while waiting");
    assert!(fetches.load(Ordering::SeqCst) >= 1);
    // A key the server does not publish.
    let stranger = Issuer::new("remote-key");
    let r = api(addr, &stranger.token(claims())).await;
    assert_eq!((r.status, r.body.as_str()), (401, "Jwt verification fails"));
    let fetched = fetches.load(Ordering::SeqCst);
    for _ in 0..5 {
        let r = get(addr, "svc.example", "/api", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        fetched,
        "keys are cached for cache_duration"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_key_server_means_401() {
    let up = upstream("up", Behavior::default()).await;
    let issuer = Issuer::new("k");
    let (idp, fetches) = jwks_server(503, "unavailable".into(), watch::channel(true).1).await;
    let (keys, clusters) = remote(idp);
    let gw = gateway(&config(up.addr, &jwt_config(keys), &clusters)).await;
    let addr = gw.addr("main").await;
    let r = api(addr, &issuer.token(claims())).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (401, "Jwks remote fetch is failed")
    );
    assert!(fetches.load(Ordering::SeqCst) >= 1);
    // The public path is not affected; the upstream saw only that request.
    assert_eq!(get(addr, "svc.example", "/public", &[]).await.status, 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_is_refused_with_a_message() {
    let up = upstream("up", Behavior::default()).await;
    let issuer = Issuer::new("k");
    let good = jwt_config(json!({"jwks": issuer.jwks()}));
    let refused = |err: String, what: &str| {
        assert!(
            err.contains("plugins[jwt]") && err.contains("plugin configuration rejected"),
            "{what}: {err}"
        );
    };
    // The gateway does not start with a configuration the filter rejects.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.yaml");
    let mut unknown_field = good.clone();
    unknown_field["providers"][0]["audience"] = json!("typo");
    std::fs::write(&path, config(up.addr, &unknown_field, "")).unwrap();
    match weir::Gateway::start(&path).await {
        Ok(_) => panic!("started with an unknown field"),
        Err(e) => refused(e.to_string(), "unknown field"),
    }
    // A good one starts (`builtin:jwt-authn` resolves); bad ones are refused on reload and
    // the good one keeps serving.
    let gw = gateway(&config(up.addr, &good, "")).await;
    let addr = gw.addr("main").await;
    // (Each check compiles the module: the other rejections are covered by the crate's tests.)
    let bad_jwks = jwt_config(json!({"jwks": {"keys": [{"kty": "RSA", "e": "AQAB"}]}}));
    let err = gw
        .reload(&config(up.addr, &bad_jwks, ""))
        .await
        .unwrap_err();
    refused(err.to_string(), "bad JWKS");
    assert_eq!(get(addr, "svc.example", "/api", &[]).await.status, 401);
    let auth = bearer(&issuer.token(claims()));
    let r = get(addr, "svc.example", "/api", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
}
