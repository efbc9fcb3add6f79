//! The built-in `ratelimit` and `stats` filters (`filters/*`) on this host, in settings the
//! gateway does not produce by default: no `weir_rate_limit` function (as in Envoy), one speaking
//! only the original argument form, or a `portable` plugin (no Weir foreign function at all).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use weir_wasm_host::{
    Decision, ForeignFunction, ForeignRegistry, HostEnv, NoopEnv, Plugin, PluginConfig,
    RATE_LIMIT_FUNCTION, RateLimitQuota, Status,
};

use crate::support::{engine, exchange, hv, request};

/// The bytes of `filters/NAME`, built once per test process next to the test guests.
fn builtin(name: &str) -> Arc<[u8]> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../..");
        let target = root.join("target/wasm-guests");
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--profile", "wasm", "--target", "wasm32-wasip1"])
            .args(["-p", "weir-filter-ratelimit", "-p", "weir-filter-stats"])
            .status()
            .expect("run cargo to build the built-in filters");
        assert!(
            status.success(),
            "building filters/ratelimit and filters/stats failed"
        );
        target.join("wasm32-wasip1/wasm")
    });
    let path = dir.join(format!("weir_filter_{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into()
}

/// A plugin of filter `name` named `plugin` with `config`, on `replicas` VM replicas.
fn filter(
    name: &str,
    plugin: &str,
    config: &str,
    replicas: usize,
    env: Arc<dyn HostEnv>,
) -> Arc<Plugin> {
    let mut cfg = PluginConfig::new(plugin, builtin(name));
    cfg.vm_id = plugin.to_owned();
    cfg.configuration = Bytes::copy_from_slice(config.as_bytes());
    Plugin::new(&engine(replicas), cfg, env).expect("plugin")
}

/// Send one request with `x-api-key: key`; the local reply if it was refused.
async fn call(p: &Arc<Plugin>, key: &str) -> (Option<weir_wasm_host::LocalReply>, http::HeaderMap) {
    let x = exchange(p, request("/", &[("x-api-key", key)])).await;
    match x.request_decision {
        Decision::Continue => (None, x.response.headers.clone()),
        Decision::LocalReply(r) => (Some(*r), x.response.headers.clone()),
        other => panic!("unexpected decision {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_without_the_foreign_function_uses_shared_data() {
    // Two replicas: requests alternate between VMs, the bucket is shared through shared data.
    let p = filter(
        "ratelimit",
        "rl-fallback",
        r#"{"requests": 2, "per": "1m", "key": {"header": "x-api-key"}, "headers": true}"#,
        2,
        Arc::new(NoopEnv),
    );
    let (reply, headers) = call(&p, "a").await;
    assert!(reply.is_none());
    assert_eq!(hv(&headers, "x-ratelimit-limit"), Some("2"));
    assert_eq!(hv(&headers, "x-ratelimit-remaining"), Some("1"));
    assert_eq!(hv(&headers, "x-ratelimit-reset"), Some("30"));
    let (reply, headers) = call(&p, "a").await;
    assert!(reply.is_none());
    assert_eq!(hv(&headers, "x-ratelimit-remaining"), Some("0"));
    let (reply, _) = call(&p, "a").await;
    let reply = reply.expect("the third request is limited");
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.body, "local_rate_limited");
    assert_eq!(hv(&reply.headers, "retry-after"), Some("30"));
    assert_eq!(hv(&reply.headers, "x-ratelimit-remaining"), Some("0"));
    assert!(
        call(&p, "b").await.0.is_none(),
        "another key, another bucket"
    );
    assert!(
        call(&p, "a").await.0.is_some(),
        "still limited on the other replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_fallback_refills() {
    let p = filter(
        "ratelimit",
        "rl-refill",
        r#"{"requests": 1, "per": "300ms"}"#,
        1,
        Arc::new(NoopEnv),
    );
    assert!(call(&p, "").await.0.is_none());
    let (reply, _) = call(&p, "").await;
    assert_eq!(
        hv(&reply.expect("limited").headers, "retry-after"),
        Some("1")
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(call(&p, "").await.0.is_none(), "a token came back");
}

/// A `weir_rate_limit` call as decoded by the host: cost, quota, key.
type Call = (u32, Option<RateLimitQuota>, String);

/// An environment whose `weir_rate_limit` records calls and answers with `answer`.
struct RecordingEnv {
    foreign: ForeignRegistry,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl RecordingEnv {
    fn new(answer: impl Fn(u32) -> Result<Bytes, Status> + Send + Sync + 'static) -> Arc<Self> {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let mut foreign = ForeignRegistry::new();
        foreign.register(RATE_LIMIT_FUNCTION, move |args: &[u8]| {
            let call = weir_wasm_host::decode_rate_limit_request(args)?;
            let mut seen = seen.lock().unwrap();
            seen.push((call.cost, call.quota, call.key.to_owned()));
            answer(seen.len() as u32)
        });
        Arc::new(RecordingEnv { foreign, calls })
    }
}

impl HostEnv for RecordingEnv {
    fn foreign_function(&self, name: &str) -> Option<ForeignFunction> {
        self.foreign.get(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_passes_its_quota_to_the_foreign_function() {
    // Allowed with 7 left, then limited for 2.5 s.
    let env = RecordingEnv::new(|n| {
        Ok(if n == 1 {
            weir_wasm_host::encode_rate_limit_allowed(7)
        } else {
            weir_wasm_host::encode_rate_limit_result(false, Duration::from_millis(2500))
        })
    });
    let config = r#"{"requests": 10, "per": "500ms", "burst": 8, "key": {"header": "x-api-key"}, "headers": true, "status": 503}"#;
    let p = filter("ratelimit", "rl-fast", config, 1, env.clone());
    let (reply, headers) = call(&p, "k1").await;
    assert!(reply.is_none());
    assert_eq!(hv(&headers, "x-ratelimit-remaining"), Some("7"));
    assert_eq!(hv(&headers, "x-ratelimit-limit"), Some("8"));
    let (reply, _) = call(&p, "k1").await;
    let reply = reply.expect("limited by the host");
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hv(&reply.headers, "retry-after"), Some("3"));
    let calls = env.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    let (cost, quota, key) = &calls[0];
    assert_eq!(*cost, 1);
    assert_eq!(
        *quota,
        Some(RateLimitQuota {
            requests: 10,
            per: Duration::from_millis(500),
            burst: 8
        })
    );
    assert!(key.starts_with("ratelimit/rl-fast/"), "{key}");
    assert!(key.ends_with("/k1"), "{key}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_falls_back_when_the_foreign_function_refuses_quotas() {
    // A host that knows only the original form answers BAD_ARGUMENT to quota calls.
    let env = RecordingEnv::new(|_| Err(Status::BadArgument));
    let p = filter(
        "ratelimit",
        "rl-old-host",
        r#"{"requests": 1, "per": "1m"}"#,
        1,
        env.clone(),
    );
    assert!(call(&p, "").await.0.is_none());
    assert!(
        call(&p, "").await.0.is_some(),
        "limited through shared data"
    );
    assert_eq!(
        env.calls.lock().unwrap().len(),
        1,
        "asked once, then shared data only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_rejects_a_bad_configuration() {
    let mut cfg = PluginConfig::new("rl-bad", builtin("ratelimit"));
    cfg.vm_id = "rl-bad".into();
    cfg.configuration = Bytes::from_static(br#"{"requests": 0}"#);
    let err = Plugin::new(&engine(1), cfg, Arc::new(NoopEnv)).unwrap_err();
    assert!(
        matches!(err, weir_wasm_host::PluginError::ConfigureRejected { .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_export_istio_metrics_with_labels() {
    stats_export("host-test", false).await;
}

/// The same through `proxy_get_property` alone: as in Envoy, where `weir_get_properties`
/// answers `NOT_FOUND` and `PropertyBatch` falls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_export_the_same_without_weir_get_properties() {
    stats_export("host-portable", true).await;
}

/// Three requests and a gRPC 403 through `builtin:stats` reporting as `workload`; check the
/// series it exports.
async fn stats_export(workload: &str, portable: bool) {
    let config = format!(r#"{{"source": {{"workload": "{workload}", "namespace": "edge"}}}}"#);
    let mut cfg = PluginConfig::new(format!("stats-{workload}"), builtin("stats"));
    cfg.vm_id = format!("stats-{workload}");
    cfg.configuration = Bytes::from(config);
    cfg.portable = portable;
    let p = Plugin::new(&engine(2), cfg, Arc::new(NoopEnv)).expect("plugin");
    let me = format!("source_workload=\"{workload}\"");
    for _ in 0..3 {
        exchange(&p, request("/", &[])).await;
    }
    // A local reply (403 from the request headers, here simulated by the response head).
    let mut stream = p.new_stream(crate::support::info());
    let mut head = request("/x", &[("content-type", "application/grpc")]);
    stream.on_request_headers(&mut head, true).await;
    let mut resp = weir_wasm_host::ResponseHead {
        status: StatusCode::FORBIDDEN,
        headers: http::HeaderMap::new(),
    };
    resp.headers.insert("grpc-status", "7".parse().unwrap());
    let mut resp = Arc::new(resp);
    stream.on_response_headers(&mut resp, true).await;
    stream.finish();

    let mut text = String::new();
    weir_wasm_host::render_filter_metrics(&mut text);
    let series = |needle: &[&str], metric: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(metric) && needle.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    };
    let ok = series(
        &[me.as_str(), "response_code=\"200\""],
        "istio_requests_total{",
    );
    assert_eq!(ok.len(), 1, "{text}");
    assert!(ok[0].ends_with("} 3"), "{}", ok[0]);
    for label in [
        "reporter=\"source\"",
        "source_workload_namespace=\"edge\"",
        "destination_service=\"example.com\"",
        "destination_service_name=\"example.com\"",
        "request_protocol=\"http\"",
        "grpc_response_status=\"\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"unknown\"",
        "destination_workload=\"unknown\"",
    ] {
        assert!(ok[0].contains(label), "{label} in {}", ok[0]);
    }
    let denied = series(
        &[me.as_str(), "response_code=\"403\""],
        "istio_requests_total{",
    );
    assert_eq!(denied.len(), 1, "{text}");
    assert!(
        denied[0].contains("request_protocol=\"grpc\""),
        "{}",
        denied[0]
    );
    assert!(
        denied[0].contains("grpc_response_status=\"7\""),
        "{}",
        denied[0]
    );
    assert!(denied[0].ends_with("} 1"), "{}", denied[0]);
    let count = series(
        &[me.as_str(), "response_code=\"200\""],
        "istio_request_duration_milliseconds_count{",
    );
    assert_eq!(count.len(), 1, "{text}");
    assert!(count[0].ends_with("} 3"), "{}", count[0]);
    assert_eq!(
        text.matches("# TYPE istio_requests_total counter").count(),
        1
    );
    assert_eq!(
        text.matches("# TYPE istio_request_bytes histogram").count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_fold_label_combinations_past_the_limit() {
    let p = filter(
        "stats",
        "stats-cap",
        r#"{"source": {"workload": "cap-test"}, "max_series": 2}"#,
        1,
        Arc::new(NoopEnv),
    );
    for host in [
        "a.example",
        "b.example",
        "c.example",
        "d.example",
        "a.example",
    ] {
        let mut head = request("/", &[]);
        Arc::make_mut(&mut head).authority = host.into();
        let mut stream = p.new_stream(crate::support::info());
        stream.on_request_headers(&mut head, true).await;
        stream
            .on_response_headers(&mut Arc::new(weir_wasm_host::ResponseHead::default()), true)
            .await;
        stream.finish();
    }
    let mut text = String::new();
    weir_wasm_host::render_filter_metrics(&mut text);
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("\"cap-test\""))
        .collect();
    assert_eq!(
        requests.len(),
        3,
        "two combinations and the overflow: {requests:#?}"
    );
    let value = |host: &str| {
        requests
            .iter()
            .find(|l| l.contains(&format!("destination_service=\"{host}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(value("a.example").as_deref(), Some("2"));
    assert_eq!(value("b.example").as_deref(), Some("1"));
    assert_eq!(value("other").as_deref(), Some("2"), "c and d folded");
    assert_eq!(value("c.example"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_take_header_values_that_are_not_utf8() {
    let rl = filter(
        "ratelimit",
        "rl-bytes",
        r#"{"requests": 5, "key": {"header": "x-api-key"}}"#,
        1,
        Arc::new(NoopEnv),
    );
    let stats = filter("stats", "stats-bytes", "", 1, Arc::new(NoopEnv));
    for (p, name) in [(&rl, "x-api-key"), (&stats, "content-type")] {
        let mut head = request("/caf\u{e9}", &[]);
        Arc::make_mut(&mut head).headers.insert(
            http::HeaderName::from_static(name),
            http::HeaderValue::from_bytes(b"text/\xffplain").unwrap(),
        );
        let x = exchange(p, head).await;
        assert_eq!(x.request_decision, Decision::Continue, "{name}");
        let s = p.stats();
        assert_eq!((s.traps, s.failed_streams), (0, 0), "{name}");
    }
}
