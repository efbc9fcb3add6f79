//! Test support: builds the guest crates on demand, a test `HostEnv`, and stream helpers.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use weir_wasm_host::{
    CallError, CallResponse, Decision, Engine, EngineConfig, FailPolicy, ForeignFunction,
    ForeignRegistry, GrpcRequestBody, GrpcStreamFuture, HostEnv, HttpStream, LogLevel, Plugin,
    PluginConfig, RequestHead, ResponseHead, Status, StreamInfo,
};

// A path relative to this file, which the bench includes too.
#[path = "support/grpc_server.rs"]
pub mod grpc_server;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../..")
        .canonicalize()
        .expect("workspace root")
}

fn guest_dir() -> PathBuf {
    workspace_root().join("target/wasm-guests")
}

/// Build every guest once per test process (own target dir, so no lock on the outer build).
fn build_guests() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = guest_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .env("CARGO_TARGET_DIR", &dir)
            .args(["build", "--profile", "wasm", "--target", "wasm32-wasip1"]);
        for g in ["http", "callout", "bad", "bench", "network", "grpcstream"] {
            cmd.args(["-p", &format!("weir-guest-{g}")]);
        }
        let status = cmd.status().expect("run cargo to build the test guests");
        assert!(status.success(), "building the test guests failed");
        dir.join("wasm32-wasip1/wasm")
    })
}

/// The bytes of guest `name` (`http`, `callout`, `bad`, `bench`, `network`, `grpcstream`).
pub fn guest(name: &str) -> Arc<[u8]> {
    let path = build_guests().join(format!("weir_guest_{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into()
}

/// An engine with `replicas` VM replicas taken in turn (so tests on one thread reach them all),
/// compiling through the on-disk cache.
pub fn engine(replicas: usize) -> Engine {
    Engine::new(EngineConfig {
        cache_dir: Some(guest_dir().join("compile-cache")),
        replicas,
        replica_choice: weir_wasm_host::ReplicaChoice::RoundRobin,
        ..EngineConfig::default()
    })
    .expect("engine")
}

/// The test host environment: cluster `auth` answers by `x-user` (`alice` → 200 `ok-alice`,
/// `fail` → reset, `hang` → never answers, anything else → 401); foreign function `weir_test_echo` reverses its
/// argument; logs are recorded. gRPC streams go to the servers of `grpc_clusters`.
pub struct TestEnv {
    /// HTTP callouts answered so far.
    pub answered: Arc<std::sync::atomic::AtomicUsize>,
    pub logs: Mutex<Vec<(String, LogLevel, String)>>,
    pub calls: Mutex<Vec<http::Request<Bytes>>>,
    /// gRPC clusters (streams only): name → server address.
    pub grpc_clusters: grpc_server::GrpcClusters,
    /// Callouts for user `gated` answer (as for `alice`) only after a permit is added here.
    pub gate: Arc<tokio::sync::Semaphore>,
    foreign: ForeignRegistry,
}

impl TestEnv {
    pub fn new() -> Arc<Self> {
        let mut foreign = ForeignRegistry::new();
        foreign.register("weir_test_echo", |args: &[u8]| {
            if args == b"fail" {
                return Err(Status::BadArgument);
            }
            let mut v = args.to_vec();
            v.reverse();
            Ok(Bytes::from(v))
        });
        // A toy rate limiter with Weir's calling convention: 2 permits per key.
        let used = Mutex::new(std::collections::HashMap::<String, u32>::new());
        foreign.register(weir_wasm_host::RATE_LIMIT_FUNCTION, move |args: &[u8]| {
            let (cost, key) = weir_wasm_host::decode_rate_limit_args(args)?;
            let mut used = used.lock().unwrap();
            let n = used.entry(key.to_owned()).or_default();
            let allowed = *n + cost <= 2;
            if allowed {
                *n += cost;
            }
            Ok(weir_wasm_host::encode_rate_limit_result(
                allowed,
                Duration::from_millis(1500),
            ))
        });
        Arc::new(Self {
            foreign,
            answered: Default::default(),
            logs: Default::default(),
            calls: Default::default(),
            grpc_clusters: Default::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        })
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .any(|(_, _, m)| m.contains(needle))
    }
}

impl HostEnv for TestEnv {
    fn has_cluster(&self, cluster: &str) -> bool {
        cluster == "auth" || self.grpc_clusters.lock().unwrap().contains_key(cluster)
    }

    fn grpc_stream(
        &self,
        cluster: &str,
        request: http::Request<GrpcRequestBody>,
    ) -> Result<GrpcStreamFuture, CallError> {
        let addr = self.grpc_clusters.lock().unwrap().get(cluster).copied();
        let addr = addr.ok_or_else(|| CallError::Unsupported(format!("{cluster} has no gRPC")))?;
        Ok(grpc_server::connect(addr, cluster, request))
    }

    fn http_call(
        &self,
        _cluster: &str,
        request: http::Request<Bytes>,
        _timeout: Option<Duration>,
    ) -> BoxFuture<'static, Result<CallResponse, CallError>> {
        let user = request
            .headers()
            .get("x-user")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let grpc = request
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/grpc");
        let body = request.body().clone();
        let path = request.uri().path().to_owned();
        self.calls.lock().unwrap().push(request);
        if grpc {
            return Box::pin(async move {
                let mut trailers = HeaderMap::new();
                let mut r = http::Response::new(Bytes::new());
                if user == "grpc-deny" || path != "/weir.Auth/Check" {
                    trailers.insert("grpc-status", HeaderValue::from_static("7"));
                    trailers.insert("grpc-message", HeaderValue::from_static("denied"));
                } else {
                    let msg = format!("pong:{}", String::from_utf8_lossy(&body[5..]));
                    let mut frame = vec![0];
                    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                    frame.extend_from_slice(msg.as_bytes());
                    *r.body_mut() = Bytes::from(frame);
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                }
                Ok(CallResponse {
                    response: r,
                    trailers,
                })
            });
        }
        let answered = self.answered.clone();
        let gate = self.gate.clone();
        Box::pin(async move {
            // Answer asynchronously, as a real upstream would.
            tokio::task::yield_now().await;
            if user == "gated" {
                gate.acquire().await.expect("the gate stays open").forget();
            }
            let r = match user.as_str() {
                "hang" => std::future::pending().await,
                "fail" => Err(CallError::Reset("connection refused".into())),
                "alice" | "gated" | "" => {
                    let mut r = http::Response::new(Bytes::from(format!("ok-{user}")));
                    r.headers_mut()
                        .insert("x-from", HeaderValue::from_static("auth"));
                    Ok(CallResponse {
                        response: r,
                        trailers: HeaderMap::new(),
                    })
                }
                _ => {
                    let mut r = http::Response::new(Bytes::new());
                    *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                    Ok(CallResponse {
                        response: r,
                        trailers: HeaderMap::new(),
                    })
                }
            };
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            r
        })
    }

    fn foreign_function(&self, name: &str) -> Option<ForeignFunction> {
        self.foreign.get(name)
    }

    fn log(&self, plugin: &str, level: LogLevel, message: &str) {
        self.logs
            .lock()
            .unwrap()
            .push((plugin.to_owned(), level, message.to_owned()));
    }

    fn log_level(&self) -> LogLevel {
        LogLevel::Debug
    }
}

/// A plugin of guest `name` with `configuration`, a vm_id unique to the caller.
pub fn plugin(
    engine: &Engine,
    env: &Arc<TestEnv>,
    name: &str,
    vm_id: &str,
    configuration: &str,
    fail: FailPolicy,
) -> Arc<Plugin> {
    try_plugin(engine, env, name, vm_id, configuration, fail).expect("plugin")
}

/// Like [`plugin`], returning the error.
pub fn try_plugin(
    engine: &Engine,
    env: &Arc<TestEnv>,
    name: &str,
    vm_id: &str,
    configuration: &str,
    fail: FailPolicy,
) -> Result<Arc<Plugin>, weir_wasm_host::PluginError> {
    let mut cfg = PluginConfig::new(format!("{name}-plugin"), guest(name));
    cfg.vm_id = vm_id.to_owned();
    cfg.configuration = Bytes::copy_from_slice(configuration.as_bytes());
    cfg.fail = fail;
    Plugin::new(engine, cfg, env.clone() as Arc<dyn HostEnv>)
}

/// A GET request head for `path` with `headers`.
pub fn request(path: &str, headers: &[(&str, &str)]) -> Arc<RequestHead> {
    let mut head = RequestHead {
        authority: "example.com".into(),
        path: path.into(),
        ..RequestHead::default()
    };
    for (k, v) in headers {
        head.headers.append(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    Arc::new(head)
}

/// Stream info with a source address.
pub fn info() -> Arc<StreamInfo> {
    Arc::new(StreamInfo {
        source: Some("10.0.0.7:4242".parse().unwrap()),
        destination: Some("127.0.0.1:8080".parse().unwrap()),
        connection_id: 77,
        route_name: "route-a".into(),
        ..StreamInfo::default()
    })
}

/// What a full request through one stream produced.
#[allow(dead_code)]
pub struct Exchange {
    pub request: Arc<RequestHead>,
    pub request_decision: Decision,
    pub response: Arc<ResponseHead>,
    pub response_decision: Decision,
    pub route_cleared: bool,
}

/// Drive one header-only request: request headers, then response headers (the local reply if
/// the request was answered locally), then finish.
pub async fn exchange(plugin: &Arc<Plugin>, mut head: Arc<RequestHead>) -> Exchange {
    let mut stream = plugin.new_stream(info());
    let request_decision = stream.on_request_headers(&mut head, true).await;
    let route_cleared = stream.route_cache_cleared();
    let mut response = Arc::new(match &request_decision {
        Decision::LocalReply(r) => ResponseHead {
            status: r.status,
            headers: r.headers.clone(),
        },
        _ => ResponseHead::default(),
    });
    let response_decision = stream.on_response_headers(&mut response, true).await;
    stream.finish();
    Exchange {
        request: head,
        request_decision,
        response,
        response_decision,
        route_cleared,
    }
}

/// A header value as a string.
pub fn hv<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
    map.get(name).map(|v| v.to_str().unwrap())
}

/// Drive a stream's request body in chunks; returns the decisions and the forwarded bytes.
pub async fn body_chunks(stream: &mut HttpStream, chunks: &[&str]) -> (Vec<Decision>, Vec<u8>) {
    let mut out = Vec::new();
    let mut decisions = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let mut buf = Bytes::copy_from_slice(c.as_bytes());
        let d = stream
            .on_request_body(&mut buf, i + 1 == chunks.len())
            .await;
        out.extend_from_slice(&buf);
        decisions.push(d);
    }
    (decisions, out)
}
