//! proxy-wasm filters on the request path: real guests compiled to wasm32-wasip1, run through
//! the gateway in front of a real upstream.

use crate::support::*;

fn cfg(plugins: &str, routes: &str, up: std::net::SocketAddr, listener_filters: &str) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:0{listener_filters} }}\nplugins:\n{plugins}routes:\n{routes}clusters:\n  - {{ name: up, endpoints: [ {{ address: \"{up}\" }} ] }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_pseudo_headers_properties_and_local_replies() {
    let up = upstream("up", Behavior::default()).await;
    let http = guest("http");
    let plugins = format!(
        "  - {{ name: h, module: \"{}\", vm_id: v1, config: \"plain\", vm_config: {{ color: red }} }}\n",
        http.display()
    );
    let routes = "  - { name: r, filters: [h], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;

    let r = get(addr, "svc.example", "/hello?x=1", &[("x-remove-me", "1")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let h = &j["headers"];
    assert_eq!(h["x-seen-method"], "GET");
    assert_eq!(h["x-seen-authority"], "svc.example");
    assert_eq!(h["x-seen-scheme"], "http");
    assert_eq!(h["x-config"], "plain");
    assert_eq!(
        h["x-vm-config"], "{\"color\":\"red\"}",
        "YAML values arrive as JSON"
    );
    assert!(h["x-remove-me"].is_null());
    assert_eq!(h["x-eos"], "true");
    // Response callbacks and properties.
    assert_eq!(r.headers["x-resp"], "1");
    assert_eq!(r.headers["x-prop-path"], "/hello?x=1");
    assert_eq!(r.headers["x-prop-url-path"], "/hello");
    assert_eq!(r.headers["x-prop-method"], "GET");
    assert_eq!(r.headers["x-prop-plugin"], "h");
    assert_eq!(r.headers["x-prop-vm"], "v1");
    assert_eq!(r.headers["x-prop-route"], "r");
    assert!(
        r.headers["x-prop-source"]
            .to_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "Envoy's source.address is IP:port"
    );
    assert_eq!(r.headers["x-prop-code"], "200");
    assert_eq!(r.headers["x-prop-color"], "blue", "set_property round trip");
    assert!(!r.headers.contains_key("server"));

    // A local reply from the request headers; the filter's response callbacks run on it.
    let r = get(addr, "svc.example", "/deny", &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body, "denied");
    assert_eq!(r.headers["x-deny"], "yes");
    assert_eq!(r.headers["x-resp"], "1");
    assert_eq!(up.hits(), 1, "the denied request never went upstream");

    // Filter-defined metrics and host stats on /metrics.
    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(m.contains("weir_wasm_callbacks_total{plugin=\"h\"}"), "{m}");
    assert!(m.contains("guest_http_requests"), "{m}");
}

/// The filter path reuses its per-request objects (stream contexts, heads, stream facts) from
/// one request to the next on a worker: nothing of a request may show through in the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_sees_only_its_own_head_and_properties() {
    let up = upstream("up", Behavior::default()).await;
    let plugins = format!(
        "  - {{ name: h, module: \"{}\", vm_id: v1 }}\n",
        guest("http").display()
    );
    let routes = "  - { name: ra, match: { path: { prefix: /a } }, filters: [h], backends: [ { cluster: up } ] }\n  \
                  - { name: rb, filters: [h], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;
    // One client: the requests share keep-alive connections, so they run on the same workers
    // one after the other.
    let c = client();
    for i in 0..40 {
        let (path, route) = if i % 2 == 0 {
            (format!("/a/{i}?q={i}"), "ra")
        } else {
            (format!("/b/{}", "x".repeat(i)), "rb")
        };
        let host = format!("h{i}.example");
        let id = format!("id-{i}");
        let mut b = http::Request::get(format!("http://{addr}{path}")).header("host", &host);
        // Every third request has a referer and an id of its own; the others have neither.
        if i % 3 == 0 {
            b = b.header("referer", format!("https://from/{i}"));
            b = b.header("x-request-id", &id);
        }
        let r = send(&c, b.body(Default::default()).unwrap()).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        let seen = |k: &str| r.headers[k].to_str().unwrap().to_string();
        assert_eq!(seen("x-prop-path"), path, "request {i}");
        assert_eq!(seen("x-prop-host"), host, "request {i}");
        assert_eq!(seen("x-prop-route"), route, "request {i}");
        assert_eq!(r.json()["headers"]["x-seen-authority"], host.as_str());
        if i % 3 == 0 {
            assert_eq!(
                seen("x-prop-referer"),
                format!("https://from/{i}"),
                "request {i}"
            );
            assert_eq!(seen("x-prop-id"), id, "request {i}");
        } else {
            assert_eq!(seen("x-prop-referer"), "none", "request {i}");
            let generated = seen("x-prop-id");
            assert!(!generated.starts_with("id-"), "request {i}: {generated}");
        }
    }
}

/// `portable: true` runs a filter as Envoy would: Weir's foreign functions answer `NOT_FOUND`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portable_plugin_gets_no_weir_foreign_functions() {
    let up = upstream("up", Behavior::default()).await;
    let http = guest("http").display().to_string();
    let plugins = format!(
        "  - {{ name: portable, module: \"{http}\", portable: true }}\n  - {{ name: native, module: \"{http}\" }}\n"
    );
    let routes = "  - { name: p, match: { path: { prefix: /p } }, filters: [portable], backends: [ { cluster: up } ] }\n  - { name: n, filters: [native], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;
    let props = |r: Reply| r.json()["headers"]["x-properties"].clone();
    let r = get(addr, "x", "/p", &[("x-get-properties", "1")]).await;
    assert_eq!(props(r), "NotFound");
    let r = get(addr, "x", "/n", &[("x-get-properties", "1")]).await;
    assert_eq!(props(r), "/n|<none>|native");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_rewrite_by_a_filter_routes_again() {
    let up = upstream("up", Behavior::default()).await;
    let http = guest("http");
    let plugins = format!("  - {{ name: h, module: \"{}\" }}\n", http.display());
    let routes = "  - { name: old, match: { path: { prefix: /rewrite } }, direct_response: { status: 500, body: stale route } }\n  - { name: new, match: { path: { exact: /rewritten } }, backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, ", filters: [h]")).await;
    let r = get(gw.addr("main").await, "x", "/rewrite-me", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["uri"], "/rewritten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_are_buffered_and_replaced() {
    let up = upstream("up", Behavior::default()).await;
    let http = guest("http");
    let plugins = format!(
        "  - {{ name: h, module: \"{}\", config: \"buffer,buffer-resp\" }}\n",
        http.display()
    );
    let routes = "  - { name: r, filters: [h], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;
    let req = http::Request::post(format!("http://{addr}/echo"))
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::from("hello body")))
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.ends_with("-tail"),
        "response body replaced: {}",
        r.body
    );
    let j: serde_json::Value = serde_json::from_str(r.body.trim_end_matches("-tail")).unwrap();
    assert_eq!(j["body"], "HELLO BODY!10", "request body replaced");
    // The whole body went through the filter at once: its new length is announced.
    assert_length_announced(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_holding_the_response_headers_gets_the_body_whole() {
    let up = upstream("up", Behavior::default()).await;
    let plugins = format!(
        "  - {{ name: h, module: \"{}\", config: \"hold-resp\" }}\n",
        guest("http").display()
    );
    let routes = "  - { name: r, filters: [h], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let r = get(gw.addr("main").await, "x", "/held", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("x-resp").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(r.json()["uri"], "/held", "the body went through whole");
    assert_length_announced(&r);
}

/// The response came with a `content-length` of its body's length, not chunked.
fn assert_length_announced(r: &Reply) {
    assert_eq!(
        r.headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(r.body.len().to_string().as_str()),
        "{:?}",
        r.headers
    );
    assert!(r.headers.get("transfer-encoding").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_responses_keep_their_length_or_stream() {
    let up = upstream("up", Behavior::default()).await;
    let plugins = "  - { name: n, module: \"builtin:noop\" }\n";
    let routes = "  - { name: r, filters: [n], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;

    // A body that arrives whole keeps its content-length, as in Envoy.
    let r = get(addr, "x", "/echo", &[]).await;
    assert_eq!(r.status, 200);
    assert_length_announced(&r);

    // A body the upstream sends in pieces (the first with the headers, or after them) streams
    // through the filter, every byte intact.
    for first_with_headers in [true, false] {
        let slow = trickling_upstream(first_with_headers).await;
        let gw = gateway(&cfg(plugins, routes, slow, "")).await;
        let r = get(gw.addr("main").await, "x", "/", &[]).await;
        assert_eq!(r.status, 200);
        let expected: String = (0..5u8)
            .map(|i| char::from(b'a' + i).to_string().repeat(1000))
            .collect();
        assert!(
            r.body == expected,
            "{} bytes: {:?}",
            r.body.len(),
            r.headers
        );
        // It keeps the upstream's content-length, as in Envoy, however it arrived.
        assert_length_announced(&r);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_body_keeps_its_content_length_unless_a_filter_drops_it() {
    // Responses: a body that streams through a filter that changes its length.
    let plugins = format!(
        "  - {{ name: drops, module: \"{g}\", config: buffer-resp }}\n  - {{ name: keeps, module: \"{g}\", vm_id: k, config: \"buffer-resp,keep-length\" }}\n",
        g = guest("http").display()
    );
    let routes = "  - { name: drops, match: { path: { prefix: /drops } }, filters: [drops], backends: [ { cluster: up } ] }\n  - { name: keeps, match: { path: { prefix: /keeps } }, filters: [keeps], backends: [ { cluster: up } ] }\n";
    let slow = trickling_upstream(true).await;
    let gw = gateway(&cfg(&plugins, routes, slow, "")).await;
    let addr = gw.addr("main").await;
    // The filter drops the content-length: the longer body goes out chunked.
    let r = get(addr, "x", "/drops", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 5005, "{:?}", r.headers);
    assert!(r.body.ends_with("e-tail"));
    assert!(r.headers.get("content-length").is_none(), "{:?}", r.headers);
    // The filter keeps it: the response is cut off rather than sent longer than it says.
    let req = http::Request::get(format!("http://{addr}/keeps"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.headers()["content-length"], "5000");
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(
        body.is_err(),
        "a body longer than its content-length went out"
    );

    // Requests: the body comes in two pieces, so it streams through the filters.
    let up = upstream("up", Behavior::default()).await;
    let plugins = format!(
        "  - {{ name: n, module: \"builtin:noop\" }}\n  - {{ name: drops, module: \"{g}\", config: buffer }}\n  - {{ name: keeps, module: \"{g}\", vm_id: k, config: \"buffer,keep-length\" }}\n  - {{ name: empties, module: \"{g}\", vm_id: e, config: empty-body }}\n",
        g = guest("http").display()
    );
    let routes = "  - { name: noop, match: { path: { prefix: /noop } }, filters: [n], backends: [ { cluster: up } ] }\n  - { name: drops, match: { path: { prefix: /drops } }, filters: [drops], backends: [ { cluster: up } ] }\n  - { name: keeps, match: { path: { prefix: /keeps } }, filters: [keeps], backends: [ { cluster: up } ] }\n  - { name: empties, match: { path: { exact: /pause } }, filters: [empties], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;
    // Through a filter that leaves the body alone, the upstream gets the content-length.
    let (status, body) = post_in_pieces(addr, "/noop", ["hello", " body"]).await;
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["body"], "hello body");
    assert_eq!(j["headers"]["content-length"], "10", "{j}");
    assert!(j["headers"].get("transfer-encoding").is_none(), "{j}");
    // A filter that changes the length and drops the header: chunked, whole.
    let (status, body) = post_in_pieces(addr, "/drops", ["hello", " body"]).await;
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["body"], "HELLO BODY!10");
    assert_eq!(j["headers"]["transfer-encoding"], "chunked", "{j}");
    // One that keeps it: the request is cut off rather than sent longer than it says (the
    // upstream, given the first 10 bytes, would have answered 200).
    let (status, body) = post_in_pieces(addr, "/keeps", ["hello", " body"]).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body, "filter changed the request body's length\n");
    // A filter that holds the headers has the body whole: it goes on with the length the
    // filter left, even none.
    let (status, body) = post_in_pieces(addr, "/pause", ["hello", " body"]).await;
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["body"], "");
    assert_eq!(j["headers"]["content-length"], "0", "{j}");
}

/// POST `pieces` to `path` with a `content-length` of their total length, 50 ms apart, on a
/// connection of its own; the status and body of the response (read to the connection's end).
async fn post_in_pieces(
    addr: std::net::SocketAddr,
    path: &str,
    pieces: [&str; 2],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for p in pieces {
        s.write_all(p.as_bytes()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("response timed out")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// An HTTP/1.1 upstream that answers every request with `content-length: 5000` and sends the
/// body in five pieces of 1,000 bytes ('a's, then 'b's...), 20 ms apart; the first piece goes
/// out with the headers or 20 ms after them.
async fn trickling_upstream(first_with_headers: bool) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n".to_vec();
                for i in 0..5u8 {
                    if i > 0 || !first_with_headers {
                        if conn.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    out.extend(std::iter::repeat_n(b'a' + i, 1000));
                }
                let _ = conn.write_all(&out).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_and_per_host_configuration_overrides() {
    let up = upstream("up", Behavior::default()).await;
    let http = guest("http");
    let plugins = format!(
        "  - name: h\n    module: \"{}\"\n    config: default\n    match_rules:\n      - {{ routes: [special], config: for-route }}\n      - {{ hosts: [\"*.tenant.example\"], config: for-host }}\n",
        http.display()
    );
    let routes = "  - { name: special, match: { path: { prefix: /special } }, filters: [h], backends: [ { cluster: up } ] }\n  - { name: inline, match: { path: { prefix: /inline } }, filters: [ { plugin: h, config: inline-config } ], backends: [ { cluster: up } ] }\n  - { name: plain, filters: [h], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;
    let seen = |r: Reply| r.seen_header("x-config").unwrap_or_default();
    assert_eq!(seen(get(addr, "x", "/", &[]).await), "default");
    assert_eq!(seen(get(addr, "x", "/special", &[]).await), "for-route");
    assert_eq!(
        seen(get(addr, "a.tenant.example", "/", &[]).await),
        "for-host"
    );
    assert_eq!(seen(get(addr, "x", "/inline", &[]).await), "inline-config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limiter_is_a_foreign_function() {
    let up = upstream("up", Behavior::default()).await;
    let http = guest("http");
    let plugins = format!(
        "  - {{ name: h, module: \"{}\", rate_limit: {{ requests: 2, per: 1m }} }}\n",
        http.display()
    );
    let routes = "  - { name: r, filters: [h], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;
    for _ in 0..2 {
        assert_eq!(
            get(addr, "x", "/", &[("x-ratelimit-key", "alice")])
                .await
                .status,
            200
        );
    }
    let r = get(addr, "x", "/", &[("x-ratelimit-key", "alice")]).await;
    assert_eq!(r.status, 429);
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "{after}");
    assert_eq!(
        get(addr, "x", "/", &[("x-ratelimit-key", "bob")])
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_policies_closed_open_reload() {
    let up = upstream("up", Behavior::default()).await;
    let bad = guest("bad");
    let plugins = format!(
        "  - {{ name: closed, module: \"{b}\", fail: closed }}\n  - {{ name: open, module: \"{b}\", vm_id: open, fail: open }}\n  - {{ name: reload, module: \"{b}\", vm_id: reload, fail: reload }}\n",
        b = bad.display()
    );
    let routes = "  - { name: closed, match: { path: { prefix: /closed } }, filters: [closed], backends: [ { cluster: up } ] }\n  - { name: open, match: { path: { prefix: /open } }, filters: [open], backends: [ { cluster: up } ] }\n  - { name: reload, match: { path: { prefix: /reload } }, filters: [reload], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;
    let r = get(addr, "x", "/closed", &[("x-trap", "1")]).await;
    assert_eq!(r.status, 503, "fail closed");
    assert_eq!(
        get(addr, "x", "/open", &[("x-trap", "1")]).await.status,
        200,
        "fail open skips the filter"
    );
    assert_eq!(
        get(addr, "x", "/reload", &[("x-trap", "1")]).await.status,
        503,
        "fail reload answers 503"
    );
    assert_eq!(
        get(addr, "x", "/reload", &[]).await.status,
        200,
        "and the VM is back at once"
    );
    // A filter that loops forever is stopped at its deadline; the gateway keeps serving.
    assert_eq!(
        get(addr, "x", "/closed", &[("x-loop", "1")]).await.status,
        503
    );
    assert_eq!(
        get(addr, "x", "/open", &[("x-grow", "1")]).await.status,
        200
    );
    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(
        m.contains("weir_wasm_traps_total{plugin=\"closed\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("weir_wasm_interruptions_total{plugin=\"closed\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_rejects_its_configuration_fails_the_config() {
    let up = upstream("up", Behavior::default()).await;
    let http = guest("http");
    let good = format!(
        "  - {{ name: h, module: \"{}\", config: ok }}\n",
        http.display()
    );
    let routes = "  - { name: r, filters: [h], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&good, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;
    let err = gw
        .reload(&cfg(
            &good.replace("config: ok", "config: reject"),
            routes,
            up.addr,
            "",
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(":6:") && err.to_string().contains("plugins[h]"),
        "{err}"
    );
    assert_eq!(
        get(addr, "x", "/", &[])
            .await
            .seen_header("x-config")
            .as_deref(),
        Some("ok"),
        "the old plugin keeps serving"
    );
    let err = gw
        .reload(&cfg(
            &good.replace(&http.display().to_string(), "/nonexistent.wasm"),
            routes,
            up.addr,
            "",
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot read module `/nonexistent.wasm`"),
        "{err}"
    );
    let err = gw
        .reload(&cfg(&good, &routes.replace("[h]", "[nope]"), up.addr, ""))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown plugin `nope`"), "{err}");

    // `weir validate` starts the plugins too, so it catches the rejection before a deploy.
    let dir = tempfile::tempdir().unwrap();
    let validate = |text: String| {
        let file = dir.path().join("weir.yaml");
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("validate")
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = validate(cfg(&good, routes, up.addr, ""));
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = validate(cfg(
        &good.replace("config: ok", "config: reject"),
        routes,
        up.addr,
        "",
    ));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("weir.yaml:6:") && stderr.contains("plugins[h]"),
        "{stderr}"
    );
}

#[test]
fn filter_check_reports_abi_and_portability() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["filter", "check"])
        .arg(guest("http"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0.2.1"), "{text}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "a proxy-wasm Rust SDK filter runs on Weir and Envoy: {text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["filter", "check"])
        .arg(&junk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_filters_are_embedded() {
    let up = upstream("up", Behavior::default()).await;
    let plugins = "  - { name: n, module: \"builtin:noop\" }\n";
    let routes = "  - { name: r, filters: [n], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(plugins, routes, up.addr, "")).await;
    assert_eq!(get(gw.addr("main").await, "x", "/", &[]).await.status, 200);
    let err = gw
        .reload(&cfg(
            &plugins.replace("builtin:noop", "builtin:nope"),
            routes,
            up.addr,
            "",
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown built-in filter `nope`: built-in filters are jwt-authn, noop,"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_updates_under_load_fail_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let up = upstream("up", Behavior::default()).await;
    let http = guest("http");
    let bad = guest("bad");
    let make = |n: usize| {
        // Alternate the module too: a changed module takes effect for new requests.
        let module = if n.is_multiple_of(2) { &http } else { &bad };
        // A generous deadline: this test is about updates, and debug builds on a busy CI machine
        // are slow.
        let plugins = format!(
            "  - {{ name: p, module: \"{}\", config: \"v{n}\", limits: {{ cpu_deadline: 5s }} }}\n",
            module.display()
        );
        cfg(
            &plugins,
            "  - { name: r, filters: [p], backends: [ { cluster: up } ] }\n",
            up.addr,
            "",
        )
    };
    let gw = gateway(&make(0)).await;
    let addr = gw.addr("main").await;
    // One sample of a gauge from /metrics.
    let gauge = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    };
    assert_eq!(get(addr, "x", "/", &[]).await.status, 200);
    let before = admin_get(gw.admin(), "/metrics").await.body;
    let vms_before = gauge(&before, "weir_wasm_vms");
    let memory_before = gauge(&before, "weir_wasm_vms_memory_bytes");
    assert!(vms_before >= 1 && memory_before > 0, "{before}");
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let r = send(
                    &c,
                    http::Request::get(format!("http://{addr}/"))
                        .header("host", "x")
                        .body(Default::default())
                        .unwrap(),
                )
                .await;
                if r.status == 200 {
                    ok += 1
                } else {
                    failed.push(r.status)
                }
            }
            (ok, failed)
        }));
    }
    for n in 1..=10 {
        gw.reload(&make(n)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during plugin updates: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 10);
    // The last config is in force.
    let r = get(addr, "x", "/", &[]).await;
    assert_eq!(r.seen_header("x-config").as_deref(), Some("v10"));
    // The old VMs were freed once their requests were done: the VMs alive are the current
    // plugin's, and so is all the linear memory.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let m = admin_get(gw.admin(), "/metrics").await.body;
        let (vms, memory) = (
            gauge(&m, "weir_wasm_vms"),
            gauge(&m, "weir_wasm_vms_memory_bytes"),
        );
        let plugin_memory = gauge(&m, "weir_wasm_memory_bytes{plugin=\"p\"}");
        if vms == vms_before && memory == plugin_memory {
            eprintln!(
                "after 10 module/config updates under load: {vms} VMs, {memory} bytes of linear \
                 memory (before: {vms_before} VMs, {memory_before} bytes)"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "old VMs not freed: {vms} VMs alive ({vms_before} before), {memory} bytes of \
             linear memory, the plugin's {plugin_memory}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_callouts_go_to_configured_clusters() {
    let up = upstream("up", Behavior::default()).await;
    let allow = upstream("auth-ok", Behavior::default()).await;
    let deny = upstream(
        "auth-no",
        Behavior {
            status: Some(401),
            ..Default::default()
        },
    )
    .await;
    let callout = guest("callout");
    let config = |auth: std::net::SocketAddr| {
        format!(
            "admin: {{ address: 127.0.0.1:0 }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:0 }}\nplugins:\n  - {{ name: c, module: \"{}\" }}\nroutes:\n  - {{ name: r, filters: [c], backends: [ {{ cluster: up }} ] }}\nclusters:\n  - {{ name: up, endpoints: [ {{ address: \"{}\" }} ] }}\n  - {{ name: auth, endpoints: [ {{ address: \"{auth}\" }} ] }}\n",
            callout.display(),
            up.addr
        )
    };
    let gw = gateway(&config(allow.addr)).await;
    let addr = gw.addr("main").await;
    let r = get(addr, "x", "/anything", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let auth: serde_json::Value = serde_json::from_str(&r.seen_header("x-auth").unwrap()).unwrap();
    assert_eq!(
        auth["uri"], "/check",
        "the callout reached the auth cluster"
    );
    assert_eq!(auth["headers"]["host"], "auth");
    assert_eq!(allow.hits(), 1);
    // A cluster that is not configured answers BAD_ARGUMENT to the filter at call time.
    let r = get(addr, "x", "/bad-cluster", &[]).await;
    assert_eq!(
        r.seen_header("x-bad-cluster").as_deref(),
        Some("bad-argument")
    );
    // The auth service says no: the filter answers 403 itself.
    gw.reload(&config(deny.addr)).await.unwrap();
    assert_eq!(get(addr, "x", "/anything", &[]).await.status, 403);
    assert_eq!(
        up.hits(),
        2,
        "the denied request did not reach the upstream"
    );
}

/// A one-file HTTPS server on 127.0.0.1 (certificate for `localhost`); returns its port and
/// the certificate PEM.
async fn https_file_server(dir: &std::path::Path, body: Vec<u8>) -> (u16, String) {
    use rustls_pki_types::pem::PemObject;
    let (cert, key, pem) = cert_files(dir, "files", &["localhost"]);
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = bytes::Bytes::from(body);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(body),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_modules_are_pinned_by_sha256_and_cached() {
    let up = upstream("up", Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(guest("http")).unwrap();
    let sha = weir::filter::module::sha256_hex(&wasm);
    let (port, pem) = https_file_server(dir.path(), wasm).await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let cache = dir.path().join("cache");
    let config = |sha: &str| {
        format!(
            "admin: {{ address: 127.0.0.1:0 }}\nserver: {{ watch: false, cache_dir: \"{}\", module_ca: \"{}\" }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:0 }}\nplugins:\n  - {{ name: h, module: \"https://localhost:{port}/filters/http.wasm\", sha256: \"{sha}\", config: remote }}\nroutes:\n  - {{ name: r, filters: [h], backends: [ {{ cluster: up }} ] }}\nclusters:\n  - {{ name: up, endpoints: [ {{ address: \"{}\" }} ] }}\n",
            cache.display(),
            ca.display(),
            up.addr
        )
    };
    let gw = gateway(&config(&sha)).await;
    let r = get(gw.addr("main").await, "x", "/", &[]).await;
    assert_eq!(r.seen_header("x-config").as_deref(), Some("remote"));
    assert!(
        cache.join("modules").join(format!("{sha}.wasm")).exists(),
        "the download is cached"
    );
    let wrong = "0".repeat(64);
    let err = gw.reload(&config(&wrong)).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("has sha256 {sha}, expected {wrong}")),
        "{err}"
    );
    let err = gw
        .reload(&config(&sha).replace(&format!(", sha256: \"{sha}\""), ""))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs `sha256`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_with_one_vm_id_share_data() {
    let up = upstream("up", Behavior::default()).await;
    let m = guest("http");
    let plugins = format!(
        "  - {{ name: a, module: \"{m}\", vm_id: shared }}\n  - {{ name: b, module: \"{m}\", vm_id: shared, config: b }}\n  - {{ name: c, module: \"{m}\", vm_id: own }}\n",
        m = m.display()
    );
    let routes = "  - { name: ra, match: { path: { prefix: /a } }, filters: [a], backends: [ { cluster: up } ] }\n  - { name: rb, match: { path: { prefix: /b } }, filters: [b], backends: [ { cluster: up } ] }\n  - { name: rc, filters: [c], backends: [ { cluster: up } ] }\n";
    let gw = gateway(&cfg(&plugins, routes, up.addr, "")).await;
    let addr = gw.addr("main").await;
    let hits = |r: Reply| r.seen_header("x-hits").unwrap().parse::<u64>().unwrap();
    let a1 = hits(get(addr, "x", "/a", &[]).await);
    let b1 = hits(get(addr, "x", "/b", &[]).await);
    assert_eq!(
        b1,
        a1 + 1,
        "a and b share the vm_id `shared` and its shared data"
    );
    let c1 = hits(get(addr, "x", "/c", &[]).await);
    assert_eq!(c1, 1, "another vm_id has its own shared data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_streams_grpc_to_an_h2_cluster() {
    let up = upstream("up", Behavior::default()).await;
    let echo = crate::streams::grpc_echo().await;
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:0 }}\nplugins:\n  - {{ name: g, module: \"{}\" }}\nroutes:\n  - {{ name: r, filters: [g], backends: [ {{ cluster: up }} ] }}\nclusters:\n  - {{ name: up, endpoints: [ {{ address: \"{}\" }} ] }}\n  - {{ name: echo, protocol: http2, endpoints: [ {{ address: \"{echo}\" }} ] }}\n",
        guest("grpcstream").display(),
        up.addr
    );
    let gw = gateway(&yaml).await;
    let addr = gw.addr("main").await;
    // The filter opens a stream to `echo`, sends three messages, half-closes, and answers
    // with what came back once the stream closed.
    let r = get(addr, "x", "/chat", &[("x-messages", "a,b,c")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let h = |name: &str| r.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        h("x-events").as_deref(),
        Some("init,msg,msg,msg,trail,close")
    );
    assert_eq!(h("x-received").as_deref(), Some("a|b|c"));
    assert_eq!(h("x-close-status").as_deref(), Some("0"));
    let trailers = h("x-trailers").unwrap();
    assert!(trailers.contains("x-messages=3"), "{trailers}");
    assert!(h("x-initial").unwrap().contains(":status=200"));
    assert_eq!(up.hits(), 0, "the filter answered itself");
    // A cluster without HTTP/2 cannot carry a stream: the filter learns it at open time.
    let r = get(addr, "x", "/chat", &[("x-cluster", "up")]).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.headers.get("x-open-error").unwrap(), "internal-failure");
    // An unknown cluster and an unknown token, as Envoy answers them.
    let r = get(addr, "x", "/errors", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.seen_header("x-unknown-cluster").as_deref(),
        Some("parse-failure")
    );
    assert_eq!(
        r.seen_header("x-unknown-send").as_deref(),
        Some("not-found")
    );
}
