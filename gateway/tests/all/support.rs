//! Test support: real upstream servers, a gateway started from a YAML config on port 0, and a
//! small HTTP client. Everything listens on 127.0.0.1.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// What a test upstream does with requests.
#[derive(Clone, Default)]
pub struct Behavior {
    /// Answer this status to the first `fail_first` requests.
    pub fail_first: usize,
    /// The status for failures (default 503).
    pub fail_status: Option<u16>,
    /// Sleep this long before answering the first `slow_first` requests.
    pub slow_first: usize,
    /// How long.
    pub delay: Duration,
    /// Always answer this status.
    pub status: Option<u16>,
}

/// A running test upstream. Its responses carry `x-upstream: NAME` and a JSON body echoing the
/// request (method, path, headers).
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Upstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Start an upstream answering HTTP/1.1 and h2c.
pub async fn upstream(name: &str, behavior: Behavior) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    upstream_on(listener, name, behavior).await
}

pub async fn upstream_on(listener: TcpListener, name: &str, behavior: Behavior) -> Upstream {
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let name_s = name.to_string();
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = &mut stopped => return,
            };
            let name = name_s.clone();
            let hits = h.clone();
            let behavior = behavior.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    let name = name.clone();
                    let behavior = behavior.clone();
                    async move { Ok::<_, Infallible>(answer(req, n, &name, &behavior).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        name: name.to_string(),
        hits,
        _stop: stop,
    }
}

async fn answer(
    req: Request<Incoming>,
    n: usize,
    name: &str,
    b: &Behavior,
) -> Response<Full<Bytes>> {
    if n < b.slow_first {
        tokio::time::sleep(b.delay).await;
    }
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        headers.insert(
            k.to_string(),
            String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
        );
    }
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let version = format!("{:?}", req.version());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let status = if n < b.fail_first {
        b.fail_status.unwrap_or(503)
    } else {
        b.status.unwrap_or(200)
    };
    let json = serde_json::json!({
        "upstream": name,
        "method": method,
        "uri": uri,
        "version": version,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

/// A gateway started from a config written to a temporary directory.
pub struct TestGateway {
    pub gateway: weir::Gateway,
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TestGateway {
    pub async fn addr(&self, listener: &str) -> SocketAddr {
        self.gateway
            .listener_addr(listener)
            .await
            .expect("listener is bound")
    }

    pub fn admin(&self) -> SocketAddr {
        self.gateway.admin_addr().expect("admin is on")
    }

    /// Rewrite the config file (not reloaded yet).
    pub fn write(&self, yaml: &str) {
        std::fs::write(&self.path, yaml).unwrap();
    }

    /// Rewrite and reload.
    pub async fn reload(&self, yaml: &str) -> Result<u64, weir::ReloadError> {
        self.write(yaml);
        self.gateway.reload().await
    }
}

/// Start a gateway. The config should use port 0 for listeners and the admin, and set
/// `server: { watch: false }` unless the test wants file watching.
pub async fn gateway(yaml: &str) -> TestGateway {
    gateway_with_workers(yaml, weir::workers::default_count()).await
}

/// A loopback port that was free a moment ago (for a config a child process binds).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `yaml` written to `weir.yaml` in a new temporary directory (kept while the guard lives).
pub fn config_file(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.yaml");
    std::fs::write(&path, yaml).unwrap();
    (dir, path)
}

/// Start a gateway with `workers` worker threads.
pub async fn gateway_with_workers(yaml: &str, workers: usize) -> TestGateway {
    let (dir, path) = config_file(yaml);
    let gateway = weir::Gateway::start_with_workers(&path, workers)
        .await
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    TestGateway { gateway, dir, path }
}

/// A minimal config: one listener `main` on port 0, admin on port 0, no file watching.
pub fn base() -> String {
    "admin: { address: 127.0.0.1:0 }\nserver: { watch: false }\nlisteners:\n  - { name: main, address: 127.0.0.1:0 }\n".to_string()
}

/// A plain HTTP/1.1 client with a pool.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build_http()
}

/// An h2c (prior knowledge) client.
pub fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The upstream that answered (from the echo body).
    pub fn upstream(&self) -> String {
        self.headers
            .get("x-upstream")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// A request header as the upstream saw it.
    pub fn seen_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_string)
    }
}

/// Send a request built by the caller.
pub async fn send(client: &Client<HttpConnector, Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// GET `path` on `addr` with `Host: host` and extra headers.
pub async fn get(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(format!("http://{addr}{path}")).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(), b.body(Full::new(Bytes::new())).unwrap()).await
}

/// Admin GET.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Reply {
    get(addr, "admin", path, &[]).await
}

/// Count answers by upstream over `n` requests.
pub async fn spread(addr: SocketAddr, host: &str, path: &str, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = send(
            &c,
            Request::get(format!("http://{addr}{path}"))
                .header("host", host)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        *counts.entry(r.upstream()).or_default() += 1;
    }
    counts
}

/// Write raw bytes on a new connection and read until the server closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Self-signed certificate files for `names` in `dir`; returns (cert path, key path, cert PEM).
pub fn cert_files(dir: &std::path::Path, stem: &str, names: &[&str]) -> (String, String, String) {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    let pem = ck.cert.pem();
    std::fs::write(&cert, &pem).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert.display().to_string(), key.display().to_string(), pem)
}

/// A TLS connection to `addr` with SNI `sni`, trusting `ca_pem`, offering `alpn`. Returns the
/// stream and the DER of the certificate the server presented.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let cert = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, cert)
}

/// One request over an established connection, HTTP/2 if `h2`, else HTTP/1.1.
pub async fn request_over<I>(io: I, h2: bool, req: Request<Full<Bytes>>) -> Reply
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let version = resp.version();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let mut headers = headers;
    headers.insert("x-test-version", format!("{version:?}").parse().unwrap());
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// The PEM of a certificate as DER.
pub fn pem_to_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The path of a test guest (`http`, `callout`, `bad`) of the wasm host crate, built once per
/// test process into its own target dir (no lock on the outer build).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .canonicalize()
            .unwrap();
        let target = root.join("target/wasm-guests");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--profile", "wasm", "--target", "wasm32-wasip1"]);
        for g in ["http", "callout", "bad", "bench", "grpcstream", "network"] {
            cmd.args(["-p", &format!("weir-guest-{g}")]);
        }
        assert!(
            cmd.status().unwrap().success(),
            "building the test guests failed"
        );
        target.join("wasm32-wasip1/wasm")
    });
    dir.join(format!("weir_guest_{name}.wasm"))
}
