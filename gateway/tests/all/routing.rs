//! Routing: every match kind, hosts, weights, subsets, redirects, direct responses, rewrites,
//! header edits, and the 404 for no route.

use crate::support::*;

fn cluster(name: &str, addr: std::net::SocketAddr) -> String {
    format!("  - {{ name: {name}, endpoints: [ {{ address: \"{addr}\" }} ] }}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_kinds_pick_the_first_matching_route() {
    let a = upstream("a", Behavior::default()).await;
    let b = upstream("b", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - name: exact
    match: {{ path: {{ exact: /exact }} }}
    backends: [ {{ cluster: a }} ]
  - name: regex
    match: {{ path: {{ regex: \"/users/[0-9]+\" }} }}
    backends: [ {{ cluster: b }} ]
  - name: header-exact
    match: {{ path: {{ prefix: /h }}, headers: [ {{ name: x-env, exact: canary }} ] }}
    backends: [ {{ cluster: b }} ]
  - name: header-prefix
    match: {{ path: {{ prefix: /h }}, headers: [ {{ name: X-Tier, prefix: gold }} ] }}
    backends: [ {{ cluster: b }} ]
  - name: header-regex
    match: {{ path: {{ prefix: /h }}, headers: [ {{ name: x-id, regex: \"[a-f]+\" }} ] }}
    backends: [ {{ cluster: b }} ]
  - name: header-present
    match: {{ path: {{ prefix: /h }}, headers: [ {{ name: x-debug }} ] }}
    backends: [ {{ cluster: b }} ]
  - name: header-absent
    match: {{ path: {{ prefix: /h }}, headers: [ {{ name: x-skip, present: false }} ] }}
    backends: [ {{ cluster: a }} ]
  - name: query
    match: {{ path: {{ prefix: /q }}, query: [ {{ name: v, exact: \"2\" }} ] }}
    backends: [ {{ cluster: b }} ]
  - name: method
    match: {{ path: {{ prefix: /q }}, methods: [POST] }}
    backends: [ {{ cluster: b }} ]
  - name: prefix
    match: {{ path: {{ prefix: /q }} }}
    backends: [ {{ cluster: a }} ]
clusters:
{}{}",
        base(),
        cluster("a", a.addr),
        cluster("b", b.addr)
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    let up = |r: Reply| r.upstream();
    assert_eq!(up(get(addr, "x", "/exact", &[]).await), "a");
    assert_eq!(get(addr, "x", "/exact/more", &[]).await.status, 404);
    assert_eq!(up(get(addr, "x", "/users/42", &[]).await), "b");
    assert_eq!(get(addr, "x", "/users/42/x", &[]).await.status, 404);
    assert_eq!(up(get(addr, "x", "/h", &[("x-env", "canary")]).await), "b");
    assert_eq!(
        up(get(addr, "x", "/h", &[("x-tier", "gold-plus")]).await),
        "b"
    );
    assert_eq!(up(get(addr, "x", "/h", &[("x-id", "abc")]).await), "b");
    assert_eq!(up(get(addr, "x", "/h", &[("x-debug", "")]).await), "b");
    assert_eq!(up(get(addr, "x", "/h", &[("x-id", "xyz")]).await), "a");
    assert_eq!(get(addr, "x", "/h", &[("x-skip", "1")]).await.status, 404);
    assert_eq!(up(get(addr, "x", "/q?v=2", &[]).await), "b");
    assert_eq!(up(get(addr, "x", "/q?v=3", &[]).await), "a");
    let post = http::Request::post(format!("http://{addr}/q"))
        .header("host", "x")
        .body(Default::default())
        .unwrap();
    assert_eq!(send(&client(), post).await.upstream(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_pick_exact_then_longest_wildcard_then_any() {
    let a = upstream("a", Behavior::default()).await;
    let b = upstream("b", Behavior::default()).await;
    let c = upstream("c", Behavior::default()).await;
    let d = upstream("d", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - {{ name: any, hosts: [\"*\"], backends: [ {{ cluster: a }} ] }}
  - {{ name: wild, hosts: [\"*.example.com\"], backends: [ {{ cluster: b }} ] }}
  - {{ name: wild2, hosts: [\"*.api.example.com\"], backends: [ {{ cluster: d }} ] }}
  - {{ name: exact, hosts: [\"www.example.com\"], match: {{ path: {{ prefix: /only }} }}, backends: [ {{ cluster: c }} ] }}
clusters:
{}{}{}{}",
        base(),
        cluster("a", a.addr),
        cluster("b", b.addr),
        cluster("c", c.addr),
        cluster("d", d.addr)
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    assert_eq!(get(addr, "other.org", "/", &[]).await.upstream(), "a");
    assert_eq!(
        get(addr, "shop.example.com", "/", &[]).await.upstream(),
        "b"
    );
    assert_eq!(
        get(addr, "SHOP.Example.com:8080", "/", &[])
            .await
            .upstream(),
        "b"
    );
    assert_eq!(
        get(addr, "v1.api.example.com", "/", &[]).await.upstream(),
        "d"
    );
    assert_eq!(get(addr, "example.com", "/", &[]).await.upstream(), "a");
    assert_eq!(
        get(addr, "www.example.com", "/only/x", &[])
            .await
            .upstream(),
        "c"
    );
    // The exact host group wins even when none of its routes match: 404 like Envoy.
    let r = get(addr, "www.example.com", "/", &[]).await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_traffic_90_10() {
    let v1 = upstream("v1", Behavior::default()).await;
    let v2 = upstream("v2", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - name: canary
    backends: [ {{ cluster: v1, weight: 90 }}, {{ cluster: v2, weight: 10 }} ]
clusters:
{}{}",
        base(),
        cluster("v1", v1.addr),
        cluster("v2", v2.addr)
    );
    let gw = gateway(&cfg).await;
    let counts = spread(gw.addr("main").await, "x", "/", 2000).await;
    let v2n = *counts.get("v2").unwrap_or(&0) as f64;
    // Binomial(2000, 0.1): mean 200, sd ~13.4; ±5 sd.
    assert!(
        (133.0..=267.0).contains(&v2n),
        "v2 got {v2n} of 2000: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsets_select_endpoints_by_label() {
    let v1a = upstream("v1a", Behavior::default()).await;
    let v1b = upstream("v1b", Behavior::default()).await;
    let v2 = upstream("v2", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - name: to-v2
    match: {{ headers: [ {{ name: x-version, exact: v2 }} ] }}
    backends: [ {{ cluster: svc, subset: v2 }} ]
  - name: to-v1
    backends: [ {{ cluster: svc, subset: v1 }} ]
clusters:
  - name: svc
    endpoints:
      - {{ address: \"{}\", labels: {{ version: v1 }} }}
      - {{ address: \"{}\", labels: {{ version: v1 }} }}
      - {{ address: \"{}\", labels: {{ version: v2 }} }}
    subsets:
      - {{ name: v1, labels: {{ version: v1 }} }}
      - {{ name: v2, labels: {{ version: v2 }} }}
",
        base(),
        v1a.addr,
        v1b.addr,
        v2.addr
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    let counts = spread(addr, "x", "/", 40).await;
    assert_eq!(counts.get("v1a"), Some(&20), "{counts:?}");
    assert_eq!(counts.get("v1b"), Some(&20), "{counts:?}");
    for _ in 0..5 {
        assert_eq!(
            get(addr, "x", "/", &[("x-version", "v2")]).await.upstream(),
            "v2"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_direct_responses_rewrites_and_header_edits() {
    let a = upstream("a", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - name: to-https
    match: {{ path: {{ prefix: /old }} }}
    redirect: {{ scheme: https, path: /new, code: 301 }}
  - name: teapot
    match: {{ path: {{ exact: /tea }} }}
    direct_response: {{ status: 418, body: \"short and stout\" }}
  - name: api
    match: {{ path: {{ prefix: /api/ }} }}
    rewrite: {{ prefix: /v2/, host: backend.internal }}
    request_headers: {{ set: {{ x-set: one }}, add: {{ x-add: two }}, remove: [x-secret] }}
    response_headers: {{ set: {{ x-served-by: weir }}, remove: [x-upstream-private] }}
    backends: [ {{ cluster: a }} ]
  - name: regex-rewrite
    match: {{ path: {{ prefix: /r/ }} }}
    rewrite: {{ regex: {{ pattern: \"^/r/([a-z]+)/([0-9]+)$\", substitution: \"/items/$2/$1\" }} }}
    backends: [ {{ cluster: a }} ]
clusters:
{}",
        base(),
        cluster("a", a.addr)
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;

    let r = get(addr, "shop.example.com", "/old/x?q=1", &[]).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://shop.example.com/new?q=1");

    let r = get(addr, "x", "/tea", &[]).await;
    assert_eq!(r.status, 418);
    assert_eq!(r.body, "short and stout");
    assert_eq!(r.headers["content-type"], "text/plain");

    let r = get(
        addr,
        "x",
        "/api/users?id=7",
        &[("x-secret", "s"), ("x-add", "one")],
    )
    .await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["uri"], "/v2/users?id=7");
    assert_eq!(j["headers"]["host"], "backend.internal");
    assert_eq!(j["headers"]["x-set"], "one");
    assert!(j["headers"]["x-secret"].is_null());
    assert_eq!(j["headers"]["x-envoy-original-path"], "/api/users?id=7");
    assert_eq!(r.headers["x-served-by"], "weir");

    let r = get(addr, "x", "/r/book/12", &[]).await;
    assert_eq!(r.json()["uri"], "/items/12/book");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_request_id() {
    let a = upstream("a", Behavior::default()).await;
    let cfg = format!(
        "{}routes:\n  - {{ name: r, backends: [ {{ cluster: a }} ] }}\nclusters:\n{}",
        base(),
        cluster("a", a.addr)
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    let r = get(
        addr,
        "x",
        "/",
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
        ],
    )
    .await;
    let j = r.json();
    assert_eq!(j["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(j["headers"]["x-forwarded-proto"], "http");
    assert!(
        j["headers"]["x-hop"].is_null(),
        "headers named in Connection are hop-by-hop"
    );
    let id = j["headers"]["x-request-id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4");
    let r = get(addr, "x", "/", &[("x-request-id", "mine")]).await;
    assert_eq!(r.seen_header("x-request-id").as_deref(), Some("mine"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_with_nr_in_access_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let cfg = format!(
        "{}access_log: {{ enabled: true, path: \"{}\" }}\nroutes:\n  - {{ name: r, hosts: [only.example.com], direct_response: {{ status: 200 }} }}\n",
        base(),
        log.display()
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    let r = get(
        addr,
        "other.example.com",
        "/nothing",
        &[("x-request-id", "rid-1")],
    )
    .await;
    assert_eq!(r.status, 404);
    let mut line = String::new();
    for _ in 0..100 {
        line = std::fs::read_to_string(&log).unwrap_or_default();
        if !line.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(line.contains("\"GET /nothing HTTP/1.1\" 404 NR "), "{line}");
    assert!(line.contains("\"rid-1\""), "{line}");
    let m = admin_get(gw.admin(), "/metrics").await;
    assert!(m.body.contains("weir_no_route_total 1"), "{}", m.body);
}
