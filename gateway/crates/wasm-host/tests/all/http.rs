//! Headers, bodies, trailers, local replies, properties, metrics, foreign functions, logs.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use weir_wasm_host::{
    Decision, FailPolicy, HostEnv, MetricValue, Plugin, PluginConfig, ResponseHead, filter_metrics,
};

use crate::support::{TestEnv, body_chunks, engine, exchange, guest, hv, info, plugin, request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_get_set_add_remove_and_pseudo_headers() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(2),
        &env,
        "http",
        "http-headers",
        "",
        FailPolicy::Closed,
    );
    let x = exchange(
        &p,
        request("/rewrite/me?q=1", &[("x-remove-me", "1"), ("x-keep", "k")]),
    )
    .await;
    assert_eq!(x.request_decision, Decision::Continue);
    let h = &x.request.headers;
    assert_eq!(x.request.path, "/rewritten", "a filter may rewrite :path");
    assert!(
        x.route_cleared,
        "modified request headers clear the route cache"
    );
    assert_eq!(hv(h, "x-seen-method"), Some("GET"));
    assert_eq!(hv(h, "x-seen-authority"), Some("example.com"));
    assert_eq!(hv(h, "x-seen-scheme"), Some("http"));
    // 4 pseudo-headers + x-remove-me + x-keep
    assert_eq!(hv(h, "x-count"), Some("6"));
    assert_eq!(hv(h, "x-n"), Some("6"));
    assert_eq!(hv(h, "x-eos"), Some("true"));
    let added: Vec<_> = h.get_all("x-added").iter().collect();
    assert_eq!(added, ["1", "2"]);
    assert!(h.get("x-remove-me").is_none());
    assert_eq!(hv(h, "x-keep"), Some("k"));
    assert_eq!(hv(h, "x-log-level"), Some("1"), "TestEnv answers Debug");
    assert!(env.logged("request to /rewrite/me?q=1"));
    assert!(env.logged("configured: "));
    // The response callbacks see the request snapshot and properties.
    let r = &x.response.headers;
    assert_eq!(hv(r, "x-resp"), Some("1"));
    assert_eq!(hv(r, "x-req-path"), Some("/rewritten"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_and_set_property_round_trip() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-props",
        "",
        FailPolicy::Closed,
    );
    let x = exchange(
        &p,
        request(
            "/a/b?x=y",
            &[
                ("referer", "r"),
                ("user-agent", "ua"),
                ("x-request-id", "rid"),
            ],
        ),
    )
    .await;
    let r = &x.response.headers;
    assert_eq!(hv(r, "x-prop-referer"), Some("r"));
    assert_eq!(hv(r, "x-prop-useragent"), Some("ua"));
    assert_eq!(
        hv(r, "x-prop-id"),
        Some("rid"),
        "request.id from x-request-id"
    );
    assert_eq!(hv(r, "x-prop-path"), Some("/a/b?x=y"));
    assert_eq!(hv(r, "x-prop-url-path"), Some("/a/b"));
    assert_eq!(hv(r, "x-prop-method"), Some("GET"));
    assert_eq!(hv(r, "x-prop-host"), Some("example.com"));
    assert_eq!(hv(r, "x-prop-plugin"), Some("http-plugin"));
    assert_eq!(hv(r, "x-prop-vm"), Some("http-props"));
    assert_eq!(hv(r, "x-prop-source"), Some("10.0.0.7:4242"));
    assert_eq!(hv(r, "x-prop-port"), Some("4242"));
    assert_eq!(hv(r, "x-prop-conn"), Some("77"));
    assert_eq!(hv(r, "x-prop-route"), Some("route-a"));
    assert_eq!(hv(r, "x-prop-code"), Some("200"));
    assert_eq!(
        hv(r, "x-prop-color"),
        Some("blue"),
        "set_property round trip"
    );
    assert_eq!(hv(r, "x-prop-missing"), Some("none"));
    assert!(
        hv(r, "x-prop-headers-len")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_status_and_header_edits() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-resp",
        "",
        FailPolicy::Closed,
    );
    let mut stream = p.new_stream(info());
    let mut head = request("/x", &[("x-set-status", "1")]);
    assert_eq!(
        stream.on_request_headers(&mut head, true).await,
        Decision::Continue
    );
    let mut resp = std::sync::Arc::new(ResponseHead::default());
    std::sync::Arc::make_mut(&mut resp)
        .headers
        .insert("server", HeaderValue::from_static("upstream"));
    assert_eq!(
        stream.on_response_headers(&mut resp, false).await,
        Decision::Continue
    );
    assert_eq!(resp.status, StatusCode::CREATED, ":status edited");
    assert!(resp.headers.get("server").is_none());
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    assert_eq!(
        stream.on_response_trailers(&mut trailers).await,
        Decision::Continue
    );
    assert_eq!(hv(&trailers, "x-resp-trailer"), Some("1"));
    assert_eq!(hv(&trailers, "grpc-status"), Some("0"));
    stream.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_reply_then_response_callbacks_run_on_it() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-deny",
        "",
        FailPolicy::Closed,
    );
    let x = exchange(&p, request("/deny", &[])).await;
    let Decision::LocalReply(reply) = &x.request_decision else {
        panic!("expected a local reply, got {:?}", x.request_decision);
    };
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(&reply.body[..], b"denied");
    assert_eq!(hv(&reply.headers, "x-deny"), Some("yes"));
    assert_eq!(reply.grpc_status, None);
    // The filter's response callback saw the local reply.
    assert_eq!(x.response.status, StatusCode::FORBIDDEN);
    assert_eq!(hv(&x.response.headers, "x-resp"), Some("1"));
    assert_eq!(hv(&x.response.headers, "x-prop-code"), Some("403"));

    let x = exchange(&p, request("/grpc-deny", &[])).await;
    let Decision::LocalReply(reply) = &x.request_decision else {
        panic!("expected a local reply");
    };
    assert_eq!(reply.grpc_status, Some(7));

    let x = exchange(&p, request("/close", &[])).await;
    assert_eq!(x.request_decision, Decision::Reset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_pause_buffers_then_replaces() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-body",
        "buffer",
        FailPolicy::Closed,
    );
    let mut stream = p.new_stream(info());
    let mut head = request("/upload", &[]);
    assert_eq!(
        stream.on_request_headers(&mut head, false).await,
        Decision::Continue
    );
    let (decisions, forwarded) = body_chunks(&mut stream, &["abc", "def", "gh"]).await;
    assert_eq!(
        decisions,
        [
            Decision::StopIteration,
            Decision::StopIteration,
            Decision::Continue
        ]
    );
    // The last callback saw the accumulated 8 bytes and replaced them.
    assert_eq!(String::from_utf8(forwarded).unwrap(), "ABCDEFGH!8");
    let mut trailers = HeaderMap::new();
    trailers.insert("t", HeaderValue::from_static("1"));
    assert_eq!(
        stream.on_request_trailers(&mut trailers).await,
        Decision::Continue
    );
    assert_eq!(hv(&trailers, "x-trailer-seen"), Some("1"));
    stream.finish();
}

/// Memory the guest grows during a callback is published (plugin stats, the engine's live
/// total) when the callback returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_grown_in_a_callback_is_reported() {
    let env = TestEnv::new();
    let engine = engine(1);
    let p = plugin(
        &engine,
        &env,
        "http",
        "http-grow",
        "buffer",
        FailPolicy::Closed,
    );
    let mut stream = p.new_stream(info());
    let mut head = request("/upload", &[]);
    assert_eq!(
        stream.on_request_headers(&mut head, false).await,
        Decision::Continue
    );
    let before = p.stats().memory_bytes;
    let (_, live_before) = engine.live_vms();
    assert!(before > 0 && live_before >= before);
    // The guest copies the 4 MiB body twice: its memory must grow.
    let mut body = Bytes::from(vec![b'a'; 4 << 20]);
    assert_eq!(
        stream.on_request_body(&mut body, true).await,
        Decision::Continue
    );
    let after = p.stats().memory_bytes;
    assert!(after >= before + (4 << 20), "{before} -> {after}");
    assert_eq!(engine.live_vms().1, live_before + (after - before));
    stream.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_body_is_visible_to_trailers() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-trailers",
        "buffer",
        FailPolicy::Closed,
    );
    let mut stream = p.new_stream(info());
    let mut head = request("/upload", &[]);
    stream.on_request_headers(&mut head, false).await;
    let mut chunk = Bytes::from_static(b"ab");
    assert_eq!(
        stream.on_request_body(&mut chunk, false).await,
        Decision::StopIteration
    );
    let mut trailers = HeaderMap::new();
    assert_eq!(
        stream.on_request_trailers(&mut trailers).await,
        Decision::Continue
    );
    assert_eq!(&stream.take_buffered_body(true)[..], b"AB");
    assert_eq!(hv(&trailers, "x-trailer-seen"), Some("0"));
    stream.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_buffering_and_limit() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-rbody",
        "buffer-resp",
        FailPolicy::Closed,
    );
    let mut stream = p.new_stream(info());
    let mut head = request("/", &[]);
    stream.on_request_headers(&mut head, true).await;
    let mut resp = std::sync::Arc::new(ResponseHead::default());
    stream.on_response_headers(&mut resp, false).await;
    let mut a = Bytes::from_static(b"hello ");
    assert_eq!(
        stream.on_response_body(&mut a, false).await,
        Decision::StopIteration
    );
    assert!(a.is_empty(), "paused bytes are held by the host");
    let mut b = Bytes::from_static(b"world");
    assert_eq!(
        stream.on_response_body(&mut b, true).await,
        Decision::Continue
    );
    assert_eq!(&b[..], b"hello world-tail");
    stream.finish();

    // Past body_buffer_bytes (1 MiB by default): 413 for a request body.
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-limit",
        "buffer",
        FailPolicy::Closed,
    );
    let mut stream = p.new_stream(info());
    let mut head = request("/", &[]);
    stream.on_request_headers(&mut head, false).await;
    let mut big = Bytes::from(vec![b'x'; 600 * 1024]);
    assert_eq!(
        stream.on_request_body(&mut big, false).await,
        Decision::StopIteration
    );
    let mut big = Bytes::from(vec![b'x'; 600 * 1024]);
    match stream.on_request_body(&mut big, false).await {
        Decision::LocalReply(r) => {
            assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        }
        other => panic!("expected 413, got {other:?}"),
    }
    stream.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_on_headers_without_callout_waits_for_body() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-pause",
        "",
        FailPolicy::Closed,
    );
    let mut stream = p.new_stream(info());
    let mut head = request("/pause", &[]);
    assert_eq!(
        stream.on_request_headers(&mut head, false).await,
        Decision::StopIteration
    );
    let (d, out) = body_chunks(&mut stream, &["data"]).await;
    assert_eq!(d, [Decision::Continue]);
    assert_eq!(out, b"data");
    stream.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_values_and_many_headers() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-bytes",
        "",
        FailPolicy::Closed,
    );
    let mut head = request("/", &[]);
    let h = std::sync::Arc::make_mut(&mut head);
    h.headers
        .insert("x-binary", HeaderValue::from_bytes(b"\xff\xfeabc").unwrap());
    for i in 0..1500 {
        h.headers.append(
            http::header::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            HeaderValue::from_static("v"),
        );
    }
    let mut stream = p.new_stream(info());
    assert_eq!(
        stream.on_request_headers(&mut head, true).await,
        Decision::Continue
    );
    assert_eq!(hv(&head.headers, "x-binary-len"), Some("5"));
    assert_eq!(
        head.headers.get("x-binary-copy").unwrap().as_bytes(),
        b"\xff\xfeabc"
    );
    assert_eq!(hv(&head.headers, "x-count"), Some("1505"));
    stream.finish();
}

/// A `portable` plugin gets `NOT_FOUND` from every foreign function, Weir's own and the
/// `HostEnv`'s, as in Envoy; a plugin without the setting, in the same VM, still gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portable_plugin_gets_no_foreign_functions() {
    let env = TestEnv::new();
    let engine = engine(1);
    let make = |name: &str, portable: bool| {
        let mut cfg = PluginConfig::new(name, guest("http"));
        cfg.vm_id = "http-portable".into();
        cfg.portable = portable;
        Plugin::new(&engine, cfg, env.clone() as Arc<dyn HostEnv>).expect("plugin")
    };
    let portable = make("portable", true);
    let native = make("native", false);
    let headers = [("x-get-properties", "1"), ("x-foreign", "abc")];
    let x = exchange(&portable, request("/", &headers)).await;
    assert_eq!(hv(&x.request.headers, "x-properties"), Some("NotFound"));
    assert_eq!(hv(&x.request.headers, "x-foreign-result"), Some("NotFound"));
    let x = exchange(&native, request("/", &headers)).await;
    assert_eq!(
        hv(&x.request.headers, "x-properties"),
        Some("/|<none>|native")
    );
    assert_eq!(hv(&x.request.headers, "x-foreign-result"), Some("cba"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_foreign_functions_and_callback_order() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-metrics",
        "",
        FailPolicy::Closed,
    );
    let counter = |name: &str| {
        filter_metrics()
            .into_iter()
            .find(|m| m.name == name)
            .map(|m| match m.value {
                MetricValue::Counter(v) => v,
                other => panic!("{name} is {other:?}"),
            })
            .unwrap_or(0)
    };
    let (req0, log0, done0) = (
        counter("guest_http.requests"),
        counter("guest_http.logged"),
        counter("guest_http.done"),
    );
    let x = exchange(&p, request("/", &[("x-foreign", "abc")])).await;
    assert_eq!(hv(&x.request.headers, "x-foreign-result"), Some("cba"));
    // Weir's own foreign function: several properties in one call, a missing one marked.
    let x = exchange(&p, request("/props?a=1", &[("x-get-properties", "1")])).await;
    let plugin = p.name().to_string();
    assert_eq!(
        hv(&x.request.headers, "x-properties"),
        Some(format!("/props?a=1|<none>|{plugin}").as_str())
    );
    assert_eq!(
        hv(&x.request.headers, "x-properties-bad"),
        Some("Some(BadArgument)")
    );
    let x = exchange(&p, request("/", &[("x-foreign", "fail")])).await;
    assert_eq!(
        hv(&x.request.headers, "x-foreign-result"),
        Some("BadArgument")
    );
    assert!(counter("guest_http.requests") >= req0 + 2);
    assert!(counter("guest_http.logged") >= log0 + 2, "on_log ran");
    assert!(counter("guest_http.done") >= done0 + 2, "on_done ran");
    let hist = filter_metrics()
        .into_iter()
        .find(|m| m.name == "guest_http.body_size");
    assert!(matches!(
        hist.map(|m| m.value),
        Some(MetricValue::Histogram(_))
    ));
    let mut text = String::new();
    weir_wasm_host::render_filter_metrics(&mut text);
    assert!(
        text.contains("# TYPE wasm_guest_http_requests counter"),
        "{text}"
    );
    let stats = p.stats();
    // Per exchange: request headers (with context creation), response headers, and the
    // final on_log + on_done + on_delete.
    assert!(stats.callbacks >= 6, "{}", stats.callbacks);
    assert!(stats.memory_bytes > 0);
    assert_eq!(stats.traps, 0);
    let mut text = String::new();
    weir_wasm_host::render_plugin_stats(&[(p.name(), stats)], &mut text);
    assert!(text.contains("weir_wasm_callbacks_total{plugin=\"http-plugin\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_foreign_function() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "http-ratelimit",
        "",
        FailPolicy::Closed,
    );
    for _ in 0..2 {
        let x = exchange(&p, request("/", &[("x-ratelimit-key", "k1")])).await;
        assert_eq!(x.request_decision, Decision::Continue);
    }
    let x = exchange(&p, request("/", &[("x-ratelimit-key", "k1")])).await;
    match &x.request_decision {
        Decision::LocalReply(r) => {
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(hv(&r.headers, "retry-after"), Some("2"));
        }
        other => panic!("expected 429, got {other:?}"),
    }
    let x = exchange(&p, request("/", &[("x-ratelimit-key", "k2")])).await;
    assert_eq!(x.request_decision, Decision::Continue, "another key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_data_counter_across_requests() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(2),
        &env,
        "http",
        "http-shared",
        "",
        FailPolicy::Closed,
    );
    let mut last = 0;
    for _ in 0..4 {
        let x = exchange(&p, request("/", &[])).await;
        let n: u64 = hv(&x.request.headers, "x-hits").unwrap().parse().unwrap();
        assert!(n > last, "CAS-incremented counter grows across replicas");
        last = n;
    }
    assert_eq!(last, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_configuration_is_readable_in_vm_start_only() {
    let env = TestEnv::new();
    let mut cfg = weir_wasm_host::PluginConfig::new("vmconf", crate::support::guest("http"));
    cfg.vm_id = "http-vmconf".into();
    cfg.vm_configuration = bytes::Bytes::from_static(b"vm-settings");
    let p = weir_wasm_host::Plugin::new(&engine(1), cfg, env.clone()).unwrap();
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(hv(&x.request.headers, "x-vm-config"), Some("vm-settings"));
}
