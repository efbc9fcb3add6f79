//! The built-in `ratelimit` and `stats` filters through the gateway.
//!
//! The gateway provides `weir_rate_limit` and `weir_get_properties`, so these tests run the
//! filters' fast paths, except the `portable` variants, which run their fallbacks (Envoy,
//! Istio). The wasm-host crate tests the fallbacks too (`tests/all/builtin_filters.rs`).

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;

/// A gateway config: `plugins` and `routes` (YAML list items), one cluster per `(name, addr)`.
fn cfg(plugins: &str, routes: &str, clusters: &[(&str, SocketAddr)]) -> String {
    let clusters: String = clusters
        .iter()
        .map(|(name, addr)| {
            format!("  - {{ name: {name}, endpoints: [ {{ address: \"{addr}\" }} ] }}\n")
        })
        .collect();
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:0 }}\nplugins:\n{plugins}routes:\n{routes}clusters:\n{clusters}"
    )
}

fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.headers.get(name).map(|v| v.to_str().unwrap())
}

/// One route `r` to upstream `up` through plugin `rl` (`builtin:ratelimit` with `config`, YAML),
/// plus `extra_routes` before it. Returns the upstream, the gateway and its listener address.
async fn ratelimited(config: &str, extra_routes: &str) -> (Upstream, TestGateway, SocketAddr) {
    let up = upstream("up", Behavior::default()).await;
    let plugins = format!("  - {{ name: rl, module: builtin:ratelimit, config: {config} }}\n");
    let routes = format!(
        "{extra_routes}  - {{ name: r, filters: [rl], backends: [ {{ cluster: up }} ] }}\n"
    );
    let gw = gateway(&cfg(&plugins, &routes, &[("up", up.addr)])).await;
    let addr = gw.addr("main").await;
    (up, gw, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_lets_the_burst_through_then_answers_429_per_key() {
    let config = "{ requests: 3, per: 1m, key: { header: x-api-key }, headers: true }";
    let (up, _gw, addr) = ratelimited(config, "").await;
    for left in ["2", "1", "0"] {
        let r = get(addr, "x", "/", &[("x-api-key", "alice")]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(header(&r, "x-ratelimit-limit"), Some("3"));
        assert_eq!(header(&r, "x-ratelimit-remaining"), Some(left));
    }
    let r = get(addr, "x", "/", &[("x-api-key", "alice")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body, "local_rate_limited");
    // One token every 20 s.
    assert_eq!(header(&r, "retry-after"), Some("20"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&r, "x-ratelimit-reset"), Some("60"));
    assert_eq!(up.hits(), 3, "the limited request never went upstream");
    // Other keys have their own buckets; requests without the header share one.
    assert_eq!(
        get(addr, "x", "/", &[("x-api-key", "bob")]).await.status,
        200
    );
    for _ in 0..3 {
        assert_eq!(get(addr, "x", "/", &[]).await.status, 200);
    }
    assert_eq!(get(addr, "x", "/", &[]).await.status, 429);
    assert_eq!(
        get(addr, "x", "/", &[("x-api-key", "alice")]).await.status,
        429
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_tokens_refill_after_the_interval() {
    let (_up, _gw, addr) = ratelimited("{ requests: 2, per: 400ms }", "").await;
    let statuses = |n| async move {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(get(addr, "x", "/", &[]).await.status);
        }
        out
    };
    assert_eq!(statuses(3).await, [200, 200, 429]);
    let r = get(addr, "x", "/", &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(header(&r, "retry-after"), Some("1"), "200 ms rounds up");
    assert!(
        header(&r, "x-ratelimit-limit").is_none(),
        "headers are off by default"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        statuses(3).await,
        [200, 200, 429],
        "the bucket is full again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_by_path_and_by_route_configuration() {
    let config = "{ requests: 1, per: 1m, key: { path: true }, status: 503 }";
    let strict = "  - { name: strict, match: { path: { prefix: /strict } }, filters: [ { plugin: rl, config: { requests: 1, per: 1m } } ], backends: [ { cluster: up } ] }\n";
    let (_up, _gw, addr) = ratelimited(config, strict).await;
    assert_eq!(get(addr, "x", "/a?x=1", &[]).await.status, 200);
    let r = get(addr, "x", "/a?x=2", &[]).await;
    assert_eq!(
        r.status, 503,
        "the query is not part of the key; status from the config"
    );
    assert_eq!(get(addr, "x", "/b", &[]).await.status, 200, "another path");
    // The route's own configuration: one global bucket of its own, default status.
    assert_eq!(get(addr, "x", "/strict/1", &[]).await.status, 200);
    assert_eq!(get(addr, "x", "/strict/2", &[]).await.status, 429);
    assert_eq!(
        get(addr, "x", "/c", &[]).await.status,
        200,
        "untouched by /strict"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_by_remote_address() {
    let config = "{ requests: 2, per: 1m, key: { remote_address: true } }";
    let (_up, _gw, addr) = ratelimited(config, "").await;
    // Every request comes from 127.0.0.1, over new connections (other ports): one bucket.
    let mut statuses = Vec::new();
    for key in ["a", "b", "c"] {
        statuses.push(get(addr, "x", "/", &[("x-api-key", key)]).await.status);
    }
    assert_eq!(statuses, [200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ratelimit_configuration_is_rejected() {
    let (up, gw, addr) = ratelimited("{ requests: 5, per: 1s }", "").await;
    let plugins =
        "  - { name: rl, module: builtin:ratelimit, config: { requests: 1, per: soon } }\n";
    let routes = "  - { name: r, filters: [rl], backends: [ { cluster: up } ] }\n";
    let err = gw
        .reload(&cfg(plugins, routes, &[("up", up.addr)]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("plugins[rl]"), "{err}");
    assert_eq!(
        get(addr, "x", "/", &[]).await.status,
        200,
        "the previous configuration keeps serving"
    );
}

/// The first `/metrics` line that starts with `prefix`, contains every `needle` and ends with
/// ` value` (any value when `value` is empty), polling for a while: `on_log` runs when the
/// response body is done, which may be just after the client read it.
async fn metric_line(admin: SocketAddr, prefix: &str, needles: &[&str], value: &str) -> String {
    let suffix = format!(" {value}");
    let mut last = String::new();
    for _ in 0..50 {
        last = admin_get(admin, "/metrics").await.body;
        let found = last.lines().find(|l| {
            l.starts_with(prefix)
                && needles.iter().all(|n| l.contains(n))
                && (value.is_empty() || l.ends_with(&suffix))
        });
        if let Some(line) = found {
            return line.to_string();
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    panic!("no `{prefix}` line with {needles:?} and value {value} in:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_requests_by_code_with_istio_labels() {
    stats_through_the_gateway("gw-stats-test", false).await;
}

/// The same with `portable` plugins: `stats` reads its properties one `proxy_get_property` at a
/// time and `ratelimit` keeps its buckets in shared data, as in Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_the_same_with_portable_plugins() {
    stats_through_the_gateway("gw-stats-portable", true).await;
}

/// Requests answered 200, 404, 429 (by `ratelimit`) and 503 (no upstream) through `stats`
/// reporting as `workload`; check the series on `/metrics`.
async fn stats_through_the_gateway(workload: &str, portable: bool) {
    let ok = upstream("shop", Behavior::default()).await;
    let missing = upstream(
        "gone",
        Behavior {
            status: Some(404),
            ..Behavior::default()
        },
    )
    .await;
    // stats before ratelimit: it also sees the ratelimit's local replies.
    let plugins = format!(
        "  - name: st\n    module: builtin:stats\n    portable: {portable}\n    config: {{ source: {{ workload: {workload}, namespace: edge }} }}\n  - {{ name: rl, module: builtin:ratelimit, portable: {portable}, config: {{ requests: 1, per: 1m }} }}\n"
    );
    // An endpoint nobody listens on: the connection fails (Envoy's UF flag).
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let routes = "  - { name: gone, match: { path: { prefix: /gone } }, filters: [st], backends: [ { cluster: gone } ] }\n  - { name: down, match: { path: { prefix: /down } }, filters: [st], backends: [ { cluster: down } ] }\n  - { name: limited, match: { path: { prefix: /limited } }, filters: [st, rl], backends: [ { cluster: shop } ] }\n  - { name: shop, filters: [st], backends: [ { cluster: shop } ] }\n";
    let gw = gateway(&cfg(
        &plugins,
        routes,
        &[("shop", ok.addr), ("gone", missing.addr), ("down", down)],
    ))
    .await;
    let addr = gw.addr("main").await;
    for _ in 0..3 {
        assert_eq!(
            get(addr, "shop.example:8080", "/buy", &[]).await.status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(get(addr, "shop.example", "/gone", &[]).await.status, 404);
    }
    assert_eq!(get(addr, "shop.example", "/limited", &[]).await.status, 200);
    assert_eq!(get(addr, "shop.example", "/limited", &[]).await.status, 429);
    assert_eq!(get(addr, "shop.example", "/down", &[]).await.status, 503);

    let admin = gw.admin();
    let me = format!("source_workload=\"{workload}\"");
    let me = me.as_str();
    let shop = "destination_service_name=\"shop\"";
    let line = metric_line(
        admin,
        "istio_requests_total{",
        &[me, "response_code=\"200\"", shop],
        "4",
    )
    .await;
    for label in [
        "reporter=\"source\"",
        "source_workload_namespace=\"edge\"",
        &format!("source_canonical_service=\"{workload}\""),
        "destination_service=\"shop.example\"",
        "destination_workload=\"unknown\"",
        "request_protocol=\"http\"",
        "response_flags=\"-\"",
        "grpc_response_status=\"\"",
        "connection_security_policy=\"unknown\"",
    ] {
        assert!(line.contains(label), "{label} in {line}");
    }
    for (prefix, needles, value) in [
        (
            "istio_requests_total{",
            vec!["response_code=\"404\"", "destination_service_name=\"gone\""],
            "2",
        ),
        ("istio_requests_total{", vec!["response_code=\"429\""], "1"),
        // The filter reads the gateway's response flags (`response.flags`).
        (
            "istio_requests_total{",
            vec!["response_code=\"503\"", "response_flags=\"UF"],
            "1",
        ),
        // Histograms: every request in +Inf, the count, and sizes that are never tiny.
        (
            "istio_request_duration_milliseconds_bucket{",
            vec!["response_code=\"404\"", "le=\"+Inf\""],
            "2",
        ),
        (
            "istio_request_duration_milliseconds_count{",
            vec!["response_code=\"404\""],
            "2",
        ),
        (
            "istio_response_bytes_bucket{",
            vec!["response_code=\"200\"", shop, "le=\"10\""],
            "0",
        ),
        (
            "istio_response_bytes_bucket{",
            vec!["response_code=\"200\"", shop, "le=\"+Inf\""],
            "4",
        ),
        (
            "istio_request_bytes_count{",
            vec!["response_code=\"429\""],
            "1",
        ),
    ] {
        metric_line(admin, prefix, &[vec![me], needles].concat(), value).await;
    }
    let text = admin_get(admin, "/metrics").await.body;
    assert_eq!(
        text.matches("# TYPE istio_requests_total counter").count(),
        1
    );
    assert_eq!(
        text.matches("# TYPE istio_request_duration_milliseconds histogram")
            .count(),
        1
    );
    let sum: u64 = metric_line(
        admin,
        "istio_response_bytes_sum{",
        &[me, "response_code=\"404\""],
        "",
    )
    .await
    .rsplit(' ')
    .next()
    .unwrap()
    .parse()
    .unwrap();
    assert!(sum > 100, "two JSON echo bodies and their headers: {sum}");
}
